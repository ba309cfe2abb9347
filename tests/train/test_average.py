"""`gpfm-train average`: the mean of exported teachers is one more loadable export."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from gpfm_train.average import average_exports
from gpfm_train.cli import main
from napari_gpfm.encoders import load_encoder
from napari_gpfm.encoders.default_model import default_files, write_random_twin
from napari_gpfm.errors import ParameterError, WeightsError


@pytest.fixture()
def exports(tmp_path):
    """Two exports of the embedded default network with different random weights."""
    _, shipped = default_files()
    folders = [tmp_path / f"seed{seed}" for seed in (1, 2)]
    for folder in folders:
        folder.mkdir()
    return [write_random_twin(shipped, folder, seed=seed)
            for seed, folder in zip((1, 2), folders, strict=True)]


def test_the_average_is_the_elementwise_mean_and_loads_as_an_encoder(exports, tmp_path):
    out = average_exports(exports, tmp_path / "mean" / "soup.safetensors")
    a, b, mean = (load_file(str(p)) for p in (*exports, out))
    assert set(mean) == set(a)
    for key in a:
        assert mean[key].dtype == a[key].dtype
        torch.testing.assert_close(mean[key], (a[key].double() + b[key].double()).div(2).float())
    description = json.loads(out.with_suffix(".json").read_text())
    assert "uniform average of 2 exported teachers" in description["notes"]

    # Loaded as an encoder, the average computes what its first input computes once that
    # network is given the mean weights.
    tiles = np.random.default_rng(0).integers(0, 255, (2, 224, 224, 3), dtype=np.uint8)
    averaged = load_encoder("default", weights=out)
    by_hand = load_encoder("default", weights=exports[0])
    with torch.no_grad():
        before = by_hand.forward(by_hand.preprocess_on_device(tiles))["cls"]
        by_hand.backbone.load_state_dict(mean)
        expected = by_hand.forward(by_hand.preprocess_on_device(tiles))["cls"]
        got = averaged.forward(averaged.preprocess_on_device(tiles))["cls"]
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, before, atol=1e-3)


def test_other_networks_and_bad_files_are_named(exports, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    bigger = other / "bigger.safetensors"
    bigger.write_bytes(exports[1].read_bytes())
    described = json.loads(exports[1].with_suffix(".json").read_text())
    described["model_kwargs"]["depth"] += 1
    bigger.with_suffix(".json").write_text(json.dumps(described))
    with pytest.raises(WeightsError, match=r"bigger.safetensors is another network.*model_kwargs"):
        average_exports([exports[0], bigger], tmp_path / "x.safetensors")

    pruned = other / "pruned.safetensors"
    state = load_file(str(exports[1]))
    state.pop(sorted(state)[0])
    save_file(state, str(pruned))
    pruned.with_suffix(".json").write_text(exports[1].with_suffix(".json").read_text())
    with pytest.raises(WeightsError, match="pruned.safetensors: its tensors differ"):
        average_exports([exports[0], pruned], tmp_path / "x.safetensors")

    # A damaged file (cut short, or not safetensors at all) is one line that names it.
    for name, data in (("cut.safetensors", exports[1].read_bytes()[:3000]),
                       ("text.safetensors", b"not weights")):
        bad = other / name
        bad.write_bytes(data)
        bad.with_suffix(".json").write_text(exports[1].with_suffix(".json").read_text())
        with pytest.raises(WeightsError, match=name):
            average_exports([exports[0], bad], tmp_path / "x.safetensors")

    diverged = other / "diverged.safetensors"
    state = load_file(str(exports[1]))
    state["cls_token"][0, 0, 0] = float("nan")
    save_file(state, str(diverged))
    diverged.with_suffix(".json").write_text(exports[1].with_suffix(".json").read_text())
    with pytest.raises(WeightsError, match=r"diverged.safetensors holds NaN.*\(cls_token\)"):
        average_exports([exports[0], diverged], tmp_path / "x.safetensors")

    with pytest.raises(ParameterError, match="at least two"):
        average_exports(exports[:1], tmp_path / "x.safetensors")
    with pytest.raises(ParameterError, match="is one of the inputs"):
        average_exports(exports, exports[0])
    with pytest.raises(ParameterError, match="given twice"):
        average_exports([exports[0], exports[0]], tmp_path / "x.safetensors")
    with pytest.raises(ParameterError, match="written as .safetensors"):
        average_exports(exports, tmp_path / "x.pth")
    assert not (tmp_path / "x.safetensors").exists()


def test_cli(exports, tmp_path, capsys):
    out = tmp_path / "soup.safetensors"
    assert main(["average", *map(str, exports), "--out", str(out)]) == 0
    assert out.is_file() and "mean of 2 teachers" in capsys.readouterr().out
    assert main(["average", str(exports[0]), str(tmp_path / "gone.safetensors"),
                 "--out", str(out)]) == 2
    assert "gone.safetensors: no such file" in capsys.readouterr().err
