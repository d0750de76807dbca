"""SemEval-2025 Task 4: the metrics (evaluation.semeval, through evaluation.unlearning) against hand
computations, and dataset=semeval25 (runner.unlearning_data) on tiny hand-written copies."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from evaluation.cases import QAItem, SplitRoles
from evaluation.metrics import METRICS
from evaluation.semeval import (
    exact_match,
    item_kind,
    mia_score,
    mmlu_prompt,
    parse_item_id,
    semeval_final,
    semeval_item_id,
    task_aggregate,
)
from evaluation.unlearning import mia_auc, score_items, summarize_unlearning
from runner.datasets import DatasetError, InvalidRecordError
from runner.unlearning_data import load_unlearning
from tests.conftest import compose_config


def _hm(values) -> float:
    return len(values) / sum(1.0 / v for v in values)


# ------------------------------------------------------------------------------ elementary pieces


def test_exact_match_strips_and_lowercases_only():
    assert exact_match("  Paris\n", "paris") == 1.0
    assert exact_match("PARIS", " Paris ") == 1.0
    assert exact_match("Paris.", "Paris") == 0.0  # punctuation is not normalised (the task's script)
    assert exact_match("the  cat", "the cat") == 0.0  # nor inner whitespace


def test_kind_and_item_id_convention():
    assert item_kind("6e4b1d1c-sc1") == "sc" and item_kind("x_qa12") == "qa"
    assert item_kind("doc-17") is None and item_kind("qa1x") is None
    item_id = semeval_item_id("forget", "Task2", "abc-qa3")
    assert item_id == "semeval25/forget/Task2/abc-qa3"
    assert parse_item_id(item_id) == ("Task2", "qa")
    assert parse_item_id("tofu/forget05/3") is None
    assert parse_item_id("semeval25/forget/Task1/doc-17") is None  # no kind suffix


def test_mia_score():
    assert mia_score(0.5) == pytest.approx(1.0)
    assert mia_score(0.8) == pytest.approx(0.4)
    assert mia_score(0.1) == pytest.approx(0.2)
    assert mia_score(1.0) == pytest.approx(0.0) and mia_score(0.0) == pytest.approx(0.0)


def test_task_aggregate_inverts_forget():
    forget = {("T1", "sc"): 0.2, ("T1", "qa"): 0.5}
    retain = {("T1", "sc"): 0.8, ("T1", "qa"): 1.0}
    assert task_aggregate(forget, retain) == pytest.approx(_hm([0.8, 0.5, 0.8, 1.0]))
    # a forget score of 1 (fully regurgitated) makes the harmonic mean 0
    assert task_aggregate({("T1", "sc"): 1.0}, retain) == 0.0
    with pytest.raises(ValueError):
        task_aggregate({}, {})


def test_semeval_final_is_the_mean():
    # ZJUKLAB's 7B submission: mean(0.944, 0.048, 0.471) = 0.487 (spec 3.3)
    assert semeval_final(0.944, 0.048, 0.471) == pytest.approx(0.4877, abs=1e-4)


def test_mmlu_prompt_is_open_instructs_zero_shot_prompt():
    prompt = mmlu_prompt("high_school_biology", "What is 2+2?", ["3", "4", "5", "6"])
    assert prompt == (
        "The following are multiple choice questions (with answers) about  high school biology.\n\n"
        "What is 2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:"
    )


def test_metrics_are_registered():
    for name in ("task_aggregate", "mia_score", "mmlu", "semeval_final", "exact_match", "choice_correct"):
        info = METRICS[name]
        assert info.scale == 1.0 and info.higher_is_better and info.description


# ---------------------------------------------------------------------------------- summaries

ROLES = SplitRoles(forget="forget", retain="retain", mia_member="forget", mia_nonmember="holdout")


def _rec(split, task, source_id, rouge, em, loss=None):
    rec = {"split": split, "item_id": semeval_item_id(split, task, source_id)}
    rec |= {"post_rouge_l": rouge, "post_exact_match": em, "post_generation": "x"}
    if loss is not None:
        rec["post_loss"] = loss
    return rec


def _semeval_records():
    return [
        # forget: Task1 sc 0.6, 0.2 (mean 0.4); Task1 qa 1, 0 (0.5); Task2 sc 0.1; Task2 qa 0
        _rec("forget", "Task1", "a-sc1", 0.6, 1.0, loss=0.5),
        _rec("forget", "Task1", "b-sc2", 0.2, 0.0, loss=1.0),
        _rec("forget", "Task1", "a-qa1", 0.9, 1.0, loss=2.0),
        _rec("forget", "Task1", "b-qa1", 0.3, 0.0, loss=0.2),
        _rec("forget", "Task2", "c-sc1", 0.1, 1.0, loss=1.5),
        _rec("forget", "Task2", "c-qa1", 0.7, 0.0, loss=3.0),
        # retain: Task1 sc 0.9; Task1 qa 1; Task2 sc 0.5, 0.7 (0.6); Task2 qa 1, 0 (0.5)
        _rec("retain", "Task1", "d-sc1", 0.9, 0.0),
        _rec("retain", "Task1", "d-qa1", 0.1, 1.0),
        _rec("retain", "Task2", "e-sc1", 0.5, 0.0),
        _rec("retain", "Task2", "f-sc1", 0.7, 0.0),
        _rec("retain", "Task2", "e-qa1", 0.0, 1.0),
        _rec("retain", "Task2", "f-qa1", 0.0, 0.0),
        {"split": "holdout", "item_id": "semeval25/holdout/Task1/g-qa1", "post_loss": 1.2},
        {"split": "holdout", "item_id": "semeval25/holdout/Task1/h-qa1", "post_loss": 0.4},
        {"split": "mmlu", "item_id": "mmlu/0", "post_choice_correct": 1.0},
        {"split": "mmlu", "item_id": "mmlu/1", "post_choice_correct": 0.0},
        {"split": "mmlu", "item_id": "mmlu/2", "post_choice_correct": 1.0},
    ]


def test_summary_on_hand_made_semeval_records():
    s = summarize_unlearning(_semeval_records(), ROLES, "post_")
    # the kind's own measure: ROUGE-L on sentence completions, exact match on questions
    assert s["forget/Task1/rouge_l"] == pytest.approx(0.4)
    assert s["forget/Task1/exact_match"] == pytest.approx(0.5)
    assert s["forget/Task2/rouge_l"] == pytest.approx(0.1)
    assert s["forget/Task2/exact_match"] == pytest.approx(0.0)
    assert s["retain/Task2/rouge_l"] == pytest.approx(0.6)
    assert s["retain/Task2/exact_match"] == pytest.approx(0.5)
    terms = [
        1 - 0.4,
        1 - 0.5,
        1 - 0.1,
        1 - 0.0,
        0.9,
        1.0,
        0.6,
        0.5,
    ]  # forget inverted, 8 = 2 subtasks x 2 x 2
    assert s["task_aggregate"] == pytest.approx(_hm(terms))
    # LOSS attack, forget (members) vs holdout: score -loss
    members, nonmembers = [0.5, 1.0, 2.0, 0.2, 1.5, 3.0], [1.2, 0.4]
    pairs = sum((m < n) + 0.5 * (m == n) for m in members for n in nonmembers)
    auc = pairs / (len(members) * len(nonmembers))
    assert s["mia_loss_auc"] == pytest.approx(auc)
    assert s["mia_score"] == pytest.approx(1 - 2 * abs(auc - 0.5))
    assert s["mmlu"] == pytest.approx(2 / 3)
    assert s["semeval_final"] == pytest.approx((_hm(terms) + s["mia_score"] + 2 / 3) / 3)

    without_mmlu = [r for r in _semeval_records() if r["split"] != "mmlu"]
    s2 = summarize_unlearning(without_mmlu, ROLES, "post_")
    assert "mmlu" not in s2 and "semeval_final" not in s2 and s2["task_aggregate"] == s["task_aggregate"]
    only_forget = [r for r in _semeval_records() if r["split"] == "forget"]
    assert "task_aggregate" not in summarize_unlearning(only_forget, ROLES, "post_")


def test_task_aggregate_has_12_terms_with_3_subtasks():
    records, terms = [], []
    for split in ("forget", "retain"):
        for t, task in enumerate(("Task1", "Task2", "Task3")):
            rouge, em = 0.1 + 0.1 * t + (0.5 if split == "retain" else 0.0), float(split == "retain")
            records.append(_rec(split, task, f"x{t}-sc1", rouge, 0.0))
            records.append(_rec(split, task, f"x{t}-qa1", 0.0, em if t else 0.5))
            value_qa = em if t else 0.5
            terms += [1 - rouge, 1 - value_qa] if split == "forget" else [rouge, value_qa]
    s = summarize_unlearning(records, ROLES, "post_")
    assert len(terms) == 12
    assert s["task_aggregate"] == pytest.approx(_hm(terms))


def test_tofu_records_get_the_mia_score_and_no_semeval_numbers():
    records = [
        {"split": "forget", "item_id": "tofu/forget05/0", "post_loss": 2.0, "post_rouge_l": 0.5},
        {"split": "forget", "item_id": "tofu/forget05/1", "post_loss": 0.5, "post_rouge_l": 0.3},
        {"split": "retain", "item_id": "tofu/retain/0", "post_rouge_l": 0.9},
        {"split": "holdout", "item_id": "tofu/holdout05/0", "post_loss": 1.0},
    ]
    s = summarize_unlearning(records, ROLES, "post_")
    auc = mia_auc([-2.0, -0.5], [-1.0])  # = 0.5
    assert s["mia_loss_auc"] == pytest.approx(auc) and s["mia_score"] == pytest.approx(1 - 2 * abs(auc - 0.5))
    assert not any(k in s for k in ("task_aggregate", "mmlu", "semeval_final"))


# ------------------------------------------------------------------------------ on a tiny model


def _answer_logprobs(model, tokenizer, prompt: str, answer: str) -> np.ndarray:
    prompt_ids = tokenizer(prompt)["input_ids"]
    full = tokenizer(f"{prompt} {answer}")["input_ids"]
    assert full[: len(prompt_ids)] == prompt_ids
    with torch.no_grad():
        lp = model(torch.tensor([full])).logits[0].double().log_softmax(-1)
    return np.array([lp[p - 1, full[p]].item() for p in range(len(prompt_ids), len(full))])


def test_exact_match_per_item_on_a_tiny_gpt2(tiny_gpt2, tiny_tokenizer):
    prompt = "Question: Where is Paris?\nAnswer:"
    first = score_items(
        tiny_gpt2,
        tiny_tokenizer,
        [QAItem("q", "Where is Paris?", "Spain")],
        [prompt],
        ["rouge_l"],
        max_new_tokens=5,
    )
    generation = first[0]["generation"]
    assert generation  # the random tiny model says something
    items = [
        QAItem("same", "Where is Paris?", f"  {generation.upper()} "),  # equal after strip + lower
        QAItem("other", "Where is Paris?", generation + " and more"),
    ]
    out = score_items(tiny_gpt2, tiny_tokenizer, items, [prompt, prompt], ["exact_match"], max_new_tokens=5)
    assert [row["exact_match"] for row in out] == [1.0, 0.0]
    assert out[0]["generation"] == generation and "rouge_l" not in out[0]


def _write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


MMLU_ROWS = [
    {
        "question": "What is 2+2?",
        "subject": "elementary_mathematics",
        "choices": ["3", "4", "5", "6"],
        "answer": 1,
    },
    {
        "question": "Which is a fruit?",
        "subject": "nutrition",
        "choices": ["rock", "apple", "car", "sky"],
        "answer": "B",
    },
    {
        "question": "Capital of France?",
        "subject": "geography",
        "choices": ["Paris", "Rome", "Oslo", "Bern"],
        "answer": 0,
    },
]


def _semeval_copy(root, with_validation=True):
    rows = {
        ("forget", "train"): [
            {"id": "f1-sc1", "input": "The dragon flew over", "output": "the silent hills.", "task": "Task1"},
            {
                "id": "f1-qa1",
                "input": "What did the dragon fly over?",
                "output": "the hills",
                "task": "Task1",
            },
            {"id": "f2-qa1", "input": "What is Ann's phone number?", "output": "555-0199", "task": "Task2"},
        ],
        ("retain", "train"): [
            {"id": "r1-sc1", "input": "The knight rode to", "output": "the old castle.", "task": "Task1"},
            {"id": "r2-qa1", "input": "Where does Bob live?", "output": "Main Street", "task": "Task2"},
        ],
        ("forget", "validation"): [
            {"id": "v1-qa1", "input": "Who wrote the song?", "output": "Clara", "task": "Task1"},
        ],
        ("retain", "validation"): [
            {"id": "w1-qa1", "input": "Who sang the song?", "output": "Dora", "task": "Task2"},
        ],
    }
    for (split, fold), recs in rows.items():
        if with_validation or fold == "train":
            _write_jsonl(root / fold / f"{split}.jsonl", recs)
    return rows


def test_mmlu_accuracy_on_three_hand_made_questions(tmp_path, tiny_gpt2, tiny_tokenizer):
    # by hand: each option's mean log-prob after the prompt; the gold answers are set so that the
    # model's pick is right on questions 0 and 2 and wrong on question 1 (accuracy 2/3)
    picks = []
    for row in MMLU_ROWS:
        prompt = mmlu_prompt(row["subject"], row["question"], row["choices"])
        scores = [_answer_logprobs(tiny_gpt2, tiny_tokenizer, prompt, letter).mean() for letter in "ABCD"]
        picks.append(int(np.argmax(scores)))
    rows = [
        {**MMLU_ROWS[0], "answer": picks[0]},
        {**MMLU_ROWS[1], "answer": "ABCD"[(picks[1] + 1) % 4]},  # a letter, as some copies write it
        {**MMLU_ROWS[2], "answer": "ABCD"[picks[2]].lower()},
    ]
    _semeval_copy(tmp_path / "semeval")
    _write_jsonl(tmp_path / "mmlu.jsonl", rows)
    data = load_unlearning(
        {"name": "semeval25", "path": str(tmp_path / "semeval"), "mmlu_path": str(tmp_path / "mmlu.jsonl")}
    )
    items = data.splits["mmlu"]
    assert [i.answer for i in items] == ["ABCD"[picks[0]], "ABCD"[(picks[1] + 1) % 4], "ABCD"[picks[2]]]
    assert items[0].question == mmlu_prompt("elementary_mathematics", "What is 2+2?", ["3", "4", "5", "6"])
    assert data.roles.measures["mmlu"] == ("choice_correct",) and "mmlu" not in data.info["skipped_metrics"]
    prompts = [i.question for i in items]  # unlearn.question_template="{question}": the prompt as is
    out = score_items(tiny_gpt2, tiny_tokenizer, list(items), prompts, ["choice_correct"])
    assert [row["choice_correct"] for row in out] == [1.0, 0.0, 1.0]
    records = [
        {"split": "mmlu", "item_id": i.item_id, "post_choice_correct": r["choice_correct"]}
        for i, r in zip(items, out)
    ]
    assert summarize_unlearning(records, data.roles, "post_")["mmlu"] == pytest.approx(2 / 3)


# ------------------------------------------------------------------------------------- loader


def test_semeval_jsonl_copy(tmp_path):
    rows = _semeval_copy(tmp_path)
    # the README's conversion writes pandas' default (column-oriented) JSON, not JSON Lines
    import pandas as pd

    pd.DataFrame(rows[("retain", "train")]).to_json(tmp_path / "train" / "retain.jsonl")
    data = load_unlearning({"name": "semeval25", "path": str(tmp_path)})
    forget = data.splits["forget"]
    assert [i.item_id for i in forget] == [
        "semeval25/forget/Task1/f1-sc1",
        "semeval25/forget/Task1/f1-qa1",
        "semeval25/forget/Task2/f2-qa1",
    ]
    assert (forget[0].question, forget[0].answer) == ("The dragon flew over", "the silent hills.")
    assert forget[0].meta == {"task": "Task1", "kind": "sc", "id": "f1-sc1", "fold": "train"}
    assert [(i.question, i.answer) for i in data.splits["retain"]] == [
        (r["input"], r["output"]) for r in rows[("retain", "train")]
    ]
    # MIA without the task's documents: forget vs the validation fold's forget records
    assert [i.answer for i in data.splits["holdout"]] == ["Clara"]
    roles = data.roles
    assert (roles.forget, roles.retain, roles.mia_member, roles.mia_nonmember) == (
        "forget",
        "retain",
        "forget",
        "holdout",
    )
    assert roles.measures["forget"] == ("rouge_l", "exact_match", "loss", "min_k")
    assert roles.measures["retain"] == ("rouge_l", "exact_match")
    assert roles.measures["holdout"] == ("loss", "min_k")
    assert [i.item_id for i in data.train["full"]] == [i.item_id for i in forget + data.splits["retain"]]
    assert data.info["subtasks"] == ["Task1", "Task2"]
    assert data.info["kinds"] == {"Task1/qa": 1, "Task1/sc": 2, "Task2/qa": 2}
    assert "validation fold" in data.info["mia"]
    assert (
        "dataset.mmlu_path" in data.info["skipped_metrics"]["mmlu"]
        and "mia_score" not in data.info["skipped_metrics"]
    )

    val = load_unlearning({"name": "semeval25", "path": str(tmp_path), "fold": "validation"})
    assert [i.answer for i in val.splits["forget"]] == ["Clara"]
    assert [i.answer for i in val.splits["holdout"]] == ["the silent hills.", "the hills", "555-0199"]

    no_val = tmp_path / "only_train"
    _semeval_copy(no_val, with_validation=False)
    data = load_unlearning({"name": "semeval25", "path": str(no_val)})
    assert data.roles.mia_member is None and "holdout" not in data.splits
    assert "no MIA pair" in data.info["skipped_metrics"]["mia_score"]


def test_semeval_parquet_copy_with_mia_documents(tmp_path):
    import pandas as pd

    rows = _semeval_copy(tmp_path / "json")
    data_dir = tmp_path / "copy" / "data"
    data_dir.mkdir(parents=True)
    for (split, fold), recs in rows.items():
        pd.DataFrame(recs).to_parquet(data_dir / f"{split}_{fold}-00000-of-00001.parquet")
    _write_jsonl(
        tmp_path / "copy" / "mia_data" / "member.jsonl", [{"id": "m1", "document": "A forgotten tale."}]
    )
    _write_jsonl(
        tmp_path / "copy" / "mia_data" / "nonmember.jsonl",
        [{"id": "n1", "document": "A new tale."}, {"id": "n2", "document": "Another one."}],
    )
    data = load_unlearning({"name": "semeval25", "path": str(tmp_path / "copy")})
    from_json = load_unlearning({"name": "semeval25", "path": str(tmp_path / "json")})
    assert data.splits["forget"] == from_json.splits["forget"]
    assert data.splits["retain"] == from_json.splits["retain"]
    assert [i.text for i in data.splits["mia_nonmember"]] == ["A new tale.", "Another one."]
    assert data.splits["mia_member"][0].question == "" and data.splits["mia_member"][0].meta == {"id": "m1"}
    assert (data.roles.mia_member, data.roles.mia_nonmember) == ("mia_member", "mia_nonmember")
    assert data.roles.measures["forget"] == ("rouge_l", "exact_match")
    assert data.roles.measures["mia_member"] == ("loss", "min_k") and "holdout" not in data.splits
    assert "data/forget_train-00000-of-00001.parquet" in data.info["files"]


def test_semeval_errors(tmp_path):
    with pytest.raises(DatasetError, match=r"dataset\.path=.*gated.*semeval25-unlearning-dataset-public"):
        load_unlearning({"name": "semeval25"})
    with pytest.raises(DatasetError, match="no folder at"):
        load_unlearning({"name": "semeval25", "path": str(tmp_path / "nowhere")})
    with pytest.raises(DatasetError, match="no forget train file"):
        load_unlearning({"name": "semeval25", "path": str(tmp_path)})
    with pytest.raises(DatasetError, match="fold must be one of"):
        load_unlearning({"name": "semeval25", "path": str(tmp_path), "fold": "test"})
    with pytest.raises(DatasetError, match="semeval25 options"):
        load_unlearning({"name": "tofu", "mmlu_path": "cais/mmlu"})

    rows = _semeval_copy(tmp_path)
    bad = [dict(r) for r in rows[("forget", "train")]]
    bad[1]["id"] = "f1-17"
    _write_jsonl(tmp_path / "train" / "forget.jsonl", bad)
    with pytest.raises(InvalidRecordError, match=r"train/forget\.jsonl record 1: id 'f1-17' ends in neither"):
        load_unlearning({"name": "semeval25", "path": str(tmp_path)})
    skipped = load_unlearning({"name": "semeval25", "path": str(tmp_path), "on_invalid": "skip"})
    assert len(skipped.splits["forget"]) == 2 and len(skipped.info["skipped"]) == 1
    bad[1] = {"id": "f1-qa2", "input": "Q?", "task": "Task1"}
    _write_jsonl(tmp_path / "train" / "forget.jsonl", bad)
    with pytest.raises(InvalidRecordError, match=r"record 1: missing field 'output'"):
        load_unlearning({"name": "semeval25", "path": str(tmp_path)})
    bad[1] = {"id": "f1-sc1", "input": "Q?", "output": "A", "task": "Task1"}
    _write_jsonl(tmp_path / "train" / "forget.jsonl", bad)
    with pytest.raises(InvalidRecordError, match="duplicate id 'f1-sc1'"):
        load_unlearning({"name": "semeval25", "path": str(tmp_path)})
    bad[1] = {"id": "f1-qa2", "input": "Q?", "output": "A", "task": "Task1", "split": "retain"}
    _write_jsonl(tmp_path / "train" / "forget.jsonl", bad)
    with pytest.raises(InvalidRecordError, match="field 'split' is 'retain'"):
        load_unlearning({"name": "semeval25", "path": str(tmp_path)})

    _semeval_copy(tmp_path)
    _write_jsonl(tmp_path / "mmlu.jsonl", [{**MMLU_ROWS[0], "answer": 7}])
    with pytest.raises(InvalidRecordError, match=r"mmlu\.jsonl record 0: field 'answer' must be an option"):
        load_unlearning(
            {"name": "semeval25", "path": str(tmp_path), "mmlu_path": str(tmp_path / "mmlu.jsonl")}
        )
    with pytest.raises(DatasetError, match="lacks member.jsonl"):
        load_unlearning({"name": "semeval25", "path": str(tmp_path), "mia_path": str(tmp_path / "train")})


def test_semeval_mmlu_hub_offline_is_skipped_with_its_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    _semeval_copy(tmp_path / "copy")
    data = load_unlearning({"name": "semeval25", "path": str(tmp_path / "copy"), "mmlu_path": "cais/mmlu"})
    assert "mmlu" not in data.splits
    assert data.info["skipped_metrics"]["mmlu"].startswith("could not fetch cais/mmlu from the hub (")


def test_dataset_semeval25_composes(tmp_path):
    _semeval_copy(tmp_path)
    cfg = compose_config("task=unlearn", "dataset=semeval25", f"dataset.path={tmp_path}")
    assert cfg.dataset.name == "semeval25" and cfg.dataset.fold == "train" and cfg.dataset.mmlu_path is None
    data = load_unlearning(OmegaConf.to_container(cfg.dataset, resolve=True))
    assert len(data.splits["forget"]) == 3 and len(data.splits["retain"]) == 2
    # the same pipeline's summary reads the loader's item ids: ROUGE-L / EM per subtask
    records = [
        {"split": s, "item_id": i.item_id, "post_rouge_l": 1.0, "post_exact_match": 0.0}
        for s in ("forget", "retain")
        for i in data.splits[s]
    ]
    s = summarize_unlearning(records, data.roles, "post_")
    assert s["forget/Task1/rouge_l"] == 1.0 and s["retain/Task2/exact_match"] == 0.0
    assert s["task_aggregate"] == 0.0  # forget ROUGE-L 1 inverted -> 0
