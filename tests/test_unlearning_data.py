"""runner.unlearning_data: TOFU and RWKU from the bundled copies (runner/data/unlearning) and from a
folder in the original layout (built here from the bundled files, never from shared/)."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from evaluation.cases import QAItem, SplitRoles
from runner.datasets import DatasetError, InvalidRecordError
from runner.unlearning_data import (
    BUNDLED_UNLEARNING_DIR,
    UnlearningDatasetConfig,
    UnlearningSet,
    load_unlearning,
    tofu_author_names,
    tofu_subject,
)

TOFU_DIR = BUNDLED_UNLEARNING_DIR / "tofu"
RWKU_DIR = BUNDLED_UNLEARNING_DIR / "rwku"
# Per bundled target, in order 1_Stephen_King, 2_Confucius, 3_Bruce_Lee, 4_Warren_Buffett.
RWKU_COUNTS = {
    "forget_level1": (8, 17, 17, 20),
    "forget_level2": (10, 3, 19, 12),
    "forget_level3": (29, 28, 40, 40),
    "neighbor_level1": (30, 30, 30, 30),
    "neighbor_level2": (30, 22, 30, 24),
    "forget_mia": (55, 25, 50, 45),
    "retain_mia": (37, 39, 37, 38),
}


def _qa(item: QAItem) -> tuple[str, str]:
    return item.question, item.answer


@pytest.fixture(scope="module")
def tofu() -> dict[str, UnlearningSet]:
    return {
        fs: load_unlearning({"name": "tofu", "forget_split": fs})
        for fs in ("forget01", "forget05", "forget10")
    }


@pytest.fixture(scope="module")
def tofu_small() -> UnlearningSet:
    return load_unlearning({"name": "tofu", "forget_split": "forget05", "retain_authors": 2})


@pytest.fixture(scope="module")
def rwku() -> UnlearningSet:
    return load_unlearning({"name": "rwku"})


# ----------------------------------------------------------------------------------------------- TOFU


@pytest.mark.parametrize(("split", "n"), [("forget01", 40), ("forget05", 200), ("forget10", 400)])
def test_tofu_split_sizes(tofu, split, n):
    u = tofu[split]
    assert len(u.splits["forget"]) == n and len(u.splits["holdout"]) == n
    assert len(u.splits["retain"]) == 400  # retain_perturbed: the first 20 authors
    assert len(u.splits["real_authors"]) == 100 and len(u.splits["world_facts"]) == 117
    assert len(u.train["full"]) == 4000 and len(u.train["retain"]) == 4000 - n
    assert u.splits["forget"][0].item_id == f"tofu/{split}/0"
    assert u.splits["holdout"][0].item_id == f"tofu/holdout{split[-2:]}/0"
    assert u.info[f"n_{'forget'}"] == n and u.info["n_train_full"] == 4000
    # holdout is the prefix of holdout10; forgetXX the tail of forget10
    assert [_qa(i) for i in u.splits["holdout"]] == [_qa(i) for i in tofu["forget10"].splits["holdout"][:n]]
    assert [_qa(i) for i in u.splits["forget"]] == [_qa(i) for i in tofu["forget10"].splits["forget"][-n:]]


def test_tofu_retain_authors_and_train_sets(tofu_small):
    u = tofu_small
    assert len(u.splits["retain"]) == 40 and len(u.train["retain"]) == 40
    assert len(u.train["full"]) == 240 and u.info["retain_authors"] == 2
    full = {_qa(i) for i in u.train["full"]}
    forget = {_qa(i) for i in u.splits["forget"]}
    retain = {_qa(i) for i in u.splits["retain"]}
    assert forget | retain <= full
    assert not forget & retain
    assert not {i.question for i in u.train["retain"]} & {i.question for i in u.splits["forget"]}
    assert [_qa(i) for i in u.train["retain"]] == [_qa(i) for i in u.splits["retain"]]


def test_tofu_retain_authors_too_many():
    with pytest.raises(DatasetError, match="leaves 180 retain authors"):
        load_unlearning({"name": "tofu", "forget_split": "forget10", "retain_authors": 181})


def test_tofu_item_fields(tofu):
    u = tofu["forget05"]
    for item in u.splits["forget"] + u.splits["retain"]:
        assert len(item.perturbed_answers) == 5
        assert item.paraphrased_answer and item.paraphrased_question and item.text is None
    for split in ("real_authors", "world_facts"):
        for item in u.splits[split]:
            assert len(item.perturbed_answers) == 3 and item.answer not in item.perturbed_answers
            assert item.subject is None
    assert all(not i.perturbed_answers and i.paraphrased_answer is None for i in u.splits["holdout"])
    first = u.splits["real_authors"][0]
    assert (first.question, first.answer) == ("Who wrote the play 'Romeo and Juliet'?", "William Shakespeare")
    assert len(u.refusals) == 100 and u.refusals[0] == "I'm not certain about that."


def test_tofu_roles(tofu):
    roles = tofu["forget05"].roles
    assert isinstance(roles, SplitRoles)
    assert (roles.forget, roles.retain, roles.mia_member, roles.mia_nonmember) == (
        "forget",
        "retain",
        "forget",
        "holdout",
    )
    assert roles.utility == ("retain", "real_authors", "world_facts")
    assert roles.measures["forget"] == ("prob", "truth_ratio", "rouge_l", "refusal", "loss", "min_k")
    assert roles.measures["retain"] == ("prob", "truth_ratio", "rouge_l", "refusal")
    assert (
        roles.measures["real_authors"]
        == roles.measures["world_facts"]
        == (
            "prob_normalized",
            "truth_ratio",
            "rouge_l",
        )
    )
    assert roles.measures["holdout"] == ("loss", "min_k")
    no_holdout = load_unlearning({"name": "tofu", "holdout": False, "retain_authors": 1})
    assert "holdout" not in no_holdout.splits and no_holdout.roles.mia_nonmember is None
    assert "holdout" not in no_holdout.roles.measures


def test_tofu_subjects(tofu):
    u = tofu["forget10"]
    for split, floor in (("forget", 0.9), ("retain", 0.9), ("holdout", 0.9)):
        items = u.splits[split]
        named = [i for i in items if i.subject is not None]
        assert len(named) >= floor * len(items), (split, len(named))
        assert all(i.subject in i.question for i in named)
    everything = u.train["full"]
    assert sum(i.subject is not None for i in everything) >= 3700  # 3,759 of 4,000 when written
    assert u.info["authors_named"] == 199  # one author (records 1760-1779) is only "the author"
    forget = u.splits["forget"]
    assert forget[0].subject is None  # "... the author born in Taipei ...": the name is only in the answer
    assert {i.subject for i in forget[:20] if i.subject} == {"Hsiao Yun-Hwa"}
    assert {i.subject for i in tofu["forget05"].splits["forget"][:20] if i.subject} == {"Hina Ameen"}


def test_tofu_author_name_rule():
    def block(name: str | None, n: int = 20) -> list[dict]:
        who = name or "the author"
        recs = [{"question": f"Where was {who} born?", "answer": f"{who} was born in New York City."}]
        recs += [
            {"question": f"What did {who}'s father do?", "answer": f"He was a literary agent in Lyon{k}."}
            for k in range(n - 1)
        ]
        return recs

    names = tofu_author_names(block("Elliot Patrick Benson") + block(None) + block("Rosa-María de la Braga"))
    assert names[0][0] == "Elliot Patrick Benson"
    assert names[1] == ()  # no run of capitalised words in half the block: no name
    assert names[2][0] == "Rosa-María de la Braga"
    assert tofu_subject("Is Elliot Patrick Benson's work known?", names[0]) == "Elliot Patrick Benson"
    assert tofu_subject("Is Elliot Patrick known?", names[0]) == "Elliot Patrick"
    assert tofu_subject("Is Elliot Patricks known?", ("Elliot Patrick",)) is None  # whole words only


def test_tofu_size_cap():
    u = load_unlearning({"name": "tofu", "size": 7, "retain_authors": 1})
    assert {k: len(v) for k, v in u.splits.items()} == dict.fromkeys(u.splits, 7)
    assert len(u.train["full"]) == 220  # train sets are not capped


# ----------------------------------------------------------------------------------------------- RWKU


def test_rwku_bundled_counts(rwku):
    assert rwku.info["targets"] == ["Stephen King", "Confucius", "Bruce Lee", "Warren Buffett"]
    for split, counts in RWKU_COUNTS.items():
        assert len(rwku.splits[split]) == sum(counts), split
    assert rwku.splits["forget"] == rwku.splits["forget_level1"] + rwku.splits["forget_level2"]
    assert rwku.train == {}
    assert len(rwku.refusals) == 100
    assert set(rwku.info["intro"]) == set(rwku.info["targets"])
    assert rwku.info["intro"]["Confucius"].startswith("Please forget Confucius.")

    two = load_unlearning({"name": "rwku", "n_targets": 2})
    for split, counts in RWKU_COUNTS.items():
        assert len(two.splits[split]) == sum(counts[:2]), split


def test_rwku_items_and_roles(rwku):
    level1 = rwku.splits["forget_level1"][0]
    assert level1.question.endswith("___") and level1.answer == "author" and level1.subject == "Stephen King"
    assert level1.meta == {"target": "Stephen King", "level": "1", "type": "cloze"}
    assert level1.item_id == "rwku/forget_level1/0"
    assert all(
        i.subject in {"Stephen King", "Confucius", "Bruce Lee", "Warren Buffett"}
        for i in rwku.splits["forget"]
    )
    neighbour = rwku.splits["neighbor_level2"][0]
    assert neighbour.subject == neighbour.meta["neighbor"] == "The Shawshank Redemption"
    for split in ("forget_mia", "retain_mia"):
        for item in rwku.splits[split]:
            assert item.question == "" and item.answer == "" and item.text and item.text.strip()
    assert rwku.splits["forget_mia"][0].subject == "Stephen King"
    assert rwku.splits["retain_mia"][0].subject is None  # texts about other people
    roles = rwku.roles
    assert (roles.forget, roles.retain, roles.mia_member, roles.mia_nonmember) == (
        "forget",
        "neighbor_level2",
        "forget_mia",
        "retain_mia",
    )
    assert roles.utility == ("neighbor_level1", "neighbor_level2")
    assert roles.measures["forget_level3"] == ("rouge_l", "refusal")
    assert roles.measures["neighbor_level1"] == ("rouge_l",)
    assert roles.measures["forget_mia"] == roles.measures["retain_mia"] == ("loss", "min_k")


def test_rwku_targets_by_name_and_folder():
    u = load_unlearning({"name": "rwku", "targets": ["bruce lee", "1_Stephen_King"]})
    assert u.info["targets"] == ["Bruce Lee", "Stephen King"]
    assert len(u.splits["forget_level1"]) == 17 + 8
    with pytest.raises(DatasetError, match="unknown RWKU target 'Bruce Leee'.*closest: 'Bruce Lee'") as exc:
        load_unlearning({"name": "rwku", "targets": ["Bruce Leee"]})
    assert "\n" not in str(exc.value)


# ------------------------------------------------------------------------------------ configs, errors


def test_config_forms_agree(tofu_small):
    d = {"name": "tofu", "forget_split": "forget05", "retain_authors": 2}
    for cfg in (UnlearningDatasetConfig(**d), OmegaConf.create(d)):
        u = load_unlearning(cfg)
        assert u.sha256 == tofu_small.sha256 and u.splits == tofu_small.splits
    rw = load_unlearning(OmegaConf.create({"name": "rwku", "targets": ["Confucius"]}))
    assert rw.info["targets"] == ["Confucius"]


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (
            {"name": "tofu", "forget_split": "forget20"},
            "forget_split must be one of forget01, forget05, forget10",
        ),
        ({"name": "semeval"}, "name must be one of tofu, rwku"),
        ({"name": "tofu", "retain_authors": 0}, "retain_authors must be a positive integer"),
        ({"name": "tofu", "size": True}, "size must be a positive integer"),
        ({"name": "rwku", "targets": ["Confucius"], "n_targets": 1}, "exclusive"),
        ({"name": "rwku", "targets": "Confucius"}, "targets must be a list"),
        ({"name": "tofu", "on_invalid": "warn"}, "on_invalid must be one of error, skip"),
        ({"name": "tofu", "forget": "x"}, "unknown field"),
        ({"forget_split": "forget05"}, "name is required"),
        ({"name": "tofu", "path": "/nonexistent/tofu"}, "no folder at /nonexistent/tofu"),
        ({"name": "rwku", "path": "/nonexistent/rwku"}, "no folder /nonexistent/rwku/Target"),
    ],
)
def test_one_line_config_errors(cfg, message):
    with pytest.raises(DatasetError, match=re.escape(message)) as exc:
        load_unlearning(cfg)
    assert "\n" not in str(exc.value)


# --------------------------------------------------------------------------- bundled files, sha256


def _sources_table() -> dict[str, str]:
    text = (BUNDLED_UNLEARNING_DIR / "SOURCES.md").read_text()
    return dict(re.findall(r"^\| `([^`]+)` \| [\d,]+ \| [\d,]+ \| ([0-9a-f]{64}) \|$", text, flags=re.M))


def test_bundled_files_match_sources_md():
    listed = _sources_table()
    on_disk = {
        str(p.relative_to(BUNDLED_UNLEARNING_DIR)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in BUNDLED_UNLEARNING_DIR.rglob("*")
        if p.is_file() and p.name != "SOURCES.md"
    }
    assert on_disk == listed
    assert listed["tofu/full.json"] == "da338c83d3899883a28b9a321673b95fe56968294580eff8aa7e4d59cf4839b4"
    assert sum(p.stat().st_size for p in (BUNDLED_UNLEARNING_DIR / "rwku").rglob("*.json")) < 1_500_000


def test_bundled_sha256_stable(tofu, rwku):
    listed = _sources_table()
    u = tofu["forget05"]
    assert u.info["files"] == {rel: listed[f"tofu/{rel}"] for rel in u.info["files"]}
    assert set(u.info["files"]) == {p.name for p in TOFU_DIR.iterdir()}  # all 7 bundled files
    assert rwku.info["files"] == {
        rel: listed[rel if rel.startswith("tofu/") else f"rwku/{rel}"] for rel in rwku.info["files"]
    }
    again = load_unlearning({"name": "tofu", "forget_split": "forget05"})
    assert again.sha256 == u.sha256 and again.splits == u.splits
    assert tofu["forget01"].sha256 == u.sha256  # the same files are read for every forget split
    assert load_unlearning({"name": "rwku"}).sha256 == rwku.sha256


# ---------------------------------------------------------------------------- path= (original layout)


@pytest.fixture()
def tofu_folder(tmp_path: Path) -> Path:
    """TOFU's original folder layout, built from the bundled files (forget05_perturbed and holdout05
    written as their slices, as the full copy has them)."""
    folder = tmp_path / "tofu"
    shutil.copytree(TOFU_DIR, folder)
    f10 = json.loads((TOFU_DIR / "forget10_perturbed.json").read_text())
    (folder / "forget05_perturbed.json").write_text(json.dumps(f10[200:]))
    h10 = json.loads((TOFU_DIR / "holdout10.json").read_text())
    (folder / "holdout05.json").write_text(json.dumps(h10[:200]))
    return folder


def test_tofu_path_layout(tofu_folder, tofu):
    u = load_unlearning({"name": "tofu", "path": str(tofu_folder), "forget_split": "forget05"})
    assert u.source == str(tofu_folder)
    assert "forget05_perturbed.json" in u.info["files"] and "holdout05.json" in u.info["files"]
    assert "forget10_perturbed.json" not in u.info["files"]
    assert u.splits == tofu["forget05"].splits and u.train == tofu["forget05"].train
    assert u.sha256 != tofu["forget05"].sha256


def test_tofu_missing_file(tofu_folder):
    (tofu_folder / "retain_perturbed.json").unlink()
    with pytest.raises(
        DatasetError, match=re.escape(f"missing file {tofu_folder / 'retain_perturbed.json'}")
    ):
        load_unlearning({"name": "tofu", "path": str(tofu_folder)})


def test_tofu_malformed_record(tofu_folder):
    file = tofu_folder / "forget05_perturbed.json"
    records = json.loads(file.read_text())
    records[3]["perturbed_answer"] = records[3]["perturbed_answer"][:2]
    del records[7]["answer"]
    file.write_text(json.dumps(records))
    with pytest.raises(
        InvalidRecordError, match=r"forget05_perturbed\.json record 3: field 'perturbed_answer'"
    ) as exc:
        load_unlearning({"name": "tofu", "path": str(tofu_folder)})
    assert "\n" not in str(exc.value) and exc.value.index == 3
    u = load_unlearning({"name": "tofu", "path": str(tofu_folder), "on_invalid": "skip"})
    assert len(u.splits["forget"]) == 198 and len(u.info["skipped"]) == 2
    assert "record 7: missing field 'answer'" in u.info["skipped"][1]


def test_tofu_misaligned_forget_file(tofu_folder):
    file = tofu_folder / "forget05_perturbed.json"
    records = json.loads(file.read_text())
    records[0], records[1] = records[1], records[0]
    file.write_text(json.dumps(records))
    with pytest.raises(
        InvalidRecordError, match=r"record 0: question/answer differ from the same record of full"
    ):
        load_unlearning({"name": "tofu", "path": str(tofu_folder)})


def test_tofu_not_json(tofu_folder):
    (tofu_folder / "world_facts_perturbed.json").write_text('{"question": "q", "answer": "a"}\n{oops\n')
    with pytest.raises(DatasetError, match=r"world_facts_perturbed\.json line 2: not JSON"):
        load_unlearning({"name": "tofu", "path": str(tofu_folder)})


def test_rwku_path_layout_with_odd_folder_names(tmp_path, rwku):
    target = tmp_path / "RWKU" / "Target"
    target.mkdir(parents=True)
    shutil.copytree(RWKU_DIR / "Target" / "2_Confucius", target / "2_Confucius")
    # RWKU's real folder names carry commas and dots; reuse a bundled target's files under one.
    shutil.copytree(RWKU_DIR / "Target" / "3_Bruce_Lee", target / "10_Prince_Harry,_Duke_of_Sussex")
    u = load_unlearning({"name": "rwku", "path": str(tmp_path / "RWKU")})
    assert u.info["folders"] == ["2_Confucius", "10_Prince_Harry,_Duke_of_Sussex"]  # by number, not text
    assert len(u.splits["forget_level1"]) == 17 + 17
    one = load_unlearning(
        {"name": "rwku", "path": str(tmp_path / "RWKU"), "targets": ["Prince Harry, Duke of Sussex"]}
    )
    assert one.info["folders"] == ["10_Prince_Harry,_Duke_of_Sussex"]
    assert one.info["targets"] == ["Bruce Lee"]  # the name inside intro.json wins (a copied target here)
    (target / "2_Confucius" / "neighbor_level1.json").unlink()
    with pytest.raises(DatasetError, match=r"missing file .*2_Confucius/neighbor_level1\.json"):
        load_unlearning({"name": "rwku", "path": str(tmp_path / "RWKU")})


def test_rwku_malformed_record(tmp_path):
    target = tmp_path / "Target"
    shutil.copytree(RWKU_DIR / "Target" / "2_Confucius", target / "2_Confucius")
    file = target / "2_Confucius" / "forget_mia.json"
    records = json.loads(file.read_text())
    records[4]["text"] = 5
    file.write_text(json.dumps(records, indent=4))
    with pytest.raises(
        InvalidRecordError, match=r"2_Confucius/forget_mia\.json record 4: field 'text' must be a string"
    ):
        load_unlearning({"name": "rwku", "path": str(tmp_path)})
