"""The editor contract."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
from transformers import PreTrainedTokenizerBase

from editors.delta import WeightDelta
from editors.requests import EditRequest


@runtime_checkable
class Editor(Protocol):
    """An editing method.

    ``apply`` returns the weight change for a batch of requests and leaves ``model`` exactly as
    it found it. An editor never loads models, evaluates, logs or restores: the runner does.
    """

    def apply(
        self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, requests: Sequence[EditRequest]
    ) -> WeightDelta: ...
