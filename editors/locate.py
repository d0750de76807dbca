"""What every locate-then-edit editor shares: context templates, statistics, temporary weights."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from editors.core.context import sample_context_templates
from editors.core.covariance import SecondMoments
from editors.core.targets import TargetCache
from editors.core.update import to_weight_layout, weight_name
from editors.delta import Restorer, WeightDelta
from editors.hooks import get_module
from editors.spec import ModelSpec


class Scratch:
    """Updates written into the model while an edit is computed (later layers and later requests
    see them), recorded in :attr:`delta`; :func:`scratch` puts the original weights back."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.delta = WeightDelta()
        self.originals: dict[str, torch.Tensor] = {}

    def write(self, module: str, update_out_in: torch.Tensor) -> None:
        """Add an (out, in) update to ``module``'s weight now and record it."""
        update = to_weight_layout(self.model, module, update_out_in)
        weight = get_module(self.model, module).weight
        name = weight_name(module)
        with torch.no_grad():
            self.originals.setdefault(name, weight.detach().clone())
            weight.add_(update.to(device=weight.device, dtype=weight.dtype))
        self.delta.add(name, update)

    def restore(self) -> None:
        Restorer(self.model, self.originals).restore()


@contextlib.contextmanager
def scratch(model: torch.nn.Module) -> Iterator[Scratch]:
    """``with scratch(model) as work: work.write(...)``; the model is unchanged afterwards."""
    work = Scratch(model)
    try:
        yield work
    finally:
        work.restore()


class LocateThenEdit:
    """Base of ROME/MEMIT-style editors: holds the spec, the statistics and the context templates.

    ``context_lengths`` is the reference's ``[(max_length, count), ...]``; the templates are sampled
    once from the unedited model (the first ``apply``) and reused for the editor's lifetime.
    ``cache`` (optional) stores target vectors on disk for methods whose targets depend only on
    the request and the model state.
    """

    def __init__(
        self,
        spec: ModelSpec,
        stats: SecondMoments,
        context_lengths: Sequence[Sequence[int]],
        seed: int = 0,
        progress: bool = False,
        cache: TargetCache | None = None,
    ) -> None:
        self.spec = spec
        self.stats = stats
        self.cache = cache
        self.context_lengths = [tuple(int(v) for v in pair) for pair in context_lengths]
        self.seed = seed
        self.progress = progress
        self._context: list[list[str]] | None = None

    def statistics_modules(self) -> list[str]:
        """Modules whose covariance statistics ``apply`` needs (computed by ``task=stats``)."""
        raise NotImplementedError

    def context(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[list[str]]:
        if self._context is None:
            self._context = sample_context_templates(model, tokenizer, self.context_lengths, self.seed)
        return self._context
