"""`gpfm-train export`: the EMA teacher as a napari_gpfm encoder (timm + JSON) or GPFM.pth."""

from __future__ import annotations

import os

import pytest
import torch
from _tiny_run import SAMPLE, tiny_overrides

from gpfm_train.cli import fit, load_run_config, main
from gpfm_train.export_weights import from_gpfm_release_layout
from gpfm_train.models import backbone_forward
from napari_gpfm.encoders import DefaultModelConfig, load_encoder


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    overrides = tiny_overrides(root, **{
        "model.schedule.warmup_epochs": 0,
        "data.sources": [{"slides": [str(SAMPLE)]}],
        "data.tiling": {"mpp": 1.0, "read_size": 112, "min_tissue": 0.5},
        "trainer.max_steps": 3,
    })
    done = fit(load_run_config("tiny_cpu.yaml", overrides))
    return root / "checkpoints" / "last.ckpt", done.module.distiller


def _images(size=56, n=3):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(3))


def test_timm_export_loads_as_the_default_encoder_with_the_teachers_features(
        trained, tmp_path, capsys):
    ckpt, distiller = trained
    out = tmp_path / "model.safetensors"
    assert main(["export", str(ckpt), "--out", str(out), "--card"]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "model.json" in printed and "model.md" in printed

    description = DefaultModelConfig.read(out.with_suffix(".json"))
    assert description.architecture == "vit_small_patch14_dinov2"
    assert description.model_kwargs == {"img_size": 56, "init_values": 0.1, "embed_dim": 48,
                                        "depth": 2, "num_heads": 2}
    assert (description.embed_dim, description.input_size, description.patch_size) == (48, 56, 14)
    assert (description.native_mpp, description.native_read_size) == (1.0, 112)
    assert "step 3" in description.notes

    encoder = load_encoder("default", weights=out)
    assert encoder.spec.embed_dim == 48 and encoder.checkpoint_layout == "timm"
    x = _images()
    with torch.no_grad():
        teacher = backbone_forward(distiller.teacher["backbone"], None, x)
        student = backbone_forward(distiller.student["backbone"], None, x)
        got = encoder(x, patch_tokens=True)
    torch.testing.assert_close(got["cls"], teacher["x_norm_clstoken"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["patch_tokens"].flatten(1, 2), teacher["x_norm_patchtokens"],
                               atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got["cls"], student["x_norm_clstoken"], atol=1e-4)
    card = out.with_suffix(".md").read_text()
    assert "vit_small_patch14_dinov2" in card and "48-d CLS" in card
    # Readable by the others who share a models folder, as any file the user writes (safetensors
    # itself writes 0600); no temporary file left beside it.
    umask = os.umask(0)
    os.umask(umask)
    for path in (out, out.with_suffix(".json"), out.with_suffix(".md")):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "model.md",
                                                          "model.safetensors"]


def test_default_out_makes_it_the_embedded_default_model(trained, tmp_path, monkeypatch,
                                                         capsys):
    import napari_gpfm.encoders.default_model as default_model
    from napari_gpfm.encoders import get_spec

    monkeypatch.setattr(default_model, "PACKAGE_WEIGHTS_DIR", tmp_path)
    ckpt, distiller = trained
    assert main(["export", str(ckpt)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["default.json", "default.safetensors"]
    # Once built, the default is only replaced on request.
    built = (tmp_path / "default.safetensors").stat().st_mtime_ns
    assert main(["export", str(ckpt)]) == 2
    assert "--replace-default" in capsys.readouterr().err
    assert (tmp_path / "default.safetensors").stat().st_mtime_ns == built
    assert main(["export", str(ckpt), "--replace-default"]) == 0
    assert get_spec("default").embed_dim == 48
    encoder = load_encoder("default")
    x = _images()
    with torch.no_grad():
        expected = backbone_forward(distiller.teacher["backbone"], None, x)["x_norm_clstoken"]
        torch.testing.assert_close(encoder(x)["cls"], expected, atol=1e-5, rtol=1e-5)


def test_release_layout_round_trips_with_chunked_blocks(trained, tmp_path):
    ckpt, distiller = trained
    timm_out = tmp_path / "t.safetensors"
    assert main(["export", str(ckpt), "--out", str(timm_out)]) == 0
    from safetensors.torch import load_file

    timm_sd = load_file(str(timm_out))
    for chunks, block_key in ((2, "backbone.blocks.1.1.attn.qkv.weight"),
                              (4, "backbone.blocks.1.attn.qkv.weight")):  # 4 does not divide 2
        out = tmp_path / f"GPFM-{chunks}.pth"
        assert main(["export", str(ckpt), "--layout", "gpfm-release", "--out", str(out),
                     "--block-chunks", str(chunks)]) == 0
        release = torch.load(out, map_location="cpu", weights_only=True)
        assert set(release) == {"teacher"}
        teacher = release["teacher"]
        assert block_key in teacher and "backbone.mask_token" in teacher
        assert "dino_head.last_layer.weight_g" in teacher
        back = from_gpfm_release_layout(release)
        assert back.backbone.keys() == timm_sd.keys()
        for key, value in timm_sd.items():
            assert torch.equal(back.backbone[key], value), key
        head = distiller.teacher["dino_head"].state_dict()
        for key, value in back.dino_head.items():
            torch.testing.assert_close(value, head[key])


def test_export_errors_are_one_line(trained, tmp_path, capsys):
    ckpt, _ = trained
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint at all")
    cases = [
        (["export", str(junk), "--out", str(tmp_path / "a.safetensors")], "junk.ckpt"),
        (["export", str(tmp_path / "missing.ckpt")], "checkpoint not found"),
        (["export", str(ckpt), "--out", str(tmp_path / "a.pth")], "written as .safetensors"),
        (["export", str(ckpt), "--layout", "gpfm-release"], "needs --out FILE.pth"),
    ]
    for args, expected in cases:
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"layer.weight": torch.zeros(2)}}, other)
    assert main(["export", str(other), "--out", str(tmp_path / "b.safetensors")]) == 2
    assert "holds no GPFM teacher" in capsys.readouterr().err


def test_the_export_signs_its_tensor_data(trained, tmp_path):
    from safetensors import safe_open

    from napari_gpfm.encoders.checkpoints import DATA_DIGEST_KEY
    from napari_gpfm.errors import WeightsError

    ckpt, _ = trained
    out = tmp_path / "model.safetensors"
    assert main(["export", str(ckpt), "--out", str(out)]) == 0
    with safe_open(str(out), framework="pt") as handle:
        assert handle.metadata()["layout"] == "timm" and DATA_DIGEST_KEY in handle.metadata()
    data = bytearray(out.read_bytes())
    data[-7] ^= 0x01  # a bit flipped in the last tensor, as a bad disk or copy would
    out.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="model.safetensors is damaged"):
        load_encoder("default", weights=out)


def test_a_diverged_teacher_is_not_exported(trained, tmp_path, capsys):
    ckpt, _ = trained
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    key = next(k for k in state["state_dict"] if k.endswith("teacher.backbone.blocks.1.mlp.fc1.weight"))
    state["state_dict"][key][0, 0] = float("nan")
    diverged = tmp_path / "diverged.ckpt"
    torch.save(state, diverged)
    for layout, out in (("timm", "m.safetensors"), ("gpfm-release", "m.pth")):
        assert main(["export", str(diverged), "--layout", layout,
                     "--out", str(tmp_path / out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "diverged.ckpt (step 3) holds NaN or infinite values in 1 " \
            "tensor(s) (blocks.1.mlp.fc1.weight)" in err[0], err
        assert not (tmp_path / out).exists()


def test_a_run_on_a_wider_field_exports_the_field_of_its_views(trained):
    # A run that reads 4x the area and draws its views at a quarter of the scale saw tissue
    # at the size of those views: embedding at the read size would show the encoder twice
    # the field it learnt on.
    import dataclasses

    from gpfm_train.export import encoder_description, read_training_checkpoint

    ckpt = read_training_checkpoint(trained[0])
    assert encoder_description(ckpt).native_read_size == 112  # views up to the whole tile
    wide = dict(ckpt.data_config, tiling={"mpp": 1.0, "read_size": 224},
                crops=dict(ckpt.data_config["crops"], global_crops_scale=[0.08, 0.25]))
    description = encoder_description(dataclasses.replace(ckpt, data_config=wide))
    assert (description.native_mpp, description.native_read_size) == (1.0, 112)
