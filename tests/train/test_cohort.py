"""`gpfm-train embed`: a manifest's slides embedded across processes, into `gpfm embed`'s stores."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gpfm_train.cli import main as train_main
from gpfm_train.cohort import assign_slides, read_cohort
from gpfm_train.data.manifests import SlideRow, write_manifest
from napari_gpfm.cli import main as gpfm_main
from napari_gpfm.embedding.store import IDENTITY_LABELS, EmbeddingStore
from napari_gpfm.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "napari_gpfm" / "data" / "CMU-1-Small-Region.svs"
OS1 = REPO / "data" / "extra-he" / "openslide_os1_crop" / "OS-1-detail.ome.tif"
TILING = ["--mpp", "1.0", "--read-size", "160", "--batch-size", "8"]
TOL = {"atol": 2e-3, "rtol": 2e-3}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Three good slides (24, 24 and 1 tiles), a truncated one, a random-weight encoder and
    the stores `gpfm embed` makes for the good slides."""
    import timm
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("cohort")
    copy = root / "slides" / "cmu_copy.svs"
    copy.parent.mkdir()
    shutil.copyfile(SAMPLE, copy)
    broken = root / "slides" / "broken.svs"
    broken.write_bytes(SAMPLE.read_bytes()[:100_000])
    torch.manual_seed(0)
    weights = root / "test_vit.safetensors"
    model = timm.create_model("test_vit", num_classes=0)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))

    good = [SAMPLE, copy, OS1]
    reference = root / "reference"
    rc = gpfm_main(["embed", *map(str, good), "--model", "timm:test_vit", "--weights",
                    str(weights), "--out", str(reference), "--device", "cpu", "--quiet",
                    *TILING])
    assert rc == 0

    def manifest(name, slides):
        rows = [SlideRow(str(p), None, n, "ee46696ade4f") for p, n in slides]
        return write_manifest(rows, root / name)

    sizes = [(SAMPLE, 24), (copy, 24), (OS1, 1)]
    return {
        "root": root,
        "weights": weights,
        "reference": reference,
        "good": manifest("good.csv", sizes),
        "with_broken": manifest("broken.csv", [*sizes, (broken, 24)]),
        "broken": broken,
        "slides": good,
    }


def _args(cohort, manifest, out, *extra):
    return ["embed", str(manifest), "--model", "timm:test_vit", "--weights",
            str(cohort["weights"]), "--out", str(out), *TILING, *extra]


def _stores(folder: Path) -> dict[str, Path]:
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*.zarr"))}


def _assert_same_stores(out: Path, reference: Path) -> None:
    ours, theirs = _stores(out), _stores(reference)
    assert ours.keys() == theirs.keys() and len(ours) == 3
    for name, path in ours.items():
        a, b = EmbeddingStore.open(path), EmbeddingStore.open(theirs[name])
        assert a.is_complete and b.is_complete, name
        for key in IDENTITY_LABELS:
            assert a.attrs[key] == b.attrs[key], (name, key)
        np.testing.assert_array_equal(a.coords, b.coords)
        np.testing.assert_allclose(a.features, b.features, **TOL)
        assert a.features.dtype == b.features.dtype


def test_assignment_gives_each_slide_to_exactly_one_rank():
    sizes = [24, 24, 1, 300, 7, 7, 0]
    for world in (1, 2, 3, 8):
        plan = assign_slides(sizes, world)
        assert plan == assign_slides(sizes, world)  # the same plan on every rank
        assert sorted(i for share in plan for i in share) == list(range(len(sizes)))
    assert assign_slides(sizes, 2) == [[3], [0, 1, 2, 4, 5, 6]]
    assert assign_slides([24, 24, 1], 2) == [[0, 2], [1]]


def test_one_process_matches_gpfm_embed_and_isolates_a_broken_slide(cohort, tmp_path, capsys):
    out = tmp_path / "one"
    rc = train_main(_args(cohort, cohort["with_broken"], out, "--devices", "1"))
    printed = capsys.readouterr().out
    assert rc == 1  # one slide failed, the others finished
    assert "4 slide(s): 3 ok, 1 failed" in printed and "broken.svs" in printed
    _assert_same_stores(out, cohort["reference"])
    failures = json.loads((out / "_cohort" / "failures-rank0.json").read_text())
    assert [Path(f["slide"]).name for f in failures] == ["broken.svs"]
    assert failures[0]["status"] == "failed" and failures[0]["error"]

    # Again: complete stores are skipped, the broken slide fails again on its own.
    assert train_main(_args(cohort, cohort["with_broken"], out, "--devices", "1")) == 1
    outcomes = json.loads((out / "_cohort" / "outcomes-rank0.json").read_text())
    status = {Path(o["slide"]).name: o["status"] for o in outcomes}
    assert status == {"CMU-1-Small-Region.svs": "skipped", "cmu_copy.svs": "skipped",
                      "OS-1-detail.ome.tif": "skipped", "broken.svs": "failed"}
    # Another precision than the stores hold is refused per slide, not skipped in silence.
    capsys.readouterr()
    assert train_main(_args(cohort, cohort["with_broken"], out, "--devices", "1",
                            "--dtype", "float32")) == 1
    outcomes = json.loads((out / "_cohort" / "outcomes-rank0.json").read_text())
    assert all(o["status"] == "failed" for o in outcomes)
    assert "stores float16 features, --dtype float32" in capsys.readouterr().out


def test_partial_stores_resume_from_their_done_rows(cohort, tmp_path, capsys):
    out = tmp_path / "partial"
    one = write_manifest([SlideRow(str(SAMPLE), None, 24, "ee46696ade4f")], tmp_path / "one.csv")
    assert train_main(_args(cohort, one, out, "--limit", "5")) == 0
    (name, path), = _stores(out).items()
    partial = EmbeddingStore.open(path)
    assert partial.n_done == 5 and not partial.is_complete
    assert "partial" in capsys.readouterr().out
    assert train_main(_args(cohort, one, out)) == 0
    outcomes = json.loads((out / "_cohort" / "outcomes-rank0.json").read_text())
    assert [(o["status"], o["computed"]) for o in outcomes] == [("done", 19)]
    done, reference = EmbeddingStore.open(path), EmbeddingStore.open(
        _stores(cohort["reference"])[name])
    assert done.is_complete
    np.testing.assert_allclose(done.features, reference.features, **TOL)


def test_ctrl_c_keeps_the_finished_work_and_says_how_to_resume(cohort, tmp_path, capsys,
                                                               monkeypatch):
    import signal

    import gpfm_train.cohort as cohort_module

    real = cohort_module.embed_one_slide
    slides_done = []

    def then_ctrl_c(*args, **kwargs):
        outcome = real(*args, **kwargs)
        slides_done.append(outcome)
        signal.raise_signal(signal.SIGINT)  # the user's Ctrl-C, once the first slide is done
        return outcome

    monkeypatch.setattr(cohort_module, "embed_one_slide", then_ctrl_c)
    out = tmp_path / "stopped"
    assert train_main(_args(cohort, cohort["good"], out)) == 130
    printed = capsys.readouterr().out
    assert "interrupted: the tiles embedded so far are saved" in printed
    assert "run the same command again to resume" in printed
    (name, path), = _stores(out).items()
    assert len(slides_done) == 1 and EmbeddingStore.open(path).is_complete

    monkeypatch.setattr(cohort_module, "embed_one_slide", real)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C works again
    assert train_main(_args(cohort, cohort["good"], out)) == 0
    _assert_same_stores(out, cohort["reference"])


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_match_gpfm_embed_with_one_writer_per_slide(cohort, tmp_path):
    """Two ranks started side by side, as torchrun or srun start them (Lightning then joins
    them instead of launching its own processes)."""
    out = tmp_path / "two"
    port = str(_free_port())
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "PYTHONPATH": str(REPO), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": port, "NODE_RANK": "0", "LOCAL_RANK": str(rank),
               "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "gpfm_train.cli",
             *_args(cohort, cohort["good"], out, "--devices", "2", "--workers", "1")],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ))
    results = [p.communicate(timeout=400) for p in procs]
    for proc, (_, err) in zip(procs, results, strict=True):
        assert proc.returncode == 0, err[-3000:]
    assert "3 slide(s): 3 ok, 0 failed" in results[0][0]
    assert "slide(s)" not in results[1][0]  # only rank 0 prints the summary
    _assert_same_stores(out, cohort["reference"])
    by_rank = {}
    for rank in (0, 1):
        outcomes = json.loads((out / "_cohort" / f"outcomes-rank{rank}.json").read_text())
        by_rank[rank] = sorted(Path(o["slide"]).name for o in outcomes)
        assert all(o["rank"] == rank and o["status"] == "done" for o in outcomes)
    assert by_rank == {0: ["CMU-1-Small-Region.svs", "OS-1-detail.ome.tif"],
                       1: ["cmu_copy.svs"]}
    assert not list((out / "_cohort").glob("failures-*.json"))


def test_manifest_problems_are_one_line(cohort, tmp_path, capsys):
    empty = tmp_path / "empty.csv"
    empty.write_text("slide_path,mpp,n_tiles,spec_id,source,organ,split\n")
    tiles = tmp_path / "tiles.csv"
    tiles.write_text(f"slide_path,x,y,tile_size_l0,mpp,read_size\n{SAMPLE},0,0,320,1.0,160\n")
    twin = write_manifest([SlideRow(str(SAMPLE), None, 1, "ee46696ade4f"),
                           SlideRow(str(tmp_path / "x" / SAMPLE.name), None, 1,
                                    "ee46696ade4f")], tmp_path / "twin.csv")
    twice = write_manifest([SlideRow(str(SAMPLE), None, 1, "ee46696ade4f")] * 2,
                           tmp_path / "twice.csv")
    for manifest, expected in ((empty, "lists no rows"), (tiles, "is a tiles file"),
                               (twin, "would share the store folder"),
                               (twice, "is already listed")):
        assert train_main(_args(cohort, manifest, tmp_path / "o")) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert train_main(["embed", str(cohort["good"]), "--model", "timm:test_vit", "--weights",
                       str(tmp_path / "none.safetensors"), "--out", str(tmp_path / "o")]) == 2
    assert "none.safetensors" in capsys.readouterr().err
    if not torch.cuda.is_available():  # asking for a GPU that is not there: one line too
        assert train_main(_args(cohort, cohort["good"], tmp_path / "o",
                                "--accelerator", "gpu")) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: --accelerator gpu"), err
    with pytest.raises(ConfigError, match="no slide with split"):
        read_cohort(cohort["good"], splits=["val"])


def test_slide_mpp_fills_in_only_a_missing_pixel_size(cohort, tmp_path, capsys):
    """A slide recording no pixel size fails alone (the message names --slide-mpp); with
    --slide-mpp it is embedded at that size, while the sample keeps its recorded 0.499."""
    from slide_factory import he_image, write_pyramid

    no_mpp = write_pyramid(tmp_path / "nompp.tif", he_image(640, 640, x=700, y=1900),
                           levels=1, mpp=None)
    manifest = write_manifest([SlideRow(str(no_mpp), None, 4, "ee46696ade4f"),
                               SlideRow(str(SAMPLE), None, 24, "ee46696ade4f")],
                              tmp_path / "mixed.csv")
    out = tmp_path / "o"
    assert train_main(_args(cohort, manifest, out)) == 1
    report = capsys.readouterr().out
    assert "1 failed" in report and "and gpfm-train embed" in report
    assert train_main(_args(cohort, manifest, out, "--slide-mpp", "0.5")) == 0
    stores = {p.parent.name: EmbeddingStore.open(p) for p in out.rglob("*.zarr")}
    assert stores["nompp"].attrs["slide_mpp"] == 0.5 and stores["nompp"].n_tiles > 0
    assert stores["CMU-1-Small-Region"].attrs["slide_mpp"] == pytest.approx(0.499, abs=1e-3)
    with pytest.raises(SystemExit) as stopped:  # refused by the parser, under its flag
        train_main(_args(cohort, manifest, out, "--slide-mpp", "0"))
    assert stopped.value.code == 2
    assert "argument --slide-mpp: 0 is not a pixel size" in capsys.readouterr().err
