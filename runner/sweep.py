"""Sweep-level aggregation: one table and a few curves for a Hydra multirun folder.

``aggregate_sweep(sweep_dir)`` reads every job folder of a multirun (``summary.json`` and
``.hydra/overrides.yaml``), finds the swept keys (the overrides whose values differ between jobs)
and writes into the sweep folder:

- ``sweep_table.csv``: one row per finished job: ``job`` (the folder name), the swept keys, the
  post-edit metrics (efficacy, generality, locality, score, then the others), the pre-edit metrics
  (``pre_*``), ``edit_seconds``, ``n_cases``, then one ``<metric>_stderr`` column per metric;
- ``sweep_table.md``: the same rows as a Markdown table ("mean ± stderr", ↑/↓ from the metric
  registry), sorted by the swept keys, plus the jobs that have no ``summary.json`` (failed or
  unfinished);
- ``curve_<key>.png`` for every numeric swept key (CoME's α ``editor.unlearn_weight``, p
  ``editor.top_p_fraction``, MEMIT's λ ``editor.update_weight``, ``batch_size``...): efficacy,
  generality, locality and score against the key, with standard-error bars.

When the jobs logged to wandb (``logger.backend=wandb``) one more run, ``sweep-summary``, goes to
the sweep's group (``logger.group``, or the sweep folder's name) with the table and line plots.

At the end of a sweep the ``runner.callbacks.SweepSummary`` Hydra callback calls it; to rebuild the
outputs of an existing (or interrupted) sweep: ``python -m runner.sweep multirun/2025-01-01_12-00-00``.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from evaluation.metrics import METRICS
from evaluation.tables import format_cell

__all__ = [
    "CSV_NAME",
    "HEADLINE",
    "MD_NAME",
    "SweepError",
    "SweepJob",
    "SweepResult",
    "aggregate_sweep",
    "find_jobs",
    "main",
]

log = logging.getLogger(__name__)

CSV_NAME = "sweep_table.csv"
MD_NAME = "sweep_table.md"
#: the metrics drawn on every curve, and the first metric columns of the table
HEADLINE = ("efficacy", "generality", "locality", "score")
#: what an unlearning sweep (task=unlearn) plots instead: fractions in [0, 1], not percentages
UNLEARNING_HEADLINE = ("forget_quality", "model_utility", "forget_rouge_l", "retain_rouge_l", "refusal_rate")


def _headline(table: pd.DataFrame) -> tuple[tuple[str, ...], str]:
    """The metrics a curve shows and their y-axis unit: the editing headline (in %) when the jobs
    report it, else the unlearning one (fractions)."""
    for metrics, unit in ((HEADLINE, "% of cases"), (UNLEARNING_HEADLINE, "value")):
        found = tuple(m for m in metrics if m in table.columns and table[m].notna().any())
        if found:
            return found, unit
    return (), "value"


#: timing columns taken from ``summary["timing"]`` (lower is better)
TIMING = ("edit_seconds",)
#: how a few well-known keys are named on the curves' x axis
KEY_LABELS = {
    "editor.unlearn_weight": "α (editor.unlearn_weight)",
    "editor.top_p_fraction": "p (editor.top_p_fraction)",
    "editor.update_weight": "λ (editor.update_weight)",
    "batch_size": "edits per batch (batch_size)",
    "dataset.size": "cases (dataset.size)",
}
_MISSING = object()  # a key that a job does not override


class SweepError(ValueError):
    """A folder that holds no Hydra job of a sweep."""


@dataclass
class SweepJob:
    """One job folder of a sweep."""

    name: str  # the folder, relative to the sweep folder
    path: Path
    num: int | None  # hydra.job.num
    overrides: dict[str, Any]  # key -> value (parsed: numbers, lists, strings, None)
    summary: dict | None  # summary.json; None for a failed or unfinished job

    @property
    def finished(self) -> bool:
        return self.summary is not None


@dataclass
class SweepResult:
    """What ``aggregate_sweep`` found and wrote."""

    sweep_dir: Path
    table: pd.DataFrame  # one row per finished job, sorted by the swept keys
    swept_keys: list[str]
    numeric_keys: list[str]  # swept keys with numeric values: one curve each
    metric_columns: list[str]  # the metric columns of ``table``, post-edit then pre_*, then timing
    jobs: list[SweepJob]
    missing: list[str]  # folders of the jobs without summary.json
    csv_path: Path | None = None
    md_path: Path | None = None
    curves: dict[str, Path] = field(default_factory=dict)  # swept key -> PNG
    wandb_dir: Path | None = None  # the sweep-summary run's folder (offline: `wandb sync` it)

    def __str__(self) -> str:
        lines = [
            f"sweep {self.sweep_dir}: {len(self.table)} finished job(s), {len(self.missing)} missing"
            + (f", swept: {', '.join(self.swept_keys)}" if self.swept_keys else ""),
        ]
        if self.md_path:
            lines.append(f"  table:  {self.md_path}")
        if self.csv_path:
            lines.append(f"  csv:    {self.csv_path}")
        lines.extend(f"  curve:  {path}" for path in self.curves.values())
        lines.extend(f"  missing (no summary.json): {name}" for name in self.missing)
        if self.wandb_dir:
            lines.append(f"  wandb:  {self.wandb_dir}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# reading the jobs


def _parse_overrides(lines: Sequence[str]) -> dict[str, Any]:
    """Override lines -> {key: value}, values parsed by Hydra's grammar (``1`` -> 1, ``[1,2]`` ->
    [1, 2], ``null`` -> None); a ``+``/``++`` prefix is dropped, a package kept (``group@pkg``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    out: dict[str, Any] = {}
    for line in lines:
        try:
            (override,) = parser.parse_overrides([line])
        except Exception:  # unparseable (should not happen for lines Hydra wrote): keep the text
            key, _, value = line.lstrip("+~").partition("=")
            out[key] = _number(value)
            continue
        key = override.key_or_group + (f"@{override.package}" if override.package else "")
        if override.is_delete():
            out[key] = "<deleted>"
        elif override.is_sweep_override():
            out[key] = override.get_value_element_as_str()
        else:
            out[key] = override.value()
    return out


def _number(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _read_yaml(path: Path) -> Any:
    try:
        with path.open(encoding="utf-8") as f:
            return yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return None


def _job_num(job_dir: Path) -> int | None:
    hydra_cfg = _read_yaml(job_dir / ".hydra" / "hydra.yaml")
    try:
        return int(hydra_cfg["hydra"]["job"]["num"])
    except (TypeError, KeyError, ValueError):
        match = re.match(r"(\d+)(?:_|$)", job_dir.name)
        return int(match.group(1)) if match else None


def find_jobs(sweep_dir: Path) -> list[SweepJob]:
    """Every job folder under ``sweep_dir`` (a folder with ``.hydra/overrides.yaml``), by job number.
    A job without a readable ``summary.json`` has ``summary=None``."""
    sweep_dir = Path(sweep_dir)
    jobs = []
    for overrides_file in sorted(sweep_dir.rglob(".hydra/overrides.yaml")):
        job_dir = overrides_file.parent.parent
        lines = _read_yaml(overrides_file) or []
        summary = None
        summary_file = job_dir / "summary.json"
        if summary_file.is_file():
            try:
                summary = yaml.safe_load(summary_file.read_text(encoding="utf-8"))  # JSON is YAML
            except (OSError, yaml.YAMLError) as error:
                log.warning("unreadable %s (counted as missing): %s", summary_file, error)
            if not isinstance(summary, dict):
                summary = None
        name = job_dir.relative_to(sweep_dir).as_posix() if job_dir != sweep_dir else job_dir.name
        jobs.append(
            SweepJob(name, job_dir, _job_num(job_dir), _parse_overrides([str(x) for x in lines]), summary)
        )
    jobs.sort(key=lambda j: (j.num is None, j.num if j.num is not None else 0, j.name))
    return jobs


def _swept_keys(jobs: Sequence[SweepJob]) -> list[str]:
    """The override keys whose values are not the same in every job, in first-seen order."""
    keys: list[str] = []
    for job in jobs:
        keys.extend(k for k in job.overrides if k not in keys)
    return [k for k in keys if len({_hashable(j.overrides.get(k, _MISSING)) for j in jobs}) > 1]


def _hashable(value: Any) -> Any:
    if isinstance(value, list):
        return ("__list__", *(_hashable(v) for v in value))
    if isinstance(value, dict):
        return ("__dict__", *sorted((k, _hashable(v)) for k, v in value.items()))
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _config_value(job: SweepJob, key: str) -> Any:
    """A key the job did not override: its value in the job's composed config (scalars only)."""
    from omegaconf import OmegaConf

    try:
        cfg = OmegaConf.load(job.path / ".hydra" / "config.yaml")
        value = OmegaConf.select(cfg, key.split("@")[0], default=None, throw_on_resolution_failure=False)
    except Exception:
        return None
    if OmegaConf.is_config(value):
        return OmegaConf.to_container(value) if OmegaConf.is_list(value) else None
    return value


def _display(value: Any) -> Any:
    """A table cell for a swept value: numbers and strings as they are, lists as ``[1,2]``."""
    if value is None or value is _MISSING:
        return None
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(str(_display(v)) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_display(v)}" for k, v in value.items()) + "}"
    return value


def _sort_key(value: Any) -> tuple:
    if value is None or value is _MISSING:
        return (3, 0)
    if isinstance(value, bool):
        return (1, str(value))
    if _is_number(value):
        return (0, value)
    if isinstance(value, (list, tuple)):
        return (2, tuple(_sort_key(v) for v in value))
    return (1, str(value))


# --------------------------------------------------------------------------------------------
# the table


def _metric_names(summaries: Sequence[dict]) -> tuple[list[str], list[str]]:
    """Post- and pre-edit metric names present in some summary: headline first, then first-seen."""
    names = {"post": [], "pre": []}
    for phase, found in names.items():
        for summary in summaries:
            found.extend(m for m in (summary.get("metrics") or {}).get(phase) or {} if m not in found)
        found.sort(key=lambda m: HEADLINE.index(m) if m in HEADLINE else len(HEADLINE))
    post = names["post"] or [m for m in HEADLINE if any(m in s for s in summaries)]
    return post, names["pre"]


def _entry(summary: dict, phase: str, metric: str) -> tuple[float | None, float | None]:
    entry = ((summary.get("metrics") or {}).get(phase) or {}).get(metric)
    if isinstance(entry, Mapping):
        return _float(entry.get("mean")), _float(entry.get("stderr"))
    if phase == "post" and entry is None and _is_number(summary.get(metric)):
        return float(summary[metric]), None  # a summary with the headline numbers only
    return _float(entry), None


def _float(value: Any) -> float | None:
    return float(value) if _is_number(value) else None


def _build_table(jobs: Sequence[SweepJob], swept: Sequence[str]) -> tuple[pd.DataFrame, list[str]]:
    finished = [j for j in jobs if j.finished]
    post, pre = _metric_names([j.summary for j in finished])  # type: ignore[misc]
    values = {
        (j.name, k): (j.overrides[k] if k in j.overrides else _config_value(j, k))
        for j in finished
        for k in swept
    }
    finished.sort(key=lambda j: (*(_sort_key(values[j.name, k]) for k in swept), _sort_key(j.num)))
    metric_cols = [*post, *(f"pre_{m}" for m in pre), *TIMING]
    rows, stderr_cols = [], []
    for job in finished:
        summary = job.summary or {}
        row: dict[str, Any] = {"job": job.name}
        row.update({k: _display(values[job.name, k]) for k in swept})
        errs: dict[str, float | None] = {}
        for phase, names, prefix in (("post", post, ""), ("pre", pre, "pre_")):
            for metric in names:
                row[prefix + metric], errs[f"{prefix}{metric}_stderr"] = _entry(summary, phase, metric)
        for key in TIMING:
            row[key] = _float((summary.get("timing") or {}).get(key))
        row["n_cases"] = summary.get("n_cases")
        stderr_cols.extend(c for c, v in errs.items() if v is not None and c not in stderr_cols)
        row.update(errs)
        rows.append(row)
    columns = ["job", *swept, *metric_cols, "n_cases", *stderr_cols]
    table = pd.DataFrame(rows, columns=columns)
    return table.reset_index(drop=True), metric_cols


def _header(name: str) -> str:
    info = METRICS.resolve(name)
    if info is not None:
        return f"{name} {info.arrow}"
    return f"{name} ↓" if name in TIMING else name


def _cell(value: Any, stderr: Any = None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if not _is_number(value):
        return str(value)
    if stderr is not None and not (isinstance(stderr, float) and math.isnan(stderr)):
        return format_cell({"mean": value, "stderr": stderr}, digits)
    return format_cell(value, digits)


def _value_cell(value: Any) -> str:
    """A swept value as it was typed: ``0.05``, ``10000``, ``[1,2]``, ``rome``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:g}" if abs(value) < 1e6 else f"{value:.6g}"
    return str(value)


def _protocol_line(jobs: Sequence[SweepJob]) -> str:
    """``Memit · tiny-gpt2 · counterfact (4 cases)`` from the jobs' protocol (values joined by /)."""

    def unique(values) -> str:
        seen: list[str] = []
        seen.extend(str(v) for v in values if v is not None and str(v) not in seen)
        return "/".join(seen) or "?"

    protocols = [(j.summary or {}).get("protocol") or {} for j in jobs if j.finished]
    editor = unique(str(p.get("editor", "")).rsplit(".", 1)[-1] or None for p in protocols)
    model = unique((p.get("model") or {}).get("id") for p in protocols)
    dataset = unique((p.get("dataset") or {}).get("name") for p in protocols)
    sizes = sorted(
        {int(j.summary["n_cases"]) for j in jobs if j.finished and _is_number(j.summary.get("n_cases"))}
    )
    cases = (
        "" if not sizes else f" ({sizes[0]} cases)" if len(sizes) == 1 else f" ({sizes[0]}–{sizes[-1]} cases)"
    )
    return f"{editor} · {model} · {dataset}{cases}"


def _markdown(result: SweepResult, title: str) -> str:
    table = result.table
    post = [c for c in result.metric_columns if not c.startswith("pre_") and c not in TIMING]
    pre = [f"pre_{m}" for m in HEADLINE if f"pre_{m}" in table.columns]
    columns = [*post, *pre, *[c for c in TIMING if c in table.columns]]
    show_n = table["n_cases"].nunique(dropna=True) > 1 if len(table) else False
    lines = [
        f"# Sweep `{result.sweep_dir.name}`",
        "",
        f"{title}: {len(result.jobs)} job(s), {len(table)} finished"
        + (f", swept: {', '.join(f'`{k}`' for k in result.swept_keys)}" if result.swept_keys else "")
        + ".",
        *(
            [
                "Cells are mean ± standard error over the cases (in %; score is the harmonic mean of efficacy,",
                "generality and locality); ↑/↓ say which way is better. Every pre_* metric and the stderr",
            ]
            if _headline(table)[1].startswith("%")
            else [
                "Cells are fractions (per-item metrics: mean ± standard error over the items; forget quality",
                "and model utility are one value per job); ↑/↓ say which way is better. Every pre_* metric and the stderr",
            ]
        ),
        f"columns are in `{CSV_NAME}`.",
        "",
    ]
    if len(table):
        header = ["job", *result.swept_keys, *(["n"] if show_n else []), *(_header(c) for c in columns)]
        align = ["---", *(["---:" if k in result.numeric_keys else "---" for k in result.swept_keys])]
        align += ["---:"] * (len(header) - len(align))
        lines += ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
        for _, row in table.iterrows():
            cells = [_job_label(row["job"]), *(_value_cell(row[k]) for k in result.swept_keys)]
            if show_n:
                cells.append(_cell(row["n_cases"], digits=0))
            for col in columns:
                digits = 1 if col in TIMING else 2
                cells.append(_cell(row[col], row.get(f"{col}_stderr"), digits))
            lines.append("| " + " | ".join(cells) + " |")
        if "score" in table.columns and table["score"].notna().any():
            best = table.loc[table["score"].idxmax()]
            setting = ", ".join(f"{k}={_value_cell(best[k])}" for k in result.swept_keys) or best["job"]
            lines += ["", f"Best score: **{_cell(best['score'])}** ({setting})."]
    else:
        lines.append("No job has finished yet.")
    if result.missing:
        lines += ["", "Missing (no `summary.json`: failed or unfinished; see the folder's run.log):", ""]
        lines += [f"- `{name}`" for name in result.missing]
    if result.curves:
        lines += ["", "## Curves", ""]
        lines += [f"![{key}]({path.name})" for key, path in result.curves.items()]
    return "\n".join(lines) + "\n"


def _job_label(name: str) -> str:
    """The job number for the Markdown table (the folder name is in the CSV)."""
    match = re.match(r"(\d+)(?:_|$)", Path(name).name)
    return match.group(1) if match else name


# --------------------------------------------------------------------------------------------
# curves


def _safe_name(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", key)


def _name(metric: str) -> str:
    """``forget_rouge_l`` -> ``Forget ROUGE-L``, ``efficacy`` -> ``Efficacy``."""
    name = metric.replace("_rouge_l", " ROUGE-L").replace("_", " ")
    return name[:1].upper() + name[1:]


def _label(metric: str) -> str:
    info = METRICS.resolve(metric)
    return _name(metric) + (f" {info.arrow}" if info is not None else "")


def _series(table: pd.DataFrame, key: str, others: Sequence[str]) -> list[tuple[str, pd.DataFrame]]:
    """(label, rows sorted by ``key``) per combination of the other swept keys."""
    if not others:
        return [("", table.sort_values(key, kind="stable"))]
    groups: dict[tuple, list[int]] = {}
    for index, row in table.iterrows():
        groups.setdefault(tuple(_hashable(row[k]) for k in others), []).append(index)
    out = []
    for combo in sorted(groups, key=lambda c: tuple(_sort_key(v) for v in c)):
        label = ", ".join(f"{k}={v}" for k, v in zip(others, combo))
        out.append((label, table.loc[groups[combo]].sort_values(key, kind="stable")))
    return out


def _plot_curve(table: pd.DataFrame, key: str, others: Sequence[str], title: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.transforms import ScaledTranslation

    metrics, unit = _headline(table)
    if not metrics:
        raise ValueError("no headline metric (editing or unlearning) in the jobs' summaries")
    data = table[table[key].notna()]
    xs = sorted(set(data[key].astype(float)))
    series = _series(data, key, others)

    def errorbar(ax, rows, metric, dodge: float = 0.0, **style):
        """Markers, lines and stderr bars; ``dodge`` shifts them sideways (points) so that the
        bars of lines with equal values stay apart."""
        err = rows.get(f"{metric}_stderr")
        yerr = None if err is None or err.isna().all() else err.fillna(0.0).to_numpy(float)
        container = ax.errorbar(
            rows[key].to_numpy(float),
            rows[metric].to_numpy(float),
            yerr=yerr,
            marker="o",
            markersize=5,
            capsize=3,
            linewidth=1.6,
            **style,
        )
        if dodge:  # after plotting, so that the data limits were taken without the shift
            shift = ax.transData + ScaledTranslation(dodge / 72, 0, ax.figure.dpi_scale_trans)
            for artist in container.get_children():
                artist.set_transform(shift)

    def style_axis(ax):
        log_scale = all(x > 0 for x in xs) and len(xs) > 2 and max(xs) / min(xs) >= 50
        if log_scale:
            ax.set_xscale("log")
        where = [math.log10(x) for x in xs] if log_scale else xs
        spread = (where[-1] - where[0]) or 1.0
        if len(xs) <= 10 and all(b - a >= 0.07 * spread for a, b in zip(where, where[1:])):
            ax.set_xticks(xs)
            ax.set_xticklabels([f"{x:g}" for x in xs])
            ax.minorticks_off()
        ax.grid(True, alpha=0.3)

    plt.rcParams.update({"font.size": 10})
    colors = {
        "efficacy": "tab:blue",
        "generality": "tab:orange",
        "locality": "tab:green",
        "score": "black",
        "forget_rouge_l": "tab:red",
        "retain_rouge_l": "tab:green",
        "refusal_rate": "tab:purple",
        "model_utility": "black",
        "forget_quality": "tab:blue",
    }
    if len(series) == 1:
        fig, ax = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
        rows = series[0][1]
        for i, metric in enumerate(metrics):
            errorbar(
                ax,
                rows,
                metric,
                dodge=3.0 * (i - (len(metrics) - 1) / 2),
                label=_label(metric),
                color=colors.get(metric),
                linestyle="--" if metric in ("score", "model_utility") else "-",
            )
        style_axis(ax)
        ax.set_xlabel(KEY_LABELS.get(key, key))
        ax.set_ylabel(f"{unit} (mean ± stderr)")
        fig.legend(loc="outside lower center", ncols=4 if len(metrics) == 4 else 3, frameon=False)
        fig.suptitle(title)
    else:
        n = len(metrics)
        ncols = 2 if n > 1 else 1
        nrows = math.ceil(n / ncols)
        fig, axes = plt.subplots(
            nrows,
            ncols,
            figsize=(5.2 * ncols, 3.6 * nrows + 0.8),
            sharex=True,
            squeeze=False,
            constrained_layout=True,
        )
        for ax, metric in zip(axes.flat, metrics):
            for i, (label, rows) in enumerate(series):
                errorbar(ax, rows, metric, dodge=3.0 * (i - (len(series) - 1) / 2), label=label)
            style_axis(ax)
            ax.set_title(_label(metric))
            ax.set_ylabel(unit)
        for ax in axes.flat[n:]:
            ax.set_visible(False)
        for ax in axes[-1]:
            ax.set_xlabel(KEY_LABELS.get(key, key))
        handles, labels = axes.flat[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 3), frameon=False)
        fig.suptitle(title)
    tmp = _tmp_path(path)
    fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------------------------
# wandb


def _logger_cfg(jobs: Sequence[SweepJob], tracker_cfg: Any) -> dict:
    """The logger block: ``tracker_cfg`` when given, else the first job's ``.hydra/config.yaml``."""
    if tracker_cfg is not None:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(tracker_cfg):
            return dict(OmegaConf.to_container(tracker_cfg, resolve=True))
        return dict(tracker_cfg)
    for job in jobs:
        config = _read_yaml(job.path / ".hydra" / "config.yaml")
        if isinstance(config, dict) and isinstance(config.get("logger"), dict):
            return config["logger"]
    return {"backend": "none"}


def _log_wandb(result: SweepResult, cfg: Mapping[str, Any], title: str) -> Path | None:
    backend, mode = cfg.get("backend", "none"), cfg.get("mode") or "offline"
    if backend != "wandb" or mode == "disabled":
        log.info("sweep summary: not logged to wandb (logger.backend=%s, mode=%s)", backend, mode)
        return None
    try:
        import wandb
    except ImportError:
        log.warning("sweep summary: wandb is not installed; skipped")
        return None
    group = cfg.get("group") or result.sweep_dir.name
    table = result.table
    run = wandb.init(
        project=cfg.get("project") or "knowedit",
        entity=cfg.get("entity"),
        mode=mode,
        group=group,
        job_type="sweep-summary",
        name="sweep-summary",
        tags=[*(cfg.get("tags") or []), "sweep-summary"],
        dir=str(result.sweep_dir),
        config={
            "sweep_dir": str(result.sweep_dir),
            "swept_keys": result.swept_keys,
            "protocol": title,
            "n_jobs": len(result.jobs),
            "missing": result.missing,
        },
        reinit="create_new",
    )
    failed = True
    try:
        run.log({"sweep_table": wandb.Table(dataframe=table.astype(object).where(table.notna(), None))})
        charts: dict[str, Any] = {}
        for key in result.numeric_keys:
            others = [k for k in result.swept_keys if k != key]
            series = _series(table[table[key].notna()], key, others)
            for metric in (m for m in HEADLINE if m in table.columns):
                charts[f"curves/{metric}_vs_{key}"] = wandb.plot.line_series(
                    xs=[rows[key].astype(float).tolist() for _, rows in series],
                    ys=[rows[metric].astype(float).tolist() for _, rows in series],
                    keys=[label or metric for label, _ in series],
                    title=f"{metric} vs {key}",
                    xname=key,
                )
            if key in result.curves:
                charts[f"curve_png/{key}"] = wandb.Image(str(result.curves[key]))
        if charts:
            run.log(charts)
        if "score" in table.columns and table["score"].notna().any():
            best = table.loc[table["score"].idxmax()]
            run.summary["best/score"] = float(best["score"])
            run.summary["best/job"] = str(best["job"])
            for key in result.swept_keys:
                run.summary[f"best/{key}"] = (
                    best[key] if not isinstance(best[key], float) or best[key] == best[key] else None
                )
        run.summary["n_finished"] = len(table)
        run.summary["n_missing"] = len(result.missing)
        failed = False
    finally:
        run_dir = Path(run.dir).parent if getattr(run, "dir", None) else None
        run.finish(exit_code=1 if failed else 0)
    log.info("sweep summary logged to wandb (group %s, %s mode): %s", group, mode, run_dir)
    return run_dir


# --------------------------------------------------------------------------------------------
# the entry point


def _tmp_path(path: Path) -> Path:
    """A temporary name next to ``path``, unique per process (jobs of a parallel launcher may
    aggregate at the same time); written there, then renamed over ``path`` (atomic)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _write_text(path: Path, text: str) -> None:
    tmp = _tmp_path(path)
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def aggregate_sweep(
    sweep_dir: Path | str,
    tracker_cfg: Any = None,
    *,
    curves: bool = True,
    log_wandb: bool = True,
) -> SweepResult:
    """Build the sweep table of a Hydra multirun folder and write it (CSV + Markdown), a curve per
    numeric swept key (PNG), and, when the jobs logged to wandb, a ``sweep-summary`` wandb run.

    ``tracker_cfg`` is a logger block (``backend``, ``project``, ``entity``, ``mode``, ``group``,
    ``tags``); by default the first job's ``.hydra/config.yaml`` says. Jobs without a
    ``summary.json`` are listed in ``missing``. Raises ``SweepError`` when the folder holds no job.
    A failure while logging to wandb is logged, never raised.
    """
    sweep_dir = Path(sweep_dir).resolve()
    if not sweep_dir.is_dir():
        raise SweepError(f"no such sweep folder: {sweep_dir}")
    jobs = find_jobs(sweep_dir)
    if not jobs:
        raise SweepError(f"{sweep_dir} holds no Hydra job folder (a folder with .hydra/overrides.yaml)")
    swept = _swept_keys(jobs)
    table, metric_cols = _build_table(jobs, swept)
    numeric = [
        k
        for k in swept
        if len(table) and all(_is_number(v) for v in table[k].dropna()) and table[k].dropna().nunique() > 1
    ]
    result = SweepResult(
        sweep_dir=sweep_dir,
        table=table,
        swept_keys=swept,
        numeric_keys=numeric,
        metric_columns=metric_cols,
        jobs=jobs,
        missing=[j.name for j in jobs if not j.finished],
    )
    title = _protocol_line(jobs)
    result.csv_path = sweep_dir / CSV_NAME
    tmp = _tmp_path(result.csv_path)
    table.to_csv(tmp, index=False)
    os.replace(tmp, result.csv_path)
    if curves:
        for key in numeric:
            others = [k for k in swept if k != key]
            shown = _headline(table)[0]
            what = ", ".join(_name(m) for m in shown) if len(shown) <= 4 else "the headline metrics"
            plot_title = f"{title}\n{what} vs {key}"
            try:
                result.curves[key] = _plot_curve(
                    table, key, others, plot_title, sweep_dir / f"curve_{_safe_name(key)}.png"
                )
            except Exception as error:  # a plot must not lose the table
                log.warning("curve for %s not drawn: %s: %s", key, type(error).__name__, error)
    result.md_path = sweep_dir / MD_NAME
    _write_text(result.md_path, _markdown(result, title))
    if log_wandb:
        try:
            result.wandb_dir = _log_wandb(result, _logger_cfg(jobs, tracker_cfg), title)
        except Exception as error:
            log.warning("sweep summary not logged to wandb: %s: %s", type(error).__name__, error)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m runner.sweep",
        description="Rebuild the sweep table (CSV, Markdown) and curves (PNG) of a Hydra multirun folder.",
    )
    parser.add_argument("sweep_dir", type=Path, help="the multirun folder (hydra.sweep.dir)")
    parser.add_argument("--no-curves", action="store_true", help="write the table only")
    parser.add_argument("--no-wandb", action="store_true", help="do not log the sweep-summary wandb run")
    parser.add_argument("--quiet", action="store_true", help="do not print the Markdown table")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = aggregate_sweep(args.sweep_dir, curves=not args.no_curves, log_wandb=not args.no_wandb)
    except SweepError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not args.quiet and result.md_path:
        print(result.md_path.read_text(encoding="utf-8"))
    print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
