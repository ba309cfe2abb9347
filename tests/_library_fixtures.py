"""A small real library: two real H&E slides embedded by the embedded default model.

The sample (CMU-1 small region, 0.499 um/px) and the OpenSlide OS-1 OME-TIFF crop (0.227 um/px)
are embedded at a coarse tiling (1 um/px, 64 px tiles resized to the model's 112 px input:
~160 + 9 tiles, a few seconds on a busy CPU) and indexed together. A third store embeds the
sample at another tiling, to show how a query that does not fit the library is refused.
"""

from __future__ import annotations

from pathlib import Path

from napari_gpfm.data.sample import sample_slide_path

REPO = Path(__file__).resolve().parents[1]
OS1_CROP = REPO / "data" / "extra-he" / "openslide_os1_crop" / "OS-1-detail.ome.tif"
MODEL = "default"
SPEC = {"mpp": 1.0, "read_size": 64, "model_size": 112}
OTHER_SPEC = {"mpp": 2.0, "read_size": 64, "model_size": 112}


def embed(encoder, slide_path: Path, out: Path, spec_kwargs: dict,
          mpp: float | None = None) -> Path:
    """Embed ``slide_path`` into store ``out`` (``mpp``: for a file that records none)."""
    from napari_gpfm.embedding.engine import embed_slide, prepare_store
    from napari_gpfm.slides import open_slide
    from napari_gpfm.tiling import TilingSpec, make_grid

    spec = TilingSpec(**spec_kwargs)
    with open_slide(slide_path, mpp=mpp) as slide:
        grid = make_grid(slide, spec)
        store = prepare_store(out, slide=slide, grid=grid, encoder=encoder, spec=spec)
        embed_slide(slide, grid, encoder, store, device="cpu", batch_size=64, num_workers=0)
    return out


def build_library(root: Path) -> dict:
    """Stores of both slides, a store of the sample at another tiling, and their library."""
    from napari_gpfm.encoders import load_encoder
    from napari_gpfm.library import LibraryIndex

    encoder = load_encoder(MODEL)
    sample = embed(encoder, sample_slide_path(), root / "stores" / "sample.zarr", SPEC)
    other = embed(encoder, OS1_CROP, root / "stores" / "os1.zarr", SPEC)
    mismatched = embed(encoder, sample_slide_path(), root / "coarse" / "sample.zarr", OTHER_SPEC)
    library = LibraryIndex.build([sample, other], root / "library")
    return {
        "root": root,
        "sample_store": sample,
        "other_store": other,
        "mismatched_store": mismatched,
        "library": library.path,
        "sample_slide": sample_slide_path(),
        "other_slide": OS1_CROP,
        "encoder_id": encoder.encoder_id,
    }


NO_MPP_MPP = 0.5  # what the user says the pixel size of the no-mpp slide is


def build_library_with_unscaled_slide(root: Path) -> dict:
    """The sample and a real H&E pyramid whose file records no pixel size (as many exported
    TIFFs and some TCGA files), embedded with ``mpp`` given by the user, in one library."""
    from slide_factory import he_image, write_pyramid

    from napari_gpfm.encoders import load_encoder
    from napari_gpfm.library import LibraryIndex

    encoder = load_encoder(MODEL)
    unscaled = write_pyramid(root / "no-mpp.tif", he_image(640, 640, x=900, y=1500), levels=2,
                             mpp=None)
    sample = embed(encoder, sample_slide_path(), root / "stores" / "sample.zarr", SPEC)
    other = embed(encoder, unscaled, root / "stores" / "no-mpp.zarr", SPEC, mpp=NO_MPP_MPP)
    library = LibraryIndex.build([sample, other], root / "library")
    return {"library": library.path, "sample_store": sample, "unscaled_store": other,
            "unscaled_slide": unscaled}
