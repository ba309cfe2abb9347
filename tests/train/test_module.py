"""GPFMPretrainModule: configuration checks, one real training step, clipping, experts."""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import pytest
import torch
from _tiny_run import SAMPLE, tiny_overrides
from lightning.pytorch.callbacks import Callback

from gpfm_train.cli import fit, load_run_config, prepare_fit
from gpfm_train.datamodule import DataOptions
from gpfm_train.models import RECIPE_EXPERTS
from gpfm_train.module import (
    BackboneConfig,
    GPFMPretrainModule,
    PretrainConfig,
    config_dataclass,
)
from gpfm_train.schedules import build_schedules
from napari_gpfm.errors import ConfigError, WeightsError


@pytest.fixture(scope="module")
def expert_weights(tmp_path_factory) -> Path:
    """Random weights of timm's tiny ``test_vit`` (a stand-in expert loaded from a file)."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(5)
    model = timm.create_model("test_vit", num_classes=0)
    path = tmp_path_factory.mktemp("expert") / "test_vit.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _expert(weights, **changes) -> dict:
    return {"name": "small", "encoder": "timm:test_vit", "weights": str(weights),
            "cls_weight": 1.0, "patch_weight": 0.25, "input_size": 160, **changes}


# --------------------------------------------------------------------------- configuration
def test_recipe_config_holds_every_constant_of_the_note():
    run = load_run_config("gpfm_vitl14.yaml")
    model, data, trainer = run.model, run.data, run.trainer
    assert model.backbone.arch == "vit_large_patch14_dinov2" and model.backbone.img_size == 224
    assert model.backbone.drop_path_rate == 0.4 and model.backbone.init_values == 1e-5
    d = model.distill
    assert (d.out_dim, d.head_hidden_dim, d.head_bottleneck_dim, d.head_nlayers) == (
        65536, 2048, 256, 3)
    assert (d.n_global, d.n_local, d.ibot_separate_head, d.centering) == (
        2, 8, False, "centering")
    assert (d.koleo_loss_weight, d.student_temp, d.center_momentum) == (0.1, 0.1, 0.9)
    assert [e.expert_config() for e in model.experts] == list(RECIPE_EXPERTS)
    assert [e.encoder_name for e in model.experts] == ["uni", "phikon", "conch"]
    s = model.schedule
    assert (s.epoch_length, s.epochs, s.base_lr, s.warmup_epochs, s.min_lr) == (
        1250, 400, 4e-4, 40, 1e-6)
    assert (s.weight_decay, s.weight_decay_end) == (0.04, 0.4)
    assert (s.momentum_teacher, s.final_momentum_teacher) == (0.992, 1.0)
    assert (s.warmup_teacher_temp, s.teacher_temp, s.warmup_teacher_temp_epochs) == (
        0.04, 0.07, 30)
    assert s.freeze_last_layer_epochs == 1
    assert (model.optim.layer_decay, model.optim.patch_embed_lr_mult, model.optim.clip_grad) == (
        0.9, 0.2, 3.0)
    c = data.crops
    assert (c.global_crops_size, c.global_crops_scale, c.local_crops_size) == (
        224, (0.32, 1.0), 98)
    assert (c.local_crops_number, c.local_crops_scale) == (8, (0.05, 0.32))
    assert (c.color_jitter, c.color_jitter_p, c.grayscale_p) == ((0.4, 0.4, 0.2, 0.1), 0.8, 0.2)
    # The options beyond the recipe are written out in the YAML, and off.
    assert (c.vflip_p, c.rot90_p, c.stain_jitter_p, c.stain_jitter) == (0.0, 0.0, 0.0, (0.0, 0.0))
    assert data.masks.mask_ratio_min_max == (0.1, 0.5) and data.masks.mask_sample_probability == 0.5
    assert data.batch_size == 96
    assert (trainer.num_nodes, trainer.devices, trainer.strategy) == (2, 8, "fsdp")
    assert trainer.fsdp_sharding_strategy == "SHARD_GRAD_OP" and trainer.precision == "16-mixed"
    assert run.max_steps == 500_000
    resolved = s.resolve(data.batch_size * trainer.devices * trainer.num_nodes)
    assert resolved.global_batch_size == 1536
    assert build_schedules(resolved).lr.base == pytest.approx(4e-4 * math.sqrt(1.5))


def test_expert_weights_paths_expand_the_models_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("GPFM_MODELS_DIR", str(tmp_path))
    run = load_run_config("gpfm_vitl14")
    paths = [Path(e.weights) for e in run.model.experts]
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == [
        "uni.bin", "phikon/pytorch_model.bin", "conch.pth"]


def test_strict_types_and_keys():
    with pytest.raises(ConfigError, match=r"model.backbone: unknown option\(s\) depth"):
        PretrainConfig.from_mapping({"backbone": {"depth": 2}})
    with pytest.raises(ConfigError, match="model.schedule.epochs: expected an integer"):
        PretrainConfig.from_mapping({"schedule": {"epochs": "ten"}})
    with pytest.raises(ConfigError, match="list experts under model.experts"):
        PretrainConfig.from_mapping({"distill": {"experts": []}})
    with pytest.raises(ConfigError, match="data.batch_size: expected an integer"):
        DataOptions.from_mapping({"sources": [{"tile_folder": "x"}], "batch_size": 2.5})
    with pytest.raises(ConfigError, match="exactly one of manifest, slides, tile_folder"):
        DataOptions.from_mapping({"sources": [{"tile_folder": "x", "manifest": "y"}]})
    # YAML reads 1e-5 (no dot) as a string: numbers written that way are accepted.
    cfg = config_dataclass(BackboneConfig, {"init_values": "1e-5", "img_size": 98.0}, "b")
    assert cfg.init_values == 1e-5 and cfg.img_size == 98


# --------------------------------------------------------------------------- one step
class Probe(Callback):
    """Records parameters around the first optimizer step of the run."""

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        d = module.distiller
        self.teacher_before = {k: v.detach().clone() for k, v in d.teacher.named_parameters()}
        self.masked = int(batch["n_masked_patches"])

    def on_before_optimizer_step(self, trainer, module, optimizer):
        self.groups = [(g["lr"], g["weight_decay"], g["lr_multiplier"], g["wd_multiplier"],
                        g["is_last_layer"]) for g in optimizer.param_groups]
        self.raw_norms = {
            name: torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
            for name, params in module.distiller.gradient_clip_groups().items()
        }

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        d = module.distiller
        self.student_after = {k: v.detach().clone() for k, v in d.student.named_parameters()}
        self.teacher_after = {k: v.detach().clone() for k, v in d.teacher.named_parameters()}


def test_one_step_applies_schedules_clips_and_updates_the_teacher(tmp_path, expert_weights):
    run = load_run_config("tiny_cpu.yaml", tiny_overrides(
        tmp_path, **{"trainer.max_steps": 1, "model.schedule.warmup_epochs": 0,
                     "model.experts": [_expert(expert_weights)]}))
    probe = Probe()
    done = fit(run, callbacks=[probe])
    module, trainer = done.module, done.trainer
    assert trainer.global_step == 1 and probe.masked > 0

    values = module.schedules_for(run.data.batch_size).at(0)
    assert values["lr"] > 0 and values["last_layer_lr"] == 0.0  # first epoch: frozen last layer
    for lr, wd, lr_mult, wd_mult, last in probe.groups:
        base = values["last_layer_lr"] if last else values["lr"]
        assert lr == pytest.approx(base * lr_mult) and wd == pytest.approx(values["wd"] * wd_mult)
    assert any(last for *_, last in probe.groups)

    m = values["momentum"]
    for name, after in probe.teacher_after.items():
        expected = m * probe.teacher_before[name] + (1 - m) * probe.student_after[name]
        torch.testing.assert_close(after, expected, atol=1e-7, rtol=1e-6, msg=name)
    moved = [n for n in probe.teacher_after
             if not torch.equal(probe.teacher_after[n], probe.teacher_before[n])]
    assert moved, "the EMA must move the teacher towards the updated student"

    logged = trainer.logged_metrics
    for key in ("loss/total", "loss/dino_local", "loss/dino_global", "loss/koleo", "loss/ibot",
                "loss/expert/small/cls", "loss/expert/small/patch", "lr", "wd",
                "last_layer_lr", "momentum", "teacher_temp", "grad_norm/backbone",
                "grad_norm/dino_head"):
        assert key in logged and torch.isfinite(logged[key]), key
    terms = [v for k, v in logged.items() if k.startswith("loss/") and k != "loss/total"]
    assert float(logged["loss/total"]) == pytest.approx(float(sum(terms)), rel=1e-5)
    assert float(logged["grad_norm/backbone"]) == pytest.approx(
        float(probe.raw_norms["backbone"]), rel=1e-4)
    assert float(logged["teacher_temp"]) == pytest.approx(values["teacher_temp"])


def test_each_student_group_is_clipped_separately_and_expert_heads_are_not(
        tmp_path, expert_weights):
    run = load_run_config("tiny_cpu.yaml", tiny_overrides(
        tmp_path, **{"model.experts": [_expert(expert_weights)]}))
    prepared = prepare_fit(run)
    module, dm = prepared.module, prepared.datamodule
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    losses = module(batch, teacher_temp=0.04)
    (losses["total"] * 1e4).backward()  # gradients far above the 3.0 threshold
    heads = module.distiller.student["expert_heads"]
    head_grads = [p.grad.clone() for p in heads.parameters()]

    norms = module.clip_student_gradients(3.0)
    assert set(norms) == {"backbone", "dino_head"}
    for name, params in module.distiller.gradient_clip_groups().items():
        assert norms[name] > 3.0
        clipped = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
        assert clipped == pytest.approx(3.0, rel=1e-4), name
    for before, p in zip(head_grads, heads.parameters(), strict=True):
        assert torch.equal(before, p.grad)
    assert torch.linalg.vector_norm(torch.stack([g.norm() for g in head_grads])) > 3.0


def test_bf16_autocast_step_on_cpu(tmp_path, recwarn):
    run = load_run_config("tiny_cpu.yaml", tiny_overrides(
        tmp_path, **{"trainer.max_steps": 1, "trainer.precision": "bf16-mixed",
                     "trainer.checkpoint_every_n_steps": 1}))
    done = fit(run)
    # Lightning's warnings about the eval-mode teacher and manual-optimisation checkpoints
    # describe the design; fit() keeps them from the user's terminal.
    shown = [str(w.message) for w in recwarn]
    assert not [m for m in shown if "in eval mode" in m or "manual optimization" in m], shown
    assert done.trainer.global_step == 1
    assert torch.isfinite(done.trainer.logged_metrics["loss/total"])
    assert all(p.dtype == torch.float32 for p in done.module.distiller.parameters())


def test_fit_closes_the_slides_it_read_in_process(tmp_path):
    run = load_run_config("tiny_cpu.yaml", tiny_overrides(
        tmp_path, **{"trainer.max_steps": 1, "data.sources": [{"slides": [str(SAMPLE)]}]}))
    done = fit(run)
    slides = done.datamodule.tiles
    assert done.trainer.global_step == 1 and slides.open_slides == 0
    slides[0]  # a read after teardown opens the slide again
    assert slides.open_slides == 1
    slides.close()


# --------------------------------------------------------------------------- experts
def test_missing_expert_weights_stop_before_training_or_are_skipped(tmp_path, caplog):
    missing = tmp_path / "nowhere" / "uni.bin"
    expert = {"name": "uni", "weights": str(missing), "cls_weight": 1.0, "patch_weight": 0.25}
    run = load_run_config("tiny_cpu.yaml", tiny_overrides(tmp_path, **{"model.experts": [expert]}))
    with pytest.raises(WeightsError) as info:
        GPFMPretrainModule(run.model)
    message = str(info.value)
    assert "\n" not in message and str(missing) in message and "on_missing_expert" in message

    skipping = dataclasses.replace(run.model, on_missing_expert="skip")
    with caplog.at_level(logging.WARNING, logger="gpfm_train.module"):
        module = GPFMPretrainModule(skipping)
    assert module.distiller.cfg.experts == () and not module.distiller.experts
    assert module.config.experts == ()
    assert any("training without this expert" in r.getMessage() for r in caplog.records)


def test_experts_load_from_the_registry_frozen_and_outside_the_state_dict(expert_weights):
    cfg = PretrainConfig.from_mapping({
        "backbone": {"arch": "vit_small_patch14_dinov2", "img_size": 56,
                     "kwargs": {"embed_dim": 48, "depth": 2, "num_heads": 2}},
        "distill": {"n_local": 2, "out_dim": 64, "head_hidden_dim": 32,
                    "head_bottleneck_dim": 16},
        "experts": [_expert(expert_weights)],
    })
    module = GPFMPretrainModule(cfg)
    expert = module.distiller.experts["small"]
    assert expert.spec.name == "timm:test_vit" and expert.weights_path == expert_weights
    assert not any(p.requires_grad for p in expert.parameters())
    assert not any(k.startswith("distiller._experts") or "small.backbone" in k
                   for k in module.state_dict())
    assert module.distiller.student["expert_heads"]["small"].last_layer.weight.shape[0] == 64
    assert module.hparams["experts"][0]["encoder"] == "timm:test_vit"


def test_freeze_backbone_epochs_trains_the_heads_alone_first(tmp_path):
    """From exported weights (a backbone, no heads), the heads can learn first: while frozen the
    student backbone (and so its EMA teacher) keeps its weights exactly, and moves after."""
    from lightning.pytorch.callbacks import Callback

    class Snapshots(Callback):
        def __init__(self):
            self.backbone, self.head = {}, {}

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            student = module.distiller.student
            self.backbone[trainer.global_step] = [p.detach().clone()
                                                  for p in student["backbone"].parameters()]
            self.head[trainer.global_step] = [p.detach().clone()
                                              for p in student["dino_head"].parameters()]

    snaps = Snapshots()
    run = load_run_config("tiny_cpu.yaml", tiny_overrides(
        tmp_path, **{"trainer.max_steps": 4, "model.schedule.epoch_length": 2,
                     "model.schedule.warmup_epochs": 0, "model.schedule.freeze_last_layer_epochs": 0,
                     "model.schedule.freeze_backbone_epochs": 1}))
    assert fit(run, callbacks=[snaps]).trainer.global_step == 4
    same = [torch.equal(a, b) for a, b in zip(snaps.backbone[1], snaps.backbone[2], strict=True)]
    assert all(same), "the backbone must not move during the frozen epoch (steps 1-2)"
    assert not all(torch.equal(a, b) for a, b in zip(snaps.head[1], snaps.head[2], strict=True))
    assert not all(torch.equal(a, b)
                   for a, b in zip(snaps.backbone[2], snaps.backbone[4], strict=True))
