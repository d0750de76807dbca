"""Logits at chosen positions only.

A causal LM computes logits at every position, but the target-vector loss and the scorer read
them at a few (the answer tokens, the subject's last token of a KL prompt). The output embedding
(``lm_head``) is a large share of a small model's compute, and the log-softmax over
[rows, length, vocabulary] a large share of its memory; :func:`logits_at` applies the output
embedding to the chosen hidden states only.

It works through a forward pre-hook on ``model.get_output_embeddings()``, so whatever the model
does after the head (a cast, logit soft-capping) still happens. A model without an output
embedding module (or one that never calls it) gives full logits; :meth:`Picked.select` then
gathers the positions itself, so callers need not care which happened.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


class Picked:
    """What :func:`logits_at` yields; :meth:`select` returns the [K, V] logits of the chosen positions."""

    def __init__(self, rows: torch.Tensor, cols: torch.Tensor) -> None:
        self.rows = rows
        self.cols = cols
        self.hooked = False

    def select(self, logits: torch.Tensor) -> torch.Tensor:
        """[K, V] from the model's output: already picked (the hook ran) or full [B, T, V] logits."""
        if logits.dim() == 2 and self.hooked:
            return logits
        return logits[self.rows.to(logits.device), self.cols.to(logits.device)]


def _output_embedding(model: torch.nn.Module) -> torch.nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    return head if isinstance(head, torch.nn.Module) else None


@contextlib.contextmanager
def logits_at(model: torch.nn.Module, rows: torch.Tensor, cols: torch.Tensor) -> Iterator[Picked]:
    """While inside, the model's logits are computed only at positions ``(rows[k], cols[k])``.

    ``with logits_at(model, rows, cols) as picked: out = model(...)``, then
    ``picked.select(out.logits)`` is [K, V], row k the logits at ``(rows[k], cols[k])``.
    """
    picked = Picked(rows, cols)
    head = _output_embedding(model)
    if head is None:
        yield picked
        return

    def pre_hook(_module, args, kwargs):
        hidden = args[0] if args else kwargs.get("input")
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
            return None
        chosen = hidden[rows.to(hidden.device), cols.to(hidden.device)]
        picked.hooked = True
        if args:
            return (chosen, *args[1:]), kwargs
        return args, {**kwargs, "input": chosen}

    handle = head.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield picked
    finally:
        handle.remove()
