"""GRACE (editors/grace.py): the codebook rules on hand-made keys, and edits of tiny random models of
the three architectures (an edit works, far inputs are untouched bit for bit, sequential edits keep
the earlier ones, restore is exact, a saved adapter loads back identical)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from editors.grace import EXPAND, INSIDE, NEW, SPLIT, Grace, GraceAdapter, GraceConfig
from editors.hooks import get_module
from editors.patch import ModulePatch, unwrap
from editors.requests import EditRequest
from evaluation.scoring import score_texts
from tests.editing_fixtures import SPECS, model, tokenizer

FAR = "In 1907, the weather over the harbour was"


@pytest.fixture(scope="module", params=("gpt2", "gptj", "llama"))
def arch_setup(request):
    arch = request.param
    tok = tokenizer(arch)
    return arch, tok, model(arch, tok)


def _requests():
    return [
        # " Apple" is one token of the tiny tokenizers, " piano" three: a value that replaces one
        # position's output reaches later answer tokens only through attention
        EditRequest("c1", "The mother tongue of {} is", "Danielle Darrieux", "Apple", "French"),
        EditRequest(
            "c2", "{} is located in the country of", "Autonomous University of Madrid", "piano", "Spain"
        ),
    ]


def _editor(arch, **overrides) -> Grace:
    cfg = GraceConfig(**({"layer": 1, "n_iter": 40} | overrides))
    return Grace(cfg, SPECS[arch])


def _logprob(net, tok, request: EditRequest) -> float:
    return score_texts(net, tok, [(request.text, request.target_new)], batch_size=1)[0][0]


def _logits(net, tok, texts):
    tok.padding_side = "right"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    enc = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return net(**enc).logits


# ------------------------------------------------------------------------------ codebook rules


def _codebook(replacement="replace_last") -> GraceAdapter:
    inner = nn.Linear(2, 2)
    return GraceAdapter(inner, 2, 2, replacement)


def test_radius_rules_new_split_expand_inside():
    book = _codebook()
    v = torch.zeros(2)
    assert book.insert(torch.tensor([0.0, 0.0]), "A", v, 1.0)[:2] == (NEW, 0)
    # far from every key (5 > ε_init + ε_0 = 2): a new key with ε_init
    action, entry, dist = book.insert(torch.tensor([5.0, 0.0]), "B", v, 1.0)
    assert (action, entry, dist) == (NEW, 1, pytest.approx(5.0))
    assert book.eps.tolist() == [1.0, 1.0]
    # within ε_init + ε_0 of key 0 with another label: a new key, both radii halved
    action, entry, dist = book.insert(torch.tensor([1.5, 0.0]), "C", v, 1.0)
    assert (action, entry) == (SPLIT, 2)
    assert book.eps[0].item() == pytest.approx(0.75 - 1e-5)
    assert book.eps[2].item() == pytest.approx(0.75)
    # same label as key 0, outside its ε: ε grows to the distance (coverage), no new key
    action, entry, dist = book.insert(torch.tensor([0.0, 1.2]), "A", v, 1.0)
    assert (action, entry) == (EXPAND, 0) and len(book) == 3
    assert book.eps[0].item() == pytest.approx(1.2)
    assert book.keys[0].tolist() == [0.0, 0.0]
    # the edit that set a radius to its distance (float64, stored as float32) is matched again
    q = torch.tensor([0.4, 1.2])
    assert book.insert(q, "A", v, 1.0)[:2] == (EXPAND, 0)
    assert book.eps[0].item() >= (0.4**2 + 1.2**2) ** 0.5
    book.values[0] = torch.tensor([4.0, 4.0])
    assert book(q.view(1, 1, 2))[0, 0].tolist() == [4.0, 4.0]
    # same label, inside: nothing changes
    assert book.insert(torch.tensor([0.0, 0.5]), "A", v, 1.0)[:2] == (INSIDE, 0)
    assert book.eps[0].item() == pytest.approx(1.6**0.5) and len(book) == 3
    assert book.labels == ["A", "B", "C"]


def test_moving_average_moves_the_key_halfway():
    book = _codebook()
    book.insert(torch.tensor([0.0, 0.0]), "A", torch.zeros(2), 1.0)
    assert book.insert(torch.tensor([0.0, 1.6]), "A", torch.zeros(2), 1.0, "moving_average")[0] == EXPAND
    assert book.keys[0].tolist() == pytest.approx([0.0, 0.8]) and book.eps[0].item() == pytest.approx(1.6)


def test_lookup_replaces_within_eps_only_and_ties_go_to_the_latest_entry():
    book = _codebook()
    book.insert(torch.tensor([0.0, 0.0]), "A", torch.tensor([7.0, 7.0]), 1.0)
    x = torch.tensor([[[0.0, 0.9], [3.0, 3.0], [0.1, 0.0]]])  # [1, 3, 2]: in, out, in
    y = book(x)
    own = book.inner(x)
    assert y[0, 0].tolist() == [7.0, 7.0] and y[0, 2].tolist() == [7.0, 7.0]
    assert torch.equal(y[0, 1], own[0, 1])
    far = torch.tensor([[[4.0, 4.0], [-3.0, 2.0]]])
    assert torch.equal(book(far), book.inner(far))
    # the same key edited again with another label: split at d = 0, the new entry answers
    assert book.insert(torch.tensor([0.0, 0.0]), "B", torch.tensor([-1.0, -1.0]), 1.0)[0] == SPLIT
    assert book(torch.zeros(1, 1, 2))[0, 0].tolist() == [-1.0, -1.0]


def test_copies_share_rows_but_never_see_each_others_writes():
    a = _codebook()
    for i in range(3):
        a.insert(torch.tensor([10.0 * i, 0.0]), f"L{i}", torch.full((2,), float(i)), 1.0)
    snapshot = {k: v.clone() for k, v in a.adapter_state().items()}
    b, c = a.copy(), a.copy()
    assert b.keys.data_ptr() == a.keys.data_ptr()  # shared rows, not copied
    b.insert(torch.tensor([0.0, 50.0]), "B", torch.full((2,), 7.0), 1.0)  # appended in place
    c.insert(torch.tensor([0.0, -50.0]), "C", torch.full((2,), 8.0), 1.0)  # a fork: its own rows
    assert b.insert(torch.tensor([0.5, 0.0]), "L0", torch.zeros(2), 1.0)[:2] == (INSIDE, 0)
    b.set_value(0, torch.full((2,), -3.0))  # an existing row: copied before it is written
    b.insert(torch.tensor([20.0, 1.5]), "X", torch.zeros(2), 1.0)  # split: ε of row 2 shrinks in b only
    for k, v in a.adapter_state().items():
        assert torch.equal(v, snapshot[k]), k
    assert len(a) == 3 and a.labels == ["L0", "L1", "L2"]
    assert b.values[0].tolist() == [-3.0, -3.0] and b.values[3].tolist() == [7.0, 7.0] and len(b) == 5
    assert c.values[3].tolist() == [8.0, 8.0] and c.keys[3].tolist() == [0.0, -50.0] and len(c) == 4
    assert b.eps[2].item() < 1.0 and c.eps[2].item() == 1.0


def test_tie_break_latest_or_first():
    for tie, answer in (("latest", [-1.0, -1.0]), ("first", None)):
        inner = nn.Linear(2, 2)
        book = GraceAdapter(inner, 2, 2, tie_break=tie)
        book.insert(torch.zeros(2), "A", torch.full((2,), 3.0), 1.0)
        # the same key again with another label: split at d = 0 (ε_old = -1e-5, ε_new = 0)
        assert book.insert(torch.zeros(2), "B", torch.full((2,), -1.0), 1.0)[:2] == (SPLIT, 1)
        x = torch.zeros(1, 1, 2)
        if answer is None:  # the reference: the first entry is nearest, outside its radius
            assert torch.equal(book(x), inner(x))
        else:
            assert book(x)[0, 0].tolist() == answer


def test_replace_prompt_and_replace_all_per_position():
    x = torch.tensor(
        [[[5.0, 5.0], [6.0, 6.0], [0.0, 0.0], [8.0, 8.0]], [[5.0, 5.0], [6.0, 6.0], [7.0, 7.0], [8.0, 8.0]]]
    )
    for mode, changed in (("replace_prompt", [0, 1]), ("replace_all", [0, 1, 2, 3])):
        book = _codebook(mode)
        book.insert(torch.tensor([0.0, 0.0]), "A", torch.tensor([9.0, 9.0]), 1.0)
        y, own = book(x), book.inner(x)
        for t in range(4):
            if t in changed:
                assert y[0, t].tolist() == [9.0, 9.0], (mode, t)
            else:
                assert torch.equal(y[0, t], own[0, t]), (mode, t)
        assert torch.equal(y[1], own[1])  # no match in row 1


def test_bad_settings_fail_on_the_key():
    with pytest.raises(ValueError, match="editor.replacement"):
        GraceConfig(replacement="replace_first")
    with pytest.raises(ValueError, match="editor.eps"):
        GraceConfig(eps=0)
    with pytest.raises(ValueError, match="editor.module"):
        GraceConfig(module="mlp.c_fc")
    with pytest.raises(ValueError, match="out of range"):
        Grace(GraceConfig(layer=7), SPECS["gpt2"])


# ------------------------------------------------------------------------------ edits of tiny models


def test_edit_raises_target_and_leaves_far_prompts_bit_exact(arch_setup):
    arch, tok, net = arch_setup
    editor = _editor(arch)
    request = _requests()[0]
    before = _logprob(net, tok, request)
    texts = [request.text, FAR]
    plain = _logits(net, tok, texts)
    edit = editor.apply(net, tok, [request])
    name = editor.module_name()
    assert get_module(net, name) is unwrap(get_module(net, name))  # apply left the model as it was
    handle = edit.attach(net)
    try:
        after = _logprob(net, tok, request)
        edited = _logits(net, tok, texts)
        alone = _logits(net, tok, [FAR])
    finally:
        handle.restore()
    # (a random model's logits are small: log(1/400) = -6 is uniform, ~-1.5 about its ceiling)
    assert after > before + 3.0, (before, after)
    assert edit.case_diagnostics["grace_new"] == [1.0] and edit.case_diagnostics["grace_split"] == [0.0]
    assert "grace_nearest_dist_min" not in edit.diagnostics  # no earlier key
    assert torch.equal(edited[1], plain[1])  # far prompt in the same padded batch: bit for bit
    assert torch.equal(alone, _logits(net, tok, [FAR]))
    assert not torch.allclose(edited[0], plain[0])
    assert torch.equal(_logits(net, tok, texts), plain)  # restored


def test_batch_edits_and_sequential_edits_keep_the_earlier_ones(arch_setup):
    arch, tok, net = arch_setup
    editor = _editor(arch)
    r1, r2 = _requests()
    name = editor.module_name()
    base = get_module(net, name)
    plain = _logits(net, tok, [FAR])
    pre2 = _logprob(net, tok, r2)
    # one batch of two: added one after another
    both = editor.apply(net, tok, [r1, r2])
    assert both.diagnostics["grace_entries"] == 2.0 and both.diagnostics["grace_nearest_dist_min"] > 2.0
    handle = both.attach(net)
    try:
        batch_scores = [_logprob(net, tok, r) for r in (r1, r2)]
    finally:
        handle.restore()
    editor.reset()
    assert get_module(net, name) is base
    # sequentially: the second apply sees the first adapter, copies its codebook, wraps the base module
    kept = editor.apply(net, tok, [r1]).attach(net)
    first = get_module(net, name)
    score1 = _logprob(net, tok, r1)
    second = editor.apply(net, tok, [r2])
    assert get_module(net, name) is first and len(first) == 1  # apply left the model (and adapter) as found
    adapter = second.modules[name]
    assert adapter is not first and adapter.inner is base and len(adapter) == 2
    kept = kept.merge(second.attach(net))
    try:
        assert _logprob(net, tok, r1) == pytest.approx(score1, abs=1e-5)
        seq_scores = [_logprob(net, tok, r) for r in (r1, r2)]
        assert editor.history == ["c1", "c2"]
    finally:
        kept.restore()
    editor.reset()
    assert get_module(net, name) is base and torch.equal(_logits(net, tok, [FAR]), plain)
    assert batch_scores[0] > -2.5 and batch_scores[1] > pre2 + 1.0, (batch_scores, pre2)
    assert seq_scores == pytest.approx(batch_scores, abs=1e-4)  # same codebook either way


def test_saved_adapter_loads_back_identical(arch_setup):
    arch, tok, net = arch_setup
    editor = _editor(arch, n_iter=10)
    requests = _requests()
    edit = editor.apply(net, tok, requests)
    name = editor.module_name()
    adapter = edit.modules[name]
    config = json.loads(json.dumps(adapter.adapter_config()))
    state = {k: v.clone() for k, v in adapter.adapter_state().items()}
    assert set(state) == {"keys", "values", "eps"}
    rebuilt = GraceAdapter.rebuild(unwrap(get_module(net, name)), config, state)
    texts = [r.text + " " + r.target_new for r in requests] + [FAR]
    outputs = []
    for candidate in (adapter, rebuilt):
        handle = ModulePatch({name: candidate}).attach(net)
        try:
            outputs.append((_logits(net, tok, texts), [_logprob(net, tok, r) for r in requests]))
        finally:
            handle.restore()
    assert torch.equal(outputs[0][0], outputs[1][0]) and outputs[0][1] == outputs[1][1]
    assert rebuilt.labels == ["Apple", "piano"] and rebuilt.replacement == "replace_last"


def test_warm_start_and_label_mean_switches_run(arch_setup):
    arch, tok, net = arch_setup
    editor = _editor(arch, n_iter=5, val_init="warm", label_match="label_mean", replacement="replace_all")
    edit = editor.apply(copy.deepcopy(net), tok, _requests()[:1])
    adapter = next(iter(edit.modules.values()))
    assert len(adapter) == 1 and float(adapter.labels[0]) < 0  # the mean of -100s and token ids


def test_a_module_template_wraps_the_references_gpt2_layer():
    """GPT-2 XL's reference layer is mlp.c_fc (a Conv1D, not a model template): a {} template."""
    tok = tokenizer("gpt2")
    net = model("gpt2", tok)
    editor = _editor("gpt2", module="transformer.h.{}.mlp.c_fc", n_iter=3)
    assert editor.module_name() == "transformer.h.1.mlp.c_fc"
    adapter = editor.apply(net, tok, _requests()[:1]).modules["transformer.h.1.mlp.c_fc"]
    assert (adapter.dim_in, adapter.dim_out) == (48, 4 * 48) and len(adapter) == 1
