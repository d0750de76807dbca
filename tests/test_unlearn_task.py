"""task=unlearn end to end on the TOFU toy: records per (split, item), the summary, resume, errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from runner import run
from runner.pipeline import ConfigError
from runner.results import ResumeMismatch
from runner.unlearning_data import TOFU_HUB_FILES, download_tofu, load_unlearning
from tests.conftest import compose_config

BUNDLED = Path(__file__).resolve().parents[1] / "runner" / "data" / "unlearning" / "tofu"
#: a toy of 4 items per split (16 question -> answer facts), trained briefly: enough to know them
TOY = [
    "task=unlearn",
    "dataset=tofu",
    "dataset.forget_split=forget01",
    "dataset.retain_authors=2",
    "dataset.size=4",
    "model=toy",
    "model.train.steps=300",
    "model.train.eval_every=50",
    "model.train.stop_at_recall=0.9",
    "model.train.progress=false",
    "unlearn.max_new_tokens=24",
    "unlearn.toy_refusals=4",  # the refusal answer space, in proportion
    "stats.n_samples=100",
    "threads=1",
    "progress=false",
    "logger=none",
]
SPLITS = ("forget", "retain", "real_authors", "world_facts", "holdout")


def _cfg(tmp_path: Path, *overrides: str, out: str = "out"):
    return compose_config(
        *TOY,
        f"paths.cache_dir={tmp_path.parent / 'unlearn-cache'}",
        f"paths.output_dir={tmp_path / out}",
        *overrides,
    )


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_alphaedit_self_improve_unlearns_and_writes_one_record_per_item(tmp_path, capsys):
    summary = run(_cfg(tmp_path, "editor=alphaedit", "unlearn.target=self_improve"))
    records = _lines(tmp_path / "out" / "results.jsonl")
    assert sorted({r["split"] for r in records}) == sorted(SPLITS)
    assert len(records) == 4 * len(SPLITS) and len({r["case_id"] for r in records}) == len(records)
    forget = next(r for r in records if r["split"] == "forget")
    for key in ("prob", "truth_ratio", "rouge_l", "refusal", "loss", "min_k"):
        assert f"pre_{key}" in forget and f"post_{key}" in forget
    assert isinstance(forget["post_generation"], str)
    holdout = next(r for r in records if r["split"] == "holdout")
    assert "post_loss" in holdout and "post_rouge_l" not in holdout
    post, pre = summary["metrics"]["post"], summary["metrics"]["pre"]
    for key in ("forget_quality", "model_utility", "forget_rouge_l", "retain_rouge_l", "refusal_rate"):
        assert key in post and key in pre and math.isfinite(post[key]["mean"])
    assert 0 <= post["forget_quality"]["mean"] <= 1
    protocol = summary["protocol"]
    assert protocol["task"] == "unlearn" and protocol["method"].endswith("+self_improve")
    assert sum(protocol["targets"].values()) == 4 and set(protocol["targets"]) == {
        "self_improve",
        "fallback_idk",
    }
    assert protocol["reference_model"]["revision"] != protocol["model"]["revision"]
    printed = capsys.readouterr().out
    assert "forget_quality" in printed and "post-unlearning" in printed


def test_rerun_resumes_and_a_different_config_refuses(tmp_path):
    first = run(_cfg(tmp_path, "editor=memit", "unlearn.merge_queries=4"))
    assert first["protocol"]["n_requests"] == 1  # 4 forget questions merged into one request
    post, pre = first["metrics"]["post"], first["metrics"]["pre"]
    assert post["forget/prob"]["mean"] < pre["forget/prob"]["mean"]  # the forget answers got less likely
    path = tmp_path / "out" / "results.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-3]) + "\n")  # three items lost
    again = run(_cfg(tmp_path, "editor=memit", "unlearn.merge_queries=4"))
    after = path.read_text().splitlines()
    assert len(after) == len(lines) and after[: len(lines) - 3] == lines[:-3]
    assert again["metrics"]["post"].keys() == first["metrics"]["post"].keys()
    with pytest.raises(ResumeMismatch, match="merge_queries"):
        run(_cfg(tmp_path, "editor=memit", "unlearn.merge_queries=2"))


def test_npo_baseline_trains_on_the_whole_forget_set(tmp_path):
    summary = run(_cfg(tmp_path, "editor=npo"))
    post, pre = summary["metrics"]["post"], summary["metrics"]["pre"]
    assert post["forget/loss"]["mean"] > pre["forget/loss"]["mean"]  # the forget answers got less likely


def test_the_retain_model_has_forget_quality_one_against_itself(tmp_path):
    """Sanity: the reference's own truth ratios give a KS p-value of 1 (identical samples)."""
    from evaluation.unlearning import summarize_unlearning
    from runner.unlearn import Scorer, _load_models, _reference_records, _unlearn_cfg

    cfg = _cfg(tmp_path, "editor=unedited")
    ucfg = _unlearn_cfg(cfg)
    data = load_unlearning(cfg.dataset)
    _, reference, prompter = _load_models(cfg, data, Path(cfg.paths.cache_dir), ucfg)
    scorer = Scorer(data, prompter, ucfg, progress=False)
    ref = _reference_records(reference, data, scorer, Path(cfg.paths.cache_dir), ucfg)
    values = summarize_unlearning(ref, data.roles, "post_", reference=ref)
    assert values["forget_quality"] == pytest.approx(1.0)


def test_the_toys_statistics_leave_out_the_forget_split_unless_told_otherwise(tmp_path):
    from runner.unlearn import _load_models, _unlearn_cfg

    def texts(*overrides: str) -> set[str]:
        cfg = _cfg(tmp_path, "editor=unedited", "unlearn.reference=none", *overrides)
        data = load_unlearning(cfg.dataset)
        loaded, _, prompter = _load_models(cfg, data, Path(cfg.paths.cache_dir), _unlearn_cfg(cfg))
        return set(loaded.training_texts), {prompter(i.question) for i in data.splits["forget"]}

    retain_side, forget = texts()
    everything, _ = texts("unlearn.toy_stats=full")
    asks = lambda sentences: {p for p in forget if any(s.startswith(p + " ") for s in sentences)}  # noqa: E731
    assert retain_side < everything and asks(everything) == forget and not asks(retain_side)


def test_unlearn_needs_an_unlearning_dataset_and_edit_refuses_one(tmp_path):
    paths = [f"paths.cache_dir={tmp_path / 'cache'}", f"paths.output_dir={tmp_path / 'out'}", "logger=none"]
    with pytest.raises(ConfigError, match="task=unlearn needs an unlearning dataset"):
        run(compose_config("task=unlearn", "dataset=counterfact", *paths))
    with pytest.raises(ConfigError, match="run it with task=unlearn"):
        run(_cfg(tmp_path, "task=edit"))


def test_download_writes_the_layout_the_loader_reads(tmp_path):
    """download=true: each hub config becomes one JSON file; the loader reads them like the bundle."""
    from runner.unlearning_data import _parse

    calls = []

    def fake_load_dataset(repo, config, split):
        calls.append((repo, config, split))
        file = next(f for f, c in TOFU_HUB_FILES.items() if c == config)
        return _parse((BUNDLED / file).read_bytes(), file)

    folder = download_tofu(tmp_path / "tofu", load_dataset=fake_load_dataset)
    assert {c for _, c, _ in calls} == set(TOFU_HUB_FILES.values()) and calls[0][0] == "locuslab/TOFU"
    fetched = load_unlearning({"name": "tofu", "path": str(folder), "forget_split": "forget05"})
    bundled = load_unlearning({"name": "tofu", "forget_split": "forget05"})
    assert fetched.splits == bundled.splits and fetched.refusals == bundled.refusals
    download_tofu(folder, load_dataset=lambda *a, **k: pytest.fail("files already there are kept"))
