"""Losses of the training-based methods.

**Answer NLL.** An :class:`AnswerBatch` says which positions' logits the loss reads and which answer
token each read expects. ``prompt_last`` (FT-L as released by ROME/MEMIT/EasyEdit/EditSSS): only the
prompt is fed, and EVERY token of " " + answer is read from the distribution at the last prompt token
(not autoregressive). ``target_tokens`` (FT-M): the answer is appended and token j is read at the
position before it (teacher forcing). :func:`answer_nll` is each request's mean NLL over its answer
tokens.

**SSS** (Wang et al., Findings of ACL 2024; spec §1.2, code MaybeLizzy/EditSSS): the squared norm of
the loss's gradient with respect to the final hidden states H, the vectors the LM head reads
(``hidden_states[-1]``, after the final norm), taken with ``create_graph=True`` so the term itself
has a gradient to the parameters. ``sum`` (the release) sums the squares of every entry of ∂L/∂H;
``mean`` divides by the number of loss-bearing positions (the paper's 1/m, unverified). The total is
``(1 − C)·L + C·SSS`` (:func:`mix_sss`); C = 0 returns L unchanged (no second backward pass).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from editors.core.tokens import Encoded, encode

OBJECTIVES = ("prompt_last", "target_tokens")
SSS_REDUCTIONS = ("sum", "mean")


@dataclass
class AnswerBatch:
    enc: Encoded
    positions: torch.Tensor  # [B, K]: where logits are read (K = 1 for prompt_last)
    gold: torch.Tensor  # [B, W]: the answer token expected at each read
    mask: torch.Tensor  # [B, W]: 1 for real answer tokens

    @property
    def size(self) -> int:
        return int(self.gold.shape[0])


def answer_batch(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[tuple[str, str | None]],
    targets: Sequence[Sequence[int]],
    objective: str,
    device: torch.device,
) -> AnswerBatch:
    """Inputs of one batch of (template, subject) prompts with answer token ids ``targets``."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    templates, subjects = zip(*prompts)
    n_answer = torch.tensor([len(t) for t in targets], device=device)
    width = int(n_answer.max())
    offsets = torch.arange(width, device=device)
    mask = (offsets[None, :] < n_answer[:, None]).float()
    if objective == "prompt_last":
        # every answer token is read from the distribution at the last prompt token
        enc = encode(tokenizer, templates, subjects).to(device)
        positions = (enc.lengths - 1)[:, None]
        gold = torch.zeros((len(targets), width), dtype=torch.long, device=device)
        for i, t in enumerate(targets):
            gold[i, : len(t)] = torch.tensor(t)
    else:  # teacher forcing: answer token j is read at the position before it
        enc = encode(tokenizer, templates, subjects, suffixes=targets).to(device)
        start = enc.lengths - n_answer - 1  # the position predicting the first answer token
        # a row with fewer answer tokens than the widest reads past its end: those reads are masked,
        # and clamped into the row so that they index
        last = enc.input_ids.shape[1] - 1
        positions = (start[:, None] + offsets).clamp(min=0, max=last)
        gold = enc.input_ids.gather(1, (positions + 1).clamp(max=last))
    return AnswerBatch(enc, positions, gold, mask)


def answer_logits(
    model: torch.nn.Module, batch: AnswerBatch, hidden: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Float logits at the batch's read positions [B, K, V], and with ``hidden`` the final hidden
    states [B, T, d] that the LM head read (for :func:`sss_term`)."""
    out = model(
        input_ids=batch.enc.input_ids,
        attention_mask=batch.enc.attention_mask,
        output_hidden_states=hidden,
    )
    return read_answer_logits(out.logits, batch), (out.hidden_states[-1] if hidden else None)


def read_answer_logits(logits: torch.Tensor, batch: AnswerBatch) -> torch.Tensor:
    """Float logits [B, K, V] at the batch's read positions, from the full logits [B, T, V] of a
    forward pass over ``batch.enc`` (one pass serves a loss on every position and the answer NLL)."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    return logits[rows[:, None], batch.positions].float()


def answer_nll(logits: torch.Tensor, batch: AnswerBatch) -> torch.Tensor:
    """[B]: each request's mean NLL over its answer tokens (``logits`` from :func:`answer_logits`)."""
    logp = torch.log_softmax(logits, dim=-1)
    logp = logp.expand(-1, batch.gold.shape[1], -1)  # prompt_last: one position for all tokens
    return -(logp.gather(2, batch.gold[..., None])[..., 0] * batch.mask).sum(1) / batch.mask.sum(1)


def batch_nll(logits: torch.Tensor, batch: AnswerBatch) -> torch.Tensor:
    """The mean NLL over EVERY answer token of the batch (a scalar): HF's causal-LM loss with the
    prompt and padding labelled −100. Unlike ``answer_nll(...).mean()`` (the mean of per-item means)
    a long answer weighs more than a short one; the two agree when the answers are of one length."""
    nll = answer_nll(logits, batch)
    tokens = batch.mask.sum(1)
    return (nll * tokens).sum() / tokens.sum()


def sss_term(
    loss: torch.Tensor, hidden: torch.Tensor, reduction: str = "sum", positions: int | None = None
) -> torch.Tensor:
    """SSS: ‖∂loss/∂hidden‖², in float32, differentiable (``create_graph``). ``mean`` divides the
    sum by ``positions``, the number of loss-bearing positions (default: every position)."""
    if reduction not in SSS_REDUCTIONS:
        raise ValueError(f"SSS reduction must be one of {SSS_REDUCTIONS}, got {reduction!r}")
    (grad,) = torch.autograd.grad(loss, hidden, create_graph=True, retain_graph=True)
    total = grad.float().pow(2).sum()
    if reduction == "mean":
        total = total / (positions if positions else grad[..., 0].numel())
    return total


def mix_sss(
    loss: torch.Tensor,
    hidden: torch.Tensor | None,
    coefficient: float,
    reduction: str = "sum",
    positions: int | None = None,
) -> torch.Tensor:
    """``(1 − C)·loss + C·SSS`` (the release's rule); ``loss`` itself when C = 0."""
    if coefficient == 0:
        return loss
    if hidden is None:
        raise ValueError("SSS needs the final hidden states (answer_logits(..., hidden=True))")
    return (1 - coefficient) * loss + coefficient * sss_term(loss, hidden, reduction, positions)


# --- Unlearning losses (open-unlearning, github locuslab/open-unlearning, src/trainer/) ---------------


def ga_loss(nll: torch.Tensor) -> torch.Tensor:
    """Gradient ascent on the forget answers: −mean of the per-item NLL ``nll`` [B].

    open-unlearning ``src/trainer/unlearn/grad_ascent.py``: ``loss = -outputs.loss``, HF's causal-LM
    loss, the mean over every answer token of the batch; with per-item mean NLLs (``answer_nll``)
    this is the mean over items instead (the two agree when the answers are of one length)."""
    return -nll.mean()


def npo_loss(nll: torch.Tensor, ref_nll: torch.Tensor, beta: float) -> torch.Tensor:
    """NPO (Zhang et al., 2024): −(2/β)·mean log σ(β·(nll − ref_nll)) over the batch [B].

    With log(π_θ/π_ref) = −(nll − ref_nll) this is the paper's −(2/β)·E log σ(−β·log(π_θ/π_ref)).
    open-unlearning ``src/trainer/utils.py`` ``compute_dpo_loss`` with ``win_inputs=None``: the lose
    log-ratio is −(nll − ref_nll) and the loss ``-2 / beta * logsigmoid(beta * (0 - lose_log_ratio))
    .mean()``. There ``nll`` is ``compute_batch_nll``: each sequence's SUM of token NLLs (not the
    per-token mean), and ``ref_nll`` the same under the frozen reference model; pass per-token means
    for the length-normalised variant, or one scalar per batch (:func:`batch_nll`, ZJUKLAB's
    SemEval-2025 loss: the mean token NLL of the whole forget batch). ``ref_nll`` carries no
    gradient. ∂/∂nll_i = −(2/B)·σ(−β·(nll_i − ref_nll_i)), which tends to −1/B, GA's gradient on the
    same ``nll``, as β → 0."""
    if beta <= 0:
        raise ValueError(f"NPO beta must be positive, got {beta}")
    margin = beta * (nll - ref_nll.detach())
    return -(2.0 / beta) * torch.nn.functional.logsigmoid(margin).mean()


def kl_divergence(logits: torch.Tensor, ref_logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """KL(reference ‖ current) of the next-token distributions, summed over the vocabulary and
    averaged over the positions where ``mask`` [B, T] is 1 (``logits``, ``ref_logits``: [B, T, V]);
    ``mask=None``: averaged over EVERY position, prompt and padding included (the sum over B·T).

    open-unlearning ``src/trainer/utils.py`` ``compute_kl_divergence`` and ZJUKLAB's SemEval-2025
    trainer (zjunlp/unlearn ``semeval25/unlearn-merging.py``): ``kl_div(log p_cur, log p_ref,
    reduction="batchmean", log_target=True)`` over the flattened [B·T, V] logits, i.e. the KL
    averaged over every position: ``mask=None`` (ZJUKLAB's ``npo_kl_nll``); GradDiff/NPO's
    ``retain_loss=kl`` here masks the padding out."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    ref_logp = torch.log_softmax(ref_logits.detach().float(), dim=-1)
    per_position = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
    if mask is None:
        return per_position.mean()
    mask = mask.to(per_position.dtype)
    return (per_position * mask).sum() / mask.sum().clamp(min=1)
