"""The recipes of unlearning as editing: prompts, refusal targets, query merging."""

from __future__ import annotations

import copy
import json

import pytest

from evaluation.cases import QAItem
from runner.unlearning_recipes import (
    SelfImproveConfig,
    UnlearnConfig,
    format_question,
    idk_target,
    merge_requests,
    self_improve_prompt,
    unlearning_targets,
)

T = "Question: {question}\nAnswer:"


def fmt(question: str) -> str:
    return format_question(question, T)


def items(n: int, subject: str | None = "Basil Mahfouz") -> list[QAItem]:
    return [
        QAItem(
            f"tofu/forget01/{i}",
            f"What did {subject or 'the author'} write in year {i}?",
            f"Book {i}.",
            subject,
        )
        for i in range(n)
    ]


REFUSALS = ["I don't know.", "I'm not sure.", "No idea, sorry."]


def test_fixed_and_idk_targets_are_deterministic_per_item():
    data = items(6)
    prompts = [fmt(i.question) for i in data]
    fixed, counts = unlearning_targets(
        data, prompts, UnlearnConfig(target="fixed"), refusals=REFUSALS, seed=0
    )
    assert fixed == ["I don't know."] * 6 and counts == {"fixed": 6}
    a, _ = unlearning_targets(data, prompts, UnlearnConfig(target="idk"), refusals=REFUSALS, seed=0)
    b, _ = unlearning_targets(
        data[::-1], prompts[::-1], UnlearnConfig(target="idk"), refusals=REFUSALS, seed=0
    )
    assert a == b[::-1]  # an item's draw depends on its id, not on its position
    assert set(a) <= set(REFUSALS) and len(set(a)) > 1
    assert idk_target(REFUSALS, 1, data[0].item_id) in REFUSALS


def test_self_improvement_keeps_refusals_and_falls_back_otherwise(tmp_path):
    data = items(4)
    prompts = [fmt(i.question) for i in data]
    seen: list[str] = []

    def generate(texts, n):
        seen.extend(texts)
        # item 2 answers instead of refusing; every continuation runs on past a line break
        return [
            (
                " Book 2 was a novel."
                if "year 2" in t.rsplit("Question:", 1)[-1]
                else " I'm sorry, I don't know that."
            )
            + "\nQuestion: next"
            for t in texts
        ]

    cfg = UnlearnConfig(target="self_improve")
    cache = tmp_path / "targets.json"
    targets, counts = unlearning_targets(
        data,
        prompts,
        cfg,
        refusals=REFUSALS,
        seed=0,
        generate=generate,
        format_q=fmt,
        is_refusal=lambda t: "don't know" in t.lower(),
        cache=cache,
    )
    assert counts == {"self_improve": 3, "fallback_idk": 1}
    assert targets[0] == "I'm sorry, I don't know that."  # cut at the first line break
    assert targets[2] == idk_target(REFUSALS, 0, data[2].item_id)  # filtered out: the idk draw
    # the few-shot prompt: every demonstration formatted like the item, then the item's prompt
    first = seen[0]
    assert first.endswith(prompts[0]) and first.count("Question:") == len(cfg.self_improve.demonstrations) + 1
    assert cfg.self_improve.demonstrations[0][1] in first
    # cached per item: a second call generates nothing
    seen.clear()
    again, _ = unlearning_targets(
        data,
        prompts,
        cfg,
        refusals=REFUSALS,
        seed=0,
        generate=generate,
        format_q=fmt,
        is_refusal=lambda t: "don't know" in t.lower(),
        cache=cache,
    )
    assert again == targets and not seen and len(json.loads(cache.read_text())) == 4


def test_self_improvement_needs_a_generator():
    with pytest.raises(ValueError, match="self_improve"):
        unlearning_targets(items(1), ["p"], UnlearnConfig(target="self_improve"), refusals=REFUSALS, seed=0)


def test_self_improve_prompt_layout():
    settings = SelfImproveConfig(demonstrations=[["Q1?", "I don't know."]], separator="\n\n")
    assert (
        self_improve_prompt(fmt("Q2?"), settings, fmt)
        == "Question: Q1?\nAnswer: I don't know.\n\nQuestion: Q2?\nAnswer:"
    )


def test_one_request_per_item_at_the_subject():
    data = items(3)
    requests = merge_requests(data, ["R0", "R1", "R2"], UnlearnConfig(), fmt)
    assert [r.case_id for r in requests] == [i.item_id for i in data]
    r = requests[1]
    assert r.subject == "Basil Mahfouz" and r.text == fmt(data[1].question)
    assert r.prompt.count("{}") == 1 and r.target_new == "R1" and r.target_true == "Book 1."


def test_no_subject_edits_the_last_prompt_token():
    data = items(2, subject=None)
    requests = merge_requests(data, ["R", "R"], UnlearnConfig(), fmt)
    assert all(r.subject is None and r.prompt == fmt(i.question) for r, i in zip(requests, data))
    off = merge_requests(items(2), ["R", "R"], UnlearnConfig(use_subject=False), fmt)
    assert all(r.subject is None for r in off)


def test_query_merging_builds_k_question_requests():
    data = items(10)
    targets = [f"R{i}" for i in range(10)]
    requests = merge_requests(data, targets, UnlearnConfig(merge_queries=4), fmt)
    assert len(requests) == 3  # 4 + 4 + 2
    first = requests[0]
    assert first.text == fmt(" ".join(i.question for i in data[:4]))
    assert first.target_new == "R0" and first.target_true == "Book 0."
    assert first.case_id == "tofu/forget01/0+3" and requests[2].case_id == "tofu/forget01/8+1"
    # the subject's LAST occurrence is the edited one: the key sees all K questions
    assert first.prompt.rfind("{}") > first.prompt.rfind("year 2")
    mixed = [*items(1, "A B"), *items(1, "C D")]
    assert merge_requests(mixed, ["R", "R"], UnlearnConfig(merge_queries=2), fmt)[0].subject is None


def test_chat_template_prompts(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)  # the session fixture is shared: never mutate it
    tok.chat_template = "{{ bos_token }}{% for m in messages %}<u>{{ m['content'] }}</u>{% endfor %}<a>"
    # the template's BOS is dropped: the scorer and generate add it themselves
    assert format_question("Who?", T, tok, chat=True) == "<u>Who?</u><a>"
    tok.chat_template = None
    with pytest.raises(ValueError, match="chat template"):
        format_question("Who?", T, tok, chat=True)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"target": "nope"}, "unlearn.target"),
        ({"merge_queries": 0}, "merge_queries"),
        ({"question_template": "Q:"}, "question_template"),
        ({"reference": "full"}, "unlearn.reference"),
        ({"truth_ratio_mean": "median"}, "truth_ratio_mean"),
        ({"toy_refusals": -1}, "toy_refusals"),
    ],
)
def test_config_errors_are_one_line(kwargs, match):
    with pytest.raises(ValueError, match=match):
        UnlearnConfig(**kwargs)


def test_toy_refusals_decline_only_questions_no_split_holds():
    from evaluation.unlearning import is_refusal
    from runner.unlearn import Prompter, _toy_refusals
    from runner.unlearning_data import load_unlearning
    from runner.unlearning_recipes import refusal_keywords

    data = load_unlearning({"name": "tofu", "forget_split": "forget05", "retain_authors": 10})
    assert len(data.train["unseen"]) == (190 - 10) * 20  # the left-out retain authors
    prompter = Prompter("Question: {question}\nAnswer:", None, False)
    declined = _toy_refusals(data, prompter, UnlearnConfig(toy_refusals=40), seed=0)
    keywords = refusal_keywords(UnlearnConfig(), data.refusals)
    assert len(declined) == 40 and all(is_refusal(f.answer, keywords) for f in declined)
    asked = {prompter(item.question) for items in data.splits.values() for item in items}
    asked |= {
        prompter(item.question) for items in (data.train["full"], data.train["retain"]) for item in items
    }
    assert not asked & {f.prompt for f in declined}
    assert _toy_refusals(data, prompter, UnlearnConfig(toy_refusals=0), seed=0) == []
    assert declined == _toy_refusals(data, prompter, UnlearnConfig(toy_refusals=40), seed=0)
    with pytest.raises(ValueError, match="toy_refusals=5000: dataset tofu has 3600 questions no toy learns"):
        _toy_refusals(data, prompter, UnlearnConfig(toy_refusals=5000), seed=0)


def test_the_datasets_refusals_count_as_refusals():
    from evaluation.unlearning import is_refusal
    from runner.unlearning_recipes import refusal_keywords

    refusals = ["I'm drawing a blank on that one.", "I don't know."]
    with_dataset = refusal_keywords(UnlearnConfig(), refusals)
    assert is_refusal("Sure. I'm drawing a blank on that one!", with_dataset)
    assert not is_refusal(
        "I'm drawing a blank on that one.",
        refusal_keywords(UnlearnConfig(refusals_are_keywords=False), refusals),
    )
    assert not is_refusal("He was born in Paris.", with_dataset)
    assert (
        len(with_dataset) == len(refusal_keywords(UnlearnConfig())) + 1
    )  # "I don't know" is already a keyword


def test_toy_refusals_of_a_capped_toy_come_from_the_items_it_does_not_learn():
    from runner.unlearn import Prompter, _toy_refusals
    from runner.unlearning_data import load_unlearning

    data = load_unlearning({"name": "tofu", "forget_split": "forget01", "retain_authors": None, "size": 16})
    assert "unseen" not in data.train  # every retain author kept
    prompter = Prompter("Question: {question}\nAnswer:", None, False)
    with pytest.raises(ValueError, match="0 questions no toy learns"):
        _toy_refusals(data, prompter, UnlearnConfig(toy_refusals=8), seed=0)
    declined = _toy_refusals(data, prompter, UnlearnConfig(toy_refusals=8), seed=0, capped=True)
    asked = {prompter(i.question) for items in data.splits.values() for i in items}
    assert len(declined) == 8 and not asked & {f.prompt for f in declined}


def test_toy_facts_carry_the_author_with_toy_subjects_and_a_fixed_refusal_with_toy_refusal():
    from runner.unlearn import Prompter, _toy_facts, _toy_refusals
    from runner.unlearning_data import load_unlearning

    data = load_unlearning({"name": "tofu", "forget_split": "forget01", "retain_authors": 2})
    prompter = Prompter("Question: {question}\nAnswer:", None, False)
    items = list(data.splits["forget"])
    plain = _toy_facts(items, prompter)
    named = _toy_facts(items, prompter, subjects=True)
    assert [f.prompt for f in plain] == [f.prompt for f in named] and not any(f.subject for f in plain)
    with_subject = [f for f in named if f.subject]
    assert with_subject and all(f.subject in f.prompt for f in with_subject)
    assert {f.subject for f in with_subject} <= {i.subject for i in items}
    fixed = _toy_refusals(data, prompter, UnlearnConfig(toy_refusals=6, toy_refusal="fixed"), seed=0)
    assert [f.answer for f in fixed] == ["I don't know."] * 6
    drawn = _toy_refusals(data, prompter, UnlearnConfig(toy_refusals=6), seed=0)
    assert [f.prompt for f in drawn] == [f.prompt for f in fixed] and len({f.answer for f in drawn}) > 1
