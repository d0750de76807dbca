"""Dataset-level summaries of per-case metrics.

``aggregate(per_case)`` gives ``{metric: {"mean", "stderr", "n"}}``: mean and standard error
over the cases that have the metric, times the metric's ``scale`` (100 = percent, as the papers
report). Metrics registered with a dataset-level aggregation (``score``: harmonic mean of the
efficacy, generality and locality means) are then computed from that summary.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from numbers import Real

from evaluation.metrics import METRICS, PREFIXES, MetricInfo

__all__ = [
    "DATASET_AGGREGATIONS",
    "Summary",
    "add_prefix",
    "aggregate",
    "aggregate_by_prefix",
    "aggregate_prefixed",
    "harmonic_mean",
    "mean_stderr",
    "register_aggregation",
]

#: metric name -> {"mean": float, "stderr": float | None, "n": int}
Summary = dict[str, dict]

#: aggregation name -> fn(metric info, summary of the per-case metrics) -> entry or None (missing)
DATASET_AGGREGATIONS: dict[str, Callable[[MetricInfo, Summary], dict | None]] = {}


def register_aggregation(name: str) -> Callable:
    """Decorator: register a dataset-level aggregation ``fn(info, summary) -> entry | None``."""

    def decorator(fn):
        if name == "mean":
            raise ValueError("'mean' is the per-case aggregation and cannot be redefined")
        DATASET_AGGREGATIONS[name] = fn
        return fn

    return decorator


def mean_stderr(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and standard error of the mean (sample std with ddof=1 over sqrt(n));
    the standard error is ``None`` for fewer than two values."""
    n = len(values)
    if n == 0:
        raise ValueError("mean of no values")
    mean = math.fsum(values) / n
    if n < 2:
        return mean, None
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def harmonic_mean(values: Sequence[float]) -> float:
    """Harmonic mean; 0 when any value is 0 (or negative), NaN when any is NaN."""
    if any(math.isnan(v) for v in values):
        return math.nan
    if any(v <= 0 for v in values):
        return 0.0
    return len(values) / math.fsum(1.0 / v for v in values)


@register_aggregation("harmonic_mean")
def _harmonic_mean_of_inputs(info: MetricInfo, summary: Summary) -> dict | None:
    if not info.inputs or any(name not in summary for name in info.inputs):
        return None
    means = [summary[name]["mean"] for name in info.inputs]
    return {
        "mean": harmonic_mean(means),
        "stderr": None,
        "n": min(summary[name]["n"] for name in info.inputs),
    }


def _is_number(value: object) -> bool:
    return isinstance(value, Real)


def aggregate(per_case: Sequence[Mapping[str, float]]) -> Summary:
    """Mean x scale, standard error x scale and n of every per-case metric (cases lacking a
    metric are skipped for it; non-numeric values are ignored), then the dataset-level metrics
    (``score``...) whose inputs are all present."""
    values: dict[str, list[float]] = {}
    for case in per_case:
        for key, value in case.items():
            if _is_number(value):
                values.setdefault(key, []).append(float(value))
    summary: Summary = {}
    for key, vals in values.items():
        info = METRICS.resolve(key)
        if info is not None and info.aggregation != "mean":
            continue  # dataset-level metric: computed below, never averaged over cases
        scale = info.scale if info is not None else 100.0
        mean, stderr = mean_stderr(vals)
        summary[key] = {
            "mean": mean * scale,
            "stderr": None if stderr is None else stderr * scale,
            "n": len(vals),
        }
    for info in METRICS.dataset_level():
        try:
            fn = DATASET_AGGREGATIONS[info.aggregation]
        except KeyError:
            raise KeyError(
                f"metric {info.name!r} uses unknown aggregation {info.aggregation!r} "
                f"(known: mean, {', '.join(sorted(DATASET_AGGREGATIONS))})"
            ) from None
        entry = fn(info, summary)
        if entry is not None:
            summary[info.name] = entry
    return summary


def aggregate_prefixed(per_case: Sequence[Mapping[str, float]], prefix: str) -> Summary:
    """``aggregate`` of the keys that start with ``prefix`` (e.g. ``"post_"``), with the prefix
    stripped, so pre- and post-edit summaries have the same metric names."""
    stripped = [
        {key[len(prefix) :]: value for key, value in case.items() if key.startswith(prefix)}
        for case in per_case
    ]
    return aggregate(stripped)


def aggregate_by_prefix(
    per_case: Sequence[Mapping[str, float]], prefixes: Sequence[str] = PREFIXES
) -> dict[str, Summary]:
    """``{"pre": summary, "post": summary}`` (each prefix without its trailing underscore);
    prefixes with no value in any case are left out."""
    out: dict[str, Summary] = {}
    for prefix in prefixes:
        if any(key.startswith(prefix) for case in per_case for key in case):
            out[prefix.rstrip("_")] = aggregate_prefixed(per_case, prefix)
    return out


def add_prefix(metrics: Mapping[str, float], prefix: str) -> dict[str, float]:
    """``{"efficacy": x}`` -> ``{"post_efficacy": x}`` for ``prefix="post_"``."""
    return {f"{prefix}{key}": value for key, value in metrics.items()}
