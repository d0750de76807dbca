"""Hydra callbacks. ``SweepSummary`` writes the sweep table and curves of a multirun.

Registered in ``conf/config.yaml`` under ``hydra.callbacks.sweep_summary``; turn it off for one
sweep with ``~hydra.callbacks.sweep_summary``. The outputs land in the sweep folder
(``hydra.sweep.dir``): ``sweep_table.csv``, ``sweep_table.md`` and ``curve_<key>.png`` (see
``runner.sweep``), and at the end the paper-format ``paper_table*.{md,csv,tex}`` (``runner.table``).
``python -m runner.sweep <sweep dir>`` and ``python -m runner.table <sweep dir>`` rebuild them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

__all__ = ["SweepSummary"]


def _sweep_dir(config: DictConfig) -> Path | None:
    value = OmegaConf.select(config, "hydra.sweep.dir", default=None)
    return Path(str(value)) if value else None


def _is_multirun(config: DictConfig) -> bool:
    return str(OmegaConf.select(config, "hydra.mode", default="")).endswith("MULTIRUN")


class SweepSummary(Callback):
    """Aggregates a multirun into one table and a curve per numeric swept key.

    - ``on_multirun_end``: the final table and curves, and (when the jobs logged to wandb) the
      ``sweep-summary`` wandb run; prints where they are.
    - ``on_job_end`` (``after_each_job=True``): rebuilds the table and curves after every job
      (no wandb), so that a sweep that dies or stops on a failed job still leaves a table of
      the jobs that finished. Hydra's basic sweeper raises after the last job when one failed,
      and then never calls ``on_multirun_end``.

    A failure here is logged and never fails the sweep: the jobs' results are on disk already.
    """

    def __init__(self, after_each_job: bool = True, curves: bool = True, wandb: bool = True) -> None:
        self.after_each_job = after_each_job
        self.curves = curves
        self.wandb = wandb

    def on_job_end(self, config: DictConfig, job_return: Any = None, **kwargs: Any) -> None:
        if not self.after_each_job or not _is_multirun(config):
            return
        sweep_dir = _sweep_dir(config)
        if sweep_dir is None or not sweep_dir.is_dir():
            return
        try:
            from runner.sweep import aggregate_sweep

            result = aggregate_sweep(sweep_dir, curves=self.curves, log_wandb=False)
            log.info(
                "sweep table updated (%d finished, %d missing): %s",
                len(result.table),
                len(result.missing),
                result.md_path,
            )
        except Exception as error:
            log.warning("sweep table not updated: %s: %s", type(error).__name__, error)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = _sweep_dir(config)
        if sweep_dir is None:
            log.warning("sweep summary: the config has no hydra.sweep.dir")
            return
        try:
            from runner.sweep import aggregate_sweep

            result = aggregate_sweep(sweep_dir, curves=self.curves, log_wandb=self.wandb)
        except Exception as error:
            log.exception("sweep summary failed: %s", error)
            print(
                f"\nsweep summary failed ({type(error).__name__}: {error}); retry: python -m runner.sweep {sweep_dir}"
            )
            return
        print(f"\n{result}\nrebuild: python -m runner.sweep {sweep_dir}")
        try:
            from runner.table import build_tables, find_summaries, load_layout, write_tables

            layout = load_layout()
            tables = build_tables(find_summaries([sweep_dir]), layout)
            for path in write_tables(tables, sweep_dir, layout):
                if path.suffix == ".md":
                    print(f"  paper table: {path}")
        except Exception as error:
            log.warning(
                "paper table not written: %s: %s (python -m runner.table %s)",
                type(error).__name__,
                error,
                sweep_dir,
            )
