"""One table comparing encoders: a row per encoder x protocol, metrics with 95% intervals.

Markdown (for people: a header saying what was evaluated, the table, a legend) and CSV (for
programs: one row per encoder x protocol; each metric as ``<metric>``, ``<metric>_low``,
``<metric>_high``; empty where a protocol has no such metric). Both are written atomically:
a crash never leaves a half-written report.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from napari_gpfm.evaluation.protocols import ProtocolResult

# (key, Markdown header); the order of the report's columns.
METRIC_COLUMNS = (
    ("accuracy", "acc"),
    ("balanced_accuracy", "bal. acc"),
    ("f1_macro", "F1"),
    ("auroc_macro", "AUROC"),
    ("top1", "top-1"),
    ("top3", "top-3"),
    ("top5", "top-5"),
    ("mrr", "MRR"),
    ("class_top1", "class top-1"),
)

LEGEND = (
    "linear: GPFM linear probe (AdamW lr 5e-4, wd 1e-5, cosine to 1e-5, batch 256, early "
    "stopping on validation AUROC, patience 100); knn: weighted kNN (k 20, T 0.07, cosine); "
    "both report accuracy, balanced accuracy (= GPFM's macro accuracy), macro F1 and macro "
    "one-vs-rest AUROC on the test split.",
    "retrieval: GPFM ROI retrieval (z-scored features, Euclidean, k = classes neighbours voting "
    "1.0, 0.9, ...), macro top-k accuracy of test queries against train + val; n/a when k >= "
    "classes.",
    "augretrieval: each tile's augmented copy (flips/rotations, crop, colour jitter, JPEG) "
    "searched among all original tiles by cosine similarity: top-1/top-5 = the original is "
    "found first / among the 5 nearest, MRR = mean reciprocal rank of the original, class "
    "top-1 = the nearest original has the same class.",
    "Intervals: percentile bootstrap (95%) over the evaluated tiles.",
)


@dataclass(frozen=True)
class ReportRow:
    """One encoder's result for one protocol."""

    encoder: str
    encoder_id: str
    result: ProtocolResult


@dataclass
class EvaluationReport:
    """Rows of encoder x protocol results plus what they were measured on."""

    tiles: str
    class_counts: dict[str, int]
    split: str
    seed: int
    n_boot: int
    rows: list[ReportRow] = field(default_factory=list)

    def add(self, encoder: str, encoder_id: str, result: ProtocolResult) -> None:
        """Append one row."""
        self.rows.append(ReportRow(encoder, encoder_id, result))

    def _columns(self) -> list[tuple[str, str]]:
        used = {name for row in self.rows for name in row.result.metrics}
        known = [col for col in METRIC_COLUMNS if col[0] in used]
        extra = sorted(used - {key for key, _ in METRIC_COLUMNS})
        return known + [(name, name) for name in extra]

    def to_markdown(self) -> str:
        """The report as Markdown: header lines, the table, the legend."""
        classes = ", ".join(f"{name} {n}" for name, n in self.class_counts.items())
        lines = [
            "# Encoder evaluation",
            "",
            f"- tiles: {self.tiles}",
            f"- classes: {classes}",
            f"- {self.split}",
            f"- seed {self.seed}; {self.n_boot} bootstrap resamples",
            "",
        ]
        columns = self._columns()
        header = ["encoder", "protocol", "fit / val / eval", *(title for _, title in columns)]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join("---" for _ in header) + "|")
        for row in self.rows:
            r = row.result
            cells = [f"{row.encoder}", r.protocol, f"{r.n_fit} / {r.n_val} / {r.n_eval}"]
            cells += [str(r.metrics[key]) if key in r.metrics else "" for key, _ in columns]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        lines.append("Encoder identities (name@weights sha256):")
        for name, identity in dict.fromkeys((r.encoder, r.encoder_id) for r in self.rows):
            lines.append(f"- {name}: `{identity}`")
        lines.append("")
        lines += [f"- {text}" for text in LEGEND]
        return "\n".join(lines) + "\n"

    def to_csv(self) -> str:
        """The report as CSV text (header + one line per row)."""
        columns = [key for key, _ in self._columns()]
        header = ["encoder", "encoder_id", "protocol", "n_fit", "n_val", "n_eval"]
        for key in columns:
            header += [key, f"{key}_low", f"{key}_high"]
        header += ["params"]
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(header)
        for row in self.rows:
            r = row.result
            line: list[object] = [row.encoder, row.encoder_id, r.protocol, r.n_fit, r.n_val,
                                  r.n_eval]
            for key in columns:
                est = r.metrics.get(key)
                line += ["", "", ""] if est is None else [
                    _number(est.value), _number(est.low), _number(est.high)
                ]
            line.append(json.dumps(r.params, sort_keys=True, default=str))
            writer.writerow(line)
        return buffer.getvalue()

    def write_markdown(self, path: str | os.PathLike) -> Path:
        """Write :meth:`to_markdown` atomically; return the path."""
        from napari_gpfm.analysis._io import atomic_write_text

        return atomic_write_text(path, self.to_markdown(), "evaluation report")

    def write_csv(self, path: str | os.PathLike) -> Path:
        """Write :meth:`to_csv` atomically; return the path."""
        from napari_gpfm.analysis._io import atomic_write_text

        return atomic_write_text(path, self.to_csv(), "evaluation table")


def _number(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.6g}"
