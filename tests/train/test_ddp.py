"""Two-process DDP on the CPU (gloo) trains the same model as one process with the same
global batch.

What "the same" means here: after k steps, student and teacher weights and both loss centers
agree within 1e-5 (float32 summation order differs), when rank r of 2 sees positions
r, r + 2, ... of the sample stream (batch 2 each) and the single process sees all of them
(batch 4). Three parts of GPFM are per-rank by design and are switched off for this
comparison: KoLeo (nearest neighbours within a rank's batch), iBOT masks (drawn per rank batch)
and drop path (per-rank RNG). The DINO/iBOT centers are all-reduced, gradients averaged, and
the ViT has no BatchNorm, so everything else must match.

The 2-process run goes through `python -m gpfm_train.cli fit` in a subprocess, so Lightning
starts its second process by re-running that command (under pytest it would re-run pytest).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _tiny_run import REPO, set_args, tiny_overrides

from gpfm_train.cli import fit, load_run_config, prepare_fit

STEPS = 3


def _values(root: Path, batch: int) -> list[tuple[str, object]]:
    return tiny_overrides(root, **{
        "model.backbone.drop_path_rate": 0.0,
        "model.distill.koleo_loss_weight": 0.0,
        "model.schedule.warmup_epochs": 0,
        "model.schedule.base_lr": 4.0e-3,
        "model.schedule.epoch_length": 2,
        "data.masks.mask_sample_probability": 0.0,
        "data.batch_size": batch,
        "data.num_workers": 1,
        "trainer.max_steps": STEPS,
        "trainer.logger": None,
    })


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    run = load_run_config("tiny_cpu.yaml", _values(root / "one", 4))
    initial = {k: v.detach().clone()
               for k, v in prepare_fit(run).module.distiller.state_dict().items()}
    single = fit(run)
    reference = {k: v.detach().clone() for k, v in single.module.distiller.state_dict().items()}

    args = [sys.executable, "-m", "gpfm_train.cli", "fit", "--config", "tiny_cpu.yaml",
            "--trainer.devices", "2", "--trainer.strategy", "ddp",
            *set_args(_values(root / "two", 2))]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(root / "two" / "checkpoints" / "last.ckpt", map_location="cpu",
                      weights_only=True)
    return reference, ckpt, proc, initial


def test_two_processes_ran_with_half_the_batch_each(runs):
    _, ckpt, proc, _ = runs
    assert ckpt["global_step"] == STEPS
    assert len(ckpt["gpfm"]["rng"]) == 2  # one RNG state per rank
    assert ckpt["gpfm"]["schedule"]["global_batch_size"] == 4
    assert ckpt["GPFMDataModule"]["sampler"]["position"] == STEPS * 4
    assert "trained to step 3" in proc.stdout


def test_ddp_weights_and_centers_equal_the_single_process_run(runs):
    reference, ckpt, _, initial = runs
    state = {k[len("distiller."):]: v for k, v in ckpt["state_dict"].items()}
    assert state.keys() == reference.keys()
    for key, value in reference.items():
        torch.testing.assert_close(state[key], value, atol=1e-5, rtol=0, msg=key)
    # The tolerance is small next to how far training moved the weights.
    for key in ("student.backbone.blocks.0.attn.qkv.weight", "student.backbone.norm.weight",
                "student.dino_head.mlp.0.weight", "dino_loss.center"):
        assert (reference[key] - initial[key]).abs().max() > 2e-4, key
