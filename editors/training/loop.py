"""The training loop every training-based method shares (see the package docstring).

``fit`` runs ``epochs`` passes over a sequence of batches. For each batch it evaluates
``loss_fn(batch)``; below ``loss_floor`` the batch is skipped (no backward: FT-L's rule), otherwise
its gradient is accumulated, and every ``accumulate`` batches the optimiser steps (gradients clipped
to ``grad_clip``), then ``after_step`` runs (FT-L's clamp). An epoch whose weighted mean loss is
below ``loss_floor`` ends training. ``max_steps`` caps the optimiser steps. With ``validate`` (a
callable returning a loss, lower is better) the loop evaluates every ``eval_every`` steps, keeps the
best parameters and stops after ``patience`` steps without improvement (MEND's early stopping).
Only the parameters given are trained; every ``requires_grad`` flag is restored afterwards.

Resuming (MEND's checkpoints): ``start`` is the report of the interrupted run (its steps, batches,
validation curve and best so far are continued; pass the batches it had not reached), and
``on_step(report)`` runs after every optimiser step, once its validation is done (checkpoint there).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

OPTIMIZERS = ("adam", "adamw", "sgd")


@dataclass
class LoopConfig:
    epochs: int = 1  # passes over the batches
    lr: float = 1e-4
    optimizer: str = "adam"  # adam | adamw | sgd
    weight_decay: float = 0.0
    accumulate: int = 1  # batches per optimiser step
    grad_clip: float | None = None  # max gradient norm (None: no clipping)
    loss_floor: float | None = None  # no backward below it; stop once an epoch's mean is below it
    max_steps: int | None = None  # optimiser steps at most
    eval_every: int | None = None  # steps between validations (None: no validation)
    patience: int | None = None  # steps without a better validation loss before stopping
    keep_best: bool = True  # with validation: end on the parameters of the best validation loss

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.accumulate < 1:
            raise ValueError(f"accumulate must be at least 1, got {self.accumulate}")


@dataclass
class FitReport:
    steps: int = 0  # optimiser steps taken
    batches: int = 0  # batches evaluated
    final_loss: float = float("nan")  # weighted mean loss of the last epoch
    validation: list[tuple[int, float]] = field(default_factory=list)  # (step, validation loss)
    best_step: int | None = None
    best_loss: float | None = None
    stopped: str = "epochs"  # epochs | loss_floor | max_steps | patience


def make_optimizer(params: Sequence[torch.nn.Parameter], cfg: LoopConfig) -> torch.optim.Optimizer:
    kinds = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
    return kinds[cfg.optimizer](list(params), lr=cfg.lr, weight_decay=cfg.weight_decay)


def _size(batch: Any) -> int:
    return int(getattr(batch, "size", 1))


def fit(
    params: Mapping[str, torch.nn.Parameter],
    loss_fn: Callable[[Any], torch.Tensor],
    batches: Sequence[Any],
    cfg: LoopConfig,
    *,
    model: torch.nn.Module | None = None,
    after_step: Callable[[], None] | None = None,
    validate: Callable[[], float] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    progress: bool = False,
    desc: str = "train",
    start: FitReport | None = None,
    on_step: Callable[[FitReport], None] | None = None,
) -> FitReport:
    """Train ``params`` (see the module docstring). ``model``: its other parameters are frozen while
    training (their flags are restored after). ``start``/``on_step``: resuming (module docstring)."""
    report = FitReport() if start is None else replace(start, validation=list(start.validation))
    opt = optimizer if optimizer is not None else make_optimizer(list(params.values()), cfg)
    trained = {id(p) for p in params.values()}
    flags = {}
    if model is not None:
        flags = {name: p.requires_grad for name, p in model.named_parameters()}
        for p in model.parameters():
            p.requires_grad_(id(p) in trained)
    for p in params.values():
        p.requires_grad_(True)
    best_state: dict[str, torch.Tensor] | None = None
    since_best = 0
    if report.validation and report.best_step is not None:  # resumed: steps since the best validation
        since_best = report.validation[-1][0] - report.best_step
    total = cfg.epochs * len(batches)
    bar = tqdm(total=total, desc=desc, disable=not progress, leave=False)
    try:
        opt.zero_grad(set_to_none=True)
        pending = 0  # batches whose gradient waits for the next step
        for _epoch in range(cfg.epochs):
            losses, weights = [], []
            for batch in batches:
                loss = loss_fn(batch)
                value = float(loss.detach())
                losses.append(value)
                weights.append(_size(batch))
                report.batches += 1
                bar.update(1)
                if cfg.loss_floor is None or value >= cfg.loss_floor:
                    (loss / cfg.accumulate if cfg.accumulate > 1 else loss).backward()
                    pending += 1
                else:
                    del loss
                if pending and (pending == cfg.accumulate or report.batches % cfg.accumulate == 0):
                    if cfg.grad_clip is not None:
                        torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.grad_clip)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    pending = 0
                    report.steps += 1
                    bar.set_postfix(loss=f"{value:.3f}")
                    if after_step is not None:
                        after_step()
                    if validate is not None and cfg.eval_every and report.steps % cfg.eval_every == 0:
                        val = float(validate())
                        report.validation.append((report.steps, val))
                        if report.best_loss is None or val < report.best_loss:
                            report.best_loss, report.best_step, since_best = val, report.steps, 0
                            if cfg.keep_best:
                                best_state = {n: p.detach().clone() for n, p in params.items()}
                        else:
                            since_best += cfg.eval_every
                        if cfg.patience is not None and since_best >= cfg.patience:
                            report.stopped = "patience"
                    if cfg.max_steps is not None and report.steps >= cfg.max_steps:
                        report.stopped = "max_steps"
                    if on_step is not None:
                        on_step(report)
                elif after_step is not None and cfg.accumulate == 1:
                    after_step()  # FT-L clamps after every batch, stepped or not
                if report.stopped != "epochs":
                    break
            report.final_loss = float(np.average(losses, weights=weights)) if losses else float("nan")
            if report.stopped != "epochs":
                break
            if cfg.loss_floor is not None and report.final_loss < cfg.loss_floor:
                report.stopped = "loss_floor"
                break
        if best_state is not None:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(best_state[name])
    finally:
        bar.close()
        opt.zero_grad(set_to_none=True)
        if model is not None:
            for name, p in model.named_parameters():
                p.requires_grad_(flags[name])
    return report
