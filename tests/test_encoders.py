"""The encoder registry, the Encoder module, and each built-in encoder's native checkpoint.

UNI, Phikon and CONCH are built at their real sizes from random weights written in the layout
their authors publish; outputs are compared with references computed without our loader.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _encoder_fixtures import (
    conch_pool_reference,
    hf_vit_reference,
    random_state_dict,
    to_conch_checkpoint,
    to_hf_vit,
)
from safetensors.torch import save_file

from napari_gpfm.encoders import (
    DefaultModelConfig,
    EncoderSpec,
    default_model,
    default_spec,
    find_weights,
    get_spec,
    list_specs,
    load_encoder,
    model_table,
    models_dir,
)
from napari_gpfm.errors import EncoderNotFoundError, ParameterError, WeightsError

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY = "timm:vit_tiny_patch16_224"


def _images(shape, seed=0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- registry
def test_import_does_not_pull_in_torch():
    code = (
        "import sys, napari_gpfm.encoders as e\n"
        "spec = e.get_spec('gpfm'); names = e.known_names()\n"
        "assert spec.embed_dim == 1024 and 'uni' in names\n"
        "print(sorted(m for m in ('torch', 'timm', 'safetensors') if m in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert result.stdout.strip() == "[]"


def test_builtin_specs_hold_the_documented_facts():
    gpfm = get_spec("GPFM")  # names are case-insensitive
    assert (gpfm.input_size, gpfm.patch_size, gpfm.patch_grid, gpfm.embed_dim) == (
        224,
        14,
        16,
        1024,
    )
    assert gpfm.interpolation == "bicubic" and gpfm.mean == (0.485, 0.456, 0.406)
    assert (gpfm.native_mpp, gpfm.native_read_size) == (0.5, 256)
    assert gpfm.layouts == ("dinov2", "timm") and "GPFM.pth" in gpfm.weights_filenames
    assert gpfm.field_of_view_um == 128.0
    conch = get_spec("conch")
    assert (conch.input_size, conch.embed_dim, conch.token_dim, conch.patch_grid) == (
        448,
        512,
        768,
        28,
    )
    assert conch.mean == (0.48145466, 0.4578275, 0.40821073)
    assert get_spec("phikon").embed_dim == 768 and get_spec("uni").patch_grid == 14
    assert {s.name for s in list_specs()} >= {"gpfm", "uni", "phikon", "conch"}


def test_gpfm_architecture_matches_the_dinov2_vit_large():
    from napari_gpfm.encoders.builders import instantiate_on_meta

    spec = get_spec("gpfm")
    model = instantiate_on_meta(spec.builder)  # shapes and modules without allocating
    assert len(model.blocks) == 24 and model.embed_dim == 1024
    assert model.blocks[0].attn.num_heads == 16
    assert model.pos_embed.shape == (1, 257, 1024) and model.reg_token is None
    assert model.norm.eps == 1e-6 and model.blocks[0].norm1.eps == 1e-6
    assert model.blocks[0].ls1.gamma.shape == (1024,)
    assert dict(spec.builder.kwargs)["init_values"] == 1e-5
    assert model.blocks[0].mlp.fc1.out_features == 4096
    assert isinstance(model.blocks[0].mlp.act, torch.nn.GELU)
    assert model.blocks[0].attn.qkv.bias is not None
    assert "mask_token" not in model.state_dict()


def test_unknown_names_list_the_known_ones():
    with pytest.raises(EncoderNotFoundError) as info:
        get_spec("gpmf")
    message = str(info.value)
    assert "did you mean 'gpfm'" in message
    for name in ("conch", "default", "gpfm", "phikon", "uni", "timm:<architecture>"):
        assert name in message
    with pytest.raises(
        EncoderNotFoundError,
        match="timm has no architecture 'vit_smal_patch16_224'.*vit_small_patch16_224",
    ):
        get_spec("timm:vit_smal_patch16_224")


def test_timm_specs_read_timm_defaults():
    spec = get_spec("timm:vit_small_patch14_dinov2")
    assert (spec.input_size, spec.patch_size, spec.patch_grid, spec.embed_dim) == (224, 14, 16, 384)
    assert spec.layouts == ("timm", "dinov2")
    cnn = get_spec("timm:resnet18")
    assert (cnn.embed_dim, cnn.patch_size, cnn.patch_grid) == (512, 32, 7)
    assert cnn.weights_filenames[0] == "resnet18.safetensors"


def test_models_dir_and_find_weights(tmp_path, monkeypatch):
    monkeypatch.delenv("GPFM_MODELS_DIR", raising=False)
    assert models_dir() == Path.home() / ".cache" / "napari-gpfm" / "models"
    monkeypatch.setenv("GPFM_MODELS_DIR", str(tmp_path))
    assert models_dir() == tmp_path
    assert models_dir(tmp_path / "other") == tmp_path / "other"
    spec = get_spec("uni")
    assert find_weights(spec) is None
    (tmp_path / "uni").mkdir()
    (tmp_path / "uni" / "pytorch_model.bin").write_bytes(b"x")
    assert find_weights(spec) == tmp_path / "uni" / "pytorch_model.bin"
    (tmp_path / "uni.bin").write_bytes(b"x")  # earlier in weights_filenames wins
    assert find_weights(spec) == tmp_path / "uni.bin"
    rows = {row.name: row for row in model_table()}
    assert rows["uni"].weights == tmp_path / "uni.bin" and "CC-BY-NC-ND" in rows["uni"].licence
    assert rows["gpfm"].weights is None and "GPFM.pth" in rows["gpfm"].note


def test_missing_weights_say_where_we_looked(tmp_path):
    with pytest.raises(WeightsError) as info:
        load_encoder("gpfm", models_dir=tmp_path)
    message = str(info.value)
    assert "GPFM.pth" in message and str(tmp_path) in message
    assert "--weights PATH" in message and "$GPFM_MODELS_DIR" in message
    assert "github.com/birkhoffkiki/GPFM" in message


def test_bad_device_is_a_parameter_error(tmp_path):
    with pytest.raises(ParameterError, match="device='warp'"):
        load_encoder(TINY, weights=tmp_path / "x.safetensors", device="warp")
    if not torch.cuda.is_available():
        with pytest.raises(ParameterError, match="no CUDA GPU"):
            load_encoder(TINY, weights=tmp_path / "x.safetensors", device="cuda")


# --------------------------------------------------------------------------- Encoder module
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    state = random_state_dict(get_spec(TINY), seed=9)
    save_file(state, str(folder / "vit_tiny_patch16_224.safetensors"))
    return load_encoder(TINY, models_dir=folder), state


def test_timm_encoder_matches_timm_itself(tiny):
    import timm

    encoder, state = tiny
    with torch.device("meta"):
        reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    reference.load_state_dict(state, assign=True)
    reference.eval()
    x = _images((2, 3, 224, 224))
    with torch.inference_mode():
        out = encoder(x, patch_tokens=True)
        tokens = reference.forward_features(x)
    assert out["cls"].shape == (2, 192) and out["patch_tokens"].shape == (2, 14, 14, 192)
    assert torch.allclose(out["cls"], tokens[:, 0], atol=1e-5)
    assert torch.allclose(out["patch_tokens"].reshape(2, 196, 192), tokens[:, 1:], atol=1e-5)
    assert "patch_tokens" not in encoder(x[:1])


def test_encoder_is_frozen_and_identified(tiny):
    encoder, _ = tiny
    encoder.train()
    assert not encoder.training and not encoder.backbone.training
    assert not any(p.requires_grad for p in encoder.parameters())
    assert encoder.embed_dim == 192 and encoder.token_dim == 192
    assert encoder.encoder_id.startswith("timm:vit_tiny_patch16_224@")
    assert len(encoder.weights_sha256) == 64
    meta = encoder.metadata()
    assert meta["encoder_id"] == encoder.encoder_id and meta["input_size"] == 224
    json.dumps(meta)  # plain data


def test_preprocess_on_device_resizes_like_pil(tiny):
    from PIL import Image

    encoder, _ = tiny
    rng = np.random.default_rng(0)
    # smooth content, like tissue: noise would make any two resamplers disagree
    base = rng.integers(0, 256, size=(2, 16, 16, 3), dtype=np.uint8)
    tiles = np.stack(
        [np.asarray(Image.fromarray(t).resize((256, 256), Image.BICUBIC)) for t in base]
    )
    x = encoder.preprocess_on_device(torch.from_numpy(tiles))
    assert x.shape == (2, 3, 224, 224) and x.dtype == torch.float32
    mean = torch.tensor(encoder.spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(encoder.spec.std).view(1, 3, 1, 1)
    expected = np.stack(
        [np.asarray(Image.fromarray(t).resize((224, 224), Image.BICUBIC)) for t in tiles]
    )
    expected = (torch.from_numpy(expected).permute(0, 3, 1, 2).float() / 255 - mean) / std
    difference = (x - expected).abs()
    assert difference.mean() < 0.01 and difference.max() < 0.05  # PIL rounds to 8 bits

    same_size = rng.integers(0, 256, size=(224, 224, 3), dtype=np.uint8)
    y = encoder.preprocess_on_device(same_size)  # numpy, single tile
    exact = (torch.from_numpy(same_size).permute(2, 0, 1)[None].float() / 255 - mean) / std
    assert torch.allclose(y, exact, atol=1e-6)
    with pytest.raises(ValueError, match="uint8"):
        encoder.preprocess_on_device(torch.zeros(1, 224, 224, 3))


def test_cnn_patch_tokens_are_the_last_feature_map(tmp_path):
    spec = get_spec("timm:resnet18")
    save_file(random_state_dict(spec, seed=3), str(tmp_path / "resnet18.safetensors"))
    encoder = load_encoder("timm:resnet18", models_dir=tmp_path)
    with torch.inference_mode():
        out = encoder(_images((1, 3, 224, 224)), patch_tokens=True)
    assert out["cls"].shape == (1, 512) and out["patch_tokens"].shape == (1, 7, 7, 512)
    assert torch.allclose(out["cls"], out["patch_tokens"].mean(dim=(1, 2)), atol=1e-5)


# --------------------------------------------------------------------------- UNI / Phikon / CONCH
def test_uni_timm_checkpoint(tmp_path):
    import timm

    spec = get_spec("uni")
    state = random_state_dict(spec, seed=21)
    torch.save(state, tmp_path / "uni.bin")
    encoder = load_encoder("uni", models_dir=tmp_path)
    x = _images((1, 3, 224, 224), seed=1)
    with torch.inference_mode():
        first = encoder(x, patch_tokens=True)
        with torch.device("meta"):
            reference = timm.create_model(
                "vit_large_patch16_224", pretrained=False, init_values=1e-5, num_classes=0
            )
        reference.load_state_dict(state, assign=True)
        expected = reference.eval().forward_features(x)[:, 0]
    assert first["cls"].shape == (1, 1024) and first["patch_tokens"].shape == (1, 14, 14, 1024)
    assert torch.allclose(first["cls"], expected, atol=1e-4)


@pytest.mark.parametrize("prefix", ["vit.", ""])
def test_phikon_hugging_face_checkpoint_matches_a_hf_forward(tmp_path, prefix):
    spec = get_spec("phikon")
    hf = to_hf_vit(random_state_dict(spec, seed=31), prefix=prefix)
    save_file(hf, str(tmp_path / "phikon.safetensors"))
    encoder = load_encoder("phikon", models_dir=tmp_path)
    assert encoder.checkpoint_layout == "hf-vit"
    x = _images((1, 3, 224, 224), seed=2)
    plain = {k[len(prefix) :]: v for k, v in hf.items()}
    with torch.inference_mode():
        out = encoder(x, patch_tokens=True)
        expected = hf_vit_reference(plain, x, heads=12, eps=1e-12)
    assert out["cls"].shape == (1, 768) and out["patch_tokens"].shape == (1, 14, 14, 768)
    assert (out["cls"] - expected[:, 0]).abs().max() < 1e-4
    assert (out["patch_tokens"].reshape(1, 196, 768) - expected[:, 1:]).abs().max() < 1e-4


def test_conch_coca_checkpoint_matches_a_reference_pooling(tmp_path):
    from timm.models.vision_transformer import VisionTransformer

    spec = get_spec("conch")
    ckpt = to_conch_checkpoint(random_state_dict(spec, seed=41))
    torch.save({"state_dict": {f"module.{k}": v for k, v in ckpt.items()}}, tmp_path / "conch.pth")
    encoder = load_encoder("conch", models_dir=tmp_path)
    assert encoder.checkpoint_layout == "conch"
    x = _images((1, 3, 448, 448), seed=3)
    with torch.inference_mode():
        out = encoder(x, patch_tokens=True)
        with torch.device("meta"):
            trunk = VisionTransformer(
                img_size=448,
                patch_size=16,
                embed_dim=768,
                depth=12,
                num_heads=12,
                num_classes=0,
                dynamic_img_size=True,
            )
        trunk_keys = {
            k[len("visual.trunk.") :]: v for k, v in ckpt.items() if k.startswith("visual.trunk.")
        }
        trunk.load_state_dict(trunk_keys, assign=True)
        tokens = trunk.eval().forward_features(x)
        expected = conch_pool_reference(ckpt, tokens)
        at_224 = encoder(_images((1, 3, 224, 224), seed=3), patch_tokens=True)
    assert out["cls"].shape == (1, 512) and out["patch_tokens"].shape == (1, 28, 28, 768)
    assert (out["cls"] - expected).abs().max() < 1e-4
    assert (out["patch_tokens"].reshape(1, 784, 768) - tokens[:, 1:]).abs().max() < 1e-4
    # GPFM feeds CONCH 224 px crops during distillation: positions resample
    assert at_224["cls"].shape == (1, 512) and at_224["patch_tokens"].shape == (1, 14, 14, 768)


# --------------------------------------------------------------------------- default model
def _write_default(folder: Path, *, embed_dim: int = 384, seed: int = 51) -> DefaultModelConfig:
    config = DefaultModelConfig(
        architecture="vit_small_patch14_dinov2",
        embed_dim=embed_dim,
        model_kwargs={"img_size": 112, "init_values": 1e-5},
        input_size=112,
        native_read_size=256,
    )
    config.write(folder / "default.json")
    spec = default_spec(folder) if embed_dim == 384 else None
    if spec is not None:
        save_file(random_state_dict(spec, seed=seed), str(folder / "default.safetensors"))
    return config


def test_default_not_built_says_how_to_build_it(tmp_path, monkeypatch):
    monkeypatch.setattr(default_model, "PACKAGE_WEIGHTS_DIR", tmp_path)
    for attempt in (lambda: get_spec("default"), lambda: load_encoder("default")):
        with pytest.raises(WeightsError) as info:
            attempt()
        message = str(info.value)
        assert "not built yet" in message and "gpfm-train fit --config tiny_cpu.yaml" in message
        assert "gpfm-train export" in message
    assert "default" not in {s.name for s in list_specs()}
    row = {r.name: r for r in model_table()}["default"]
    assert row.weights is None and "not built yet" in row.note


def test_default_model_loads_once_its_files_exist(tmp_path, monkeypatch):
    _write_default(tmp_path)
    x = _images((2, 3, 112, 112), seed=4)
    by_spec = load_encoder(default_spec(tmp_path))
    by_path = load_encoder("default", weights=tmp_path / "default.safetensors")
    monkeypatch.setattr(default_model, "PACKAGE_WEIGHTS_DIR", tmp_path)
    packaged = load_encoder("default")
    assert packaged.weights_path == tmp_path / "default.safetensors"
    assert "default" in {s.name for s in list_specs()}
    with torch.inference_mode():
        outs = [e(x, patch_tokens=True) for e in (by_spec, by_path, packaged)]
    assert outs[0]["cls"].shape == (2, 384) and outs[0]["patch_tokens"].shape == (2, 8, 8, 384)
    assert all(torch.equal(outs[0]["cls"], o["cls"]) for o in outs[1:])
    assert packaged.encoder_id.startswith("default@")
    assert isinstance(packaged.spec, EncoderSpec) and packaged.spec.input_size == 112


def test_default_weights_without_their_description(tmp_path, monkeypatch):
    monkeypatch.setattr(default_model, "PACKAGE_WEIGHTS_DIR", tmp_path / "package")
    save_file({"a": torch.zeros(1)}, str(tmp_path / "mine.safetensors"))
    with pytest.raises(WeightsError, match=r"need their description .*mine\.json beside them"):
        load_encoder("default", weights=tmp_path / "mine.safetensors")


def test_register_rejects_duplicates_and_reserved_names():
    from dataclasses import replace

    from napari_gpfm.encoders import register

    gpfm = get_spec("gpfm")
    with pytest.raises(ValueError, match="already registered"):
        register(gpfm)
    for reserved in ("default", "timm:vit_tiny_patch16_224"):
        with pytest.raises(ValueError, match="reserved"):
            register(replace(gpfm, name=reserved))
    with pytest.raises(ValueError, match="interpolation"):
        replace(gpfm, name="x", interpolation="nearest")


def test_default_description_errors(tmp_path):
    (tmp_path / "default.json").write_text(json.dumps({"embed_dim": 384, "colour": "red"}))
    with pytest.raises(WeightsError, match="missing architecture; unknown keys colour"):
        default_spec(tmp_path)
    (tmp_path / "default.json").write_text("{not json")
    with pytest.raises(WeightsError, match="unreadable"):
        default_spec(tmp_path)
    _write_default(tmp_path, embed_dim=999)
    with pytest.raises(WeightsError, match="embed_dim 999 but vit_small_patch14_dinov2 gives 384"):
        default_spec(tmp_path)
    (tmp_path / "default.json").write_text(
        json.dumps(
            {
                "architecture": "vit_small_patch14_dinov2",
                "embed_dim": 384,
                "interpolation": "nearest",
            }
        )
    )
    with pytest.raises(WeightsError, match="invalid interpolation"):
        default_spec(tmp_path)
