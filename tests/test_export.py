"""Edited models saved and loaded back (runner/export.py): weights and adapters, identical scores."""

from __future__ import annotations

import json

import pytest
import torch

from editors.delta import WeightDelta
from editors.patch import Adapter, ModulePatch
from evaluation.metrics import score_cases
from runner import run
from runner.datasets import load_cases
from runner.export import ADAPTERS_JSON, load_edited, save_edited
from runner.models import load_model
from tests.conftest import compose_config


class Offset(Adapter):
    """A test adapter: the wrapped module's output plus a learnt vector."""

    def __init__(self, inner: torch.nn.Module, width: int) -> None:
        super().__init__(inner)
        self.offset = torch.nn.Parameter(torch.zeros(width))

    def forward(self, x):
        return self.inner(x) + self.offset

    def adapter_config(self) -> dict:
        return {"width": int(self.offset.numel())}

    @classmethod
    def from_config(cls, inner, config):
        return cls(inner, config["width"])


def _cfg(tmp_path, *overrides):
    return compose_config(
        "model=tiny-gpt2",
        "stats.n_samples=60",
        "threads=1",
        "progress=false",
        "logger=none",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"paths.output_dir={tmp_path / 'out'}",
        *overrides,
    )


def test_weights_and_adapters_round_trip_and_the_model_is_left_as_it_was(tmp_path):
    cfg = _cfg(tmp_path)
    cases = load_cases("counterfact", size=3).cases
    loaded = load_model(cfg.model, cases=cases, cache_dir=tmp_path / "cache", seed=0)
    model, tok = loaded.model, loaded.tokenizer
    name = "transformer.h.1.mlp.c_proj"
    weight = model.get_submodule(name).weight
    handle = WeightDelta({f"{name}.weight": 0.1 * torch.ones_like(weight)}).attach(model)
    adapter = Offset(model.get_submodule(name), weight.shape[1])
    with torch.no_grad():
        adapter.offset.normal_(0, 0.5)
    handle = handle.merge(ModulePatch({name: adapter}).attach(model))
    expected = score_cases(model, tok, cases, pack=False)
    folder = save_edited(model, tok, tmp_path / "edited")
    assert model.get_submodule(name) is adapter  # saving put the adapter back
    assert (
        json.loads((folder / ADAPTERS_JSON).read_text())["adapters"][0]["class"] == "tests.test_export.Offset"
    )
    again, again_tok = load_edited(folder)
    assert isinstance(again.get_submodule(name), Offset)
    assert score_cases(again, again_tok, cases, pack=False) == expected
    # a folder written before model-level routers were saved (no "routers" entry) loads the same
    index = json.loads((folder / ADAPTERS_JSON).read_text())
    assert index.pop("routers") == []
    (folder / ADAPTERS_JSON).write_text(json.dumps(index))
    older, _ = load_edited(folder)
    assert score_cases(older, again_tok, cases, pack=False) == expected
    handle.restore()
    assert score_cases(model, tok, cases) != expected  # the edit was real


def test_a_sequential_run_saves_a_model_that_scores_as_the_run_did(tmp_path):
    cfg = _cfg(
        tmp_path,
        "editor=memit",
        "editor.context_templates=[]",
        "dataset.size=4",
        "batch_size=2",
        "edit_mode=sequential",
        "eval.timing=at_end",
        "eval.generation.enabled=false",
        "save_model=true",
    )
    summary = run(cfg)
    folder = tmp_path / "out" / "edited_model"
    assert summary["timing"]["edited_model"] == str(folder)
    records = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    cases = load_cases("counterfact", size=4).cases
    # the hub-loading path takes the folder (model.hub_id=<folder>)
    hub = compose_config(
        "model=tiny-gpt2", "model.source=hub", f"model.hub_id={folder}", "paths.output_dir=/tmp/x"
    )
    loaded = load_model(hub.model, cases=cases, cache_dir=tmp_path / "cache", seed=0)
    scores = score_cases(loaded.model, loaded.tokenizer, cases)
    for record, score in zip(records, scores):
        for key in ("efficacy_magnitude", "generality_magnitude", "locality_magnitude"):
            assert record[f"post_{key}"] == pytest.approx(score[key], abs=1e-5), key


def test_save_model_in_batch_mode_is_refused_in_one_line(tmp_path):
    from runner.pipeline import ConfigError

    with pytest.raises(ConfigError, match="save_model=true needs edit_mode=sequential"):
        run(_cfg(tmp_path, "save_model=true"))
