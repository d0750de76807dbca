"""Launcher presets (conf/hydra/launcher/) and the Optuna sweep preset: each composes when its
plugin is installed (presets of plugins that are not installed are skipped), and (slow) real
2-job sweeps through hydra-submitit-launcher, locally and on a fake Slurm, and a 2-trial Optuna
study."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from hydra import compose

from runner.sweep import CSV_NAME, MD_NAME

ROOT = Path(__file__).resolve().parents[1]
LAUNCHERS = ROOT / "conf" / "hydra" / "launcher"

# preset -> (plugin module, launcher class the preset instantiates)
PRESETS = {
    "slurm": ("hydra_plugins.hydra_submitit_launcher", "submitit_launcher.SlurmLauncher"),
    "submitit_local": ("hydra_plugins.hydra_submitit_launcher", "submitit_launcher.LocalLauncher"),
    "local_parallel": ("hydra_plugins.hydra_joblib_launcher", "joblib_launcher.JoblibLauncher"),
    "ray_gpu": ("hydra_plugins.hydra_ray_launcher", "ray_launcher.RayLauncher"),
}
OPTUNA = "hydra_plugins.hydra_optuna_sweeper"


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def _require(module: str) -> None:
    if not _installed(module):
        pytest.skip(f"{module} is not installed")


def _hydra(overrides: list[str]):
    return compose("config", overrides=["model=tiny-gpt2", *overrides], return_hydra_config=True).hydra


def test_every_preset_file_is_tested_and_documents_its_use():
    assert {p.stem for p in LAUNCHERS.glob("*.yaml")} == set(PRESETS) - {"submitit_local"}
    for path in LAUNCHERS.glob("*.yaml"):
        text = path.read_text()
        assert f"hydra/launcher={path.stem}" in text and "KNOWEDIT_CACHE_DIR" in text, path.name


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_launcher_preset_composes(hydra_conf, name):
    module, target = PRESETS[name]
    _require(module)
    launcher = _hydra([f"hydra/launcher={name}"]).launcher
    assert launcher._target_ == f"{module}.{target}"
    assert _hydra([f"hydra/launcher={name}"]).runtime.choices["hydra/launcher"] == name


def test_slurm_preset_asks_for_one_gpu_and_reads_the_partition_from_the_environment(hydra_conf, monkeypatch):
    _require(PRESETS["slurm"][0])
    monkeypatch.delenv("KNOWEDIT_SLURM_PARTITION", raising=False)
    monkeypatch.delenv("KNOWEDIT_SLURM_ACCOUNT", raising=False)
    launcher = _hydra(["hydra/launcher=slurm", "editor=come_memit"]).launcher
    assert (launcher.gpus_per_node, launcher.tasks_per_node, launcher.nodes) == (1, 1, 1)
    assert launcher.cpus_per_task == 8 and launcher.mem_gb == 64 and launcher.timeout_min == 240
    assert launcher.partition is None and launcher.account is None
    assert launcher.name == "knowedit-come_memit" and dict(launcher.additional_parameters) == {}
    monkeypatch.setenv("KNOWEDIT_SLURM_PARTITION", "gpu")
    launcher = _hydra(["hydra/launcher=slurm", "hydra.launcher.timeout_min=30"]).launcher
    assert launcher.partition == "gpu" and launcher.timeout_min == 30


def test_local_parallel_and_ray_presets(hydra_conf):
    if _installed(PRESETS["local_parallel"][0]):
        launcher = _hydra(["hydra/launcher=local_parallel", "hydra.launcher.n_jobs=3"]).launcher
        assert launcher.n_jobs == 3 and launcher.prefer == "processes"
    if _installed(PRESETS["ray_gpu"][0]):
        ray = _hydra(["hydra/launcher=ray_gpu"]).launcher.ray
        assert ray.init.address is None and ray.remote.num_gpus == 1 and ray.remote.max_calls == 1


def test_optuna_preset_maximises_the_optimized_metric_over_alpha_p_and_lambda(hydra_conf):
    _require(OPTUNA)
    hydra = _hydra(["sweep=optuna_come", "editor=come_memit"])
    assert str(hydra.mode).endswith("MULTIRUN")
    assert hydra.sweeper._target_ == f"{OPTUNA}.optuna_sweeper.OptunaSweeper"
    assert hydra.sweeper.direction == "maximize" and hydra.sweeper.sampler._target_.endswith("TPESampler")
    assert set(hydra.sweeper.params) == {
        "editor.unlearn_weight",
        "editor.top_p_fraction",
        "editor.update_weight",
    }
    assert hydra.sweeper.params["editor.update_weight"].startswith("tag(log")
    cfg = compose("config", overrides=["sweep=optuna_come", "editor=come_memit", "model=tiny-gpt2"])
    for key in hydra.sweeper.params:  # every tuned key exists in the editor's config
        assert key.split(".", 1)[1] in cfg.editor


# --------------------------------------------------------------------------------------------
# end to end

SMALL = [
    "model=tiny-gpt2",
    "dataset.size=4",
    "batch_size=2",
    "logger=none",
    "threads=1",
    "progress=false",
]


def _sweep(args: list[str], sweep_dir: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "run.py", *args, *SMALL, f"hydra.sweep.dir={sweep_dir}"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def _assert_two_jobs_finished(sweep_dir: Path, out: subprocess.CompletedProcess) -> None:
    summaries = sorted(sweep_dir.glob("*/summary.json"))
    assert len(summaries) == 2, sorted(p.name for p in sweep_dir.iterdir())
    assert str(sweep_dir / MD_NAME) in out.stdout  # the callback said where the table is
    table = pd.read_csv(sweep_dir / CSV_NAME)
    assert list(table["editor.update_weight"]) == [1, 10]
    assert table["efficacy"].notna().all() and not math.isnan(table["score"].iloc[0])


@pytest.mark.slow
def test_submitit_local_runs_a_two_job_sweep(tmp_path):
    _require(PRESETS["submitit_local"][0])
    sweep_dir = tmp_path / "sweep"
    out = _sweep(["-m", "hydra/launcher=submitit_local", "editor.update_weight=1,10"], sweep_dir)
    _assert_two_jobs_finished(sweep_dir, out)
    assert list((sweep_dir / ".submitit").iterdir())  # the jobs went through submitit


FAKE_SBATCH = """\
#!{python}
# A fake sbatch: runs every task of the job array in the background here, as Slurm would.
import os, re, subprocess, sys
script = open(sys.argv[1]).read()
open(os.path.join({log_dir!r}, "sbatch.sh"), "w").write(script)
first, last = map(int, re.search(r"^#SBATCH --array=(\\d+)-(\\d+)", script, re.M).groups())
job = 4242
for task in range(first, last + 1):
    env = dict(os.environ, SLURM_JOB_ID=str(job + 1 + task), SLURM_ARRAY_JOB_ID=str(job),
               SLURM_ARRAY_TASK_ID=str(task), SLURM_NTASKS="1", SLURM_JOB_NUM_NODES="1",
               SLURM_NODEID="0", SLURM_JOB_NODELIST="localhost", SLURM_PROCID="0", SLURM_LOCALID="0")
    log = open(os.path.join({log_dir!r}, f"{{job}}_{{task}}.log"), "w")
    subprocess.Popen(["bash", sys.argv[1]], env=env, stdout=log, stderr=subprocess.STDOUT)
print(f"Submitted batch job {{job}}")
"""
FAKE_SRUN = """\
#!/bin/bash
# A fake srun: drops its options and runs the command.
while [[ "$1" == --* ]]; do case "$1" in --output|--error) shift 2;; *) shift;; esac; done
exec "$@"
"""
FAKE_SACCT = '#!/bin/bash\necho "JobID|State|NodeList"\n'  # no state: submitit waits for the results


@pytest.mark.slow
def test_slurm_preset_runs_a_two_job_sweep_on_a_fake_slurm(tmp_path):
    _require(PRESETS["slurm"][0])
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scripts = {
        "sbatch": FAKE_SBATCH.format(python=sys.executable, log_dir=str(tmp_path)),
        "srun": FAKE_SRUN,
        "sacct": FAKE_SACCT,
    }
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = dict(
        os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", KNOWEDIT_SLURM_PARTITION="debug"
    )
    sweep_dir = tmp_path / "sweep"
    out = _sweep(["-m", "hydra/launcher=slurm", "editor.update_weight=1,10"], sweep_dir, env=env)
    _assert_two_jobs_finished(sweep_dir, out)
    sbatch = (tmp_path / "sbatch.sh").read_text()  # what a real cluster would have been given
    for flag in ("--array=0-1%2", "--gpus-per-node=1", "--cpus-per-task=8", "--mem=64GB", "--time=240"):
        assert f"#SBATCH {flag}\n" in sbatch
    assert "#SBATCH --partition=debug\n" in sbatch and "#SBATCH --job-name=knowedit-memit\n" in sbatch


@pytest.mark.slow
def test_optuna_preset_runs_two_trials_on_the_returned_metric(tmp_path):
    _require(OPTUNA)
    sweep_dir = tmp_path / "optuna"
    args = ["sweep=optuna_come", "editor=come_memit", "hydra.sweeper.n_trials=2"]
    out = _sweep(args, sweep_dir)
    assert sorted(p.parent.name for p in sweep_dir.glob("*/summary.json")) == ["0", "1"]  # subdir: job num
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert set(results["best_params"]) == {
        "editor.unlearn_weight",
        "editor.top_p_fraction",
        "editor.update_weight",
    }
    table = pd.read_csv(sweep_dir / CSV_NAME)
    assert len(table) == 2 and str(sweep_dir / MD_NAME) in out.stdout
    assert results["best_value"] == pytest.approx(table["score"].max())  # run.py returned the score
