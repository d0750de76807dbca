"""Run outputs: results.jsonl (a line per case, flushed as cases finish; resume by case id),
run_config.json (the resolved config of the run that wrote them) and summary.json.

**Resume rule.** A run folder whose results.jsonl holds records is resumed only by the same run:
the new resolved config must equal the stored ``run_config.json`` on every key except those in
:data:`NOT_SHAPING` (where files live, logging, progress, threads, and batch sizes that only trade
speed for memory). ``dataset.size`` may differ (the first N cases are the same cases; the summary
covers the current size's), except where a different size changes the done cases' results: with
``eval.timing=at_end`` (every case is scored after all edits) and for the locally trained ``toy``
model when its training cases change (``model.train.cases`` below either size). Note that in
batch mode a case from a partially filled last batch was edited together with fewer cases than a
run at the larger size would have used. Anything else raises :class:`ResumeMismatch`, one line
naming the keys (old → new), before the model is loaded. ``run_config.json`` is written with the
first records and never overwritten while records exist; a folder with records but no stored
config (written before this check existed) resumes with a warning.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

RUN_CONFIG = "run_config.json"

#: Config keys that do not change a run's results; a key covers everything under it. Every other
#: key shapes the results and must be equal for a resume (new keys are compared by default).
NOT_SHAPING = (
    "hydra",  # Hydra's own settings (run dir, launcher, sweeper)
    "paths",  # where the caches and the run folder are
    "logger",  # wandb or nothing
    "progress",
    "threads",
    "optimized_metric",  # which summary value run.py hands a sweeper
    "save_model",  # whether the edited model is also written out
    "tiny_batch_size",  # only feeds batch_size (+size=tiny), which is compared itself
    "cache_targets",  # reuse of target vectors computed by an identical earlier edit
    "train_artifacts",  # whether a missing artifact may be trained (the same one either way)
    "model.device",  # placement
    "model.device_map",
    "dataset.cache_dir",  # where downloads are kept
    "eval.batch_size",  # sequences per scorer forward pass
    "eval.generation.batch_size",  # prompts per generate call
    "eval.generation.keep_texts",  # whether the sampled texts are written, not what they score
    "eval.generation.download",  # fetching the reference files, not which are used
    "eval.generation.rome_data_dir",  # where those files are
    "stats.batch_tokens",  # tokens per forward pass (not in the statistics' cache key either)
    "stats.chunk_docs",  # checkpoint spacing
    "stats.allow_compute",
    "editor.read_batch_size",  # prompts per forward pass when reading keys and values
    "editor.target.batch_size",  # requests optimised together (not in the target cache key)
    "editor.target.reuse_prefix",  # a faster, equal computation of the same targets
)
#: May differ between the first run and a resume (see the module docstring).
SIZE_KEY = "dataset.size"


class ResumeMismatch(ValueError):
    """The run folder holds results of a run with a different config."""


def _ignored(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in NOT_SHAPING)


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as ``{"a.b.c": value}``; lists and empty mappings are values."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _json(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists, paths strings)."""
    return json.loads(json.dumps(value, default=str))


def _show(value: Any, missing: bool = False) -> str:
    if missing:
        return "(absent)"
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


_ABSENT = object()


def config_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``key: old → new`` for every result-shaping key that differs, ``_target_`` keys first."""
    before, after = flatten(_json(old)), flatten(_json(new))
    keys = sorted(
        (k for k in before.keys() | after.keys() if not _ignored(k) and k != SIZE_KEY),
        key=lambda k: (not k.endswith("_target_"), k),
    )
    diffs = []
    for key in keys:
        a, b = before.get(key, _ABSENT), after.get(key, _ABSENT)
        if a != b:
            diffs.append(f"{key}: {_show(a, a is _ABSENT)} → {_show(b, b is _ABSENT)}")
    size = _size_change(before, after)
    return diffs + ([size] if size else [])


def _size_change(before: dict[str, Any], after: dict[str, Any]) -> str | None:
    """A dataset.size change that alters the done cases' results, described; None if harmless."""
    old, new = before.get(SIZE_KEY), after.get(SIZE_KEY)
    if old == new:
        return None
    change = f"{SIZE_KEY}: {_show(old)} → {_show(new)}"
    if after.get("eval.timing") == "at_end":
        return f"{change} (with eval.timing=at_end every case is scored after all edits)"
    if after.get("model.source") == "toy":
        n = after.get("model.train.cases") or 0

        def trained_on(size: Any) -> Any:  # the toy trains on the first max(size, n) cases
            return None if size is None else max(int(size), int(n))

        if trained_on(old) != trained_on(new):
            return f"{change} (the toy model trains on the run's cases; model.train.cases ≥ both sizes shares one)"
    return None


def check_resume(output_dir: Path | str, config: Mapping[str, Any]) -> None:
    """Refuse, with :class:`ResumeMismatch`, to add results of ``config`` (the resolved run config)
    to a run folder whose results came from a run with different result-shaping settings."""
    store = Path(output_dir)
    if not ResultsStore.has_records(store / "results.jsonl"):
        return
    stored = store / RUN_CONFIG
    if not stored.exists():
        log.warning(
            "%s holds results but no %s (an older run): resuming without checking that its config "
            "matches this one",
            store,
            RUN_CONFIG,
        )
        return
    diffs = config_differences(json.loads(stored.read_text(encoding="utf-8")), config)
    if diffs:
        raise ResumeMismatch(
            f"{store} holds results of a different run (its config: {stored}); "
            f"{len(diffs)} setting(s) differ: {'; '.join(diffs[:6])}"
            + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "")
            + ". Use a new run folder (hydra.run.dir) or the first run's settings."
        )


class ResultsStore:
    def __init__(self, output_dir: Path | str, run_config: Mapping[str, Any] | None = None) -> None:
        """``run_config``: the resolved run config, written to run_config.json with the first
        records of a folder that holds none (a stale file without records is replaced)."""
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "results.jsonl"
        self._drop_torn_tail()
        self._run_config = None if run_config is None or self.has_records(self.path) else run_config

    @staticmethod
    def has_records(path: Path) -> bool:
        """Whether ``path`` (a results.jsonl) holds at least one complete record."""
        if not path.exists():
            return False
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                try:
                    json.loads(line)
                    return True
                except json.JSONDecodeError:
                    continue
        return False

    def _drop_torn_tail(self) -> None:
        """A run killed mid-write leaves a partial last line: cut it so appends start clean."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            self.path.write_bytes(data[: data.rfind(b"\n") + 1])

    def load(self) -> list[dict]:
        """Every complete line; a torn last line (a run killed mid-write) is ignored."""
        if not self.path.exists():
            return []
        records = []
        with open(self.path, encoding="utf-8") as handle:
            for line in handle:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return records

    def done_ids(self) -> set[str]:
        return {str(r["case_id"]) for r in self.load()}

    def append(self, records: Iterable[dict]) -> None:
        records = list(records)
        if records and self._run_config is not None:
            self.write_json(RUN_CONFIG, dict(self._run_config))
            self._run_config = None
        with open(self.path, "a", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record, default=float) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def write_json(self, name: str, payload: dict) -> Path:
        path = self.dir / name
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
        tmp.replace(path)
        return path
