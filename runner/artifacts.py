"""The store of trained artifacts (MEND hypernetworks, SERAC classifiers and counterfactual models).

One folder per artifact under ``<cache_dir>/artifacts/<model>/<name>-<key>/``, where the key hashes
everything the trained weights depend on: the model id and revision, the artifact's name and recipe
(the editor's training settings), and the sha256 of its training file (:class:`editors.base.Artifact`).
A folder is complete once its ``artifact.json`` (the report of its training) exists; it is written
atomically, so an interrupted training leaves only ``<name>-<key>.partial/``, the checkpoint folder
the next attempt resumes from. Missing and not allowed to train (``train_artifacts=false``): one
line with the command that makes it.

A report's ``validation`` is the curve of its training: a list of points ``{"step": s, <metric>:
value, ...}`` (SERAC's), or ``[step, loss]`` pairs (MEND's, read as ``{"step": s, "loss": v}``).
:func:`log_artifact_reports` logs it to the run's tracker; editors have none of their own.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from editors.base import Artifact
from runner.tokenizers import atomic_dir, content_hash
from runner.tracking import NullTracker

log = logging.getLogger(__name__)

REPORT = "artifact.json"


class ArtifactMissing(RuntimeError):
    """An artifact is not in the store and training it was not allowed."""


class ArtifactStore:
    def __init__(
        self, root: Path, model_id: str, revision: str, allow_train: bool, command: str = ""
    ) -> None:
        self.root = Path(root)
        self.model_id, self.revision = model_id, revision
        self.allow_train = allow_train
        self.command = command  # how a user makes a missing artifact (named in the error)
        self.trained: set[Path] = set()  # the folders trained by this store (the others were loaded)

    def key(self, artifact: Artifact, data_sha256: str | None) -> str:
        return content_hash(
            {
                "model": f"{self.model_id}@{self.revision}",
                "name": artifact.name,
                "recipe": json.loads(artifact.recipe),
                "data": None if artifact.data is None else json.loads(artifact.data),
                "data_sha256": data_sha256,
            }
        )

    def folder(self, artifact: Artifact, data_sha256: str | None) -> Path:
        model = "".join(c if c.isalnum() or c in "-_." else "_" for c in self.model_id)[-60:]
        return self.root / model / f"{artifact.name}-{self.key(artifact, data_sha256)}"

    def get(
        self,
        artifact: Artifact,
        data_sha256: str | None,
        train: Callable[[Path, Path], dict[str, Any]],
    ) -> Path:
        """The artifact's folder: loaded when complete, else trained by ``train(folder, checkpoints)``."""
        path = self.folder(artifact, data_sha256)
        if (path / REPORT).exists():
            log.info("artifact %s loaded from %s", artifact.name, path)
            return path
        if not self.allow_train:
            raise ArtifactMissing(
                f"artifact {artifact.name!r} for {self.model_id} is not in {self.root} "
                f"and train_artifacts=false; make it with: {self.command or 'python run.py task=prepare ...'}"
            )
        checkpoints = path.with_name(path.name + ".partial")
        checkpoints.mkdir(parents=True, exist_ok=True)
        log.info("training artifact %s (checkpoints in %s)", artifact.name, checkpoints)
        start = time.perf_counter()
        with atomic_dir(path) as tmp:
            report = dict(train(tmp, checkpoints))
            report.setdefault("seconds", round(time.perf_counter() - start, 1))
            report["artifact"] = {"name": artifact.name, "recipe": json.loads(artifact.recipe)}
            report["data_sha256"] = data_sha256
            (tmp / REPORT).write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
        shutil.rmtree(checkpoints, ignore_errors=True)
        self.trained.add(path)
        log.info("artifact %s trained in %.1fs, stored in %s", artifact.name, report["seconds"], path)
        return path


def validation_curve(report: dict[str, Any], name: str = "artifact") -> list[dict[str, float]]:
    """The report's validation curve as points ``{"step": s, <metric>: value, ...}`` (none when the
    report has no ``validation``); a ``[step, loss]`` pair reads as ``{"step": step, "loss": loss}``."""
    points = []
    for point in report.get("validation") or []:
        if isinstance(point, (list, tuple)) and len(point) == 2:
            point = {"step": point[0], "loss": point[1]}
        if not isinstance(point, dict) or not isinstance(point.get("step"), int):
            raise ValueError(f"artifact {name!r}: validation point {point!r} has no integer step")
        points.append(point)
    return points


def log_artifact_reports(
    tracker: NullTracker, folders: dict[str, Path], trained: Collection[Path] = ()
) -> int:
    """Log every artifact's validation curve to ``tracker`` as ``artifact/<name>/<metric>`` against
    its own x-axis ``artifact/<name>/step`` (its training step), and its ``loaded`` flag (false when
    this run trained it: a folder in ``trained``), steps and seconds to the summary. A loaded
    artifact's curve is logged too: it is the training of the weights this run uses. Returns the
    number of points logged."""
    logged = 0
    for name, folder in folders.items():
        report = json.loads((Path(folder) / REPORT).read_text(encoding="utf-8"))
        prefix = f"artifact/{name}"
        for point in validation_curve(report, name):
            metrics = {f"{prefix}/{k}": v for k, v in point.items() if k != "step"}
            tracker.log(metrics, step=point["step"], axis=f"{prefix}/step")
            logged += 1
        summary = {f"{prefix}/loaded": Path(folder) not in trained, f"{prefix}/folder": str(folder)}
        summary |= {f"{prefix}/{k}": report[k] for k in ("steps", "seconds") if k in report}
        tracker.summary(summary)
    return logged
