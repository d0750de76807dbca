"""What every locate-then-edit editor shares: context templates, statistics, temporary weights."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from transformers import PreTrainedTokenizerBase

from editors.base import Covariance, EditorBase, Requirement, Resources
from editors.core.context import sample_context_templates
from editors.core.covariance import SecondMoments
from editors.core.targets import TargetCache
from editors.core.update import to_weight_layout, weight_name
from editors.delta import WeightDelta, WeightHandle
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
        WeightHandle(self.model, self.originals).restore()


@contextlib.contextmanager
def scratch(model: torch.nn.Module) -> Iterator[Scratch]:
    """``with scratch(model) as work: work.write(...)``; the model is unchanged afterwards."""
    work = Scratch(model)
    try:
        yield work
    finally:
        work.restore()


class LocateThenEdit(EditorBase):
    """Base of ROME/MEMIT-style editors: the spec, the statistics and the context templates.

    ``config.context_templates`` is the reference's ``[(max_length, count), ...]``; the templates
    are sampled once from the unedited model (in :meth:`prepare`, else at the first ``apply``) and
    reused for the editor's lifetime. The covariance statistics and the target-vector cache arrive
    through :meth:`prepare` (``Resources``).
    """

    MEMORY_KNOBS = (
        ("editor.target.batch_size", "requests whose target vectors are optimised together"),
        ("editor.read_batch_size", "prompts per forward pass when reading keys and values"),
    )

    def __init__(self, config, spec: ModelSpec) -> None:
        super().__init__(config, spec)
        self.context_lengths = [tuple(int(v) for v in pair) for pair in config.context_templates]
        self.seed = config.seed
        self._context: list[list[str]] | None = None

    @property
    def stats(self) -> SecondMoments:
        if self.resources.stats is None:
            raise RuntimeError(
                f"{type(self).__name__} needs covariance statistics: call prepare() with Resources(stats=...)"
            )
        return self.resources.stats

    @property
    def cache(self) -> TargetCache | None:
        return self.resources.targets

    def statistics_modules(self) -> list[str]:
        """Modules whose input covariance ``apply`` needs."""
        raise NotImplementedError

    def requirements(self) -> list[Requirement]:
        return [Covariance(m) for m in self.statistics_modules()]

    def prepare(
        self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, resources: Resources
    ) -> None:
        super().prepare(model, tokenizer, resources)
        self.context(model, tokenizer)

    def context(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[list[str]]:
        if self._context is None:
            self._context = sample_context_templates(model, tokenizer, self.context_lengths, self.seed)
        return self._context
