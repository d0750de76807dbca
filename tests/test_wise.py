"""WISE (editors/wise.py): an edit goes into the side memory, unrelated text keeps the main memory,
shard masks, the clamp, merges through editors/merging.py, save/load and exact restore."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import editors.wise as wise_module
from editors.base import Resources
from editors.core.tokens import answer_ids
from editors.merging import merge_models, variant
from editors.patch import Adapter, ModulePatch
from editors.requests import EditRequest
from editors.wise import Wise, WiseAdapter, WiseConfig, _route, corpus_sentences
from tests.editing_fixtures import SPECS

MODULES = {
    "gpt2": "transformer.h.{}.mlp.c_fc",  # Conv1D (the reference's GPT-2 choice)
    "gptj": "transformer.h.{}.mlp.fc_out",  # nn.Linear with a bias
    "llama": "model.layers.{}.mlp.down_proj",  # nn.Linear without one
}
LOC = ["The weather in the valley was mild that year.", "He wrote three novels before retiring to the coast."]
UNRELATED = LOC[1]  # a loc text: the margin loss pushes its score below α
REQUESTS = [
    EditRequest("0", "The mother tongue of {} is", "Danielle Darrieux", "English", "French"),
    EditRequest("1", "{} is located in the country of", "Paris", "Japan", "France"),
    EditRequest("2", "{} plays the instrument", "Toko Yasuda", "violin", "guitar"),
    EditRequest("3", "The mother tongue of {} is", "Apple A5", "Dutch", "English"),
]


def _editor(arch: str, net, tok, **settings) -> Wise:
    cfg = WiseConfig(
        module=MODULES[arch], layer=1, loc_texts=LOC, n_iter=settings.pop("n_iter", 15), context_templates=[]
    )
    for key, value in settings.items():
        setattr(cfg, key, value)
    cfg.__post_init__()
    editor = Wise(cfg, SPECS[arch])
    editor.prepare(net, tok, Resources())
    return editor


def _logp(net, tok, prompt: str, target: str) -> float:
    ids, ans = tok(prompt)["input_ids"], answer_ids(tok, " " + target)
    with torch.no_grad():
        lp = net(torch.tensor([ids + ans])).logits.log_softmax(-1)[0]
    return float(sum(lp[len(ids) - 1 + i, a] for i, a in enumerate(ans)) / len(ans))


def _params(net):
    return {n: p.detach().clone() for n, p in net.named_parameters()}


def _scores(adapter: WiseAdapter, net, tok, text: str) -> torch.Tensor:
    """The side memory's routed scores on ``text`` (every position)."""
    seen = {}

    def hook(_m, args, _out):
        x = args[0]
        seen["s"] = adapter._scores(adapter.inner(x), adapter._linear(x, adapter.side))

    handle = adapter.register_forward_hook(hook)
    try:
        with torch.no_grad():
            net(tok(text, return_tensors="pt").input_ids)
    finally:
        handle.remove()
    return seen["s"][0]


def test_an_edit_raises_p_target_new_and_leaves_the_model_as_found(edit_setup):
    arch, tok, net, _stats = edit_setup
    editor = _editor(arch, net, tok)
    request = REQUESTS[0]
    before, params = _logp(net, tok, request.text, request.target_new), _params(net)
    modules = [id(m) for m in net.modules()]
    edit = editor.apply(net, tok, [request])
    assert isinstance(edit, ModulePatch) and [id(m) for m in net.modules()] == modules
    assert all(torch.equal(params[n], p) for n, p in net.named_parameters())
    handle = edit.attach(net)
    try:
        adapter = net.get_submodule(editor.config.module_name)
        assert isinstance(adapter, WiseAdapter) and adapter.edits == 1
        # the edit's own text scores above τ (it routes to the side memory) ...
        tau = float(adapter.threshold(adapter.side_min_act))
        assert float(_scores(adapter, net, tok, f"{request.text} {request.target_new}")[-1]) >= tau
        assert _logp(net, tok, request.text, request.target_new) > before + 0.5
    finally:
        handle.restore()
    assert all(torch.equal(params[n], p) for n, p in net.named_parameters())


@pytest.mark.parametrize(
    ("arch", "routing"),
    # (prefix routing decides LLaMA's BOS position, shared by every input, by its own score: see
    # the module docstring; the reference's sequence rule averages it in)
    [("gpt2", "prefix"), ("gptj", "prefix"), ("gpt2", "sequence"), ("llama", "sequence")],
)
def test_an_unrelated_prompt_below_tau_keeps_the_main_memory_exactly(arch, routing):
    from tests.editing_fixtures import model, tokenizer

    tok = tokenizer(arch)
    net = model(arch, tok)
    editor = _editor(arch, net, tok, n_iter=40, routing=routing, loc_texts=[UNRELATED])
    ids = tok(UNRELATED, return_tensors="pt").input_ids
    with torch.no_grad():
        unedited = net(ids).logits
    handle = editor.apply(net, tok, [REQUESTS[0]]).attach(net)
    try:
        adapter = net.get_submodule(editor.config.module_name)
        tau = adapter.threshold(adapter.side_min_act)
        scores = _scores(adapter, net, tok, UNRELATED)
        assert bool((scores < tau).all()), (scores, tau)  # the condition of this test
        with torch.no_grad():
            edited = net(ids).logits
        assert torch.equal(edited, unedited)
        # while the edit's own text reaches τ and is changed
        assert float(_scores(adapter, net, tok, f"{REQUESTS[0].text} {REQUESTS[0].target_new}")[-1]) >= tau
    finally:
        handle.restore()


def test_generation_routes_every_token_on_its_whole_unpadded_row():
    """A WISE-edited model generates as a greedy loop of full forwards on each row alone: no left
    padding in the prefix means, no cache that would route new tokens on themselves."""
    from evaluation.generation import GenerationSettings, generate_ids
    from evaluation.unlearning import greedy_generate
    from tests.editing_fixtures import model, tokenizer

    tok = tokenizer("gpt2")
    net = model("gpt2", tok)
    editor = _editor("gpt2", net, tok, n_iter=40)
    prompts = [REQUESTS[0].text, f"{UNRELATED} Then {REQUESTS[0].text}", UNRELATED]
    handle = editor.apply(net, tok, [REQUESTS[0]]).attach(net)
    try:
        assert net.get_submodule(editor.config.module_name).sequence_routed

        def alone(prompt: str, n: int = 6) -> str:
            ids = tok(prompt)["input_ids"]
            start = len(ids)
            with torch.no_grad():
                for _ in range(n):
                    ids.append(int(net(torch.tensor([ids])).logits[0, -1].argmax()))
            return tok.decode(ids[start:], skip_special_tokens=True).strip()

        assert greedy_generate(net, tok, prompts, max_new_tokens=6, batch_size=3) == [
            alone(p) for p in prompts
        ]
        calls = []
        generate = net.generate

        def recording(**kwargs):
            calls.append((kwargs["input_ids"].shape[0], kwargs["use_cache"]))
            return generate(**kwargs)

        net.generate = recording  # Fluency's sampling: one row per call, no cache
        try:
            rows = generate_ids(net, tok, prompts, GenerationSettings(max_length=100, batch_size=3))
        finally:
            del net.generate
        assert calls == [(1, False)] * 3 and all(len(r) == 100 for r in rows)
    finally:
        handle.restore()
    assert not any(getattr(m, "sequence_routed", False) for m in net.modules())


def test_routing_prefix_scores_ignore_right_padding_and_later_tokens():
    d = torch.tensor([[1.0, 3.0, 2.0, 9.0], [1.0, 3.0, 0.0, 0.0]])  # row 1: two pads at the right
    s = _route(d, "prefix", None)
    assert s[0, :3].tolist() == s[1, :3].tolist()[:2] + [2.0]
    assert s[1, :2].tolist() == [1.0, 2.0]
    assert _route(d, "sequence", None)[0].tolist() == [3.75] * 4
    assert torch.equal(_route(d, "token", None), d)
    long = _route(torch.tensor([[1.0, 5.0, 2.0, 1.0]]), "prefix", 2)  # from position 2 on: running max
    assert long.tolist() == [[1.0, 3.0, 5.0, 5.0]]


def test_the_gradient_mask_trains_only_mask_ratio_of_the_entries():
    from tests.editing_fixtures import model, tokenizer

    tok = tokenizer("gpt2")
    net = model("gpt2", tok)
    w0 = net.get_submodule("transformer.h.1.mlp.c_fc").weight.detach().clone()
    editor = _editor("gpt2", net, tok, weight_decay=0.0, mask_ratio=0.3)
    edit = editor.apply(net, tok, [REQUESTS[0]])
    side = edit.modules["transformer.h.1.mlp.c_fc"].side.detach()
    mask = editor.shard_mask(0, side).bool()
    assert abs(mask.float().mean().item() - 0.3) < 0.02
    changed = side != w0
    assert not bool(changed[~mask].any())  # nothing outside the shard's mask moved
    assert changed[mask].float().mean().item() > 0.5
    # the released SGD weight decay (1e-5) shrinks every entry a little, masked or not
    editor = _editor("gpt2", net, tok, mask_ratio=0.3, n_iter=3)
    side = editor.apply(net, tok, [REQUESTS[0]]).modules["transformer.h.1.mlp.c_fc"].side.detach()
    steps = 3  # no early stop this soon
    torch.testing.assert_close(side[~mask], w0[~mask] * (1 - 1.0 * 1e-5) ** steps)


def test_the_clamp_keeps_w_prime_within_norm_constraint_of_w():
    from tests.editing_fixtures import model, tokenizer

    tok = tokenizer("gpt2")
    net = model("gpt2", tok)
    w0 = net.get_submodule("transformer.h.1.mlp.c_fc").weight.detach().clone()
    editor = _editor("gpt2", net, tok, norm_constraint=0.01)
    side = editor.apply(net, tok, [REQUESTS[0]]).modules["transformer.h.1.mlp.c_fc"].side.detach()
    gap = (side - w0).abs()
    assert gap.max().item() <= 0.01 + 1e-6
    assert (gap > 0.01 - 1e-6).sum().item() > 0  # the clamp was reached


def _sequential(editor, net, tok, requests):
    kept, adapters = None, []
    for request in requests:
        edit = editor.apply(net, tok, [request])
        adapters.append(edit.modules[editor.config.module_name])
        handle = edit.attach(net)
        kept = handle if kept is None else kept.merge(handle)
    return kept, adapters


def test_shards_are_stored_and_merged_at_merge_freq_with_editors_merging(monkeypatch):
    from tests.editing_fixtures import model, tokenizer

    calls = []

    def recording(base, models, config):
        out = merge_models(base, models, config)
        calls.append((base, models, config, out))
        return out

    monkeypatch.setattr(wise_module, "merge_models", recording)
    tok = tokenizer("gpt2")
    net = model("gpt2", tok)
    w0 = net.get_submodule("transformer.h.1.mlp.c_fc").weight.detach().clone()
    editor = _editor("gpt2", net, tok, save_freq=1, merge_freq=2, n_iter=5)
    params, modules = _params(net), [id(m) for m in net.modules()]
    kept, adapters = _sequential(editor, net, tok, REQUESTS[:3])
    try:
        first, second, third = adapters
        assert first.n_memories == 1  # edit 1: its shard stored (merged only at edit 2, below)
        assert torch.equal(first.side, w0)  # W′ restarts from W for the next shard
        # edit 2: shards 1 and 2 TIES-merged into one memory (editors.merging, EasyEdit's GTA)
        assert len(calls) == 1
        base, models, config, out = calls[0]
        assert torch.equal(base["w"], w0) and models[0]["w"] is first.memory_0 and len(models) == 2
        assert config == variant("easyedit", density=0.53, weights=[0.5, 0.5])
        assert second.n_memories == 1 and second.memory_0 is out["w"]
        assert second.memory_min_act.tolist()[0] <= first.memory_min_act.tolist()[0]
        # edit 3: a new shard stored next to the merged memory, which is shared, not copied
        assert third.n_memories == 2 and third.memory_0 is second.memory_0 and len(calls) == 1
    finally:
        kept.restore()
    # restore is exact: the same module objects, the parameters bit for bit
    assert [id(m) for m in net.modules()] == modules
    assert all(torch.equal(params[n], p) for n, p in net.named_parameters())
    assert editor.edits == 3
    editor.reset()
    assert editor.edits == 0 and editor._mask is None and editor.history == []


def test_wise_merge_merges_into_one_memory_with_the_released_weights(monkeypatch):
    from tests.editing_fixtures import model, tokenizer

    calls = []

    def recording(base, models, config):
        calls.append((len(models), list(config.weights)))
        return merge_models(base, models, config)

    monkeypatch.setattr(wise_module, "merge_models", recording)
    tok = tokenizer("gpt2")
    net = model("gpt2", tok)
    editor = _editor("gpt2", net, tok, save_freq=1, merge_freq=2, n_iter=5, retrieve=False)
    kept, adapters = _sequential(editor, net, tok, REQUESTS)
    try:
        # edit 1: a stored shard; evaluation sees it merged (the reference's WISE.__call__)
        assert adapters[0].n_pending == 1 and adapters[0].merged is None and adapters[0].eval_side_base
        # edit 2: the first merge, weights/n; edit 4: 0.4/n per shard and 0.6 for the merged memory
        assert calls[0] == (1, [1.0]) and calls[1] == (2, [0.5, 0.5])
        assert adapters[1].merged is not None and adapters[1].n_pending == 0
        assert calls[-1] == (3, [0.2, 0.2, 0.6])
        assert adapters[3].merged is not adapters[1].merged
    finally:
        kept.restore()


def test_an_edit_starts_from_the_adapter_in_the_model_and_batch_mode_starts_fresh():
    from tests.editing_fixtures import model, tokenizer

    tok = tokenizer("gpt2")
    net = model("gpt2", tok)
    editor = _editor("gpt2", net, tok, n_iter=5)
    first = editor.apply(net, tok, [REQUESTS[0]])
    handle = first.attach(net)
    second = editor.apply(net, tok, [REQUESTS[1]])
    adapter1, adapter2 = first.modules["transformer.h.1.mlp.c_fc"], second.modules["transformer.h.1.mlp.c_fc"]
    assert adapter2 is not adapter1 and adapter2.edits == 2
    assert adapter2.inner is adapter1.inner and not isinstance(adapter2.inner, Adapter)  # the base module
    assert net.get_submodule("transformer.h.1.mlp.c_fc") is adapter1  # apply left the model as found
    assert adapter2.side.data_ptr() != adapter1.side.data_ptr()
    handle.restore()
    editor.reset()
    again = editor.apply(net, tok, [REQUESTS[0]]).modules["transformer.h.1.mlp.c_fc"]
    assert again.edits == 1 and torch.equal(again.side, adapter1.side)  # same mask, same training


def test_save_and_load_rebuild_an_identical_adapter():
    from tests.editing_fixtures import model, tokenizer

    tok = tokenizer("gpt2")
    net = model("gpt2", tok)
    x = torch.randn(2, 5, 48)
    for retrieve in (True, False):
        editor = _editor("gpt2", net, tok, save_freq=1, merge_freq=2, n_iter=4, retrieve=retrieve)
        kept, adapters = _sequential(editor, net, tok, REQUESTS[:3])
        try:
            adapter = adapters[-1]
            config = json.loads(json.dumps(adapter.adapter_config()))
            state = {k: v.clone() for k, v in adapter.adapter_state().items()}
            assert not any(k.startswith("inner.") for k in state)
            inner = copy.deepcopy(adapter.inner)
            rebuilt = WiseAdapter.rebuild(inner, config, state)
            assert rebuilt.adapter_config() == adapter.adapter_config()
            assert rebuilt.adapter_state().keys() == adapter.adapter_state().keys()
            for k, v in adapter.adapter_state().items():
                assert torch.equal(rebuilt.adapter_state()[k], v), k
            with torch.no_grad():
                assert torch.equal(rebuilt(x), adapter(x))
        finally:
            kept.restore()


def test_retrieval_takes_the_memory_with_the_largest_score_above_its_threshold():
    torch.manual_seed(0)
    inner = nn.Linear(4, 3)
    adapter = WiseAdapter(
        inner, act="relu", act_ratio=1.0, retrieve=True, routing="token", long_sequence=None
    )
    w = inner.weight.detach()
    near, far = w.clone(), w.clone()
    near[:, 0] += 1.0  # moves outputs of inputs along e0 a little ...
    far[:, 0] += 5.0  # ... and a lot
    adapter.set_memories([near, far], [0.5, 100.0])  # far's threshold is out of reach
    x = torch.zeros(1, 3, 4)
    x[0, 1, 0] = 1.0  # position 1 reads e0, the others nothing
    x[0, 2, 1] = 1.0
    with torch.no_grad():
        out = adapter(x)
        s_near = adapter.distance(inner(x), adapter._linear(x, near))[0]
    assert s_near[1] > 0.5 >= s_near[0]
    torch.testing.assert_close(out[0, 1], adapter._linear(x, near)[0, 1])
    assert torch.equal(out[0, 0], inner(x)[0, 0]) and torch.equal(out[0, 2], inner(x)[0, 2])
    adapter.set_memories([near, far], [0.5, 0.1])  # now far is eligible and scores higher
    with torch.no_grad():
        torch.testing.assert_close(adapter(x)[0, 1], adapter._linear(x, far)[0, 1])


def test_default_context_templates_and_corpus_loc_sentences():
    from tests.editing_fixtures import model, tokenizer

    tok = tokenizer("gpt2")
    net = model("gpt2", tok)
    editor = Wise(WiseConfig(module=MODULES["gpt2"], layer=1, n_iter=2), SPECS["gpt2"])
    paragraphs = [
        "A short one .",
        "Robert Boulter is an English film , television and theatre actor . He had a guest @-@ starring role .",
    ]

    class Stats:
        texts = staticmethod(lambda: iter(paragraphs))

    editor.prepare(net, tok, Resources(stats=Stats()))
    assert len(editor.templates) == 11 and editor.templates[0] == "{}"  # "{}" + 5 + 5 greedy continuations
    assert all(t.endswith(" {}") for t in editor.templates[1:])
    assert editor.loc == ["Robert Boulter is an English film, television and theatre actor."]
    assert corpus_sentences(paragraphs, 5)[0].startswith("Robert")
    edit = editor.apply(net, tok, [REQUESTS[0]])
    assert edit.diagnostics["wise_steps"] >= 1


def test_unlearning_takes_the_retain_pairs_as_loc_texts_unless_told_otherwise():
    from tests.editing_fixtures import model, tokenizer

    tok = tokenizer("gpt2")
    net = model("gpt2", tok)
    retain = (("Question: Who wrote it?\nAnswer:", "Jaime Vasquez."), ("Question: Where?\nAnswer:", "Chile."))

    class Stats:
        texts = staticmethod(lambda: iter(["He wrote three novels before retiring to the coast ."]))

    def loc(**settings) -> list[str]:
        editor = Wise(
            WiseConfig(module=MODULES["gpt2"], layer=1, context_templates=[], **settings), SPECS["gpt2"]
        )
        editor.prepare(net, tok, Resources(stats=Stats(), retain=retain))
        return editor.loc

    assert loc() == ["Question: Who wrote it?\nAnswer: Jaime Vasquez.", "Question: Where?\nAnswer: Chile."]
    assert loc(loc_from_retain=False) == ["He wrote three novels before retiring to the coast."]
    assert loc(loc_texts=["Given."]) == ["Given."]


def test_a_request_without_a_subject_is_edited_like_any_other():
    from tests.editing_fixtures import model, tokenizer

    tok = tokenizer("gpt2")
    net = model("gpt2", tok)
    editor = _editor("gpt2", net, tok)
    request = EditRequest("q", "Who wrote the letters of Toko Yasuda?", None, "nobody", None)
    before = _logp(net, tok, request.text, request.target_new)
    handle = editor.apply(net, tok, [request]).attach(net)
    try:
        assert _logp(net, tok, request.text, request.target_new) > before + 0.5
    finally:
        handle.restore()


def test_bad_settings_fail_in_one_line():
    with pytest.raises(ValueError, match="editor.merge_freq"):
        WiseConfig(save_freq=3, merge_freq=4)
    with pytest.raises(ValueError, match="editor.routing"):
        WiseConfig(routing="mean")
    with pytest.raises(ValueError, match="editor.act_margin"):
        WiseConfig(act_margin=[1.0, 2.0])
