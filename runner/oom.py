"""Out-of-memory errors turned into one clear message naming the settings that lower the memory.

    with explain_oom("edit", cfg, editor.memory_knobs()):
        delta = editor.apply(model, tokenizer, requests)

re-raises ``torch.cuda.OutOfMemoryError`` (and the CPU allocator's ``RuntimeError: ...
DefaultCPUAllocator: not enough memory``, MPS's, and ``MemoryError``) as :class:`OutOfMemory`,
whose message says what ran out, where, and which config keys to turn for that stage, with their
current values and a smaller one when ``cfg`` (the composed run config) is given. Any other
error passes through untouched.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["KNOBS", "STAGES", "Knob", "OutOfMemory", "explain_oom", "is_out_of_memory"]


@dataclass(frozen=True)
class Knob:
    key: str  # the config key, as typed on the command line
    what: str  # what it controls
    suggest: str = "half"  # half: suggest half the current value | a fixed value to suggest


#: Settings that lower peak memory, by stage. Keys are checked against the composed config in
#: tests/test_oom.py; an editor without a key (e.g. no ``target``) simply does not show it.
KNOBS: dict[str, tuple[Knob, ...]] = {
    "model": (
        Knob("model.dtype", "weights' dtype", "bfloat16"),
        Knob("model.device_map", "spread the model over every visible GPU, then the CPU", "auto"),
    ),
    "stats": (Knob("stats.batch_tokens", "padded tokens per forward pass of the covariance statistics"),),
    # an editor adds its own knobs first (``memory_knobs()``, editors.base.EditorBase.MEMORY_KNOBS)
    "edit": (Knob("batch_size", "edits applied together; a MEMIT-style solve holds one key per edit"),),
    "eval": (Knob("eval.batch_size", "sequences per forward pass of the scorer"),),
    "generation": (Knob("eval.generation.batch_size", "prompts per generate call"),),
}

#: Stage name -> (what the message says was running, knob groups to list, most useful first).
STAGES: dict[str, tuple[str, tuple[str, ...]]] = {
    "load": ("loading the model", ("model",)),
    "stats": ("computing covariance statistics", ("stats", "model")),
    "prepare": ("training the editor's artifacts (task=prepare)", ("edit", "model")),
    "edit": ("computing the edit", ("edit", "model")),
    "eval": ("scoring the probes", ("eval", "model")),
    "generation": ("generating text", ("generation", "model")),
}

_OOM_TEXT = re.compile(
    r"out of memory|not enough memory|can't allocate memory|cannot allocate memory|DefaultCPUAllocator",
    re.IGNORECASE,
)
_TRIED = re.compile(r"tried to allocate ([\d.]+\s*[KMGT]?i?B|\d+ bytes)", re.IGNORECASE)


class OutOfMemory(RuntimeError):
    """A stage ran out of memory; the message names the settings that lower its memory."""

    def __init__(self, message: str, stage: str, knobs: list[str]) -> None:
        super().__init__(message)
        self.stage = stage
        self.knobs = knobs  # "key=value" suggestions, most useful first


def is_out_of_memory(error: BaseException) -> bool:
    """True for a GPU, MPS or CPU allocation failure."""
    oom_types: tuple[type[BaseException], ...] = (MemoryError,)
    for owner in (torch, getattr(torch, "cuda", None)):
        cls = getattr(owner, "OutOfMemoryError", None)
        if isinstance(cls, type):
            oom_types += (cls,)
    if isinstance(error, oom_types):
        return True
    return isinstance(error, RuntimeError) and bool(_OOM_TEXT.search(str(error)))


def _select(cfg: Any, key: str) -> Any:
    if cfg is None:
        return None
    try:
        from omegaconf import OmegaConf

        return OmegaConf.select(cfg, key, default=None)
    except Exception:  # noqa: BLE001 - a plain mapping or an object: walk it
        node = cfg
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else getattr(node, part, None)
            if node is None:
                return None
        return node


def _suggestions(groups: tuple[str, ...], cfg: Any, first: tuple[Knob, ...] = ()) -> list[tuple[str, str]]:
    """("key=value", explanation) per knob that applies, with the current value when known."""
    out = []
    for group_knobs in (first, *(KNOBS[g] for g in groups)):
        for knob in group_knobs:
            current = _select(cfg, knob.key)
            if cfg is not None and current is None and knob.suggest == "half":
                continue  # this run's config has no such key (e.g. an editor without `target`)
            if knob.suggest == "half":
                value = f"{max(1, int(current) // 2)}" if isinstance(current, int) else "<smaller>"
                if isinstance(current, int) and current <= 1:
                    continue  # nothing left to lower
            else:
                if current == knob.suggest:
                    continue  # already set
                value = knob.suggest
            now = f", now {current}" if current is not None else ""
            out.append((f"{knob.key}={value}", f"{knob.what}{now}"))
    return out


def _where(error: BaseException) -> str:
    text = str(error)
    tried = _TRIED.search(text)
    device = "GPU" if "cuda" in text.lower() or type(error).__name__ == "OutOfMemoryError" else "CPU"
    if "mps" in text.lower():
        device = "MPS"
    return f"on the {device}" + (f" (tried to allocate {tried.group(1)})" if tried else "")


def _message(
    stage: str, error: BaseException, cfg: Any, first: tuple[Knob, ...] = ()
) -> tuple[str, list[str]]:
    doing, groups = STAGES.get(stage, (stage, tuple(KNOBS)))
    pairs = _suggestions(groups, cfg, first)
    lines = [f"out of memory while {doing} {_where(error)}."]
    if pairs:
        lines.append("Lower the memory with one of (most effective first):")
        lines += [f"  {setting}   ({why})" for setting, why in pairs]
    return "\n".join(lines), [setting for setting, _ in pairs]


@contextlib.contextmanager
def explain_oom(stage: str, cfg: Any = None, knobs: Sequence[tuple[str, str]] = ()) -> Iterator[None]:
    """Re-raise an out-of-memory error inside the block as :class:`OutOfMemory` for ``stage``
    (``load``, ``stats``, ``edit``, ``eval``, ``generation``; another name lists every knob).
    ``cfg``: the composed run config, for current values and concrete suggestions; ``knobs``:
    (key, what) pairs named first, e.g. the editor's ``memory_knobs()``."""
    first = tuple(Knob(key, what) for key, what in knobs)
    try:
        yield
    except OutOfMemory:
        raise
    except BaseException as error:
        if not is_out_of_memory(error):
            raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # what the failed stage held is garbage now
        message, settings = _message(stage, error, cfg, first)
        raise OutOfMemory(message, stage, settings) from error
