"""Paper-format tables from run folders: ``python -m runner.table <folder> [<folder> ...]``.

Every ``summary.json`` under the folders (a run, a sweep, or ``outputs/``) becomes a row; rows are
grouped into one table per (dataset, model), methods in the paper's order (``runner/data/
paper_tables.yaml``). Cells are "mean ± stderr" of the post-edit metrics; Score (a harmonic mean of
dataset-level means) has no stderr. The columns are those some row has: Efficacy, Generality,
Locality, Score, then Fluency and Consistency where generation metrics were computed
(CounterFact; not zsRE). Published numbers for the same model and dataset follow under their own
header, with their source and protocol; ``--reference <model>`` prints another model's (e.g. GPT-J's
beside a toy table, for scale only).

Writes ``paper_table[_<dataset>_<model>].{md,csv,tex}`` into ``--out`` (default: the first folder)
and, with ``--wandb``, a wandb Table per group (offline unless ``--wandb-mode online``). Each
table states the protocol its rows share (edit mode, batch size, number of cases) and flags rows
that differ, and the Consistency source when it is not the papers' attribute snippets.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

import evaluation.unlearning  # noqa: F401 (registers the unlearning metrics: their arrows and decimals)
from evaluation.metrics import METRICS
from evaluation.tables import format_cell

log = logging.getLogger(__name__)

LAYOUT_FILE = Path(__file__).resolve().parent / "data" / "paper_tables.yaml"


@dataclass
class Row:
    method: str  # config name (protocol.method), e.g. "come_memit"
    label: str  # display name
    metrics: dict[str, dict]  # metric -> {"mean", "stderr", "n"}
    protocol: dict[str, Any]
    path: Path | None = None  # summary.json (None for a reference row)


@dataclass
class PaperTable:
    dataset: str
    model: str
    columns: list[str]
    rows: list[Row]
    references: list[tuple[dict, list[Row]]] = field(default_factory=list)  # (reference entry, rows)
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.dataset}_{re.sub(r'[^A-Za-z0-9.-]+', '-', self.model)}"


def load_layout(path: Path = LAYOUT_FILE) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def find_summaries(folders: Sequence[Path]) -> list[Path]:
    found: list[Path] = []
    for folder in folders:
        folder = Path(folder)
        if folder.is_file() and folder.name == "summary.json":
            found.append(folder)
        elif folder.is_dir():
            found.extend(sorted(folder.rglob("summary.json")))
        else:
            raise FileNotFoundError(f"{folder} is neither a folder nor a summary.json")
    return list(dict.fromkeys(p.resolve() for p in found))


def _method(summary: dict) -> str:
    protocol = summary.get("protocol", {})
    return str(protocol.get("method") or protocol.get("editor", "?").rsplit(".", 1)[-1])


def _display(method: str, names: Mapping[str, str]) -> str:
    base, _, ablation = method.partition("+")
    label = names.get(base, base)
    return f"{label} ({ablation})" if ablation else label


def _reference_row(key: str, values: Mapping[str, float], names: Mapping[str, str]) -> Row:
    """A published row; its key is a method name, optionally followed by a note kept in the label
    (``"memit [n=100]"``: a table with one published row per setting)."""
    method, _, note = key.partition(" ")
    label = f"{_display(method, names)} {note}" if note else _display(method, names)
    return Row(method, label, {k: {"mean": v, "stderr": None} for k, v in values.items()}, {})


def _order(method: str, names: Mapping[str, str]) -> tuple:
    base, _, ablation = method.partition("+")
    keys = list(names)
    return (keys.index(base) if base in keys else len(keys), base, ablation)


def build_tables(
    summaries: Sequence[Path], layout: dict | None = None, reference_model: str | None = None
) -> list[PaperTable]:
    """One PaperTable per (dataset, model) found in ``summaries``."""
    layout = layout or load_layout()
    names: dict[str, str] = layout.get("methods", {})
    groups: dict[tuple[str, str], list[Row]] = {}
    for path in summaries:
        summary = json.loads(Path(path).read_text(encoding="utf-8"))
        protocol = summary.get("protocol", {})
        dataset = str(protocol.get("dataset", {}).get("name", "?"))
        model = str(protocol.get("model", {}).get("id", "?"))
        method = _method(summary)
        row = Row(
            method, _display(method, names), summary.get("metrics", {}).get("post", {}), protocol, Path(path)
        )
        groups.setdefault((dataset, model), []).append(row)
    tables = []
    for (dataset, model), rows in sorted(groups.items()):
        rows.sort(key=lambda r: (_order(r.method, names), _job_index(r.path), str(r.path)))
        _disambiguate(rows)
        present = [c for c in layout.get("columns", {}) if any(c in r.metrics for r in rows)]
        table = PaperTable(dataset, model, present, rows)
        table.notes = _protocol_notes(rows)
        modes = {str(r.protocol.get("edit_mode", "batch")) for r in rows}
        for ref in layout.get("references", []):
            wanted = {m.lower() for m in ref.get("models", [])}
            models = {model.lower(), *([reference_model.lower()] if reference_model else [])}
            same_mode = ref.get("edit_mode") is None or ref["edit_mode"] in modes
            if (
                dataset.lower() in {d.lower() for d in ref.get("datasets", [])}
                and wanted & models
                and same_mode
            ):
                ref_rows = [_reference_row(key, values, names) for key, values in ref["rows"].items()]
                ref_rows.sort(
                    key=lambda r: _order(r.method, names)
                )  # stable: the file's order within a method
                table.references.append((ref, ref_rows))
        tables.append(table)
    return tables


def _job_index(path: Path | None) -> int:
    """A multirun job's number (its folder name starts ``<n>_``), so job 10 sorts after job 9."""
    match = re.match(r"(\d+)_", path.parent.name) if path is not None else None
    return int(match.group(1)) if match else -1


def _disambiguate(rows: list[Row]) -> None:
    """Rows with the same label get what sets them apart: the overrides in their Hydra job folder
    names (``3_editor=memit,dataset.size=16``) that the other rows of that label do not share
    (e.g. ``MEMIT [dataset.size=16]``), else the whole folder name."""
    groups: dict[str, list[Row]] = {}
    for r in rows:
        groups.setdefault(r.label, []).append(r)
    for label, same in groups.items():
        if len(same) < 2 or any(r.path is None for r in same):
            continue
        tokens = [set(re.sub(r"^\d+_", "", r.path.parent.name).split(",")) for r in same]
        shared = set.intersection(*tokens)
        for r, own in zip(same, tokens):
            distinct = sorted(own - shared)
            r.label = f"{label} [{', '.join(distinct) if distinct else r.path.parent.name}]"


def _protocol_notes(rows: Sequence[Row]) -> list[str]:
    def key(r: Row) -> tuple:
        p = r.protocol
        return (p.get("edit_mode"), p.get("batch_size"), p.get("dataset", {}).get("size"))

    notes = []
    common = max({key(r) for r in rows}, key=lambda k: sum(key(r) == k for r in rows))
    mode, batch, size = common
    n_cases = sorted({str(r.metrics.get("efficacy", {}).get("n", "?")) for r in rows})
    notes.append(f"protocol: edit_mode={mode}, batch_size={batch}, cases per row: {', '.join(n_cases)}")
    differing = [r for r in rows if key(r) != common]
    if len(differing) > 3:  # e.g. a scaling curve: one batch size per row
        sizes = sorted({str(r.protocol.get("batch_size")) for r in rows})
        modes = sorted({str(r.protocol.get("edit_mode")) for r in rows})
        notes[-1] = (
            f"protocol differs between rows: edit_mode ∈ {{{', '.join(modes)}}}, batch_size ∈ "
            f"{{{', '.join(sizes)}}}, cases per row: {', '.join(n_cases)} (per row in the CSV)"
        )
    else:
        for r in differing:
            p = r.protocol
            notes.append(
                f"{r.label}: edit_mode={p.get('edit_mode')}, batch_size={p.get('batch_size')} (differs)"
            )
    for r in rows:
        gen = r.protocol.get("generation", {})
        if gen.get("enabled") and not gen.get("comparable_with_papers", False) and "consistency" in r.metrics:
            notes.append(
                f"Consistency uses {gen.get('consistency_source')} references ({gen.get('tfidf')}), "
                "not the papers' attribute snippets: not comparable with published Consistency"
            )
            break
    return notes


# ---------------------------------------------------------------------------------------------- output


def _header(metric: str, names: Mapping[str, str], latex: bool = False) -> str:
    info = METRICS.resolve(metric)
    arrow = (
        ""
        if info is None
        else (info.arrow if not latex else ("$\\uparrow$" if info.higher_is_better else "$\\downarrow$"))
    )
    return f"{names.get(metric, metric)} {arrow}".strip()


def _digits(metric: str) -> int:
    """Decimals of a column: 1 for percentages (scale 100), 3 for raw fractions and p-values (the
    unlearning metrics, registered with scale 1)."""
    info = METRICS.resolve(metric) or METRICS.resolve(metric.rsplit("/", 1)[-1])  # "<split>/<measure>"
    return 3 if info is not None and info.scale == 1.0 else 1


def _cell(entry: Mapping | None, digits: int = 1, latex: bool = False) -> str:
    """ "mean ± stderr" (``evaluation.tables.format_cell``); LaTeX puts the ± part in small type.
    A missing or NaN mean is a dash."""
    if not entry or entry.get("mean") is None or math.isnan(entry["mean"]):
        return "--" if latex else "–"
    if not latex:
        return format_cell(entry, digits)
    text = f"{entry['mean']:.{digits}f}"
    if entry.get("stderr") is not None:
        text += f" {{\\scriptsize $\\pm$ {entry['stderr']:.{digits}f}}}"
    return text


def to_markdown(table: PaperTable, layout: Mapping) -> str:
    names = layout.get("columns", {})
    lines = [f"### {table.dataset} · {table.model}", ""]
    head = ["Method", *(_header(c, names) for c in table.columns)]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join(["---", *(["---:"] * len(table.columns))]) + "|")
    for r in table.rows:
        lines.append(
            "| " + " | ".join([r.label, *(_cell(r.metrics.get(c), _digits(c)) for c in table.columns)]) + " |"
        )
    for ref, rows in table.references:
        lines.append(
            "| " + " | ".join([f"*published ({ref['protocol']})*", *([""] * len(table.columns))]) + " |"
        )
        for r in rows:
            lines.append(
                "| "
                + " | ".join([f"{r.label} †", *(_cell(r.metrics.get(c), _digits(c)) for c in table.columns)])
                + " |"
            )
    lines.append("")
    lines.extend(f"- {note}" for note in table.notes)
    for ref, _ in table.references:
        lines.append(f"- † {ref['source'].strip()} Protocol: {ref['protocol']}.")
    return "\n".join(lines) + "\n"


def to_frame(table: PaperTable) -> pd.DataFrame:
    records = []
    for source, rows in [("ours", table.rows), *((ref["id"], rows) for ref, rows in table.references)]:
        for r in rows:
            rec: dict[str, Any] = {"source": source, "method": r.method, "label": r.label}
            for c in table.columns:
                entry = r.metrics.get(c) or {}
                rec[c] = entry.get("mean")
                rec[f"{c}_stderr"] = entry.get("stderr")
            rec["n"] = (r.metrics.get("efficacy") or {}).get("n")
            rec["edit_mode"] = r.protocol.get("edit_mode")
            rec["batch_size"] = r.protocol.get("batch_size")
            rec["summary"] = str(r.path) if r.path else ""
            records.append(rec)
    return pd.DataFrame.from_records(records)


def _tex_escape(text: str) -> str:
    return re.sub(r"([&%$#_{}])", r"\\\1", text)


def to_latex(table: PaperTable, layout: Mapping) -> str:
    names = layout.get("columns", {})
    spec = "l" + "r" * len(table.columns)
    head = " & ".join(["Method", *(_header(c, names, latex=True) for c in table.columns)])
    lines = [
        "\\begin{table}[t]",
        "\\centering",
        f"\\caption{{{_tex_escape(table.dataset)}, {_tex_escape(table.model)}}}",
        f"\\begin{{tabular}}{{{spec}}}",
        "\\toprule",
        head + " \\\\",
        "\\midrule",
    ]
    for r in table.rows:
        lines.append(
            " & ".join(
                [
                    _tex_escape(r.label),
                    *(_cell(r.metrics.get(c), _digits(c), latex=True) for c in table.columns),
                ]
            )
            + " \\\\"
        )
    for ref, rows in table.references:
        lines.append("\\midrule")
        lines.append(
            f"\\multicolumn{{{len(table.columns) + 1}}}{{l}}{{\\emph{{published: {_tex_escape(ref['protocol'])}}}}} \\\\"
        )
        for r in rows:
            lines.append(
                " & ".join(
                    [
                        _tex_escape(r.label) + "$^\\dagger$",
                        *(_cell(r.metrics.get(c), _digits(c), latex=True) for c in table.columns),
                    ]
                )
                + " \\\\"
            )
    lines += ["\\bottomrule", "\\end{tabular}", "\\end{table}", ""]
    return "\n".join(lines)


def write_tables(tables: Sequence[PaperTable], out: Path, layout: Mapping) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for table in tables:
        stem = "paper_table" if len(tables) == 1 else f"paper_table_{table.name}"
        for suffix, text in (
            (".md", to_markdown(table, layout)),
            (".tex", to_latex(table, layout)),
            (".csv", to_frame(table).to_csv(index=False)),
        ):
            path = out / f"{stem}{suffix}"
            path.write_text(text, encoding="utf-8")
            written.append(path)
    return written


def log_wandb(
    tables: Sequence[PaperTable], out: Path, project: str = "knowedit", mode: str = "offline"
) -> Path:
    import wandb

    run = wandb.init(
        project=project,
        mode=mode,
        job_type="paper-table",
        name="paper-table",
        dir=str(out),
        reinit="create_new",
    )
    try:
        for table in tables:
            frame = to_frame(table)
            run.log(
                {
                    f"paper_table/{table.name}": wandb.Table(
                        dataframe=frame.astype(object).where(frame.notna(), None)
                    )
                }
            )
    finally:
        run.finish()
    return Path(run.dir).parent


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runner.table", description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="run or sweep folders (or summary.json files)")
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: the first folder)")
    parser.add_argument(
        "--reference", default=None, help="also print published rows of this model (e.g. gpt-j)"
    )
    parser.add_argument("--wandb", action="store_true", help="log the tables to wandb")
    parser.add_argument("--wandb-mode", default="offline", choices=("offline", "online"))
    parser.add_argument("--wandb-project", default="knowedit")
    args = parser.parse_args(argv)
    try:
        summaries = find_summaries(args.folders)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not summaries:
        print(f"error: no summary.json under {', '.join(map(str, args.folders))}", file=sys.stderr)
        return 2
    layout = load_layout()
    tables = build_tables(summaries, layout, args.reference)
    out = args.out or (args.folders[0] if args.folders[0].is_dir() else args.folders[0].parent)
    for table in tables:
        print(to_markdown(table, layout))
    for path in write_tables(tables, out, layout):
        print(f"wrote {path}")
    if args.wandb:
        print(f"wandb: {log_wandb(tables, out, args.wandb_project, args.wandb_mode)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
