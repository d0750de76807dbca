"""WeightDelta: parameter name -> additive change, attached and undone bit-exactly (an
:class:`editors.base.Edit` whose handle leaves the forward pass as it is)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch


@dataclass
class WeightDelta:
    """What an editor returns: additive changes to named parameters, plus diagnostics
    (target-vector norms, steps taken, guards fired...).

    Deltas are kept in float32 (or the dtype the solve produced) on the device they were
    computed on; ``apply`` casts them to each parameter's dtype and device.
    """

    deltas: dict[str, torch.Tensor] = field(default_factory=dict)
    diagnostics: dict[str, float] = field(default_factory=dict)  # one value for the batch
    case_diagnostics: dict[str, list[float]] = field(default_factory=dict)  # one value per request, in order

    def add(self, name: str, delta: torch.Tensor) -> None:
        delta = delta.detach()
        if name in self.deltas:
            self.deltas[name] = self.deltas[name] + delta.to(self.deltas[name])
        else:
            self.deltas[name] = delta.clone()

    def attach(self, model: torch.nn.Module) -> WeightHandle:
        """Add every delta to ``model`` in place; the returned handle restores the originals."""
        params = dict(model.named_parameters())
        missing = [n for n in self.deltas if n not in params]
        if missing:
            raise KeyError(f"WeightDelta names parameters that the model lacks: {missing}")
        originals: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name, delta in self.deltas.items():
                param = params[name]
                if delta.shape != param.shape:
                    raise ValueError(
                        f"delta for {name} has shape {tuple(delta.shape)}, parameter {tuple(param.shape)}"
                    )
                originals[name] = param.detach().clone()
                param.add_(delta.to(device=param.device, dtype=param.dtype))
        return WeightHandle(model, originals)

    @contextlib.contextmanager
    def applied(self, model: torch.nn.Module) -> Iterator[None]:
        """``with delta.applied(model): ...`` edits the model inside the block only."""
        handle = self.attach(model)
        try:
            yield
        finally:
            handle.restore()

    def norms(self) -> dict[str, float]:
        return {name: float(d.float().norm()) for name, d in self.deltas.items()}


class WeightHandle:
    """Holds the original values of edited parameters and puts them back, verified bit-exact."""

    changes_forward = False  # same modules, new weights: every fast path of the scorer applies

    def __init__(self, model: torch.nn.Module, originals: dict[str, torch.Tensor]) -> None:
        self.model = model
        self.originals = originals

    def merge(self, later):
        """Sequential editing: ``later`` was attached on top of this one. Another weight handle
        of the same model folds in (the earliest original of each parameter is kept; returns
        ``self``); any other handle is stacked (restored first)."""
        if isinstance(later, WeightHandle) and later.model is self.model:
            for name, value in later.originals.items():
                self.originals.setdefault(name, value)
            return self
        from editors.patch import HandleStack

        return HandleStack([self]).merge(later)

    def restore(self) -> None:
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in self.originals.items():
                params[name].copy_(value)
        for name, value in self.originals.items():
            if not torch.equal(params[name], value):
                raise RuntimeError(f"restore of {name} is not bit-exact")
