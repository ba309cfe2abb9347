"""The loss modules against formula-level references written with plain tensor ops."""

from __future__ import annotations

import math
import multiprocessing as mp
from pathlib import Path

import pytest
import torch

from gpfm_train.losses import (
    DINOLoss,
    KoLeoLoss,
    cosine_loss,
    iBOTPatchLoss,
    patch_feature_loss,
    resize_token_grid,
)


def _log_softmax_ref(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    shifted = x - x.max(dim=-1, keepdim=True).values
    return shifted - shifted.exp().sum(dim=-1, keepdim=True).log()


def _softmax_ref(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    e = (x - x.max(dim=-1, keepdim=True).values).exp()
    return e / e.sum(dim=-1, keepdim=True)


def _sinkhorn_dinov2_ref(logits: torch.Tensor, temp: float, n_iter: int = 3) -> torch.Tensor:
    """DINOv2's single-process formula, verbatim in float64 (no max shift)."""
    q = torch.exp(logits.double() / temp).t()
    b, k = q.shape[1], q.shape[0]
    q = q / q.sum()
    for _ in range(n_iter):
        q = q / q.sum(dim=1, keepdim=True) / k
        q = q / q.sum(dim=0, keepdim=True) / b
    return (q * b).t()


def test_dino_loss_matches_cross_entropy_formula():
    gen = torch.Generator().manual_seed(0)
    students = [torch.randn(5, 12, generator=gen) for _ in range(3)]
    teachers = [torch.softmax(torch.randn(5, 12, generator=gen), -1) for _ in range(2)]
    got = DINOLoss(12, student_temp=0.1)(students, teachers)
    expected = 0.0
    for s in students:
        lsm = _log_softmax_ref(s / 0.1)
        for t in teachers:
            per_sample = -(t.double() * lsm).sum(-1)
            expected += per_sample.sum() / per_sample.numel()
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


def test_dino_softmax_centering_updates_after_use():
    gen = torch.Generator().manual_seed(1)
    loss = DINOLoss(8, center_momentum=0.9)
    first = torch.randn(6, 8, generator=gen) * 3
    second = torch.randn(6, 8, generator=gen) * 3

    probs1 = loss.softmax_center_teacher(first, teacher_temp=0.04)
    torch.testing.assert_close(probs1.double(), _softmax_ref(first / 0.04))
    loss.update_center(first)
    # The update is pending: the buffer is untouched until the next use.
    assert torch.count_nonzero(loss.center) == 0

    center1 = 0.1 * first.double().mean(0, keepdim=True)
    probs2 = loss.softmax_center_teacher(second, teacher_temp=0.07)
    torch.testing.assert_close(loss.center.double(), center1, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(
        probs2.double(), _softmax_ref((second - center1) / 0.07), atol=1e-6, rtol=1e-5
    )

    loss.update_center(second)
    center2 = 0.9 * center1 + 0.1 * second.double().mean(0, keepdim=True)
    # Saving a checkpoint folds the pending update in.
    saved = loss.state_dict()["center"]
    torch.testing.assert_close(saved.double(), center2, rtol=1e-5, atol=1e-7)


def test_sinkhorn_knopp_matches_dinov2_and_normalises():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(10, 16, generator=gen)
    loss = DINOLoss(16)
    got = loss.sinkhorn_knopp_teacher(logits, teacher_temp=0.1)
    torch.testing.assert_close(
        got.double(), _sinkhorn_dinov2_ref(logits, 0.1), rtol=1e-5, atol=1e-8
    )
    torch.testing.assert_close(got.sum(-1), torch.ones(10), rtol=1e-5, atol=1e-6)
    # exp(logits / T) reaches ~exp(125): inf in DINOv2's fp32 formula, fine with the max shift.
    big = logits + 9.5
    got_big = loss.sinkhorn_knopp_teacher(big, teacher_temp=0.1)
    assert torch.isinf(torch.exp(big / 0.1)).any()
    torch.testing.assert_close(
        got_big.double(), _sinkhorn_dinov2_ref(big, 0.1), rtol=1e-5, atol=1e-8
    )


def test_ibot_forward_masked_matches_per_image_reference():
    gen = torch.Generator().manual_seed(3)
    n_images, n_patches, k = 4, 9, 7
    masks = torch.zeros(n_images, n_patches, dtype=torch.bool)
    masks[0, [1, 2, 5]] = True
    masks[2, [0, 8]] = True
    masks[3, 4] = True  # image 1 stays unmasked
    m = int(masks.sum())
    student = torch.randn(m + 3, k, generator=gen)  # padded buffer, as DINOv2 allows
    teacher = torch.softmax(torch.randn(m + 3, k, generator=gen), -1)
    loss = iBOTPatchLoss(k, student_temp=0.1)

    weights = torch.cat(
        [torch.full((int(row.sum()),), 1.0 / int(row.sum())) for row in masks if row.any()]
    )
    got = loss.forward_masked(student, teacher, masks, n_masked_patches=m, masks_weight=weights)
    default = loss.forward_masked(student[:m], teacher[:m], masks)

    expected, row = 0.0, 0
    for image in range(n_images):
        count = int(masks[image].sum())
        for _ in range(count):
            ce = -(teacher[row].double() * _log_softmax_ref(student[row] / 0.1)).sum()
            expected += ce / count
            row += 1
    expected /= n_images  # all global images count, masked or not
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    assert default.item() == pytest.approx(expected.item(), rel=1e-5)


def test_ibot_center_is_mean_over_masked_tokens():
    gen = torch.Generator().manual_seed(4)
    loss = iBOTPatchLoss(5, center_momentum=0.9)
    logits = torch.randn(11, 5, generator=gen)
    probs = loss.softmax_center_teacher(logits, teacher_temp=0.05)
    assert probs.shape == (11, 5)
    loss.update_center(logits)
    loss.apply_center_update()
    assert loss.center.shape == (1, 1, 5)
    torch.testing.assert_close(loss.center.reshape(-1), 0.1 * logits.mean(0), rtol=1e-5, atol=1e-7)
    # A batch without masked tokens leaves the center alone instead of making it NaN.
    before = loss.center.clone()
    loss.update_center(torch.zeros(0, 5))
    loss.apply_center_update()
    torch.testing.assert_close(loss.center, before)


def _koleo_ref(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    x = x.double()
    x = x / x.pow(2).sum(-1, keepdim=True).sqrt().clamp(min=eps)
    total = 0.0
    for i in range(x.shape[0]):
        best = None
        for j in range(x.shape[0]):
            if j != i:
                d = (x[i] - x[j] + eps).pow(2).sum().sqrt()
                best = d if best is None or d < best else best
        total += -math.log(best.item() + eps)
    return torch.tensor(total / x.shape[0])


def test_koleo_matches_nearest_neighbour_formula_and_runs_in_fp32():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(9, 6, generator=gen)
    got = KoLeoLoss()(x)
    assert got.item() == pytest.approx(_koleo_ref(x).item(), rel=1e-5)

    half = x.to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = KoLeoLoss()(half)
    assert mixed.dtype == torch.float32
    assert mixed.item() == pytest.approx(_koleo_ref(half.float()).item(), rel=1e-5)


def test_koleo_gradient_pushes_nearest_neighbours_apart():
    x = torch.tensor([[1.0, 0.0], [0.99, 0.1], [-1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    KoLeoLoss()(x).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    step = x - 0.01 * x.grad
    assert KoLeoLoss()(step) < KoLeoLoss()(x)


def _cos_ref(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.double(), b.double()
    num = (a * b).sum(-1)
    den = (a.pow(2).sum(-1).sqrt() * b.pow(2).sum(-1).sqrt()).clamp(min=1e-8)
    return num / den


def _smooth_l1_ref(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    d = (a.double() - b.double()).abs()
    return torch.where(d < 1.0, 0.5 * d * d, d - 0.5).mean()


def test_cosine_loss_formula():
    gen = torch.Generator().manual_seed(6)
    s, t = torch.randn(4, 10, generator=gen), torch.randn(4, 10, generator=gen)
    assert cosine_loss(s, t).item() == pytest.approx(1 - _cos_ref(s, t).mean().item(), rel=1e-6)
    assert cosine_loss(t * 3.0, t).item() == pytest.approx(0.0, abs=1e-6)
    assert cosine_loss(-t, t).item() == pytest.approx(2.0, abs=1e-6)


def test_patch_feature_loss_same_grid_formula():
    gen = torch.Generator().manual_seed(7)
    student = torch.randn(2, 12, 5, generator=gen) * 2
    expert = torch.randn(2, 3, 4, 5, generator=gen) * 2
    got = patch_feature_loss(student, expert, (3, 4))
    target = expert.reshape(2, 12, 5)
    expected = 0.9 * (1 - _cos_ref(student, target).mean()) + 0.1 * _smooth_l1_ref(student, target)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


def test_patch_feature_loss_resizes_expert_grid_bicubically():
    gen = torch.Generator().manual_seed(8)
    expert = torch.randn(2, 14, 14, 6, generator=gen)
    student = torch.randn(2, 256, 6, generator=gen)
    resized = (
        torch.nn.functional.interpolate(
            expert.permute(0, 3, 1, 2), size=(16, 16), mode="bicubic", align_corners=False
        )
        .permute(0, 2, 3, 1)
        .reshape(2, 256, 6)
    )
    torch.testing.assert_close(resize_token_grid(expert, (16, 16)), resized)
    expected = 0.9 * (1 - _cos_ref(student, resized).mean()) + 0.1 * _smooth_l1_ref(
        student, resized
    )
    assert patch_feature_loss(student, expert, (16, 16)).item() == pytest.approx(
        expected.item(), rel=1e-5
    )
    # Bicubic resampling keeps a constant field constant: the grid axes are not scrambled.
    const = torch.arange(6.0).expand(1, 14, 14, 6)
    torch.testing.assert_close(
        resize_token_grid(const, (16, 16)), torch.arange(6.0).expand(1, 256, 6)
    )
    with pytest.raises(ValueError):
        patch_feature_loss(student[:, :200], expert, (16, 16))


# --------------------------------------------------------------------------- distributed
def _distributed_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        gen = torch.Generator().manual_seed(10)
        cls_logits = torch.randn(world, 6, 16, generator=gen)
        patch_logits = [torch.randn(4 + 3 * r, 16, generator=gen) for r in range(world)]
        dino, ibot = DINOLoss(16), iBOTPatchLoss(16)
        dino.softmax_center_teacher(cls_logits[rank], 0.05)
        dino.update_center(cls_logits[rank])
        ibot.softmax_center_teacher(patch_logits[rank], 0.05)
        ibot.update_center(patch_logits[rank])
        result = {
            "dino_center": dino.state_dict()["center"],
            "ibot_center": ibot.state_dict()["center"],
            "dino_sk": dino.sinkhorn_knopp_teacher(cls_logits[rank], 0.1),
            "ibot_sk": ibot.sinkhorn_knopp_teacher(
                patch_logits[rank], 0.1, patch_logits[rank].shape[0]
            ),
        }
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_centers_and_sinkhorn_are_reduced_across_ranks(tmp_path):
    world = 2
    ctx = mp.get_context("fork")  # no re-import of torch in the children
    procs = [
        ctx.Process(
            target=_distributed_worker, args=(r, world, str(tmp_path / "init"), str(tmp_path))
        )
        for r in range(world)
    ]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(timeout=120)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in procs] == [0, 0]

    gen = torch.Generator().manual_seed(10)
    cls_logits = torch.randn(world, 6, 16, generator=gen)
    patch_logits = [torch.randn(4 + 3 * r, 16, generator=gen) for r in range(world)]
    dino_center = 0.1 * cls_logits.reshape(-1, 16).mean(0)
    ibot_center = 0.1 * torch.stack([p.mean(0) for p in patch_logits]).mean(0)  # mean of rank means
    dino_sk = _sinkhorn_dinov2_ref(cls_logits.reshape(-1, 16), 0.1).reshape(world, 6, 16)
    ibot_sk = _sinkhorn_dinov2_ref(torch.cat(patch_logits), 0.1).split([4, 7])
    for rank in range(world):
        got = torch.load(tmp_path / f"rank{rank}.pt", map_location="cpu", weights_only=True)
        torch.testing.assert_close(
            got["dino_center"].reshape(-1), dino_center, rtol=1e-5, atol=1e-7
        )
        torch.testing.assert_close(
            got["ibot_center"].reshape(-1), ibot_center, rtol=1e-5, atol=1e-7
        )
        torch.testing.assert_close(got["dino_sk"].double(), dino_sk[rank], rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(got["ibot_sk"].double(), ibot_sk[rank], rtol=1e-5, atol=1e-8)
