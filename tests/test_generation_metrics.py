"""Fluency (n-gram entropy), Consistency (TF-IDF), batched generation and their runner set-up."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from editors.requests import EditRequest
from evaluation.cases import EditCase, Probe
from evaluation.consistency import AttributeSnippets, TfIdf, dataset_references
from evaluation.fluency import WordTokenizer, case_fluency, ngram_entropy, weighted_entropy
from evaluation.generation import GenerationMetrics, GenerationSettings, generate_ids, generate_texts
from runner.generation import ConsistencySetupError, GenerationEvalConfig, build_generation_metrics


def _case(cid, subject, new, true, neighbors=(), meta=None, gen=()):
    request = EditRequest(cid, "The capital of {} is", subject, new, true)
    probes = {
        "rewrite": (Probe(request.text, new, true),),
        "paraphrase": (Probe(f"{subject}'s capital is", new, true),),
        "neighborhood": tuple(Probe(p, a, new) for p, a in neighbors),
    }
    return EditCase(request, probes, generation_prompts=tuple(gen), meta=meta or {}, true_answer=true)


# ---------------------------------------------------------------------------------------------- fluency


def test_ngram_entropy_by_hand():
    tokens = ["a", "b", "a", "b"]
    # 2-grams: (a,b) x2, (b,a) x1 -> p = 2/3, 1/3
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert ngram_entropy(tokens, 2) == pytest.approx(h2)
    # 3-grams: (a,b,a), (b,a,b): uniform over 2 -> 1 bit
    assert ngram_entropy(tokens, 3) == pytest.approx(1.0)
    assert weighted_entropy(tokens) == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    assert ngram_entropy(["a"], 2) == 0.0


def test_repetitive_text_is_less_fluent():
    tok = WordTokenizer()
    varied = "The river flows past the old mill, and children play near the bridge in summer."
    repeated = "the the the the the the the the the the the the the the the the"
    assert case_fluency([varied], tok) > case_fluency([repeated], tok) == 0.0
    assert tok("Paris is big.") == ["Paris", "is", "big", "."]
    assert tok.name  # recorded in summary.json


# ---------------------------------------------------------------------------------------------- TF-IDF


def test_tfidf_cosine_by_hand():
    tfidf = TfIdf({"aa": 0, "bb": 1}, np.array([1.0, 2.0]), source="test")
    # "aa aa bb" -> [2*1, 1*2] = [2, 2]; "bb" -> [0, 2]: cosine = 2*2 / (sqrt(8) * 2)
    assert tfidf.similarity("aa aa bb", "BB") == pytest.approx(1 / math.sqrt(2))
    assert tfidf.similarity("zz", "aa") == 0.0  # no known token: zero vector
    with pytest.raises(ValueError, match="IDF vector"):
        TfIdf({"aa": 0}, np.array([1.0, 2.0]), source="bad")


def test_tfidf_matches_scikit_learn():
    sklearn = pytest.importorskip("sklearn.feature_extraction.text")
    docs = ["the cat sat on the mat", "the dog ate my homework", "a cat and a dog", "homework is due"]
    ours = TfIdf.fit(docs, source="docs")
    ref = sklearn.TfidfVectorizer().fit(docs)
    assert ours.vocabulary == ref.vocabulary_
    np.testing.assert_allclose(ours.idf, ref.idf_)
    a, b = "the cat ate the homework", "a dog sat on a cat"
    enc = ref.transform([a, b]).toarray()
    assert ours.similarity(a, b) == pytest.approx(float(enc[0] @ enc[1]))


def test_attribute_snippets_and_dataset_references(tmp_path):
    path = tmp_path / "attribute_snippets.json"
    path.write_text(json.dumps([{"relation_id": "P1", "target_id": "Q2", "samples": [{"text": "x y"}]}]))
    snippets = AttributeSnippets.load(path)
    assert snippets.for_case(
        _case("0", "A", "Rome", "Paris", meta={"relation_id": "P1", "target_new_id": "Q2"})
    ) == ["x y"]
    assert snippets.for_case(_case("1", "A", "Rome", "Paris")) is None  # no ids
    path.write_text(json.dumps([{"relation": "P1"}]))
    with pytest.raises(ValueError, match="record 0"):
        AttributeSnippets.load(path)

    cases = [
        _case("0", "France", "Rome", "Paris", neighbors=[("Lazio's capital is", "Rome")]),
        _case("1", "Italy", "Paris", "Rome"),
        _case("2", "Rome", "Berlin", "Paris"),
    ]
    refs = dataset_references(cases)
    # case 0's new object is Rome: case 1 states it (Italy -> Rome) and its own neighborhood prompt does
    assert refs["0"] == ["Lazio's capital is Rome", "The capital of Italy is Rome"]  # dataset order
    # case 1's new object is Paris: cases 0 and 2 state it
    assert refs["1"] == ["The capital of France is Paris", "The capital of Rome is Paris"]
    assert refs["2"] == []  # nobody has Berlin


# ---------------------------------------------------------------------------------------------- generation


def test_greedy_batched_generation_equals_one_at_a_time(tiny_gpt2, tiny_tokenizer):
    """Left padding and per-row budgets: with top_k=1 (greedy) a batch of prompts of different
    lengths gives exactly what each prompt gives alone, and every row is max_length tokens."""
    prompts = ["The capital of France is", "A", "The mother tongue of Danielle Darrieux is", "Paris"]
    settings = GenerationSettings(max_length=24, top_k=1, batch_size=8, max_spread=50)
    batched = generate_ids(tiny_gpt2, tiny_tokenizer, prompts, settings)
    alone = [generate_ids(tiny_gpt2, tiny_tokenizer, [p], settings)[0] for p in prompts]
    assert batched == alone
    assert all(len(ids) == 24 for ids in batched)
    for p, ids in zip(prompts, batched):
        assert ids[: len(tiny_tokenizer(p)["input_ids"])] == tiny_tokenizer(p)["input_ids"]


def test_sampling_is_seeded_and_keeps_the_prompt(tiny_gpt2, tiny_tokenizer):
    prompts = ["The capital of France is", "Paris is"]
    settings = GenerationSettings(max_length=20, top_k=5, seed=3)
    a = generate_texts(tiny_gpt2, tiny_tokenizer, prompts, settings)
    b = generate_texts(tiny_gpt2, tiny_tokenizer, prompts, settings)
    assert a == b and all(t.startswith(p) for t, p in zip(a, prompts))
    with pytest.raises(ValueError, match="max_length"):
        generate_texts(tiny_gpt2, tiny_tokenizer, ["word " * 40], settings)


def test_generation_metrics_per_case(tiny_gpt2, tiny_tokenizer):
    cases = [_case("0", "France", "Rome", "Paris", gen=["France is"]), _case("1", "Italy", "Paris", "Rome")]
    refs = {"0": ["Rome is a city"], "1": []}
    tfidf = TfIdf.fit(["Rome is a city", "France is a country"], source="t")
    metrics = GenerationMetrics(GenerationSettings(max_length=16), tfidf, lambda c: refs[c.case_id])
    rows = metrics(tiny_gpt2, tiny_tokenizer, cases)
    assert rows[0]["generation_prompts"] == "record" and len(rows[0]["generations"]) == 1
    assert "consistency" in rows[0] and "consistency" not in rows[1]  # no references for case 1
    assert rows[1]["generation_prompts"] == "rewrite+paraphrase prompts" and len(rows[1]["generations"]) == 2
    assert rows[0]["fluency"] >= 0
    only_record = GenerationMetrics(
        GenerationSettings(max_length=16), None, lambda c: None, prompt_source="record"
    )
    assert "fluency" not in only_record(tiny_gpt2, tiny_tokenizer, cases[1:])[0]


def test_consistency_setup(tmp_path):
    cases = [_case("0", "France", "Rome", "Paris", meta={"relation_id": "P1", "target_new_id": "Q2"})]
    cfg = GenerationEvalConfig(consistency="rome")
    with pytest.raises(ConsistencySetupError, match="eval.generation.download=true"):
        build_generation_metrics(cfg, cases, tmp_path, seed=0)
    _, protocol = build_generation_metrics(GenerationEvalConfig(), cases, tmp_path, seed=0)
    assert protocol["consistency_source"] == "dataset" and protocol["comparable_with_papers"] is False
    rome = tmp_path / "rome_data"
    rome.mkdir()
    (rome / "attribute_snippets.json").write_text(
        json.dumps([{"relation_id": "P1", "target_id": "Q2", "samples": [{"text": "Rome is big"}]}])
    )
    (rome / "tfidf_vocab.json").write_text(json.dumps({"rome": 0, "is": 1, "big": 2}))
    np.save(rome / "idf.npy", np.array([2.0, 1.0, 1.5]))
    metrics, protocol = build_generation_metrics(GenerationEvalConfig(), cases, tmp_path, seed=0)
    assert protocol["consistency_source"] == "rome" and protocol["comparable_with_papers"] is True
    assert metrics.references(cases[0]) == ["Rome is big"]
    no_ids = [_case("1", "Italy", "Paris", "Rome")]
    with pytest.raises(ConsistencySetupError, match="relation and target ids"):
        build_generation_metrics(cfg, no_ids, tmp_path, seed=0)
