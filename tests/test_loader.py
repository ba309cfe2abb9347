"""TileLoader: pixels equal per-tile reads, order, resume, decode-once, cancel, bounded queue."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import tifffile
from slide_factory import TCGA_NO_MPP, he_image, write_pyramid, write_strip_tiff

from napari_gpfm.errors import ParameterError, SlideError
from napari_gpfm.slides import open_slide
from napari_gpfm.tiling.grid import TilingSpec, make_grid
from napari_gpfm.tiling.loader import TileLoader
from napari_gpfm.tiling.native import NativeTileReader
from napari_gpfm.tiling.tissue import TissueMask


def _everything(slide) -> TissueMask:
    w, h = slide.dimensions
    return TissueMask(np.ones((h // 16 + 1, w // 16 + 1), bool), (16.0, 16.0), (w, h),
                      slide.mpp_xy)


def _grid(slide, **spec):
    spec.setdefault("min_tissue", 0)
    return make_grid(slide, TilingSpec(**spec), tissue_mask=_everything(slide))


def _load(slide, grid, **kw):
    with TileLoader(slide, grid, **kw) as loader:
        batches = list(loader)
        stats = dict(loader.stats)
    return batches, stats


def _reference(slide, grid, i):
    return slide.read_region_mpp(tuple(int(v) for v in grid.coords[i]), grid.spec.read_size,
                                 grid.spec.mpp)


def _blocks(img: np.ndarray, f: int = 4) -> np.ndarray:
    h = img.shape[0] // f * f
    return img[:h, :h].astype(np.float64).reshape(h // f, f, h // f, f, 3).mean(axis=(1, 3))


def _live_loader_threads():
    return [t for t in threading.enumerate() if t.name.startswith("gpfm-tiles") and t.is_alive()]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loader")
    img = he_image(1536, 1280, x=300, y=1200)
    return {
        "pyramid": write_pyramid(folder / "pyr.tif", img, levels=3, mpp=0.25),  # lossless
        "flat": write_pyramid(folder / "flat.tif", img, levels=1, mpp=0.25),
        "strips": write_strip_tiff(folder / "strips.tif", img[:700, :900], mpp=0.5),
        "rgba": write_pyramid(folder / "rgba.tif",
                              np.dstack([img[:600, :800], np.full((600, 800), 200, np.uint8)]),
                              levels=2, mpp=0.5),
        "gray": write_pyramid(folder / "gray.tif", img[:600, :800, 1].copy(), levels=2, mpp=0.5),
    }


def test_sample_batches_equal_per_tile_reads(sample_slide_path):
    with open_slide(sample_slide_path) as slide:
        grid = make_grid(slide, TilingSpec())
        batches, stats = _load(slide, grid, batch_size=16, num_workers=2)
        assert [len(b) for b in batches] == [16, 16, 16, len(grid) - 48]
        images = np.concatenate([b.images for b in batches])
        assert images.shape == (len(grid), 224, 224, 3) and images.dtype == np.uint8
        np.testing.assert_array_equal(np.concatenate([b.indices for b in batches]),
                                      np.arange(len(grid)))
        np.testing.assert_array_equal(np.concatenate([b.coords for b in batches]), grid.coords)
        for i in range(len(grid)):  # same read level, no resize: pixel for pixel
            np.testing.assert_array_equal(images[i], _reference(slide, grid, i))
        assert stats["tiles"] == len(grid) and stats["batches"] == 4


@pytest.mark.parametrize(("mpp", "level"), [(0.5, 1), (1.0, 2), (0.6, 1), (0.45, 0)])
def test_pyramid_levels_and_resizes_match_read_region_mpp(files, mpp, level):
    # 0.5 and 1.0 read levels 1 and 2 as they are; 0.6 and 0.45 resize 269 -> 224 and
    # 403 -> 224 px with the same bilinear filter as Slide.read_region_mpp.
    with open_slide(files["pyramid"]) as slide:
        grid = _grid(slide, mpp=mpp, stride=150)
        with TileLoader(slide, grid, batch_size=7, num_workers=2) as loader:
            assert loader.level == level and loader.direct_decode
            for batch in loader:
                for img, i in zip(batch.images, batch.indices, strict=True):
                    np.testing.assert_array_equal(img, _reference(slide, grid, i))


@pytest.mark.parametrize("mpp", [0.5, 0.4875])
def test_box_reduced_tiles_are_close_to_read_region_mpp(files, mpp):
    # A single-level 0.25 um/px slide read at 0.5 (448 px -> reduce 2) or 0.4875 (437 px ->
    # reduce 2 -> 219 -> 224 px): box instead of bilinear antialiasing, so close, not equal.
    with open_slide(files["flat"]) as slide:
        grid = _grid(slide, mpp=mpp)
        batches, _ = _load(slide, grid, batch_size=8)
        for batch in batches:
            for img, i in zip(batch.images, batch.indices, strict=True):
                ref = _reference(slide, grid, i)
                # Filters differ on sharp nuclei edges (bilinear vs Lanczos differ ~5 levels
                # here too); 4 x 4 block means show the geometry: a half-pixel drift
                # at the far edge (a stretched tile) measured 3-4 levels there.
                assert np.abs(img.astype(np.float64) - ref).mean() < 6.0
                assert np.abs(_blocks(img) - _blocks(ref)).mean() < 1.5


@pytest.mark.parametrize("name", ["strips", "rgba", "gray"])
def test_other_layouts_match_read_region_mpp(files, name):
    with open_slide(files[name]) as slide:
        grid = _grid(slide, mpp=0.5, read_size=128, stride=100)
        with TileLoader(slide, grid, batch_size=5, num_workers=2) as loader:
            # Strip files go through zarr; tiled RGBA/grey files are decoded directly.
            assert loader.direct_decode == (name != "strips")
            for batch in loader:
                for img, i in zip(batch.images, batch.indices, strict=True):
                    np.testing.assert_array_equal(img, _reference(slide, grid, i))


def test_real_jpeg2000_svs_with_fractional_downsample():
    # A TCGA Aperio file: JPEG 2000 tiles, level 1 downsample 2.0005, no MPP (given here).
    with open_slide(TCGA_NO_MPP, mpp=0.25) as slide:
        grid = _grid(slide, mpp=0.5, stride=600)
        with TileLoader(slide, grid, batch_size=4) as loader:
            assert loader.level == 1 and loader.read_px == 224 and loader.direct_decode
            for batch in loader:
                for img, i in zip(batch.images, batch.indices, strict=True):
                    np.testing.assert_array_equal(img, _reference(slide, grid, i))


def test_native_reader_equals_zarr_on_every_tile(sample_slide_path):
    with open_slide(sample_slide_path) as slide, NativeTileReader(slide, 0) as reader:
        assert reader.direct
        g = reader.grid
        for r in range(g.rows):
            for c in range(g.cols):
                y0, y1, x0, x1 = g.bounds(r, c)
                np.testing.assert_array_equal(reader.decode(r, c),
                                              np.asarray(slide._zarr_level(0)[y0:y1, x0:x1]))


def test_each_native_tile_is_decoded_once(files):
    with open_slide(files["pyramid"]) as slide:
        # Overlapping 224 px tiles (stride 100) on level 1's 256 px native tiles.
        grid = _grid(slide, mpp=0.5, stride=100)
        xy = np.floor(grid.coords / slide.level_downsamples[1]).astype(int)
        needed = {(r, c) for x, y in xy
                  for r in range(y // 256, (y + 223) // 256 + 1)
                  for c in range(x // 256, (x + 223) // 256 + 1)}
        batches, stats = _load(slide, grid, batch_size=3, num_workers=3)
        assert stats["decoded_tiles"] == len(needed)
        # Without a cache, tiles shared across batches are decoded again: same pixels.
        again, stats0 = _load(slide, grid, batch_size=3, num_workers=3, cache_mb=0)
        assert stats0["decoded_tiles"] > len(needed)
        for a, b in zip(batches, again, strict=True):
            np.testing.assert_array_equal(a.images, b.images)


def test_order_is_deterministic_and_start_resumes(files):
    with open_slide(files["pyramid"]) as slide:
        grid = _grid(slide, mpp=0.5, read_size=96, stride=90)
        serial, _ = _load(slide, grid, batch_size=5, num_workers=0)
        threaded, _ = _load(slide, grid, batch_size=5, num_workers=3, prefetch=1)
        full = np.concatenate([b.images for b in serial])
        np.testing.assert_array_equal(np.concatenate([b.images for b in threaded]), full)
        np.testing.assert_array_equal(np.concatenate([b.indices for b in threaded]),
                                      np.arange(len(grid)))
        resumed, _ = _load(slide, grid, batch_size=5, num_workers=2, start=7, stop=30)
        assert [len(b) for b in resumed] == [5, 5, 5, 5, 3]
        np.testing.assert_array_equal(np.concatenate([b.indices for b in resumed]),
                                      np.arange(7, 30))
        np.testing.assert_array_equal(np.concatenate([b.images for b in resumed]), full[7:30])
        np.testing.assert_array_equal(np.concatenate([b.coords for b in resumed]),
                                      grid.coords[7:30])


def test_cancel_from_another_thread_stops_and_joins(files):
    with open_slide(files["flat"]) as slide:
        # 13k resized tiles (307 -> 256 px): far more than the test lets it load.
        grid = _grid(slide, mpp=0.3, read_size=256, stride=8)
        loader = TileLoader(slide, grid, batch_size=32, num_workers=2, prefetch=1)
        third = threading.Event()
        cancelled_at = []

        def canceller():
            third.wait(30)
            loader.cancel()
            cancelled_at.append(time.perf_counter())

        thread = threading.Thread(target=canceller)
        thread.start()
        seen = 0
        for _ in loader:
            seen += 1
            if seen == 3:
                third.set()
                thread.join()
        ended = time.perf_counter()
        assert seen == 3  # nothing is yielded once cancel() has returned
        assert ended - cancelled_at[0] < 2.0
        assert loader.cancelled and loader.stats["built"] < len(loader)
        assert not _live_loader_threads()
        assert list(loader) == []  # a cancelled loader stays stopped
        loader.close()


def test_cancel_reaches_a_consumer_waiting_for_a_batch(files):
    with open_slide(files["flat"]) as slide:
        # 1229 -> 1024 px resizes: a batch of 16 takes a good fraction of a second to build.
        grid = _grid(slide, mpp=0.3, read_size=1024, stride=32)
        with TileLoader(slide, grid, batch_size=16, num_workers=1, prefetch=0) as loader:
            timer = threading.Timer(0.02, loader.cancel)
            start = time.perf_counter()
            timer.start()
            got = list(loader)
            elapsed = time.perf_counter() - start
            timer.join()
            assert got == [] and loader.stats["built"] == 0
            assert elapsed < 1.5
            assert not _live_loader_threads()


def test_close_from_another_thread_during_serial_loading(files):
    with open_slide(files["flat"]) as slide:
        grid = _grid(slide, mpp=0.3, read_size=256, stride=8)
        loader = TileLoader(slide, grid, batch_size=32, num_workers=0)
        seen = 0
        for _ in loader:
            seen += 1
            if seen == 1:
                closer = threading.Thread(target=loader.close)
                closer.start()
                closer.join()
        assert seen == 1


def test_queue_is_bounded_when_the_consumer_stalls(files):
    with open_slide(files["flat"]) as slide:
        grid = _grid(slide, mpp=0.3, read_size=256, stride=8)
        with TileLoader(slide, grid, batch_size=16, num_workers=2, prefetch=1) as loader:
            it = iter(loader)
            next(it)
            time.sleep(0.8)  # long enough to build many more batches if nothing held them back
            assert 1 < loader.stats["built"] <= 1 + 2 + 1
            it.close()
        assert not _live_loader_threads()


def test_a_damaged_tile_fails_with_a_readable_error(tmp_path):
    path = write_pyramid(tmp_path / "bad.tif", he_image(1024, 768), levels=1, mpp=0.5,
                         compression="jpeg")
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        offset, count = page.dataoffsets[5], page.databytecounts[5]
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(b"\x00" * count)
    with open_slide(path) as slide:
        grid = _grid(slide, mpp=0.5, read_size=256)
        with TileLoader(slide, grid, batch_size=4) as loader, \
                pytest.raises(SlideError, match=r"tile \(1, 1\).*damaged"):
            list(loader)
        assert not _live_loader_threads()


def test_parameters_and_mismatched_grid_are_refused(files, sample_slide_path):
    with open_slide(files["pyramid"]) as slide, open_slide(sample_slide_path) as sample:
        grid = _grid(slide, mpp=0.5)
        with pytest.raises(ParameterError, match="batch_size"):
            TileLoader(slide, grid, batch_size=0)
        with pytest.raises(ParameterError, match="start"):
            TileLoader(slide, grid, start=len(grid) + 1)
        with pytest.raises(ParameterError, match="made for a 1536 x 1280"):
            TileLoader(sample, grid)
    with open_slide(files["pyramid"], mpp=0.3) as other_mpp, \
            pytest.raises(ParameterError, match="--slide-mpp"):
        TileLoader(other_mpp, grid)
