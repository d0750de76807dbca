"""Unlearning metrics (evaluation.unlearning) against hand computations."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from evaluation.cases import QAItem, SplitRoles
from evaluation.metrics import METRICS
from evaluation.unlearning import (
    REFUSAL_KEYWORDS,
    forget_quality,
    greedy_generate,
    is_refusal,
    mia_auc,
    min_k_logprob,
    model_utility,
    privleak,
    rouge_l_recall,
    score_items,
    summarize_unlearning,
    truth_ratio,
)


def _ks_statistic(a, b) -> float:
    """max over all points t of |F_a(t) - F_b(t)| (empirical CDFs)."""
    points = sorted(set(a) | set(b))
    return max(abs(sum(x <= t for x in a) / len(a) - sum(x <= t for x in b) / len(b)) for t in points)


def test_forget_quality_is_the_exact_two_sample_ks_p_value():
    a = [0.1, 0.4, 0.7]
    b = [0.2, 0.3, 0.5, 0.9, 1.1]
    d = _ks_statistic(a, b)
    # exact p without ties: the fraction of the C(8, 3) splits of the pooled sample with D >= d
    pooled = a + b
    splits = list(itertools.combinations(range(len(pooled)), len(a)))
    hits = 0
    for chosen in splits:
        x = [pooled[i] for i in chosen]
        y = [pooled[i] for i in range(len(pooled)) if i not in chosen]
        hits += _ks_statistic(x, y) >= d - 1e-12
    from scipy.stats import ks_2samp

    assert ks_2samp(a, b).statistic == pytest.approx(d)
    assert forget_quality(a, b) == pytest.approx(hits / len(splits))
    assert forget_quality(a, a) == pytest.approx(1.0)
    # a monotone map of both samples (TOFU tests 1/R, open-unlearning R) keeps the p-value
    assert forget_quality([1 / v for v in a], [1 / v for v in b]) == pytest.approx(forget_quality(a, b))


def test_model_utility_is_the_harmonic_mean():
    assert model_utility([0.5, 0.25, 1.0]) == pytest.approx(3 / (2 + 4 + 1))
    assert model_utility([0.5, 0.0, 1.0]) == 0.0


def test_mia_auc_counts_ordered_pairs():
    members = [0.9, 0.4, 0.7]
    nonmembers = [0.3, 0.4, 0.8, 0.1]
    pairs = sum((m > n) + 0.5 * (m == n) for m in members for n in nonmembers)
    assert mia_auc(members, nonmembers) == pytest.approx(pairs / (len(members) * len(nonmembers)))
    assert mia_auc([1.0, 2.0], [3.0, 4.0]) == 0.0


def _lcs(x, y) -> int:
    table = [[0] * (len(y) + 1) for _ in range(len(x) + 1)]
    for i, a in enumerate(x):
        for j, b in enumerate(y):
            table[i + 1][j + 1] = table[i][j] + 1 if a == b else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def test_rouge_l_recall_is_lcs_over_reference_length():
    reference = "The cat sat on the mat"
    prediction = "the cat lay on a mat today"
    ref, pred = reference.lower().split(), prediction.lower().split()
    assert _lcs(ref, pred) == 4  # the cat on mat
    assert rouge_l_recall(prediction, reference) == pytest.approx(4 / len(ref))
    assert rouge_l_recall(reference, reference) == pytest.approx(1.0)


def test_truth_ratio_geometric_and_arithmetic():
    correct, wrong = -1.0, [-2.0, -0.5]
    assert truth_ratio(correct, wrong) == pytest.approx(math.exp((-2.0 - 0.5) / 2 - correct))
    arithmetic = ((math.exp(-2.0) + math.exp(-0.5)) / 2) / math.exp(-1.0)
    assert truth_ratio(correct, wrong, mean="arithmetic") == pytest.approx(arithmetic)
    assert truth_ratio(-1.0, [-1.0, -1.0]) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        truth_ratio(correct, wrong, mean="harmonic")
    with pytest.raises(ValueError):
        truth_ratio(correct, [])


def test_min_k_logprob():
    lp = [-1.0, -5.0, -2.0, -0.5, -3.0]
    assert min_k_logprob(lp, 0.4) == pytest.approx((-5.0 - 3.0) / 2)  # int(5 * 0.4) = 2 lowest
    assert min_k_logprob(lp, 0.1) == pytest.approx(-5.0)  # at least one token
    assert min_k_logprob(lp, 1.0) == pytest.approx(sum(lp) / len(lp))


def test_privleak_relative_auc_difference_in_percent():
    # ((1 - 0.8) - (1 - 0.6)) / (1 - 0.6) * 100
    assert privleak(0.8, 0.6) == pytest.approx(-50.0)
    assert privleak(0.6, 0.6) == pytest.approx(0.0)
    assert privleak(0.3, 0.5) == pytest.approx(40.0)


def test_is_refusal():
    assert is_refusal("I don\u2019t know who that is.")
    assert is_refusal("Sorry, I'M NOT SURE about that")
    assert not is_refusal("She was born in Paris.")
    assert is_refusal("no idea", keywords=("no idea",))
    assert all(k == k.lower() for k in REFUSAL_KEYWORDS)


ROLES = SplitRoles(
    forget="forget",
    retain="retain",
    utility=("retain", "real_authors"),
    mia_member="forget",
    mia_nonmember="holdout",
)


def _records():
    rows = [
        # split, prob, rouge_l, truth ratio R, loss, min_k, refusal
        ("forget", 0.2, 0.5, 0.5, 2.0, -3.0, 1.0),
        ("forget", 0.4, 0.3, 2.0, 1.0, -2.0, 0.0),
        ("forget", 0.6, 0.1, 1.0, 0.5, -1.0, 0.0),
        ("retain", 0.8, 0.9, 0.25, 0.3, -0.5, 0.0),
        ("retain", 0.6, 0.7, 1.5, 0.4, -0.8, 0.0),
        ("real_authors", 0.5, 0.6, 0.5, 1.2, -1.5, 0.0),
        ("holdout", None, None, None, 1.5, -2.5, None),
        ("holdout", None, None, None, 0.8, -1.2, None),
    ]
    out = []
    for i, (split, prob, rouge, tr, loss, mink, refusal) in enumerate(rows):
        rec = {"split": split, "item_id": str(i), "post_loss": loss, "post_min_k": mink}
        if prob is not None:
            rec |= {"post_prob": prob, "post_rouge_l": rouge, "post_truth_ratio": tr, "post_refusal": refusal}
            rec["post_generation"] = "some text"
        if split == "real_authors":
            rec["post_prob_normalized"] = 0.7
        out.append(rec)
    return out


def test_summarize_unlearning_on_hand_made_records():
    records = _records()
    s = summarize_unlearning(records, ROLES, "post_")
    assert s["forget/prob"] == pytest.approx((0.2 + 0.4 + 0.6) / 3)
    assert s["retain/rouge_l"] == pytest.approx(0.8)
    # forget: mean min(R, 1/R); elsewhere mean max(0, 1 - R)
    assert s["forget/truth_ratio"] == pytest.approx((0.5 + 0.5 + 1.0) / 3)
    assert s["retain/truth_ratio"] == pytest.approx((0.75 + 0.0) / 2)
    assert s["real_authors/truth_ratio"] == pytest.approx(0.5)
    assert "forget/generation" not in s
    assert s["forget_rouge_l"] == pytest.approx(0.3)
    assert s["retain_rouge_l"] == pytest.approx(0.8)
    assert s["refusal_rate"] == pytest.approx(1 / 3)
    # model utility: retain Prob, ROUGE, TR; real_authors normalised Prob, ROUGE, TR
    parts = [0.7, 0.8, 0.375, 0.7, 0.6, 0.5]
    assert s["model_utility"] == pytest.approx(len(parts) / sum(1 / v for v in parts))
    # LOSS attack: member score -loss; forget losses (2, 1, 0.5) vs holdout (1.5, 0.8)
    pairs = sum((-m > -n) + 0.5 * (m == n) for m in (2.0, 1.0, 0.5) for n in (1.5, 0.8))
    assert s["mia_loss_auc"] == pytest.approx(pairs / 6)
    pairs = sum((m > n) + 0.5 * (m == n) for m in (-3.0, -2.0, -1.0) for n in (-2.5, -1.2))
    assert s["mia_min_k_auc"] == pytest.approx(pairs / 6)
    assert "forget_quality" not in s and "privleak" not in s

    same = summarize_unlearning(records, ROLES, "post_", reference=records)
    assert same["forget_quality"] == pytest.approx(1.0)
    assert same["privleak"] == pytest.approx(0.0)

    reference = [
        {**r, "pre_truth_ratio": r.get("post_truth_ratio", 0.0) * 10, "pre_min_k": 0.0} for r in records
    ]
    other = summarize_unlearning(records, ROLES, "post_", reference=reference, reference_prefix="pre_")
    assert other["forget_quality"] == pytest.approx(forget_quality([0.5, 2.0, 1.0], [5.0, 20.0, 10.0]))
    assert other["privleak"] == pytest.approx(privleak(s["mia_min_k_auc"], 0.5))


def test_model_utility_needs_every_input():
    records = [r for r in _records() if r["split"] != "real_authors"]
    assert "model_utility" not in summarize_unlearning(records, ROLES, "post_")


def test_headline_metrics_are_registered():
    for name in (
        "forget_quality",
        "model_utility",
        "mia_loss_auc",
        "mia_min_k_auc",
        "privleak",
        "refusal_rate",
    ):
        info = METRICS[name]
        assert info.scale == 1.0 and info.description
    assert METRICS["post_forget_quality"].higher_is_better


# ---------------------------------------------------------------------------- on a tiny model


def _answer_logprobs(model, tokenizer, prompt: str, answer: str) -> np.ndarray:
    prompt_ids = tokenizer(prompt)["input_ids"]
    full = tokenizer(f"{prompt} {answer}")["input_ids"]
    assert full[: len(prompt_ids)] == prompt_ids
    return _logprobs_from(model, full, len(prompt_ids))


def _logprobs_from(model, ids, start: int) -> np.ndarray:
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    lp = logits.log_softmax(-1)
    return np.array([lp[p - 1, ids[p]].item() for p in range(start, len(ids))])


PROMPT = "Question: The mother tongue of Danielle Darrieux is?\nAnswer:"
PROMPT2 = "Question: Where is Paris?\nAnswer:"


def test_score_items_on_a_tiny_gpt2(tiny_gpt2, tiny_tokenizer):
    items = [
        QAItem(
            "q1",
            "The mother tongue of Danielle Darrieux is?",
            "French",
            paraphrased_answer="the French language",
            perturbed_answers=("English", "Dutch"),
        ),
        QAItem("t1", "", "", text="Paris is located in the country of Italy."),
        QAItem("q2", "Where is Paris?", "Paris is in Spain."),
    ]
    prompts = [PROMPT, "", PROMPT2]
    measures = ("prob", "prob_normalized", "truth_ratio", "loss", "min_k", "rouge_l", "refusal")
    out = score_items(tiny_gpt2, tiny_tokenizer, items, prompts, measures, batch_size=2, max_new_tokens=8)
    assert len(out) == 3

    lp = _answer_logprobs(tiny_gpt2, tiny_tokenizer, PROMPT, "French")
    assert out[0]["prob"] == pytest.approx(math.exp(lp.mean()), rel=1e-4)
    assert out[0]["loss"] == pytest.approx(-lp.mean(), rel=1e-4)
    assert out[0]["min_k"] == pytest.approx(np.sort(lp)[: max(1, int(len(lp) * 0.4))].mean(), rel=1e-4)
    para = _answer_logprobs(tiny_gpt2, tiny_tokenizer, PROMPT, "the French language").mean()
    wrong = [_answer_logprobs(tiny_gpt2, tiny_tokenizer, PROMPT, a).mean() for a in ("English", "Dutch")]
    assert out[0]["truth_ratio"] == pytest.approx(math.exp(np.mean(wrong) - para), rel=1e-4)
    p = [math.exp(lp.mean()), *(math.exp(w) for w in wrong)]
    assert out[0]["prob_normalized"] == pytest.approx(p[0] / sum(p), rel=1e-4)

    # a text item: every token scored, conditioned on the EOS token (the tokenizer adds no BOS)
    ids = [tiny_tokenizer.eos_token_id, *tiny_tokenizer(items[1].text)["input_ids"]]
    text_lp = _logprobs_from(tiny_gpt2, ids, 1)
    assert out[1]["loss"] == pytest.approx(-text_lp.mean(), rel=1e-4)
    assert set(out[1]) == {"loss", "min_k"}

    for row, item in ((out[0], items[0]), (out[2], items[2])):
        assert isinstance(row["generation"], str)
        assert row["rouge_l"] == pytest.approx(rouge_l_recall(row["generation"], item.answer))
        assert row["refusal"] == float(is_refusal(row["generation"]))
    assert "truth_ratio" not in out[2] and "prob_normalized" not in out[2] and "prob" in out[2]

    only = score_items(tiny_gpt2, tiny_tokenizer, items[:1], prompts[:1], ["prob"])
    assert set(only[0]) == {"prob"} and only[0]["prob"] == pytest.approx(out[0]["prob"], rel=1e-5)
    with pytest.raises(ValueError, match="unknown"):
        score_items(tiny_gpt2, tiny_tokenizer, items, prompts, ["perplexity"])


def test_greedy_generation_is_batch_independent(tiny_gpt2, tiny_tokenizer):
    batched = greedy_generate(tiny_gpt2, tiny_tokenizer, [PROMPT, PROMPT2], max_new_tokens=6, batch_size=2)
    single = [greedy_generate(tiny_gpt2, tiny_tokenizer, [p], max_new_tokens=6) for p in (PROMPT, PROMPT2)]
    assert batched == [s[0] for s in single]
    # the same as transformers' own greedy decoding of the unpadded prompt
    ids = torch.tensor([tiny_tokenizer(PROMPT2)["input_ids"]])
    ref = tiny_gpt2.generate(
        ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=6, pad_token_id=0
    )[0, ids.shape[1] :].tolist()
    eos = tiny_tokenizer.eos_token_id
    ref = ref[: ref.index(eos)] if eos in ref else ref
    assert single[1][0] == tiny_tokenizer.decode(ref, skip_special_tokens=True).strip()
