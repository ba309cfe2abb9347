"""Resuming from a mid-run checkpoint continues exactly like the uninterrupted run.

"Exactly" (within 1e-6): student, teacher, heads and loss centers; the optimizer's AdamW moments;
the sampler's stream position; the schedules (lr, wd, momentum, teacher temperature at the last
step); and, through drop path 0.1, the RNG stream (restored per rank).
"""

from __future__ import annotations

import os
import signal
import warnings
from pathlib import Path

import pytest
import torch
from _tiny_run import set_args, tiny_overrides
from lightning.pytorch.callbacks import Callback

from gpfm_train.cli import fit, load_run_config, main

STEPS, CUT = 6, 3


def _overrides(root: Path, **changes) -> list[tuple[str, object]]:
    return tiny_overrides(root, **{
        "model.backbone.drop_path_rate": 0.1,
        # Short schedules, so every schedule changes between steps.
        "model.schedule.epoch_length": 2,
        "model.schedule.epochs": 4,
        "model.schedule.warmup_epochs": 1,
        "model.schedule.warmup_teacher_temp_epochs": 2,
        "trainer.max_steps": STEPS,
        "trainer.checkpoint_every_n_steps": CUT,
        "trainer.keep_checkpoints": -1,
        **changes,
    })


class Record(Callback):
    """Sample positions of every batch and the schedule values of every step."""

    def __init__(self):
        self.positions: dict[int, list[int]] = {}
        self.values: dict[int, dict[str, float]] = {}

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.step = trainer.global_step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.values[self.step] = {k: float(v) for k, v in trainer.logged_metrics.items()
                                  if k in ("lr", "wd", "momentum", "teacher_temp",
                                           "last_layer_lr", "loss/total")}


class Positions(Callback):
    def __init__(self):
        self.seen: dict[int, torch.Tensor] = {}

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.seen[trainer.global_step] = batch["global_crops"][:, 0, :2, :2].clone()


def _state(done) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in done.module.distiller.state_dict().items()}


def _adam(done) -> list[torch.Tensor]:
    optimizer = done.trainer.optimizers[0]
    return [t.clone() for p in optimizer.state for t in (
        optimizer.state[p]["exp_avg"], optimizer.state[p]["exp_avg_sq"])]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    full_record, full_crops = Record(), Positions()
    full = fit(load_run_config("tiny_cpu.yaml", _overrides(root / "full")),
               callbacks=[full_record, full_crops])
    ckpt = root / "full" / "checkpoints" / f"gpfm-step={CUT:08d}.ckpt"
    assert ckpt.is_file(), sorted((root / "full" / "checkpoints").iterdir())
    resumed_record, resumed_crops = Record(), Positions()
    resumed = fit(load_run_config("tiny_cpu.yaml", _overrides(root / "resumed")),
                  ckpt_path=str(ckpt), callbacks=[resumed_record, resumed_crops])
    return {"root": root, "ckpt": ckpt, "full": full, "resumed": resumed,
            "full_record": full_record, "resumed_record": resumed_record,
            "full_crops": full_crops, "resumed_crops": resumed_crops}


def test_the_resumed_run_trains_only_the_remaining_steps(runs):
    assert runs["full"].trainer.global_step == STEPS
    assert runs["resumed"].trainer.global_step == STEPS
    assert sorted(runs["resumed_record"].values) == list(range(CUT, STEPS))


def test_weights_centers_and_optimizer_match_the_uninterrupted_run(runs):
    full, resumed = _state(runs["full"]), _state(runs["resumed"])
    assert full.keys() == resumed.keys()
    assert any("center" in k for k in full)
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], atol=1e-6, rtol=0, msg=key)
    # The run really moved: the teacher differs from the checkpointed one.
    saved = torch.load(runs["ckpt"], map_location="cpu", weights_only=True)["state_dict"]
    key = "teacher.backbone.blocks.1.mlp.fc2.weight"
    assert not torch.allclose(saved[f"distiller.{key}"], full[key], atol=1e-6)
    for a, b in zip(_adam(runs["resumed"]), _adam(runs["full"]), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_data_and_schedules_continue_where_they_stopped(runs):
    full_crops, resumed_crops = runs["full_crops"].seen, runs["resumed_crops"].seen
    for step in range(CUT, STEPS):
        assert torch.equal(full_crops[step], resumed_crops[step]), step
    assert not torch.equal(full_crops[CUT], full_crops[0])
    full_values, resumed_values = runs["full_record"].values, runs["resumed_record"].values
    for step in range(CUT, STEPS):
        for key, value in full_values[step].items():
            assert resumed_values[step][key] == pytest.approx(value, abs=1e-6), (step, key)
    assert full_values[STEPS - 1]["lr"] != full_values[CUT]["lr"]
    full_dm, resumed_dm = runs["full"].datamodule, runs["resumed"].datamodule
    assert full_dm.state_dict() == resumed_dm.state_dict()
    assert full_dm.state_dict()["sampler"]["position"] == STEPS * 4


def test_checkpoint_holds_rng_sampler_and_config_and_loads_without_pickle(runs):
    ckpt = torch.load(runs["ckpt"], map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == CUT
    assert len(ckpt["gpfm"]["rng"]) == 1 and ckpt["gpfm"]["rng"][0]["torch"].dtype == torch.uint8
    assert ckpt["GPFMDataModule"]["sampler"]["position"] == CUT * 4
    assert ckpt["hyper_parameters"]["backbone"]["arch"] == "vit_small_patch14_dinov2"
    assert ckpt["datamodule_hyper_parameters"]["tiling"]["mpp"] == 0.5


def test_cli_resume_from_last(runs, capsys):
    root = runs["root"] / "cli"
    args = ["fit", "--config", "tiny_cpu.yaml"]
    args += set_args(_overrides(root, **{"trainer.max_steps": 2}))
    assert main(args + ["--ckpt-path", "last"]) == 2
    assert "holds no checkpoint yet" in capsys.readouterr().err
    assert main(args) == 0
    assert (root / "checkpoints" / "last.ckpt").is_file()
    # Checkpoints every 3 steps: step 3, and the final step 5 although 5 is no multiple of 3.
    longer = [a.replace("trainer.max_steps=2", "trainer.max_steps=5") for a in args]
    assert main(longer + ["--ckpt-path", "last"]) == 0
    out = capsys.readouterr().out
    assert "trained to step 5" in out
    names = sorted(p.name for p in (root / "checkpoints").iterdir())
    assert "gpfm-step=00000003.ckpt" in names and "gpfm-step=00000005.ckpt" in names
    last = torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 5
    assert f"gpfm-train export {root / 'checkpoints' / 'last.ckpt'} --out" in out

    # A fresh start in the same folder would write last-v1.ckpt beside the old run's last.ckpt.
    assert main(longer) == 2
    assert "checkpoints of an earlier run" in capsys.readouterr().err
    truncated = root / "truncated.ckpt"
    truncated.write_bytes((root / "checkpoints" / "last.ckpt").read_bytes()[:4096])
    exported = root / "weights.pth"  # a torch zip archive, but weights, not a checkpoint
    torch.save({"model": torch.zeros(2)}, exported)
    for bad in (truncated, Path(__file__), exported):
        assert main(longer + ["--ckpt-path", str(bad)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "not a readable training checkpoint" in err[0], err
    assert main(longer + ["--ckpt-path", str(root)]) == 2
    assert "is a folder; pass a .ckpt file" in capsys.readouterr().err


def test_resume_refuses_another_network_or_run_and_names_changed_schedules(runs, capsys):
    root = runs["root"] / "checks"
    args = ["fit", "--config", "tiny_cpu.yaml", *set_args(_overrides(root))]
    assert main(args) == 0
    capsys.readouterr()
    other = [a.replace("trainer.max_steps=6", "model.backbone.drop_path_rate=0.1") for a in args]
    wider = other + ["--set", "model.distill.head_bottleneck_dim=16"]
    assert main(wider + ["--ckpt-path", "last"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds another network than this configuration" in err[0], err
    assert "model.distill.head_bottleneck_dim (" in err[0]
    # A checkpoint of another folder into this run's folder would overwrite its last.ckpt.
    assert main(args + ["--ckpt-path", str(runs["ckpt"])]) == 2
    assert "holds the checkpoints of another run" in capsys.readouterr().err
    # A run killed hard between saves may leave step checkpoints but no last.ckpt.
    (root / "checkpoints" / "last.ckpt").unlink()
    longer = args + ["--set", "trainer.max_steps=7", "--set", "model.schedule.epochs=5"]
    assert main(longer + ["--ckpt-path", "last"]) == 0
    out = capsys.readouterr().out
    assert f"resuming from gpfm-step={STEPS:08d}.ckpt" in out
    assert f"warning: resuming at step {STEPS} with changed options: model.schedule.epochs " \
           "(4 -> 5)" in out and "trained to step 7" in out
    assert main(longer + ["--ckpt-path", "last"]) == 0
    assert "the run had already reached step 7 (trainer.max_steps 7); nothing to train" in \
        capsys.readouterr().out


def test_a_moved_run_folder_resumes_twice_into_its_own_last_ckpt(runs, capsys):
    # Lightning forgets its checkpoint bookkeeping when the folder changes: it then wrote
    # last-v1.ckpt beside a stale last.ckpt (the one `gpfm-train export .../last.ckpt` reads)
    # and never pruned the steps saved before the move.
    before, moved = runs["root"] / "before-move", runs["root"] / "moved"

    def args(root: Path, steps: int) -> list[str]:
        return ["fit", "--config", "tiny_cpu.yaml", *set_args(_overrides(root, **{
            "trainer.max_steps": steps, "trainer.checkpoint_every_n_steps": 1,
            "trainer.keep_checkpoints": 2}))]

    assert main(args(before, 2)) == 0
    before.rename(moved)
    for steps in (4, STEPS):
        assert main(args(moved, steps) + ["--ckpt-path", "last"]) == 0
        assert f"trained to step {steps}" in capsys.readouterr().out
    checkpoints = moved / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        f"gpfm-step={STEPS - 1:08d}.ckpt", f"gpfm-step={STEPS:08d}.ckpt", "last.ckpt"]
    last = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == STEPS
    assert not before.exists()


def test_the_progress_bar_counts_the_run_s_steps_from_where_it_resumes(runs, capsys):
    # Lightning's own bar said "Epoch 1/-2" and "6/3" here (its epoch means nothing for an
    # infinite stream; steps done from zero against steps left).
    fit(load_run_config("tiny_cpu.yaml", _overrides(runs["root"] / "bar",
                                                    **{"trainer.enable_progress_bar": True})),
        ckpt_path=str(runs["ckpt"]))
    err = capsys.readouterr().err
    assert f"{CUT}/{STEPS} [" in err and f"{STEPS}/{STEPS} [" in err, err[-500:]
    assert "loss=" in err and "Epoch" not in err and "-2" not in err


class CtrlC(Callback):
    """Press Ctrl-C (SIGINT to this process) ``presses`` times at the end of step ``step``."""

    def __init__(self, step: int, presses: int = 1):
        self.step, self.presses = step, presses

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            for _ in range(self.presses):
                os.kill(os.getpid(), signal.SIGINT)


def test_ctrl_c_saves_the_current_step_and_resumes_exactly(runs, capsys, monkeypatch):
    import gpfm_train.cli as cli

    root = runs["root"] / "ctrl-c"
    args = ["fit", "--config", "tiny_cpu.yaml", *set_args(_overrides(root))]
    uninterrupted = cli.fit
    monkeypatch.setattr(cli, "fit", lambda run, ckpt: uninterrupted(run, ckpt, [CtrlC(1)]))
    assert main(args) == 130
    out = capsys.readouterr().out
    # Step 2 was in flight and is kept although no periodic checkpoint falls on it (every 3).
    last = root / "checkpoints" / "last.ckpt"
    assert f"stopped after step 2, saved as {last}" in out and "--ckpt-path last" in out
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 2
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = uninterrupted(load_run_config("tiny_cpu.yaml", _overrides(root)), "last")
    assert not [w for w in caught if "exists and is not empty" in str(w.message)]
    assert resumed.trainer.global_step == STEPS
    full, again = _state(runs["full"]), _state(resumed)
    for key in full:
        torch.testing.assert_close(again[key], full[key], atol=1e-6, rtol=0, msg=key)


def test_a_second_ctrl_c_aborts_and_names_the_checkpoint_to_resume_from(runs, capsys,
                                                                         monkeypatch):
    # Lightning ended with "Detected KeyboardInterrupt ..." and status 1, SIGINT left ignored.
    import gpfm_train.cli as cli

    root = runs["root"] / "ctrl-c-twice"
    args = ["fit", "--config", "tiny_cpu.yaml", *set_args(_overrides(root))]
    uninterrupted = cli.fit
    monkeypatch.setattr(cli, "fit", lambda run, ckpt: uninterrupted(run, ckpt, [CtrlC(4, presses=2)]))
    assert main(args) == 130
    out = capsys.readouterr().out
    last = root / "checkpoints" / "last.ckpt"
    assert f"aborted by a second Ctrl-C: the step in flight is lost; resume from {last}" in out
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == CUT
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
