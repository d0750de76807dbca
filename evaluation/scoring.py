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
probes' order. For a ``transformers`` causal LM (SDPA or eager attention) three things cut the
work without changing a score beyond float rounding: the output embedding is applied only where
an answer token is predicted (``editors.core.logits``); the tokens after the last answer token,
and that token itself, are not fed (nothing needed is computed from them); and when
``batch_size`` >= 2 a probe's target and foil share one row, their common prompt computed once
(a 4-D attention mask keeps each continuation from seeing the other). At ``batch_size=1`` every
sequence is its own forward pass, as in the reference loops.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from editors.core.logits import logits_at
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


@dataclass(frozen=True)
class _Row:
    """One row of a forward pass: one sequence, or several that share their prompt tokens.

    Packed sequences (a probe's target and foil) keep one copy of the shared prompt, followed by
    each sequence's continuation; ``branch`` says which continuation a token belongs to (0: the
    shared prompt) and the attention mask lets a token see the prompt and its own continuation
    only, at the positions (``position_ids``) it has in its own sequence. Each answer token is
    a ``pick``: (member slot, position whose logits predict it, its token id).
    """

    members: tuple[int, ...]
    input_ids: list[int]
    position_ids: list[int]
    branch: list[int]
    picks: list[tuple[int, int, int]]

    @property
    def branched(self) -> bool:
        """True when two continuations follow the prompt (the row needs a 4-D attention mask)."""
        return len({b for b in self.branch if b}) > 1


def _row(members: Sequence[int], seqs: Sequence[TokenizedAnswer], causal: bool) -> _Row | None:
    """The sequences ``members`` in one row, or None when their prompt tokens differ.

    ``causal``: the model is a causal LM, so the tokens after a sequence's last answer token are
    left out (no logit needed is computed from them); the last answer token itself is only ever
    predicted, never read. A one-token answer then adds no token to the row at all: a target and
    its foil are both read from the logits at the prompt's last position.
    """
    first = seqs[members[0]]
    k = first.answer_mask.index(True)  # >= 1: tokenize_answers rejects an answer at position 0
    prompt = first.input_ids[:k]
    for i in members[1:]:
        if seqs[i].answer_mask.index(True) != k or seqs[i].input_ids[:k] != prompt:
            return None  # e.g. a token straddles the prompt/answer boundary differently
    ids, positions, branch = list(prompt), list(range(k)), [0] * k
    picks: list[tuple[int, int, int]] = []
    for slot, i in enumerate(members):
        seq, start = seqs[i], len(ids)
        answer = [p for p, is_answer in enumerate(seq.answer_mask) if is_answer]
        tail = seq.input_ids[k : answer[-1] if causal else len(seq.input_ids)]
        ids += tail
        positions += range(k, k + len(tail))
        branch += [slot + 1] * len(tail)
        for p in answer:
            q = p - 1  # the position that predicts token p, in the sequence and then in the row
            picks.append((slot, q if q < k else start + q - k, seq.input_ids[p]))
    return _Row(tuple(members), ids, positions, branch, picks)


def _causal_lm(model) -> bool:
    """A ``transformers`` model with SDPA or eager attention: causal, and it takes a 4-D additive
    attention mask and position ids (FlashAttention and unknown models are scored unpacked)."""
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) in ("sdpa", "eager")


def _float_dtype(model) -> torch.dtype:
    for param in model.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.float32


def _run_batch(model, rows: Sequence[_Row], pad_id: int, device) -> list[list[_SeqScore]]:
    """Scores of every member of every row (``out[r][slot]``), from one forward pass."""
    n_rows, width = len(rows), max(len(r.input_ids) for r in rows)
    packed = any(r.branched for r in rows)
    input_ids = torch.full((n_rows, width), pad_id, dtype=torch.long)
    attention = torch.zeros((n_rows, width), dtype=torch.long)
    positions = torch.zeros((n_rows, width), dtype=torch.long)
    branch = torch.zeros((n_rows, width), dtype=torch.long)
    pick_rows, pick_cols, gold, owner = [], [], [], []
    offsets, n_seqs = [], 0
    for row, item in enumerate(rows):  # one loop per row, building the padded batch
        n = len(item.input_ids)
        input_ids[row, :n] = torch.tensor(item.input_ids, dtype=torch.long)
        attention[row, :n] = 1
        if packed:
            positions[row, :n] = torch.tensor(item.position_ids, dtype=torch.long)
            branch[row, :n] = torch.tensor(item.branch, dtype=torch.long)
        for slot, col, token in item.picks:
            pick_rows.append(row)
            pick_cols.append(col)
            gold.append(token)
            owner.append(n_seqs + slot)
        offsets.append(n_seqs)
        n_seqs += len(item.members)
    kwargs: dict = {"attention_mask": attention.to(device)}
    if packed:
        # A token sees earlier tokens of the shared prompt and of its own continuation; padding
        # queries see themselves only (a fully masked row would give NaN).
        valid = attention.bool()
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        keys = branch[:, None, :]
        allowed = causal & ((keys == 0) | (keys == branch[:, :, None])) & valid[:, None, :]
        allowed |= torch.eye(width, dtype=torch.bool) & ~valid[:, :, None]
        dtype = _float_dtype(model)
        mask = torch.zeros((n_rows, 1, width, width), dtype=dtype)
        kwargs["attention_mask"] = mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min).to(device)
        kwargs["position_ids"] = positions.to(device)
    rows_t = torch.tensor(pick_rows, dtype=torch.long, device=device)
    cols_t = torch.tensor(pick_cols, dtype=torch.long, device=device)
    # Only the positions that predict an answer token are needed, and the output embedding is
    # applied to those only (``logits_at``).
    with logits_at(model, rows_t, cols_t) as chosen:
        out = model(input_ids=input_ids.to(device), use_cache=False, **kwargs)
    # (with a model dispatched over several devices the logits may not be where the inputs went)
    picked = chosen.select(out.logits).float()  # [N, V]
    gold_t = torch.tensor(gold, dtype=torch.long, device=picked.device)  # [N]
    owner_t = torch.tensor(owner, dtype=torch.long, device=picked.device)  # [N]
    token_lp = picked.log_softmax(dim=-1).gather(1, gold_t[:, None]).squeeze(1)  # [N]
    correct = (picked.argmax(dim=-1) == gold_t).to(torch.float32)  # [N]

    n_tokens = torch.bincount(owner_t, minlength=n_seqs).to(torch.float32)  # [S]
    sum_lp = torch.zeros(n_seqs, dtype=torch.float32, device=picked.device).index_add_(0, owner_t, token_lp)
    n_correct = torch.zeros(n_seqs, dtype=torch.float32, device=picked.device).index_add_(0, owner_t, correct)

    mean_lp = (sum_lp / n_tokens).tolist()
    acc = (n_correct / n_tokens).tolist()
    exact = (n_correct == n_tokens).tolist()
    counts = n_tokens.to(torch.long).tolist()
    return [
        [
            _SeqScore(mean_lp[s], acc[s], bool(exact[s]), counts[s])
            for s in range(offset, offset + len(item.members))
        ]
        for offset, item in zip(offsets, rows)
    ]


def _score_tokenized(
    model,
    tokenizer,
    seqs: Sequence[TokenizedAnswer],
    batch_size: int,
    progress: bool,
    groups: Sequence[Sequence[int]] = (),
    pack: bool = True,
) -> list[_SeqScore]:
    """Scores of ``seqs`` in their order. ``groups`` lists sequences that share a prompt (a probe's
    target and foil): when ``batch_size`` >= 2 and the model is a causal LM that takes 4-D masks,
    each group is scored in one packed row, its prompt computed once (see :class:`_Row`).
    ``pack`` False: every sequence is fed whole in a row of its own (for a model whose forward
    pass an edit changed per position, e.g. an adapter keyed on a token; see editors.base)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not seqs:
        return []
    device = next(model.parameters()).device
    pad_id = _pad_id(tokenizer)
    causal = pack and _causal_lm(model)
    rows: list[_Row] = []
    grouped: set[int] = set()
    if batch_size >= 2 and causal:
        for members in groups:
            if 1 < len(members) <= batch_size:
                row = _row(members, seqs, causal)
                if row is not None:
                    rows.append(row)
                    grouped.update(members)
    rows += [_row([i], seqs, causal) for i in range(len(seqs)) if i not in grouped]  # type: ignore[misc]
    # Longest first: an out-of-memory error shows up on the first batch, not the last. A batch
    # holds at most ``batch_size`` sequences (a packed row counts each of its members).
    rows.sort(key=lambda r: len(r.input_ids), reverse=True)
    chunks: list[list[_Row]] = []
    count = 0
    for row in rows:
        if not chunks or count + len(row.members) > batch_size:
            chunks.append([])
            count = 0
        chunks[-1].append(row)
        count += len(row.members)
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc="scoring", unit="batch")
    results: list[_SeqScore | None] = [None] * len(seqs)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for chunk in chunks:
                for row, scores in zip(chunk, _run_batch(model, chunk, pad_id, device)):
                    for index, score in zip(row.members, scores):
                        results[index] = score
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
    pack: bool = True,
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
    groups = [(i, j) for i, j in enumerate(foil_index) if j is not None]
    scores = _score_tokenized(model, tokenizer, seqs, batch_size, progress, groups, pack)
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
