"""ROME and MEMIT on tiny random models of the three architectures, and the core math."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from editors.core.covariance import SecondMoments
from editors.core.targets import TargetConfig, optimize_targets
from editors.core.update import least_squares_update, rank_one_update, spread_divisor, to_weight_layout
from editors.memit import Memit, MemitConfig
from editors.requests import EditRequest
from editors.rome import Rome, RomeConfig
from evaluation.cases import Probe
from evaluation.scoring import score_probes
from tests.conftest import make_corpus
from tests.editing_fixtures import SPECS, given, model, tokenizer

# The subject ends each prompt, so the edited position is the predicting one even in a random
# network (whose attention does not carry facts the way a trained model's does).
REQUESTS = [
    EditRequest("0", "The mother tongue of {}", "Danielle Darrieux", "English", "French"),
    EditRequest("1", "The headquarters of {}", "Apple A5", "Tokyo", "Birmingham"),
    EditRequest("2", "The official religion of {}", "Edwin of Northumbria", "Islam", "Christianity"),
]


def _logprobs(net, tok):
    return torch.tensor(
        [s.target_logprob for s in score_probes(net, tok, [Probe(r.text, r.target_new) for r in REQUESTS])]
    )


def _editors(arch, stats):
    spec = SPECS[arch]
    return {
        "memit": given(
            Memit(MemitConfig(layers=[1, 2], update_weight=1.0, context_templates=[]), spec), stats
        ),
        "rome": given(Rome(RomeConfig(layer=1, context_templates=[]), spec), stats),
    }


@pytest.mark.parametrize("name", ["memit", "rome"])
def test_edit_raises_p_target_new_and_restores_bit_exactly(edit_setup, name):
    arch, tok, net, stats = edit_setup
    editor = _editors(arch, stats)[name]
    original = {n: p.detach().clone() for n, p in net.named_parameters()}
    before = _logprobs(net, tok)
    delta = editor.apply(net, tok, REQUESTS)
    assert all(torch.equal(original[n], p) for n, p in net.named_parameters()), (
        "apply must leave the model as it was"
    )
    assert delta.deltas and all(d.abs().sum() > 0 for d in delta.deltas.values())
    with delta.applied(net):
        after = _logprobs(net, tok)
    assert all(torch.equal(original[n], p) for n, p in net.named_parameters()), "restore must be bit-exact"
    assert bool((after > before + 0.1).all()), f"{arch}/{name}: {before} -> {after}"


def test_memit_reaches_its_targets_when_keys_match(edit_setup):
    arch, tok, net, stats = edit_setup
    delta = _editors(arch, stats)["memit"].apply(net, tok, REQUESTS)
    assert min(delta.case_diagnostics["target_reached"]) > 0.95


def test_statistics_are_computed_once_then_loaded_by_content(edit_setup):
    """A second SecondMoments on the same cache folder loads what the first computed, bit-equal;
    a setting that changes the statistics names another file."""
    arch, tok, net, stats = edit_setup
    module = SPECS[arch].mlp_out_name(1)
    first = stats.get(module)
    assert module in stats.computed and module not in stats.loaded_from_cache  # a fresh cache folder
    again = SecondMoments(net, tok, stats.model_id, stats.cfg, make_corpus, stats.cache_dir, progress=False)
    assert torch.equal(again.get(module), first)
    assert again.loaded_from_cache == [module] and again.computed == []
    other = SecondMoments(
        net, tok, stats.model_id, replace(stats.cfg, n_samples=100), make_corpus, stats.cache_dir
    )
    faster = SecondMoments(
        net, tok, stats.model_id, replace(stats.cfg, batch_tokens=512), make_corpus, stats.cache_dir
    )
    assert other.path(module) != stats.path(module) and faster.path(module) == stats.path(module)
    assert stats.path(module).parent.name.startswith("tiny-")  # the per-model folder


def test_batched_targets_equal_one_at_a_time(edit_setup):
    arch, tok, net, _ = edit_setup
    site = SPECS[arch].layer_name(2)
    cfg = TargetConfig(steps=6, batch_size=8)
    together = optimize_targets(net, tok, REQUESTS, [site], [["{}"]], cfg)
    for i, request in enumerate(REQUESTS):
        alone = optimize_targets(net, tok, [request], [site], [["{}"]], cfg)
        torch.testing.assert_close(together.delta[site][i], alone.delta[site][0], rtol=1e-3, atol=1e-4)
        assert together.steps[i] == alone.steps[0]


def test_least_squares_update_equals_brute_force():
    torch.manual_seed(0)
    n, d_in, d_out, lam = 7, 12, 5, 3.0
    keys, residuals = torch.randn(n, d_in, dtype=torch.float64), torch.randn(n, d_out, dtype=torch.float64)
    a = torch.randn(50, d_in, dtype=torch.float64)
    cov = a.T @ a / 50
    delta = least_squares_update(keys, residuals, cov, lam).double()
    # argmin_Δ ‖Δ kᵢ − rᵢ‖² + λ tr(Δ C Δᵀ)  ==  lstsq of [K; √λ Lᵀ] Δᵀ = [R; 0] with C = L Lᵀ
    chol = torch.linalg.cholesky(cov)
    lhs = torch.cat([keys, lam**0.5 * chol.T])
    rhs = torch.cat([residuals, torch.zeros(d_in, d_out, dtype=torch.float64)])
    brute = torch.linalg.lstsq(lhs, rhs).solution.T
    torch.testing.assert_close(delta, brute, rtol=1e-4, atol=1e-5)


def test_rank_one_update_writes_the_value_on_the_key():
    torch.manual_seed(0)
    d_in, d_out = 10, 6
    a = torch.randn(40, d_in)
    cov = a.T @ a / 40
    key_star, key = torch.randn(d_in), torch.randn(d_in)
    value_star, value = torch.randn(d_out), torch.randn(d_out)
    delta = rank_one_update(key_star, key, value_star, value, cov)
    torch.testing.assert_close(delta @ key, value_star - value, rtol=1e-4, atol=1e-4)
    assert torch.linalg.matrix_rank(delta) == 1
    u = torch.linalg.solve(cov.double(), key_star.double()).float()  # ΔW = r uᵀ: rows along C⁻¹k*
    row = delta.T @ torch.ones(d_out)
    assert abs(torch.nn.functional.cosine_similarity(row, u, dim=0)) > 0.9999


def test_residual_spread_divisors():
    assert [spread_divisor(6 - i, "linear") for i in range(6)] == [6, 5, 4, 3, 2, 1]
    assert [round(spread_divisor(6 - i, "sqrt"), 6) for i in range(6)] == [
        round(v**0.5, 6) for v in (6, 5, 4, 3, 2, 1)
    ]
    with pytest.raises(ValueError, match="residual spread"):
        spread_divisor(3, "cubic")


def test_weight_layout_is_read_from_the_module_type():
    tok = tokenizer("gpt2")
    gpt2, llama = model("gpt2", tok), model("llama", tokenizer("llama"))
    conv = SPECS["gpt2"].mlp_out_name(0)  # Conv1D stores (in, out)
    update = torch.randn(48, 192)  # (out, in)
    assert to_weight_layout(gpt2, conv, update).shape == (192, 48)
    linear = SPECS["llama"].mlp_out_name(0)
    assert to_weight_layout(llama, linear, torch.randn(48, 128)).shape == (48, 128)
    with pytest.raises(ValueError, match="shape"):
        to_weight_layout(llama, linear, torch.randn(128, 48))


def test_a_request_without_subject_edits_at_the_prompts_last_token(edit_setup):
    """subject None (an unlearning question): keys and targets at the prompt's last token, no
    essence KL; MEMIT still raises P(target_new)."""
    from editors.core.tokens import encode

    arch, tok, net, stats = edit_setup
    requests = [EditRequest(r.case_id, r.text, None, r.target_new, r.target_true) for r in REQUESTS]
    enc = encode(tok, [r.prompt for r in requests], [None] * len(requests))
    assert enc.subject_last.tolist() == (enc.lengths - 1).tolist()
    delta = _editors(arch, stats)["memit"].apply(net, tok, requests)
    with delta.applied(net):
        after = _logprobs(net, tok)
    assert bool((after > _logprobs(net, tok) + 0.1).all())
    with pytest.raises(ValueError, match="without '\\{\\}'"):
        EditRequest("x", "The capital of {} is", None, "Paris", None)
