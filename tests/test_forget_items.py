"""unlearn.forget_items=N: only the first N forget items are unlearned and scored (the forget split,
its holdout pair and the reference's truth ratios); bad N and a resume with another N refuse; the
sweep preset sweeps it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from evaluation.unlearning import forget_quality
from runner import run
from runner.pipeline import ConfigError
from runner.results import ResumeMismatch
from runner.unlearning_data import first_forget_items, load_unlearning
from tests.conftest import compose_config
from tests.test_unlearn_task import TOY as UNLEARN_TOY

ROOT = Path(__file__).resolve().parents[1]
#: the TOFU toy of tests/test_unlearn_task.py with 8 items per split (and no refusal answers), of
#: which N=4 are forgotten
TOY = [
    *(o for o in UNLEARN_TOY if not o.startswith(("dataset.size=", "unlearn.toy_refusals="))),
    "dataset.size=8",
]


def _cfg(tmp_path: Path, *overrides: str):
    return compose_config(
        *TOY,
        f"paths.cache_dir={tmp_path.parent / 'forget-items-cache'}",
        f"paths.output_dir={tmp_path / 'out'}",
        *overrides,
    )


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def test_n_items_are_unlearned_scored_and_compared_like_for_like_and_a_resume_keeps_n(tmp_path):
    from runner.unlearn import Scorer, _load_models, _reference_records, _unlearn_cfg

    cfg = _cfg(tmp_path, "editor=memit", "unlearn.forget_items=4")
    summary = run(cfg)
    data = load_unlearning(cfg.dataset)
    first4 = [item.item_id for item in data.splits["forget"][:4]]
    protocol = summary["protocol"]
    assert protocol["n_requests"] == 4 and protocol["unlearn"]["forget_items"] == 4
    assert protocol["dataset"]["splits"] == {
        "forget": 4,
        "retain": 8,
        "real_authors": 8,
        "world_facts": 8,
        "holdout": 4,
    }
    records = _records(tmp_path / "out" / "results.jsonl")
    by_split = {s: [r["item_id"] for r in records if r["split"] == s] for s in protocol["dataset"]["splits"]}
    assert by_split["forget"] == first4  # the 4 unlearned items, and no other forget item
    assert by_split["holdout"] == [i.item_id for i in data.splits["holdout"][:4]]
    assert len(by_split["retain"]) == 8  # the other splits stay whole

    # forget quality: the KS test of the 4 items' truth ratios against the reference's on the same 4
    ucfg = _unlearn_cfg(cfg)
    cache = Path(cfg.paths.cache_dir)
    _, reference, prompter = _load_models(cfg, data, cache, ucfg)
    whole = _reference_records(reference, data, Scorer(data, prompter, ucfg, False), cache, ucfg)
    theirs = {r["item_id"]: r["post_truth_ratio"] for r in whole if r["split"] == "forget"}
    assert len(theirs) == 8
    ours = [r["post_truth_ratio"] for r in records if r["split"] == "forget"]
    expected = forget_quality(ours, [theirs[i] for i in first4])
    assert summary["metrics"]["post"]["forget_quality"]["mean"] == pytest.approx(expected)
    over_all = forget_quality(ours, list(theirs.values()))
    if over_all != pytest.approx(expected):  # the 8-item reference would give another number
        assert summary["metrics"]["post"]["forget_quality"]["mean"] != pytest.approx(over_all)

    with pytest.raises(ResumeMismatch, match="unlearn.forget_items"):
        run(_cfg(tmp_path, "editor=memit", "unlearn.forget_items=3"))


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0", "unlearn.forget_items must be a positive number of forget items or null"),
        ("9", r"unlearn.forget_items=9 is more than the 8 items of tofu's forget split \(dataset.size=8"),
    ],
)
def test_a_bad_n_is_one_line_before_any_model_loads(tmp_path, monkeypatch, value, message):
    import runner.unlearn

    def no_models(*args, **kwargs):
        raise AssertionError("the models were loaded before unlearn.forget_items was checked")

    monkeypatch.setattr(runner.unlearn, "_load_models", no_models)
    with pytest.raises(ConfigError, match=message) as error:
        run(_cfg(tmp_path, "editor=memit", f"unlearn.forget_items={value}"))
    assert "\n" not in str(error.value)


def test_first_forget_items_cuts_the_forget_splits_and_the_holdout_only():
    tofu = load_unlearning({"name": "tofu", "forget_split": "forget01", "retain_authors": 2})
    cut = first_forget_items(tofu, 5)
    assert cut.splits["forget"] == tofu.splits["forget"][:5]
    assert cut.splits["holdout"] == tofu.splits["holdout"][:5]
    for split in ("retain", "real_authors", "world_facts"):
        assert cut.splits[split] == tofu.splits[split]
    assert cut.train == tofu.train and cut.info["n_forget"] == 5 and cut.info["forget_items"] == 5
    assert first_forget_items(tofu, None) is tofu
    with pytest.raises(ValueError, match="forget_items must be 1..40"):
        first_forget_items(tofu, 41)

    rwku = load_unlearning({"name": "rwku", "n_targets": 1})
    n = len(rwku.splits["forget_level1"]) + 1  # every level-1 probe and the first level-2 one
    cut = first_forget_items(rwku, n)
    assert cut.splits["forget"] == rwku.splits["forget"][:n]
    assert cut.splits["forget_level1"] == rwku.splits["forget_level1"]
    assert cut.splits["forget_level2"] == rwku.splits["forget_level2"][:1]
    for split in ("forget_level3", "neighbor_level1", "neighbor_level2", "forget_mia", "retain_mia"):
        assert cut.splits[split] == rwku.splits[split]


def test_the_sweep_preset_sweeps_forget_items_on_tofu_unlearning():
    cfg = compose_config("sweep=forget_items", return_hydra_config=True)
    assert cfg.task == "unlearn" and cfg.dataset.name == "tofu" and cfg.dataset.forget_split == "forget05"
    values = [int(v) for v in str(cfg.hydra.sweeper.params["unlearn.forget_items"]).split(",")]
    assert values == sorted(values) and values[-1] == 200  # forget05's 200 items: the largest N
    preset = yaml.safe_load((ROOT / "multirun_sweeps" / "sweep" / "forget_items.yaml").read_text())
    assert preset["hydra"]["sweep"]["dir"].startswith("multirun/forget_items/")


def test_a_forget_items_sweep_gets_a_table_of_the_unlearning_metrics_and_a_curve(tmp_path):
    """The SweepSummary aggregation of three finished jobs (summaries as task=unlearn writes them)."""
    from runner.sweep import aggregate_sweep

    metrics = ("forget_quality", "model_utility", "forget_rouge_l", "retain_rouge_l", "refusal_rate")
    for num, n in enumerate((2, 4, 8)):
        job = tmp_path / str(num)
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"unlearn.forget_items={n}"]))
        (job / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"job": {"num": num}}}))
        (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"logger": {"backend": "none"}}))
        post = {m: {"mean": n / 10 + k / 100, "stderr": None} for k, m in enumerate(metrics)}
        (job / "summary.json").write_text(json.dumps({"metrics": {"post": post, "pre": {}}}))
    result = aggregate_sweep(tmp_path, log_wandb=False)
    assert result.numeric_keys == ["unlearn.forget_items"]
    assert (tmp_path / "curve_unlearn.forget_items.png").read_bytes().startswith(b"\x89PNG")
    assert list(result.table["unlearn.forget_items"]) == [2, 4, 8]
    assert list(result.table["forget_quality"]) == pytest.approx([0.2, 0.4, 0.8])
    header = next(line for line in result.md_path.read_text().splitlines() if line.startswith("| job"))
    assert all(m in header for m in metrics)
    # the curve plots the unlearning metrics (fractions), and the table does not call them percentages
    from runner.sweep import _headline

    assert _headline(result.table) == (metrics, "value")
    text = result.md_path.read_text()
    assert "Cells are fractions" in text and "in %" not in text
