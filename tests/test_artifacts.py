"""The artifact store: trained once, then loaded by content; resumable; refused in one line when
training is not allowed; the runner hands an editor its training cases and the folder."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from editors.base import Artifact, EditorBase, recipe_json
from runner.artifacts import REPORT, ArtifactMissing, ArtifactStore
from runner.pipeline import prepare_artifacts


def _store(tmp_path: Path, allow: bool = True) -> ArtifactStore:
    return ArtifactStore(
        tmp_path / "artifacts", "toy", "abc123", allow, "python run.py task=prepare editor=x"
    )


def test_trained_once_then_loaded_and_keyed_by_recipe_and_data(tmp_path, caplog):
    calls = []

    def train(folder: Path, checkpoints: Path) -> dict:
        calls.append(folder)
        (folder / "weights.txt").write_text("w")
        return {"steps": 3}

    store = _store(tmp_path)
    a = Artifact("mend", recipe_json({"lr": 1e-4}))
    first = store.get(a, "sha-1", train)
    assert (first / "weights.txt").read_text() == "w" and len(calls) == 1
    report = json.loads((first / REPORT).read_text())
    assert report["steps"] == 3 and report["artifact"]["recipe"] == {"lr": 1e-4} and "seconds" in report
    with caplog.at_level(logging.INFO, logger="runner.artifacts"):
        assert store.get(a, "sha-1", train) == first
    assert len(calls) == 1 and "loaded from" in caplog.text
    assert store.get(Artifact("mend", recipe_json({"lr": 2e-4})), "sha-1", train) != first  # other recipe
    assert store.get(a, "sha-2", train) != first  # other training file
    other_model = ArtifactStore(tmp_path / "artifacts", "toy", "def456", True)
    assert other_model.folder(a, "sha-1") != first
    assert len(calls) == 3


def test_interrupted_training_leaves_its_checkpoints_for_the_next_attempt(tmp_path):
    store = _store(tmp_path)
    a = Artifact("mend", recipe_json({}))
    seen = []

    def crash(folder: Path, checkpoints: Path) -> dict:
        (checkpoints / "step_10.pt").write_text("10")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        store.get(a, None, crash)
    final = store.folder(a, None)
    assert not final.exists() and (final.with_name(final.name + ".partial") / "step_10.pt").exists()

    def resume(folder: Path, checkpoints: Path) -> dict:
        seen.extend(p.name for p in checkpoints.iterdir())
        return {}

    assert store.get(a, None, resume) == final and seen == ["step_10.pt"]
    assert not final.with_name(final.name + ".partial").exists()  # checkpoints go once it is complete


def test_missing_artifact_without_training_names_the_command(tmp_path):
    with pytest.raises(ArtifactMissing, match="task=prepare editor=x"):
        _store(tmp_path, allow=False).get(Artifact("serac", "{}"), None, lambda f, c: {})


class _Trains(EditorBase):
    def __init__(self):
        super().__init__(config=None, spec=None)
        self.got: list = []

    def requirements(self):
        data = recipe_json({"name": "zsre", "size": 4})
        return [Artifact("scope", recipe_json({"k": 1}), data)]

    def train_artifact(self, artifact, model, tokenizer, cases, folder, checkpoints):
        self.got.append([c.case_id for c in cases])
        (folder / "ok").write_text("1")
        return {"cases": len(cases)}


def test_the_runner_loads_an_artifacts_training_cases_and_trains_it_on_the_model(tmp_path):
    class Loaded:
        model, tokenizer, model_id, revision = object(), object(), "toy", "r"

    editor = _Trains()
    folders = prepare_artifacts(editor, Loaded(), _store(tmp_path), tmp_path / "data")
    assert (folders["scope"] / "ok").exists() and len(editor.got) == 1 and len(editor.got[0]) == 4
    report = json.loads((folders["scope"] / REPORT).read_text())
    assert report["n_train_cases"] == 4 and report["data_sha256"]
    again = prepare_artifacts(editor, Loaded(), _store(tmp_path), tmp_path / "data")
    assert again == folders and len(editor.got) == 1


def test_a_step_cap_reaches_the_editor_and_makes_another_artifact(tmp_path):
    class Loaded:
        model, tokenizer, model_id, revision = object(), object(), "toy", "r"

    class Capped(_Trains):
        def train_artifact(self, artifact, model, tokenizer, cases, folder, checkpoints):
            self.got.append(self.train_steps(1000))
            return {}

    editor = Capped()
    full = prepare_artifacts(editor, Loaded(), _store(tmp_path), tmp_path / "data")
    capped = prepare_artifacts(editor, Loaded(), _store(tmp_path), tmp_path / "data", max_steps=30)
    assert editor.got == [1000, 30] and capped["scope"] != full["scope"]
