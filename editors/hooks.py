"""Hook utilities: read and edit module inputs/outputs, always removing the hooks.

A leaf module: it imports nothing of ours. Works with modules called with positional or keyword
arguments, and with modules that return a tensor or a tuple whose first element is the tensor
(transformer blocks of different ``transformers`` versions do either).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

Edit = Callable[[torch.Tensor], torch.Tensor]


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name``, or a ValueError naming it and a few close names."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        last = name.split(".")[-1]
        close = [n for n, _ in model.named_modules() if n.split(".")[-1] == last][:3]
        hint = f" Modules with the same last part: {close}." if close else ""
        raise ValueError(f"no module {name!r} in {type(model).__name__}.{hint}") from None


def _first_input(args: tuple, kwargs: dict) -> torch.Tensor:
    if args:
        return args[0]
    for value in kwargs.values():
        if isinstance(value, torch.Tensor):
            return value
    raise ValueError("hooked module was called without a tensor input")


def _split_output(output: object) -> tuple[torch.Tensor, Callable[[torch.Tensor], object]]:
    """The hidden-state tensor of ``output`` and a function that rebuilds ``output`` around a new one."""
    if isinstance(output, torch.Tensor):
        return output, lambda new: new
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return output[0], lambda new: (new, *output[1:])
    raise TypeError(f"cannot hook a module output of type {type(output).__name__}")


class Recording:
    """What :func:`record` captured: ``inputs[name]`` and ``outputs[name]`` (last call)."""

    def __init__(self) -> None:
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}


@contextlib.contextmanager
def record(
    model: nn.Module,
    names: Sequence[str],
    inputs: bool = False,
    outputs: bool = True,
    detach: bool = True,
) -> Iterator[Recording]:
    """Capture the first input and/or the output tensor of each named module while inside."""
    rec = Recording()
    handles = []
    try:
        for name in names:
            module = get_module(model, name)
            if inputs:

                def pre_hook(_mod, args, kwargs, _name=name):
                    value = _first_input(args, kwargs)
                    rec.inputs[_name] = value.detach() if detach else value

                handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
            if outputs:

                def hook(_mod, _args, output, _name=name):
                    value, _ = _split_output(output)
                    rec.outputs[_name] = value.detach() if detach else value

                handles.append(module.register_forward_hook(hook))
        yield rec
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def edit_outputs(model: nn.Module, edits: dict[str, Edit]) -> Iterator[None]:
    """Replace the output tensor of each named module by ``edit(output)`` while inside."""
    handles = []
    try:
        for name, fn in edits.items():
            module = get_module(model, name)

            def hook(_mod, _args, output, _fn=fn):
                value, rebuild = _split_output(output)
                return rebuild(_fn(value))

            handles.append(module.register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()
