"""Paper-format tables (runner.table) and the experiment presets that feed them."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from runner.table import build_tables, find_summaries, load_layout, main, to_markdown
from tests.conftest import compose_config


def _summary(folder: Path, method: str, dataset: str, model: str, values: dict, stderr=1.0, batch=10) -> Path:
    metrics = {k: {"mean": v, "stderr": None if k == "score" else stderr, "n": 4} for k, v in values.items()}
    folder.mkdir(parents=True)
    path = folder / "summary.json"
    path.write_text(
        json.dumps(
            {
                "metrics": {"post": metrics, "pre": {}},
                "protocol": {
                    "method": method,
                    "editor": "x.Y",
                    "edit_mode": "batch",
                    "batch_size": batch,
                    "dataset": {"name": dataset, "size": 4},
                    "model": {"id": model},
                    "generation": {
                        "enabled": dataset == "counterfact",
                        "consistency_source": "dataset",
                        "tfidf": "t",
                    },
                },
            }
        )
    )
    return path


CF = {
    "efficacy": 90.0,
    "generality": 80.0,
    "locality": 70.0,
    "score": 79.1,
    "fluency": 600.0,
    "consistency": 20.0,
}
ZS = {"efficacy": 50.0, "generality": 40.0, "locality": 30.0, "score": 38.3}


def test_rows_in_paper_order_with_stderr_and_references(tmp_path):
    for i, method in enumerate(["come_memit", "memit", "unedited", "ft_w", "come_memit+no_common"]):
        _summary(tmp_path / f"{i}", method, "counterfact", "EleutherAI/gpt-j-6B", CF)
    _summary(tmp_path / "z", "memit", "zsre", "EleutherAI/gpt-j-6B", ZS)
    layout = load_layout()
    tables = build_tables(find_summaries([tmp_path]), layout)
    cf, zs = tables
    assert [r.label for r in cf.rows] == ["Unedited", "FT-W", "MEMIT", "CoME-MEMIT", "CoME-MEMIT (no_common)"]
    assert cf.columns == ["efficacy", "generality", "locality", "score", "fluency", "consistency"]
    assert zs.columns == ["efficacy", "generality", "locality", "score"]  # zsRE: no generation metrics
    md = to_markdown(cf, layout)
    assert "| MEMIT | 90.0 ± 1.0 | 80.0 ± 1.0 | 70.0 ± 1.0 | 79.1 | 600.0 ± 1.0 | 20.0 ± 1.0 |" in md
    assert "Efficacy ↑" in md and "not comparable with published Consistency" in md
    # published GPT-J rows (MEMIT paper) with their source
    refs = dict((ref["id"], rows) for ref, rows in cf.references)
    memit = next(r for r in refs["memit-gptj-counterfact"] if r.method == "memit")
    assert memit.metrics["efficacy"]["mean"] == 98.9 and "MEMIT paper" in md
    assert [ref["id"] for ref, _ in zs.references] == ["memit-gptj-zsre"]


def test_no_references_for_other_models_unless_asked(tmp_path):
    _summary(tmp_path / "a", "memit", "counterfact", "toy", CF)
    assert build_tables(find_summaries([tmp_path]))[0].references == []
    assert build_tables(find_summaries([tmp_path]), reference_model="gpt-j")[0].references


def test_cli_writes_markdown_csv_latex_and_flags_protocol_differences(tmp_path, capsys):
    _summary(tmp_path / "a", "memit", "counterfact", "toy", CF, batch=16)
    _summary(tmp_path / "b", "rome", "counterfact", "toy", CF, batch=1)
    _summary(tmp_path / "c", "rome", "counterfact", "toy", CF, batch=16)
    assert main([str(tmp_path)]) == 0
    md = (tmp_path / "paper_table.md").read_text()
    assert "ROME [b]" in md and "ROME [c]" in md  # two rows of one method: told apart by folder
    assert "batch_size=1 (differs)" in md
    frame = pd.read_csv(tmp_path / "paper_table.csv")
    assert list(frame["label"]) == ["ROME [b]", "ROME [c]", "MEMIT"] and "efficacy_stderr" in frame
    tex = (tmp_path / "paper_table.tex").read_text()
    assert "\\toprule" in tex and "$\\pm$" in tex
    assert main([str(tmp_path / "nothing")]) == 2
    assert "neither a folder" in capsys.readouterr().err


@pytest.mark.parametrize("experiment", ["table1", "table2", "scaling"])
def test_presets_compose_as_one_batch_multiruns(experiment):
    paths = ["paths.cache_dir=/tmp/c", "paths.output_dir=/tmp/o"]
    full = compose_config(f"+experiment={experiment}", *paths, return_hydra_config=True)
    tiny = compose_config(f"+experiment={experiment}", "+size=tiny", "model=toy", *paths)
    assert str(full.hydra.mode).endswith("MULTIRUN") and full.edit_mode == "batch"
    params = full.hydra.sweeper.params
    if experiment == "scaling":
        assert params["dataset.size"].split(",")[0] == "1" and params["dataset.size"].endswith("10000")
        assert full.batch_size == full.dataset.size or full.dataset.size is None
    else:
        editors = params.editor.split(",")
        assert {
            "unedited",
            "ft",
            "ft_w",
            "f_learning",
            "rome",
            "memit",
            "pmet",
            "come_memit",
            "come_pmet",
        } == set(editors)
        assert params.model == "gpt-j,llama3"
        assert full.batch_size == full.dataset.size == 10000 and full.dataset.download
    assert tiny.batch_size == tiny.dataset.size == 16 and not tiny.dataset.download
    assert tiny.model.name == "toy"


@pytest.mark.parametrize("experiment", ["sss_table1", "sss_table2", "sss_table3", "sss_table5"])
def test_sss_presets_edit_one_at_a_time_on_gpt2_xl_with_and_without_sss(experiment):
    paths = ["paths.cache_dir=/tmp/c", "paths.output_dir=/tmp/o"]
    full = compose_config(f"+experiment={experiment}", *paths, return_hydra_config=True)
    tiny = compose_config(f"+experiment={experiment}", "+size=tiny", "model=toy", *paths)
    params = full.hydra.sweeper.params
    assert params.model == "gpt2-xl" and full.batch_size == tiny.batch_size == 1
    assert {"ft_l", "ft_l_sss", "mend", "mend_sss", "serac", "serac_sss"} <= set(params.editor.split(","))
    assert full.edit_mode == ("sequential" if experiment == "sss_table2" else "batch")
    assert tiny.dataset.size == 16 and tiny.model.name == "toy"


def test_the_c_sweep_runs_ft_l_with_sss_from_0_to_1_on_the_locality_set():
    paths = ["paths.cache_dir=/tmp/c", "paths.output_dir=/tmp/o"]
    cfg = compose_config("sweep=sss_c", *paths, return_hydra_config=True)
    values = [float(v) for v in cfg.hydra.sweeper.params["editor.sss_coefficient"].split(",")]
    assert values == [i / 10 for i in range(11)]
    assert cfg.editor._target_ == "editors.finetune.FineTune" and cfg.dataset.name == "cf_distract_neighbor"


def test_wandb_table_is_logged_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    _summary(tmp_path / "a", "memit", "counterfact", "toy", CF)
    assert main([str(tmp_path), "--wandb"]) == 0
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert runs and any(p.suffix == ".wandb" for p in runs[0].iterdir())


def test_rows_of_one_method_are_told_apart_by_their_own_overrides_in_job_order(tmp_path):
    for i, size in ((9, 1), (10, 16), (2, 4)):
        _summary(tmp_path / f"{i}_editor=memit,dataset.size={size},model=toy", "memit", "zsre", "toy", ZS)
    (table,) = build_tables(find_summaries([tmp_path]))
    assert [r.label for r in table.rows] == [
        "MEMIT [dataset.size=4]",
        "MEMIT [dataset.size=1]",
        "MEMIT [dataset.size=16]",
    ]


def test_a_sequential_table_shows_only_sequential_references(tmp_path):
    path = _summary(tmp_path / "a", "alphaedit", "counterfact", "gpt-j", CF)
    data = json.loads(path.read_text())
    data["protocol"]["edit_mode"] = "sequential"
    path.write_text(json.dumps(data))
    (table,) = build_tables(find_summaries([tmp_path]))
    assert [ref["id"] for ref, _ in table.references] == ["alphaedit-gptj-counterfact"]
    alpha = next(r for r in table.references[0][1] if r.method == "alphaedit")
    assert alpha.metrics["efficacy"]["mean"] == 99.75


def test_published_rows_per_setting_keep_their_note_and_the_methods_order(tmp_path):
    path = _summary(tmp_path / "a", "memit", "counterfact_easyedit", "gpt2-xl", {"efficacy": 90.0})
    data = json.loads(path.read_text())
    data["protocol"]["edit_mode"] = "sequential"
    path.write_text(json.dumps(data))
    (table,) = build_tables(find_summaries([tmp_path]))
    (ref, rows) = table.references[0]
    assert ref["id"] == "sss-gpt2xl-counterfact-sequential"
    labels = [r.label for r in rows]
    assert labels[:5] == ["FT-L [n=1]", "FT-L [n=10]", "FT-L [n=100]", "FT-L [n=1000]", "FT-L w/ SSS [n=1]"]
    memit = {r.label: r.metrics["locality"]["mean"] for r in rows if r.method == "memit"}
    assert memit == {"MEMIT [n=1]": 100, "MEMIT [n=10]": 100, "MEMIT [n=100]": 91.0, "MEMIT [n=1000]": 54.8}
    assert "FT-L w/ SSS [n=1000] †" in to_markdown(table, load_layout())


def test_ties_unlearn_preset_rows_share_their_members():
    paths = ["paths.cache_dir=/tmp/c", "paths.output_dir=/tmp/o"]
    full = compose_config("+experiment=ties_unlearn", *paths, return_hydra_config=True)
    assert full.task == "unlearn" and full.dataset.name == "tofu" and full.dataset.forget_split == "forget10"
    recipes = [r.strip() for r in full.hydra.sweeper.params["+recipe"].split(",")]
    rows = {}
    for recipe in recipes:
        cfg = compose_config("+experiment=ties_unlearn", f"+recipe={recipe}", "model=toy", *paths)
        assert cfg.editor._target_.endswith("TiesNpo")
        rows[recipe] = (
            cfg.editor.member,
            cfg.editor.merge.space,
            cfg.editor.merge.method,
            cfg.editor.merge.density,
        )
        members = (cfg.editor.over, cfg.editor.under)
        assert [(m.ga_ratio, m.gd_ratio, m.gk_ratio) for m in members] == [(0.4, 0.4, 0.2), (0.3, 0.3, 0.4)]
    assert rows == {
        "ties_over": ("over", "lora_factors", "ties", 0.8),
        "ties_under": ("under", "lora_factors", "ties", 0.8),
        "ties_merged": (None, "lora_factors", "ties", 0.8),
        "ties_merged_delta": (None, "delta_weights", "ties", 0.8),
        "ties_task_arithmetic": (None, "delta_weights", "task_arithmetic", 0.8),
        "ties_dare": (None, "delta_weights", "dare_ties", 0.8),
    }
