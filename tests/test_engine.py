"""The embedding engine on the CPU: correctness, resume after interruption, OOM halving."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from napari_gpfm.embedding.engine import (
    embed_slide,
    iter_embed,
    pending_runs,
    prepare_store,
    resolve_device,
    resolve_precision,
)
from napari_gpfm.embedding.store import EmbeddingStore
from napari_gpfm.encoders import Encoder, load_encoder
from napari_gpfm.errors import ParameterError, StoreError, WeightsError
from napari_gpfm.slides import open_slide
from napari_gpfm.tiling import TileLoader, TilingSpec, make_grid

ARCH = "test_vit"  # a real timm ViT (patch 16, 160 px, 64-d), small enough for CPU tests
TOL = {"atol": 2e-3, "rtol": 2e-3}  # float16 storage, batch-composition rounding


def _save_random_weights(path, seed=0, final_norm_scale=None):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = timm.create_model(ARCH, num_classes=0)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if final_norm_scale is not None:
        state["norm.weight"] = torch.full_like(state["norm.weight"], final_norm_scale)
    save_file(state, str(path))
    return path


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return _save_random_weights(tmp_path_factory.mktemp("w") / f"{ARCH}.safetensors")


@pytest.fixture(scope="module")
def encoder(weights):
    return load_encoder(f"timm:{ARCH}", weights=weights)


@pytest.fixture(scope="module")
def slide(sample_slide_path):
    with open_slide(sample_slide_path) as s:
        yield s


@pytest.fixture(scope="module")
def grid(slide):
    return make_grid(slide, TilingSpec(mpp=1.0, read_size=160, model_size=160))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, slide, grid, encoder):
    """An uninterrupted run, and the features computed directly from the loader's tiles."""
    path = tmp_path_factory.mktemp("ref") / "ref.zarr"
    store = prepare_store(path, slide=slide, grid=grid, encoder=encoder)
    result = embed_slide(slide, grid, encoder, store, device="cpu", batch_size=8)
    direct = []
    with TileLoader(slide, grid, batch_size=8, num_workers=0) as loader, torch.inference_mode():
        for batch in loader:
            direct.append(encoder(encoder.preprocess_on_device(batch.images))["cls"].numpy())
    return store, result, np.concatenate(direct)


class CountingEncoder(Encoder):
    """The real encoder, counting tiles, failing on a chosen call or above a batch size.

    ``oom_above`` raises the exception CUDA raises when a batch does not fit, so the engine's
    batch-halving path runs for real on the CPU.
    """

    def __init__(self, base: Encoder, *, fail_on_call: int | None = None,
                 oom_above: int | None = None):
        super().__init__(base.spec, base.backbone, weights_path=base.weights_path,
                         weights_sha256=base.weights_sha256,
                         checkpoint_layout=base.checkpoint_layout)
        self.fail_on_call = fail_on_call
        self.oom_above = oom_above
        self.calls = 0
        self.tiles = 0
        self.batch_sizes: list[int] = []

    def forward(self, x, patch_tokens=False):
        self.calls += 1
        if self.oom_above is not None and x.shape[0] > self.oom_above:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if self.fail_on_call is not None and self.calls == self.fail_on_call:
            raise RuntimeError("the machine fell over")
        self.tiles += x.shape[0]
        self.batch_sizes.append(int(x.shape[0]))
        return super().forward(x, patch_tokens=patch_tokens)


def test_features_equal_a_direct_forward_and_rows_follow_the_grid(reference, grid):
    store, result, direct = reference
    assert len(grid) == 24
    assert result.complete and not result.cancelled
    assert result.computed == result.total == result.done == len(grid) and result.skipped == 0
    assert result.device == "cpu" and result.precision == "fp32"
    reopened = EmbeddingStore.open(store.path)
    assert reopened.is_complete and reopened.attrs["complete"] is True
    np.testing.assert_array_equal(reopened.coords, grid.coords)
    np.testing.assert_allclose(reopened.features, direct, **TOL)


def test_cancel_then_rerun_finishes_without_recomputing(tmp_path, slide, grid, encoder,
                                                        reference):
    path = tmp_path / "s.zarr"
    store = prepare_store(path, slide=slide, grid=grid, encoder=encoder)
    cancel = threading.Event()
    seen = []

    def on_progress(p):
        seen.append(p)
        assert p.batch_features.shape == (len(p.batch_indices), encoder.embed_dim)
        if len(seen) == 2:
            cancel.set()

    first = embed_slide(slide, grid, encoder, store, device="cpu", batch_size=4,
                        progress=on_progress, cancel_event=cancel)
    assert first.cancelled and not first.complete
    done_before = EmbeddingStore.open(path).n_done
    assert 8 <= done_before < len(grid)
    assert first.done == done_before == first.computed

    counting = CountingEncoder(encoder)
    store = prepare_store(path, slide=slide, grid=grid, encoder=counting)
    second = embed_slide(slide, grid, counting, store, device="cpu", batch_size=4)
    assert second.complete and second.skipped == done_before
    assert counting.tiles == second.computed == len(grid) - done_before
    np.testing.assert_allclose(EmbeddingStore.open(path).features, reference[0].features, **TOL)


def test_closing_the_generator_keeps_written_batches(tmp_path, slide, grid, encoder):
    store = prepare_store(tmp_path / "s.zarr", slide=slide, grid=grid, encoder=encoder)
    gen = iter_embed(slide, grid, encoder, store, device="cpu", batch_size=4)
    first = next(gen)
    assert first.done == 4 and first.total == len(grid)
    np.testing.assert_array_equal(first.batch_indices, np.arange(4))
    gen.close()  # what a GUI does when the user presses Cancel
    reopened = EmbeddingStore.open(tmp_path / "s.zarr")
    assert 4 <= reopened.n_done < len(grid)
    assert not (tmp_path / "s.zarr.lock").exists()
    np.testing.assert_array_equal(reopened.done_indices, np.arange(reopened.n_done))


def test_a_crash_mid_run_then_rerun(tmp_path, slide, grid, encoder, reference):
    path = tmp_path / "s.zarr"
    failing = CountingEncoder(encoder, fail_on_call=3)
    store = prepare_store(path, slide=slide, grid=grid, encoder=failing)
    with pytest.raises(RuntimeError, match="fell over"):
        embed_slide(slide, grid, failing, store, device="cpu", batch_size=4)
    after_crash = EmbeddingStore.open(path)
    assert after_crash.n_done == 8  # the two batches computed before the failure
    assert after_crash.attrs["complete"] is False

    counting = CountingEncoder(encoder)
    store = prepare_store(path, slide=slide, grid=grid, encoder=counting)
    result = embed_slide(slide, grid, counting, store, device="cpu", batch_size=4)
    assert result.complete and counting.tiles == len(grid) - 8 == result.computed
    np.testing.assert_allclose(store.features, reference[0].features, **TOL)


def test_out_of_memory_halves_the_batch_and_goes_on(tmp_path, slide, grid, encoder, reference):
    oom = CountingEncoder(encoder, oom_above=3)
    store = prepare_store(tmp_path / "s.zarr", slide=slide, grid=grid, encoder=oom)
    result = embed_slide(slide, grid, oom, store, device="cpu", batch_size=10)
    assert result.complete and result.oom_splits == 2 and result.micro_batch == 2
    assert max(oom.batch_sizes) <= 3 and oom.tiles == len(grid)
    np.testing.assert_allclose(store.features, reference[0].features, **TOL)

    hopeless = CountingEncoder(encoder, oom_above=0)
    store = prepare_store(tmp_path / "t.zarr", slide=slide, grid=grid, encoder=hopeless)
    with pytest.raises(ParameterError, match="even for one tile"):
        embed_slide(slide, grid, hopeless, store, device="cpu", batch_size=4)


def test_limit_then_finish(tmp_path, slide, grid, encoder, reference):
    store = prepare_store(tmp_path / "s.zarr", slide=slide, grid=grid, encoder=encoder)
    part = embed_slide(slide, grid, encoder, store, device="cpu", batch_size=4, limit=6)
    assert part.computed == 6 and not part.complete
    # A gap in the done rows (as left by an unordered writer) is filled too.
    store.write(np.array([15]), reference[0].read_features(np.array([15])))
    rest = embed_slide(slide, grid, encoder, store, device="cpu", batch_size=4)
    assert rest.computed == len(grid) - 7 and rest.complete
    np.testing.assert_allclose(store.features, reference[0].features, **TOL)


def test_patch_tokens_and_mean_pooling(tmp_path, slide, grid, encoder):
    store = prepare_store(tmp_path / "p.zarr", slide=slide, grid=grid, encoder=encoder,
                          pooling="cls+mean", patch_tokens=True)
    assert store.patch_tokens_shape == (10, 10, 64)
    assert store.embed_dim == 128
    result = embed_slide(slide, grid, encoder, store, device="cpu", batch_size=8, limit=8)
    assert result.computed == 8
    idx = np.arange(8)
    tokens = store.read_patch_tokens(idx)
    feats = store.read_features(idx)
    with TileLoader(slide, grid, batch_size=8, num_workers=0, stop=8) as loader:
        images = next(iter(loader)).images
    with torch.inference_mode():
        out = encoder(encoder.preprocess_on_device(images), patch_tokens=True)
    np.testing.assert_allclose(tokens, out["patch_tokens"].numpy(), **TOL)
    np.testing.assert_allclose(feats[:, :64], out["cls"].numpy(), **TOL)
    np.testing.assert_allclose(feats[:, 64:], out["patch_tokens"].mean((1, 2)).numpy(),
                               atol=3e-3, rtol=3e-3)
    # Resuming with other settings is refused instead of mixing two kinds of features.
    with pytest.raises(StoreError, match="pooling"):
        prepare_store(tmp_path / "p.zarr", slide=slide, grid=grid, encoder=encoder)
    prepare_store(tmp_path / "r.zarr", slide=slide, grid=grid, encoder=encoder)
    with pytest.raises(StoreError, match="patch tokens"):
        prepare_store(tmp_path / "r.zarr", slide=slide, grid=grid, encoder=encoder,
                      patch_tokens=True)


def test_store_of_another_encoder_is_refused(tmp_path, slide, grid, encoder, reference):
    other = load_encoder(f"timm:{ARCH}", weights=_save_random_weights(
        tmp_path / "other.safetensors", seed=1))
    with pytest.raises(StoreError, match="weights file"):
        prepare_store(reference[0].path, slide=slide, grid=grid, encoder=other)
    with pytest.raises(StoreError, match="made with encoder"):
        embed_slide(slide, grid, other, reference[0], device="cpu")
    coarse = make_grid(slide, TilingSpec(mpp=2.0, read_size=160, model_size=160,
                                         min_tissue=0.1))
    with pytest.raises(StoreError, match="tiling"):
        prepare_store(reference[0].path, slide=slide, grid=coarse, encoder=encoder)


def test_non_finite_weights_and_features_are_reported_as_bad_weights(tmp_path, slide, grid):
    with pytest.raises(WeightsError, match=r"nan.safetensors holds NaN or infinite values in 1 "
                                           r"tensor\(s\) \(norm.weight\)"):
        load_encoder(f"timm:{ARCH}", weights=_save_random_weights(
            tmp_path / "nan.safetensors", final_norm_scale=float("nan")))
    # Finite weights can still overflow float32 (the normalised features times 3e38).
    overflowing = load_encoder(f"timm:{ARCH}", weights=_save_random_weights(
        tmp_path / "huge.safetensors", final_norm_scale=3e38))
    store = prepare_store(tmp_path / "s.zarr", slide=slide, grid=grid, encoder=overflowing)
    with pytest.raises(WeightsError, match="NaN/inf features"):
        embed_slide(slide, grid, overflowing, store, device="cpu", batch_size=4)
    assert EmbeddingStore.open(tmp_path / "s.zarr").n_done == 0


def test_devices_and_precisions():
    assert resolve_device("auto").type in ("cuda", "mps", "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ParameterError, match="no CUDA GPU"):
            resolve_device("cuda")
    with pytest.raises(ParameterError, match="not a device"):
        resolve_device("gpu0")
    assert resolve_precision("auto", torch.device("cpu")) is None
    assert resolve_precision("bf16", torch.device("cpu")) is torch.bfloat16
    with pytest.raises(ParameterError, match="fp16"):
        resolve_precision("fp16", torch.device("cpu"))


def test_parameters_are_checked(tmp_path, slide, grid, encoder):
    store = prepare_store(tmp_path / "s.zarr", slide=slide, grid=grid, encoder=encoder)
    for kwargs, flag in (({"batch_size": 0}, "--batch-size"), ({"num_workers": -1}, "--workers"),
                         ({"limit": -2}, "--limit")):
        with pytest.raises(ParameterError, match=flag):
            embed_slide(slide, grid, encoder, store, device="cpu", **kwargs)
    wrong = make_grid(slide, TilingSpec(mpp=1.0, read_size=160, model_size=224))
    wrong_store = prepare_store(tmp_path / "w.zarr", slide=slide, grid=wrong, encoder=encoder)
    with pytest.raises(ParameterError, match="--size 160"):
        embed_slide(slide, wrong, encoder, wrong_store, device="cpu")


def test_pending_runs():
    done = np.array([1, 1, 0, 0, 1, 0, 1, 0, 0, 0], bool)
    assert pending_runs(done) == [(2, 4), (5, 6), (7, 10)]
    assert pending_runs(done, limit=3) == [(2, 4), (5, 6)]
    assert pending_runs(np.ones(3, bool)) == []
    assert pending_runs(np.zeros(0, bool)) == []


def test_compiled_forward_pads_the_last_batch(tmp_path, slide, grid, encoder, reference):
    # The "eager" backend runs TorchDynamo's capture without a C++ toolchain; CUDA runs use
    # inductor. 24 tiles in batches of 10: the last batch of 4 is padded to the graph's 10.
    store = prepare_store(tmp_path / "c.zarr", slide=slide, grid=grid, encoder=encoder)
    result = embed_slide(slide, grid, encoder, store, device="cpu", batch_size=10,
                         compile="eager")
    assert result.compiled and result.complete and result.computed == len(grid)
    np.testing.assert_allclose(store.features, reference[0].features, **TOL)
