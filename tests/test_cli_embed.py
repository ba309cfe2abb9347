"""`gpfm embed` and `gpfm models` end to end on the bundled sample slide (CPU, small models)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from napari_gpfm.cli import main
from napari_gpfm.embedding.h5io import read_h5
from napari_gpfm.embedding.store import EmbeddingStore
from napari_gpfm.errors import ParameterError, StoreError

ARCH = "test_vit"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--mpp", "1.0", "--read-size", "160", "--device", "cpu", "--batch-size", "8",
        "--quiet"]
TOL = {"atol": 2e-3, "rtol": 2e-3}


def _random_weights(path, arch=ARCH, seed=0, **kwargs):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = timm.create_model(arch, num_classes=0, **kwargs)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return _random_weights(tmp_path_factory.mktemp("w") / "tiny.safetensors")


@pytest.fixture(scope="module")
def other_weights(tmp_path_factory):
    return _random_weights(tmp_path_factory.mktemp("w2") / "tiny2.safetensors", seed=1)


def _embed(*argv):
    return main(["embed", *map(str, argv)])


def _only_store(out):
    stores = sorted(out.rglob("*.zarr"))
    assert len(stores) == 1, stores
    return stores[0]


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error: ")
    return err[0]


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory, sample_slide_path, weights):
    """One uninterrupted `gpfm embed` run: (output folder, return code, stdout)."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("clean") / "out"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = _embed(sample_slide_path, "--model", f"timm:{ARCH}", "--weights", weights,
                    "--out", out, "--h5", *FAST)
    return out, rc, buf.getvalue()


def test_embed_writes_a_store_then_skips_it(clean_run, sample_slide_path, weights, capsys):
    out, rc, text = clean_run
    assert rc == 0
    assert "24/24 tiles (24 new)" in text and "tiles/s" in text
    path = _only_store(out)
    assert path.parent.name == "CMU-1-Small-Region"
    store = EmbeddingStore.open(path)
    assert store.is_complete and store.features.shape == (24, 64)
    assert store.attrs["encoder_name"] == f"timm:{ARCH}" and store.attrs["target_mpp"] == 1.0
    h5 = read_h5(path.with_suffix(".h5"))
    np.testing.assert_array_equal(h5.coords, store.coords)
    np.testing.assert_allclose(h5.features, store.features)

    assert _embed(sample_slide_path, "--model", f"timm:{ARCH}", "--weights", weights,
                  "--out", out, *FAST) == 0
    assert "already complete" in capsys.readouterr().out


def test_limit_then_resume(tmp_path, sample_slide_path, weights, capsys):
    out = tmp_path / "out"
    args = [sample_slide_path, "--model", f"timm:{ARCH}", "--weights", weights, "--out", out,
            *FAST]
    assert _embed(*args, "--limit", "5") == 0
    assert "5/24 tiles (5 new)" in capsys.readouterr().out
    assert _embed(*args) == 0
    assert "24/24 tiles (19 new, 5 resumed)" in capsys.readouterr().out


@pytest.mark.slow
def test_sigkill_then_rerun_resumes_without_recomputing(tmp_path, sample_slide_path, weights,
                                                        clean_run, capsys):
    """The real crash: the process is killed with SIGKILL after its first store writes."""
    args = [str(sample_slide_path), "--model", f"timm:{ARCH}", "--weights", str(weights),
            "--mpp", "1.0", "--read-size", "160", "--device", "cpu", "--quiet"]
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    log = open(tmp_path / "killed.log", "w+")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(
        [sys.executable, "-m", "napari_gpfm.cli", "embed", *args, "--out", str(out),
         "--batch-size", "1", "--workers", "1"],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 240
        n_done = 0
        while time.monotonic() < deadline and proc.poll() is None:
            stores = list(out.rglob("*.zarr")) if out.exists() else []
            if stores:
                try:
                    n_done = EmbeddingStore.open(stores[0]).n_done
                except StoreError:  # metadata of a store being created
                    n_done = 0
                if n_done >= 1:
                    break
            time.sleep(0.05)
        assert proc.poll() is None, (tmp_path / "killed.log").read_text()
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)
        log.close()
    assert proc.returncode == -signal.SIGKILL
    path = _only_store(out)
    killed = EmbeddingStore.open(path)
    total, done_at_kill = killed.n_tiles, killed.n_done
    assert 1 <= done_at_kill < total == 24
    assert killed.attrs["complete"] is False
    assert path.with_name(path.name + ".lock").exists()  # left by the killed process

    assert _embed(*args, "--out", out, "--batch-size", "8") == 0
    resumed = capsys.readouterr().out
    m = re.search(r"(\d+)/(\d+) tiles \((\d+) new, (\d+) resumed\)", resumed)
    assert m, resumed
    assert int(m[1]) == int(m[2]) == total
    assert int(m[3]) == total - done_at_kill and int(m[4]) == done_at_kill

    clean = EmbeddingStore.open(_only_store(clean_run[0]))
    np.testing.assert_array_equal(EmbeddingStore.open(path).coords, clean.coords)
    np.testing.assert_allclose(EmbeddingStore.open(path).features, clean.features, **TOL)


@pytest.mark.slow
def test_vit_small_dinov2(tmp_path, sample_slide_path, capsys):
    arch = "vit_small_patch14_dinov2"
    w = _random_weights(tmp_path / "vits.safetensors", arch=arch, img_size=224)
    out = tmp_path / "out"
    rc = _embed(sample_slide_path, "--model", f"timm:{arch}", "--weights", w, "--mpp", "2.0",
                "--out", out, "--device", "cpu", "--quiet")
    assert rc == 0, capsys.readouterr().err
    store = EmbeddingStore.open(_only_store(out))
    assert store.is_complete and store.features.shape == (3, 384)
    assert store.attrs["preprocessing"]["input_size"] == 224
    assert np.isfinite(store.features).all() and store.features.std() > 0


def test_store_made_with_other_weights_is_refused(tmp_path, sample_slide_path, weights,
                                                  other_weights, capsys):
    out = tmp_path / "out"
    base = [sample_slide_path, "--model", f"timm:{ARCH}", "--out", out, *FAST, "--limit", "2"]
    assert _embed(*base, "--weights", weights) == 0
    capsys.readouterr()
    assert _embed(*base, "--weights", other_weights) == 2
    line = _error_line(capsys)
    assert "weights file" in line and "--overwrite" in line
    # A float32 request would be cast into the float16 store without a word.
    assert _embed(*base, "--weights", weights, "--dtype", "float32") == 2
    assert "stores float16 features, --dtype float32" in _error_line(capsys)
    assert _embed(*base, "--weights", other_weights, "--overwrite") == 0
    store = EmbeddingStore.open(_only_store(out))
    assert store.n_done == 2 and store.attrs["encoder"]["weights_path"] == str(other_weights)


def test_slides_of_the_same_name_never_share_a_store(tmp_path, sample_slide_path, weights,
                                                     capsys):
    # One folder per patient, every slide called slide.svs: a common layout.
    first, second = tmp_path / "p1" / "slide.svs", tmp_path / "p2" / "slide.svs"
    for path in (first, second):
        path.parent.mkdir()
    shutil.copy(sample_slide_path, first)
    shutil.copy(REPO + "/data/extra-he/openslide_os1_crop/OS-1-detail.ome.tif", second)
    out = tmp_path / "out"
    base = ["--model", f"timm:{ARCH}", "--weights", weights, "--out", out, *FAST]
    assert _embed(first.parent, second.parent, *base) == 2
    line = _error_line(capsys)
    assert str(first) in line and str(second) in line and "different --out" in line
    assert not out.exists()

    # Embedded one after the other, the second must not pass for the first one's store, and the
    # message must not send the user to --overwrite alone.
    assert _embed(first, *base, "--limit", "2") == 0
    capsys.readouterr()
    assert _embed(second, *base) == 2
    line = _error_line(capsys)
    assert f"embeddings of {first.resolve()}" in line and "another --out folder" in line
    assert EmbeddingStore.open(_only_store(out)).attrs["slide_name"] == "slide.svs"


def test_outputs_that_cannot_be_written_are_one_line(tmp_path, sample_slide_path, capsys):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a folder\n")
    # A file where the output folder should be: caught as the file system refuses it.
    assert _embed(sample_slide_path, "--out", a_file, *FAST) == 2
    line = _error_line(capsys)
    assert str(a_file) in line and "Not a directory" in line
    if not os.path.isdir("/proc/self"):
        return
    # A virtual folder passes every existence check and refuses files: caught before the work.
    assert main(["tiles", str(sample_slide_path), "--out", "/proc/grid.csv"]) == 2
    assert "cannot write the tile grid to /proc/grid.csv" in _error_line(capsys)
    folder = tmp_path / "grid"
    folder.mkdir()
    assert main(["tiles", str(sample_slide_path), "--out", str(folder)]) == 2
    assert "it is a folder" in _error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid", "notes.txt"]


def test_user_errors_are_one_line_and_exit_2(tmp_path, sample_slide_path, weights, capsys):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 100)
    assert _embed(sample_slide_path, "--model", f"timm:{ARCH}", "--weights", garbage,
                  *FAST) == 2
    assert "garbage.safetensors" in _error_line(capsys)

    assert _embed(sample_slide_path, "--model", "gpfmm", *FAST) == 2
    assert "did you mean 'gpfm'" in _error_line(capsys)
    assert _embed(sample_slide_path, "--model", "timm:not_a_real_net", *FAST) == 2
    assert "not_a_real_net" in _error_line(capsys)

    broken = tmp_path / "broken.svs"
    broken.write_text("this is not a slide\n")
    assert _embed(broken, "--model", f"timm:{ARCH}", "--weights", weights, "--out",
                  tmp_path / "o", *FAST) == 2
    assert "broken.svs" in _error_line(capsys)

    empty = tmp_path / "empty"
    empty.mkdir()
    assert _embed(empty, "--model", f"timm:{ARCH}", "--weights", weights, *FAST) == 2
    assert "holds no slide files" in _error_line(capsys)
    # A folder of folders: the error names those that hold slides, and naming them all
    # (folder/*/) skips the ones without.
    from napari_gpfm.cli.embed import expand_slides

    (empty / "scans").mkdir()
    (empty / "scans" / "a.svs").write_bytes(b"")
    (empty / "notes").mkdir()
    (empty / "notes" / "read.me").write_text("")
    with pytest.raises(ParameterError) as info:
        expand_slides([str(empty)])
    assert f"{empty / 'scans'}/" in str(info.value) and "notes" not in str(info.value)
    assert expand_slides([str(empty / "notes"), str(empty / "scans")]) == [
        empty / "scans" / "a.svs"]
    assert f"{empty / 'notes'} holds no slide files; skipped" in capsys.readouterr().err

    assert _embed(sample_slide_path, "--model", f"timm:{ARCH}", "--weights", weights,
                  *FAST, "--size", "224") == 2
    assert "takes 160 px" in _error_line(capsys)
    if torch.cuda.is_available():
        return
    assert _embed(sample_slide_path, "--model", f"timm:{ARCH}", "--weights", weights,
                  "--device", "cuda") == 2
    assert "no CUDA GPU" in _error_line(capsys)


def test_default_model_until_built(sample_slide_path, capsys, tmp_path, monkeypatch):
    from napari_gpfm.encoders import default_model

    # a checkout whose embedded model has not been built (its weights folder is empty)
    monkeypatch.setattr(default_model, "PACKAGE_WEIGHTS_DIR", tmp_path)
    assert _embed(sample_slide_path, "--device", "cpu") == 2
    assert "not built" in _error_line(capsys)


def test_a_broken_slide_does_not_stop_the_others(tmp_path, sample_slide_path, weights, capsys):
    folder = tmp_path / "slides"
    folder.mkdir()
    shutil.copy(sample_slide_path, folder / "good.svs")
    (folder / "bad.svs").write_bytes(b"%PDF-1.4 not a slide")
    (folder / "notes.txt").write_text("ignored: not a slide suffix")
    out = tmp_path / "out"
    rc = _embed(folder, "--model", f"timm:{ARCH}", "--weights", weights, "--out", out, *FAST)
    assert rc == 1
    captured = capsys.readouterr()
    assert "error: bad.svs" in captured.err and "PDF" in captured.err
    rows = {line.split()[0]: line.split()[1] for line in captured.out.splitlines()
            if line.startswith(("good.svs", "bad.svs")) and ":" not in line.split()[0]}
    assert rows == {"bad.svs": "failed", "good.svs": "done"}
    assert "2 slide(s): 1 ok, 1 failed" in captured.out
    assert EmbeddingStore.open(_only_store(out)).is_complete


def test_models_lists_registry_and_found_weights(tmp_path, capsys):
    assert main(["models", "--models-dir", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert re.search(r"^gpfm\s+1024\s+256 px @ 0.5\s+not found\s+CC-BY-NC-ND", text, re.M)
    assert "default" in text
    (tmp_path / "gpfm.safetensors").write_bytes(b"placeholder weights")
    assert main(["models", "--models-dir", str(tmp_path), "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["gpfm"]["weights"] == str(tmp_path / "gpfm.safetensors")
    assert rows["gpfm"]["embed_dim"] == 1024 and rows["uni"]["weights"] is None
