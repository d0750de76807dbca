"""Experiment tracking: wandb (offline by default) or nothing. ``finish`` is always called."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class NullTracker:
    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        pass

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

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        self.run.log(metrics, step=step)

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
