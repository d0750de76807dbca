"""What ``make bench`` times: the stages of an edit and whole runs, each as a pair of callables
(the fast path and the same code forced to one case at a time).

To add a stage, write ``def _my_stage(ctx, cases) -> Pair`` and append
``Stage("my_stage", "cases", _my_stage, requires="package.module")`` to :data:`STAGES`; a stage
whose ``requires`` module cannot be imported, or whose factory raises :class:`Skip`, is listed as
skipped with the reason. ``cases`` is the list of cases to use (a short one for the warm-up call).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from editors.core.keys import compute_keys
from editors.core.targets import optimize_targets
from editors.core.update import least_squares_update, to_weight_layout
from evaluation.cases import EditCase
from evaluation.metrics import score_cases


class Skip(Exception):
    """A stage that cannot run here (the reason is reported)."""


@dataclass
class BenchContext:
    """Everything the stages share: the model, the cases, the editors by name, the sizes."""

    model: torch.nn.Module
    tokenizer: Any
    cases: list[EditCase]
    editors: dict[str, Any]  # editor name -> editor object (first one drives the stage rows)
    batch: int  # requests per edit batch and per target-vector batch
    eval_batch: int  # sequences per scorer forward pass
    generation_cases: int
    generation_length: int
    device: torch.device

    @property
    def editor(self) -> Any:
        return next(iter(self.editors.values()))


@dataclass
class Pair:
    """The fast path and the one-at-a-time baseline of one stage, over ``items`` ``unit``."""

    fast: Callable[[], Any]
    baseline: Callable[[], Any]
    items: int
    fast_label: str
    baseline_label: str


@dataclass
class Stage:
    name: str
    unit: str  # "edits" or "cases": what ``items`` counts
    make: Callable[[BenchContext, Sequence[EditCase]], Pair]
    requires: str | None = None  # a module that must exist, else the stage is skipped
    description: str = ""


def _requests(cases: Sequence[EditCase]) -> list:
    return [c.request for c in cases]


def _targets(ctx: BenchContext, cases: Sequence[EditCase]) -> Pair:
    editor, requests = ctx.editor, _requests(cases)
    sites = editor.optimized_sites()
    context = editor.context(ctx.model, ctx.tokenizer)
    cfg = editor.config.target

    def run(batch_size: int) -> Callable[[], Any]:
        return lambda: optimize_targets(
            ctx.model, ctx.tokenizer, requests, sites, context, replace(cfg, batch_size=batch_size)
        )

    return Pair(run(ctx.batch), run(1), len(requests), f"{ctx.batch} requests/batch", "1 request at a time")


def _keys(ctx: BenchContext, cases: Sequence[EditCase]) -> Pair:
    editor, requests = ctx.editor, _requests(cases)
    cfg = editor.config
    modules = editor.statistics_modules()
    context = editor.context(ctx.model, ctx.tokenizer)

    def fast() -> None:
        for module in modules:
            compute_keys(
                ctx.model, ctx.tokenizer, requests, module, context, cfg.key_averaging, cfg.read_batch_size
            )

    def one_at_a_time() -> None:
        for module in modules:
            for request in requests:
                compute_keys(
                    ctx.model,
                    ctx.tokenizer,
                    [request],
                    module,
                    context,
                    cfg.key_averaging,
                    cfg.read_batch_size,
                )

    return Pair(
        fast,
        one_at_a_time,
        len(requests),
        f"all requests, {cfg.read_batch_size} prompts/pass",
        "1 request per call",
    )


def _solve(ctx: BenchContext, cases: Sequence[EditCase]) -> Pair:
    """The least-squares update of every edited layer: one solve for the batch against one solve
    per request (what editing one case at a time costs). Keys are real, residuals random."""
    editor, requests = ctx.editor, _requests(cases)
    cfg = editor.config
    modules = editor.statistics_modules()
    context = editor.context(ctx.model, ctx.tokenizer)
    generator = torch.Generator().manual_seed(0)
    data = []
    for module in modules:
        keys = compute_keys(
            ctx.model, ctx.tokenizer, requests, module, context, cfg.key_averaging, cfg.read_batch_size
        )
        second_moment = editor.stats.get(module).to(ctx.device)
        d_out = ctx.model.get_input_embeddings().embedding_dim
        residuals = torch.randn(len(requests), d_out, generator=generator).to(ctx.device)
        data.append((module, keys, residuals, second_moment))

    def fast() -> None:
        for module, keys, residuals, c in data:
            to_weight_layout(ctx.model, module, least_squares_update(keys, residuals, c, cfg.update_weight))
        _sync(ctx.device)

    def one_at_a_time() -> None:
        for module, keys, residuals, c in data:
            for i in range(len(requests)):
                update = least_squares_update(keys[i : i + 1], residuals[i : i + 1], c, cfg.update_weight)
                to_weight_layout(ctx.model, module, update)
        _sync(ctx.device)

    return Pair(fast, one_at_a_time, len(requests), "1 solve per layer", "1 solve per layer and request")


def _scoring(ctx: BenchContext, cases: Sequence[EditCase]) -> Pair:
    cases = list(cases)
    return Pair(
        lambda: score_cases(ctx.model, ctx.tokenizer, cases, batch_size=ctx.eval_batch),
        lambda: score_cases(ctx.model, ctx.tokenizer, cases, batch_size=1),
        len(cases),
        f"{ctx.eval_batch} sequences/pass",
        "1 sequence/pass",
    )


def _generation(ctx: BenchContext, cases: Sequence[EditCase]) -> Pair:
    """Hook for ``evaluation.generation`` (sampling for Fluency/Consistency): expects
    ``generate_texts(model, tokenizer, prompts, settings)`` and a ``GenerationSettings``
    dataclass with ``batch_size`` and ``max_length``. Adapt here if that API changes."""
    module = importlib.import_module("evaluation.generation")
    generate = getattr(module, "generate_texts", None)
    settings_cls = getattr(module, "GenerationSettings", None)
    if generate is None or settings_cls is None:
        raise Skip("evaluation.generation has no generate_texts/GenerationSettings (update bench/stages.py)")
    names = {f.name for f in dataclasses.fields(settings_cls)}
    if not {"batch_size", "max_length"} <= names:
        raise Skip("GenerationSettings has no batch_size/max_length (update bench/stages.py)")
    chosen = list(cases)[: ctx.generation_cases]
    prompts = [c.generation_prompts[0] if c.generation_prompts else c.request.text for c in chosen]

    def run(batch_size: int) -> Callable[[], Any]:
        settings = settings_cls(batch_size=batch_size, max_length=ctx.generation_length)
        return lambda: generate(ctx.model, ctx.tokenizer, prompts, settings)

    return Pair(
        run(ctx.batch),
        run(1),
        len(prompts),
        f"{ctx.batch} prompts/pass, {ctx.generation_length} tokens",
        f"1 prompt/pass, {ctx.generation_length} tokens",
    )


#: The stages, in table order. Extend here (see the module docstring).
STAGES: list[Stage] = [
    Stage("targets", "edits", _targets, description="target vectors z (editors.core.targets)"),
    Stage("keys", "edits", _keys, description="keys at every edited layer (editors.core.keys)"),
    Stage("solve", "edits", _solve, description="least-squares update of every layer (editors.core.update)"),
    Stage("scoring", "cases", _scoring, description="probability metrics (evaluation.scoring)"),
    Stage(
        "generation",
        "cases",
        _generation,
        requires="evaluation.generation",
        description="sampled text for Fluency/Consistency (evaluation.generation)",
    ),
]


def missing_module(stage: Stage) -> str | None:
    """The reason to skip ``stage`` when the module it needs does not exist."""
    if stage.requires is None:
        return None
    try:
        found = importlib.util.find_spec(stage.requires) is not None
    except ModuleNotFoundError:
        found = False
    return None if found else f"{stage.requires} does not exist yet"


def end_to_end(ctx: BenchContext, editor: Any, cases: Sequence[EditCase], one_at_a_time: bool) -> Callable:
    """A whole run over ``cases``, as ``runner.pipeline`` does it: pre-edit scores, then per
    batch of ``ctx.batch`` cases: edit, apply, score, restore. ``one_at_a_time``: target
    vectors one request at a time and the scorer at batch size 1 (same edit batches)."""
    target_batch = 1 if one_at_a_time else ctx.batch
    eval_batch = 1 if one_at_a_time else ctx.eval_batch
    cases = list(cases)

    def run() -> dict[str, float]:
        editor.config.target = replace(editor.config.target, batch_size=target_batch)
        timings = {"edit_seconds": 0.0, "eval_seconds": 0.0}
        t0 = time.perf_counter()
        score_cases(ctx.model, ctx.tokenizer, cases, batch_size=eval_batch)
        timings["eval_seconds"] += time.perf_counter() - t0
        for start in range(0, len(cases), ctx.batch):
            batch = cases[start : start + ctx.batch]
            t0 = time.perf_counter()
            delta = editor.apply(ctx.model, ctx.tokenizer, _requests(batch))
            _sync(ctx.device)
            timings["edit_seconds"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            with delta.applied(ctx.model):
                score_cases(ctx.model, ctx.tokenizer, batch, batch_size=eval_batch)
            editor.reset()  # batch mode: the model is unedited again
            timings["eval_seconds"] += time.perf_counter() - t0
        return timings

    return run


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
