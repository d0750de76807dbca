"""Evaluation: EditCases and probes, one batched scorer, the metric registry, aggregation, tables."""

from evaluation.aggregate import (
    aggregate,
    aggregate_by_prefix,
    aggregate_prefixed,
    harmonic_mean,
    register_aggregation,
)
from evaluation.cases import EditCase, Probe
from evaluation.metrics import (
    METRICS,
    MetricInfo,
    UnknownMetricError,
    case_metrics,
    register_metric,
    score_case_probes,
    score_cases,
)
from evaluation.scoring import ProbeScore, score_probes
from evaluation.tables import format_table

__all__ = [
    "METRICS",
    "EditCase",
    "MetricInfo",
    "Probe",
    "ProbeScore",
    "UnknownMetricError",
    "aggregate",
    "aggregate_by_prefix",
    "aggregate_prefixed",
    "case_metrics",
    "format_table",
    "harmonic_mean",
    "register_aggregation",
    "register_metric",
    "score_case_probes",
    "score_cases",
    "score_probes",
]
