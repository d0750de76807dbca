"""The locality and portability probe sets of Yao et al. 2023 as the SSS paper (seed 002, section 7)
evaluates on them: the bundled files, the probe sets they become, their metrics, and a run that
reports them. Fast, no network."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest

from editors.requests import EditRequest
from evaluation.cases import EditCase, Probe
from evaluation.metrics import METRICS, SSS_PROBE_METRICS, case_metrics, score_case_probes
from evaluation.scoring import ProbeScore, score_probes
from runner.datasets import bundled_path, cases_from_records, load_cases
from tests.conftest import compose_config

# name -> (file, records, cases, sha256): records and sha256 as in shared/data/SOURCES.md "probes/"
# and runner/data/SOURCES.md; cases < records where a record cannot locate its subject (skipped).
PROBE_FILES = {
    "cf_distract_neighbor": (
        "counterfact_distracting_neighbor.json",
        804,
        804,
        "b3a6ed985620f3db707bf655e3d016a136635999f318e839be8f3b5795a016aa",
    ),
    "cf_one_hop": (
        "counterfact_portability_gpt4.json",
        1031,
        1031,
        "fac215b31d9481a33e055ac85145d1d711217dfd20ad3c45e61fc2d6b540c5ed",
    ),
    "cf_subject_replace": (
        "counterfact_subject_replace.json",
        213,
        213,
        "36a81b8dd513680743347d94acd00fd5f3e25baafbe6ebe951e16ff0f36f9b9d",
    ),
    "zsre_subject_replace": (
        "zsre_subject_replace.json",
        293,
        289,
        "bcb6d394b390329828898799220916ebc0ae95617c8c94fc60bf527692e41740",
    ),
    "zsre_reversed_relation": (
        "zsre_inverse_relation.json",
        385,
        380,
        "34d07e57e0b8273f9418eb1925c38ba0294d94b986f5b291df41d968b0fe06e3",
    ),
}
# the probe sets every case of each file has, beyond rewrite and paraphrase
PROBE_SETS = {
    "cf_distract_neighbor": {
        "neighborhood",
        "attribute",
        "distract_neighbor",
        "unrelated_attribute",
        "one_hop",
    },
    "cf_one_hop": {"neighborhood", "attribute", "one_hop"},
    "cf_subject_replace": {"neighborhood", "attribute", "subject_replace"},
    "zsre_subject_replace": {"subject_replace"},
    "zsre_reversed_relation": {"reversed_relation"},
}


def _dataset(name: str, **over: object):
    """The bundled file loaded with the settings of its conf/dataset/<name>.yaml (all records)."""
    cfg = compose_config(f"dataset={name}").dataset
    return load_cases(
        name,
        on_invalid=over.get("on_invalid", cfg.on_invalid),
        target_field=over.get("target_field", cfg.target_field),
        size=over.get("size"),
    )


@pytest.mark.parametrize("name", sorted(PROBE_FILES))
def test_bundled_probe_file_is_the_published_one_and_parses(name: str) -> None:
    file, n_records, n_cases, sha = PROBE_FILES[name]
    ds = _dataset(name)
    assert Path(ds.path) == bundled_path(name) and Path(ds.path).name == file
    assert ds.sha256 == sha == hashlib.sha256(Path(ds.path).read_bytes()).hexdigest()
    assert sha in (bundled_path(name).parents[1] / "SOURCES.md").read_text()
    assert ds.n_records == n_records == len(json.loads(Path(ds.path).read_bytes()))
    assert len(ds.cases) == n_cases and ds.n_skipped == n_records - n_cases
    assert all("subject" in reason and "not found in src" in reason for reason in ds.skipped_reasons)
    for case in ds.cases:
        assert set(case.probes) == {"rewrite", "paraphrase"} | PROBE_SETS[name], case.case_id
        assert all(probes for probes in case.probes.values())


def test_counterfact_probe_sets_follow_the_seed_definitions() -> None:
    """Record 0 of the distracting-neighbour file (edit: Spike Hughes originates from London ->
    Philadelphia): the pairwise sets put the object that must win first (target), the other as foil."""
    [case] = _dataset("cf_distract_neighbor", size=1).cases
    rec = json.loads(bundled_path("cf_distract_neighbor").read_bytes())[0]
    old, new = "London", "Philadelphia"
    assert (case.request.target_true, case.request.target_new) == (old, new)
    # Pre-Neighbor: the neighbourhood prompts, old object wins (the `locality` metric)
    assert case.probes["neighborhood"] == tuple(Probe(p, old, new) for p in rec["neighborhood_prompts"])
    # Post-Neighbor: attribute prompts (other subjects whose true object IS the new one), new wins
    assert case.probes["attribute"] == tuple(Probe(p, new, old) for p in rec["attribute_prompts"])
    # Distract-Neighbor: the edit statement, then a Pre-Neighbor prompt; old still wins
    distract = case.probes["distract_neighbor"]
    assert distract[0] == Probe(
        "Spike Hughes originates from Philadelphia. Max Mosley originates from", old, new
    )
    assert [p.prompt for p in distract] == [
        f"Spike Hughes originates from Philadelphia. {p}" for p in rec["neighborhood_prompts"]
    ]
    # Unrelated Attributes and One-Hop: token accuracy of the answer (no foil)
    assert case.probes["unrelated_attribute"] == (Probe("What is Spike Hughes an instance of?", "human"),)
    assert case.probes["one_hop"] == (
        Probe(
            "What famous food is associated with the city where Spike Hughes originates from?", "Cheesesteaks"
        ),
    )
    assert case.meta["unrelated_relation"] == "instance of"
    assert case.meta["recalled_relation"] == "(Philadelphia, known for, cheesesteaks)"

    [sr] = _dataset("cf_subject_replace", size=1).cases  # May Wright Sewall alias Mary Eliza Wright
    assert sr.probes["subject_replace"] == (
        Probe("Mary Eliza Wright passed away in", "Birmingham", "Indianapolis"),
    )
    assert sr.meta["alternative_subject"] == "Mary Eliza Wright"


def test_zsre_probe_sets_follow_the_seed_definitions() -> None:
    [sr] = _dataset("zsre_subject_replace", size=1).cases  # NGC 3953: Ursa Major -> Triangulum
    assert sr.request.target_new == "Triangulum"
    assert sr.probes["subject_replace"] == (Probe("What is the constellation of UGC 6870?", "Triangulum"),)
    assert "neighborhood" not in sr.probes and sr.meta["loc"] is None  # these files have no loc/loc_ans
    [rr] = _dataset("zsre_reversed_relation", size=1).cases  # Claire Clairmont's sister -> Marian Clairmont
    assert rr.request.target_new == "Marian Clairmont"
    assert rr.probes["reversed_relation"] == (Probe("Who is Marian Clairmont's sister?", "Claire Clairmont"),)

    # With answers[0] as the new object: the alias question still asks for it; the inverse
    # question names `alt`, so it is dropped (as EasyEdit's portability questions are).
    [sr_answers] = _dataset("zsre_subject_replace", size=1, target_field="answers").cases
    assert sr_answers.probes["subject_replace"] == (
        Probe("What is the constellation of UGC 6870?", "Ursa Major"),
    )
    [rr_answers] = _dataset("zsre_reversed_relation", size=1, target_field="answers").cases
    assert (
        "reversed_relation" not in rr_answers.probes and "alt" in rr_answers.meta["reversed_relation_dropped"]
    )


def test_malformed_probe_fields_name_the_problem() -> None:
    rec = json.loads(bundled_path("cf_distract_neighbor").read_bytes())[0]
    for field, value, problem in [
        ("unrelated_relation", "human", "'unrelated_relation' must be an object"),
        ("unrelated_relation", {"question": "Q?", "object": " "}, "empty target 'unrelated_relation.object'"),
        (
            "distracting_neighborhood_prompts",
            ["ok", 3],
            "'distracting_neighborhood_prompts[1]' must be a string",
        ),
        ("alternative_subject", "", "empty 'alternative_subject'"),
        ("portability", {"New Question": "Q?"}, "missing field 'portability.New Answer'"),
    ]:
        with pytest.raises(ValueError, match=problem.replace("[", r"\[").replace("]", r"\]")):
            cases_from_records([{**rec, field: value}], file="x.json")
    zsre = json.loads(bundled_path("zsre_subject_replace").read_bytes())[0]
    with pytest.raises(ValueError, match="missing field 'loc_ans'"):  # loc and loc_ans: both or neither
        cases_from_records([{**zsre, "loc": "nq question: who"}], file="x.json")
    [case], _, _ = cases_from_records([{**zsre, "loc": "nq question: who", "loc_ans": "me"}], file="x.json")
    assert case.probes["neighborhood"] == (Probe("nq question: who?", "me"),)


# --- metrics ------------------------------------------------------------------------------------


def _ps(lp: float, foil: float | None = None, acc: float = 0.0, exact: bool = False) -> ProbeScore:
    return ProbeScore(
        target_logprob=lp, target_token_acc=acc, target_exact=exact, foil_logprob=foil, n_target_tokens=2
    )


def test_each_probe_metric_is_the_hand_computation() -> None:
    old, new = "London", "Philadelphia"
    pair_old, pair_new = Probe("p", old, new), Probe("p", new, old)
    plain = Probe("q", "a")
    case = EditCase(
        request=EditRequest("c", "{} originates from", "Spike Hughes", new, old),
        probes={
            "rewrite": (pair_new,),
            "neighborhood": (pair_old,) * 2,
            "attribute": (pair_new,) * 2,
            "distract_neighbor": (pair_old,) * 3,
            "unrelated_attribute": (plain,),
            "subject_replace": (pair_new,),
            "one_hop": (plain,) * 2,
            "reversed_relation": (plain,) * 2,
        },
    )
    scores = {
        "rewrite": [_ps(-1.0, -2.0)],
        "neighborhood": [_ps(-1.0, -3.0), _ps(-4.0, -1.0)],  # old wins, then loses
        "attribute": [_ps(-0.5, -2.5, exact=True), _ps(-2.0, -1.0)],  # new wins, then loses
        "distract_neighbor": [_ps(-1.0, -2.0), _ps(-3.0, -1.0), _ps(-2.0, -2.0)],  # win, loss, tie
        "unrelated_attribute": [_ps(-0.7, acc=0.5)],
        "subject_replace": [_ps(-3.0, -1.0)],
        "one_hop": [_ps(-1.0, acc=1.0, exact=True), _ps(-5.0, acc=0.0)],
        "reversed_relation": [_ps(-1.0, acc=1 / 3), _ps(-2.0, acc=2 / 3)],
    }
    out = case_metrics(case, scores)
    e = math.exp
    expected = {
        "efficacy": 1.0,
        "locality": 0.5,  # Pre-Neighbor
        "locality_magnitude": ((e(-1) - e(-3)) + (e(-4) - e(-1))) / 2,
        "attribute": 0.5,  # Post-Neighbor
        "attribute_magnitude": ((e(-0.5) - e(-2.5)) + (e(-2) - e(-1))) / 2,
        "attribute_acc": 0.5,
        "distract_neighbor": 1 / 3,
        "distract_neighbor_magnitude": ((e(-1) - e(-2)) + (e(-3) - e(-1)) + 0.0) / 3,
        "distract_neighbor_acc": 0.0,
        "unrelated_attribute": 0.5,
        "unrelated_attribute_acc": 0.0,
        "subject_replace": 0.0,
        "subject_replace_magnitude": e(-3) - e(-1),
        "one_hop": 0.5,
        "one_hop_acc": 0.5,
        "reversed_relation": 0.5,
        "reversed_relation_acc": 0.0,
    }
    assert {k: out[k] for k in expected} == pytest.approx(expected)
    # token-accuracy sets have no magnitude; no set is reported under a second name
    assert not {"unrelated_attribute_magnitude", "one_hop_magnitude", "reversed_relation_magnitude"} & set(
        out
    )
    assert not {"pre_neighbor", "post_neighbor", "neighborhood"} & set(out)


def test_probe_metrics_are_registered_with_direction_and_paper_name() -> None:
    for paper_name, metric in SSS_PROBE_METRICS.items():
        info = METRICS[metric]
        assert info.higher_is_better and info.aggregation == "mean" and info.scale == 100.0
        if metric != "locality":
            assert info.description.startswith(paper_name), (metric, info.description)
        assert not metric.startswith(("pre_", "post_"))  # the runner's pre-/post-edit prefixes
    assert (
        SSS_PROBE_METRICS["Pre-Neighbor"] == "locality" and SSS_PROBE_METRICS["Post-Neighbor"] == "attribute"
    )


def test_probe_metrics_on_a_tiny_model_equal_the_scorer_by_hand(tiny_gpt2, tiny_tokenizer) -> None:
    """Scored through the batched path (packed target/foil rows), each set's metric equals the
    comparison computed by hand from one-at-a-time scores of its probes."""
    [case] = _dataset("cf_distract_neighbor", size=1).cases
    [per_set] = score_case_probes(tiny_gpt2, tiny_tokenizer, [case], batch_size=16)
    out = case_metrics(case, per_set)
    for set_name, metric in [
        ("neighborhood", "locality"),
        ("attribute", "attribute"),
        ("distract_neighbor", "distract_neighbor"),
    ]:
        probes = case.probes[set_name]
        one = score_probes(tiny_gpt2, tiny_tokenizer, probes, batch_size=1)
        assert out[metric] == pytest.approx(sum(s.target_logprob > s.foil_logprob for s in one) / len(one))
    for set_name in ("unrelated_attribute", "one_hop"):
        [one] = score_probes(tiny_gpt2, tiny_tokenizer, case.probes[set_name], batch_size=1)
        assert one.foil_logprob is None and out[set_name] == pytest.approx(one.target_token_acc)


# --- a run reports them -------------------------------------------------------------------------


def _run(tmp_path: Path, *overrides: str) -> dict:
    from runner import run

    summary = run(
        compose_config(
            "stats.n_samples=150",
            "threads=1",
            "progress=false",
            "logger=none",
            "eval=fast",
            "model=tiny-gpt2",
            f"paths.cache_dir={tmp_path.parent / 'shared-cache'}",
            f"paths.output_dir={tmp_path / 'out'}",
            *overrides,
        )
    )
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["metrics"] == summary["metrics"]
    return summary


def test_runs_report_the_probe_metrics_in_summary_json(tmp_path: Path) -> None:
    cf = _run(tmp_path / "cf", "dataset=cf_distract_neighbor", "dataset.size=2", "batch_size=2")
    assert cf["n_cases"] == 2 and cf["protocol"]["dataset"]["schema"] == "rome"
    for phase in ("pre", "post"):
        for metric in ("locality", "attribute", "distract_neighbor", "unrelated_attribute", "one_hop"):
            entry = cf["metrics"][phase][metric]
            assert entry["n"] == 2 and 0 <= entry["mean"] <= 100
    assert {"efficacy", "generality", "locality", "score"} <= cf.keys()
    records = [
        json.loads(line) for line in (tmp_path / "cf" / "out" / "results.jsonl").read_text().splitlines()
    ]
    assert {"pre_distract_neighbor", "post_distract_neighbor", "post_one_hop_acc"} <= records[0].keys()

    zsre = _run(tmp_path / "z", "dataset=zsre_reversed_relation", "dataset.size=2", "batch_size=2")
    first = json.loads((tmp_path / "z" / "out" / "results.jsonl").read_text().splitlines()[0])
    assert first["target_new"] == "Marian Clairmont"  # target_field=alt, as the file means it
    assert zsre["metrics"]["post"]["reversed_relation"]["n"] == 2
    assert "locality" not in zsre["metrics"]["post"] and "score" not in zsre  # no loc/loc_ans in the file
