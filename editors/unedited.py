"""The unedited model as an editor: ``apply`` changes nothing. It gives the "unedited" row of a
table through the same pipeline, data and metrics as every method."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from editors.base import EditorBase
from editors.delta import WeightDelta
from editors.requests import EditRequest


@dataclass
class UneditedConfig:
    _target_: str = "editors.unedited.Unedited"


class Unedited(EditorBase):
    def apply(
        self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, requests: Sequence[EditRequest]
    ) -> WeightDelta:
        self.record(requests)
        return WeightDelta()
