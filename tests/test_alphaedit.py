"""AlphaEdit and CoME-AlphaEdit on tiny random models: the null-space property, sequential key
accumulation, and the α = 0 reduction."""

from __future__ import annotations

from dataclasses import replace

import torch

from editors.alphaedit import AlphaEdit, AlphaEditConfig
from editors.come import ComeAlphaEdit, ComeAlphaEditConfig
from editors.core.covariance import nullspace_projector
from editors.core.targets import TargetConfig
from editors.core.update import weight_name
from editors.memit import Memit, MemitConfig
from editors.requests import EditRequest
from evaluation.cases import Probe
from evaluation.scoring import score_probes
from tests.editing_fixtures import SPECS, given

REQUESTS = [
    EditRequest("0", "The mother tongue of {}", "Danielle Darrieux", "English", "French"),
    EditRequest("1", "The headquarters of {}", "Apple A5", "Tokyo", "Birmingham"),
    EditRequest("2", "The official religion of {}", "Edwin of Northumbria", "Islam", "Christianity"),
]
LATER = [
    EditRequest("3", "The capital of {}", "Kingdom of Sweden", "Paris", "Stockholm"),
    EditRequest("4", "The native language of {}", "Jean Marais", "Dutch", "French"),
]
BASE = dict(layers=[1, 2], update_weight=1.0, context_templates=[], target=TargetConfig(steps=8))


def _threshold(stats, modules) -> float:
    """A threshold with about half of each module's covariance eigenvalues below it (a tiny random
    model's key scale is not a real model's; 2e-2 could leave no null space or all of it)."""
    return max(float(torch.linalg.eigvalsh(stats.get(m).double()).median()) for m in modules)


def _out_in(model, module: str, delta) -> torch.Tensor:
    """ΔW of ``module`` in (out, in) orientation."""
    d = delta.deltas[weight_name(module)]
    return d if isinstance(model.get_submodule(module), torch.nn.Linear) else d.T


def _alphaedit(arch, stats, **settings) -> AlphaEdit:
    spec = SPECS[arch]
    modules = [spec.mlp_out_name(layer) for layer in BASE["layers"]]
    settings.setdefault("nullspace_threshold", _threshold(stats, modules))
    return given(AlphaEdit(AlphaEditConfig(**BASE, l2=1e-3, **settings), spec), stats)


def test_projector_spans_the_small_eigenvectors():
    torch.manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    c = basis @ torch.diag(torch.tensor([5.0, 2.0, 1.0, 1e-3, 1e-4, 0.0], dtype=torch.float64)) @ basis.T
    p, rank = nullspace_projector(c.float(), 2e-2)
    assert rank == 3
    torch.testing.assert_close(p.double(), basis[:, 3:] @ basis[:, 3:].T, atol=1e-5, rtol=0)
    torch.testing.assert_close(p @ p, p, atol=1e-5, rtol=0)


def test_update_leaves_preserved_keys_unchanged_and_memits_does_not(edit_setup):
    """Keys in the preserved space (the span of C's eigenvectors at or above the threshold, I − P)
    keep their outputs under AlphaEdit's ΔW, not under MEMIT's; over the corpus' keys,
    E‖ΔW k‖² = tr(ΔW C ΔWᵀ) ≤ threshold · ‖ΔW‖². The edit still raises P(target_new)."""
    arch, tok, net, stats = edit_setup
    editor = _alphaedit(arch, stats)
    threshold = editor.config.nullspace_threshold
    memit = given(Memit(MemitConfig(**BASE), SPECS[arch]), stats)
    alpha_delta, memit_delta = editor.apply(net, tok, REQUESTS), memit.apply(net, tok, REQUESTS)
    for layer in BASE["layers"]:
        module = SPECS[arch].mlp_out_name(layer)
        c = stats.get(module).double()
        keep = torch.eye(len(c), dtype=torch.float64) - stats.projector(module, threshold).double()
        alpha, plain = (_out_in(net, module, d).double() for d in (alpha_delta, memit_delta))
        assert (alpha @ keep).norm() <= 1e-4 * alpha.norm(), module
        assert (plain @ keep).norm() >= 0.1 * plain.norm(), module
        assert torch.trace(alpha @ c @ alpha.T) <= threshold * alpha.pow(2).sum() * (1 + 1e-6), module
    probes = [Probe(r.text, r.target_new) for r in REQUESTS]
    before = torch.tensor([s.target_logprob for s in score_probes(net, tok, probes)])
    with alpha_delta.applied(net):
        after = torch.tensor([s.target_logprob for s in score_probes(net, tok, probes)])
    assert bool((after > before + 0.1).all()), f"{arch}: {before} -> {after}"


def test_sequential_edits_respect_earlier_keys_and_reset_clears_them(edit_setup):
    arch, tok, net, stats = edit_setup
    spec = SPECS[arch]
    module = spec.mlp_out_name(BASE["layers"][0])
    results = {}
    for accumulate in (True, False):
        editor = _alphaedit(arch, stats, accumulate=accumulate)
        first = editor.apply(net, tok, REQUESTS)
        assert bool(editor.kept_keys) is accumulate
        with first.applied(net):
            second = editor.apply(net, tok, LATER)
            keys = editor_keys(editor, net, tok, module)
        results[accumulate] = (_out_in(net, module, second).double() @ keys.double().T).norm()
        editor.reset()
        assert not editor.kept_keys and not editor.history
    # with the first batch's keys in the solve, the second update moves their outputs far less
    assert results[True] < 0.5 * results[False], results


def editor_keys(editor, net, tok, module):
    from editors.core.keys import compute_keys

    cfg = editor.config
    return compute_keys(net, tok, REQUESTS, module, editor.context(net, tok), cfg.key_averaging, 64)


def test_alpha_zero_paper_form_reduces_come_alphaedit_to_alphaedit_exactly(edit_setup):
    arch, tok, net, stats = edit_setup
    plain = _alphaedit(arch, stats)
    settings = dict(nullspace_threshold=plain.config.nullspace_threshold, l2=1e-3)
    come = given(
        ComeAlphaEdit(
            ComeAlphaEditConfig(**BASE, **settings, unlearn_weight=0.0, common_coefficient="paper"),
            SPECS[arch],
        ),
        stats,
    )
    expected, got = plain.apply(net, tok, REQUESTS), come.apply(net, tok, REQUESTS)
    assert expected.deltas.keys() == got.deltas.keys()
    for name in expected.deltas:
        assert torch.equal(expected.deltas[name], got.deltas[name]), name
    come.config = replace(come.config, unlearn_weight=0.5)
    changed = come.apply(net, tok, REQUESTS)
    assert any(not torch.equal(expected.deltas[n], changed.deltas[n]) for n in expected.deltas)
