"""The fast paths of target optimisation and key reading give the plain computation's results."""

from __future__ import annotations

import types

import pytest
import torch

from editors.core.context import sample_context_templates
from editors.core.keys import bare_values, read_at_subject
from editors.core.logits import logits_at
from editors.core.rows import RowFeed
from editors.core.targets import TargetConfig, optimize_targets
from editors.core.tokens import encode
from editors.requests import EditRequest
from tests.editing_fixtures import SPECS, model, tokenizer

# "Paris" and "Rome" are one token at the start of the KL prompt: nothing before the edit position.
REQUESTS = [
    EditRequest("0", "{} is located in the country of", "Paris", "Japan", "France"),
    EditRequest("1", "The mother tongue of {} is", "Danielle Darrieux", "English", "French"),
    EditRequest("2", "{} plays the instrument", "Toko Yasuda", "piano", "guitar"),
    EditRequest("3", "The headquarters of {} is in", "Apple A5", "Tokyo, Nepal", "Cupertino"),
    EditRequest("4", "{} is a citizen of", "Rome", "Italy", "Spain"),
]


@pytest.fixture(scope="module", params=["gpt2", "gptj", "llama"])
def setup(request):
    tok = tokenizer(request.param)
    net = model(request.param, tok, init=0.5)
    context = sample_context_templates(net, tok, [(10, 5)], seed=0)
    return request.param, tok, net, context


@pytest.mark.parametrize("adaptive", [False, True])
def test_prefix_reuse_equals_whole_rows(setup, adaptive):
    arch, tok, net, context = setup
    sites = (
        [SPECS[arch].layer_name(1)]
        if not adaptive
        else [SPECS[arch].mlp_out_name(1), SPECS[arch].attn_out_name(1)]
    )
    cfg = TargetConfig(steps=8, batch_size=8, adaptive_nll=adaptive, loss_stop=0.5)
    whole = optimize_targets(
        net, tok, REQUESTS, sites, context, TargetConfig(**{**cfg.__dict__, "reuse_prefix": False})
    )
    reused = optimize_targets(net, tok, REQUESTS, sites, context, cfg)
    for site in sites:
        torch.testing.assert_close(reused.init[site], whole.init[site], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(reused.delta[site], whole.delta[site], rtol=1e-3, atol=1e-3)
    assert torch.equal(reused.steps, whole.steps)
    torch.testing.assert_close(reused.loss, whole.loss, rtol=1e-3, atol=1e-4)


def test_row_feed_caches_the_prefix_and_groups_rows_by_length(setup):
    arch, tok, net, context = setup
    texts = [t.replace("{}", r.prompt, 1) for r in REQUESTS for group in context for t in group]
    subjects = [r.subject for r in REQUESTS for group in context for _ in group]
    enc = encode(tok, texts, subjects)
    feed = RowFeed(net, enc, enc.subject_last)
    assert feed.cached
    rows = torch.arange(len(texts))
    groups = feed.plan(rows)
    assert sorted(torch.cat(groups).tolist()) == rows.tolist()
    lengths = feed.fed_lengths(rows)
    assert int(lengths.max()) < int(enc.lengths.max())  # only the tokens from the subject on
    # grouping never costs more padded tokens + passes than one pass
    cost = sum(64 + len(g) * int(feed.fed_lengths(g).max()) for g in groups)
    assert cost <= 64 + len(rows) * int(lengths.max())
    assert len(feed.plan(rows, pass_cost=10**9)) == 1
    # the suffix pass over the prefix cache gives the plain forward's logits
    with torch.no_grad():
        step = feed.step(rows)
        out = net(**step.kwargs).logits
        plain = net(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits
    last = enc.lengths - 1
    torch.testing.assert_close(out[rows, last - step.shift], plain[rows, last], rtol=1e-4, atol=1e-4)
    assert not RowFeed(net, enc, enc.subject_last, reuse_prefix=False).cached


def test_key_reads_stop_early_and_keep_the_order(setup):
    arch, tok, net, context = setup
    module = SPECS[arch].mlp_out_name(0)
    texts = [t.replace("{}", r.prompt, 1) for r in REQUESTS for t in context[1]]
    subjects = [r.subject for r in REQUESTS for _ in context[1]]
    calls = []
    last = net.get_submodule(SPECS[arch].layer_name(2))
    handle = last.register_forward_hook(lambda *a: calls.append(1))
    try:
        fast = read_at_subject(net, tok, texts, subjects, module, "input", batch_size=4)
    finally:
        handle.remove()
    assert not calls, "the forward pass must stop after the module that is read"
    one = torch.cat([read_at_subject(net, tok, [t], [s], module, "input") for t, s in zip(texts, subjects)])
    torch.testing.assert_close(fast, one, rtol=1e-4, atol=1e-4)
    values = bare_values(net, tok, REQUESTS, SPECS[arch].layer_name(1), "output", batch_size=2)
    assert values.shape == (len(REQUESTS), net.get_input_embeddings().embedding_dim)


def test_logits_at_falls_back_to_full_logits():
    class Plain(torch.nn.Module):  # no get_output_embeddings: full logits come back
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 6)

        def forward(self, x):
            return types.SimpleNamespace(logits=self.proj(x))

    net, x = Plain(), torch.randn(2, 3, 4)
    rows, cols = torch.tensor([0, 1, 1]), torch.tensor([2, 0, 1])
    with logits_at(net, rows, cols) as picked:
        out = net(x)
    assert not picked.hooked
    torch.testing.assert_close(picked.select(out.logits), net.proj(x)[rows, cols])
