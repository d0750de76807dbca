"""Metric registry, per-case metrics, aggregation and tables, on hand-made scores."""

from __future__ import annotations

import math
import statistics

import pytest

from editors.requests import EditRequest
from evaluation.aggregate import aggregate, aggregate_by_prefix, aggregate_prefixed, harmonic_mean
from evaluation.cases import EditCase, Probe
from evaluation.metrics import (
    METRICS,
    UnknownMetricError,
    case_metrics,
    probe_set_metrics,
    register_metric,
    score_case_probes,
    score_cases,
)
from evaluation.scoring import ProbeScore, score_probes
from evaluation.tables import format_table


def ps(lp: float, foil: float | None = None, acc: float = 0.0, exact: bool = False, n: int = 2):
    return ProbeScore(
        target_logprob=lp, target_token_acc=acc, target_exact=exact, foil_logprob=foil, n_target_tokens=n
    )


def make_case(case_id: str, probes: dict[str, tuple[Probe, ...]]) -> EditCase:
    request = EditRequest(case_id, "The mother tongue of {} is", "Danielle Darrieux", "English", "French")
    return EditCase(request=request, probes=probes)


# --- per-case metrics -------------------------------------------------------------------------


def test_success_and_magnitude_with_foils():
    scores = [ps(-1.0, -2.0, exact=True), ps(-3.0, -1.0), ps(-2.0, -2.0)]  # win, loss, tie (not a win)
    out = probe_set_metrics("efficacy", scores)
    assert out["efficacy"] == pytest.approx(1 / 3)
    expected_mag = ((math.exp(-1) - math.exp(-2)) + (math.exp(-3) - math.exp(-1)) + 0.0) / 3
    assert out["efficacy_magnitude"] == pytest.approx(expected_mag)
    assert out["efficacy_acc"] == pytest.approx(1 / 3)
    assert set(out) == {"efficacy", "efficacy_magnitude", "efficacy_acc"}


def test_token_accuracy_without_foils():
    scores = [ps(-1.0, acc=0.5), ps(-2.0, acc=1.0, exact=True), ps(-9.0, acc=0.0)]
    out = probe_set_metrics("generality", scores)
    assert out == pytest.approx({"generality": 0.5, "generality_acc": 1 / 3})


def test_mixed_foils_is_an_error():
    with pytest.raises(ValueError, match="mixes"):
        probe_set_metrics("efficacy", [ps(-1.0, -2.0), ps(-1.0)])


def test_case_metrics_name_mapping():
    p = Probe("x", "y", "z")
    case = make_case(
        "c0",
        {"rewrite": (p,), "paraphrase": (p, p), "neighborhood": (p,), "attribute": (p,), "portability": ()},
    )
    scores = {
        "rewrite": [ps(-1.0, -2.0)],
        "paraphrase": [ps(-1.0, -2.0), ps(-3.0, -2.0)],
        "neighborhood": [ps(-5.0, -1.0)],  # the old object (target) loses: locality failure
        "attribute": [ps(-1.0, -1.5, exact=True)],
    }
    out = case_metrics(case, scores)
    assert out["efficacy"] == 1.0 and out["generality"] == 0.5 and out["locality"] == 0.0
    assert out["locality_magnitude"] == pytest.approx(math.exp(-5) - math.exp(-1))
    assert out["attribute"] == 1.0 and out["attribute_acc"] == 1.0
    assert not any(k.startswith("portability") for k in out)  # empty set: no metric
    assert "attribute" in METRICS and "attribute_magnitude" in METRICS  # extra set auto-registered
    with pytest.raises(ValueError, match="2 probes"):
        case_metrics(case, {**scores, "paraphrase": scores["rewrite"]})
    with pytest.raises(KeyError, match="attribute"):
        case_metrics(case, {k: v for k, v in scores.items() if k != "attribute"})


# --- registry ---------------------------------------------------------------------------------


def test_unknown_metric_suggests_close_names():
    with pytest.raises(UnknownMetricError, match="did you mean 'efficacy'"):
        METRICS["efficasy"]
    with pytest.raises(KeyError):
        METRICS["no_such_metric_at_all"]
    assert METRICS["post_locality"].name == "locality"
    assert METRICS["pre_efficacy_magnitude"].name == "efficacy_magnitude"
    assert METRICS["score"].aggregation == "harmonic_mean"


def test_register_metric_decorator_and_conflicts():
    try:

        @register_metric("_test_perplexity", higher_is_better=False, scale=1.0)
        def perplexity():
            return 1.0

        assert perplexity() == 1.0  # the decorated function is returned unchanged
        assert METRICS["_test_perplexity"].arrow == "↓"
        register_metric("_test_perplexity", higher_is_better=False, scale=1.0)  # same settings: fine
        with pytest.raises(ValueError, match="already registered"):
            register_metric("_test_perplexity", higher_is_better=True)
    finally:
        METRICS.unregister("_test_perplexity")


# --- aggregation ------------------------------------------------------------------------------


def test_aggregate_mean_stderr_n_by_hand():
    per_case = [
        {"efficacy": 1.0, "generality": 0.5, "locality": 0.9},
        {"efficacy": 0.0, "generality": 1.0, "locality": 0.7},
        {"efficacy": 1.0, "generality": 0.0},  # no locality: skipped for it
        {"efficacy": 1.0, "generality": 0.5, "locality": 0.8, "case_id": "not a number"},
    ]
    s = aggregate(per_case)
    eff = [1.0, 0.0, 1.0, 1.0]
    assert s["efficacy"]["mean"] == pytest.approx(75.0)
    assert s["efficacy"]["stderr"] == pytest.approx(100 * statistics.stdev(eff) / math.sqrt(4))
    assert s["efficacy"]["n"] == 4
    assert s["locality"]["n"] == 3 and s["locality"]["mean"] == pytest.approx(80.0)
    assert s["locality"]["stderr"] == pytest.approx(100 * statistics.stdev([0.9, 0.7, 0.8]) / math.sqrt(3))
    assert "case_id" not in s
    e, g, loc = 75.0, 50.0, 80.0
    assert s["score"]["mean"] == pytest.approx(3 / (1 / e + 1 / g + 1 / loc))
    assert s["score"]["n"] == 3 and s["score"]["stderr"] is None


def test_score_zero_missing_and_single_case():
    assert aggregate([{"efficacy": 1.0, "generality": 0.0, "locality": 1.0}])["score"]["mean"] == 0.0
    s = aggregate([{"efficacy": 1.0, "generality": 1.0}])
    assert "score" not in s
    assert s["efficacy"]["stderr"] is None and s["efficacy"]["n"] == 1
    assert harmonic_mean([2.0, 2.0, 2.0]) == pytest.approx(2.0)
    assert math.isnan(harmonic_mean([1.0, math.nan]))
    assert aggregate([]) == {}


def test_pre_and_post_summaries_have_the_same_names():
    per_case = [
        {
            "pre_efficacy": 0.0,
            "post_efficacy": 1.0,
            "pre_locality": 1.0,
            "post_locality": 1.0,
            "pre_generality": 0.0,
            "post_generality": 1.0,
            "case_id": "a",
        },
        {
            "pre_efficacy": 0.0,
            "post_efficacy": 0.0,
            "pre_locality": 1.0,
            "post_locality": 0.5,
            "pre_generality": 0.5,
            "post_generality": 0.5,
            "case_id": "b",
        },
    ]
    post = aggregate_prefixed(per_case, "post_")
    pre = aggregate_prefixed(per_case, "pre_")
    assert set(pre) == set(post) == {"efficacy", "generality", "locality", "score"}
    assert post["efficacy"]["mean"] == pytest.approx(50.0) and pre["efficacy"]["mean"] == 0.0
    assert pre["score"]["mean"] == 0.0
    assert post["score"]["mean"] == pytest.approx(harmonic_mean([50.0, 75.0, 75.0]))
    both = aggregate_by_prefix(per_case)
    assert set(both) == {"pre", "post"} and both["post"] == post


# --- tables -----------------------------------------------------------------------------------


def test_table_has_arrows_and_stderr_cells():
    try:
        register_metric("_test_loss", higher_is_better=False)
        pre = {
            "efficacy": {"mean": 12.345, "stderr": 1.5, "n": 10},
            "_test_loss": {"mean": 3.0, "stderr": None},
        }
        post = {"efficacy": {"mean": 99.0, "stderr": 0.25, "n": 10}, "score": {"mean": 80.0, "stderr": None}}
        table = format_table(
            [("pre", pre), ("post", post)], ["efficacy", "score", "_test_loss", "unregistered"]
        )
    finally:
        METRICS.unregister("_test_loss")
    lines = table.splitlines()
    assert lines[0] == "|  | efficacy ↑ | score ↑ | _test_loss ↓ | unregistered |"
    assert lines[2] == "| pre | 12.35 ± 1.50 | – | 3.00 | – |"
    assert lines[3] == "| post | 99.00 ± 0.25 | 80.00 | – | – |"
    default = format_table([("post", post)])
    assert "efficacy ↑" in default and "score ↑" in default


# --- end to end on the tiny model ------------------------------------------------------------


def test_score_cases_batches_across_cases(tiny_gpt2, tiny_tokenizer):
    cases = [
        make_case(
            "c0",
            {
                "rewrite": (Probe("The mother tongue of Danielle Darrieux is", "English", "French"),),
                "paraphrase": (
                    Probe("Danielle Darrieux, a native speaker of", "English", "French"),
                    Probe("Danielle Darrieux spoke the language", "English", "French"),
                ),
                "neighborhood": (Probe("The mother tongue of Marie Curie is", "French", "English"),),
            },
        ),
        make_case(
            "c1",
            {
                "rewrite": (Probe("Toko Yasuda plays the instrument", "piano"),),
                "paraphrase": (Probe("The instrument Toko Yasuda plays is the", "piano"),),
                "neighborhood": (Probe("nq question: who moved to Spain in 1907?", "Edwin of Northumbria"),),
            },
        ),
    ]
    per_case = score_cases(tiny_gpt2, tiny_tokenizer, cases, batch_size=3)
    raw = score_case_probes(tiny_gpt2, tiny_tokenizer, cases, batch_size=3)
    assert len(per_case) == 2
    for case, metrics, scores in zip(cases, per_case, raw):
        alone = {
            name: score_probes(tiny_gpt2, tiny_tokenizer, list(probes))
            for name, probes in case.probes.items()
        }
        expected = case_metrics(case, alone)
        assert set(metrics) == set(expected)
        assert metrics == pytest.approx(expected, abs=1e-6)
        assert {name: len(v) for name, v in scores.items()} == {n: len(p) for n, p in case.probes.items()}
    assert set(per_case[0]) >= {"efficacy", "efficacy_magnitude", "generality", "locality_acc"}
    assert "efficacy_magnitude" not in per_case[1]  # zsRE-style case: token accuracy only
    summary = aggregate(per_case)
    assert set(summary) >= {"efficacy", "generality", "locality", "score"}
