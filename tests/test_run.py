"""The runner end to end, in process and through run.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from runner import run
from tests.conftest import compose_config

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "tests" / "assets"
SMALL_STATS = ["stats.n_samples=150", "threads=1", "progress=false", "logger=none"]


def _cfg(tmp_path: Path, *overrides: str):
    return compose_config(
        *SMALL_STATS,
        f"paths.cache_dir={tmp_path.parent / 'shared-cache'}",
        f"paths.output_dir={tmp_path / 'out'}",
        *overrides,
    )


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


TOY = [
    "model=toy",
    "model.train.steps=120",
    "model.train.eval_every=1000",
    "model.train.cases=null",  # a toy of the run's 6 cases only (the default shares a larger one)
    "dataset.size=6",
    "batch_size=3",
]


def test_toy_run_writes_results_summary_and_resumes(tmp_path):
    cfg = _cfg(tmp_path, *TOY)
    summary = run(cfg)
    out = tmp_path / "out"
    records = _lines(out / "results.jsonl")
    assert len(records) == 6 and len({r["case_id"] for r in records}) == 6
    assert {
        "pre_efficacy",
        "post_efficacy",
        "post_locality",
        "diag_target_nll",
        "diag_edit_seconds",
    } <= records[0].keys()
    on_disk = json.loads((out / "summary.json").read_text())
    for key in ("efficacy", "generality", "locality", "score"):
        assert 0 <= on_disk[key] <= 100
    assert on_disk["protocol"]["edit_mode"] == "batch" and on_disk["protocol"]["batch_size"] == 3
    assert len(on_disk["protocol"]["dataset"]["sha256"]) == 64
    assert on_disk["protocol"]["model"]["id"] == "toy"
    env = on_disk["protocol"]["environment"]
    assert env["packages"]["torch"] and env["packages"]["transformers"] and env["python"]
    assert env["torch_threads"] >= 1 and env["cpu_capability"]
    assert summary["score"] == on_disk["score"]
    # A rerun in the same folder finds every case done and writes nothing new.
    again = run(_cfg(tmp_path, *TOY))
    assert len(_lines(out / "results.jsonl")) == 6
    assert again["score"] == summary["score"]


def test_interrupted_run_resumes_the_missing_cases(tmp_path):
    overrides = ("model=tiny-gpt2", "dataset.size=4", "batch_size=2")
    run(_cfg(tmp_path, *overrides))
    path = tmp_path / "out" / "results.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:2]) + "\n" + lines[2][:25])  # two cases lost, the last line torn
    run(_cfg(tmp_path, *overrides))
    after = path.read_text().splitlines()
    assert after[:2] == lines[:2]  # finished cases are kept, not recomputed
    assert sorted(json.loads(x)["case_id"] for x in after) == sorted(json.loads(x)["case_id"] for x in lines)


def test_sequential_mode_keeps_earlier_edits_and_evaluates_at_the_end(tmp_path, monkeypatch):
    """Batch 1 is edited on the model that holds batch 0's edit, and the end-of-run evaluation sees
    both: the model's weights are recorded at each edit and each scoring call."""
    import torch

    from editors.memit import Memit
    from runner import pipeline

    edits, scored = [], []
    memit_apply, score = Memit.apply, pipeline.score_cases

    def weights(model):
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    def recording_apply(self, model, tokenizer, requests):
        before = weights(model)
        delta = memit_apply(self, model, tokenizer, requests)
        edits.append((before, delta))
        return delta

    def recording_score(model, tokenizer, cases, **kwargs):
        scored.append((len(cases), weights(model)))
        return score(model, tokenizer, cases, **kwargs)

    monkeypatch.setattr(Memit, "apply", recording_apply)
    monkeypatch.setattr(pipeline, "score_cases", recording_score)
    summary = run(
        _cfg(
            tmp_path,
            "model=tiny-llama",
            "dataset.size=4",
            "batch_size=2",
            "edit_mode=sequential",
            "eval.timing=at_end",
        )
    )
    assert summary["n_cases"] == 4
    assert summary["protocol"]["edit_mode"] == "sequential" and summary["protocol"]["eval_timing"] == "at_end"

    def plus(state, delta):  # state with delta added as WeightDelta.apply adds it
        out = {n: t.clone() for n, t in state.items()}
        for name, d in delta.deltas.items():
            out[name].add_(d.to(dtype=out[name].dtype))
        return out

    def same(a, b):
        return all(torch.equal(a[n], b[n]) for n in a)

    (original, first), (at_second, second) = edits
    assert first.deltas and any(d.abs().sum() > 0 for d in first.deltas.values())
    assert not same(at_second, original) and same(at_second, plus(original, first))
    [(n_pre, pre_weights), (n_post, post_weights)] = scored
    assert (n_pre, n_post) == (4, 4) and same(pre_weights, original)
    assert same(post_weights, plus(plus(original, first), second))


def test_zsre_and_rome_schema_files(tmp_path):
    zsre = run(_cfg(tmp_path / "z", "model=tiny-gptj", "dataset=zsre", "dataset.size=3", "batch_size=3"))
    assert zsre["n_cases"] == 3 and "efficacy" in zsre
    rome = run(
        _cfg(
            tmp_path / "r",
            "model=tiny-gpt2",
            f"dataset.path={ASSETS / 'counterfact_rome_3.json'}",
            "editor=rome",
        )
    )
    assert rome["protocol"]["dataset"]["schema"] == "rome" and rome["n_cases"] == 3
    assert "attribute" in rome["metrics"]["post"]


def test_wandb_offline_run_is_written_and_finished(tmp_path):
    run(
        _cfg(
            tmp_path,
            "model=tiny-gpt2",
            "dataset.size=2",
            "batch_size=2",
            "logger=wandb",
            "logger.mode=offline",
        )
    )
    runs = list((tmp_path / "out" / "wandb").glob("offline-run-*"))
    assert runs and any(p.suffix == ".wandb" for p in runs[0].iterdir())


def _cli(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "run.py",
            *args,
            *SMALL_STATS,
            f"paths.cache_dir={tmp_path / 'cache'}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )


def test_cli_bad_record_is_one_line_naming_it(tmp_path):
    bad = _cli(
        "model=tiny-gpt2", f"dataset.path={ASSETS / 'counterfact_easyedit_malformed.json'}", tmp_path=tmp_path
    )
    assert bad.returncode == 2
    message = bad.stderr.strip().splitlines()[-1]
    assert message.startswith("error: ") and "record 1" in message and "not found" in message
    assert "Traceback" not in bad.stderr


def test_cli_skips_bad_records_when_asked(tmp_path):
    ok = _cli(
        "model=tiny-gpt2",
        f"dataset.path={ASSETS / 'counterfact_easyedit_malformed.json'}",
        "dataset.on_invalid=skip",
        tmp_path=tmp_path,
    )
    assert ok.returncode == 0, ok.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["n_cases"] == 2 and summary["protocol"]["dataset"]["n_skipped"] == 4
    assert "post-edit" in ok.stdout


@pytest.mark.slow
def test_default_run_prints_the_readme_table(tmp_path):
    """`python run.py` as a user runs it (minutes on a fresh cache): the table it prints is the
    README's, to the last digit (README block `default`, written by `make readme-numbers`)."""
    done = subprocess.run(
        [sys.executable, "run.py", "logger=none", "progress=false", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    printed = [line for line in done.stdout.splitlines() if line.startswith("|")]
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = readme.split("<!-- numbers:default -->")[1].split("<!-- /numbers:default -->")[0]
    assert printed == [line for line in block.splitlines() if line.startswith("|")]


def test_missing_statistics_fail_clearly_and_task_stats_computes_them(tmp_path):
    no_compute = ("model=tiny-gpt2", "dataset.size=2", "batch_size=2", "stats.allow_compute=false")
    bad = _cli(*no_compute, tmp_path=tmp_path)
    assert bad.returncode == 2 and "task=stats" in bad.stderr.strip().splitlines()[-1]
    done = run(_cfg(tmp_path, *no_compute, "task=stats", f"paths.cache_dir={tmp_path / 'cache'}"))
    assert all(Path(p).exists() for p in done["statistics"].values())
    ok = _cli(*no_compute, tmp_path=tmp_path)  # the edit run now finds them
    assert ok.returncode == 0, ok.stderr[-1000:]
    assert "loaded from cache" in ok.stderr + ok.stdout


def test_generation_metrics_land_in_results_and_summary(tmp_path):
    # the EasyEdit-schema sample has no generation prompts: its rewrite + paraphrase prompts stand in
    summary = run(_cfg(tmp_path, *TOY, "dataset=counterfact_easyedit", "eval.generation.max_length=40"))
    records = _lines(tmp_path / "out" / "results.jsonl")
    assert all(len(r["post_generations"]) == 2 for r in records)  # rewrite + paraphrase prompt
    assert all(r["post_fluency"] > 0 for r in records) and "pre_fluency" not in records[0]
    assert summary["fluency"] == pytest.approx(100 * sum(r["post_fluency"] for r in records) / len(records))
    gen = summary["protocol"]["generation"]
    assert gen["enabled"] and gen["consistency_source"] == "dataset" and not gen["comparable_with_papers"]
    assert gen["prompt_sources"] == {"rewrite+paraphrase prompts": 6}
    assert summary["protocol"]["method"]
    fast = run(_cfg(tmp_path / "fast", *TOY, "dataset=counterfact_easyedit", "eval=fast"))
    assert "fluency" not in fast and fast["protocol"]["generation"] == {"enabled": False}


def test_toy_can_train_on_more_cases_than_a_run_edits(tmp_path):
    """model.train.cases: runs of different dataset.size share one toy (a scaling curve)."""
    from runner.datasets import load_from_config
    from runner.pipeline import _training_cases

    cfg = _cfg(tmp_path, *TOY, "model.train.cases=9")
    dataset = load_from_config(cfg.dataset, cache_dir=tmp_path)
    cases = _training_cases(cfg, dataset, tmp_path)
    assert len(dataset.cases) == 6 and [c.case_id for c in cases[:6]] == [c.case_id for c in dataset.cases]
    assert len(cases) == 9
    assert _training_cases(_cfg(tmp_path, *TOY), dataset, tmp_path) is dataset.cases
    assert len(_training_cases(_cfg(tmp_path, *TOY, "model.train.cases=2"), dataset, tmp_path)) == 6


def test_out_of_memory_during_an_edit_names_the_knobs(tmp_path, monkeypatch):
    import torch

    from runner.oom import OutOfMemory

    def boom(self, model, tokenizer, requests):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr("editors.memit.Memit.apply", boom)
    with pytest.raises(OutOfMemory) as info:
        run(_cfg(tmp_path, "model=tiny-gpt2", "dataset.size=2", "batch_size=2", "eval=fast"))
    message = str(info.value)
    assert "batch_size" in message and "model.dtype" in message
