"""The one batched teacher-forced scorer behind every probability metric.

``score_probes`` scores ``prompt + " " + answer`` for each probe's ``target`` and (when set) its
``foil``. Answer tokens are found from the fast tokenizer's character offsets, so the same code is
right for GPT-2 style BPE (no BOS) and for LLaMA-3 style tokenizers whose post-processor
prepends a BOS token: a token is an answer token when it is part of the text proper (not a special
token added by the post-processor) and its span ends after ``len(prompt)``. The joining space
therefore belongs to the first answer token, as in the reference code (which tokenises
``" " + answer`` after the prompt).

Sequences are sorted by length and cut into batches so that right padding stays small; every
answer token's log-probability is gathered with tensor ops, and results come back in the
probes' order.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from evaluation.cases import Probe

__all__ = ["ProbeScore", "TokenizedAnswer", "score_probes", "score_texts", "tokenize_answers"]


@dataclass(frozen=True)
class ProbeScore:
    """Teacher-forced scores of one probe.

    ``target_logprob`` is the mean log-probability per answer token (minus the length-normalised
    NLL), so ``exp(target_logprob)`` is the per-token geometric-mean probability.
    ``target_token_acc`` is the fraction of answer tokens that are the argmax given the gold prefix,
    ``target_exact`` whether all of them are. ``foil_logprob`` is ``None`` when the probe has no foil.
    """

    target_logprob: float
    target_token_acc: float
    target_exact: bool
    foil_logprob: float | None
    n_target_tokens: int


@dataclass(frozen=True)
class TokenizedAnswer:
    """Token ids of ``prompt + " " + answer`` and which positions hold answer tokens."""

    input_ids: list[int]
    answer_mask: list[bool]

    @property
    def n_answer_tokens(self) -> int:
        return sum(self.answer_mask)


@dataclass(frozen=True)
class _SeqScore:
    logprob: float
    token_acc: float
    exact: bool
    n_tokens: int


def tokenize_answers(tokenizer, pairs: Sequence[tuple[str, str]]) -> list[TokenizedAnswer]:
    """Tokenise ``prompt + " " + answer`` for each ``(prompt, answer)`` and locate the answer tokens.

    Raises ``ValueError`` for an empty answer, an answer that maps to no token, or an answer token
    at position 0 (nothing to condition on: empty prompt and no BOS).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(
            "score_probes needs a fast (Rust `tokenizers`) tokenizer for offset mappings; "
            f"got {type(tokenizer).__name__}"
        )
    for prompt, answer in pairs:
        if not answer or not answer.strip():
            raise ValueError(f"empty answer for prompt {prompt!r}")
    texts = [f"{prompt} {answer}" for prompt, answer in pairs]
    if not texts:
        return []
    enc = tokenizer(
        texts,
        add_special_tokens=True,
        return_offsets_mapping=True,
        return_special_tokens_mask=True,
        padding=False,
        truncation=False,
    )
    out: list[TokenizedAnswer] = []
    straddling: list[str] = []
    for i, ((prompt, answer), text) in enumerate(zip(pairs, texts)):
        ids = list(enc["input_ids"][i])
        spans = np.asarray(enc["offset_mapping"][i], dtype=np.int64).reshape(-1, 2)  # [T, 2]
        added = np.asarray(enc["special_tokens_mask"][i], dtype=bool)  # BOS/EOS from the post-processor
        boundary = len(prompt)
        mask = ~added & (spans[:, 1] > boundary)
        if np.any(mask & (spans[:, 0] < boundary)):
            straddling.append(text)
        if not mask.any():
            raise ValueError(
                f"answer {answer!r} maps to zero tokens in {text!r} "
                f"(tokens: {tokenizer.convert_ids_to_tokens(ids)}); was the text truncated?"
            )
        if mask[0]:
            raise ValueError(
                f"answer {answer!r} starts at position 0 of {text!r}: there is no token to "
                "condition on (empty prompt and the tokenizer adds no BOS)"
            )
        out.append(TokenizedAnswer(ids, mask.tolist()))
    if straddling:
        warnings.warn(
            f"{len(straddling)} text(s) have a token spanning the prompt/answer boundary; it is "
            f"scored as an answer token (first: {straddling[0]!r})",
            stacklevel=2,
        )
    return out


def _pad_id(tokenizer) -> int:
    for name in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return 0


def _run_batch(model, batch: Sequence[TokenizedAnswer], pad_id: int, device) -> list[_SeqScore]:
    lengths = [len(t.input_ids) for t in batch]
    n_rows, width = len(batch), max(lengths)
    input_ids = torch.full((n_rows, width), pad_id, dtype=torch.long)
    attention = torch.zeros((n_rows, width), dtype=torch.long)
    answer = torch.zeros((n_rows, width), dtype=torch.bool)
    for row, tok in enumerate(batch):  # one loop per sequence, building the padded batch
        n = len(tok.input_ids)
        input_ids[row, :n] = torch.tensor(tok.input_ids, dtype=torch.long)
        attention[row, :n] = 1
        answer[row, :n] = torch.tensor(tok.answer_mask, dtype=torch.bool)
    input_ids, attention, answer = input_ids.to(device), attention.to(device), answer.to(device)

    logits = model(input_ids=input_ids, attention_mask=attention, use_cache=False).logits  # [B, T, V]
    # Position t predicts token t + 1: keep only the positions whose next token is an answer token.
    # (with a model dispatched over several devices the logits may not be where the inputs went)
    predicts = answer[:, 1:].to(logits.device)  # [B, T-1]
    gold = input_ids[:, 1:].to(logits.device)[predicts]  # [N]
    picked = logits[:, :-1][predicts].float()  # [N, V]
    token_lp = picked.log_softmax(dim=-1).gather(1, gold[:, None]).squeeze(1)  # [N]
    correct = (picked.argmax(dim=-1) == gold).to(torch.float32)  # [N]
    rows = torch.arange(n_rows, device=logits.device)[:, None].expand(n_rows, width - 1)[predicts]  # [N]

    n_tokens = torch.bincount(rows, minlength=n_rows).to(torch.float32)  # [B]
    sum_lp = torch.zeros(n_rows, dtype=torch.float32, device=logits.device).index_add_(0, rows, token_lp)
    n_correct = torch.zeros(n_rows, dtype=torch.float32, device=logits.device).index_add_(0, rows, correct)

    mean_lp = (sum_lp / n_tokens).tolist()
    acc = (n_correct / n_tokens).tolist()
    exact = (n_correct == n_tokens).tolist()
    counts = n_tokens.to(torch.long).tolist()
    return [_SeqScore(mean_lp[r], acc[r], bool(exact[r]), counts[r]) for r in range(n_rows)]


def _score_tokenized(
    model, tokenizer, seqs: Sequence[TokenizedAnswer], batch_size: int, progress: bool
) -> list[_SeqScore]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not seqs:
        return []
    device = next(model.parameters()).device
    pad_id = _pad_id(tokenizer)
    # Longest first: an out-of-memory error shows up on the first batch, not the last.
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i].input_ids), reverse=True)
    chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc="scoring", unit="batch")
    results: list[_SeqScore | None] = [None] * len(seqs)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for chunk in chunks:
                for idx, score in zip(chunk, _run_batch(model, [seqs[i] for i in chunk], pad_id, device)):
                    results[idx] = score
    finally:
        if was_training:
            model.train()
    return results  # type: ignore[return-value]


def score_texts(
    model, tokenizer, pairs: Sequence[tuple[str, str]], batch_size: int = 64, progress: bool = False
) -> list[tuple[float, float, bool, int]]:
    """Score ``prompt + " " + answer`` for each pair: ``(mean logprob, token acc, exact, n tokens)``."""
    scores = _score_tokenized(model, tokenizer, tokenize_answers(tokenizer, pairs), batch_size, progress)
    return [(s.logprob, s.token_acc, s.exact, s.n_tokens) for s in scores]


def score_probes(
    model,
    tokenizer,
    probes: Sequence[Probe],
    batch_size: int = 64,
    progress: bool = False,
) -> list[ProbeScore]:
    """Teacher-forced scores of every probe's target (and foil), batched, in the probes' order.

    ``batch_size`` counts sequences (a probe with a foil is two sequences). The model is put in
    eval mode for the call (its previous mode is restored) and inputs go to the device of its
    first parameter.
    """
    pairs: list[tuple[str, str]] = []
    foil_index: list[int | None] = []
    for probe in probes:
        pairs.append((probe.prompt, probe.target))
    for probe in probes:
        if probe.foil is None:
            foil_index.append(None)
        else:
            foil_index.append(len(pairs))
            pairs.append((probe.prompt, probe.foil))
    seqs = tokenize_answers(tokenizer, pairs)
    scores = _score_tokenized(model, tokenizer, seqs, batch_size, progress)
    out = []
    for i, _probe in enumerate(probes):
        target = scores[i]
        j = foil_index[i]
        out.append(
            ProbeScore(
                target_logprob=target.logprob,
                target_token_acc=target.token_acc,
                target_exact=target.exact,
                foil_logprob=None if j is None else scores[j].logprob,
                n_target_tokens=target.n_tokens,
            )
        )
    return out
