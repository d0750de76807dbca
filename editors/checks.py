"""Range checks for the editor config dataclasses (their ``__post_init__``).

Each failure is a ``ValueError`` whose one-line message names the key as the user types it
(``editor.top_p_fraction``) and what it must be, so a bad value fails when the config is built
(the runner builds every config before it loads a model), not at the first edit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

TARGET_SITES = ("layer", "mlp_out")  # editors.memit.Memit.site
RESIDUAL_SPREADS = ("linear", "sqrt")  # editors.core.update.residual_scale
KEY_AVERAGING = ("grouped", "uniform")  # editors.core.context


def fail(key: str, expected: str, value: Any) -> None:
    raise ValueError(f"{key} must be {expected}, got {value!r}")


def one_of(key: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        fail(key, f"one of {', '.join(map(str, choices))}", value)


def positive(key: str, value: float | None, optional: bool = False) -> None:
    if value is None and optional:
        return
    if value is None or isinstance(value, bool) or not value > 0:
        fail(key, "> 0" + (" or null" if optional else ""), value)


def non_negative(key: str, value: float) -> None:
    if value is None or isinstance(value, bool) or not value >= 0:
        fail(key, "≥ 0", value)


def at_least_one(key: str, value: int | None, optional: bool = False) -> None:
    if value is None and optional:
        return
    if value is None or isinstance(value, bool) or not value >= 1:
        fail(key, "an integer ≥ 1" + (" or null" if optional else ""), value)


def training_loop(prefix: str, cfg: Any) -> None:
    """The shared training knobs of a config on the training loop (``<prefix>.epochs``, ``lr``,
    ``batch_size``, ``accumulate``, ``weight_decay``, ``warmup``)."""
    at_least_one(f"{prefix}.epochs", cfg.epochs)
    positive(f"{prefix}.lr", cfg.lr)
    at_least_one(f"{prefix}.batch_size", cfg.batch_size)
    at_least_one(f"{prefix}.accumulate", cfg.accumulate)
    non_negative(f"{prefix}.weight_decay", cfg.weight_decay)
    non_negative(f"{prefix}.warmup", cfg.warmup)


def fraction(key: str, value: float, low_open: bool = True) -> None:
    """``value`` in (0, 1] (``low_open``) or [0, 1]."""
    ok = value is not None and (0 < value <= 1 if low_open else 0 <= value <= 1)
    if not ok:
        fail(key, "in (0, 1]" if low_open else "in [0, 1]", value)


def layer_list(key: str, layers: Sequence[int]) -> None:
    if not layers:
        fail(key, "a non-empty list of layer indices", list(layers) if layers is not None else None)
    bad = [layer for layer in layers if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0]
    if bad:
        fail(key, "a list of layer indices ≥ 0", list(layers))


def context_templates(key: str, templates: Sequence[Sequence[int]]) -> None:
    """``[[max_len, count], ...]``: max_len ≥ 1 tokens, count ≥ 0 sampled prefixes."""
    for pair in templates:
        if len(pair) != 2 or not pair[0] >= 1 or not pair[1] >= 0:
            fail(key, "a list of [max_len ≥ 1, count ≥ 0] pairs", [list(p) for p in templates])


def target(key: str, cfg: Any) -> None:
    """The target-vector optimisation settings (``editors.core.targets.TargetConfig``)."""
    at_least_one(f"{key}.steps", cfg.steps)
    positive(f"{key}.lr", cfg.lr)
    non_negative(f"{key}.kl_factor", cfg.kl_factor)
    non_negative(f"{key}.weight_decay", cfg.weight_decay)
    positive(f"{key}.clamp_norm_factor", cfg.clamp_norm_factor)
    non_negative(f"{key}.loss_stop", cfg.loss_stop)
    non_negative(f"{key}.nll_weight", cfg.nll_weight)
    non_negative(f"{key}.kl_stop", cfg.kl_stop)
    at_least_one(f"{key}.batch_size", cfg.batch_size)
