"""Per-iteration schedules of the recipe, and the optimizer's parameter-group multipliers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gpfm_train.models import DistillConfig, GPFMDistiller, build_student_backbone
from gpfm_train.optim import apply_schedules, build_optimizer, build_param_groups, param_tags
from gpfm_train.schedules import CosineSchedule, ScheduleConfig, build_schedules, scaled_lr
from napari_gpfm.errors import ConfigError

EPOCH = 1250
TOTAL = 400 * EPOCH
WARMUP = 40 * EPOCH
PEAK = 4e-4 * math.sqrt(1536 / 1024)


@pytest.fixture(scope="module")
def recipe():
    return build_schedules()


def test_scaled_lr_sqrt_rule():
    assert scaled_lr(4e-4, 1024) == pytest.approx(4e-4)
    assert scaled_lr(4e-4, 4096) == pytest.approx(8e-4)
    assert scaled_lr(4e-4, 1536) == pytest.approx(4.898979e-4, rel=1e-6)
    assert scaled_lr() == pytest.approx(4e-4)
    with pytest.raises(ConfigError):
        scaled_lr(4e-4, 0)


def test_cosine_schedule_shape():
    s = CosineSchedule(1.0, 0.1, total_iters=20, warmup_iters=5, start_warmup=0.2, freeze_iters=3)
    assert len(s.values) == len(s) == 20
    assert s[0] == s[2] == 0.0  # frozen
    assert s[3] == pytest.approx(0.2) and s[7] == pytest.approx(1.0)  # warm-up ends at base
    assert s[8] == pytest.approx(1.0)  # cosine starts at base
    cosine = s.values[8:]
    assert np.all(np.diff(cosine) < 0)
    assert s[8 + 6] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 6 / 12)))
    assert s[19] > 0.1 and s[20] == s[10_000] == 0.1
    assert [s[i] for i in range(20)] == pytest.approx(list(s.values))
    with pytest.raises(ConfigError):
        CosineSchedule(1.0, 0.0, total_iters=10, warmup_iters=8, freeze_iters=3)
    with pytest.raises(IndexError):
        s[-1]


def test_lr_schedule(recipe):
    lr = recipe.lr
    assert len(lr) == TOTAL
    assert lr[0] == 0.0
    assert lr[WARMUP // 2] == pytest.approx(PEAK * (WARMUP // 2) / (WARMUP - 1))
    assert lr[WARMUP - 1] == pytest.approx(PEAK)
    assert lr[WARMUP] == pytest.approx(PEAK)
    half = WARMUP + (TOTAL - WARMUP) // 2
    assert lr[half] == pytest.approx((PEAK + 1e-6) / 2, rel=1e-6)
    assert lr[TOTAL - 1] == pytest.approx(1e-6, rel=1e-3)
    assert lr[TOTAL] == lr[10 * TOTAL] == 1e-6


def test_wd_and_momentum_schedules(recipe):
    assert recipe.wd[0] == pytest.approx(0.04)
    assert recipe.wd[TOTAL // 2] == pytest.approx(0.22)
    assert recipe.wd[TOTAL] == 0.4
    assert recipe.momentum[0] == pytest.approx(0.992)
    assert recipe.momentum[TOTAL // 2] == pytest.approx(0.996)
    assert recipe.momentum[TOTAL - 1] == pytest.approx(1.0, abs=1e-9)
    assert recipe.momentum[TOTAL] == 1.0
    assert np.all(np.diff(recipe.momentum.values) >= 0)


def test_teacher_temperature_schedule(recipe):
    temp = recipe.teacher_temp
    warm = 30 * EPOCH
    assert temp[0] == pytest.approx(0.04)
    assert temp[warm // 2] == pytest.approx(0.04 + 0.03 * (warm // 2) / (warm - 1))
    assert temp[warm - 1] == pytest.approx(0.07)
    assert temp[warm] == temp[TOTAL - 1] == temp[TOTAL] == 0.07


def test_last_layer_lr_is_zero_in_the_first_epoch(recipe):
    assert np.all(recipe.last_layer_lr.values[:EPOCH] == 0.0)
    assert recipe.last_layer_lr[EPOCH] == recipe.lr[EPOCH] > 0
    assert recipe.last_layer_lr[WARMUP] == pytest.approx(PEAK)
    values = recipe.at(EPOCH - 1)
    assert values["last_layer_lr"] == 0.0 and values["lr"] > 0
    assert set(values) == {"lr", "wd", "momentum", "teacher_temp", "last_layer_lr"}


def test_schedule_config_from_mapping():
    short = build_schedules(
        {
            "epochs": 2,
            "epoch_length": 10,
            "warmup_epochs": 1,
            "warmup_teacher_temp_epochs": 1,
            "global_batch_size": 1024,
        }
    )
    assert len(short.lr) == 20 and short.lr[9] == pytest.approx(4e-4)
    assert np.all(short.last_layer_lr.values[:10] == 0)
    with pytest.raises(ConfigError, match="unknown schedule option"):
        build_schedules({"epochz": 3})
    assert ScheduleConfig().peak_lr == pytest.approx(PEAK)


# --------------------------------------------------------------------------- optimizer
DEPTH = 3


@pytest.fixture(scope="module")
def distiller():
    torch.manual_seed(0)
    vit = build_student_backbone(
        "vit_small_patch14_dinov2",
        img_size=56,
        drop_path_rate=0.0,
        embed_dim=32,
        depth=DEPTH,
        num_heads=2,
    )
    cfg = DistillConfig(
        n_local=2,
        out_dim=64,
        head_hidden_dim=32,
        head_bottleneck_dim=16,
        expert_head_bottleneck_dim=8,
        experts=(),
    )
    return GPFMDistiller(vit, {}, cfg)


def test_param_tags_follow_dinov2_rules():
    decay = 0.9
    top = DEPTH + 1

    def tags(name):
        return param_tags(name, DEPTH, layer_decay=decay, patch_embed_lr_mult=0.2)

    bias = tags("backbone.blocks.0.attn.qkv.bias")
    assert bias.wd_multiplier == 0.0 and bias.lr_multiplier == pytest.approx(decay**DEPTH)
    assert tags("backbone.blocks.0.attn.qkv.weight").wd_multiplier == 1.0
    assert tags("backbone.blocks.2.mlp.fc1.weight").lr_multiplier == pytest.approx(decay)
    assert tags("backbone.blocks.1.ls1.gamma").wd_multiplier == 0.0
    assert tags("backbone.blocks.1.norm2.weight").wd_multiplier == 0.0
    patch = tags("backbone.patch_embed.proj.weight")
    assert patch.layer_id == 0 and patch.lr_multiplier == pytest.approx(0.2 * decay**top)
    assert patch.wd_multiplier == 1.0
    for name in ("backbone.pos_embed", "backbone.cls_token", "backbone.mask_token"):
        t = tags(name)
        assert t.layer_id == 0 and t.lr_multiplier == pytest.approx(decay**top)
        assert t.wd_multiplier == 1.0  # DINOv2 decays them
    norm = tags("backbone.norm.weight")
    assert norm.lr_multiplier == 1.0 and norm.wd_multiplier == 0.0
    head = tags("dino_head.mlp.0.weight")
    assert head.lr_multiplier == 1.0 and head.wd_multiplier == 1.0 and not head.is_last_layer
    last = tags("dino_head.last_layer.parametrizations.weight.original0")
    assert last.is_last_layer and last.lr_multiplier == 1.0 and last.wd_multiplier == 1.0
    expert_last = tags("expert_heads.uni.last_layer.parametrizations.weight.original1")
    assert expert_last.is_last_layer and expert_last.lr_multiplier == 1.0
    assert tags("expert_heads.uni.mlp.bias").wd_multiplier == 0.0
    # An expert called "normal" is not a norm layer.
    assert tags("expert_heads.normal.mlp.weight").wd_multiplier == 1.0
    wrapped = tags("backbone._fsdp_wrapped_module.blocks.1.attn.proj.weight")
    assert wrapped.layer_id == 2 and wrapped.name == "backbone.blocks.1.attn.proj.weight"


def test_param_groups_cover_the_student_once(distiller):
    groups = build_param_groups(distiller.student.named_parameters(), depth=distiller.depth)
    grouped = [id(p) for g in groups for p in g["params"]]
    student = [id(p) for p in distiller.student.parameters()]
    assert sorted(grouped) == sorted(student) and len(set(grouped)) == len(grouped)
    teacher = {id(p) for p in distiller.teacher.parameters()}
    assert not teacher & set(grouped)
    keys = [(g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"]) for g in groups]
    assert len(keys) == len(set(keys))
    assert any(g["is_last_layer"] for g in groups)


def test_apply_schedules_and_a_frozen_last_layer_step(distiller):
    groups = build_param_groups(distiller.student.named_parameters(), depth=distiller.depth)
    opt = build_optimizer(groups)
    assert opt.defaults["betas"] == (0.9, 0.999)
    apply_schedules(opt, lr=1e-2, wd=0.05, last_layer_lr=0.0)
    for g in opt.param_groups:
        expected_lr = 0.0 if g["is_last_layer"] else 1e-2 * g["lr_multiplier"]
        assert g["lr"] == pytest.approx(expected_lr)
        assert g["weight_decay"] == pytest.approx(0.05 * g["wd_multiplier"])

    head = distiller.student["dino_head"]
    last_before = head.last_layer.parametrizations.weight.original1.detach().clone()
    first_before = head.mlp[0].weight.detach().clone()
    x = torch.randn(4, distiller.embed_dim)
    head(x).square().mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    assert torch.equal(head.last_layer.parametrizations.weight.original1, last_before)
    assert not torch.equal(head.mlp[0].weight, first_before)
