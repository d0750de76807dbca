"""Sweep aggregation (table, Markdown, curves, wandb summary run), the SweepSummary callback, the
sweep presets, and (slow) a real 2-job multirun end to end."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from hydra import compose
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from runner.callbacks import SweepSummary
from runner.sweep import CSV_NAME, MD_NAME, SweepError, aggregate_sweep, main

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ROOT / "multirun_sweeps" / "sweep"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _logger(backend: str = "none", **extra) -> dict:
    return {
        "backend": backend,
        "project": "knowedit",
        "entity": None,
        "mode": "offline",
        "group": None,
        "tags": [],
        **extra,
    }


def make_job(
    root: Path, num: int, overrides: list[str], metrics: dict | None = None, logger: dict | None = None
) -> Path:
    """A fake Hydra job folder; ``metrics=None``: a failed job (no summary.json)."""
    job = root / f"{num}_{','.join(overrides)}"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (job / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"job": {"num": num}}}))
    config = {
        "logger": logger or _logger(),
        "editor": {"update_weight": 15000.0, "layers": [1, 2]},
        "seed": 0,
    }
    (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    if metrics is not None:
        post = {m: {"mean": v, "stderr": 2.0, "n": 10} for m, v in metrics.items()}
        post["efficacy_acc"] = {"mean": metrics["efficacy"] / 2, "stderr": 1.0, "n": 10}
        e, g, loc = (metrics[m] for m in ("efficacy", "generality", "locality"))
        post["score"] = {"mean": 3 / (1 / e + 1 / g + 1 / loc), "stderr": None, "n": 10}
        pre = {m: {"mean": 10.0, "stderr": 1.0, "n": 10} for m in ("efficacy", "generality", "locality")}
        summary = {m: post[m]["mean"] for m in ("efficacy", "generality", "locality", "score")}
        summary |= {
            "n_cases": 10,
            "metrics": {"post": post, "pre": pre},
            "timing": {"edit_seconds": 1.0 + num, "eval_seconds": 0.5},
            "protocol": {
                "editor": "editors.memit.Memit",
                "model": {"id": "tiny-gpt2"},
                "dataset": {"name": "counterfact"},
            },
        }
        (job / "summary.json").write_text(json.dumps(summary))
    return job


def _metrics(e: float, g: float = 50.0, loc: float = 80.0) -> dict:
    return {"efficacy": e, "generality": g, "locality": loc}


@pytest.fixture
def sweep(tmp_path) -> Path:
    """Three finished jobs over editor.update_weight (written out of order) and one failed job."""
    root = tmp_path / "2025-01-01_12-00-00"
    for num, weight, eff in [(2, 100, 90.0), (0, 1, 30.0), (1, 10, 60.0)]:
        make_job(
            root, num, ["model=tiny-gpt2", f"editor.update_weight={weight}", "logger=none"], _metrics(eff)
        )
    make_job(root, 3, ["model=tiny-gpt2", "editor.update_weight=1000", "logger=none"], None)
    (root / "multirun.yaml").write_text("hydra: {}\n")
    return root


def test_table_has_a_row_per_finished_job_with_the_swept_key_and_metrics(sweep):
    result = aggregate_sweep(sweep)
    table = result.table
    assert result.swept_keys == ["editor.update_weight"]  # model=, logger= are the same in every job
    assert result.numeric_keys == ["editor.update_weight"]
    assert len(table) == 3
    assert list(table["editor.update_weight"]) == [1, 10, 100]  # parsed to numbers, sorted
    assert list(table["efficacy"]) == [30.0, 60.0, 90.0]
    assert list(table.columns[:6]) == [
        "job",
        "editor.update_weight",
        "efficacy",
        "generality",
        "locality",
        "score",
    ]
    row = table.iloc[1]
    assert row["job"] == "1_model=tiny-gpt2,editor.update_weight=10,logger=none"
    assert row["score"] == pytest.approx(3 / (1 / 60 + 1 / 50 + 1 / 80))
    assert row["efficacy_acc"] == 30.0 and row["pre_efficacy"] == 10.0 and row["edit_seconds"] == 2.0
    assert row["efficacy_stderr"] == 2.0 and "score_stderr" not in table.columns  # score has no stderr
    assert result.missing == ["3_model=tiny-gpt2,editor.update_weight=1000,logger=none"]


def test_csv_markdown_and_curve_are_written(sweep):
    result = aggregate_sweep(sweep)
    assert result.csv_path == sweep / CSV_NAME and result.md_path == sweep / MD_NAME
    csv = pd.read_csv(result.csv_path)
    assert list(csv["editor.update_weight"]) == [1, 10, 100]
    assert list(csv["efficacy"]) == [30.0, 60.0, 90.0]
    md = result.md_path.read_text()
    assert "| job | editor.update_weight | efficacy ↑ | generality ↑ | locality ↑ | score ↑ |" in md
    assert "edit_seconds ↓" in md
    assert "| 1 | 10 | 60.00 ± 2.00 |" in md  # job number, the value as typed, mean ± stderr
    assert "Memit · tiny-gpt2 · counterfact (10 cases)" in md
    assert "3_model=tiny-gpt2,editor.update_weight=1000,logger=none" in md.split("Missing")[1]
    assert "Best score" in md and "editor.update_weight=100)" in md
    png = sweep / "curve_editor.update_weight.png"
    assert result.curves == {"editor.update_weight": png}
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert not list(sweep.glob(".*.tmp"))  # written atomically


def test_two_swept_keys_get_a_curve_each_and_list_values_none(tmp_path):
    root = tmp_path / "grid"
    num = 0
    for alpha in (0, 0.05, 0.5):
        for layers in ("[1,2]", "[0]"):
            make_job(
                root,
                num,
                [f"editor.unlearn_weight={alpha}", f"editor.layers={layers}"],
                _metrics(40.0 + 50 * alpha + num),
            )
            num += 1
    result = aggregate_sweep(root)
    assert result.swept_keys == ["editor.unlearn_weight", "editor.layers"]
    assert result.numeric_keys == ["editor.unlearn_weight"]  # lists: a column, no curve
    assert list(result.table["editor.unlearn_weight"]) == [0, 0, 0.05, 0.05, 0.5, 0.5]
    assert list(result.table["editor.layers"]) == ["[0]", "[1,2]"] * 3
    assert set(result.curves) == {"editor.unlearn_weight"}
    assert "| 0.05 | [0] |" in result.md_path.read_text()


def test_a_key_overridden_in_some_jobs_only_is_read_from_the_job_config(tmp_path):
    root = tmp_path / "optuna"
    make_job(root, 0, ["editor.update_weight=5"], _metrics(20.0))
    make_job(root, 1, [], _metrics(30.0))  # the default from its config.yaml: 15000.0
    result = aggregate_sweep(root)
    assert list(result.table["editor.update_weight"]) == [5, 15000.0]


def test_all_jobs_failed_writes_a_table_of_missing_jobs_and_no_curve(tmp_path):
    root = tmp_path / "failed"
    make_job(root, 0, ["editor.update_weight=1"], None)
    make_job(root, 1, ["editor.update_weight=2"], None)
    result = aggregate_sweep(root)
    assert result.table.empty and len(result.missing) == 2 and result.curves == {}
    assert "No job has finished" in result.md_path.read_text()


def test_a_folder_without_jobs_is_an_error(tmp_path):
    with pytest.raises(SweepError):
        aggregate_sweep(tmp_path)
    with pytest.raises(SweepError):
        aggregate_sweep(tmp_path / "nope")
    assert main([str(tmp_path), "--quiet"]) == 2


def test_cli_reaggregates_an_existing_sweep(sweep):
    out = subprocess.run(
        [sys.executable, "-m", "runner.sweep", str(sweep), "--no-wandb"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert "efficacy ↑" in out.stdout and str(sweep / MD_NAME) in out.stdout
    assert (sweep / CSV_NAME).is_file() and (sweep / "curve_editor.update_weight.png").is_file()


def test_wandb_summary_run_is_logged_offline_in_the_sweep_group(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    root = tmp_path / "sweep-w"
    for num, weight in enumerate((1, 10)):
        make_job(root, num, [f"editor.update_weight={weight}"], _metrics(50.0 + num), logger=_logger("wandb"))
    result = aggregate_sweep(root)
    assert result.wandb_dir is not None and result.wandb_dir.parent == root / "wandb"
    assert list(result.wandb_dir.glob("*.wandb"))  # the offline run's data file
    assert list((result.wandb_dir / "files" / "media" / "table").glob("sweep_table*.json"))
    import wandb

    assert wandb.run is None  # the run was finished

    none = aggregate_sweep(root, tracker_cfg=_logger("none"))  # tracker_cfg wins over the jobs' configs
    assert none.wandb_dir is None


def test_callback_aggregates_at_multirun_end_and_after_each_job(sweep, capsys):
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}, "mode": "MULTIRUN"}})
    callback = SweepSummary()
    callback.on_job_end(config, job_return=None)
    assert (sweep / MD_NAME).is_file()
    (sweep / MD_NAME).unlink()
    callback.on_multirun_end(config)
    assert (sweep / MD_NAME).is_file() and (sweep / CSV_NAME).is_file()
    out = capsys.readouterr().out
    assert str(sweep / MD_NAME) in out and "curve_editor.update_weight.png" in out
    # a single run (hydra.mode RUN) is left alone; a broken sweep folder never raises
    (sweep / MD_NAME).unlink()
    SweepSummary().on_job_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}, "mode": "RUN"}}))
    assert not (sweep / MD_NAME).exists()
    SweepSummary().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep / "none")}}}))
    assert "retry: python -m runner.sweep" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# presets


def _sweep_override(name: str) -> str:
    return f"sweep={name}"


EXPECTED = {
    "alpha": ("editor.unlearn_weight", [0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0]),
    "top_p": ("editor.top_p_fraction", [0.05, 0.1, 0.2, 0.3, 0.5, 1.0]),
    "layers": ("editor.layers", [[0], [1], [2], [3], [0, 1, 2], [1, 2, 3]]),
    "num_edits": ("batch_size", [1, 10, 100, 1000, 10000]),
    "editors": ("editor", ["rome", "memit"]),
    "ties_density": ("editor.merge.density", [0.2, 0.4, 0.6, 0.8, 1.0]),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_presets_compose_as_multiruns_with_the_documented_values(hydra_conf, name):
    text = (PRESETS / f"{name}.yaml").read_text()
    assert text.startswith("# @package _global_") and "python run.py sweep=" in text
    cfg = compose("config", overrides=[_sweep_override(name), "model=tiny-gpt2"], return_hydra_config=True)
    assert str(cfg.hydra.mode).endswith("MULTIRUN")
    key, values = EXPECTED[name]
    params = dict(cfg.hydra.sweeper.params)
    assert list(params) == [key]
    (override,) = OverridesParser.create().parse_overrides([f"{key}={params[key]}"])
    assert override.is_sweep_override() and list(override.sweep_iterator()) == values


def test_ties_density_preset_unlearns_tofu_with_the_merged_editor(hydra_conf):
    cfg = compose("config", overrides=[_sweep_override("ties_density"), "model=tiny-gpt2"])
    assert cfg.task == "unlearn" and cfg.dataset.name == "tofu"
    assert "density" in cfg.editor.merge  # the swept key exists in editor=ties_npo


def test_num_edits_preset_makes_the_dataset_size_follow_the_batch_size(hydra_conf):
    cfg = compose("config", overrides=[_sweep_override("num_edits"), "model=tiny-gpt2", "batch_size=100"])
    assert cfg.dataset.size == 100


def test_the_callback_is_registered():
    config = yaml.safe_load((ROOT / "conf" / "config.yaml").read_text())
    assert config["hydra"]["callbacks"]["sweep_summary"]["_target_"] == "runner.callbacks.SweepSummary"


# --------------------------------------------------------------------------------------------
# end to end


@pytest.mark.slow
def test_real_two_job_sweep_writes_table_and_curve(tmp_path):
    sweep_dir = tmp_path / "sweep"
    cmd = [
        sys.executable,
        "run.py",
        "-m",
        "model=tiny-gpt2",
        "dataset.size=4",
        "batch_size=2",
        "logger=none",
        "threads=1",
        "progress=false",
        "editor.update_weight=1,10",
        f"hydra.sweep.dir={sweep_dir}",
    ]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert str(sweep_dir / MD_NAME) in out.stdout  # the callback said where the table is
    table = pd.read_csv(sweep_dir / CSV_NAME)
    assert list(table["editor.update_weight"]) == [1, 10]
    assert table["efficacy"].notna().all() and not math.isnan(table["score"].iloc[0])
    assert (sweep_dir / "curve_editor.update_weight.png").read_bytes()[:8] == PNG_MAGIC
    assert "editor.update_weight" in (sweep_dir / MD_NAME).read_text()
