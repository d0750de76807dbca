"""Resuming a run folder: only the same run (the stored run_config.json, compared on every key that
shapes results) may add to its results."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from runner import USER_ERRORS, ResumeMismatch, run
from runner.results import NOT_SHAPING, RUN_CONFIG, config_differences
from tests.conftest import compose_config

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["stats.n_samples=150", "threads=1", "progress=false", "logger=none", "eval=fast"]
RUN = ["model=tiny-gpt2", "dataset.size=4", "batch_size=2"]


def _cfg(tmp_path: Path, *overrides: str):
    return compose_config(
        *QUICK,
        f"paths.cache_dir={tmp_path.parent / 'shared-cache'}",
        f"paths.output_dir={tmp_path / 'run'}",
        *overrides,
    )


def _ids(path: Path) -> list[str]:
    return [json.loads(line)["case_id"] for line in path.read_text().splitlines()]


@pytest.fixture
def first_run(tmp_path):
    """A finished 4-case MEMIT run in tmp_path/run: (folder, results bytes, run_config.json bytes)."""
    run(_cfg(tmp_path, *RUN))
    out = tmp_path / "run"
    return out, (out / "results.jsonl").read_bytes(), (out / RUN_CONFIG).read_bytes()


def _no_loading(monkeypatch):
    """A refusal must come before the dataset and the model are loaded."""

    def fail(*args, **kwargs):
        raise AssertionError("loaded before the resume check")

    monkeypatch.setattr("runner.pipeline.load_from_config", fail)
    monkeypatch.setattr("runner.pipeline.load_model", fail)


def test_the_first_results_store_the_resolved_config(first_run):
    out, _, stored = first_run
    config = json.loads(stored)
    assert config["editor"]["_target_"] == "editors.memit.Memit"
    assert config["dataset"]["size"] == 4 and config["batch_size"] == 2
    assert config["editor"]["layers"] == config["model"]["edit_layers"]  # resolved, not ${...}


def test_same_run_with_other_ignored_keys_resumes_the_missing_cases(first_run, tmp_path):
    out, results, stored = first_run
    lines = results.decode().splitlines()
    (out / "results.jsonl").write_text("\n".join(lines[:2]) + "\n")  # two cases lost
    summary = run(
        _cfg(tmp_path, *RUN, "threads=2", "progress=true", "eval.batch_size=7", "stats.batch_tokens=1024")
    )
    after = (out / "results.jsonl").read_text().splitlines()
    assert after[:2] == lines[:2]  # the done cases are kept, not recomputed
    assert sorted(_ids(out / "results.jsonl")) == sorted(json.loads(x)["case_id"] for x in lines)
    assert summary["n_cases"] == 4
    assert (out / RUN_CONFIG).read_bytes() == stored  # the first run's config is kept


def test_another_editor_is_refused_in_one_line_naming_the_key(first_run, tmp_path, monkeypatch):
    out, results, stored = first_run
    _no_loading(monkeypatch)
    with pytest.raises(ResumeMismatch) as info:
        run(_cfg(tmp_path, "model=tiny-gpt2", "dataset.size=10", "batch_size=2", "editor=unedited"))
    message = str(info.value)
    assert "\n" not in message
    assert 'editor._target_: "editors.memit.Memit" → "editors.unedited.Unedited"' in message
    assert message.index("editor._target_") < message.index("editor.layers")  # the cause first
    assert "dataset.size" not in message  # a larger dataset alone would resume
    assert isinstance(info.value, USER_ERRORS)
    assert (out / RUN_CONFIG).read_bytes() == stored
    assert (out / "results.jsonl").read_bytes() == results


def test_any_shaping_key_is_refused_and_named(first_run, tmp_path, monkeypatch):
    _no_loading(monkeypatch)
    with pytest.raises(ResumeMismatch, match=r"editor\.update_weight: .* → 7\.0") as info:
        run(_cfg(tmp_path, *RUN, "editor.update_weight=7.0"))
    assert "1 setting(s) differ" in str(info.value)
    with pytest.raises(ResumeMismatch, match=r"batch_size: 2 → 1.*seed: 0 → 3"):
        run(_cfg(tmp_path, "model=tiny-gpt2", "dataset.size=4", "batch_size=1", "seed=3"))


def test_a_larger_then_smaller_dataset_resumes(first_run, tmp_path):
    out, _, stored = first_run
    bigger = run(_cfg(tmp_path, "model=tiny-gpt2", "dataset.size=6", "batch_size=2"))
    assert bigger["n_cases"] == 6 and len(_ids(out / "results.jsonl")) == 6
    smaller = run(_cfg(tmp_path, "model=tiny-gpt2", "dataset.size=2", "batch_size=2"))
    assert smaller["n_cases"] == 2  # the summary covers the current size's cases
    assert len(_ids(out / "results.jsonl")) == 6 and (out / RUN_CONFIG).read_bytes() == stored


def test_a_folder_from_before_the_check_resumes_with_a_warning(first_run, tmp_path, caplog):
    out, results, _ = first_run
    (out / RUN_CONFIG).unlink()
    with caplog.at_level(logging.WARNING, logger="runner.results"):
        summary = run(_cfg(tmp_path, *RUN))
    assert "no run_config.json" in caplog.text and summary["n_cases"] == 4
    assert (out / "results.jsonl").read_bytes() == results
    assert not (out / RUN_CONFIG).exists()  # the first run's config is unknown: none is made up


def test_a_folder_without_records_is_a_fresh_run(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "results.jsonl").write_text('{"case_id": "0", "po')  # one torn line: no records
    (out / RUN_CONFIG).write_text(json.dumps({"editor": {"_target_": "editors.rome.Rome"}}))
    run(_cfg(tmp_path, "model=tiny-gpt2", "dataset.size=2", "batch_size=2"))
    assert json.loads((out / RUN_CONFIG).read_text())["editor"]["_target_"] == "editors.memit.Memit"


def test_cli_refusal_exits_2_with_one_line(first_run, tmp_path):
    out, results, stored = first_run
    done = subprocess.run(
        [
            sys.executable,
            "run.py",
            "model=tiny-gpt2",
            "dataset.size=4",
            "batch_size=2",
            "editor=unedited",
            *QUICK,
            f"paths.cache_dir={tmp_path / 'cache'}",
            f"hydra.run.dir={out}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "editor._target_" in last and "Traceback" not in done.stderr
    assert (out / RUN_CONFIG).read_bytes() == stored and (out / "results.jsonl").read_bytes() == results


def test_size_changes_that_change_the_done_results_are_refused():
    base = {"dataset": {"size": 4}, "eval": {"timing": "after_batch"}, "model": {"source": "tiny"}}
    assert config_differences(base, base | {"dataset": {"size": 8}}) == []
    at_end = base | {"eval": {"timing": "at_end"}}
    assert config_differences(at_end, at_end | {"dataset": {"size": 8}}) == [
        "dataset.size: 4 → 8 (with eval.timing=at_end every case is scored after all edits)"
    ]
    toy = base | {"model": {"source": "toy", "train": {"cases": None}}}
    assert config_differences(toy, toy | {"dataset": {"size": 8}})[0].startswith(
        "dataset.size: 4 → 8 (the toy"
    )
    shared = base | {"model": {"source": "toy", "train": {"cases": 16}}}
    assert config_differences(shared, shared | {"dataset": {"size": 8}}) == []


def test_ignored_keys_are_real_config_keys():
    """Every NOT_SHAPING entry names a key of the composed config (a typo would compare it)."""
    from omegaconf import OmegaConf

    memit = compose_config("logger=none", "paths.cache_dir=/tmp/unused", "paths.output_dir=/tmp/unused")
    for key in NOT_SHAPING:
        if key == "hydra":
            continue  # not part of the job's config
        assert OmegaConf.select(memit, key, default="<missing>") != "<missing>", key
