"""Tokenisation helpers shared by every locate-then-edit method."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from editors.requests import SUBJECT_SLOT, fill


@dataclass
class Encoded:
    """A right-padded batch: ``input_ids``/``attention_mask`` [B, T], ``lengths`` [B], and the
    index of the subject's last token in each row, ``subject_last`` [B] (-1 when not asked for)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    lengths: torch.Tensor
    subject_last: torch.Tensor

    def to(self, device: torch.device) -> Encoded:
        return Encoded(
            *(t.to(device) for t in (self.input_ids, self.attention_mask, self.lengths, self.subject_last))
        )


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


def encode(
    tokenizer: PreTrainedTokenizerBase,
    templates: Sequence[str],
    subjects: Sequence[str | None],
    suffixes: Sequence[Sequence[int]] | None = None,
) -> Encoded:
    """Fill each template's ``{}`` with its subject, tokenize, and find the subject's last token
    (a subject None: the template is the whole text and its last token is the one found).

    ``suffixes`` (token ids, optional) are appended to each row after tokenization: the
    teacher-forced answer prefix of target-vector prompts, kept token-exact.

    The lookup uses character offsets, so it is the same for tokenizers that prepend a BOS token
    (LLaMA) and those that do not (GPT-2), and does not depend on how the text after the subject
    tokenizes. Raises ValueError naming the prompt when a subject cannot be located.
    """
    if len(templates) != len(subjects):
        raise ValueError("templates and subjects differ in length")
    texts, ends = [], []
    for template, subject in zip(templates, subjects):
        if subject is None:  # no subject span: the text's last token (before any suffix)
            texts.append(template)
            ends.append(len(template.rstrip()))
            continue
        slot = template.find(SUBJECT_SLOT)
        if slot < 0:
            raise ValueError(f"prompt {template!r} has no '{{}}' for subject {subject!r}")
        texts.append(fill(template, subject))
        ends.append(slot + len(subject))
    enc = tokenizer(texts, return_offsets_mapping=True, add_special_tokens=True)
    rows = [list(ids) for ids in enc["input_ids"]]
    if suffixes is not None:
        rows = [ids + list(extra) for ids, extra in zip(rows, suffixes)]
    lengths = [len(ids) for ids in rows]
    width = max(lengths)
    ids = np.full((len(texts), width), pad_id(tokenizer), dtype=np.int64)
    mask = np.zeros((len(texts), width), dtype=np.int64)
    last = np.empty(len(texts), dtype=np.int64)
    for row, (tokens, offsets, end) in enumerate(zip(rows, enc["offset_mapping"], ends)):
        ids[row, : len(tokens)] = tokens
        mask[row, : len(tokens)] = 1
        spans = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
        inside = np.nonzero((spans[:, 0] < end) & (spans[:, 1] > spans[:, 0]))[0]
        if inside.size == 0:
            raise ValueError(f"subject {subjects[row]!r} not found in tokens of {texts[row]!r}")
        last[row] = inside[-1]
    return Encoded(
        torch.from_numpy(ids), torch.from_numpy(mask), torch.tensor(lengths), torch.from_numpy(last)
    )


def right_pad(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id rows right-padded with ``pad`` into ``input_ids`` [N, T] and ``attention_mask`` [N, T]
    (1 on real tokens), T the longest row."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


def answer_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of an answer continuation, without special tokens (no BOS)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"answer {text!r} tokenizes to nothing")
    return list(ids)


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device
