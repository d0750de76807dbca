"""Edited models on disk: ``save_pretrained`` weights plus the adapters and routers edits installed.

``save_edited(model, tokenizer, folder)`` writes what ``model`` is now: its weights as a
``save_pretrained`` folder (safetensors; weight edits are in them) and ``adapters.json``, which lists

- every module that an edit replaced by an :class:`editors.patch.Adapter` (GRACE's codebook, WISE's
  side memory): module name, adapter class, its config; its tensors in ``adapters.safetensors``;
- every **model-level router** (SERAC's edit memory, classifier and counterfactual model): an
  object in the model's instance ``__dict__`` with the :class:`ModelRouter` methods; its class and
  the subfolder (``routers/r<i>/``) its ``save_router`` wrote.

The base weights are saved with the original modules in place and the routers' overrides lifted
(:meth:`ModelRouter.detached`), so the folder is an ordinary checkpoint of the base architecture.

``load_edited(folder)`` gives the model back in one call, adapters and routers attached: it scores
exactly as the edited model did. ``python run.py model=<any hub model> model.hub_id=<folder>`` loads
it the same way (``runner.models`` calls :func:`attach_saved_adapters` with the folder's tokenizer).
"""

from __future__ import annotations

import importlib
import json
import shutil
from contextlib import AbstractContextManager, ExitStack
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from editors.patch import Adapter, set_module

ADAPTERS_JSON = "adapters.json"
ADAPTERS_TENSORS = "adapters.safetensors"
ROUTERS_DIR = "routers"


@runtime_checkable
class ModelRouter(Protocol):
    """An edit that routes the whole model's forward pass (a hook and overridden methods, not a
    swapped module), kept in the model's instance ``__dict__``; what export needs of it."""

    def detached(self) -> AbstractContextManager[None]:
        """A block in which the model's methods are its own (the base checkpoint is saved in it)."""
        ...

    def save_router(self, folder: Path) -> None:
        """Write everything the router holds to ``folder`` (created if missing)."""
        ...

    @classmethod
    def rebuild_router(cls, model: nn.Module, tokenizer, folder: Path) -> ModelRouter:
        """The router saved in ``folder``, installed on ``model`` (the base model just loaded)."""
        ...


def _class_path(obj: object) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _import_class(path: str) -> type:
    module_path, _, cls_name = path.rpartition(".")
    cls = getattr(importlib.import_module(module_path), cls_name, None)
    if not isinstance(cls, type):
        raise ValueError(f"{path} is not a class")
    return cls


def _adapters(model: nn.Module) -> dict[str, Adapter]:
    """The outermost adapters in ``model``, by module name."""
    found: dict[str, Adapter] = {}
    for name, module in model.named_modules():
        if isinstance(module, Adapter) and not any(name.startswith(f"{outer}.") for outer in found):
            found[name] = module
    return found


def _routers(model: nn.Module) -> list[ModelRouter]:
    """The model-level routers installed on ``model`` (each once)."""
    found: dict[int, ModelRouter] = {}
    for value in vars(model).values():
        if not isinstance(value, type) and isinstance(value, ModelRouter):
            found.setdefault(id(value), value)
    return list(found.values())


def save_edited(model: nn.Module, tokenizer, folder: str | Path) -> Path:
    """Write ``model`` (as edited now) and ``tokenizer`` to ``folder``; returns it."""
    folder = Path(folder)
    routers = _routers(model)
    if routers and tokenizer is None:
        names = ", ".join(type(r).__name__ for r in routers)
        raise ValueError(f"save_edited: the model's router ({names}) needs its tokenizer saved with it")
    folder.mkdir(parents=True, exist_ok=True)
    adapters = _adapters(model)
    entries, tensors = [], {}
    for index, (name, adapter) in enumerate(adapters.items()):
        entries.append(
            {
                "module": name,
                "class": _class_path(adapter),
                "config": adapter.adapter_config(),
                "prefix": f"a{index}.",
            }
        )
        tensors.update(
            {f"a{index}.{k}": v.detach().cpu().contiguous() for k, v in adapter.adapter_state().items()}
        )
    with ExitStack() as lifted:  # the base weights with the base modules and methods in place
        for router in routers:
            lifted.enter_context(router.detached())
        for name, adapter in adapters.items():
            set_module(model, name, adapter.inner)
        try:
            model.save_pretrained(folder, safe_serialization=True)
        finally:
            for name, adapter in adapters.items():
                set_module(model, name, adapter)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    router_entries = _save_routers(routers, folder)
    index = {"adapters": entries, "routers": router_entries}
    (folder / ADAPTERS_JSON).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    if tensors:
        save_file(tensors, str(folder / ADAPTERS_TENSORS))
    return folder


def _save_routers(routers: list[ModelRouter], folder: Path) -> list[dict]:
    """Each router in ``folder/routers/r<i>`` (a stale ``routers/`` is replaced); their entries."""
    shutil.rmtree(folder / ROUTERS_DIR, ignore_errors=True)
    entries = []
    for index, router in enumerate(routers):
        sub = f"{ROUTERS_DIR}/r{index}"
        router.save_router(folder / sub)
        entries.append({"class": _class_path(router), "folder": sub})
    return entries


def attach_saved_adapters(model: nn.Module, folder: str | Path, tokenizer=None) -> list[str]:
    """Put the adapters and routers saved in ``folder`` (if any) into ``model``; returns the
    adapters' module names, then each router's class. A router routes with ``tokenizer`` (None:
    the tokenizer saved in ``folder``)."""
    folder = Path(folder).expanduser()
    index_file = folder / ADAPTERS_JSON
    if not index_file.is_file():
        return []
    index = json.loads(index_file.read_text(encoding="utf-8"))
    names = _attach_adapters(model, index["adapters"], folder)
    routers = index.get("routers", [])  # folders written before routers were saved have none
    if routers and tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
    for entry in routers:
        cls = _import_class(entry["class"])
        if not all(callable(getattr(cls, m, None)) for m in ("rebuild_router", "save_router", "detached")):
            raise ValueError(f"{index_file}: {entry['class']} is not a model-level router (runner.export)")
        cls.rebuild_router(model, tokenizer, folder / entry["folder"])
        names.append(entry["class"])
    return names


def _attach_adapters(model: nn.Module, entries: list[dict], folder: Path) -> list[str]:
    tensors = load_file(str(folder / ADAPTERS_TENSORS)) if entries else {}
    device = next(model.parameters()).device
    names = []
    for entry in entries:
        cls = _import_class(entry["class"])
        if not issubclass(cls, Adapter):
            raise ValueError(f"{folder / ADAPTERS_JSON}: {entry['class']} is not an editors.patch.Adapter")
        prefix = entry["prefix"]
        state = {k[len(prefix) :]: v.to(device) for k, v in tensors.items() if k.startswith(prefix)}
        base = model.get_submodule(entry["module"])
        set_module(model, entry["module"], cls.rebuild(base, entry["config"], state).to(device))
        names.append(entry["module"])
    return names


def load_edited(folder: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"):
    """(model, tokenizer) from a folder written by :func:`save_edited`, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"dtype": dtype} if dtype is not None else {}
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs).to(device)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    attach_saved_adapters(model, folder, tokenizer)
    model.eval()
    return model, tokenizer
