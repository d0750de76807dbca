"""Experiment tracking: wandb (offline by default) or nothing. ``finish`` is always called.

A run logs several series, each against its own x-axis: the edit batches against ``step`` (the
batch index) and each artifact's validation curve against ``artifact/<name>/step`` (its training
step; :func:`runner.artifacts.log_artifact_reports`). wandb's own step must only grow within a run,
so two series whose steps restart at 0 cannot share it: :class:`WandbTracker` never sets it (wandb
counts the rows) and logs the caller's step as the metric ``axis`` instead, declared with
``define_metric`` as the x-axis of the keys logged with it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class NullTracker:
    def log(self, metrics: dict[str, Any], step: int | None = None, axis: str = "step") -> None:
        """Log ``metrics`` at ``step`` of the x-axis ``axis`` (a series' own step counter)."""

    def summary(self, metrics: dict[str, Any]) -> None:
        pass

    def finish(self, failed: bool = False) -> None:
        pass


class WandbTracker(NullTracker):
    def __init__(self, cfg: Any, config: dict, output_dir: Path, name: str, group: str | None) -> None:
        import wandb

        self.wandb = wandb
        self.run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            mode=cfg.mode,
            group=cfg.group or group,
            tags=list(cfg.tags),
            name=name,
            dir=str(output_dir),
            config=config,
            reinit="create_new",
        )
        self.axes: dict[str, str] = {}  # metric -> the x-axis it is declared against

    def log(self, metrics: dict[str, Any], step: int | None = None, axis: str = "step") -> None:
        if step is None:
            self.run.log(metrics)
            return
        for key in metrics:
            if key not in self.axes:
                self.run.define_metric(key, step_metric=axis)
                self.axes[key] = axis
            elif self.axes[key] != axis:
                raise ValueError(f"metric {key!r} is logged against {self.axes[key]!r}, not {axis!r}")
        self.run.log({**metrics, axis: step})

    def summary(self, metrics: dict[str, Any]) -> None:
        for key, value in metrics.items():
            self.run.summary[key] = value

    def finish(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


def make_tracker(
    cfg: Any, config: dict, output_dir: Path, name: str, group: str | None = None
) -> NullTracker:
    """``group`` is the default wandb group (a sweep's name); ``logger.group`` wins when set."""
    if cfg.backend == "none" or cfg.mode == "disabled":
        return NullTracker()
    if cfg.backend == "wandb":
        return WandbTracker(cfg, config, output_dir, name, group)
    raise ValueError(f"unknown logger.backend {cfg.backend!r}: expected wandb or none")
