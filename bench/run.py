"""``python -m bench``: time every stage and whole runs, batched against one case at a time.

    python -m bench                                   # toy model, 64 cases, batch 32
    python -m bench --cases 128 --batch 64 --repeat 5
    python -m bench --stages targets,scoring --editors memit
    python -m bench --arch llama3-8b --cases 64       # GPU only: real-size shapes, random bf16 weights

The default model is the locally trained ``toy`` (``conf/model/toy.yaml``, trained on the bundled
CounterFact sample's first ``--toy-cases`` cases once, then loaded from ``.cache``); the cases are
the first ``--cases`` of those. ``--arch`` builds GPT-J-6B or LLaMA-3-8B from its
``transformers`` config with random weights in bfloat16 on the GPU, with a BPE tokenizer trained
on the bundled text and covariance statistics from ``--stats-samples`` bundled WikiText-2
paragraphs: timings and memory are those of the real shapes; edit quality means nothing.

Every measurement runs ``--repeat`` times (end-to-end runs ``--e2e-repeat`` times), alternating
the fast path and the baseline, after one warm-up call on two cases; the table shows the fastest
repeat (a shared machine slows runs at random), the JSON every repeat.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from bench.measure import Measurement, measure_once
from bench.stages import STAGES, BenchContext, Skip, end_to_end, missing_module

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
ARCHS = {"gptj-6b": "gpt-j", "llama3-8b": "llama3"}  # --arch -> the conf/model file of the real model
GOALS = {"scoring": 5.0, "targets": 3.0}  # batched / one-at-a-time at batch >= GOAL_BATCH
GOAL_BATCH = 32


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=64, help="cases (= edits) to time (default 64)")
    parser.add_argument("--batch", type=int, default=32, help="edits per batch / target-vector batch (32)")
    parser.add_argument(
        "--eval-batch", type=int, default=None, help="sequences per scorer pass (default: --batch)"
    )
    parser.add_argument(
        "--stages",
        default=",".join(s.name for s in STAGES),
        help="comma-separated stages (default: all); 'none' for end-to-end only",
    )
    parser.add_argument("--editors", default="memit,come_memit", help="end-to-end editors ('none' to skip)")
    parser.add_argument("--repeat", type=int, default=3, help="timed repeats per stage (fastest shown)")
    parser.add_argument("--e2e-repeat", type=int, default=1, help="timed repeats per end-to-end run")
    parser.add_argument("--generation-cases", type=int, default=8, help="prompts for the generation stage")
    parser.add_argument("--generation-length", type=int, default=100, help="tokens per text, prompt included")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument(
        "--toy-cases", type=int, default=200, help="cases the toy is trained on (its cache key)"
    )
    parser.add_argument("--arch", choices=sorted(ARCHS), default=None, help="real-size random model (GPU)")
    parser.add_argument("--stats-samples", type=int, default=1000, help="--arch: statistics paragraphs")
    parser.add_argument(
        "--out", type=Path, default=None, help="JSON path (default bench/results/<time>.json)"
    )
    args = parser.parse_args(argv)
    if args.eval_batch is None:
        args.eval_batch = args.batch
    if min(args.cases, args.batch, args.eval_batch, args.repeat) < 1:
        parser.error("--cases, --batch, --eval-batch and --repeat must be >= 1")
    return args


# ----------------------------------------------------------------------------------------- setup


def editor_names(args: argparse.Namespace) -> list[str]:
    """The end-to-end editors; the first also drives the stage rows (MEMIT when none)."""
    return [] if args.editors == "none" else [e.strip() for e in args.editors.split(",") if e.strip()]


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from runner.schema import register

    register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides)


def _cache_dir() -> Path:
    return Path(os.environ.get("KNOWEDIT_CACHE_DIR") or ROOT / ".cache")


def setup(args: argparse.Namespace) -> tuple[BenchContext, dict[str, Any]]:
    """Model, cases, statistics and editors; returns the context and facts for the JSON."""
    from editors.base import Resources
    from runner.datasets import load_from_config
    from runner.pipeline import build_editor, build_stats, prepare_requirements

    editors = editor_names(args)
    first_editor = editors[0] if editors else "memit"
    output_dir = tempfile.mkdtemp(prefix="bench-")
    common = [
        "logger=none",
        "progress=false",
        f"paths.cache_dir={_cache_dir()}",
        f"paths.output_dir={output_dir}",
    ]
    if args.arch:
        if not torch.cuda.is_available():
            raise SystemExit(
                f"--arch {args.arch} needs a CUDA device (real-size shapes do not fit a CPU run)"
            )
        model_name = ARCHS[args.arch]
        common += [
            f"model={model_name}",
            "model.dtype=bfloat16",
            f"dataset.size={args.cases}",
            "stats.corpus=wikitext2",
            f"stats.n_samples={args.stats_samples}",
            "stats.dtype=float32",
        ]
    else:
        model_name = "toy"
        common += ["model=toy", f"dataset.size={max(args.toy_cases, args.cases)}"]
    cfgs = {name: _compose([*common, f"editor={name}"]) for name in dict.fromkeys([first_editor, *editors])}
    cfg = cfgs[first_editor]
    dataset = load_from_config(cfg.dataset, cache_dir=_cache_dir() / "datasets")
    cases = dataset.cases[: args.cases]
    if len(cases) < args.cases:
        raise SystemExit(f"the dataset has {len(cases)} cases; --cases {args.cases} asks for more")
    if args.arch:
        loaded = _real_size(cfg, args.arch)
        stats_dir = tempfile.mkdtemp(prefix="bench-stats-")  # random weights: nothing worth caching
        for c in cfgs.values():
            c.paths.cache_dir = stats_dir
    else:
        from runner.models import load_model

        loaded = load_model(cfg.model, cases=dataset.cases, cache_dir=_cache_dir(), seed=cfg.seed)
    stats = build_stats(cfg, loaded)
    built = {name: build_editor(c.editor, loaded) for name, c in cfgs.items()}
    for editor in built.values():
        prepare_requirements(editor, stats)  # computed or loaded now, not inside a timing
        editor.prepare(loaded.model, loaded.tokenizer, Resources(stats=stats))
    ctx = BenchContext(
        model=loaded.model,
        tokenizer=loaded.tokenizer,
        cases=cases,
        editors=built,
        batch=args.batch,
        eval_batch=args.eval_batch,
        generation_cases=args.generation_cases,
        generation_length=args.generation_length,
        device=loaded.device,
    )
    facts = {
        "model": loaded.model_id,
        "model_revision": loaded.revision,
        "model_dtype": str(next(loaded.model.parameters()).dtype),
        "parameters": sum(p.numel() for p in loaded.model.parameters()),
        "edit_layers": list(cfg.editor.layers),
        "dataset": {"name": dataset.name, "source": dataset.source, "cases": len(cases)},
        "statistics_cached": sorted(set(stats.loaded_from_cache)),
        "statistics_computed": sorted(set(stats.computed)),
        "model_config": model_name,
    }
    return ctx, facts


def _real_size(cfg, arch: str, device: torch.device | None = None, shrink: dict | None = None):
    """GPT-J-6B or LLaMA-3-8B shapes with random bf16 weights on the GPU (see the module docstring).

    ``device`` and ``shrink`` (config fields to override, e.g. fewer layers) exist only to smoke-test
    this code path on a CPU; the command line always builds the real shapes on ``cuda``."""
    from transformers import AutoModelForCausalLM, GPTJConfig, LlamaConfig

    from runner.models import LoadedModel, TokenizerSettings, model_spec, tokenizer_corpus
    from runner.tokenizers import load_or_train_tokenizer

    style = "llama" if arch.startswith("llama") else "gptj"
    tokenizer, _ = load_or_train_tokenizer(
        tokenizer_corpus(TokenizerSettings()), vocab_size=8000, style=style, cache_dir=_cache_dir()
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if arch == "gptj-6b":  # EleutherAI/gpt-j-6B (GPTJConfig's defaults are that model)
        config = GPTJConfig(
            vocab_size=50400, n_positions=2048, n_embd=4096, n_layer=28, n_head=16, rotary_dim=64
        )
    else:  # meta-llama/Meta-Llama-3-8B
        config = LlamaConfig(
            vocab_size=128256,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            max_position_embeddings=8192,
            rope_theta=500000.0,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
        )
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    for key, value in (shrink or {}).items():
        setattr(config, key, value)
    torch.manual_seed(0)
    device = device or torch.device("cuda")
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.eval()
    spec = model_spec(cfg.model)
    spec.validate(model)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        spec=spec,
        model_id=f"random-{arch}",
        revision="seed0",
        device=device,
    )


# ------------------------------------------------------------------------------------------ runs


def run_stages(ctx: BenchContext, names: list[str], repeat: int) -> list[dict[str, Any]]:
    rows = []
    for stage in STAGES:
        if stage.name not in names:
            continue
        row: dict[str, Any] = {"stage": stage.name, "unit": stage.unit, "description": stage.description}
        reason = missing_module(stage)
        try:
            if reason is not None:
                raise Skip(reason)
            warm = stage.make(ctx, ctx.cases[:2])
            warm.fast()
            warm.baseline()
            pair = stage.make(ctx, ctx.cases)
        except Skip as skip:
            row["skipped"] = str(skip)
            rows.append(row)
            print(f"  {stage.name}: skipped ({skip})", flush=True)
            continue
        fast, base = Measurement(), Measurement()
        for _ in range(repeat):
            measure_once(pair.fast, ctx.device, fast)
            measure_once(pair.baseline, ctx.device, base)
        row.update(
            items=pair.items,
            batched={"how": pair.fast_label, **fast.as_dict(pair.items)},
            one_at_a_time={"how": pair.baseline_label, **base.as_dict(pair.items)},
            ratio=base.best / fast.best,
        )
        rows.append(row)
        print(
            f"  {stage.name}: {fast.best:.2f}s batched, {base.best:.2f}s one at a time ({row['ratio']:.1f}x)",
            flush=True,
        )
    return rows


def run_end_to_end(ctx: BenchContext, names: list[str], repeat: int) -> list[dict[str, Any]]:
    rows = []
    for name in names:
        editor = ctx.editors[name]
        runs = {}
        for one in (False, True):  # warm-up on two cases (context templates, first allocations)
            end_to_end(ctx, editor, ctx.cases[:2], one)()
        fast, base = Measurement(), Measurement()
        timings: dict[bool, list[dict[str, float]]] = {False: [], True: []}
        for _ in range(repeat):
            for one, into in ((False, fast), (True, base)):
                timings[one].append(measure_once(end_to_end(ctx, editor, ctx.cases, one), ctx.device, into))
        n = len(ctx.cases)
        for one, meas in ((False, fast), (True, base)):
            best = timings[one][meas.seconds.index(meas.best)]
            runs["one_at_a_time" if one else "batched"] = {
                "how": "target vectors 1 request at a time, scorer at batch size 1"
                if one
                else f"target vectors {ctx.batch} requests/batch, scorer {ctx.eval_batch} sequences/pass",
                **meas.as_dict(n),
                **best,
                "edits_per_second": n / best["edit_seconds"],
                "cases_per_second": n / meas.best,
            }
        row = {"editor": name, "edit_batch": ctx.batch, "cases": n, **runs, "ratio": base.best / fast.best}
        rows.append(row)
        print(
            f"  end to end {name}: {fast.best:.1f}s batched, {base.best:.1f}s one at a time "
            f"({row['ratio']:.1f}x)",
            flush=True,
        )
    return rows


def check_goals(stages: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    out = {}
    for row in stages:
        goal = GOALS.get(row["stage"])
        if goal is None:
            continue
        batch = args.eval_batch if row["stage"] == "scoring" else args.batch
        if "ratio" not in row:
            status = "skipped"
        elif batch < GOAL_BATCH:
            status = f"not checked (batch {batch} < {GOAL_BATCH})"
        else:
            status = "met" if row["ratio"] >= goal else "not met"
        out[row["stage"]] = {"goal_ratio": goal, "ratio": row.get("ratio"), "batch": batch, "status": status}
    return out


# --------------------------------------------------------------------------------------- report


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def format_table(result: dict[str, Any]) -> str:
    lines = [
        "| stage | items | batched s | 1-at-a-time s | batched /s | 1-at-a-time /s | speed-up | "
        "peak MiB batched / 1-at-a-time (increase) |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in result["stages"]:
        if "skipped" in row:
            lines.append(f"| {row['stage']} | skipped: {row['skipped']} | | | | | | |")
            continue
        b, o = row["batched"], row["one_at_a_time"]
        lines.append(
            f"| {row['stage']} | {row['items']} {row['unit']} | {b['seconds_min']:.2f} | {o['seconds_min']:.2f} "
            f"| {b['per_second']:.1f} | {o['per_second']:.1f} | {row['ratio']:.1f}x "
            f"| {_mib(b['peak_mib'])} / {_mib(o['peak_mib'])} "
            f"(+{_mib(b['peak_increase_mib'])} / +{_mib(o['peak_increase_mib'])}) |"
        )
    for row in result["end_to_end"]:
        b, o = row["batched"], row["one_at_a_time"]
        lines.append(
            f"| end to end: {row['editor']} | {row['cases']} edits | {b['seconds_min']:.1f} | {o['seconds_min']:.1f} "
            f"| {b['edits_per_second']:.2f} edits, {b['cases_per_second']:.2f} cases "
            f"| {o['edits_per_second']:.2f} edits, {o['cases_per_second']:.2f} cases | {row['ratio']:.1f}x "
            f"| {_mib(b['peak_mib'])} / {_mib(o['peak_mib'])} "
            f"(+{_mib(b['peak_increase_mib'])} / +{_mib(o['peak_increase_mib'])}) |"
        )
    return "\n".join(lines)


def _git_sha() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def _machine(device: torch.device) -> dict[str, Any]:
    import transformers

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    stage_names = [] if args.stages == "none" else [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = set(stage_names) - {s.name for s in STAGES}
    if unknown:
        raise SystemExit(f"unknown stage(s) {sorted(unknown)}; stages: {[s.name for s in STAGES]}")
    started = _dt.datetime.now()
    print(f"bench: setting up ({'toy' if not args.arch else args.arch}, {args.cases} cases)", flush=True)
    ctx, facts = setup(args)
    gc.collect()
    gc.freeze()  # the model and library objects are not traversed by every later collection
    print(f"bench: {args.cases} cases, batch {args.batch}, scorer batch {args.eval_batch}", flush=True)
    result: dict[str, Any] = {
        "meta": {
            "started": started.isoformat(timespec="seconds"),
            "git": _git_sha(),
            "machine": _machine(ctx.device),
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            **facts,
        }
    }
    result["stages"] = run_stages(ctx, stage_names, args.repeat)
    result["end_to_end"] = run_end_to_end(ctx, editor_names(args), args.e2e_repeat)
    result["goals"] = check_goals(result["stages"], args)
    result["meta"]["seconds"] = (_dt.datetime.now() - started).total_seconds()
    table = format_table(result)
    print()
    print(table)
    for stage, goal in result["goals"].items():
        ratio = "-" if goal["ratio"] is None else f"{goal['ratio']:.1f}x"
        print(
            f"goal {stage}: >= {goal['goal_ratio']:.0f}x at batch >= {GOAL_BATCH}: {ratio}, {goal['status']}"
        )
    out = args.out or RESULTS / f"{started.strftime('%Y-%m-%d_%H-%M-%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result["table"] = table
    out.write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(f"\nresults: {out}")
    return result


if __name__ == "__main__":
    main()
