"""Editing a model loaded in bfloat16: target vectors are optimised in float32, the least-squares
solve runs in float64, and only the final weight change is cast to bfloat16."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from editors.core.covariance import SecondMoments, StatsConfig
from editors.core.targets import TargetConfig, optimize_targets
from editors.memit import Memit, MemitConfig
from editors.requests import EditRequest
from evaluation.cases import Probe
from evaluation.scoring import score_probes
from runner.models import ModelConfig, load_model
from tests.conftest import make_corpus
from tests.editing_fixtures import given

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"
REQUESTS = [
    EditRequest("0", "The mother tongue of {}", "Danielle Darrieux", "English", "French"),
    EditRequest("1", "The headquarters of {}", "Apple A5", "Tokyo", "Birmingham"),
    EditRequest("2", "The official religion of {}", "Edwin of Northumbria", "Islam", "Christianity"),
]


def _bf16_model(name: str, cache_dir: Path):
    raw = OmegaConf.load(CONF / f"{name}.yaml")
    raw.pop("defaults", None)
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), raw))
    cfg = replace(
        cfg,
        device="cpu",
        dtype="bfloat16",
        tokenizer=replace(cfg.tokenizer, vocab_size=400, max_corpus_chars=200_000),
    )
    loaded = load_model(cfg, cache_dir=cache_dir, seed=0)
    # A random network at the default initialisation (std 0.02) barely reacts to its hidden
    # states; larger weights make an edit visible (as in tests/editing_fixtures.py).
    torch.manual_seed(0)
    with torch.no_grad():
        for param in loaded.model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.3)
    return loaded


@pytest.fixture(scope="module", params=["tiny-gpt2", "tiny-llama"])
def bf16_setup(request, tmp_path_factory):
    cache_dir = tmp_path_factory.mktemp("bf16")
    loaded = _bf16_model(request.param, cache_dir)
    stats = SecondMoments(
        loaded.model,
        loaded.tokenizer,
        f"{request.param}-bf16",
        StatsConfig(n_samples=200),
        make_corpus,
        cache_dir / "stats",
        progress=False,
    )
    return loaded, stats


def _logprobs(loaded) -> torch.Tensor:
    probes = [Probe(r.text, r.target_new) for r in REQUESTS]
    return torch.tensor([s.target_logprob for s in score_probes(loaded.model, loaded.tokenizer, probes)])


def test_model_is_bf16_and_targets_are_float32(bf16_setup):
    loaded, _ = bf16_setup
    assert all(p.dtype == torch.bfloat16 for p in loaded.model.parameters())
    site = loaded.spec.layer_name(2)
    targets = optimize_targets(
        loaded.model, loaded.tokenizer, REQUESTS, [site], [["{}"]], TargetConfig(steps=5, batch_size=3)
    )
    assert targets.delta[site].dtype == torch.float32 and targets.init[site].dtype == torch.float32
    assert torch.isfinite(targets.delta[site]).all() and torch.isfinite(targets.loss).all()
    assert targets.delta[site].norm(dim=1).min() > 0


def test_memit_edits_a_bf16_model(bf16_setup, monkeypatch):
    loaded, stats = bf16_setup
    model = loaded.model
    solves: list[torch.dtype] = []
    real_solve = torch.linalg.solve

    def spy(a, b, *args, **kwargs):
        solves.append(a.dtype)
        return real_solve(a, b, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "solve", spy)
    editor = given(
        Memit(MemitConfig(layers=[1, 2], update_weight=1.0, context_templates=[]), loaded.spec), stats
    )
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    before = _logprobs(loaded)
    delta = editor.apply(model, loaded.tokenizer, REQUESTS)
    assert solves and set(solves) == {torch.float64}
    assert delta.deltas and all(d.dtype == torch.float32 for d in delta.deltas.values())
    assert min(delta.case_diagnostics["target_reached"]) > 0.9
    with delta.applied(model):
        assert all(p.dtype == torch.bfloat16 for p in model.parameters())
        changed = [n for n, p in model.named_parameters() if not torch.equal(p, original[n])]
        assert sorted(changed) == sorted(delta.deltas)
        after = _logprobs(loaded)
    assert all(torch.equal(original[n], p) for n, p in model.named_parameters()), "restore must be bit-exact"
    assert bool((after > before + 0.1).all()), f"{before} -> {after}"


def test_bf16_scores_batched_match_one_at_a_time(bf16_setup):
    loaded, _ = bf16_setup
    probes = [Probe(r.text, r.target_new, r.target_true) for r in REQUESTS]
    probes.append(Probe("Rome is a citizen of", "the Kingdom of Spain", "the Republic of Italy"))
    alone = score_probes(loaded.model, loaded.tokenizer, probes, batch_size=1)
    together = score_probes(loaded.model, loaded.tokenizer, probes, batch_size=64)
    for a, b in zip(alone, together):
        assert b.target_logprob == pytest.approx(a.target_logprob, abs=0.05)
        assert b.foil_logprob == pytest.approx(a.foil_logprob, abs=0.05)
