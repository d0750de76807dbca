"""SERAC (editors/serac.py) on tiny random models: routing (in scope to the counterfactual model,
everything else to the base model bit for bit), logits aligned with the input's own positions,
exact restore and accumulating sequential memories, generation, training that lowers both
validation losses, SSS's gradient into the counterfactual model, and the artifact trained once
then loaded."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import torch

import editors.serac as serac_mod
from editors.base import Artifact, Resources
from editors.core.tokens import right_pad
from editors.patch import HandleStack
from editors.serac import (
    _ROUTER,
    Serac,
    SeracConfig,
    SeracLoss,
    _Batch,
    _context_ids,
    _examples,
    counterfactual_logits,
    train_serac,
)
from runner.artifacts import ArtifactStore
from runner.datasets import load_from_config
from runner.pipeline import prepare_artifacts
from tests.editing_fixtures import SPECS, model, tokenizer

UNRELATED = "In 1907, the weather over the harbour was"
TRAIN = {"name": "counterfact_train", "size": 40}


def _cfg(**overrides) -> SeracConfig:
    base = dict(
        lr=1e-3,
        max_steps=60,
        val_every=20,
        checkpoint_every=20,
        accumulate=1,
        batch_size=4,
        val_cases=8,
        patience=None,
        train_data=TRAIN,
    )
    return SeracConfig(**(base | overrides))


@pytest.fixture(scope="module")
def cases():
    return list(load_from_config(TRAIN).cases)


@pytest.fixture(scope="module")
def trained(cases, tmp_path_factory):
    torch.set_num_threads(1)
    tok = tokenizer("gpt2")
    net = model("gpt2", tok)
    editor = Serac(_cfg(), SPECS["gpt2"])
    classifier, cf = editor._build(net, tok)
    report = train_serac(editor.config, net, tok, classifier, cf, cases, tmp_path_factory.mktemp("ck"), False)
    editor.classifier, editor.counterfactual = classifier.eval(), cf.eval()
    for p in list(classifier.parameters()) + list(cf.parameters()):
        p.requires_grad_(False)
    return editor, net, tok, report


def _batch_logits(net, tok, texts):
    """Logits of ``texts``, right-padded (as the scorer), and their token rows."""
    rows = [tok(t)["input_ids"] for t in texts]
    ids, mask = right_pad(rows, tok.eos_token_id)
    with torch.no_grad():
        return net(input_ids=ids, attention_mask=mask, use_cache=False).logits, rows


def _left_padded(tok, texts) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` of ``texts``, left-padded as evaluation.generation."""
    rows = [tok(t)["input_ids"] for t in texts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tok.eos_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    return ids, mask


def test_training_lowers_both_validation_losses(trained):
    *_, report = trained
    first, last = report["validation"][0], report["validation"][-1]
    assert report["steps"] == 60 and [v["step"] for v in report["validation"]] == [0, 20, 40, 60]
    assert (
        last["edit_nll"] < first["edit_nll"] - 0.5
    )  # the counterfactual model's NLL with the edit in context
    assert last["loc"] < first["loc"] - 0.2  # the classifier's balanced BCE


def test_in_scope_rows_go_to_the_counterfactual_model_others_to_the_base_model(trained, cases):
    editor, net, tok, _ = trained
    case = cases[0]
    paraphrase = case.probes["paraphrase"][0].prompt + " " + case.request.target_new
    texts = [paraphrase, UNRELATED]
    before, rows = _batch_logits(net, tok, texts)
    params = {n: p.detach().clone() for n, p in net.named_parameters()}
    edit = editor.apply(net, tok, [case.request])
    assert all(torch.equal(p, params[n]) for n, p in net.named_parameters())  # apply changes nothing
    handle = edit.attach(net)
    assert handle.model is net and handle.changes_forward
    after, _ = _batch_logits(net, tok, texts)
    router = net.__dict__[_ROUTER]
    assert router.last_routes == [0, -1]
    assert torch.equal(after[1], before[1])  # out of scope: the base model's logits, bit for bit
    assert not torch.allclose(after[0], before[0])
    # in scope: the counterfactual model's logits on "context + separator + row", at the row's positions
    ctx = _context_ids(tok, f"{case.request.text} {case.request.target_new}", editor.config.separator)
    with torch.no_grad():
        direct = editor.counterfactual(input_ids=torch.tensor([ctx + rows[0]])).logits[0]
    n = len(rows[0])
    assert torch.allclose(after[0, :n], direct[len(ctx) : len(ctx) + n], atol=1e-5)
    assert torch.equal(after[0, n:], before[0, n:])  # padding positions keep the base logits
    # the edit answers where the base model does not (teacher-forced target_new on its paraphrase)
    from evaluation.scoring import score_texts

    pair = [(case.probes["paraphrase"][0].prompt, case.request.target_new)]
    edited = score_texts(net, tok, pair, batch_size=1)[0][0]
    handle.restore()
    editor.reset()
    assert score_texts(net, tok, pair, batch_size=1)[0][0] < edited
    restored, _ = _batch_logits(net, tok, texts)
    assert torch.equal(restored, before)
    assert all(torch.equal(p, params[n]) for n, p in net.named_parameters())


def test_aligned_positions_with_a_bos_token(cases):
    tok = tokenizer("llama")
    net = model("llama", tok)
    assert tok.bos_token_id is not None
    row = tok("The mother tongue of Danielle Darrieux is French")["input_ids"]
    assert row[0] == tok.bos_token_id
    ctx = _context_ids(tok, "Danielle Darrieux speaks English", " ")
    with torch.no_grad():
        routed, _ = counterfactual_logits(net, tok, [ctx], [row], len(tok))
        direct = net(input_ids=torch.tensor([ctx + row[1:]])).logits[0]
    # row position j >= 1 is counterfactual position len(ctx) + j - 1; the BOS maps to the context's end
    assert torch.allclose(routed[0, 1:], direct[len(ctx) :], atol=1e-5)
    assert torch.allclose(routed[0, 0], direct[len(ctx) - 1], atol=1e-5)


def test_sequential_memories_accumulate_and_restore_is_exact(trained, cases):
    editor, net, tok, _ = trained
    before, _ = _batch_logits(net, tok, [UNRELATED])
    h1 = editor.apply(net, tok, [cases[0].request]).attach(net)
    h2 = editor.apply(net, tok, [cases[1].request, cases[2].request]).attach(net)
    kept = h1.merge(h2)
    assert isinstance(kept, HandleStack) and kept.changes_forward
    router = net.__dict__[_ROUTER]
    assert [e.case_id for e in router.memory] == [c.case_id for c in cases[:3]]
    assert router.keys.shape[0] == 3
    assert editor.history == [c.case_id for c in cases[:3]]
    kept.restore()
    editor.reset()
    assert _ROUTER not in net.__dict__ and "generate" not in net.__dict__
    after, _ = _batch_logits(net, tok, [UNRELATED])
    assert torch.equal(after, before)
    # a left-over hook is refused
    h = editor.apply(net, tok, [cases[0].request]).attach(net)
    extra = net.register_forward_hook(lambda *a: None)
    with pytest.raises(RuntimeError, match="hooks"):
        h.restore()
    extra.remove()
    editor.reset()


def test_generation_is_routed_per_prompt(trained, cases):
    editor, net, tok, _ = trained
    case = cases[0]
    prompts = [case.probes["paraphrase"][0].prompt, UNRELATED]
    ids, mask = _left_padded(tok, prompts)
    width = ids.shape[1]
    kwargs = dict(do_sample=False, max_new_tokens=4, pad_token_id=tok.eos_token_id)
    base = net.generate(input_ids=ids[1:], attention_mask=mask[1:], **kwargs)
    handle = editor.apply(net, tok, [case.request]).attach(net)
    try:
        out = net.generate(input_ids=ids, attention_mask=mask, **kwargs)
        assert net.__dict__[_ROUTER].last_routes == [0, -1]
    finally:
        handle.restore()
        editor.reset()
    assert out.shape == (2, width + 4) and torch.equal(out[:, :width], ids)
    assert torch.equal(out[1], base[0])  # out of scope: the base model's generation


def test_sss_with_c_1_still_trains_the_counterfactual_model(cases):
    tok = tokenizer("gpt2")
    net = model("gpt2", tok)
    cfg = _cfg(sss_coefficient=1.0)
    editor = Serac(cfg, SPECS["gpt2"])
    classifier, cf = editor._build(net, tok)
    loss = SeracLoss(cfg, net, tok, classifier, cf)
    import random

    batch = _Batch(_examples(cases[:3], random.Random(0)))
    total = loss(batch)
    plain = SeracLoss(_cfg(), net, tok, classifier, cf)(batch)
    assert not torch.allclose(total, plain)  # l_edit replaced by SSS
    total.backward()
    grads = [p.grad for p in cf.parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0
    assert all(p.grad is None for p in net.parameters())  # the base model is never trained


def test_artifact_is_trained_once_then_loaded(cases, tmp_path, monkeypatch):
    tok = tokenizer("gpt2")
    net = model("gpt2", tok)
    editor = Serac(_cfg(max_steps=4, val_every=2, checkpoint_every=2), SPECS["gpt2"])
    (need,) = editor.requirements()
    assert isinstance(need, Artifact) and need.name == "serac" and '"size": 40' in need.data
    store = ArtifactStore(tmp_path / "artifacts", "tiny", "r0", allow_train=True)
    loaded = types.SimpleNamespace(model=net, tokenizer=tok)
    calls = []
    real = serac_mod.train_serac

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(serac_mod, "train_serac", counting)
    folders = prepare_artifacts(editor, loaded, store)
    assert len(calls) == 1 and {p.name for p in Path(folders["serac"]).iterdir()} >= {
        "classifier",
        "counterfactual",
        "artifact.json",
    }
    again = Serac(_cfg(max_steps=4, val_every=2, checkpoint_every=2), SPECS["gpt2"])
    assert prepare_artifacts(again, loaded, store) == folders and len(calls) == 1
    again.prepare(net, tok, Resources(artifacts=folders))
    assert not any(p.requires_grad for p in again.counterfactual.parameters())
    handle = again.apply(net, tok, [cases[0].request]).attach(net)
    handle.restore()
    assert json.loads((Path(folders["serac"]) / "artifact.json").read_text())["steps"] == 4
    capped = prepare_artifacts(
        Serac(editor.config, SPECS["gpt2"]), loaded, store, None, 2
    )  # artifact_max_steps
    assert (
        capped != folders and json.loads((Path(capped["serac"]) / "artifact.json").read_text())["steps"] == 2
    )
    # another recipe is another artifact
    other = Serac(_cfg(max_steps=4, val_every=2, checkpoint_every=2, lr=2e-3), SPECS["gpt2"])
    assert other.requirements()[0].recipe != need.recipe
