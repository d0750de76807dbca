"""``make readme-numbers``: rerun every command whose numbers the README shows and rewrite its tables.

Each table of numbers in README.md sits between ``<!-- numbers:NAME -->`` and
``<!-- /numbers:NAME -->``; :data:`BLOCKS` says which commands produce block NAME and how its table
is drawn from their ``summary.json`` files (or, for the benchmark, from ``bench``'s JSON). Every
block ends with a line naming the command, the machine and the library versions it ran on, so no
number in those tables is typed by hand.

    python -m tools.readme_numbers                  # every block (about an hour on 2 CPU cores)
    python -m tools.readme_numbers --only default   # some blocks
    python -m tools.readme_numbers --list           # block names and their commands

Runs land in ``outputs/readme-numbers/<time>/<block>/`` (the toy and the statistics are cached in
``paths.cache_dir`` as usual, so a second call only re-edits and re-evaluates).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import evaluation.unlearning  # noqa: F401 (registers the unlearning metrics: their arrows)
from evaluation.tables import format_table
from runner.environment import run_environment

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
#: overrides every run gets: no tracking, no progress bars, quiet toy training
QUIET = ["logger=none", "progress=false", "model.train.progress=false"]


@dataclass
class Job:
    label: str
    args: list[str]
    multirun: bool = False


@dataclass
class Block:
    """A README table: the jobs that produce it and how to draw it from their outputs."""

    name: str
    jobs: list[Job]
    render: Callable[[list[tuple[Job, Path]]], str]
    tool: list[str] = field(default_factory=lambda: ["run.py"])


# ------------------------------------------------------------------------------------- rendering


def _summary(folder: Path) -> dict:
    return json.loads((folder / "summary.json").read_text(encoding="utf-8"))


def render_printed_table(runs: list[tuple[Job, Path]]) -> str:
    """The pre-/post-edit table exactly as ``python run.py`` printed it."""
    (_, folder), *_ = runs
    printed = (folder / "stdout.txt").read_text(encoding="utf-8").splitlines()
    rows = [line for line in printed if line.startswith("|")]
    return "```\n" + "\n".join(rows) + "\n```"


def render_headline(
    columns: Sequence[str] = ("efficacy", "generality", "locality", "score"), digits: int = 1
):
    """A row per job: the post-edit means of ``columns`` (the runner's table formatter)."""

    def render(runs: list[tuple[Job, Path]]) -> str:
        rows = []
        for job, folder in runs:
            post = _summary(folder)["metrics"]["post"]
            rows.append((job.label, {c: post[c]["mean"] for c in columns if c in post}))
        return format_table(rows, columns, digits=digits)

    return render


def render_unlearning(columns: Sequence[str]):
    """The model before unlearning (the first job's ``pre`` values), then a row per job."""

    def render(runs: list[tuple[Job, Path]]) -> str:
        first = _summary(runs[0][1])["metrics"]["pre"]
        rows = [("before unlearning", {c: first[c]["mean"] for c in columns if c in first})]
        for job, folder in runs:
            post = _summary(folder)["metrics"]["post"]
            rows.append((job.label, {c: post[c]["mean"] for c in columns if c in post}))
        return format_table(rows, columns, digits=3)

    return render


def render_paper_table(runs: list[tuple[Job, Path]]) -> str:
    (_, folder), *_ = runs
    tables = sorted(folder.glob("paper_table*.md"))
    if not tables:
        raise SystemExit(f"no paper_table*.md in {folder}")
    text = tables[0].read_text(encoding="utf-8").strip()
    return "\n".join(line for line in text.splitlines() if line.startswith("|"))


def render_paper_table_and_curve(curve: str, figure: str):
    """The sweep's paper-format rows, then its curve PNG, copied to ``figure`` (a path in the repo,
    so the README can show it) and linked below the table."""

    def render(runs: list[tuple[Job, Path]]) -> str:
        (_, folder), *_ = runs
        found = sorted(folder.glob(curve))
        if not found:
            raise SystemExit(f"no {curve} in {folder}")
        target = ROOT / figure
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(found[0].read_bytes())
        return f"{render_paper_table(runs)}\n\n![{found[0].name}]({figure})"

    return render


def render_bench(runs: list[tuple[Job, Path]]) -> str:
    (_, folder), *_ = runs
    result = json.loads((folder / "bench.json").read_text(encoding="utf-8"))
    return result["table"]


# ---------------------------------------------------------------------------------------- blocks

EDITORS = [
    ("unedited", "unedited"),
    ("ROME (layer 2)", "rome"),
    ("MEMIT (layers 1-2, λ = 30)", "memit"),
    ("CoME-MEMIT (α = 0.1, p = 0.2)", "come_memit"),
    ("PMET (λ = 100)", "pmet"),
    ("CoME-PMET (λ = 100)", "come_pmet"),
    ("FT (layer 2)", "ft"),
    ("FT-L (layer 2)", "ft_l"),
    ("FT-L w/ SSS (C = 0.9)", "ft_l_sss"),
    ("MEND (layers 4-5)", "mend"),
    ("MEND w/ SSS (C = 0.9)", "mend_sss"),
    ("SERAC", "serac"),
    ("SERAC w/ SSS (C = 0.9)", "serac_sss"),
]
SIZES = (20, 60, 200, 500)
SEQUENTIAL = ["edit_mode=sequential", "eval.timing=at_end", "eval=fast"]
LIFELONG = [
    ("MEMIT (batches of 10)", ["editor=memit"]),
    ("CoME-MEMIT (batches of 10)", ["editor=come_memit"]),
    ("AlphaEdit (batches of 10)", ["editor=alphaedit"]),
    ("CoME-AlphaEdit (batches of 10)", ["editor=come_alphaedit"]),
    ("GRACE (one at a time)", ["editor=grace", "batch_size=1"]),
    ("WISE (one at a time)", ["editor=wise", "batch_size=1"]),
]

#: task=unlearn on the TOFU toy (forget05, 10 retain authors' worth of facts): every method's row
NO_PRE = "eval.pre_edit=false"  # a row after the first needs no before-unlearning scores
UNLEARN = [  # the first row also scores the model before unlearning (the table's first row)
    ("MEMIT, idk refusal", ["editor=memit"]),
    ("AlphaEdit, self-improved refusal", ["editor=alphaedit", "unlearn.target=self_improve", NO_PRE]),
    ("WISE, idk refusal", ["editor=wise", NO_PRE]),
    ("NPO", ["editor=npo", NO_PRE]),
    (
        "MEMIT, query merging (K=4), fixed refusal",
        ["editor=memit", "unlearn.target=fixed", "unlearn.merge_queries=4", NO_PRE],
    ),
    ("GA", ["editor=ga", NO_PRE]),
    ("GradDiff", ["editor=grad_diff", NO_PRE]),
    ("ROME, idk refusal", ["editor=rome", NO_PRE]),
    ("CoME-MEMIT, idk refusal", ["editor=come_memit", NO_PRE]),
    ("GRACE, idk refusal", ["editor=grace", NO_PRE]),
]
TIES = [
    ("over-forgetting member (0.4/0.4/0.2)", ["editor=ties_npo", "editor.member=over"]),
    ("under-forgetting member (0.3/0.3/0.4)", ["editor=ties_npo", "editor.member=under", NO_PRE]),
    ("TIES on the LoRA factors (as released)", ["editor=ties_npo", NO_PRE]),
    ("TIES on the task vectors", ["editor=ties_npo", "editor.merge.space=delta_weights", NO_PRE]),
    (
        "task arithmetic",
        [
            "editor=ties_npo",
            "editor.merge.space=delta_weights",
            "editor.merge.method=task_arithmetic",
            NO_PRE,
        ],
    ),
    (
        "DARE-TIES",
        ["editor=ties_npo", "editor.merge.space=delta_weights", "editor.merge.method=dare_ties", NO_PRE],
    ),
]
TIES_COLUMNS = (
    "forget_quality",
    "model_utility",
    "forget_rouge_l",
    "retain_rouge_l",
    "mia_loss_auc",
    "mia_score",
)
UNLEARN_COLUMNS = (
    "forget_quality",
    "model_utility",
    "forget_rouge_l",
    "retain_rouge_l",
    "refusal_rate",
    "mia_loss_auc",
)

BLOCKS: dict[str, Block] = {
    b.name: b
    for b in [
        Block("default", [Job("python run.py", [])], render_printed_table),
        Block(
            "editors",
            [Job(label, [f"editor={name}", "eval=fast"]) for label, name in EDITORS],
            render_headline(),
        ),
        Block(
            "sizes",
            [Job(f"dataset.size={n}", [f"dataset.size={n}", "eval=fast"]) for n in SIZES],
            render_headline(),
        ),
        Block(
            "table1_toy",
            [
                Job(
                    "table1 on the toy",
                    [
                        "+experiment=table1",
                        "model=toy",
                        "dataset.download=false",
                        "eval.generation.download=false",
                        "eval.generation.consistency=auto",
                        "dataset.size=200",
                        "batch_size=200",
                    ],
                    multirun=True,
                )
            ],
            render_paper_table,
        ),
        Block(
            "sss_table3_toy",
            [
                Job(
                    "sss_table3 on the toy",
                    ["+experiment=sss_table3", "model=toy", "dataset.size=100", "eval=fast"],
                    multirun=True,
                )
            ],
            render_paper_table,
        ),
        Block(
            "sss_c_toy",
            [Job("the C sweep on the toy", ["sweep=sss_c", "dataset.size=100", "eval=fast"], multirun=True)],
            render_paper_table_and_curve("curve_editor.sss_coefficient.png", "docs/figures/sss_c_toy.png"),
        ),
        Block(
            "lifelong",
            [Job(label, [*args, *SEQUENTIAL]) for label, args in LIFELONG],
            render_headline(),
        ),
        Block(
            "unlearn_tofu",
            [Job(label, ["task=unlearn", "dataset=tofu", *args]) for label, args in UNLEARN],
            render_unlearning(UNLEARN_COLUMNS),
        ),
        Block(
            "ties_unlearn",
            [Job(label, ["task=unlearn", "dataset=tofu", *args]) for label, args in TIES],
            render_unlearning(TIES_COLUMNS),
        ),
        Block(
            "ties_density",
            [Job("the density sweep", ["sweep=ties_density", NO_PRE], multirun=True)],
            render_paper_table,
        ),
        Block(
            "stream",
            [Job("make bench (stream)", ["--checkpoints", "10,100"])],
            render_bench,
            tool=["-m", "bench.stream"],
        ),
        Block(
            "bench",
            [Job("make bench", ["--cases", "64", "--batch", "32", "--repeat", "3"])],
            render_bench,
            tool=["-m", "bench"],
        ),
    ]
}


# ----------------------------------------------------------------------------------------- running


def machine_line() -> str:
    env = run_environment()
    gpu = f", GPU {env['gpu']}" if env["gpu"] else ""
    return (
        f"{env['cpu']}, {os.cpu_count()} cores ({env['torch_threads']} torch threads){gpu}; Python {env['python']}, "
        f"torch {env['packages']['torch']}, transformers {env['packages']['transformers']}"
    )


def git_sha() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def command_text(block: Block, job: Job) -> str:
    if block.tool[0] == "run.py":
        return shlex.join(["python", "run.py", *job.args])
    return shlex.join(["python", *block.tool, *job.args])


def run_job(block: Block, job: Job, folder: Path, python: str, threads: int | None = None) -> Path:
    """Run ``job`` into ``folder``, or reuse the folder when an earlier call finished the same
    command there (``command.txt`` equal, ``wall_seconds.txt`` written): an interrupted
    ``--out`` run resumes."""
    done = folder / "wall_seconds.txt"
    if done.exists() and (folder / "command.txt").exists():
        if (folder / "command.txt").read_text(encoding="utf-8").strip() == command_text(block, job):
            print(f"[{block.name}] {command_text(block, job)}: done in {folder}, reused", flush=True)
            return folder
    folder.mkdir(parents=True, exist_ok=True)
    done.unlink(missing_ok=True)
    if block.tool[0] == "run.py":
        where = f"hydra.sweep.dir={folder}" if job.multirun else f"hydra.run.dir={folder}"
        argv = [python, "run.py", *job.args, *QUIET, where]
        if threads is not None:
            argv.append(f"threads={threads}")
    else:
        argv = [python, *block.tool, *job.args, "--out", str(folder / "bench.json")]
    print(f"[{block.name}] {shlex.join(argv)}", flush=True)
    started = time.perf_counter()
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    (folder / "stdout.txt").write_text(proc.stdout, encoding="utf-8")
    (folder / "stderr.txt").write_text(proc.stderr, encoding="utf-8")
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise SystemExit(f"[{block.name}] {command_text(block, job)} failed ({proc.returncode}):\n{tail}")
    (folder / "command.txt").write_text(command_text(block, job) + "\n", encoding="utf-8")
    done.write_text(f"{time.perf_counter() - started:.1f}\n")
    return folder


def render_block(
    block: Block,
    runs: list[tuple[Job, Path]],
    machine: str,
    sha: str,
    jobs: int = 1,
    threads: int | None = None,
) -> str:
    commands = "; ".join(f"`{command_text(block, job)}`" for job, _ in runs)
    seconds = sum(float((folder / "wall_seconds.txt").read_text()) for _, folder in runs)
    footer = (
        f"<sub>Written by `make readme-numbers` ({_dt.date.today().isoformat()}, commit {sha}) from "
        f"{commands}; {seconds / 60:.1f} min wall in all"
        f"{f', {jobs} side by side' if jobs > 1 else ''}{f', threads={threads} each' if threads else ''} "
        f"(including whatever was not yet cached: toys, statistics, target vectors); {machine}.</sub>"
    )
    return f"{block.render(runs).rstrip()}\n\n{footer}"


def replace_block(text: str, name: str, body: str) -> str:
    """``text`` with the content between block ``name``'s markers replaced by ``body``."""
    pattern = re.compile(
        rf"(<!-- numbers:{re.escape(name)} -->\n)(.*?)(<!-- /numbers:{re.escape(name)} -->)", re.S
    )
    if not pattern.search(text):
        raise SystemExit(f"README.md has no block <!-- numbers:{name} --> ... <!-- /numbers:{name} -->")
    return pattern.sub(lambda m: m.group(1) + body.rstrip("\n") + "\n" + m.group(3), text, count=1)


def blocks_in(text: str) -> list[str]:
    return re.findall(r"^<!-- numbers:([\w-]+) -->$", text, re.M)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tools.readme_numbers", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--only", default="", help="comma-separated block names (default: all)")
    parser.add_argument("--list", action="store_true", help="print the blocks and their commands")
    parser.add_argument("--out", type=Path, default=None, help="folder for the runs")
    parser.add_argument("--readme", type=Path, default=README)
    parser.add_argument(
        "--jobs", type=int, default=1, help="a block's runs side by side (each then gets threads=1)"
    )
    parser.add_argument("--threads", type=int, default=None, help="threads=N for every run.py job")
    args = parser.parse_args(argv)
    text = args.readme.read_text(encoding="utf-8")
    names = [n for n in args.only.split(",") if n] or blocks_in(text)
    unknown = [n for n in names if n not in BLOCKS]
    if unknown:
        raise SystemExit(f"unknown block(s) {unknown}; known: {sorted(BLOCKS)}")
    if args.list:
        for name in names:
            for job in BLOCKS[name].jobs:
                print(f"{name}: {command_text(BLOCKS[name], job)}")
        return
    out = args.out or ROOT / "outputs" / "readme-numbers" / _dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    machine, sha = machine_line(), git_sha()
    for name in names:
        block = BLOCKS[name]
        threads = args.threads or (1 if args.jobs > 1 else None)
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            futures = [
                pool.submit(run_job, block, job, out / name / str(i), sys.executable, threads)
                for i, job in enumerate(block.jobs)
            ]
            runs = [(job, future.result()) for job, future in zip(block.jobs, futures)]
        body = render_block(block, runs, machine, sha, args.jobs, threads)
        # re-read first: block by block (a failure keeps the others), and two calls with other
        # --only blocks may run side by side
        text = replace_block(args.readme.read_text(encoding="utf-8"), name, body)
        args.readme.write_text(text, encoding="utf-8")
        print(f"[{name}] README block rewritten", flush=True)


if __name__ == "__main__":
    main()
