"""scripts/judge_default_model.py: the card's rule for replacing the default, as code.

Run on the shipped model's own evaluation (docs/default-model-eval*.csv, written by
scripts/evaluate_default_model.py), and on copies of it with one cell moved by one query, so
that the rule's edges (a tie is not a win; top-k compares whole queries) are what is tested.
"""

from __future__ import annotations

import csv
import importlib.util
import re
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "docs/default-model-eval.csv"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


judge_script = _load("judge_default_model")
eval_script = _load("evaluate_default_model")


def _copy_shipped(tmp_path: Path) -> Path:
    out = tmp_path / "candidate.csv"
    shutil.copy(SHIPPED, out)
    shutil.copy(judge_script.stability_path(SHIPPED), judge_script.stability_path(out))
    return out


def _set_trained(path: Path, protocol: str, metric: str, value: float) -> None:
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        if row["encoder"] == judge_script.TRAINED and row["protocol"] == protocol:
            row[metric] = f"{value:.6f}"
    with path.open("w", newline="", encoding="utf-8") as f:
        out = csv.DictWriter(f, fieldnames=list(rows[0]))
        out.writeheader()
        out.writerows(rows)


def _shipped(protocol: str, metric: str) -> tuple[float, int]:
    value, _, n_eval = judge_script.read_main(SHIPPED)[(judge_script.TRAINED, protocol, metric)]
    return value, n_eval


def test_the_shipped_model_against_itself_ties_every_column_and_is_kept(capsys):
    assert judge_script.main([str(SHIPPED)]) == 1
    report = capsys.readouterr().out
    assert sum(line.endswith(" tie") for line in report.splitlines()) == 5
    assert "replace the default (beats it on all five columns, ties do not count): no" in report


def test_the_card_s_verdict_on_the_issue_s_bar_is_what_the_shipped_files_say():
    _, bar, lines = judge_script.judge(SHIPPED, SHIPPED)
    report = "\n".join(lines)
    card = (REPO / "docs/default-model.md").read_text(encoding="utf-8")
    # the card: the kNN win holds in all 8 settings, the linear-probe loss in all 8
    assert "The kNN win holds in all 8 settings" in card
    assert "the linear-probe loss holds in all 8" in card
    assert "main partition no, 0 of 8 settings" in report
    assert "kNN ahead of the histogram: 8 of 8 settings" in report
    assert not bar


def test_one_more_query_on_four_columns_and_a_tie_on_the_fifth_is_not_a_replacement(tmp_path):
    candidate = _copy_shipped(tmp_path)
    for protocol, metric in (("knn", "balanced_accuracy"), ("linear", "balanced_accuracy"),
                             ("augretrieval", "top1"), ("augretrieval", "mrr")):
        value, n_eval = _shipped(protocol, metric)
        _set_trained(candidate, protocol, metric, value + 1 / n_eval)
    # top-5 rewritten at another precision, the same 70 queries: still a tie
    value, n_eval = _shipped("augretrieval", "top5")
    _set_trained(candidate, "augretrieval", "top5", round(value, 3))
    replace, _, lines = judge_script.judge(candidate, SHIPPED)
    assert not replace
    assert re.search(r"aug\. top-5 .* tie$", "\n".join(lines), re.M)

    _set_trained(candidate, "augretrieval", "top5", value + 1 / n_eval)
    replace, _, lines = judge_script.judge(candidate, SHIPPED)
    assert replace, "\n".join(lines)


def test_a_result_without_its_stability_table_is_refused_by_name(tmp_path, capsys):
    candidate = tmp_path / "candidate.csv"
    shutil.copy(SHIPPED, candidate)
    assert judge_script.main([str(candidate)]) == 2
    err = capsys.readouterr().err
    assert "candidate-stability.csv: no such file" in err
    assert "evaluate_default_model.py" in err


def test_a_file_that_is_not_an_evaluation_is_refused(tmp_path, capsys):
    other = tmp_path / "slides.csv"
    other.write_text("path,mpp\na.svs,0.5\n", encoding="utf-8")
    assert judge_script.main([str(other)]) == 2
    assert "not a result of scripts/evaluate_default_model.py" in capsys.readouterr().err


def test_the_card_s_stability_table_and_its_csv_come_from_one_run():
    rows = {}
    with judge_script.stability_path(SHIPPED).open(newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            key = (r["encoder"], int(r["stride"]), int(r["tiles"]), r["probe"])
            rows.setdefault(key, []).append(float(r["balanced_accuracy"]))
    table = eval_script.stability_markdown(
        [{"encoder": e, "stride": s, "tiles": t, "probe": p, "cells": cells}
         for (e, s, t, p), cells in rows.items()])
    markdown = (REPO / "docs/default-model-eval.md").read_text(encoding="utf-8")
    assert table in markdown
    assert len(rows) == 12
    assert all(len(cells) == len(eval_script.PARTITIONS) for cells in rows.values())


def test_the_second_slide_s_tables_come_from_the_same_run_and_its_documented_labels():
    """The frozen section's tables (docs/default-model-eval.md, reported beside the card's
    bar) match their CSVs, and its tiles are the ones data/labels/README.md counts."""
    section_csv = judge_script.section_path(SHIPPED)
    with section_csv.open(newline="", encoding="utf-8") as f:
        main = list(csv.DictReader(f))
    rows = {}
    with judge_script.stability_path(section_csv).open(newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            key = (r["encoder"], int(r["stride"]), int(r["tiles"]), r["probe"])
            rows.setdefault(key, []).append(float(r["balanced_accuracy"]))
    markdown = (REPO / "docs/default-model-eval.md").read_text(encoding="utf-8")
    section = markdown[markdown.index("## A second slide"):]
    assert eval_script.stability_markdown(
        [{"encoder": e, "stride": s, "tiles": t, "probe": p, "cells": cells}
         for (e, s, t, p), cells in rows.items()]) in section
    linear = next(r for r in main if r["encoder"] == judge_script.TRAINED
                  and r["protocol"] == "linear")
    assert f"| {float(linear['balanced_accuracy']):.3f} " in section
    assert {(s, t) for _, s, t, _ in rows} == {(56, 322), (28, 1267)}
    # the judge reports it after its verdict: the shipped model against itself wins nothing
    *_, lines = judge_script.judge(SHIPPED, SHIPPED)
    assert "second slide, the frozen section (reported, not judged):" in lines
    assert any(line.endswith("of the shipped model in 0 of 8") for line in lines)
    tiles = eval_script.SECTION_SET.tiles(56)
    counts = {name: int((tiles.labels == i).sum()) for i, name in enumerate(tiles.class_names)}
    assert counts == {"infiltrate": 81, "stroma": 97, "tumour": 144}
    readme = (REPO / "data/labels/README.md").read_text(encoding="utf-8")
    for name, regions, n_112, n_56 in (("tumour", 5, 33, 144), ("infiltrate", 3, 19, 81),
                                       ("stroma", 5, 26, 97)):
        assert re.search(rf"\| `{name}` \| {regions} \|.*\| {n_112} / {n_56} \|", readme)
