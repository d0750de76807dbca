"""``python -m bench.stream``: the cost of one edit as a sequential stream of edits grows.

    python -m bench.stream                                  # toy, alphaedit,grace,wise,memit, T = 10,100
    python -m bench.stream --editors grace --checkpoints 10,100,1000 --dataset zsre --download
    python -m bench.stream --arch llama3-8b --editors alphaedit --checkpoints 10,100   # GPU: real shapes

Every editor edits the first ``max(T)`` cases one batch of ``--batch`` at a time, keeping every edit
(``edit_mode=sequential``: each apply sees the model holding all earlier edits), with no evaluation in
between. At each checkpoint T it records the seconds per edit spent since the previous checkpoint;
``growth`` is the last segment's seconds per edit over the first's, so 1.0 means the cost of an edit
does not grow with the stream (a ratio measured within one run, on one machine). Target vectors are
never read from a cache. The default toy is the 200-case one (``--toy-cases``); edits beyond the
cases it was trained on still cost what an edit costs. Writes ``bench/results/stream-<time>.json``
and prints a table.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import time
from pathlib import Path
from typing import Any

import torch

from bench.run import ARCHS, RESULTS, _cache_dir, _compose, _real_size
from bench.stages import _sync


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.stream", description=__doc__.split("\n\n")[0])
    parser.add_argument("--editors", default="alphaedit,grace,wise,memit", help="comma-separated editors")
    parser.add_argument(
        "--checkpoints", default="10,100", help="stream lengths T to time at (default 10,100)"
    )
    parser.add_argument(
        "--batch", type=int, default=1, help="edits per apply (default 1: the lifelong protocol)"
    )
    parser.add_argument("--dataset", default="counterfact", help="dataset config (counterfact | zsre)")
    parser.add_argument("--download", action="store_true", help="the full public file (for T > 500)")
    parser.add_argument("--toy-cases", type=int, default=200, help="cases the toy is trained on")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--arch", choices=sorted(ARCHS), default=None, help="real-size random model (GPU)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path")
    args = parser.parse_args(argv)
    args.checkpoints = sorted({int(t) for t in args.checkpoints.split(",") if t.strip()})
    if not args.checkpoints or args.checkpoints[0] < 1 or args.batch < 1:
        parser.error("--checkpoints must be positive integers and --batch >= 1")
    return args


def stream(
    editor: Any, model, tokenizer, requests: list, checkpoints: list[int], batch: int, device
) -> list[dict]:
    """Apply ``requests`` in batches, keeping every edit; seconds per edit between checkpoints."""
    kept, done, spent, rows, last_t, last_spent = None, 0, 0.0, [], 0, 0.0
    try:
        for start in range(0, checkpoints[-1], batch):
            chunk = requests[start : start + batch]
            t0 = time.perf_counter()
            edit = editor.apply(model, tokenizer, chunk)
            handle = edit.attach(model)
            _sync(device)
            spent += time.perf_counter() - t0
            kept = handle if kept is None else kept.merge(handle)
            done += len(chunk)
            if done in checkpoints or done >= checkpoints[-1]:
                n = done - last_t
                rows.append({"T": done, "seconds": spent, "seconds_per_edit": (spent - last_spent) / n})
                last_t, last_spent = done, spent
                print(f"    T={done}: {rows[-1]['seconds_per_edit']:.3f} s/edit", flush=True)
    finally:
        if kept is not None:
            kept.restore()
        editor.reset()
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from editors.base import Resources
    from runner.datasets import load_from_config
    from runner.models import load_model
    from runner.pipeline import build_editor, build_stats, prepare_requirements

    need = args.checkpoints[-1]
    common = [
        "logger=none",
        "progress=false",
        f"paths.cache_dir={_cache_dir()}",
        "paths.output_dir=/tmp/bench-stream",
        f"dataset={args.dataset}",
        f"dataset.size={need}",
        f"dataset.download={str(args.download).lower()}",
        "edit_mode=sequential",
        f"batch_size={args.batch}",
        "cache_targets=false",
    ]
    common += (
        [f"model={ARCHS[args.arch]}", "model.dtype=bfloat16"]
        if args.arch
        else [
            "model=toy",
            f"model.train.cases={args.toy_cases}",
        ]
    )
    names = [e.strip() for e in args.editors.split(",") if e.strip()]
    cfg = _compose([*common, f"editor={names[0]}"])
    dataset = load_from_config(cfg.dataset, cache_dir=_cache_dir() / "datasets")
    if len(dataset.cases) < need:
        raise SystemExit(f"the dataset has {len(dataset.cases)} cases; T = {need} needs more (--download)")
    requests = [c.request for c in dataset.cases[:need]]
    if args.arch:
        loaded = _real_size(cfg, args.arch)
    else:
        cases = load_from_config({**cfg.dataset, "size": args.toy_cases}, cache_dir=_cache_dir() / "datasets")
        loaded = load_model(cfg.model, cases=cases.cases, cache_dir=_cache_dir(), seed=cfg.seed)
    stats = build_stats(cfg, loaded)
    results = []
    for name in names:
        try:
            editor_cfg = _compose([*common, f"editor={name}"]).editor
        except Exception as exc:  # noqa: BLE001 - an editor this checkout does not have
            print(f"  {name}: skipped ({str(exc).splitlines()[0]})", flush=True)
            results.append({"editor": name, "skipped": str(exc).splitlines()[0]})
            continue
        editor = build_editor(editor_cfg, loaded)
        prepare_requirements(editor, stats)
        editor.prepare(loaded.model, loaded.tokenizer, Resources(stats=stats))
        print(f"  {name}: stream of {need} edits, {args.batch} per apply", flush=True)
        rows = stream(
            editor, loaded.model, loaded.tokenizer, requests, args.checkpoints, args.batch, loaded.device
        )
        growth = rows[-1]["seconds_per_edit"] / rows[0]["seconds_per_edit"]
        results.append({"editor": name, "batch": args.batch, "segments": rows, "growth": growth})
        del editor
        gc.collect()
    report = {
        "time": _dt.datetime.now().isoformat(timespec="seconds"),
        "model": loaded.model_id,
        "checkpoints": args.checkpoints,
        "threads": args.threads,
        "results": results,
    }
    report["table"] = format_stream(report)
    out = args.out or RESULTS / f"stream-{_dt.datetime.now().strftime('%Y-%m-%d_%H-%M-%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(report["table"])
    print(f"\nwritten: {out}")
    return 0


def format_stream(report: dict) -> str:
    """Markdown: seconds per edit in each segment of the stream, and the growth ratio."""
    ts = report["checkpoints"]
    head = ["editor", *(f"s/edit at T={t}" for t in ts), "growth (last/first)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---", *(["---:"] * (len(ts) + 1))]) + "|"]
    for row in report["results"]:
        if "skipped" in row:
            lines.append("| " + " | ".join([row["editor"], *(["–"] * len(ts)), "skipped"]) + " |")
            continue
        per = {seg["T"]: seg["seconds_per_edit"] for seg in row["segments"]}
        cells = [f"{per[t]:.3f}" if t in per else "–" for t in ts]
        lines.append("| " + " | ".join([row["editor"], *cells, f"{row['growth']:.2f}"]) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
