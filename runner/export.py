"""Edited models on disk: ``save_pretrained`` weights plus the adapters module patches swapped in.

``save_edited(model, tokenizer, folder)`` writes what ``model`` is now: its weights as a
``save_pretrained`` folder (safetensors; weight edits are in them) and, for every module that an
edit replaced by an :class:`editors.patch.Adapter` (GRACE's codebook, WISE's side memory),
``adapters.json`` (module name, adapter class, its config) and ``adapters.safetensors`` (its
tensors). The base weights are saved with the original modules in place, so the folder is an
ordinary checkpoint of the base architecture.

``load_edited(folder)`` gives the model back in one call, adapters attached: it scores exactly as
the edited model did. ``python run.py model=<any hub model> model.hub_id=<folder>`` loads it the
same way (``runner.models`` calls :func:`attach_saved_adapters`).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from editors.patch import Adapter, set_module

ADAPTERS_JSON = "adapters.json"
ADAPTERS_TENSORS = "adapters.safetensors"


def _adapters(model: nn.Module) -> dict[str, Adapter]:
    """The outermost adapters in ``model``, by module name."""
    found: dict[str, Adapter] = {}
    for name, module in model.named_modules():
        if isinstance(module, Adapter) and not any(name.startswith(f"{outer}.") for outer in found):
            found[name] = module
    return found


def save_edited(model: nn.Module, tokenizer, folder: str | Path) -> Path:
    """Write ``model`` (as edited now) and ``tokenizer`` to ``folder``; returns it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    adapters = _adapters(model)
    entries, tensors = [], {}
    for index, (name, adapter) in enumerate(adapters.items()):
        cls = type(adapter)
        entries.append(
            {
                "module": name,
                "class": f"{cls.__module__}.{cls.__qualname__}",
                "config": adapter.adapter_config(),
                "prefix": f"a{index}.",
            }
        )
        tensors.update(
            {f"a{index}.{k}": v.detach().cpu().contiguous() for k, v in adapter.adapter_state().items()}
        )
    for name, adapter in adapters.items():  # the base weights with the base modules in place
        set_module(model, name, adapter.inner)
    try:
        model.save_pretrained(folder, safe_serialization=True)
    finally:
        for name, adapter in adapters.items():
            set_module(model, name, adapter)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    (folder / ADAPTERS_JSON).write_text(json.dumps({"adapters": entries}, indent=2) + "\n", encoding="utf-8")
    if tensors:
        save_file(tensors, str(folder / ADAPTERS_TENSORS))
    return folder


def attach_saved_adapters(model: nn.Module, folder: str | Path) -> list[str]:
    """Put the adapters saved in ``folder`` (if any) into ``model``; returns their module names."""
    folder = Path(folder).expanduser()
    index = folder / ADAPTERS_JSON
    if not index.is_file():
        return []
    entries = json.loads(index.read_text(encoding="utf-8"))["adapters"]
    tensors = load_file(str(folder / ADAPTERS_TENSORS)) if entries else {}
    device = next(model.parameters()).device
    names = []
    for entry in entries:
        module_path, _, cls_name = entry["class"].rpartition(".")
        cls = getattr(importlib.import_module(module_path), cls_name)
        if not (isinstance(cls, type) and issubclass(cls, Adapter)):
            raise ValueError(f"{index}: {entry['class']} is not an editors.patch.Adapter")
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
    attach_saved_adapters(model, folder)
    model.eval()
    return model, AutoTokenizer.from_pretrained(folder)
