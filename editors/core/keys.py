"""Reading module inputs/outputs at the subject's last token; key vectors."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from editors.core.context import flatten, group_weights
from editors.core.tokens import encode, model_device
from editors.hooks import get_module, record
from editors.requests import EditRequest


class _Stop(Exception):
    """Raised by a hook once the module that is read has run: the rest of the model is not needed."""


@torch.no_grad()
def read_at_subject(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    templates: Sequence[str],
    subjects: Sequence[str],
    module: str,
    side: str = "output",
    batch_size: int = 64,
) -> torch.Tensor:
    """[len(templates), width] float32: ``module``'s input or output at each subject's last token.

    Prompts are run in batches of similar length (less padding), and each forward pass stops
    right after ``module``: nothing after it is needed.
    """
    if side not in ("input", "output"):
        raise ValueError(f"side must be 'input' or 'output', got {side!r}")
    device = model_device(model)
    enc = encode(tokenizer, templates, subjects)
    order = torch.argsort(enc.lengths, descending=True, stable=True)
    target = get_module(model, module)

    def stop(_module, _args, _output):
        raise _Stop

    parts = []
    for start in range(0, len(templates), batch_size):
        rows = order[start : start + batch_size]
        width = int(enc.lengths[rows].max())
        with record(model, [module], inputs=side == "input", outputs=side == "output") as rec:
            handle = target.register_forward_hook(stop)  # after the recording hooks
            try:
                model(
                    input_ids=enc.input_ids[rows, :width].to(device),
                    attention_mask=enc.attention_mask[rows, :width].to(device),
                )
            except _Stop:
                pass
            finally:
                handle.remove()
        values = (rec.inputs if side == "input" else rec.outputs)[module]
        last = enc.subject_last[rows].to(values.device)
        parts.append(values[torch.arange(values.shape[0], device=values.device), last].float())
    out = torch.cat(parts)
    return torch.empty_like(out).index_copy_(0, order.to(out.device), out).to(device)


def compute_keys(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    module: str,
    context_groups: Sequence[Sequence[str]],
    averaging: str = "grouped",
    batch_size: int = 64,
) -> torch.Tensor:
    """[N, d_in] key per request: the input of ``module`` at the subject's last token, averaged
    over the context templates (``grouped``: MEMIT's mean of per-group means; ``uniform``: ROME)."""
    templates = flatten(context_groups)
    texts = [t.replace("{}", r.prompt, 1) for r in requests for t in templates]
    subjects = [r.subject for r in requests for _ in templates]
    reps = read_at_subject(model, tokenizer, texts, subjects, module, "input", batch_size)
    weights = group_weights(context_groups, averaging).to(reps)
    return (reps.view(len(requests), len(templates), -1) * weights[None, :, None]).sum(1)


def bare_values(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    module: str,
    side: str = "output",
    batch_size: int = 64,
) -> torch.Tensor:
    """[N, width]: ``module``'s input or output at the subject's last token of each bare prompt."""
    return read_at_subject(
        model,
        tokenizer,
        [r.prompt for r in requests],
        [r.subject for r in requests],
        module,
        side,
        batch_size,
    )
