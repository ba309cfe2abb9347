"""The packaged tiny_cpu.yaml shrunk to seconds of training: the base every trainer test uses.

:func:`tiny_overrides` gives ``(key, value)`` overrides for ``load_run_config``;
:func:`set_args` turns them into ``--set key=value`` arguments for the command line.
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "napari_gpfm" / "data" / "CMU-1-Small-Region.svs"
TILES = REPO / "data" / "extra-he" / "mopadi_examples"


def tiny_overrides(root: Path, **changes: object) -> list[tuple[str, object]]:
    """A 2-block 48-d ViT on 56 px crops of the sample and the loose tiles, 4 tiles a step,
    run under ``root``; ``changes`` (dotted keys) override or add to it."""
    pairs: dict[str, object] = {
        "model.backbone.kwargs": {"embed_dim": 48, "depth": 2, "num_heads": 2},
        "model.backbone.img_size": 56,
        "model.distill.n_local": 2,
        "model.distill.out_dim": 256,
        "model.distill.head_hidden_dim": 64,
        "model.distill.head_bottleneck_dim": 32,
        "data.crops.global_crops_size": 56,
        "data.crops.local_crops_size": 28,
        "data.crops.local_crops_number": 2,
        "data.batch_size": 4,
        "data.num_workers": 0,
        "data.sources": [{"slides": [str(SAMPLE)]}, {"tile_folder": str(TILES)}],
        "trainer.default_root_dir": str(root),
        "trainer.enable_progress_bar": False,
        "trainer.log_every_n_steps": 1,
    }
    pairs.update(changes)
    return list(pairs.items())


def flow(value: object) -> str:
    """A YAML flow rendering for --set (lists/dicts of plain values)."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {flow(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(flow(v) for v in value) + "]"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def set_args(pairs: list[tuple[str, object]]) -> list[str]:
    """``--set key=value`` arguments for ``gpfm-train fit`` (values rendered as YAML)."""
    args: list[str] = []
    for key, value in pairs:
        args += ["--set", f"{key}={flow(value)}"]
    return args
