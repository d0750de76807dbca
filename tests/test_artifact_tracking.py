"""An artifact's validation curve reaches the run's tracker: every point under
``artifact/<name>/<metric>`` at its training step on its own x-axis, with a ``loaded`` flag; in
wandb, next to the edit batches' series without either being dropped; and through task=prepare."""

from __future__ import annotations

import json
import struct
import types
from pathlib import Path
from typing import Any

import pytest

from editors.base import Artifact, recipe_json
from runner.artifacts import REPORT, ArtifactStore, log_artifact_reports, validation_curve


class Recorder:
    """A tracker that records its calls."""

    def __init__(self) -> None:
        self.logged: list[tuple[dict[str, Any], int | None, str]] = []
        self.summaries: dict[str, Any] = {}
        self.finished: bool | None = None

    def log(self, metrics: dict[str, Any], step: int | None = None, axis: str = "step") -> None:
        self.logged.append((dict(metrics), step, axis))

    def summary(self, metrics: dict[str, Any]) -> None:
        self.summaries |= metrics

    def finish(self, failed: bool = False) -> None:
        self.finished = failed


SERAC_CURVE = [
    {"step": 0, "total": 3.0, "edit_nll": 2.0, "loc": 1.0},
    {"step": 20, "total": 2.0, "edit_nll": 1.5, "loc": 0.5},
]


def _folder(tmp_path: Path, name: str, report: dict) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / REPORT).write_text(json.dumps(report), encoding="utf-8")
    return folder


def test_every_point_of_every_curve_is_logged_at_its_step_on_the_artifacts_axis(tmp_path):
    serac = _folder(tmp_path, "serac-x", {"steps": 20, "seconds": 1.5, "validation": SERAC_CURVE})
    mend = _folder(tmp_path, "mend-y", {"steps": 40, "validation": [[0, 4.0], [20, 3.0], [40, 2.5]]})
    tracker = Recorder()
    n = log_artifact_reports(tracker, {"serac": serac, "mend": mend}, trained={mend})
    assert n == 5
    assert tracker.logged == [
        ({"artifact/serac/total": 3.0, "artifact/serac/edit_nll": 2.0, "artifact/serac/loc": 1.0}, 0, "artifact/serac/step"),
        ({"artifact/serac/total": 2.0, "artifact/serac/edit_nll": 1.5, "artifact/serac/loc": 0.5}, 20, "artifact/serac/step"),
        ({"artifact/mend/loss": 4.0}, 0, "artifact/mend/step"),
        ({"artifact/mend/loss": 3.0}, 20, "artifact/mend/step"),
        ({"artifact/mend/loss": 2.5}, 40, "artifact/mend/step"),
    ]  # fmt: skip
    assert tracker.summaries["artifact/serac/loaded"] is True  # not trained by this run
    assert tracker.summaries["artifact/mend/loaded"] is False
    assert (
        tracker.summaries["artifact/serac/steps"] == 20 and tracker.summaries["artifact/serac/seconds"] == 1.5
    )
    assert tracker.summaries["artifact/mend/folder"] == str(mend)


def test_a_report_without_a_curve_logs_only_its_summary_and_a_bad_point_is_named(tmp_path):
    tracker = Recorder()
    assert log_artifact_reports(tracker, {"plain": _folder(tmp_path, "plain", {"steps": 3})}) == 0
    assert tracker.logged == [] and tracker.summaries["artifact/plain/steps"] == 3
    with pytest.raises(ValueError, match=r"artifact 'bad': validation point .* no integer step"):
        validation_curve({"validation": [{"loss": 1.0}]}, "bad")


def test_the_store_knows_which_artifacts_it_trained_and_which_it_loaded(tmp_path):
    def train(folder: Path, checkpoints: Path) -> dict:
        return {"steps": 20, "validation": SERAC_CURVE}

    artifact = Artifact("serac", recipe_json({"lr": 1e-4}))
    first = ArtifactStore(tmp_path, "toy", "r", allow_train=True)
    folder = first.get(artifact, None, train)
    again = ArtifactStore(tmp_path, "toy", "r", allow_train=True)
    assert again.get(artifact, None, train) == folder
    assert first.trained == {folder} and again.trained == set()
    tracker = Recorder()
    log_artifact_reports(tracker, {"serac": folder}, again.trained)
    assert tracker.summaries["artifact/serac/loaded"] is True
    assert [step for _, step, _ in tracker.logged] == [0, 20]


def _wandb_history(run_dir: Path) -> list[dict[str, str]]:
    """The history rows of an offline run's ``.wandb`` file (wandb's record log: a 7-byte header,
    then 32 KiB blocks of chunks, each a 7-byte header crc32/length/type then protobuf bytes)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = next(run_dir.glob("wandb/offline-run-*/*.wandb")).read_bytes()
    assert data[:4] == b":W&B", "not a wandb record log"
    pos, chunk, rows, block = 7, b"", [], 32768
    while pos + 7 <= len(data):
        left = block - pos % block
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7]) if left >= 7 else (0, 0)
        if left < 7 or (length == 0 and kind == 0):  # block padding
            pos += left
            continue
        chunk, pos = chunk + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a full record or its last chunk
            record = pb.Record()
            record.ParseFromString(chunk)
            chunk = b""
            if record.WhichOneof("record_type") == "history":
                items = {i.key or "/".join(i.nested_key): i.value_json for i in record.history.item}
                rows.append({k: v for k, v in items.items() if not k.startswith("_")})
    return rows


def test_wandb_keeps_the_curve_and_the_edit_batches_though_both_start_at_step_0(tmp_path):
    wandb = pytest.importorskip("wandb")
    from runner.tracking import WandbTracker

    cfg = types.SimpleNamespace(project="test", entity=None, mode="offline", group=None, tags=[])
    tracker = WandbTracker(cfg, {}, tmp_path, "curve", None)
    folder = _folder(tmp_path, "mend-z", {"validation": [[0, 4.0], [20, 3.0], [40, 2.5]]})
    log_artifact_reports(tracker, {"mend": folder})
    tracker.log({"batch/efficacy": 50.0}, step=0)  # as the edit loop does, after the curve
    tracker.log({"batch/efficacy": 75.0}, step=1)
    with pytest.raises(ValueError, match="'batch/efficacy' is logged against 'step'"):
        tracker.log({"batch/efficacy": 1.0}, step=2, axis="other")
    tracker.finish()
    wandb.teardown()  # waits for wandb's service to write the run's file out
    rows = _wandb_history(tmp_path)
    curve = [(r["artifact/mend/step"], r["artifact/mend/loss"]) for r in rows if "artifact/mend/loss" in r]
    batches = [(r["step"], r["batch/efficacy"]) for r in rows if "batch/efficacy" in r]
    assert curve == [("0", "4"), ("20", "3"), ("40", "2.5")]
    assert batches == [("0", "50"), ("1", "75")]  # a shared wandb step would have dropped these


def test_task_prepare_logs_the_trained_hypernetworks_curve_to_the_tracker(tmp_path, monkeypatch):
    import runner.pipeline
    from runner import run
    from tests.conftest import compose_config

    trackers: list[Recorder] = []

    def make(cfg, config, output_dir, name, group=None):
        trackers.append(Recorder())
        return trackers[-1]

    monkeypatch.setattr(runner.pipeline, "make_tracker", make)

    def cfg():
        return compose_config(
            "task=prepare",
            "editor=mend",
            "model=tiny-gpt2",
            "+size=tiny",
            "threads=1",
            "progress=false",
            "stats.n_samples=150",
            "editor.train_data.name=counterfact_train",
            "editor.train_data.size=12",
            "editor.max_iters=20",
            "editor.val_every=10",
            "editor.accumulate=2",
            "editor.rank=8",
            f"paths.cache_dir={tmp_path / 'cache'}",
            f"paths.output_dir={tmp_path / 'out'}",
        )

    folder = Path(run(cfg())["artifacts"]["mend"])
    report = json.loads((folder / REPORT).read_text())
    (tracker,) = trackers
    assert [(step, axis) for _, step, axis in tracker.logged] == [
        (s, "artifact/mend/step") for s, _ in report["validation"]
    ] and len(tracker.logged) == 3
    assert [m["artifact/mend/loss"] for m, _, _ in tracker.logged] == [v for _, v in report["validation"]]
    assert tracker.summaries["artifact/mend/loaded"] is False and tracker.finished is False
    run(cfg())  # loaded from the store this time: the same curve, flagged
    assert trackers[1].logged == tracker.logged and trackers[1].summaries["artifact/mend/loaded"] is True
