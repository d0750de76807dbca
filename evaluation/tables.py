"""Markdown tables of summaries: one row per summary, "mean ± stderr" cells, ↑/↓ from the registry."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from evaluation.metrics import METRICS

__all__ = ["DEFAULT_COLUMNS", "format_cell", "format_table"]

#: the columns of a run's pre- vs post-edit table, when none are given
DEFAULT_COLUMNS = ("efficacy", "generality", "locality", "score")


def format_cell(entry: object, digits: int = 2) -> str:
    """``"mean ± stderr"`` for a summary entry, ``"mean"`` when there is no stderr, ``"–"`` when
    missing. A bare number is shown as is."""
    if entry is None:
        return "–"
    if isinstance(entry, Mapping):
        mean, stderr = entry.get("mean"), entry.get("stderr")
    else:
        mean, stderr = entry, None
    if mean is None:
        return "–"
    text = f"{float(mean):.{digits}f}"
    if stderr is not None and not (isinstance(stderr, float) and math.isnan(stderr)):
        text += f" ± {float(stderr):.{digits}f}"
    return text


def _header(name: str) -> str:
    info = METRICS.resolve(name)
    return f"{name} {info.arrow}" if info is not None else name


def format_table(
    rows: Sequence[tuple[str, Mapping[str, object]]],
    metrics: Sequence[str] | None = None,
    digits: int = 2,
) -> str:
    """A Markdown table: one row per ``(label, summary)``, one column per metric.

    ``summary`` maps a metric to ``{"mean", "stderr", "n"}`` (as from ``aggregate``) or to a
    number. Headers carry the registry's ↑/↓ (none for an unregistered name). ``metrics``
    defaults to ``DEFAULT_COLUMNS`` present in some row, then the other metrics in order.
    """
    if metrics is None:
        seen: list[str] = [m for m in DEFAULT_COLUMNS if any(m in summary for _, summary in rows)]
        for _, summary in rows:
            seen.extend(m for m in summary if m not in seen)
        metrics = seen
    header = ["", *(_header(m) for m in metrics)]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---", *(["---:"] * len(metrics))]) + "|",
    ]
    for label, summary in rows:
        cells = [label, *(format_cell(summary.get(m), digits) for m in metrics)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
