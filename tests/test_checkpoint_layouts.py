"""Checkpoint files: safe reading, layout detection and conversion, one-line fit errors.

The GPFM test writes random ViT-L/14 weights in the official release layout and checks they
give the same features as the same weights saved as a timm-layout .safetensors file.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from _encoder_fixtures import random_state_dict, to_dinov2_release, to_hf_vit
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from napari_gpfm.encoders import get_spec, load_encoder, read_checkpoint, weights_sha256
from napari_gpfm.encoders.checkpoints import (
    DATA_DIGEST_KEY,
    non_finite_tensors,
    safetensors_bytes,
)
from napari_gpfm.encoders.layouts import StateDict, convert, detect_layout, unwrap
from napari_gpfm.errors import WeightsError

TINY = "timm:vit_tiny_patch16_224"


# --------------------------------------------------------------------------- GPFM release
@pytest.fixture(scope="module")
def gpfm_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("gpfm")
    state = random_state_dict(get_spec("gpfm"), seed=0)
    release = to_dinov2_release(state, depth=24, chunks=4, embed_dim=1024)
    torch.save(release, folder / "GPFM.pth")
    del release
    save_file(state, str(folder / "gpfm-timm.safetensors"))
    return {"dir": folder, "release": folder / "GPFM.pth", "timm": folder / "gpfm-timm.safetensors"}


def test_release_layout_is_chunked_like_the_official_file(gpfm_files):
    raw = read_checkpoint(gpfm_files["release"])
    keys = set(raw["teacher"])
    assert list(raw) == ["teacher"]
    # chunk c holds global block indices 6c..6c+5
    assert "backbone.blocks.0.0.attn.qkv.weight" in keys
    assert "backbone.blocks.3.18.ls1.gamma" in keys
    assert "backbone.blocks.3.23.mlp.fc2.bias" in keys
    assert "backbone.mask_token" in keys and "dino_head.last_layer.weight_v" in keys
    assert not any(k.startswith("backbone.blocks.1.0.") for k in keys)


def test_gpfm_release_matches_its_timm_copy(gpfm_files):
    generator = torch.Generator().manual_seed(3)
    images = torch.randn(2, 3, 224, 224, generator=generator)

    release = load_encoder("gpfm", models_dir=gpfm_files["dir"])  # found as GPFM.pth
    assert release.weights_path == gpfm_files["release"]
    assert release.checkpoint_layout == "dinov2"
    with torch.inference_mode():
        from_release = release(images, patch_tokens=True)
    del release

    timm_copy = load_encoder("gpfm", weights=gpfm_files["timm"])
    assert timm_copy.checkpoint_layout == "timm"
    with torch.inference_mode():
        from_timm = timm_copy(images, patch_tokens=True)

    assert from_release["cls"].shape == (2, 1024)
    assert from_release["patch_tokens"].shape == (2, 16, 16, 1024)
    assert from_release["cls"].dtype == torch.float32
    assert (from_release["cls"] - from_timm["cls"]).abs().max() < 1e-4
    assert (from_release["patch_tokens"] - from_timm["patch_tokens"]).abs().max() < 1e-4
    # the two images really differ, so equality is not a constant output
    assert (from_release["cls"][0] - from_release["cls"][1]).abs().max() > 1e-2
    assert timm_copy.encoder_id == f"gpfm@{weights_sha256(gpfm_files['timm'])[:12]}"


# --------------------------------------------------------------------------- layouts (unit)
def _state(tensors: dict, wrappers: tuple[str, ...] = ()) -> StateDict:
    return StateDict(tensors, wrappers)


def test_dinov2_unchunking_uses_the_global_block_index(tmp_path):
    t = {f"backbone.blocks.{i // 2}.{i}.norm1.weight": torch.full((2,), float(i)) for i in range(4)}
    t["backbone.mask_token"] = torch.zeros(1, 2)
    t["backbone.cls_token"] = torch.zeros(1, 1, 2)
    t["dino_head.mlp.0.weight"] = torch.zeros(3, 2)
    t["ibot_head.mlp.0.weight"] = torch.zeros(3, 2)
    state = _state(t, ("teacher",))
    assert detect_layout(state) == "dinov2"
    out = convert(state, "dinov2", tmp_path / "x.pth")
    assert sorted(out) == [
        "blocks.0.norm1.weight",
        "blocks.1.norm1.weight",
        "blocks.2.norm1.weight",
        "blocks.3.norm1.weight",
        "cls_token",
    ]
    assert all(out[f"blocks.{i}.norm1.weight"][0] == i for i in range(4))


def test_dinov2_training_checkpoint_takes_the_teacher(tmp_path):
    raw = {
        "model": {
            "student.backbone.norm.weight": torch.zeros(2),
            "teacher.backbone.norm.weight": torch.ones(2),
        },
        "iteration": 10,
    }
    state = unwrap(raw, tmp_path / "x.pth")
    assert detect_layout(state) == "dinov2"
    out = convert(state, "dinov2", tmp_path / "x.pth")
    assert list(out) == ["norm.weight"] and out["norm.weight"].sum() == 2


def test_dinov2_duplicate_blocks_are_refused(tmp_path):
    state = _state(
        {"blocks.0.1.norm1.weight": torch.zeros(2), "blocks.1.1.norm1.weight": torch.zeros(2)}
    )
    with pytest.raises(WeightsError, match="two tensors for 'blocks.1.norm1.weight'"):
        convert(state, "dinov2", tmp_path / "x.pth")


def test_layout_detection(tmp_path):
    z = torch.zeros(1)
    assert (
        detect_layout(_state({"patch_embed.proj.weight": z, "blocks.0.norm1.weight": z})) == "timm"
    )
    assert (
        detect_layout(_state({"vit.embeddings.patch_embeddings.projection.weight": z})) == "hf-vit"
    )
    assert detect_layout(_state({"visual.trunk.cls_token": z, "text.x": z})) == "conch"
    assert detect_layout(_state({"trunk.cls_token": z, "attn_pool_contrast.query": z})) == "conch"
    assert detect_layout(_state({"backbone.norm.weight": z})) == "dinov2"


def test_hf_vit_conversion_concatenates_qkv_and_drops_the_pooler(tmp_path):
    spec = get_spec("phikon")
    state = random_state_dict(spec, seed=5)
    hf = to_hf_vit(state, prefix="vit.")
    out = convert(unwrap(hf, tmp_path / "p.bin"), "hf-vit", tmp_path / "p.bin")
    assert set(out) == set(state)
    assert all(torch.equal(out[k], state[k]) for k in state)


@pytest.mark.parametrize("wrap", ["state_dict", "model", "module-prefix"])
def test_wrapped_state_dicts_load(tmp_path, wrap):
    spec = get_spec(TINY)
    state = random_state_dict(spec, seed=1)
    if wrap == "module-prefix":
        payload = {f"module.{k}": v for k, v in state.items()}
    else:
        payload = {wrap: state, "epoch": 3}
    torch.save(payload, tmp_path / "w.pth")
    save_file(state, str(tmp_path / "plain.safetensors"))
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        wrapped = load_encoder(TINY, weights=tmp_path / "w.pth")(x)["cls"]
        plain = load_encoder(TINY, weights=tmp_path / "plain.safetensors")(x)["cls"]
    assert torch.equal(wrapped, plain)


# --------------------------------------------------------------------------- errors
def test_missing_unexpected_and_shape_mismatch_in_one_line(tmp_path):
    state = random_state_dict(get_spec(TINY), seed=2)
    for k in [k for k in state if k.startswith("blocks.11.")]:
        del state[k]  # 12 missing keys
    state["extra.head.weight"] = torch.zeros(3)
    state["pos_embed"] = torch.zeros(1, 50, 192)
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(WeightsError) as info:
        load_encoder(TINY, weights=tmp_path / "bad.safetensors")
    message = str(info.value)
    assert "\n" not in message
    assert "bad.safetensors" in message and "layout 'timm'" in message
    assert "12 missing keys (blocks.11.norm1.weight" in message and "7 more" in message
    assert "1 unexpected keys (extra.head.weight)" in message
    assert "pos_embed: file (1, 50, 192) vs model (1, 197, 192)" in message


def test_layout_not_accepted_by_the_encoder(tmp_path):
    hf = to_hf_vit(random_state_dict(get_spec("phikon"), seed=4))
    torch.save(hf, tmp_path / "phikon.bin")
    with pytest.raises(WeightsError, match=r"looks like a 'hf-vit' checkpoint .* encoder 'uni'"):
        load_encoder("uni", weights=tmp_path / "phikon.bin")


def test_incomplete_hf_attention_is_reported_by_name(tmp_path):
    hf = to_hf_vit(random_state_dict(get_spec("phikon"), seed=4))
    del hf["encoder.layer.3.attention.attention.value.weight"]
    torch.save(hf, tmp_path / "phikon.bin")
    with pytest.raises(WeightsError) as info:
        load_encoder("phikon", weights=tmp_path / "phikon.bin")
    message = str(info.value)
    assert "1 missing keys (blocks.3.attn.qkv.weight)" in message
    assert "encoder.layer.3.attention.attention.query.weight" in message


class _WritesAFile:
    """Unpickling this calls open(marker, 'w'), which creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_unsafe_pickle_is_refused_without_running_it(tmp_path, writer):
    marker = tmp_path / "pwned"
    payload = {"weight": torch.zeros(2), "trap": _WritesAFile(marker)}
    path = tmp_path / "evil.pth"
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as handle:
            pickle.dump(payload, handle)

    with pytest.raises(WeightsError, match="refused to load .*evil.pth.*not just tensors"):
        read_checkpoint(path)
    with pytest.raises(WeightsError, match="refused"):
        load_encoder("gpfm", weights=path)
    assert not marker.exists()

    # the trap is live: an ordinary unpickler would have run it
    live = tmp_path / "live"
    pickle.loads(pickle.dumps(_WritesAFile(live)))
    assert live.exists()


def test_unreadable_files(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint at all" * 10)
    with pytest.raises(WeightsError, match="garbage.pth is not a"):
        read_checkpoint(garbage)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(WeightsError, match="empty"):
        read_checkpoint(empty)
    with pytest.raises(WeightsError, match="does not exist"):
        read_checkpoint(tmp_path / "nope.pth")
    with pytest.raises(WeightsError, match="not a file"):
        read_checkpoint(tmp_path)
    broken = tmp_path / "broken.safetensors"
    save_file({"a": torch.zeros(100)}, str(broken))
    broken.write_bytes(broken.read_bytes()[:-50])
    with pytest.raises(WeightsError, match="damaged safetensors"):
        read_checkpoint(broken)
    with pytest.raises(WeightsError, match="holds no state dict"):
        unwrap({"epoch": 3, "config": {"lr": 0.1}}, tmp_path / "x.pth")


def test_weights_sha256_streams_the_whole_file(tmp_path):
    import hashlib

    path = tmp_path / "blob.bin"
    data = bytes(range(256)) * 9000  # > 2 chunks of 1 MiB
    path.write_bytes(data)
    assert weights_sha256(path) == hashlib.sha256(data).hexdigest()


def test_gpfm_release_and_timm_copy_give_the_same_store_through_the_cli(
    gpfm_files, sample_slide_path, tmp_path
):
    """`gpfm embed --model gpfm` with the release file and with its timm copy: same features."""
    import numpy as np

    from napari_gpfm.cli import main
    from napari_gpfm.embedding.store import EmbeddingStore

    stores = {}
    for name in ("release", "timm"):
        out = tmp_path / name
        # fp32 features, 2 tiles at 1 um/px (ViT-L runs at ~0.4 tiles/s on a 2-core CPU)
        assert main(["embed", str(sample_slide_path), "--model", "gpfm", "--weights",
                     str(gpfm_files[name]), "--mpp", "1.0", "--limit", "2", "--dtype", "float32",
                     "--device", "cpu", "--batch-size", "2", "--out", str(out), "--quiet"]) == 0
        [path] = out.glob("*/*.zarr")
        stores[name] = EmbeddingStore.open(path)
    a, b = stores["release"], stores["timm"]
    assert a.n_done == b.n_done == 2
    np.testing.assert_array_equal(a.coords, b.coords)
    assert np.abs(a.features - b.features).max() < 1e-4
    assert np.abs(a.features[0] - a.features[1]).max() > 1e-3  # two tiles, two answers
    assert a.attrs["weights_sha256"] != b.attrs["weights_sha256"]  # two files, two identities


def test_weights_holding_nan_or_infinity_are_refused_by_name(tmp_path):
    spec = get_spec(TINY)
    state = random_state_dict(spec, seed=0)
    state["blocks.3.attn.qkv.weight"][0, 0] = float("nan")
    state["norm.bias"][5] = float("inf")
    path = tmp_path / "diverged.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError, match=r"diverged.pth holds NaN or infinite values in 2 "
                                           r"tensor\(s\) \(blocks.3.attn.qkv.weight, norm.bias\)"):
        load_encoder(TINY, weights=path)
    # Finite values whose sum overflows are not mistaken for infinity (the scan's fast path).
    assert non_finite_tensors({"huge": torch.tensor([3e38, 3e38]), "steps": torch.tensor([7]),
                               "norm.bias": state["norm.bias"]}) == ["norm.bias"]
    state["blocks.3.attn.qkv.weight"][0, 0] = 0.0
    state["norm.bias"][5] = 0.0
    torch.save(state, path)
    assert load_encoder(TINY, weights=path).spec.name == TINY


def test_a_flipped_byte_in_signed_tensor_data_is_caught(tmp_path):
    """safetensors itself parses a file whose tensor bytes changed; the digest that napari-gpfm's
    writers put in the header does not let it through."""
    state = {"a": torch.arange(1000, dtype=torch.float32), "b": torch.ones(3, 4)}
    path = tmp_path / "signed.safetensors"
    path.write_bytes(safetensors_bytes(state, {"format": "pt"}))
    read = read_checkpoint(path)
    assert torch.equal(read["a"], state["a"]) and torch.equal(read["b"], state["b"])
    with safe_open(str(path), framework="pt") as handle:
        assert set(handle.metadata()) == {"format", DATA_DIGEST_KEY}

    data = bytearray(path.read_bytes())
    data[-1000] ^= 0x40  # inside "a": one float changes, the file still parses
    path.write_bytes(bytes(data))
    assert not torch.equal(load_file(str(path))["a"], state["a"])
    with pytest.raises(WeightsError, match=r"signed.safetensors is damaged: its tensor data"):
        read_checkpoint(path)
    # Files from elsewhere carry no digest and load as before.
    plain = tmp_path / "plain.safetensors"
    save_file(state, str(plain))
    assert torch.equal(read_checkpoint(plain)["a"], state["a"])


def test_the_same_tensors_always_give_the_same_file():
    """A file's sha256 names the encoder in stores and libraries, so writing the same weights
    again must give the same bytes; safetensors orders the header's metadata differently from
    call to call (a hash map), and the writer sorts it."""
    state = {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.ones(5)}
    metadata = {"format": "pt", "layout": "timm", "note": "x", "z": "1", "a": "2"}
    files = {safetensors_bytes(state, metadata) for _ in range(20)}
    assert len(files) == 1
    (blob,) = files
    assert (8 + int.from_bytes(blob[:8], "little")) % 8 == 0  # the data stays aligned
