"""Reading module inputs/outputs at the subject's last token; key vectors."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from editors.core.context import flatten, group_weights
from editors.core.tokens import encode, model_device
from editors.hooks import record
from editors.requests import EditRequest


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
    """[len(templates), width] float32: ``module``'s input or output at each subject's last token."""
    if side not in ("input", "output"):
        raise ValueError(f"side must be 'input' or 'output', got {side!r}")
    device = model_device(model)
    parts = []
    for start in range(0, len(templates), batch_size):
        enc = encode(
            tokenizer, templates[start : start + batch_size], subjects[start : start + batch_size]
        ).to(device)
        with record(model, [module], inputs=side == "input", outputs=side == "output") as rec:
            model(input_ids=enc.input_ids, attention_mask=enc.attention_mask)
        values = (rec.inputs if side == "input" else rec.outputs)[module]
        parts.append(values[torch.arange(values.shape[0], device=device), enc.subject_last].float())
    return torch.cat(parts)


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
