"""FT, FT-L, FT-W, F-Learning and the unedited editor on tiny random models of the three architectures."""

from __future__ import annotations

import pytest
import torch

from editors.finetune import FineTune, FineTuneConfig, FLearning, FLearningConfig
from editors.requests import EditRequest
from editors.unedited import Unedited, UneditedConfig
from evaluation.cases import Probe
from evaluation.scoring import score_probes
from tests.editing_fixtures import SPECS

REQUESTS = [
    EditRequest("0", "The mother tongue of {} is", "Danielle Darrieux", "English", "French"),
    EditRequest("1", "The headquarters of {} is in", "Apple A5", "Tokyo", "Birmingham"),
]


def _logprobs(net, tok, answer="target_new"):
    return torch.tensor(
        [
            s.target_logprob
            for s in score_probes(net, tok, [Probe(r.text, getattr(r, answer)) for r in REQUESTS])
        ]
    )


def _params(net):
    return {n: p.detach().clone() for n, p in net.named_parameters()}


@pytest.mark.parametrize("objective", ["prompt_last", "target_tokens"])
def test_ft_raises_p_target_new_and_leaves_the_model_as_it_was(edit_setup, objective):
    arch, tok, net, stats = edit_setup
    editor = FineTune(FineTuneConfig(layers=[1], num_steps=10, lr=1e-2, objective=objective), SPECS[arch])
    original = _params(net)
    before = _logprobs(net, tok)
    delta = editor.apply(net, tok, REQUESTS)
    assert all(torch.equal(original[n], p) for n, p in net.named_parameters())
    assert set(delta.deltas) == set(editor.parameters(net)) and all(
        SPECS[arch].mlp_out_name(1) in n for n in delta.deltas
    )
    assert all(p.requires_grad for p in net.parameters()), "requires_grad flags are restored"
    with delta.applied(net):
        after = _logprobs(net, tok)
    assert bool((after > before + 0.1).all()), f"{arch}/{objective}: {before} -> {after}"
    assert delta.diagnostics["ft_steps"] >= 1


def test_ft_l_clamps_every_element_to_the_linf_ball(edit_setup):
    arch, tok, net, _ = edit_setup
    eps = 1e-3
    delta = FineTune(
        FineTuneConfig(layers=[1], num_steps=5, lr=1e-2, norm_constraint=eps), SPECS[arch]
    ).apply(net, tok, REQUESTS)
    assert max(float(d.abs().max()) for d in delta.deltas.values()) <= eps * (1 + 1e-5)
    free = FineTune(FineTuneConfig(layers=[1], num_steps=5, lr=1e-2), SPECS[arch]).apply(net, tok, REQUESTS)
    assert max(float(d.abs().max()) for d in free.deltas.values()) > eps


def test_ft_w_trains_the_whole_block_with_power_law_weight_decay(edit_setup):
    arch, tok, net, _ = edit_setup
    cfg = FineTuneConfig(layers=[1], module="layer", num_steps=2, wd_power_law=[-0.87028798, 0.15589562])
    editor = FineTune(cfg, SPECS[arch])
    assert editor.weight_decay(10000) == pytest.approx(10000**-0.87028798 * 1.1686, rel=1e-3)
    names = set(editor.apply(net, tok, REQUESTS).deltas)
    assert names == {n for n, _ in net.named_parameters() if n.startswith(SPECS[arch].layer_name(1) + ".")}
    assert len(names) > 2  # attention, MLP and norms of block 1


def test_f_learning_with_no_forgetting_is_ft(edit_setup):
    arch, tok, net, _ = edit_setup
    common = dict(layers=[1], num_steps=5, lr=1e-2)
    ft = FineTune(FineTuneConfig(**common), SPECS[arch]).apply(net, tok, REQUESTS)
    fl0 = FLearning(FLearningConfig(**common, forget_weight=0.0), SPECS[arch]).apply(net, tok, REQUESTS)
    assert ft.deltas.keys() == fl0.deltas.keys()
    assert all(torch.equal(ft.deltas[n], fl0.deltas[n]) for n in ft.deltas)


def test_f_learning_forgets_the_old_answer_then_learns_the_new(edit_setup):
    arch, tok, net, _ = edit_setup
    original = _params(net)
    old_before = _logprobs(net, tok, "target_true")
    cfg = FLearningConfig(layers=[1], num_steps=10, lr=1e-2, forget_weight=1.0)
    delta = FLearning(cfg, SPECS[arch]).apply(net, tok, REQUESTS)
    assert all(torch.equal(original[n], p) for n, p in net.named_parameters())
    assert delta.diagnostics["f_learning_forgotten"] == 2 and delta.diagnostics["forget_ft_steps"] >= 1
    # forgetting alone (θ − λ Δ_old) lowers P(old)
    forget_only = FLearning(
        FLearningConfig(layers=[1], num_steps=0, lr=1e-2, forget_num_steps=10), SPECS[arch]
    )
    with forget_only.apply(net, tok, REQUESTS).applied(net):
        assert bool((_logprobs(net, tok, "target_true") < old_before).all())
    with delta.applied(net):
        assert bool((_logprobs(net, tok) > _logprobs(net, tok, "target_true")).all())


def test_unedited_changes_nothing(tiny_gpt2, tiny_tokenizer):
    delta = Unedited(UneditedConfig(), spec=None).apply(tiny_gpt2, tiny_tokenizer, REQUESTS)
    assert not delta.deltas and Unedited(UneditedConfig(), spec=None).requirements() == []


def test_bad_config_is_named():
    with pytest.raises(ValueError, match="editor.objective"):
        FineTune(FineTuneConfig(objective="nope"), SPECS["gpt2"])
    with pytest.raises(ValueError, match="editor.module"):
        FineTune(FineTuneConfig(module="attn"), SPECS["gpt2"])
