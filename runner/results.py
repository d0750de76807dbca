"""Run outputs: results.jsonl (a line per case, flushed as cases finish; resume by case id) and
summary.json."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path


class ResultsStore:
    def __init__(self, output_dir: Path | str) -> None:
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "results.jsonl"
        self._drop_torn_tail()

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
