"""The run: config -> model + dataset -> edit batches -> evaluate -> restore -> results.

Orchestration only. The runner never names an editing method: it builds whatever ``editor._target_``
names and drives it through the contract of ``editors.base`` (requirements, prepare, apply, reset);
it attaches the returned Edit and restores the model itself.
"""

from __future__ import annotations

import json
import logging
import random
import subprocess
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from tqdm.auto import tqdm

from editors.base import Artifact, Projector, Resources, covariance_modules
from editors.core.covariance import SecondMoments, StatsConfig
from editors.core.targets import TargetCache
from evaluation.aggregate import add_prefix, aggregate_by_prefix
from evaluation.cases import EditCase
from evaluation.metrics import METRICS, score_cases
from evaluation.tables import format_table
from runner.artifacts import ArtifactMissing, ArtifactStore, log_artifact_reports
from runner.corpus import corpus_texts
from runner.datasets import DatasetError, LoadedDataset, load_from_config
from runner.environment import run_environment
from runner.export import save_edited
from runner.generation import build_generation_metrics
from runner.models import LoadedModel, load_model
from runner.oom import explain_oom
from runner.results import ResultsStore, check_resume
from runner.schema import check_known_keys
from runner.tokenizers import content_hash
from runner.tracking import make_tracker
from runner.validate import check_optimized_metric, check_prompt_lengths, context_length

log = logging.getLogger(__name__)

HEADLINE = ("efficacy", "generality", "locality", "score", "fluency", "consistency")
EDIT_MODES = ("batch", "sequential")
EVAL_TIMINGS = ("after_batch", "at_end")


class ConfigError(ValueError):
    """A config value that composes but makes no sense."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def git_sha() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def build_editor(editor_cfg: DictConfig, loaded: LoadedModel) -> Any:
    """Instantiate ``editor._target_`` with its typed config and the model spec."""
    cls = get_class(editor_cfg._target_)
    return cls(OmegaConf.to_object(editor_cfg), spec=loaded.spec)


def prepare_requirements(editor: Any, stats: SecondMoments) -> dict[str, str]:
    """Load (or compute) what ``editor.requirements()`` names; returns file paths by requirement."""
    needs = editor.requirements()
    modules = covariance_modules(needs)
    stats.prefetch(modules)
    files = {f"covariance {m}": str(stats.path(m)) for m in modules}
    for need in needs:
        if isinstance(need, Projector):
            stats.projector(need.module, need.threshold)
            files[f"projector {need.module}"] = str(stats.projector_path(need.module, need.threshold))
    return files


def prepare_artifacts(
    editor: Any,
    loaded: LoadedModel,
    store: ArtifactStore,
    data_cache: Path | None = None,
    max_steps: int | None = None,
) -> dict[str, Path]:
    """Load, or train on the unedited model, every :class:`Artifact` the editor names; their folders
    by name. An artifact's training cases are loaded from its dataset config (``Artifact.data``).
    ``max_steps`` caps the training steps (``editor.train_cap``) and joins the artifact's key."""
    folders: dict[str, Path] = {}
    editor.train_cap = max_steps
    for need in editor.requirements():
        if not isinstance(need, Artifact):
            continue
        if max_steps is not None:  # a capped artifact is another artifact
            need = replace(
                need, recipe=json.dumps({"recipe": json.loads(need.recipe), "max_steps": max_steps})
            )
        data = None
        if need.data is not None:
            data = load_from_config(json.loads(need.data), cache_dir=data_cache)
        cases = list(data.cases) if data is not None else []

        def train(folder: Path, checkpoints: Path, need=need, cases=cases) -> dict[str, Any]:
            report = editor.train_artifact(need, loaded.model, loaded.tokenizer, cases, folder, checkpoints)
            return {**report, "n_train_cases": len(cases)}

        folders[need.name] = store.get(need, data.sha256 if data is not None else None, train)
    return folders


def _track_artifacts(
    cfg: DictConfig, resolved: dict, output_dir: Path, artifacts: dict[str, Path], store: ArtifactStore
) -> None:
    """task=prepare's tracker run: the artifacts' validation curves (runner.artifacts), nothing else."""
    name = f"{cfg.editor._target_.rsplit('.', 1)[-1]}-{cfg.model.name}-prepare"
    tracker = make_tracker(cfg.logger, resolved, output_dir, name, sweep_group())
    failed = True
    try:
        log_artifact_reports(tracker, artifacts, store.trained)
        failed = False
    finally:
        tracker.finish(failed=failed)


def _prepare_command(cfg: DictConfig) -> str:
    """The command that makes this run's artifacts (named when one is missing)."""
    parts = ["python run.py task=prepare"]
    if HydraConfig.initialized():
        choices = HydraConfig.get().runtime.choices
        parts += [
            f"{group}={choices[group]}" for group in ("editor", "model", "dataset") if choices.get(group)
        ]
    return " ".join(parts)


def build_stats(cfg: DictConfig, loaded: LoadedModel) -> SecondMoments:
    stats_cfg = OmegaConf.to_object(cfg.stats)
    assert isinstance(stats_cfg, StatsConfig)
    return SecondMoments(
        loaded.model,
        loaded.tokenizer,
        f"{loaded.model_id}@{loaded.revision}",
        stats_cfg,
        corpus_texts(stats_cfg.corpus, loaded.training_texts),
        Path(cfg.paths.cache_dir),
        progress=cfg.progress,
        # the toy's sentences are not fixed by the model alone (task=unlearn: unlearn.toy_stats)
        corpus_digest=content_hash(list(loaded.training_texts)) if stats_cfg.corpus == "training" else None,
    )


def method_label(cfg: DictConfig) -> str:
    """The editor's config name as the user chose it (``editor=ft_l``), with a non-default ablation
    (``come_memit+no_common``); the editor class's name outside a Hydra app."""
    if HydraConfig.initialized():
        choices = HydraConfig.get().runtime.choices
        label = choices.get("editor") or cfg.editor._target_.rsplit(".", 1)[-1]
        ablation = choices.get("editor/ablation")  # an editor's own variant group (CoME's Table-3 ablations)
        return f"{label}+{ablation}" if ablation and ablation not in ("none", "None") else label
    return cfg.editor._target_.rsplit(".", 1)[-1]


def sweep_group() -> str | None:
    """In a multirun, the sweep folder's name: every job of a sweep logs to one wandb group."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return Path(HydraConfig.get().sweep.dir).name


#: Config groups built as their typed schema at the start of a run: their range checks
#: (``__post_init__``) run before anything is loaded.
TYPED_GROUPS = ("model", "editor", "dataset", "eval", "stats", "logger")


def check_config(cfg: DictConfig) -> None:
    try:
        check_known_keys(cfg)  # `+editor.typo=1` is added by Hydra even to a typed node
        for group in TYPED_GROUPS:
            if group in cfg:
                OmegaConf.to_object(cfg[group])
    except (ValueError, OmegaConfBaseException) as exc:
        raise ConfigError(_one_line(exc)) from None
    if cfg.edit_mode not in EDIT_MODES:
        raise ConfigError(f"edit_mode must be one of {EDIT_MODES}, got {cfg.edit_mode!r}")
    if cfg.eval.timing not in EVAL_TIMINGS:
        raise ConfigError(f"eval.timing must be one of {EVAL_TIMINGS}, got {cfg.eval.timing!r}")
    if cfg.eval.timing == "at_end" and cfg.edit_mode != "sequential":
        raise ConfigError(
            "eval.timing=at_end needs edit_mode=sequential (batch mode restores between batches)"
        )
    if cfg.batch_size < 1:
        raise ConfigError(f"batch_size must be ≥ 1, got {cfg.batch_size}")
    if cfg.get("save_model") and cfg.edit_mode != "sequential":
        raise ConfigError(
            "save_model=true needs edit_mode=sequential (batch mode restores the model after every batch)"
        )
    if cfg.task not in TASKS:
        raise ConfigError(f"task must be one of {', '.join(TASKS)}, got {cfg.task!r}")


TASKS = ("edit", "stats", "prepare", "unlearn", "finetune")


def _one_line(exc: BaseException) -> str:
    """An OmegaConf error's first line with the key it names; other errors' text on one line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    key = getattr(exc, "full_key", None)
    if isinstance(exc, OmegaConfBaseException) and key and key not in text:
        text = f"{key}: {text}"
    return text if isinstance(exc, OmegaConfBaseException) else " ".join(lines)


def _context_reserve(editor_cfg: DictConfig) -> int:
    """Positions an editor's context prefixes take before an edit prompt (their max_len + '. ')."""
    templates = editor_cfg.get("context_templates") or []
    lengths = [int(max_len) for max_len, count in templates if count]
    return max(lengths) + 2 if lengths else 0


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run one experiment; returns the summary (``summary.json``'s content)."""
    check_config(cfg)
    seed_everything(cfg.seed)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    if cfg.task == "finetune":  # a model fine-tuned on an unlearning dataset's train split (runner.finetune)
        from runner.finetune import run_finetune

        return run_finetune(cfg)
    if cfg.task == "unlearn":  # its own loop (runner.unlearn), sharing the pieces below
        from runner.unlearn import check_unlearn_dataset, run_unlearn

        try:
            check_unlearn_dataset(cfg)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        return run_unlearn(cfg)
    if OmegaConf.get_type(cfg.dataset).__name__ == "UnlearningDatasetConfig":
        raise ConfigError(f"dataset={cfg.dataset.name} is an unlearning dataset: run it with task=unlearn")
    output_dir = Path(cfg.paths.output_dir)
    resolved = OmegaConf.to_container(cfg, resolve=True)  # stored with the results, logged, compared
    if cfg.task == "edit":  # a resume must be the same run; refused before anything is loaded
        check_resume(output_dir, resolved)
    cache_dir = Path(cfg.paths.cache_dir)
    data_cache = Path(cfg.dataset.cache_dir) if cfg.dataset.get("cache_dir") else cache_dir / "datasets"
    dataset = load_from_config(cfg.dataset, cache_dir=data_cache)
    log.info(
        "dataset %s: %d cases from %s (%d skipped)",
        dataset.name,
        len(dataset.cases),
        dataset.source,
        dataset.n_skipped,
    )
    if cfg.task == "edit":  # the dataset's extra probe sets are metrics too
        try:
            check_optimized_metric(cfg.optimized_metric, dataset.cases)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    with explain_oom("load", cfg):
        loaded = load_model(
            cfg.model, cases=_training_cases(cfg, dataset, data_cache), cache_dir=cache_dir, seed=cfg.seed
        )
    log.info("model %s (revision %s) on %s", loaded.model_id, loaded.revision, loaded.device)
    if cfg.task == "edit":  # before statistics and edits: a too-long probe fails in one line
        generation = cfg.eval.generation.enabled and cfg.dataset.get("generation_metrics", True)
        check_prompt_lengths(
            dataset.cases,
            loaded.tokenizer,
            context_length(loaded.model),
            reserve=_context_reserve(cfg.editor),
            generation_max_length=cfg.eval.generation.max_length if generation else None,
            limit_name="model.sizes.max_positions" if cfg.model.source != "hub" else "the model's context",
        )
    stats = build_stats(cfg, loaded)
    cache = (
        TargetCache(cache_dir / "targets", f"{loaded.model_id}@{loaded.revision}")
        if cfg.cache_targets
        else None
    )
    editor = build_editor(cfg.editor, loaded)
    if cfg.task in ("stats", "prepare"):  # computing them is what was asked for
        stats.cfg = replace(stats.cfg, allow_compute=True)
    with explain_oom("stats", cfg):  # before any edit, so their time is not the first batch's
        files = prepare_requirements(editor, stats)
    if cfg.task == "stats":
        return {"statistics": files}
    store = ArtifactStore(
        cache_dir / "artifacts",
        loaded.model_id,
        loaded.revision,
        allow_train=bool(cfg.train_artifacts) or cfg.task == "prepare",
        command=_prepare_command(cfg),
    )
    with explain_oom("prepare", cfg):
        try:
            artifacts = prepare_artifacts(editor, loaded, store, data_cache, cfg.artifact_max_steps)
        except ArtifactMissing as exc:
            raise ConfigError(str(exc)) from None
    if cfg.task == "prepare":
        _track_artifacts(cfg, resolved, output_dir, artifacts, store)
        return {"statistics": files, "artifacts": {name: str(path) for name, path in artifacts.items()}}
    editor.prepare(
        loaded.model,
        loaded.tokenizer,
        Resources(stats=stats, targets=cache, progress=cfg.progress, artifacts=artifacts),
    )

    name = f"{cfg.editor._target_.rsplit('.', 1)[-1]}-{cfg.model.name}-{dataset.name}"
    tracker = make_tracker(cfg.logger, resolved, output_dir, name, sweep_group())
    failed = True
    try:
        log_artifact_reports(tracker, artifacts, store.trained)
        summary = _edit_and_evaluate(cfg, resolved, dataset, loaded, editor, cache, tracker, output_dir)
        failed = False
        return summary
    finally:
        tracker.finish(failed=failed)


def _training_cases(cfg: DictConfig, dataset: LoadedDataset, data_cache: Path) -> list[EditCase]:
    """The cases a locally trained model learns: at least the first ``model.train.cases`` of the
    dataset (all of the run's when it has more), so that runs of every ``dataset.size`` edit one
    and the same model. A file with fewer cases is topped up from the bundled sample of the same
    name and schema (the run's own cases first: where a prompt appears twice, theirs wins)."""
    n = OmegaConf.select(cfg, "model.train.cases", default=None)
    if cfg.model.source != "toy" or not n or n <= len(dataset.cases):
        return dataset.cases
    spec = OmegaConf.to_container(cfg.dataset, resolve=True)
    more = load_from_config({**spec, "size": n}, cache_dir=data_cache)
    cases = list(more.cases)
    if len(cases) < n and (spec.get("path") or spec.get("download")):
        try:
            bundled = load_from_config({**spec, "path": None, "download": False, "size": None})
        except (ValueError, DatasetError):  # no bundled sample of this name
            bundled = None
        if bundled is not None and bundled.schema == more.schema:
            taken = {c.request.subject for c in cases}
            filler = [c for c in bundled.cases if c.request.subject not in taken]
            cases += filler[: n - len(cases)]
            log.info(
                "toy: %d cases of %s topped up with %d bundled cases (model.train.cases=%d)",
                len(more.cases),
                more.source,
                len(cases) - len(more.cases),
                n,
            )
    return cases


def _edit_and_evaluate(
    cfg,
    resolved: dict,
    dataset: LoadedDataset,
    loaded: LoadedModel,
    editor,
    cache: TargetCache | None,
    tracker,
    output_dir: Path,
) -> dict:
    model, tok = loaded.model, loaded.tokenizer
    store = ResultsStore(output_dir, run_config=resolved)
    done = store.done_ids()
    if done:
        log.info(
            "resuming: %d of %d cases already in %s",
            len(done & {c.case_id for c in dataset.cases}),
            len(dataset.cases),
            store.path,
        )
    cases = dataset.cases
    batches = [cases[i : i + cfg.batch_size] for i in range(0, len(cases), cfg.batch_size)]
    todo_ids = {c.case_id for c in cases} - done
    sequential = cfg.edit_mode == "sequential"
    gen_cfg = OmegaConf.to_object(cfg.eval.generation)
    generation, gen_protocol = None, {"enabled": False}
    if gen_cfg.enabled and cfg.dataset.get("generation_metrics", True):
        generation, gen_protocol = build_generation_metrics(
            gen_cfg, cases, Path(cfg.paths.cache_dir), seed=cfg.seed
        )
        gen_protocol = {"enabled": True, **gen_protocol}
    timings = {"edit_seconds": 0.0, "eval_seconds": 0.0, "generation_seconds": 0.0}

    def evaluate(
        batch: Sequence[EditCase], generate: bool = True, pack: bool = True
    ) -> list[dict[str, float]]:
        if not batch:
            return []
        with explain_oom("eval", cfg):
            metrics = score_cases(
                model,
                tok,
                batch,
                batch_size=cfg.eval.batch_size,
                progress=cfg.progress and len(batch) > 100,
                pack=pack
                and not loaded.changes_forward,  # a loaded GRACE/WISE/SERAC folder routes whole rows
            )
        if generation is not None and generate:
            t0 = time.perf_counter()
            with explain_oom("generation", cfg):
                rows = generation(model, tok, batch, progress=cfg.progress and len(batch) > 100)
            timings["generation_seconds"] += time.perf_counter() - t0
            for m, row in zip(metrics, rows):
                if not gen_cfg.keep_texts:
                    row.pop("generations", None)
                m.update(row)
        return metrics

    # Pre-edit scores come from the unedited model, so they are taken before any edit.
    pre: dict[str, dict[str, float]] = {}
    if cfg.eval.pre_edit and todo_ids:
        todo = [c for c in cases if c.case_id in todo_ids]
        t0 = time.perf_counter()
        for case, metrics in zip(todo, evaluate(todo, generate=gen_cfg.pre_edit)):
            pre[case.case_id] = add_prefix(metrics, "pre_")
        log.info("pre-edit evaluation of %d cases: %.1fs", len(todo), time.perf_counter() - t0)

    kept = None  # sequential mode: the handle of every edit so far
    pending: list[tuple[EditCase, dict]] = []
    try:
        for index, batch in enumerate(tqdm(batches, desc="edit batches", disable=not cfg.progress)):
            todo = [c for c in batch if c.case_id in todo_ids]
            if not todo and not sequential:
                continue  # done in an earlier run; sequential runs still re-apply it below
            t0 = time.perf_counter()
            with explain_oom("edit", cfg, editor.memory_knobs()):
                delta = editor.apply(model, tok, [c.request for c in batch])
            edit_seconds = time.perf_counter() - t0
            timings["edit_seconds"] += edit_seconds
            batch_info = {"batch": index, "diag_edit_seconds": edit_seconds}
            batch_info.update({f"diag_{k}": v for k, v in delta.diagnostics.items()})
            per_case = {
                case.case_id: {f"diag_{k}": values[i] for k, values in delta.case_diagnostics.items()}
                for i, case in enumerate(batch)
            }
            handle = delta.attach(model)
            try:
                if cfg.eval.timing == "after_batch":
                    t0 = time.perf_counter()
                    post = evaluate(todo, pack=not handle.changes_forward)
                    timings["eval_seconds"] += time.perf_counter() - t0
                    records = [
                        _record(c, pre, m, batch_info | per_case[c.case_id]) for c, m in zip(todo, post)
                    ]
                    if records:
                        store.append(records)
                        tracker.log(_batch_log(records), step=index)
                else:
                    pending.extend((c, batch_info | per_case[c.case_id]) for c in todo)
            finally:
                if sequential:
                    kept = handle if kept is None else kept.merge(handle)
                else:
                    handle.restore()
                    editor.reset()
        if pending:
            t0 = time.perf_counter()
            post = evaluate([c for c, _ in pending], pack=kept is None or not kept.changes_forward)
            timings["eval_seconds"] += time.perf_counter() - t0
            store.append([_record(c, pre, m, info) for (c, info), m in zip(pending, post)])
        if cfg.get("save_model"):
            folder = save_edited(model, tok, output_dir / "edited_model")
            timings["edited_model"] = str(folder)
            log.info(
                "edited model written to %s (load: runner.export.load_edited or model.hub_id=<it>)", folder
            )
    finally:
        if kept is not None:
            kept.restore()  # verified bit-exact; raises otherwise
            editor.reset()
    if cache is not None:
        timings["target_cache"] = {"hits": cache.hits, "misses": cache.misses}
        log.info("target vectors: %d from cache, %d optimised", cache.hits, cache.misses)
    return _summarize(cfg, dataset, loaded, store, output_dir, tracker, timings, gen_protocol)


def _record(case: EditCase, pre: dict, post: dict[str, float], batch_info: dict) -> dict:
    request = case.request
    return {
        "case_id": case.case_id,
        "subject": request.subject,
        "prompt": request.text,
        "target_new": request.target_new,
        "target_true": request.target_true,
        **pre.get(case.case_id, {}),
        **add_prefix(post, "post_"),
        **batch_info,
    }


def _batch_log(records: list[dict]) -> dict[str, float]:
    keys = {k for r in records for k, v in r.items() if k.startswith("post_") and isinstance(v, (int, float))}
    return {
        f"batch/{k[5:]}": float(np.mean([r[k] for r in records if isinstance(r.get(k), (int, float))]))
        for k in sorted(keys)
    }


def _summarize(
    cfg,
    dataset: LoadedDataset,
    loaded: LoadedModel,
    store: ResultsStore,
    output_dir: Path,
    tracker,
    timings,
    gen_protocol: dict,
) -> dict:
    wanted = {c.case_id for c in dataset.cases}
    records = [r for r in store.load() if str(r["case_id"]) in wanted]
    by_prefix = aggregate_by_prefix(records)
    post, pre = by_prefix["post"], by_prefix["pre"]
    diag_keys = sorted({k for r in records for k in r if k.startswith("diag_")})
    diagnostics = {
        k[5:]: {"mean": float(np.mean(v)), "sum": float(np.sum(v))}
        for k in diag_keys
        if (v := [r[k] for r in records if k in r])
    }
    summary: dict[str, Any] = {k: post[k]["mean"] for k in HEADLINE if k in post}
    if gen_protocol.get("enabled"):
        sources = [r["post_generation_prompts"] for r in records if "post_generation_prompts" in r]
        gen_protocol = gen_protocol | {"prompt_sources": {s: sources.count(s) for s in sorted(set(sources))}}
    summary.update(
        {
            "n_cases": len(records),
            "metrics": {"post": post, "pre": pre},
            "diagnostics": diagnostics,
            "timing": timings,
            "protocol": {
                "editor": cfg.editor._target_,
                "method": method_label(cfg),
                "edit_mode": cfg.edit_mode,
                "batch_size": cfg.batch_size,
                "eval_timing": cfg.eval.timing,
                "generation": gen_protocol,
                "seed": cfg.seed,
                "dataset": {
                    "name": dataset.name,
                    "source": dataset.source,
                    "sha256": dataset.sha256,
                    "schema": dataset.schema,
                    "n_records": dataset.n_records,
                    "n_skipped": dataset.n_skipped,
                    "size": cfg.dataset.size,
                },
                "model": {
                    "id": loaded.model_id,
                    "revision": loaded.revision,
                    "dtype": cfg.model.dtype,
                    "info": {k: v for k, v in loaded.info.items() if isinstance(v, (int, float, str))},
                },
                "statistics": {
                    "corpus": cfg.stats.corpus,
                    "n_samples": cfg.stats.n_samples,
                    "dtype": cfg.stats.dtype,
                },
                "metric_definitions": {name: METRICS[name].description for name in post if name in METRICS},
                "git_sha": git_sha(),
                "environment": run_environment(),
            },
        }
    )
    store.write_json("summary.json", summary)
    columns = [k for k in HEADLINE if k in post or k in pre]
    table = format_table([("pre-edit", pre), ("post-edit", post)], columns)
    print(f"\n{table}\n\nresults: {store.path}\nsummary: {output_dir / 'summary.json'}")
    tracker.summary(
        {f"post/{k}": v["mean"] for k, v in post.items()} | {f"pre/{k}": v["mean"] for k, v in pre.items()}
    )
    return summary
