"""Context templates: short texts sampled from the unedited model, prepended to edit prompts.

MEMIT/ROME sample them without a seed, so their runs differ; here sampling is seeded.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from editors.core.tokens import model_device, pad_id

SEED_WORDS = ("The", "Therefore", "Because", "I", "You")


def sample_context_templates(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    lengths: Sequence[Sequence[int]],
    seed: int,
) -> list[list[str]]:
    """``[["{}"], group_1, ...]``: one group per ``(max_length, count)`` pair.

    Each group holds ``count`` samples (``count // 5`` per seed word), drawn with top-k 5 sampling
    up to ``max_length`` tokens in total (seed word included), braces replaced by spaces, then
    ``". {}"`` appended, as in the reference code.
    """
    groups: list[list[str]] = [["{}"]]
    device = model_device(model)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        for max_length, count in lengths:
            per_word = max(int(count) // len(SEED_WORDS), 1)
            group = []
            for word in SEED_WORDS:
                enc = tokenizer(word, return_tensors="pt").to(device)
                out = model.generate(
                    **enc,
                    do_sample=True,
                    top_k=5,
                    max_length=max(int(max_length), enc["input_ids"].shape[1] + 1),
                    num_return_sequences=per_word,
                    pad_token_id=pad_id(tokenizer),
                )
                for text in tokenizer.batch_decode(out, skip_special_tokens=True):
                    group.append(text.replace("{", " ").replace("}", " ") + ". {}")
            groups.append(group)
    return groups


def flatten(groups: Sequence[Sequence[str]]) -> list[str]:
    return [template for group in groups for template in group]


def group_weights(groups: Sequence[Sequence[str]], averaging: str) -> torch.Tensor:
    """Weight of each flattened template in a key average.

    ``grouped`` (MEMIT): mean within each group, then mean over groups, so ``"{}"`` weighs as much
    as all sampled templates together. ``uniform`` (ROME): plain mean over all templates.
    """
    sizes = [len(g) for g in groups]
    if averaging == "uniform":
        return torch.full((sum(sizes),), 1.0 / sum(sizes))
    if averaging == "grouped":
        return torch.cat([torch.full((n,), 1.0 / (n * len(sizes))) for n in sizes])
    raise ValueError(f"unknown key averaging {averaging!r}: expected 'grouped' or 'uniform'")
