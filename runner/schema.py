"""Structured-config schemas: a typo or a wrong type fails at compose time, naming the key.

Each group's YAML starts with ``defaults: [/schema@_here_: <group>, _self_]`` (an editor's with
``/schema/editor@_here_: <editor>``), so values typed in the YAML files and on the command line are
both checked. The schemas live in their own ``schema`` group, so Hydra never lists them among a
group's options and ``editor=memit_schema`` is not a choice.

Hydra's ``+key=value`` adds a key even to a typed (struct) node, on purpose; :func:`check_known_keys`
refuses such keys where a schema defines the node, naming the key and its closest field.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from editors.core.covariance import StatsConfig
from editors.registry import CONFIG_SCHEMAS
from runner.datasets import DatasetConfig
from runner.finetune import FinetuneConfig
from runner.generation import GenerationEvalConfig
from runner.models import ModelConfig
from runner.unlearning_data import UnlearningDatasetConfig
from runner.unlearning_recipes import UnlearnConfig


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
    task: str = "edit"  # edit | stats (covariance statistics only) | prepare (statistics and artifacts) | unlearn | finetune
    train_artifacts: bool = True  # train a missing artifact on first use; false: fail naming task=prepare
    artifact_max_steps: int | None = None  # cap on every artifact's training steps (+size=tiny); in its key
    seed: int = 0
    edit_mode: str = "batch"  # batch: weights restored between batches | sequential: edits accumulate
    batch_size: int = 10  # edits per batch (the reference's --num_edits)
    progress: bool = True
    cache_targets: bool = True  # reuse target vectors across runs (sweeps over α, p skip the optimisation)
    threads: int | None = None  # torch CPU threads; null: torch's default
    save_model: bool = (
        False  # sequential mode: write the edited model (with adapters) to <output_dir>/edited_model
    )
    optimized_metric: str = "score"  # what run.py returns to a sweeper
    # what +size=tiny sets batch_size to (config.yaml: ${dataset.size}, one batch; presets that
    # stream batches set a smaller one)
    tiny_batch_size: int | None = 16
    paths: PathsConfig = field(default_factory=PathsConfig)
    model: Any = MISSING
    editor: Any = MISSING
    dataset: Any = MISSING
    eval: Any = MISSING
    stats: Any = MISSING
    logger: Any = MISSING
    unlearn: UnlearnConfig = field(default_factory=UnlearnConfig)  # task=unlearn's recipe and evaluation
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)  # task=finetune (runner.finetune)


#: (ConfigStore group, name) -> schema. A group YAML names its schema as ``/<group>@_here_: <name>``.
SCHEMAS = {
    ("schema", "model"): ModelConfig,
    **{("schema/editor", name): node for name, node in CONFIG_SCHEMAS.items()},
    ("schema", "dataset"): DatasetConfig,
    ("schema", "unlearning_dataset"): UnlearningDatasetConfig,
    ("schema", "eval"): EvalConfig,
    ("schema", "stats"): StatsConfig,
    ("schema", "logger"): LoggerConfig,
}


def register() -> None:
    """Store every schema in Hydra's ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(group="schema", name="run", node=RunConfig)
    for (group, name), node in SCHEMAS.items():
        cs.store(group=group, name=name, node=node)


class UnknownKeyError(ValueError):
    """A key that is not a field of its node's schema (one line, naming it)."""


def check_known_keys(cfg: DictConfig) -> None:
    """Raise :class:`UnknownKeyError` for a key that no schema defines (added with ``+key=value``,
    which Hydra allows on typed nodes), naming it and the closest field."""
    unknown = list(_unknown_keys(cfg, ""))
    if not unknown:
        return
    key, known = unknown[0]
    parent, _, leaf = key.rpartition(".")
    close = difflib.get_close_matches(leaf, known, n=1, cutoff=0.6)
    hint = f"; did you mean {parent + '.' if parent else ''}{close[0]}?" if close else ""
    others = [k for k, _ in unknown[1:]]
    more = f" (also unknown: {', '.join(others)})" if others else ""
    raise UnknownKeyError(f"unknown config key {key}{hint}{more}")


def _unknown_keys(node: DictConfig, prefix: str) -> Iterator[tuple[str, list[str]]]:
    """(full key, the schema's fields) for each key of ``node`` and below outside its schema."""
    schema = OmegaConf.get_type(node)
    known = [f.name for f in dataclasses.fields(schema)] if dataclasses.is_dataclass(schema) else None
    for key in node.keys():
        name = f"{prefix}{key}"
        if not prefix and key == "hydra":  # Hydra's own node (compose(..., return_hydra_config=True))
            continue
        if known is not None and key not in known:
            yield name, known
            continue
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_none() and not child._is_missing():
            yield from _unknown_keys(child, f"{name}.")
