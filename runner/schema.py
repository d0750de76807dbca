"""Structured-config schemas: a typo or a wrong type fails at compose time, naming the key.

Each group's YAML starts with ``defaults: [<group>_schema, _self_]`` (or the editor's own schema),
so values typed in the YAML files and on the command line are both checked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from editors.core.covariance import StatsConfig
from editors.registry import CONFIG_SCHEMAS
from runner.datasets import DatasetConfig
from runner.generation import GenerationEvalConfig
from runner.models import ModelConfig


@dataclass
class EvalConfig:
    batch_size: int = 64  # sequences per forward pass of the scorer
    pre_edit: bool = True  # also score every case on the unedited model (pre_* metrics)
    timing: str = "after_batch"  # after_batch: evaluate a batch right after its edit; at_end: after all edits (sequential)
    generation: GenerationEvalConfig = field(default_factory=GenerationEvalConfig)  # Fluency, Consistency


@dataclass
class LoggerConfig:
    backend: str = "none"  # wandb | none
    project: str = "knowedit"
    entity: str | None = None
    mode: str = "offline"  # offline (no account or network; `wandb sync` later) | online | disabled
    group: str | None = None  # wandb group; sweeps set one group per sweep
    tags: list[str] = field(default_factory=list)


@dataclass
class PathsConfig:
    cache_dir: str = MISSING  # models, tokenizers, statistics, downloads: share it between jobs
    output_dir: str = MISSING  # this run's folder (Hydra's run dir)


@dataclass
class RunConfig:
    task: str = "edit"  # edit | stats (compute covariance statistics only)
    seed: int = 0
    edit_mode: str = "batch"  # batch: weights restored between batches | sequential: edits accumulate
    batch_size: int = 10  # edits per batch (the reference's --num_edits)
    progress: bool = True
    cache_targets: bool = True  # reuse target vectors across runs (sweeps over α, p skip the optimisation)
    threads: int | None = None  # torch CPU threads; null: torch's default
    optimized_metric: str = "score"  # what run.py returns to a sweeper
    paths: PathsConfig = field(default_factory=PathsConfig)
    model: Any = MISSING
    editor: Any = MISSING
    dataset: Any = MISSING
    eval: Any = MISSING
    stats: Any = MISSING
    logger: Any = MISSING


SCHEMAS = {
    ("model", "model_schema"): ModelConfig,
    **{("editor", f"{name}_schema"): node for name, node in CONFIG_SCHEMAS.items()},
    ("dataset", "dataset_schema"): DatasetConfig,
    ("eval", "eval_schema"): EvalConfig,
    ("stats", "stats_schema"): StatsConfig,
    ("logger", "logger_schema"): LoggerConfig,
}


def register() -> None:
    """Store every schema in Hydra's ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    for (group, name), node in SCHEMAS.items():
        cs.store(group=group, name=name, node=node)
