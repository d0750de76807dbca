"""The shared training loop and its losses: SSS against a hand computation, its gradient reaching the
parameters, the loop's floor/accumulation/early-stopping rules, and FT-L w/ SSS end to end."""

from __future__ import annotations

import pytest
import torch

from editors.core.tokens import answer_ids
from editors.finetune import FineTune, FineTuneConfig
from editors.training import LoopConfig, answer_batch, answer_logits, answer_nll, fit, mix_sss, sss_term
from tests.editing_fixtures import SPECS
from tests.test_finetune import REQUESTS


def _batch(tok, net, objective="prompt_last"):
    prompts = [(r.prompt, r.subject) for r in REQUESTS]
    targets = [answer_ids(tok, " " + r.target_new) for r in REQUESTS]
    return answer_batch(tok, prompts, targets, objective, next(net.parameters()).device), targets


def test_sss_is_the_squared_gradient_norm_of_the_loss_at_the_lm_heads_input(edit_setup):
    arch, tok, net, _ = edit_setup
    batch, targets = _batch(tok, net)
    logits, hidden = answer_logits(net, batch, hidden=True)
    loss = answer_nll(logits, batch).mean()
    value = sss_term(loss, hidden)
    # by hand: only the last prompt token's logits enter the loss, logits = H·W_Uᵀ (+ bias), and
    # d(mean over requests of the mean NLL of the answer tokens)/dz = (softmax − mean one-hot) / B
    w_u = net.get_output_embeddings().weight.detach().float()
    expected = torch.zeros((), dtype=torch.float64)
    n = len(REQUESTS)
    for i, t in enumerate(targets):
        p = torch.softmax(logits[i, 0].detach(), dim=-1)
        y = torch.zeros_like(p)
        for token in t:
            y[token] += 1.0 / len(t)
        expected += (((p - y) / n) @ w_u).double().pow(2).sum()
    assert value.item() == pytest.approx(expected.item(), rel=1e-4), arch


def test_sss_mean_divides_by_the_loss_bearing_positions(edit_setup):
    arch, tok, net, _ = edit_setup
    batch, _ = _batch(tok, net)
    logits, hidden = answer_logits(net, batch, hidden=True)
    loss = answer_nll(logits, batch).mean()
    total = sss_term(loss, hidden, "sum")
    assert sss_term(loss, hidden, "mean", positions=2).item() == pytest.approx(total.item() / 2)
    with pytest.raises(ValueError, match="reduction"):
        sss_term(loss, hidden, "max")


def test_mix_sss_is_the_loss_itself_at_c_zero_and_needs_hidden_states_otherwise(edit_setup):
    _, tok, net, _ = edit_setup
    batch, _ = _batch(tok, net)
    logits, hidden = answer_logits(net, batch, hidden=True)
    loss = answer_nll(logits, batch).mean()
    assert mix_sss(loss, None, 0.0) is loss
    mixed = mix_sss(loss, hidden, 0.9)
    assert mixed.item() == pytest.approx(0.1 * loss.item() + 0.9 * sss_term(loss, hidden).item(), rel=1e-5)
    with pytest.raises(ValueError, match="hidden"):
        mix_sss(loss, None, 0.5)


def test_sss_alone_changes_the_weights_through_its_own_gradient(edit_setup):
    """C = 1: the edit loss has weight 0, so every change comes from SSS's double backward."""
    arch, tok, net, _ = edit_setup
    cfg = dict(layers=[1], num_steps=3, lr=1e-2, loss_floor=0.0)
    only_sss = FineTune(FineTuneConfig(**cfg, sss_coefficient=1.0), SPECS[arch]).apply(net, tok, REQUESTS)
    assert only_sss.diagnostics["ft_steps"] == 3
    assert any(float(d.abs().max()) > 0 for d in only_sss.deltas.values()), arch
    # and it lowers SSS on the edit prompts
    batch, _ = _batch(tok, net)

    def sss_now() -> float:
        logits, hidden = answer_logits(net, batch, hidden=True)
        return sss_term(answer_nll(logits, batch).mean(), hidden).item()

    before = sss_now()
    with only_sss.applied(net):
        after = sss_now()
    assert after < before, f"{arch}: SSS {before} -> {after}"
    plain = FineTune(FineTuneConfig(**cfg), SPECS[arch]).apply(net, tok, REQUESTS)
    assert any(not torch.equal(plain.deltas[n], only_sss.deltas[n]) for n in plain.deltas)


def test_ft_l_with_sss_still_raises_p_target_new(edit_setup):
    arch, tok, net, _ = edit_setup
    batch, _ = _batch(tok, net)
    before = answer_nll(answer_logits(net, batch)[0], batch).detach()
    delta = FineTune(
        FineTuneConfig(layers=[1], num_steps=10, lr=1e-2, sss_coefficient=0.9), SPECS[arch]
    ).apply(net, tok, REQUESTS)
    with delta.applied(net):
        after = answer_nll(answer_logits(net, batch)[0], batch).detach()
    assert bool((after < before).all()), f"{arch}: NLL {before} -> {after}"


def test_teacher_forced_batches_of_mixed_answer_lengths_index_inside_their_rows(edit_setup):
    """The longest prompt with the shortest answer: its masked reads would fall past the row's end."""
    arch, tok, net, _ = edit_setup
    prompts = [
        ("The mother tongue of {} is, as everyone here knows well,", "Danielle Darrieux"),
        ("{} is", "X"),
    ]
    targets = [answer_ids(tok, " English"), answer_ids(tok, " a long answer of many tokens")]
    batch = answer_batch(tok, prompts, targets, "target_tokens", next(net.parameters()).device)
    assert int(batch.positions.max()) < batch.enc.input_ids.shape[1]
    nll = answer_nll(answer_logits(net, batch)[0], batch)
    for i in range(2):  # each row's NLL is its own, alone
        alone = answer_batch(tok, prompts[i : i + 1], targets[i : i + 1], "target_tokens", batch.gold.device)
        assert nll[i].item() == pytest.approx(
            answer_nll(answer_logits(net, alone)[0], alone).item(), rel=1e-4
        )


class _Quadratic:
    """Minimise (w − target)² over one parameter; batches are floats (their size is 1)."""

    def __init__(self, start: float = 0.0):
        self.w = torch.nn.Parameter(torch.tensor([start]))

    def loss(self, target):
        return (self.w - target).pow(2).sum()


def test_fit_skips_batches_below_the_floor_and_stops_when_an_epoch_is_below_it():
    q = _Quadratic()
    report = fit(
        {"w": q.w}, q.loss, [1.0, 1.0], LoopConfig(epochs=50, lr=0.25, optimizer="sgd", loss_floor=0.01)
    )
    # SGD halves the gap each step: losses 1, .25 | .0625, .0156 | .0039 and .0039 are below the floor
    assert report.stopped == "loss_floor" and report.batches == 6 and report.steps == 4
    assert q.w.item() == pytest.approx(0.9375) and report.final_loss == pytest.approx(0.0625**2)


def test_fit_accumulates_gradients_and_caps_steps():
    q = _Quadratic()
    report = fit({"w": q.w}, q.loss, [1.0] * 6, LoopConfig(epochs=2, lr=0.1, optimizer="sgd", accumulate=3))
    assert report.batches == 12 and report.steps == 4
    q2 = _Quadratic()
    capped = fit({"w": q2.w}, q2.loss, [1.0] * 6, LoopConfig(epochs=5, lr=0.1, optimizer="sgd", max_steps=4))
    assert capped.steps == 4 and capped.stopped == "max_steps"


def test_fit_stops_on_patience_and_keeps_the_best_parameters():
    q = _Quadratic()
    history = iter([3.0, 1.0, 2.0, 2.5, 2.7, 0.5])
    report = fit(
        {"w": q.w},
        q.loss,
        [1.0] * 10,
        LoopConfig(epochs=1, lr=0.1, optimizer="sgd", eval_every=1, patience=3),
        validate=lambda: next(history),
    )
    assert report.stopped == "patience" and report.steps == 5
    assert report.best_step == 2 and report.best_loss == 1.0
    # w after 2 SGD steps towards 1 from 0 with lr 0.1: 0.2, then 0.36
    assert q.w.item() == pytest.approx(0.36)
