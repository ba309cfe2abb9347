"""Backbone, distiller and export: the recipe's shapes, one step's loss algebra, a full training
step with EMA, and the release-layout round trip. Experts are small real (frozen) timm ViTs."""

from __future__ import annotations

import dataclasses
import random

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import DropPath, LayerScale
from torch import nn

from gpfm_train.export_weights import (
    from_gpfm_release_layout,
    teacher_release_checkpoint,
    teacher_to_timm_state_dict,
    to_gpfm_release_layout,
)
from gpfm_train.masking import collate_masks
from gpfm_train.models import (
    DINOHead,
    DistillConfig,
    ExpertConfig,
    GPFMDistiller,
    backbone_forward,
    build_student_backbone,
    timm_state_dict,
)
from gpfm_train.models.vit import interpolate_pos_embed
from gpfm_train.optim import apply_schedules, build_optimizer, build_param_groups
from napari_gpfm.errors import ConfigError, ParameterError, WeightsError

G, L, P = 112, 56, 14  # global crop, local crop, patch: 8x8 global grid, 4x4 local grid
GRID = G // P
B = 2
DIM = 48
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class TimmExpert(nn.Module):
    """A small timm ViT returning the Encoder contract ``{"cls", "patch_tokens"}``."""

    def __init__(self, embed_dim: int, patch_size: int, img_size: int) -> None:
        super().__init__()
        self.vit = timm.create_model(
            "vit_small_patch14_dinov2",
            img_size=img_size,
            patch_size=patch_size,
            embed_dim=embed_dim,
            depth=1,
            num_heads=2,
            num_classes=0,
            dynamic_img_size=True,
        )
        self.embed_dim = embed_dim
        self.calls = 0

    def forward(self, x: torch.Tensor, patch_tokens: bool = True) -> dict[str, torch.Tensor]:
        self.calls += 1
        feats = self.vit.forward_features(x)
        h, w = self.vit.patch_embed.dynamic_feat_size(x.shape[-2:])
        out = {"cls": feats[:, 0]}
        if patch_tokens:
            out["patch_tokens"] = feats[:, 1:].reshape(x.shape[0], h, w, -1)
        return out


def tiny_backbone(drop_path: float = 0.0, depth: int = 2, img_size: int = G) -> nn.Module:
    return build_student_backbone(
        "vit_small_patch14_dinov2",
        img_size=img_size,
        drop_path_rate=drop_path,
        embed_dim=DIM,
        depth=depth,
        num_heads=2,
    )


def make_distiller(drop_path: float = 0.0, **cfg_changes) -> GPFMDistiller:
    torch.manual_seed(0)
    experts = {
        "uni": TimmExpert(40, patch_size=16, img_size=G),  # 7x7 grid, resized to 8x8
        "conch": TimmExpert(24, patch_size=14, img_size=98),
    }
    cfg = DistillConfig(
        n_local=2,
        out_dim=96,
        head_hidden_dim=64,
        head_bottleneck_dim=24,
        expert_head_bottleneck_dim=16,
        experts=(
            ExpertConfig("uni", cls_weight=1.0, patch_weight=0.25),
            ExpertConfig(
                "conch",
                cls_weight=0.5,
                patch_weight=None,
                input_size=98,
                input_mean=CLIP_MEAN,
                input_std=CLIP_STD,
            ),
        ),
    )
    cfg = dataclasses.replace(cfg, **cfg_changes)
    return GPFMDistiller(tiny_backbone(drop_path), experts, cfg)


def make_batch(seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    batch = {
        "global_crops": torch.randn(2 * B, 3, G, G, generator=gen),
        "local_crops": torch.randn(2 * B, 3, L, L, generator=gen),
    }
    batch.update(collate_masks(2 * B, GRID, generator=random.Random(seed)))
    assert batch["n_masked_patches"] > 0
    return batch


# --------------------------------------------------------------------------- backbone
def test_recipe_backbone_has_the_gpfm_shape():
    with torch.device("meta"):
        vit = build_student_backbone()
    assert vit.embed_dim == 1024 and len(vit.blocks) == 24
    assert vit.patch_embed.patch_size == (14, 14)
    assert tuple(vit.pos_embed.shape) == (1, 257, 1024)
    assert tuple(vit.mask_token.shape) == (1, 1024)
    assert vit.num_reg_tokens == 0
    for block in vit.blocks:
        assert isinstance(block.ls1, LayerScale) and isinstance(block.ls2, LayerScale)
        assert isinstance(block.drop_path1, DropPath) and block.drop_path1.drop_prob == 0.4
        assert isinstance(block.drop_path2, DropPath) and block.drop_path2.drop_prob == 0.4
        assert isinstance(block.mlp.act, nn.GELU) and block.attn.qkv.bias is not None
        assert block.norm1.eps == 1e-6
    vit.eval()
    local = backbone_forward(vit, None, torch.empty(2, 3, 98, 98, device="meta"))
    assert tuple(local["x_norm_clstoken"].shape) == (2, 1024)
    assert tuple(local["x_norm_patchtokens"].shape) == (2, 49, 1024)

    release = to_gpfm_release_layout(timm_state_dict(vit), mask_token=vit.mask_token)["teacher"]
    assert len(release) == 24 * 14 + 6 + 1
    for key in (
        "backbone.blocks.0.5.ls2.gamma",
        "backbone.blocks.1.6.norm1.weight",
        "backbone.blocks.3.23.mlp.fc2.bias",
        "backbone.pos_embed",
        "backbone.mask_token",
        "backbone.patch_embed.proj.weight",
        "backbone.norm.bias",
        "backbone.cls_token",
    ):
        assert key in release


def test_backbone_forward_matches_timm_at_the_native_size():
    vit = tiny_backbone().eval()
    x = torch.randn(2, 3, G, G)
    with torch.no_grad():
        out = backbone_forward(vit, None, x)
        ref = vit.forward_features(x)
    torch.testing.assert_close(out["x_norm_clstoken"], ref[:, 0])
    torch.testing.assert_close(out["x_norm_patchtokens"], ref[:, 1:])


def test_local_crops_use_dinov2_position_interpolation():
    vit = tiny_backbone().eval()
    pos = vit.pos_embed.detach()
    got = interpolate_pos_embed(pos, (4, 4))
    grid = pos[:, 1:].reshape(1, GRID, GRID, DIM).permute(0, 3, 1, 2)
    resized = F.interpolate(
        grid,
        scale_factor=(4.1 / GRID, 4.1 / GRID),
        mode="bicubic",
        align_corners=False,
        antialias=False,
    )
    expected = torch.cat((pos[:, :1], resized.permute(0, 2, 3, 1).reshape(1, 16, DIM)), dim=1)
    torch.testing.assert_close(got, expected)
    timm_rule = timm.layers.resample_abs_pos_embed(pos, (4, 4), num_prefix_tokens=1)
    assert not torch.allclose(got, timm_rule, atol=1e-4)

    # The whole local-crop forward equals a native-56px timm model carrying that embedding.
    small = timm.create_model(
        "vit_small_patch14_dinov2",
        img_size=L,
        embed_dim=DIM,
        depth=2,
        num_heads=2,
        num_classes=0,
        init_values=1e-5,
    ).eval()
    state = timm_state_dict(vit)
    state["pos_embed"] = got
    small.load_state_dict(state)
    x = torch.randn(3, 3, L, L)
    with torch.no_grad():
        out = backbone_forward(vit, None, x)
        ref = small.forward_features(x)
    torch.testing.assert_close(out["x_norm_clstoken"], ref[:, 0])
    torch.testing.assert_close(out["x_norm_patchtokens"], ref[:, 1:])


def test_masked_patch_embeddings_are_replaced_before_position_embedding():
    vit = tiny_backbone().eval()
    with torch.no_grad():
        vit.mask_token.normal_()
    x = torch.randn(2, 3, G, G)
    masks = torch.rand(2, GRID * GRID, generator=torch.Generator().manual_seed(1)) < 0.4
    with torch.no_grad():
        out = backbone_forward(vit, vit.mask_token, x, masks)
        tokens = vit.patch_embed(x).reshape(2, GRID * GRID, DIM).clone()
        tokens[masks] = vit.mask_token[0]
        ref = vit.norm(vit.blocks(vit.norm_pre(vit._pos_embed(tokens.reshape(2, GRID, GRID, DIM)))))
        assert not torch.allclose(
            out["x_norm_patchtokens"], backbone_forward(vit, None, x)["x_norm_patchtokens"]
        )
        # Fully masked images carry no trace of their pixels.
        full = torch.ones(2, GRID * GRID, dtype=torch.bool)
        both = backbone_forward(vit, vit.mask_token, torch.randn(2, 3, G, G), full)
    torch.testing.assert_close(out["x_norm_clstoken"], ref[:, 0])
    torch.testing.assert_close(out["x_norm_patchtokens"], ref[:, 1:])
    torch.testing.assert_close(both["x_norm_patchtokens"][0], both["x_norm_patchtokens"][1])


# --------------------------------------------------------------------------- distiller
@pytest.fixture(scope="module")
def shared() -> GPFMDistiller:
    """A distiller for tests that only need its checks (its centers change as they run)."""
    return make_distiller()


def test_teacher_copy_and_hidden_frozen_experts():
    d = make_distiller(drop_path=0.3)
    student_sd, teacher_sd = d.student_backbone_state_dict(), d.teacher_backbone_state_dict()
    assert "mask_token" not in student_sd and set(student_sd) == set(teacher_sd)
    assert all(torch.equal(student_sd[k], teacher_sd[k]) for k in student_sd)
    assert all(isinstance(b.drop_path1, DropPath) for b in d.student["backbone"].blocks)
    assert all(isinstance(b.drop_path1, nn.Identity) for b in d.teacher["backbone"].blocks)
    assert set(d.teacher) == {"backbone", "dino_head"}
    assert not any(p.requires_grad for p in d.teacher.parameters())

    d.train()
    assert d.student.training and not d.teacher.training
    assert not any(e.training for e in d.experts.values())
    expert_ids = {id(p) for e in d.experts.values() for p in e.parameters()}
    assert expert_ids and not expert_ids & {id(p) for p in d.parameters()}
    assert not any(p.requires_grad for e in d.experts.values() for p in e.parameters())
    keys = d.state_dict().keys()
    assert "dino_loss.center" in keys and "ibot_loss.center" in keys
    assert not any("vit." in k for k in keys)  # the experts' weights stay out of checkpoints

    d.to(torch.float64)
    assert all(p.dtype == torch.float64 for e in d.experts.values() for p in e.parameters())
    d.to(torch.float32)


def _ce(teacher_probs: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    return -(teacher_probs * torch.log_softmax(student_logits / 0.1, dim=-1)).sum(-1).mean()


def _koleo(x: torch.Tensor) -> torch.Tensor:
    x = x / x.norm(dim=-1, keepdim=True)
    nearest = (torch.cdist(x, x) + torch.eye(x.shape[0]) * 10).argmin(dim=1)
    dist = (x - x[nearest] + 1e-8).norm(dim=-1)  # PairwiseDistance adds eps to the difference
    return -torch.log(dist + 1e-8).mean()


def test_loss_terms_follow_the_recipe_algebra():
    d = make_distiller(drop_path=0.0)
    with torch.no_grad():
        # LayerScale 1e-5 makes a fresh ViT nearly image-independent (CLS tokens ~1e-6 apart),
        # which would leave KoLeo's log-distances to rounding noise.
        for backbone in (d.student["backbone"], d.teacher["backbone"]):
            for block in backbone.blocks:
                block.ls1.gamma.fill_(0.5)
                block.ls2.gamma.fill_(0.5)
    batch = make_batch(0)
    temp = 0.05
    captured = {}
    d.experts["conch"].register_forward_pre_hook(
        lambda m, args, kw: captured.update(x=args[0]), with_kwargs=True
    )
    with torch.no_grad():
        out = d(batch, temp)

        gc, lc, masks = batch["global_crops"], batch["local_crops"], batch["masks"]
        idx, weights = batch["mask_indices"], batch["masks_weight"]
        teacher = backbone_forward(d.teacher["backbone"], None, gc)
        t_cls_logits = d.teacher["dino_head"](teacher["x_norm_clstoken"])  # crop-major, unswapped
        t_cls = torch.softmax(t_cls_logits / temp, -1)  # the center starts at 0
        t_patch = torch.softmax(
            d.teacher["dino_head"](teacher["x_norm_patchtokens"].reshape(-1, DIM)[idx]) / temp, -1
        )
        sb = d.student["backbone"]
        student = backbone_forward(sb, sb.mask_token, gc, masks)
        s_local = d.student["dino_head"](backbone_forward(sb, None, lc)["x_norm_clstoken"])
        s_global = d.student["dino_head"](student["x_norm_clstoken"])
        s_patch = d.student["dino_head"](student["x_norm_patchtokens"].reshape(-1, DIM)[idx])

        n_terms = 2 * 1 + 2 * 2
        crop = [slice(0, B), slice(B, 2 * B)]
        dino_local = sum(_ce(t_cls[crop[c]], s_local[crop[j]]) for j in range(2) for c in range(2))
        # Each student global crop meets the other teacher crop.
        dino_global = (
            _ce(t_cls[crop[1]], s_global[crop[0]]) + _ce(t_cls[crop[0]], s_global[crop[1]])
        ) / 2
        koleo = 0.1 * (
            _koleo(student["x_norm_clstoken"][crop[0]])
            + _koleo(student["x_norm_clstoken"][crop[1]])
        )
        ce_tokens = -(t_patch * torch.log_softmax(s_patch / 0.1, -1)).sum(-1)
        ibot = (ce_tokens * weights).sum() / (2 * B) * 2 * 0.5

        uni = d.experts["uni"](gc)
        uni_head = d.student["expert_heads"]["uni"]
        uni_cls = 1 - F.cosine_similarity(uni_head(student["x_norm_clstoken"]), uni["cls"]).mean()
        target = (
            F.interpolate(
                uni["patch_tokens"].permute(0, 3, 1, 2), size=(GRID, GRID), mode="bicubic"
            )
            .permute(0, 2, 3, 1)
            .reshape(2 * B, -1, 40)
        )
        pred = uni_head(student["x_norm_patchtokens"])
        uni_patch = 0.9 * (
            1 - F.cosine_similarity(pred, target, dim=-1).mean()
        ) + 0.1 * F.smooth_l1_loss(pred, target)

        mean_in = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std_in = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        conch_x = F.interpolate(
            (gc * std_in + mean_in - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1))
            / torch.tensor(CLIP_STD).view(1, 3, 1, 1),
            size=(98, 98),
            mode="bicubic",
            antialias=True,
        )
        conch = d.experts["conch"](conch_x)
        conch_head = d.student["expert_heads"]["conch"]
        conch_cls = (
            1 - F.cosine_similarity(conch_head(student["x_norm_clstoken"]), conch["cls"]).mean()
        )

    torch.testing.assert_close(captured["x"], conch_x, atol=1e-5, rtol=1e-5)
    expected = {
        "dino_local": dino_local / n_terms,
        "dino_global": dino_global * 2 / n_terms,
        "koleo": koleo,
        "ibot": ibot,
        "expert/uni/cls": 1.0 * uni_cls,
        "expert/uni/patch": 0.25 * uni_patch,
        "expert/conch/cls": 0.5 * conch_cls,
    }
    assert set(out) == set(expected) | {"total"}
    for key, value in expected.items():
        assert out[key].item() == pytest.approx(value.item(), rel=1e-4, abs=1e-6), key
    assert out["total"].item() == pytest.approx(sum(v.item() for v in expected.values()), rel=1e-5)

    # The centers were used at 0 and are updated afterwards with this batch's teacher logits.
    assert torch.count_nonzero(d.dino_loss.center) == 0
    saved = d.state_dict()
    torch.testing.assert_close(
        saved["dino_loss.center"][0], 0.1 * t_cls_logits.mean(0), atol=1e-6, rtol=1e-5
    )
    t_patch_logits = d.teacher["dino_head"](teacher["x_norm_patchtokens"].reshape(-1, DIM)[idx])
    torch.testing.assert_close(
        saved["ibot_loss.center"].reshape(-1),
        0.1 * t_patch_logits.mean(0).detach(),
        atol=1e-6,
        rtol=1e-5,
    )


def test_one_training_step_with_ema_update():
    d = make_distiller(drop_path=0.1)
    d.train()
    groups = build_param_groups(d.student.named_parameters(), depth=d.depth)
    opt = build_optimizer(groups)
    apply_schedules(opt, lr=1e-3, wd=0.04, last_layer_lr=1e-3)
    experts_before = {
        n: {k: v.clone() for k, v in e.state_dict().items()} for n, e in d.experts.items()
    }

    out = d(make_batch(1), teacher_temp=0.04)
    assert set(out) == {
        "dino_local",
        "dino_global",
        "koleo",
        "ibot",
        "expert/uni/cls",
        "expert/uni/patch",
        "expert/conch/cls",
        "total",
    }
    assert all(torch.isfinite(v) for v in out.values())
    assert out["total"].item() == pytest.approx(
        sum(v.item() for k, v in out.items() if k != "total"), rel=1e-5
    )
    out["total"].backward()

    for name, p in d.student.named_parameters():
        assert p.grad is not None, name
    for name in (
        "backbone.mask_token",
        "backbone.blocks.0.attn.qkv.weight",
        "backbone.patch_embed.proj.weight",
        "dino_head.mlp.0.weight",
        "dino_head.last_layer.parametrizations.weight.original1",
        "expert_heads.uni.mlp.weight",
        "expert_heads.conch.last_layer.parametrizations.weight.original1",
    ):
        assert d.student.get_parameter(name).grad.abs().sum() > 0, name
    assert all(p.grad is None for p in d.teacher.parameters())
    assert all(p.grad is None for e in d.experts.values() for p in e.parameters())

    student_before = {n: p.detach().clone() for n, p in d.student.named_parameters()}
    opt.step()
    opt.zero_grad(set_to_none=True)
    assert not torch.equal(
        d.student.get_parameter("backbone.blocks.1.mlp.fc2.weight"),
        student_before["backbone.blocks.1.mlp.fc2.weight"],
    )
    for name, expert in d.experts.items():
        for key, value in expert.state_dict().items():
            assert torch.equal(value, experts_before[name][key])

    momentum = 0.9
    teacher_before = {n: p.detach().clone() for n, p in d.teacher.named_parameters()}
    student_now = {n: p.detach().clone() for n, p in d.student.named_parameters()}
    assert not torch.equal(
        teacher_before["backbone.blocks.0.attn.qkv.weight"],
        student_now["backbone.blocks.0.attn.qkv.weight"],
    )
    d.update_teacher(momentum)
    for name, p in d.teacher.named_parameters():
        expected = teacher_before[name] + (1 - momentum) * (
            student_now[name] - teacher_before[name]
        )
        torch.testing.assert_close(p.detach(), expected, atol=1e-7, rtol=1e-6, msg=name)


def test_sinkhorn_centering_and_separate_ibot_head():
    d = make_distiller(centering="sinkhorn_knopp", ibot_separate_head=True)
    assert set(d.teacher) == {"backbone", "dino_head", "ibot_head"}
    out = d(make_batch(2), teacher_temp=0.07)
    assert all(torch.isfinite(v) for v in out.values())
    out["total"].backward()
    assert d.student["ibot_head"].mlp[0].weight.grad.abs().sum() > 0
    assert torch.count_nonzero(d.state_dict()["dino_loss.center"]) == 0  # no centering used
    before = d.teacher["ibot_head"].mlp[0].weight.clone()
    with torch.no_grad():
        d.student["ibot_head"].mlp[0].weight.add_(1.0)
    d.update_teacher(0.5)
    torch.testing.assert_close(d.teacher["ibot_head"].mlp[0].weight, before + 0.5)


def test_configuration_errors_are_readable(shared):
    with pytest.raises(ConfigError, match="n_global"):
        DistillConfig(n_global=3)
    with pytest.raises(ConfigError, match="centering"):
        DistillConfig(centering="sinkhorn")
    with pytest.raises(ConfigError, match="unique"):
        DistillConfig(experts=(ExpertConfig("a"), ExpertConfig("a")))
    with pytest.raises(ConfigError, match="unknown distill option"):
        DistillConfig.from_mapping({"n_globals": 2})
    cfg = DistillConfig.from_mapping(
        {"n_local": 4, "experts": [{"name": "uni", "patch_weight": 0.25}]}
    )
    assert cfg.experts == (ExpertConfig("uni", 1.0, 0.25),)
    with pytest.raises(ConfigError, match="arch="):
        build_student_backbone("vit_does_not_exist")
    with pytest.raises(ConfigError, match="register"):
        build_student_backbone(
            "vit_small_patch14_reg4_dinov2", img_size=56, embed_dim=16, depth=1, num_heads=1
        )

    plain = timm.create_model(
        "vit_small_patch14_dinov2", img_size=G, embed_dim=DIM, depth=1, num_heads=2, num_classes=0
    )
    with pytest.raises(ConfigError, match="mask_token"):
        GPFMDistiller(plain, {}, DistillConfig(experts=()))
    with pytest.raises(ConfigError, match="do not match"):
        GPFMDistiller(tiny_backbone(), {}, DistillConfig(experts=(ExpertConfig("uni"),)))

    d = shared
    bad = make_batch(0)
    bad["masks"] = bad["masks"][:, :-1]
    with pytest.raises(ConfigError, match="masks"):
        d(bad, 0.04)
    bad = make_batch(0)
    bad["local_crops"] = bad["local_crops"][:1]
    with pytest.raises(ConfigError, match="local_crops"):
        d(bad, 0.04)
    cls_only = make_distiller(
        experts=(ExpertConfig("uni", 1.0, 0.25), ExpertConfig("conch", 1.0, 0.1))
    )
    cls_only.experts["conch"].forward = lambda x, patch_tokens=True: {
        "cls": torch.zeros(x.shape[0], 24)
    }
    with pytest.raises(ConfigError, match="patch_tokens"):
        cls_only(make_batch(0), 0.04)


def test_a_batch_without_masked_patches(shared):
    batch = make_batch(3)
    batch.update(
        collate_masks(2 * B, GRID, mask_sample_probability=0.0, generator=random.Random(0))
    )
    center = shared.state_dict()["ibot_loss.center"].clone()
    out = shared(batch, 0.04)
    assert out["ibot"].item() == 0.0
    assert all(torch.isfinite(v) for v in out.values())
    torch.testing.assert_close(shared.state_dict()["ibot_loss.center"], center)


# --------------------------------------------------------------------------- export
def _depth4_distiller() -> GPFMDistiller:
    torch.manual_seed(3)
    vit = build_student_backbone(
        "vit_small_patch14_dinov2",
        img_size=56,
        drop_path_rate=0.0,
        embed_dim=32,
        depth=4,
        num_heads=2,
    )
    cfg = DistillConfig(
        n_local=2, out_dim=64, head_hidden_dim=32, head_bottleneck_dim=16, experts=()
    )
    d = GPFMDistiller(vit, {}, cfg)
    with torch.no_grad():  # make the teacher differ from its initial copy
        for p in d.student.parameters():
            p.add_(torch.randn_like(p) * 0.01)
        d.student["backbone"].mask_token.normal_()
    d.update_teacher(0.5)
    return d


def test_release_layout_round_trip(tmp_path):
    d = _depth4_distiller()
    ckpt = teacher_release_checkpoint(d, block_chunks=2)
    teacher = ckpt["teacher"]
    for key in (
        "backbone.blocks.0.1.attn.qkv.weight",
        "backbone.blocks.1.2.attn.qkv.weight",
        "backbone.blocks.1.3.ls2.gamma",
        "backbone.mask_token",
        "backbone.pos_embed",
        "dino_head.mlp.0.weight",
        "dino_head.last_layer.weight_g",
        "dino_head.last_layer.weight_v",
    ):
        assert key in teacher, key
    assert not any(k.startswith("backbone.blocks.2.") for k in teacher)

    torch.save(ckpt, tmp_path / "gpfm.pth")
    loaded = torch.load(tmp_path / "gpfm.pth", map_location="cpu", weights_only=True)
    weights = from_gpfm_release_layout(loaded)
    timm_sd = teacher_to_timm_state_dict(d)
    assert set(weights.backbone) == set(timm_sd)
    for key, value in timm_sd.items():
        assert torch.equal(weights.backbone[key], value), key
    assert torch.equal(weights.mask_token, d.teacher["backbone"].mask_token.detach())

    fresh = timm.create_model(
        "vit_small_patch14_dinov2",
        img_size=56,
        embed_dim=32,
        depth=4,
        num_heads=2,
        num_classes=0,
        init_values=1e-5,
    ).eval()
    fresh.load_state_dict(weights.backbone)
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(
            fresh.forward_features(x)[:, 0],
            backbone_forward(d.teacher["backbone"], None, x)["x_norm_clstoken"],
        )

    head = DINOHead(32, 64, hidden_dim=32, bottleneck_dim=16)
    head.load_state_dict(weights.dino_head)
    legacy = DINOHead(32, 64, hidden_dim=32, bottleneck_dim=16)
    legacy.load_state_dict(
        {k[len("dino_head.") :]: v for k, v in teacher.items() if k.startswith("dino_head.")}
    )
    z = torch.randn(5, 32)
    with torch.no_grad():
        torch.testing.assert_close(head(z), d.teacher["dino_head"](z))
        torch.testing.assert_close(legacy(z), d.teacher["dino_head"](z))

    flat = to_gpfm_release_layout(timm_sd, block_chunks=0)["teacher"]
    assert "backbone.blocks.3.mlp.fc1.weight" in flat
    assert torch.count_nonzero(flat["backbone.mask_token"]) == 0
    assert set(from_gpfm_release_layout({"teacher": flat}).backbone) == set(timm_sd)
    with pytest.raises(ParameterError, match="block_chunks"):
        to_gpfm_release_layout(timm_sd, block_chunks=8)
    with pytest.raises(WeightsError, match="teacher"):
        from_gpfm_release_layout({"student": {}})


def test_warm_start_from_exported_weights():
    source = _depth4_distiller()
    weights = from_gpfm_release_layout(teacher_release_checkpoint(source))
    target = GPFMDistiller(
        build_student_backbone(
            "vit_small_patch14_dinov2",
            img_size=56,
            drop_path_rate=0.0,
            embed_dim=32,
            depth=4,
            num_heads=2,
        ),
        {},
        source.cfg,
    )
    target.load_backbone_weights(weights.backbone, weights.mask_token)
    for sd in (target.student_backbone_state_dict(), target.teacher_backbone_state_dict()):
        assert all(torch.equal(sd[k], weights.backbone[k]) for k in weights.backbone)
    assert torch.equal(target.teacher["backbone"].mask_token, weights.mask_token)
    wrong = dict(weights.backbone)
    wrong.pop("norm.weight")
    with pytest.raises(WeightsError, match="missing"):
        target.load_backbone_weights(wrong)


def test_warm_start_at_a_higher_resolution_resamples_the_position_embedding():
    # DINOv2's high-resolution phase: weights trained at 56 px (4x4 tokens) continue at 84 px.
    source = _depth4_distiller()
    weights = from_gpfm_release_layout(teacher_release_checkpoint(source))
    target = GPFMDistiller(
        build_student_backbone("vit_small_patch14_dinov2", img_size=84, drop_path_rate=0.0,
                               embed_dim=32, depth=4, num_heads=2),
        {},
        source.cfg,
    )
    target.load_backbone_weights(weights.backbone, weights.mask_token)
    expected = interpolate_pos_embed(weights.backbone["pos_embed"], (6, 6))
    assert expected.shape == (1, 37, 32)
    for sd in (target.student_backbone_state_dict(), target.teacher_backbone_state_dict()):
        assert torch.equal(sd["pos_embed"], expected)
        assert torch.equal(sd["blocks.0.attn.qkv.weight"], weights.backbone["blocks.0.attn.qkv.weight"])
    # At 84 px the warm-started backbone computes what the 56 px one computes for an 84 px crop.
    with torch.no_grad():
        x = torch.randn(2, 3, 84, 84)
        ours = backbone_forward(target.teacher["backbone"], None, x)["x_norm_clstoken"]
        theirs = backbone_forward(source.teacher["backbone"], None, x)["x_norm_clstoken"]
    assert torch.allclose(ours, theirs, atol=1e-5)
    wrong_width = dict(weights.backbone)
    wrong_width["pos_embed"] = torch.zeros(1, 17, 16)
    with pytest.raises(WeightsError, match="pos_embed.*same architecture"):
        target.load_backbone_weights(wrong_width)
