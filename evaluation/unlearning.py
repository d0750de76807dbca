"""Unlearning metrics of TOFU, open-unlearning, RWKU and SemEval-2025 Task 4: per-item measures and
dataset summaries.

Sources (read, not copied): TOFU = github.com/locuslab/tofu (``evaluate_util.py``,
``aggregate_eval_stat.py``); open-unlearning = github.com/locuslab/open-unlearning
(``src/evals/metrics/{memorization,privacy,utility,utils}.py``, ``src/evals/metrics/mia/``,
``configs/eval/tofu_metrics/*.yaml``); SemEval-2025 Task 4: :mod:`evaluation.semeval` (Task
Aggregate, MIA score, MMLU, final score). Each function's docstring names the definition it follows.

:func:`score_items` computes per-item measures (one dict per item); :func:`summarize_unlearning`
turns records of those (``pre_``/``post_`` prefixed, with ``split`` and ``item_id``) into the
dataset-level numbers: per-split means, forget quality, model utility, MIA AUCs and MIA score,
privleak, and on SemEval-style records the Task Aggregate, MMLU and the final score.

All values are raw fractions as TOFU and open-unlearning report them (not x100), except
``privleak``, which open-unlearning defines in percent. Every metric is registered with
``scale=1.0`` so that summaries keep these units.

Deviations from the reference code, deliberately:

- the answer is scored as ``prompt + " " + answer`` by the project's scorer, without the EOS token
  TOFU and open-unlearning append to the labels (their ``avg_loss`` includes the EOS prediction);
- the truth ratio is computed in log space, ``exp(mean log P(wrong) - log P(correct))``; open-
  unlearning divides by ``P(correct) + 1e-10``, which differs only when P(correct) < ~1e-8.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from numbers import Real

import numpy as np
import torch

from editors.core.logits import logits_at
from editors.patch import sequence_routed
from evaluation.aggregate import harmonic_mean, register_aggregation
from evaluation.cases import QAItem, SplitRoles
from evaluation.generation import _context_length  # the one lookup of a model's positions in evaluation/
from evaluation.metrics import register_metric
from evaluation.scoring import TokenizedAnswer, _pad_id, score_texts, tokenize_answers
from evaluation.semeval import (
    KINDS,
    MMLU_SPLIT,
    exact_match,
    mia_score,
    parse_item_id,
    semeval_final,
    task_aggregate,
)

__all__ = [
    "MEASURES",
    "REFUSAL_KEYWORDS",
    "TRUTH_RATIO_MEANS",
    "forget_quality",
    "generate_greedy",
    "greedy_generate",
    "is_refusal",
    "mia_auc",
    "min_k_logprob",
    "model_utility",
    "privleak",
    "rouge_l_recall",
    "score_items",
    "summarize_unlearning",
    "truth_ratio",
]

#: the per-item measures :func:`score_items` knows
MEASURES = (
    "prob",
    "prob_normalized",
    "truth_ratio",
    "loss",
    "min_k",
    "rouge_l",
    "refusal",
    "exact_match",
    "choice_correct",
)
#: "geometric": TOFU's and open-unlearning's code; "arithmetic": the TOFU paper's formula
TRUTH_RATIO_MEANS = ("geometric", "arithmetic")

#: Lowercase phrases whose presence marks a generation as a refusal / "I don't know" answer
#: (curly apostrophes are normalised to ``'`` before matching). Recorded in the run's protocol.
REFUSAL_KEYWORDS: tuple[str, ...] = (
    "i don't know",
    "i do not know",
    "i'm not sure",
    "i am not sure",
    "i'm not certain",
    "i am not certain",
    "i cannot",
    "i can't",
    "i'm unable",
    "i am unable",
    "i'm sorry",
    "i apologize",
    "i don't have",
    "i do not have",
    "i have no",
    "no information",
    "not aware of",
    "no knowledge",
    "not familiar with",
    "unable to provide",
    "cannot provide",
    "can't provide",
)

_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "\u2032": "'"})
_EPS = 1e-10  # open-unlearning's epsilon in ratios (truth-ratio aggregators, privleak)


# --------------------------------------------------------------------------- elementary metrics


def is_refusal(text: str, keywords: Sequence[str] = REFUSAL_KEYWORDS) -> bool:
    """True when ``text`` contains one of ``keywords`` (case-insensitive substring match; curly
    apostrophes normalised to ``'`` in both). A keyword-based refusal detector, as RWKU-style
    evaluations of "I don't know" behaviour use; not a definition from TOFU/open-unlearning."""
    norm = text.translate(_APOSTROPHES).lower()
    return any(k.translate(_APOSTROPHES).lower() in norm for k in keywords if k)


def rouge_l_recall(prediction: str, reference: str) -> float:
    """ROUGE-L recall of ``prediction`` against ``reference``: LCS(tokens) / len(reference tokens).

    Follows TOFU ``evaluate_util.eval_rouge_recall`` and open-unlearning
    ``evals.metrics.utils.eval_text_similarity`` (``rougeL_recall``): ``rouge_score``'s
    ``RougeScorer(["rougeL"], use_stemmer=True).score(reference, prediction)["rougeL"].recall``.
    """
    return float(_rouge_scorer().score(reference, prediction)["rougeL"].recall)


@functools.lru_cache(maxsize=1)
def _rouge_scorer():
    """One stemming ROUGE-L scorer (building it loads the Porter stemmer), made on first use."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def truth_ratio(correct_logprob: float, wrong_logprobs: Sequence[float], mean: str = "geometric") -> float:
    """Raw truth ratio R = mean over perturbed answers of P(wrong) / P(correct).

    Inputs are length-normalised log-probabilities (mean log-prob per answer token) of the
    paraphrased (correct) answer and of each perturbed answer; P = exp(that).

    - ``mean="geometric"`` (default): the mean over perturbed answers is taken of the
      log-probabilities, R = exp(mean_j lp_j - lp_correct). This is what both codebases compute:
      TOFU ``evaluate_util.eval_perturbation_ratio`` (``exp(gt_loss_per_token -
      perturb_loss_per_token.mean(-1))``, and ``aggregate_eval_stat.py`` the same from the
      logged losses) and open-unlearning ``memorization.truth_ratio`` (``aggregate_to_1D`` averages
      the perturbed ``avg_loss`` values before ``exp``).
    - ``mean="arithmetic"``: R = mean_j exp(lp_j) / exp(lp_correct), the TOFU paper's formula
      (arXiv:2401.06121, eq. for R_truth) and the commented-out line in TOFU's
      ``eval_perturbation_ratio``; no codebase reports it.

    Computed in log space (open-unlearning adds 1e-10 to P(correct); see the module notes).
    """
    wrong = np.asarray(list(wrong_logprobs), dtype=np.float64)
    if wrong.size == 0:
        raise ValueError("truth_ratio needs at least one perturbed (wrong) answer")
    if mean == "geometric":
        log_wrong = float(wrong.mean())
    elif mean == "arithmetic":
        top = float(wrong.max())
        log_wrong = top + math.log(float(np.exp(wrong - top).mean()))
    else:
        raise ValueError(f"truth ratio mean must be one of {TRUTH_RATIO_MEANS}, got {mean!r}")
    return math.exp(log_wrong - float(correct_logprob))


def forget_quality(unlearned: Sequence[float], reference: Sequence[float]) -> float:
    """Forget quality: p-value of the two-sample Kolmogorov-Smirnov test (``scipy.stats.ks_2samp``,
    default two-sided, ``method="auto"``) between the unlearned model's forget-set truth ratios and
    the retain (reference) model's.

    Follows open-unlearning ``privacy.ks_test`` (on the raw R = wrong/correct of
    ``memorization.truth_ratio``). TOFU ``aggregate_eval_stat.get_forget_quality`` tests 1/R and
    open-unlearning ``utils.get_forget_quality`` 1/(R + 1e-10): the KS statistic is unchanged by a
    strictly monotone map applied to both samples, so all three give the same p-value.
    """
    from scipy.stats import ks_2samp

    a = np.asarray(list(unlearned), dtype=np.float64)
    b = np.asarray(list(reference), dtype=np.float64)
    if a.size == 0 or b.size == 0:
        raise ValueError("forget_quality needs truth ratios of both models")
    return float(ks_2samp(a, b).pvalue)


def model_utility(values: Sequence[float]) -> float:
    """Model utility: harmonic mean of the utility numbers (0 when any is 0), as TOFU
    ``aggregate_eval_stat.get_model_utility`` (``scipy.stats.hmean``) and open-unlearning
    ``utility.hm_aggregate``. Uses ``evaluation.aggregate.harmonic_mean``."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("model_utility of no values")
    return harmonic_mean(values)


def mia_auc(member_scores: Sequence[float], nonmember_scores: Sequence[float]) -> float:
    """ROC AUC (``sklearn.metrics.roc_auc_score``) of telling members from non-members, members
    labelled 1, where a LARGER score means "more likely a member".

    The attack scores map to this as: LOSS attack -> ``-loss`` (minus the mean NLL per token);
    Min-K% -> :func:`min_k_logprob` itself (a mean log-prob). open-unlearning
    ``mia.utils.mia_auc`` scores by loss-like values (``avg_loss``, ``-mean(min-k logprobs)``) with
    forget labelled 0 and holdout 1; negating the score and swapping the labels gives the same AUC,
    so the reported convention is the same: 1 when the forget (member) data is much more likely
    than the holdout data, 0.5 when indistinguishable.
    """
    from sklearn.metrics import roc_auc_score

    members = [float(s) for s in member_scores]
    nonmembers = [float(s) for s in nonmember_scores]
    if not members or not nonmembers:
        raise ValueError("mia_auc needs member and non-member scores")
    labels = [1] * len(members) + [0] * len(nonmembers)
    return float(roc_auc_score(labels, members + nonmembers))


def privleak(auc: float, reference_auc: float) -> float:
    """PrivLeak (MUSE), as open-unlearning ``privacy.privleak`` computes it, in PERCENT:
    ``((1 - auc) - (1 - ref)) / ((1 - ref) + 1e-10) * 100`` = ``(ref - auc) / (1 - ref) * 100``,
    where ``auc`` is the unlearned model's MIA AUC (open-unlearning: Min-K%, ``privleak.yaml``)
    and ``ref`` the retain model's (open-unlearning's fallback when none is logged: 0.5).

    The ``1 - x`` converts open-unlearning's AUC convention (1 = forget data more likely) to
    MUSE's. 0 is the goal; negative: the forget set is more exposed than under the retain model
    (under-unlearning); positive: less (over-unlearning).
    """
    score, ref = 1.0 - float(auc), 1.0 - float(reference_auc)
    return (score - ref) / (ref + _EPS) * 100.0


def min_k_logprob(token_logprobs: Sequence[float], k: float = 0.4) -> float:
    """Min-K% Prob (Shi et al. 2023, arXiv:2310.16789): the mean of the lowest ``k`` fraction of
    the token log-probabilities, over ``max(1, int(n * k))`` tokens, as open-unlearning
    ``mia.min_k.MinKProbAttack.compute_score`` (which returns its negative, a loss-like score).
    ``k=0.4`` is open-unlearning's TOFU/MUSE setting (``configs/eval/*_metrics/mia_min_k.yaml``;
    the class default is 0.2). Larger = more likely a member."""
    if not 0.0 < k <= 1.0:
        raise ValueError(f"min-k fraction must be in (0, 1], got {k}")
    lp = np.sort(np.asarray(list(token_logprobs), dtype=np.float64))
    if lp.size == 0:
        raise ValueError("min_k_logprob of no tokens")
    n = max(1, int(lp.size * k))
    return float(lp[:n].mean())


# ------------------------------------------------------------------------------- model passes


def _tokenize_text(tokenizer, text: str, max_len: int | None) -> TokenizedAnswer:
    """A whole passage, every token of it scored. A tokenizer that prepends no special token
    (GPT-2) gets its BOS (else EOS) token in front, so that the first token is predicted too."""
    enc = tokenizer(text, add_special_tokens=True, return_special_tokens_mask=True)
    ids = list(enc["input_ids"])
    mask = [not s for s in enc["special_tokens_mask"]]
    if not any(mask):
        raise ValueError(f"text {text[:60]!r} maps to no token")
    if mask[0]:
        cond = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if cond is None:
            raise ValueError("the tokenizer has neither BOS nor EOS to condition a text's first token on")
        ids, mask = [cond, *ids], [False, *mask]
    if max_len is not None and len(ids) > max_len:
        ids, mask = ids[:max_len], mask[:max_len]
    return TokenizedAnswer(ids, mask)


@torch.no_grad()
def _token_logprobs(model, tokenizer, seqs: Sequence[TokenizedAnswer], batch_size: int, progress: bool):
    """Per scored token log-probabilities of each sequence, one forward per batch (right padding,
    sorted by length), the output embedding applied at the predicting positions only, float32
    log-softmax."""
    if not seqs:
        return []
    device = next(model.parameters()).device
    pad = _pad_id(tokenizer)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i].input_ids), reverse=True)
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="token log-probs", unit="batch")
    out: list[np.ndarray | None] = [None] * len(seqs)
    was_training = model.training
    model.eval()
    try:
        for idx in batches:
            # the last scored token is only predicted, never read: feed up to the one before
            lengths = [max(p for p, m in enumerate(seqs[i].answer_mask) if m) for i in idx]
            width = max(lengths)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            att = torch.zeros((len(idx), width), dtype=torch.long)
            rows, cols, gold, counts = [], [], [], []
            for r, (i, n) in enumerate(zip(idx, lengths)):
                seq = seqs[i]
                ids[r, :n] = torch.tensor(seq.input_ids[:n], dtype=torch.long)
                att[r, :n] = 1
                pos = [p for p, m in enumerate(seq.answer_mask) if m]
                rows += [r] * len(pos)
                cols += [p - 1 for p in pos]
                gold += [seq.input_ids[p] for p in pos]
                counts.append(len(pos))
            rows_t = torch.tensor(rows, dtype=torch.long, device=device)
            cols_t = torch.tensor(cols, dtype=torch.long, device=device)
            with logits_at(model, rows_t, cols_t) as chosen:
                logits = model(
                    input_ids=ids.to(device), attention_mask=att.to(device), use_cache=False
                ).logits
            picked = chosen.select(logits).float()
            gold_t = torch.tensor(gold, dtype=torch.long, device=picked.device)
            lp = picked.log_softmax(dim=-1).gather(1, gold_t[:, None]).squeeze(1).cpu().numpy()
            for i, part in zip(idx, np.split(lp, np.cumsum(counts)[:-1])):
                out[i] = part.astype(np.float64)
    finally:
        model.train(was_training)
    return out


@torch.no_grad()
def greedy_generate(
    model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 64, batch_size: int = 16, progress=False
) -> list[str]:
    """Greedy continuations (``do_sample=False``), batched with left padding, stopped at EOS, in
    the prompts' order; decoded without the prompt, special tokens skipped, stripped (as
    open-unlearning ``utils.eval_text_similarity`` and TOFU ``evaluate_util.run_generation``). A
    model with a sequence-routed adapter (``editors.patch.sequence_routed``) generates one prompt at
    a time without a key/value cache.
    The tokenizer's own ``clean_up_tokenization_spaces`` setting is kept (open-unlearning forces
    True; transformers 5 ignores that for BPE tokenizers, and ROUGE drops punctuation anyway)."""
    if not prompts:
        return []
    device = next(model.parameters()).device
    pad = _pad_id(tokenizer)
    eos = tokenizer.eos_token_id
    encoded = [list(tokenizer(p, add_special_tokens=True)["input_ids"]) for p in prompts]
    context = _context_length(model)
    if context is not None:
        too_long = [p for p, e in zip(prompts, encoded) if len(e) + max_new_tokens > context]
        if too_long:
            raise ValueError(
                f"{len(too_long)} prompt(s) + max_new_tokens={max_new_tokens} exceed the model's context of "
                f"{context} tokens (first: {too_long[0][:80]!r})"
            )
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    whole_rows = sequence_routed(model)  # a routed adapter sees each row whole (editors.patch)
    batch_size = 1 if whole_rows else batch_size
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="generation", unit="batch")
    texts: list[str] = [""] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        for idx in batches:
            width = max(len(encoded[i]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            att = torch.zeros((len(idx), width), dtype=torch.long)
            for r, i in enumerate(idx):
                n = len(encoded[i])
                ids[r, width - n :] = torch.tensor(encoded[i], dtype=torch.long)
                att[r, width - n :] = 1
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=att.to(device),
                do_sample=False,
                num_beams=1,
                temperature=None,
                top_p=None,
                top_k=None,
                max_new_tokens=max_new_tokens,
                pad_token_id=pad,
                eos_token_id=eos,
                use_cache=not whole_rows,
            )
            new = out[:, width:].cpu().tolist()
            for r, i in enumerate(idx):
                tokens = new[r]
                if eos is not None and eos in tokens:
                    tokens = tokens[: tokens.index(eos)]
                text = tokenizer.decode(tokens, skip_special_tokens=True)
                texts[i] = text.strip()
    finally:
        model.train(was_training)
    return texts


#: the same function under the other word order
generate_greedy = greedy_generate


def _has(text: str | None) -> bool:
    return bool(text and text.strip())


def score_items(
    model,
    tokenizer,
    items: Sequence[QAItem],
    prompts: Sequence[str],
    measures: Sequence[str],
    *,
    batch_size: int = 16,
    max_new_tokens: int = 64,
    truth_ratio_mean: str = "geometric",
    min_k: float = 0.4,
    refusal_keywords: Sequence[str] = REFUSAL_KEYWORDS,
    progress: bool = False,
) -> list[dict[str, float | str]]:
    """Per-item unlearning measures, one dict per item in the items' order.

    ``prompts[i]`` is item i's formatted prompt; an answer is scored as ``prompt + " " + answer``
    (``evaluation.scoring``: mean log-prob per answer token, no EOS). A measure whose inputs an
    item lacks is left out of its dict. Measures:

    - ``prob``: exp(mean log-prob per token of ``answer``), TOFU's length-normalised probability
      (TOFU ``aggregate_eval_stat.get_model_utility`` on ``eval_log*``; open-unlearning
      ``memorization.probability``, ``evaluate_probability``'s ``prob``);
    - ``prob_normalized``: P(answer) / (P(answer) + sum_j P(wrong_j)), length-normalised
      probabilities, ``perturbed_answers`` as the wrong options (TOFU ``get_model_utility`` on
      real_authors/world_facts; open-unlearning ``memorization.probability_w_options``, which adds
      1e-10 to the denominator);
    - ``truth_ratio``: raw R of :func:`truth_ratio` from ``paraphrased_answer`` vs
      ``perturbed_answers``; without a paraphrased answer the answer itself is the correct one
      (as open-unlearning's ``ra_Truth_Ratio`` / ``wf_Truth_Ratio`` use ``*_Q_A_Prob``);
    - ``loss``: mean NLL per token of the answer, or for a text item (``item.text``) of the whole
      text, scored from its start (BOS, else EOS, prepended when the tokenizer adds none;
      truncated to the model's context); ``min_k``: :func:`min_k_logprob` of the same tokens
      (open-unlearning ``mia.loss.LOSSAttack`` / ``mia.min_k.MinKProbAttack``, unnegated);
    - ``rouge_l``: :func:`rouge_l_recall` of the greedy generation (:func:`greedy_generate`,
      ``max_new_tokens``) against ``answer``; the text goes under ``generation``;
    - ``refusal``: 1.0 / 0.0 :func:`is_refusal` of the same generation;
    - ``exact_match``: 1.0 / 0.0 :func:`evaluation.semeval.exact_match` of the same generation
      against ``answer`` (SemEval-2025 Task 4's knowledge score);
    - ``choice_correct``: 1.0 when ``answer`` has the highest length-normalised log-probability among
      the options (``meta["options"]`` in their order, else ``answer`` then ``perturbed_answers``;
      a tie goes to the first), else 0.0: multiple-choice accuracy by completion probability (MMLU
      as Open-Instruct scores it: with one-token options, the option token's probability).
    """
    unknown = [m for m in measures if m not in MEASURES]
    if unknown:
        raise ValueError(f"unknown unlearning measure(s) {unknown}; known: {', '.join(MEASURES)}")
    if truth_ratio_mean not in TRUTH_RATIO_MEANS:
        raise ValueError(f"truth ratio mean must be one of {TRUTH_RATIO_MEANS}, got {truth_ratio_mean!r}")
    if len(prompts) != len(items):
        raise ValueError(f"{len(items)} items but {len(prompts)} prompts")
    wanted = set(measures)
    out: list[dict[str, float | str]] = [{} for _ in items]

    # Teacher-forced answers (prob, prob_normalized, truth_ratio): every distinct pair scored once.
    pair_index: dict[tuple[str, str], int] = {}

    def need(prompt: str, answer: str) -> int:
        return pair_index.setdefault((prompt, answer), len(pair_index))

    plans: list[dict[str, object]] = []
    for item, prompt in zip(items, prompts):
        plan: dict[str, object] = {}
        wrong = [a for a in item.perturbed_answers if _has(a)]
        if _has(item.answer) and _has(prompt):
            if "prob" in wanted or ("prob_normalized" in wanted and wrong):
                plan["answer"] = need(prompt, item.answer)
            if wrong and ("prob_normalized" in wanted or "truth_ratio" in wanted):
                plan["wrong"] = [need(prompt, a) for a in wrong]
        if "truth_ratio" in wanted and wrong and _has(prompt):
            correct = item.paraphrased_answer if _has(item.paraphrased_answer) else item.answer
            if _has(correct):
                plan["correct"] = need(prompt, correct)
                plan.setdefault("wrong", [need(prompt, a) for a in wrong])
        if "choice_correct" in wanted and _has(item.answer) and _has(prompt):
            options = _options(item)
            if len(options) >= 2:
                plan["options"] = [need(prompt, o) for o in options]
                plan["gold"] = options.index(item.answer)
        plans.append(plan)
    scores = score_texts(model, tokenizer, list(pair_index), batch_size=batch_size, progress=progress)
    logprob = [s[0] for s in scores]
    for row, plan in zip(out, plans):
        if "answer" in plan and "prob" in wanted:
            row["prob"] = math.exp(logprob[plan["answer"]])
        if "answer" in plan and "wrong" in plan and "prob_normalized" in wanted:
            p_true = math.exp(logprob[plan["answer"]])
            p_wrong = sum(math.exp(logprob[j]) for j in plan["wrong"])
            row["prob_normalized"] = p_true / (p_true + p_wrong)
        if "correct" in plan:
            row["truth_ratio"] = truth_ratio(
                logprob[plan["correct"]], [logprob[j] for j in plan["wrong"]], truth_ratio_mean
            )
        if "options" in plan:
            picked = int(np.argmax([logprob[j] for j in plan["options"]]))
            row["choice_correct"] = float(picked == plan["gold"])

    # Token-wise log-probs (loss, min_k): the answer's tokens, or a text's.
    if wanted & {"loss", "min_k"}:
        context = _context_length(model)
        owners, seqs = [], []
        qa = [
            (i, (p, it.answer))
            for i, (it, p) in enumerate(zip(items, prompts))
            if _has(it.answer) and _has(p)
        ]
        if qa:
            owners += [i for i, _ in qa]
            seqs += tokenize_answers(tokenizer, [pair for _, pair in qa])
        done = {i for i, _ in qa}
        for i, item in enumerate(items):
            if i not in done and _has(item.text):
                owners.append(i)
                seqs.append(_tokenize_text(tokenizer, item.text, context))
        for i, lp in zip(owners, _token_logprobs(model, tokenizer, seqs, batch_size, progress)):
            if "loss" in wanted:
                out[i]["loss"] = -float(lp.mean())
            if "min_k" in wanted:
                out[i]["min_k"] = min_k_logprob(lp, min_k)

    # Greedy generations (rouge_l, refusal, exact_match): one pass serves them all.
    if wanted & {"rouge_l", "refusal", "exact_match"}:
        # QA items only (a text item has no question to answer); rouge_l, exact_match need an answer
        gen = [
            i
            for i, (item, prompt) in enumerate(zip(items, prompts))
            if _has(prompt) and (_has(item.answer) or ("refusal" in wanted and not _has(item.text)))
        ]
        texts = greedy_generate(
            model, tokenizer, [prompts[i] for i in gen], max_new_tokens, batch_size, progress
        )
        for i, text in zip(gen, texts):
            out[i]["generation"] = text
            if "rouge_l" in wanted and _has(items[i].answer):
                out[i]["rouge_l"] = rouge_l_recall(text, items[i].answer)
            if "refusal" in wanted:
                out[i]["refusal"] = float(is_refusal(text, refusal_keywords))
            if "exact_match" in wanted and _has(items[i].answer):
                out[i]["exact_match"] = exact_match(text, items[i].answer)
    return out


def _options(item: QAItem) -> list[str]:
    """The options of a multiple-choice item, ``answer`` among them (empty when it is not)."""
    given = item.meta.get("options")
    if isinstance(given, (list, tuple)) and all(isinstance(o, str) for o in given):
        options = list(given)
    else:
        options = [item.answer, *(a for a in item.perturbed_answers if _has(a))]
    return options if item.answer in options and all(_has(o) for o in options) else []


# ---------------------------------------------------------------------------- dataset summaries


def closer_to_1_better(ratios: Sequence[float]) -> float:
    """Forget-split truth ratio: mean of min(R, 1/(R + 1e-10)), open-unlearning
    ``memorization.truth_ratio``'s ``closer_to_1_better`` (TOFU ``get_model_utility``:
    ``mean(minimum(1/R, R))``, the same). 1 when wrong and correct answers are equally likely."""
    arr = np.asarray(list(ratios), dtype=np.float64)
    return float(np.mean(np.minimum(arr, 1.0 / (arr + _EPS))))


def true_better(ratios: Sequence[float]) -> float:
    """Retain / utility truth ratio: mean of max(0, 1 - R), open-unlearning ``true_better`` (TOFU
    ``get_model_utility``: ``mean(maximum(0, 1 - 1/curr_stat_1))`` with curr_stat_1 = 1/R)."""
    arr = np.asarray(list(ratios), dtype=np.float64)
    return float(np.mean(np.maximum(0.0, 1.0 - arr)))


def _number(value: object) -> float | None:
    """A record's value as a float; None when it is no number (or NaN)."""
    if isinstance(value, Real) and not isinstance(value, bool) and not math.isnan(float(value)):
        return float(value)
    return None


def _values(records: Sequence[Mapping], split: str | None, key: str) -> list[float]:
    out = []
    for rec in records:
        if split is not None and rec.get("split") != split:
            continue
        value = _number(rec.get(key))
        if value is not None:
            out.append(value)
    return out


def _kind_means(records: Sequence[Mapping], split: str, prefix: str) -> dict[tuple[str, str], float]:
    """SemEval records of ``split`` (:func:`evaluation.semeval.parse_item_id`): (subtask, kind) ->
    the mean of the kind's measure (``rouge_l`` on sentence completions, ``exact_match`` on QA)."""
    groups: dict[tuple[str, str], list[float]] = {}
    for rec in records:
        if rec.get("split") != split:
            continue
        parsed = parse_item_id(str(rec.get("item_id", "")))
        if parsed is None:
            continue
        value = _number(rec.get(f"{prefix}{KINDS[parsed[1]]}"))
        if value is not None:
            groups.setdefault(parsed, []).append(value)
    return {key: math.fsum(vals) / len(vals) for key, vals in sorted(groups.items())}


def _auc(records, roles: SplitRoles, key: str, sign: float) -> float | None:
    if roles.mia_member is None or roles.mia_nonmember is None:
        return None
    members = _values(records, roles.mia_member, key)
    nonmembers = _values(records, roles.mia_nonmember, key)
    if not members or not nonmembers:
        return None
    return mia_auc([sign * v for v in members], [sign * v for v in nonmembers])


def summarize_unlearning(
    records: Sequence[Mapping],
    roles: SplitRoles,
    prefix: str,
    *,
    reference: Sequence[Mapping] | None = None,
    reference_prefix: str | None = None,
    truth_ratio_mean: str = "geometric",
) -> dict[str, float]:
    """Dataset-level unlearning numbers from per-item records (raw fractions; privleak in %).

    ``records`` carry ``split``, ``item_id`` and ``f"{prefix}{measure}"`` values; ``reference``
    (the retain model's records, read with ``reference_prefix``, default ``prefix``) enables
    forget quality and privleak. ``truth_ratio_mean`` only names how the stored raw R was computed
    (validated; R is never recomputed here). Output keys:

    - ``f"{split}/{measure}"``: mean over the split's items; for ``truth_ratio`` the TOFU/open-
      unlearning aggregate of the raw R: :func:`closer_to_1_better` on ``roles.forget``,
      :func:`true_better` on every other split (configs/eval/tofu_metrics/*_Truth_Ratio.yaml);
    - ``forget_quality``: :func:`forget_quality` of the forget split's raw R vs the reference's;
    - ``model_utility``: harmonic mean, over every ``roles.utility`` split, of its
      ``prob_normalized`` mean (``prob`` where the split has none: TOFU uses Prob on retain and the
      normalised Prob on real_authors/world_facts), ``rouge_l`` mean and transformed truth ratio
      (TOFU ``get_model_utility``; open-unlearning ``model_utility.yaml``: 9 numbers); only when
      all are present;
    - ``mia_loss_auc`` / ``mia_min_k_auc``: :func:`mia_auc` of ``roles.mia_member`` vs
      ``roles.mia_nonmember`` (scores ``-loss`` / ``min_k``);
    - ``privleak``: :func:`privleak` of ``mia_min_k_auc`` vs the reference's (open-unlearning
      ``privleak.yaml`` uses Min-K%);
    - ``mia_score``: :func:`evaluation.semeval.mia_score` of ``mia_loss_auc`` (SemEval-2025 Task 4;
      on TOFU: forget vs holdout);
    - ``forget_rouge_l``, ``retain_rouge_l``, ``refusal_rate`` (refusal mean on the forget split);
    - SemEval-2025 Task 4, on records whose item ids carry a subtask and kind
      (:func:`evaluation.semeval.semeval_item_id`): ``f"{split}/{task}/rouge_l"`` (sentence
      completions) and ``f"{split}/{task}/exact_match"`` (QA) on ``roles.forget`` and
      ``roles.retain``, raw; ``task_aggregate``: :func:`evaluation.semeval.task_aggregate` of
      those, forget inverted, over the (subtask, kind) pairs present (12 with 3 subtasks), only when
      both splits have some; ``mmlu``: the ``choice_correct`` mean of the ``mmlu`` split;
      ``semeval_final``: :func:`evaluation.semeval.semeval_final` when all three exist.
    """
    if truth_ratio_mean not in TRUTH_RATIO_MEANS:
        raise ValueError(f"truth ratio mean must be one of {TRUTH_RATIO_MEANS}, got {truth_ratio_mean!r}")
    ref_prefix = prefix if reference_prefix is None else reference_prefix
    splits = list(dict.fromkeys(str(r["split"]) for r in records if "split" in r))
    out: dict[str, float] = {}
    for split in splits:
        keys = dict.fromkeys(
            k
            for r in records
            if r.get("split") == split
            for k in r
            if isinstance(k, str) and k.startswith(prefix)
        )
        for key in keys:
            measure = key[len(prefix) :]
            vals = _values(records, split, key)
            if not vals:
                continue
            if measure == "truth_ratio":
                agg = closer_to_1_better if split == roles.forget else true_better
                out[f"{split}/{measure}"] = agg(vals)
            else:
                out[f"{split}/{measure}"] = math.fsum(vals) / len(vals)

    if reference is not None:
        ours = _values(records, roles.forget, f"{prefix}truth_ratio")
        theirs = _values(reference, roles.forget, f"{ref_prefix}truth_ratio")
        if ours and theirs:
            out["forget_quality"] = forget_quality(ours, theirs)

    if roles.utility:
        parts: list[float] = []
        for split in roles.utility:
            prob = out.get(f"{split}/prob_normalized", out.get(f"{split}/prob"))
            parts += [v for v in (prob, out.get(f"{split}/rouge_l"), out.get(f"{split}/truth_ratio"))]
        if all(v is not None for v in parts):
            out["model_utility"] = model_utility(parts)

    loss_auc = _auc(records, roles, f"{prefix}loss", -1.0)
    if loss_auc is not None:
        out["mia_loss_auc"] = loss_auc
        out["mia_score"] = mia_score(loss_auc)
    min_k_auc = _auc(records, roles, f"{prefix}min_k", 1.0)
    if min_k_auc is not None:
        out["mia_min_k_auc"] = min_k_auc
        if reference is not None:
            ref_auc = _auc(reference, roles, f"{ref_prefix}min_k", 1.0)
            if ref_auc is not None:
                out["privleak"] = privleak(min_k_auc, ref_auc)

    if f"{roles.forget}/rouge_l" in out:
        out["forget_rouge_l"] = out[f"{roles.forget}/rouge_l"]
    if roles.retain is not None and f"{roles.retain}/rouge_l" in out:
        out["retain_rouge_l"] = out[f"{roles.retain}/rouge_l"]
    if f"{roles.forget}/refusal" in out:
        out["refusal_rate"] = out[f"{roles.forget}/refusal"]

    forget_means = _kind_means(records, roles.forget, prefix)
    retain_means = _kind_means(records, roles.retain, prefix) if roles.retain is not None else {}
    for split, means in ((roles.forget, forget_means), (roles.retain, retain_means)):
        out.update({f"{split}/{task}/{KINDS[kind]}": v for (task, kind), v in means.items()})
    if forget_means and retain_means:
        out["task_aggregate"] = task_aggregate(forget_means, retain_means)
    if f"{MMLU_SPLIT}/choice_correct" in out:
        out["mmlu"] = out[f"{MMLU_SPLIT}/choice_correct"]
    if all(k in out for k in ("task_aggregate", "mia_score", "mmlu")):
        out["semeval_final"] = semeval_final(out["task_aggregate"], out["mia_score"], out["mmlu"])
    return out


# ------------------------------------------------------------------------------------ registry

#: the dataset-level aggregation of the headline metrics: computed by summarize_unlearning, so
#: ``evaluation.aggregate.aggregate`` (per-case means) leaves them alone.
UNLEARNING_AGGREGATION = "unlearning_summary"


@register_aggregation(UNLEARNING_AGGREGATION)
def _computed_by_summarize_unlearning(info, summary):
    return None


_PER_ITEM = (
    (
        "prob",
        True,
        "length-normalised probability exp(mean log-prob per token) of the gold answer (TOFU Prob)",
    ),
    (
        "prob_normalized",
        True,
        "P(answer) / (P(answer) + sum P(wrong options)), length-normalised (TOFU Prob on real authors / world facts)",
    ),
    (
        "truth_ratio",
        False,
        "raw truth ratio R = mean P(perturbed) / P(paraphrased), per item; per split it is reported as "
        "mean min(R, 1/R) on forget and mean max(0, 1 - R) elsewhere",
    ),
    ("loss", False, "mean NLL per token of the answer (or of the text, for MIA texts)"),
    ("min_k", True, "Min-K% Prob: mean of the lowest k fraction (default 0.4) of token log-probs"),
    ("rouge_l", True, "ROUGE-L recall of the greedy generation against the gold answer"),
    ("refusal", False, "1 when the greedy generation contains a refusal keyword (REFUSAL_KEYWORDS), else 0"),
    (
        "exact_match",
        True,
        "1 when the greedy generation equals the gold answer after strip + lower case (SemEval-2025 Task 4 "
        "knowledge score), else 0",
    ),
    (
        "choice_correct",
        True,
        "1 when the gold option has the highest completion probability among the options (MMLU), else 0",
    ),
)
for _name, _up, _desc in _PER_ITEM:
    register_metric(
        _name, _up, scale=1.0, description=_desc + " (on the forget split the goal is the reverse)"
    )

_HEADLINE = (
    (
        "forget_quality",
        True,
        "KS-test p-value between the forget-set truth ratios of the unlearned and the retain model (TOFU)",
    ),
    (
        "model_utility",
        True,
        "harmonic mean of Prob, ROUGE-L and truth ratio (max(0, 1 - R)) on every utility split (TOFU)",
    ),
    (
        "mia_loss_auc",
        False,
        "ROC AUC of the LOSS membership attack, forget (member) vs holdout: 0.5 = no signal, 1 = forget data "
        "more likely",
    ),
    (
        "mia_min_k_auc",
        False,
        "ROC AUC of the Min-K% (k=0.4) membership attack, member vs non-member split; 0.5 = no signal",
    ),
    (
        "privleak",
        True,
        "PrivLeak in percent: (ref AUC - AUC) / (1 - ref AUC) * 100 of the Min-K% AUC vs the retain model's; "
        "0 is the goal, negative = under-unlearned, positive = over-unlearned",
    ),
    ("forget_rouge_l", False, "mean ROUGE-L recall of greedy answers on the forget split"),
    ("retain_rouge_l", True, "mean ROUGE-L recall of greedy answers on the retain split"),
    ("refusal_rate", True, "fraction of greedy answers on the forget split that contain a refusal keyword"),
    (
        "mia_score",
        True,
        "1 - 2 |AUC - 0.5| of the LOSS membership attack (SemEval-2025 Task 4): 1 = members and non-members "
        "indistinguishable",
    ),
    (
        "task_aggregate",
        True,
        "SemEval-2025 Task 4 Task Aggregate: harmonic mean of ROUGE-L (sentence completions) and exact match "
        "(QA) per subtask on retain and, inverted (1 - value), on forget",
    ),
    ("mmlu", True, "MMLU accuracy, the option with the highest completion probability (SemEval-2025 Task 4)"),
    ("semeval_final", True, "SemEval-2025 Task 4 final score: mean of Task Aggregate, MIA score and MMLU"),
)
for _name, _up, _desc in _HEADLINE:
    register_metric(_name, _up, UNLEARNING_AGGREGATION, scale=1.0, description=_desc)
