"""ModulePatch: an edit that swaps submodules for adapters (GRACE's codebook, WISE's side memory).

``ModulePatch({"transformer.h.3.mlp": adapter}).attach(model)`` puts ``adapter`` where the module
was and returns a handle whose ``restore`` puts the original object back and checks that the
model is as before: the same module objects at the same names, the same hooks, the parameters
bit-exact. An adapter usually holds the module it replaces (and calls it); the patch never
changes the original module.

Handles of different kinds attached one after another (sequential editing) are kept in a
:class:`HandleStack`, restored last-first.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from editors.hooks import get_module


def sequence_routed(model: nn.Module) -> bool:
    """Whether some adapter in ``model`` is :attr:`Adapter.sequence_routed`: generation must then
    feed it one unpadded row at a time without a key/value cache."""
    return any(getattr(m, "sequence_routed", False) for m in model.modules())


class Adapter(nn.Module):
    """Base of the modules a :class:`ModulePatch` swaps in. ``inner`` is the module it replaces
    (kept, never changed); everything else the adapter learnt lives in its own parameters and
    buffers (``adapter_state``), and ``adapter_config`` is a JSON-able dict that, with the class,
    rebuilds an empty adapter of the same shapes: an edited model with adapters saves as its
    base weights plus, per patched module, (class path, config, state) and loads back exactly
    (``runner.export``).

    ``sequence_routed``: the adapter's output at a position depends on the earlier positions of
    its row (WISE's prefix routing), which it sees only when it is fed the whole row: left padding
    adds pad positions to them and a key/value cache hides them. Generation
    (:func:`sequence_routed`) then feeds each row alone and without a cache."""

    sequence_routed: bool = False

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def adapter_config(self) -> dict:
        raise NotImplementedError

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The adapter's own tensors (the wrapped module's are the base model's)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("inner.")}

    @classmethod
    def rebuild(cls, inner: nn.Module, config: dict, state: dict[str, torch.Tensor]) -> Adapter:
        """An adapter around ``inner`` from :meth:`adapter_config` and :meth:`adapter_state`."""
        adapter = cls.from_config(inner, config)
        result = adapter.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if not k.startswith("inner.")]
        if missing or result.unexpected_keys:
            raise ValueError(
                f"{cls.__name__}: saved state does not fit (missing {missing}, unexpected {result.unexpected_keys})"
            )
        return adapter

    @classmethod
    def from_config(cls, inner: nn.Module, config: dict) -> Adapter:
        raise NotImplementedError


def unwrap(module: nn.Module) -> nn.Module:
    """The base module under any adapters stacked on it (sequential editing)."""
    while isinstance(module, Adapter):
        module = module.inner
    return module


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    if not name:
        raise ValueError("a ModulePatch cannot replace the whole model")
    head, _, attr = name.rpartition(".")
    return (model.get_submodule(head) if head else model), attr


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, attr = _parent(model, name)
    if isinstance(parent, (nn.ModuleList, nn.Sequential)) and attr.isdigit():
        parent[int(attr)] = module
    else:
        setattr(parent, attr, module)


def _hook_count(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules()
    )


def _fingerprint(model: nn.Module) -> dict:
    """What restore must give back: module objects by name and the hook count."""
    return {
        "modules": {name: id(m) for name, m in model.named_modules()},
        "hooks": _hook_count(model),
    }


@dataclass
class ModulePatch:
    """Submodules to swap in, by name; plus diagnostics, as every :class:`editors.base.Edit`."""

    modules: dict[str, nn.Module] = field(default_factory=dict)
    diagnostics: dict[str, float] = field(default_factory=dict)
    case_diagnostics: dict[str, list[float]] = field(default_factory=dict)

    def attach(self, model: torch.nn.Module) -> PatchHandle:
        before = _fingerprint(model)
        # the replaced modules' own parameters (what an adapter holds and could change by mistake),
        # by identity and in-place version counter: any write to them shows, and nothing is copied
        # (a stream of 1,000 sequential patches would otherwise hold 1,000 copies of a layer)
        params = {
            f"{name}.{n}": (p, p._version)
            for name in self.modules
            for n, p in get_module(model, name).named_parameters()
        }
        originals: dict[str, nn.Module] = {}
        try:
            for name, adapter in self.modules.items():
                originals[name] = get_module(model, name)
                set_module(model, name, adapter)
        except Exception:
            for name, module in reversed(list(originals.items())):
                set_module(model, name, module)
            raise
        return PatchHandle(model, originals, before, params)


class PatchHandle:
    """A :class:`ModulePatch` attached to a model (see the module docstring)."""

    changes_forward = True  # adapters decide per position: the scorer must not pack rows

    def __init__(
        self,
        model: nn.Module,
        originals: Mapping[str, nn.Module],
        before: dict,
        params: Mapping[str, tuple[torch.Tensor, int]],
    ) -> None:
        self.model = model
        self.originals = dict(originals)
        self._before = before
        self._params = dict(params)

    def merge(self, later):
        return HandleStack([self]).merge(later)

    def restore(self) -> None:
        for name, module in reversed(list(self.originals.items())):
            set_module(self.model, name, module)
        after = _fingerprint(self.model)
        if after != self._before:
            raise RuntimeError("restore of a module patch did not give back the same module tree and hooks")
        current = dict(self.model.named_parameters())
        for name, (param, version) in self._params.items():
            if current.get(name) is not param or param._version != version:
                raise RuntimeError(
                    f"restore of a module patch: parameter {name} is not bit-exact (it was written to)"
                )


class HandleStack:
    """Handles attached one after another; ``restore`` undoes them last-first. Consecutive weight
    handles fold into one (``WeightHandle.merge``)."""

    def __init__(self, handles: list) -> None:
        if not handles:
            raise ValueError("HandleStack needs at least one handle")
        self.handles = list(handles)

    @property
    def model(self) -> nn.Module:
        return self.handles[-1].model

    @property
    def changes_forward(self) -> bool:
        return any(h.changes_forward for h in self.handles)

    def merge(self, later):
        from editors.delta import WeightHandle

        items = later.handles if isinstance(later, HandleStack) else [later]
        for item in items:
            last = self.handles[-1]
            if isinstance(last, WeightHandle) and isinstance(item, WeightHandle) and last.model is item.model:
                last.merge(item)
            else:
                self.handles.append(item)
        return self

    def restore(self) -> None:
        for handle in reversed(self.handles):
            handle.restore()
