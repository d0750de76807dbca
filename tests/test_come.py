"""CoME and PMET: the spec's unit checks, reduction to the base method, edits on three architectures."""

from __future__ import annotations

import math
from dataclasses import asdict, replace

import pytest
import torch

from editors.come import (
    ComeMemit,
    ComeMemitConfig,
    ComePmet,
    ComePmetConfig,
    ComeSettings,
    combine,
    common_component,
    top_p_mask,
)
from editors.core.targets import TargetCache, TargetConfig, cache_settings, optimize_targets
from editors.memit import Memit, MemitConfig
from editors.pmet import Pmet, PmetConfig
from tests.editing_fixtures import SPECS, given
from tests.test_editors import REQUESTS, _logprobs


def test_top_p_mask_size_matches_the_reference_rule():
    z0 = torch.randn(3, 4096)
    mask = top_p_mask(z0, 0.2)
    assert mask.sum(-1).tolist() == [4096 - math.floor(0.8 * 4096) + 1] * 3 == [821] * 3
    # the chosen coordinates are the largest signed values, not the largest magnitudes
    magnitude = top_p_mask(z0, 0.2, "magnitude")
    for row in range(3):
        assert z0[row][mask[row]].min() >= z0[row][~mask[row]].max()
        assert z0[row].abs()[magnitude[row]].min() >= z0[row].abs()[~magnitude[row]].max()
    assert bool(top_p_mask(z0, 0.2, "none").all())


def test_common_component_lies_on_the_bisector_with_the_half_angle_norm():
    torch.manual_seed(0)
    delta, delta_old = torch.randn(5, 64), torch.randn(5, 64)
    common, guard = common_component(delta, delta_old)
    assert not guard.any()
    u, u_old = delta / delta.norm(dim=-1, keepdim=True), delta_old / delta_old.norm(dim=-1, keepdim=True)
    bisector = (u + u_old) / (u + u_old).norm(dim=-1, keepdim=True)
    torch.testing.assert_close(common / common.norm(dim=-1, keepdim=True), bisector)
    theta = torch.arccos((u * u_old).sum(-1))
    torch.testing.assert_close(common.norm(dim=-1), delta_old.norm(dim=-1) * torch.cos(theta / 2))


def test_zero_vectors_never_give_nan_and_are_counted():
    delta = torch.randn(3, 16)
    delta_old = torch.randn(3, 16)
    delta_old[1] = 0
    delta[2] = 0
    z, info = combine(torch.randn(3, 16), delta, delta_old, ComeSettings())
    assert torch.isfinite(z).all()
    assert info["come_zero_norm_guard"] == [0.0, 1.0, 1.0]


def test_combination_formula_code_and_paper_forms():
    torch.manual_seed(1)
    h, delta, delta_old = torch.randn(2, 32), torch.randn(2, 32), torch.randn(2, 32)
    z0 = h + delta
    mask = top_p_mask(z0, 0.2)
    common, _ = common_component(delta, delta_old)
    code, _ = combine(h, delta, delta_old, ComeSettings(unlearn_weight=0.3))
    torch.testing.assert_close(code, torch.where(mask, z0 - 0.3 * delta_old + common, z0))
    paper, _ = combine(h, delta, delta_old, ComeSettings(unlearn_weight=0.3, common_coefficient="paper"))
    torch.testing.assert_close(paper, torch.where(mask, z0 - 0.3 * (delta_old - common), z0))
    ablated, _ = combine(
        h, delta, delta_old, ComeSettings(unlearn_weight=0.3, subtract_unlearning=False, add_common=False)
    )
    assert torch.equal(ablated, z0)


BASE = dict(layers=[1, 2], update_weight=1.0, context_templates=[])


def _pairs(arch, stats):
    spec = SPECS[arch]
    memit_target = TargetConfig(steps=8)
    pmet_target = TargetConfig(steps=8, lr=0.2, kl_factor=1.0, adaptive_nll=True)
    paper_zero = dict(unlearn_weight=0.0, common_coefficient="paper")
    return {
        "memit": (
            given(Memit(MemitConfig(**BASE, target=memit_target), spec), stats),
            given(ComeMemit(ComeMemitConfig(**BASE, target=memit_target, **paper_zero), spec), stats),
        ),
        "pmet": (
            given(Pmet(PmetConfig(**BASE, target=pmet_target), spec), stats),
            given(ComePmet(ComePmetConfig(**BASE, target=pmet_target, **paper_zero), spec), stats),
        ),
    }


@pytest.mark.parametrize("base", ["memit", "pmet"])
def test_alpha_zero_paper_form_reduces_come_to_its_base_exactly(edit_setup, base):
    arch, tok, net, stats = edit_setup
    plain, come = _pairs(arch, stats)[base]
    expected = plain.apply(net, tok, REQUESTS)
    got = come.apply(net, tok, REQUESTS)
    assert expected.deltas.keys() == got.deltas.keys()
    for name in expected.deltas:
        assert torch.equal(expected.deltas[name], got.deltas[name]), name
    # the code-form coefficient keeps δ″ even at α = 0, so it differs
    come.config = replace(come.config, common_coefficient="code")
    changed = come.apply(net, tok, REQUESTS)
    assert any(not torch.equal(expected.deltas[n], changed.deltas[n]) for n in expected.deltas)


@pytest.mark.parametrize("editor", ["pmet", "come_memit", "come_pmet"])
def test_pmet_and_come_raise_p_target_new(edit_setup, editor):
    arch, tok, net, stats = edit_setup
    spec = SPECS[arch]
    editors = {
        "pmet": given(Pmet(PmetConfig(**BASE), spec), stats),
        "come_memit": given(ComeMemit(ComeMemitConfig(**BASE), spec), stats),
        "come_pmet": given(ComePmet(ComePmetConfig(**BASE), spec), stats),
    }
    original = {n: p.detach().clone() for n, p in net.named_parameters()}
    before = _logprobs(net, tok)
    delta = editors[editor].apply(net, tok, REQUESTS)
    assert all(torch.equal(original[n], p) for n, p in net.named_parameters())
    assert all(name.startswith(tuple(spec.mlp_out_name(layer) for layer in (1, 2))) for name in delta.deltas)
    with delta.applied(net):
        after = _logprobs(net, tok)
    assert bool((after > before).all()) and float((after - before).mean()) > 0.2, (
        f"{arch}/{editor}: {before} -> {after}"
    )
    if editor.startswith("come"):
        assert len(delta.case_diagnostics["come_zero_norm_guard"]) == len(REQUESTS)


def test_target_cache_serves_an_alpha_sweep_without_reoptimising(edit_setup, tmp_path):
    arch, tok, net, stats = edit_setup
    cache = TargetCache(tmp_path, f"tiny-{arch}")
    first = given(ComeMemit(ComeMemitConfig(**BASE, target=TargetConfig(steps=6)), SPECS[arch]), stats, cache)
    d1 = first.apply(net, tok, REQUESTS)
    assert (cache.hits, cache.misses) == (0, 2 * len(REQUESTS))  # δ′ and δ per request
    second = given(
        ComeMemit(ComeMemitConfig(**BASE, target=TargetConfig(steps=6), unlearn_weight=0.5), SPECS[arch]),
        stats,
        cache,
    )
    d2 = second.apply(net, tok, REQUESTS)
    assert (cache.hits, cache.misses) == (2 * len(REQUESTS), 2 * len(REQUESTS))
    assert any(not torch.equal(d1.deltas[n], d2.deltas[n]) for n in d1.deltas)  # α changed the result
    # the same α again reproduces the first run exactly from the cache
    third = given(ComeMemit(ComeMemitConfig(**BASE, target=TargetConfig(steps=6)), SPECS[arch]), stats, cache)
    d3 = third.apply(net, tok, REQUESTS)
    for name in d1.deltas:
        torch.testing.assert_close(d1.deltas[name], d3.deltas[name])
    third.history = ["an-earlier-sequential-edit"]  # the model holds another edit now
    third.apply(net, tok, REQUESTS)
    assert cache.misses == 4 * len(REQUESTS)  # the edit history is part of the key
    third.reset()
    third.apply(net, tok, REQUESTS)
    assert cache.misses == 4 * len(REQUESTS)  # back on the unedited model: served from the cache


def _adam_steps_per_optimiser(monkeypatch) -> list:
    """Patch Adam.step to record its optimiser at each call; the returned list holds them in order
    (strong references, so two optimisers never share an id)."""
    calls = []
    step = torch.optim.Adam.step

    def counted(self, *args, **kwargs):
        calls.append(self)
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", counted)
    return calls


def _runs(calls) -> list[int]:
    """Consecutive calls of one optimiser, counted: [steps of the 1st optimiser, of the 2nd, ...]."""
    runs: list[int] = []
    for i, opt in enumerate(calls):
        if i and opt is calls[i - 1]:
            runs[-1] += 1
        else:
            runs.append(1)
    return runs


@pytest.mark.parametrize(
    "base, steps, expected",
    [
        # ekgus9/COME come_memit/compute_z.py: δ′ runs range(int(25 / 2)) = 12 iterations and its
        # break tests `it == v_num_grad_steps - 1` = 24, never reached: 12 Adam steps. δ: range(25)
        # with the same break, taken at it = 24 before stepping: 24 steps.
        ("memit", 25, [12, 24]),
        # come_pmet/compute_zs.py: both loops run range(30) and break at it = 29: 29 steps each.
        ("pmet", 30, [29, 29]),
    ],
)
def test_unlearning_and_editing_vectors_take_the_released_number_of_adam_steps(
    edit_setup, monkeypatch, base, steps, expected
):
    arch, tok, net, stats = edit_setup
    # early stopping cannot fire: the loss is positive (its NLL is), and the KL rule needs every
    # answer token to be the argmax, which these multi-token answers never get on a random model
    never = dict(steps=steps, loss_stop=0.0, kl_stop=0.0)
    if base == "memit":
        editor = given(ComeMemit(ComeMemitConfig(**BASE, target=TargetConfig(**never)), SPECS[arch]), stats)
    else:
        target = TargetConfig(lr=0.2, kl_factor=1.0, adaptive_nll=True, **never)
        editor = given(ComePmet(ComePmetConfig(**BASE, target=target), SPECS[arch]), stats)
    calls = _adam_steps_per_optimiser(monkeypatch)
    _, targets, diagnostics = editor.compute_targets(net, tok, REQUESTS)
    assert _runs(calls) == expected  # one optimiser for δ′, then one for δ (one batch each)
    assert diagnostics["come_unlearn_steps"] == [float(expected[0])] * len(REQUESTS)
    assert targets.steps.tolist() == [expected[1]] * len(REQUESTS)


def test_pmet_kl_stop_reads_the_weighted_kl_term(edit_setup):
    # xpq-tech/PMET pmet/compute_zs.py (and COME's copy) stop once every answer token is the argmax
    # and `kl_loss <= 0.01`, kl_loss being kl_factor · KL. With kl_factor 1e-6 that term is always
    # small, so the rule must stop each request exactly where "stop once solved" (kl_stop = inf) does.
    arch, tok, net, _ = edit_setup
    # one-token answers, predicted at the edited position: the tiny model can make them the argmax
    requests = [replace(r, target_new=t) for r, t in zip(REQUESTS, ["the", "of", "in"])]
    sites = [SPECS[arch].mlp_out_name(2), SPECS[arch].attn_out_name(2)]
    cfg = TargetConfig(steps=12, lr=0.5, kl_factor=1e-6, adaptive_nll=True, loss_stop=0.0)
    weighted = optimize_targets(net, tok, requests, sites, [["{}"]], cfg)
    solved = optimize_targets(net, tok, requests, sites, [["{}"]], replace(cfg, kl_stop=math.inf))
    assert bool((solved.steps < cfg.steps - 1).all())  # the rule fires for every request
    assert weighted.steps.tolist() == solved.steps.tolist()
    # xpq-tech/BLUE's PMET reads the KL itself (`kl_loss / kl_factor < 0.01`): here it never stops
    unweighted = optimize_targets(net, tok, requests, sites, [["{}"]], replace(cfg, kl_stop_weighted=False))
    assert bool((unweighted.steps > solved.steps).all())


def test_cache_keys_change_only_where_the_new_target_settings_change_the_result():
    memit, pmet = TargetConfig(), TargetConfig(steps=30, lr=0.2, kl_factor=1.0, adaptive_nll=True)
    earlier = {k: v for k, v in asdict(memit).items() if k not in ("batch_size", "reuse_prefix")}
    del earlier["updates"], earlier["kl_stop_weighted"]
    assert cache_settings(memit) == earlier  # the keys written before these fields existed
    assert "kl_stop_weighted" not in cache_settings(pmet)  # kl_factor 1: either rule, same result
    llama = replace(pmet, kl_factor=0.0625)  # PMET on LLaMA-3 (BLUE's values)
    assert cache_settings(llama) != cache_settings(replace(llama, kl_stop_weighted=False))
    assert cache_settings(replace(memit, updates=12)) != cache_settings(memit)


def test_old_target_space_never_precedes_the_eos_stand_in(edit_setup, monkeypatch):
    arch, tok, net, stats = edit_setup
    requests = [REQUESTS[0], replace(REQUESTS[1], target_true=None)]  # the second as in zsRE
    editor = given(
        ComeMemit(ComeMemitConfig(**BASE, target=TargetConfig(steps=2), old_target_space=True), SPECS[arch]),
        stats,
    )
    seen = []
    optimize = editor.optimize

    def recording(*args, **options):
        seen.append(options.get("answers"))
        return optimize(*args, **options)

    monkeypatch.setattr(editor, "optimize", recording)
    editor.compute_targets(net, tok, requests)
    assert seen[0] == [" " + REQUESTS[0].target_true, tok.eos_token]  # δ′'s answers
