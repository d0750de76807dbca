"""MEND and MEND w/ SSS on tiny random models of the three architectures: the gradient
factorisation, training (validation loss falls; SSS reaches the hypernetwork; checkpoints resume),
editing (P(target_new) rises, the model is left bit-exact), and the artifact through the runner."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest
import torch

from editors.base import Resources
from editors.mend import Mend, MendConfig, edit_loss, factors, read_logits
from editors.requests import EditRequest
from editors.training import answer_batch
from evaluation.cases import EditCase, Probe
from evaluation.scoring import score_probes
from tests.conftest import _OBJECTS, _RELATIONS, _SUBJECTS
from tests.editing_fixtures import SPECS, model, tokenizer

# both MLP matrices of the last two of three layers (GPT-2's Conv1D, GPT-J's and LLaMA's nn.Linear)
MODULES = {
    "gpt2": ["transformer.h.{}.mlp.c_fc", "mlp_out"],
    "gptj": ["transformer.h.{}.mlp.fc_in", "mlp_out"],
    "llama": ["model.layers.{}.mlp.gate_proj", "model.layers.{}.mlp.up_proj", "mlp_out"],
}
FAST = dict(
    lr=1e-3, edit_lr=1e-2, lr_lr=1e-3, accumulate=2, val_every=20, patience=1000, val_fraction=0.25, rank=16
)


def _cases(n: int, seed: int = 0) -> list[EditCase]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        subject, relation, obj = rng.choice(_SUBJECTS), rng.choice(_RELATIONS), rng.choice(_OBJECTS)
        req = EditRequest(str(i), relation, subject, obj, None)
        probes = {
            "rewrite": (Probe(req.text, obj),),
            "paraphrase": (Probe("Note that " + req.text, obj),),
            "neighborhood": (Probe(relation.format(rng.choice(_SUBJECTS)), rng.choice(_OBJECTS)),),
        }
        out.append(EditCase(req, probes))
    return out


@pytest.fixture(scope="module", params=("gpt2", "gptj", "llama"))
def arch_setup(request):
    arch = request.param
    tok = tokenizer(arch)
    return arch, tok, model(arch, tok)


def _editor(arch: str, **kw) -> Mend:
    return Mend(MendConfig(modules=MODULES[arch], layers=[-2, -1], **{**FAST, **kw}), SPECS[arch])


def _train(editor: Mend, net, tok, tmp: Path, cases=None, ckpt: Path | None = None) -> dict:
    folder = tmp / "artifact"
    folder.mkdir(parents=True, exist_ok=True)
    ckpt = ckpt or tmp / "checkpoints"
    ckpt.mkdir(parents=True, exist_ok=True)
    need = editor.requirements()[0]
    return editor.train_artifact(need, net, tok, cases or _cases(40), folder, ckpt)


def test_factors_through_an_identity_mlp_give_the_true_weight_gradient(arch_setup):
    """With the identity init, no normalisation and η = 1, the update −Σ δ̃ x̃ᵀ is minus the autograd
    gradient of the edit loss at every edited weight (Conv1D's [in, out] layout included)."""
    arch, tok, net = arch_setup
    editor = _editor(arch, norm=False)
    mend = editor.new_net(net)
    with torch.no_grad():
        mend.edit_lrs.fill_(1.0)
    reqs = [
        ("The mother tongue of {} is", "Danielle Darrieux", " English"),
        ("{} plays the instrument", "Toko Yasuda", " piano guitar"),
    ]
    batch = answer_batch(
        tok,
        [(p, s) for p, s, _ in reqs],
        [tok(a, add_special_tokens=False)["input_ids"] for *_, a in reqs],
        "target_tokens",
        torch.device("cpu"),
    )
    params = dict(net.named_parameters())
    weights = [params[t.param] for t in mend.targets]
    loss = edit_loss(
        read_logits(net(input_ids=batch.enc.input_ids, attention_mask=batch.enc.attention_mask), batch), batch
    )
    true = torch.autograd.grad(loss, weights)
    with torch.no_grad():
        updates = mend.updates(factors(net, mend.targets, batch))
    assert {t.param for t in mend.targets} == set(updates) and len(updates) == 2 * len(MODULES[arch])
    for t, g in zip(mend.targets, true):
        assert updates[t.param].shape == g.shape
        torch.testing.assert_close(updates[t.param], -g, rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for p in net.parameters())


@pytest.fixture(scope="module")
def trained(arch_setup, tmp_path_factory):
    """One hypernetwork per architecture: 60 edits (30 steps of 2) on 30 of 40 cases."""
    arch, tok, net = arch_setup
    tmp = tmp_path_factory.mktemp(f"mend-{arch}")
    original = {n: p.detach().clone() for n, p in net.named_parameters()}
    report = _train(_editor(arch, max_iters=60), net, tok, tmp, _cases(40))
    assert all(torch.equal(original[n], p) for n, p in net.named_parameters())
    assert all(p.requires_grad for p in net.parameters()), "requires_grad flags are restored"
    return report, tmp / "artifact"


def test_training_lowers_the_validation_loss(arch_setup, trained):
    report, folder = trained
    curve = report["validation"]
    assert [s for s, _ in curve] == [0, 10, 20, 30] and report["steps"] == 30 and report["batches"] == 60
    assert report["best_val_loss"] < curve[0][1] - 0.05, curve
    assert report["best_step"] > 0 and (folder / "mend.pt").exists()
    assert report["train_cases"] == 30 and report["val_cases"] == 10 and report["resumed_from_step"] is None


def test_a_trained_edit_raises_p_target_new_and_leaves_the_model_bit_exact(arch_setup, trained):
    arch, tok, net = arch_setup
    editor = _editor(arch, max_iters=60)
    editor.prepare(net, tok, Resources(artifacts={"mend": trained[1]}))
    requests = [c.request for c in _cases(40)[:4]] + [c.request for c in _cases(4, seed=7)]
    probes = [Probe(r.text, r.target_new) for r in requests]
    before = torch.tensor([s.target_logprob for s in score_probes(net, tok, probes)])
    original = {n: p.detach().clone() for n, p in net.named_parameters()}
    flags = {n: p.requires_grad for n, p in net.named_parameters()}
    delta = editor.apply(net, tok, requests)
    assert all(torch.equal(original[n], p) for n, p in net.named_parameters())
    assert flags == {n: p.requires_grad for n, p in net.named_parameters()}
    assert set(delta.deltas) == {t.param for t in editor.net.targets}
    with delta.applied(net):
        after = torch.tensor([s.target_logprob for s in score_probes(net, tok, probes)])
    assert float((after - before).mean()) > 0.3 and int((after > before).sum()) >= 6, f"{before} -> {after}"
    assert editor.history == [r.case_id for r in requests]
    assert editor.history_state() != "" and editor.memory_knobs()
    # a request's update does not depend on the others in its batch
    single, rest = editor.apply(net, tok, requests[:1]), editor.apply(net, tok, requests[1:])
    for name, d in delta.deltas.items():
        torch.testing.assert_close(d, single.deltas[name] + rest.deltas[name], rtol=1e-4, atol=1e-6)
    editor.reset()
    assert editor.history == [] and editor.history_state() == ""


def test_an_interrupted_training_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    """Interrupted after step 10 (checkpointed there), then run again: it resumes and ends where an
    uninterrupted run ends."""
    import editors.mend as mend_module

    tok = tokenizer("gpt2")
    net = model("gpt2", tok)
    settings = dict(max_iters=40, checkpoint_every=5)
    whole = _train(_editor("gpt2", **settings), net, tok, tmp_path / "whole")
    real_fit = mend_module.fit

    def interrupted(*args, on_step, **kwargs):
        def step(rep):
            on_step(rep)
            if rep.steps == 10:
                raise KeyboardInterrupt

        return real_fit(*args, on_step=step, **kwargs)

    monkeypatch.setattr(mend_module, "fit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _train(_editor("gpt2", **settings), net, tok, tmp_path / "cut")
    monkeypatch.setattr(mend_module, "fit", real_fit)
    resumed = _train(_editor("gpt2", **settings), net, tok, tmp_path / "cut")
    assert whole["resumed_from_step"] is None and resumed["resumed_from_step"] == 10
    assert resumed["steps"] == whole["steps"] == 20
    assert [s for s, _ in resumed["validation"]] == [0, 10, 20]
    assert [v for _, v in resumed["validation"]] == pytest.approx(
        [v for _, v in whole["validation"]], rel=1e-4
    )
    assert all(p.requires_grad for p in net.parameters())


def test_sss_alone_still_trains_the_hypernetwork(arch_setup):
    """C = 1: the outer loss is SSS alone, and its gradient (create_graph) reaches the MEND MLPs and
    the edit learning rates through the edited weights."""
    arch, tok, net = arch_setup
    editor = _editor(arch, sss_coefficient=1.0)
    mend = editor.new_net(net)
    cases = [editor._encode_case(tok, c, torch.device("cpu")) for c in _cases(3)]
    batch = editor._batch(tok, cases[:2])
    for t in mend.targets:  # statistics, then a non-identity MLP (u ≠ 0)
        mend.transforms[t.key].observe(*factors(net, mend.targets, batch["edit"])[t.param])
    with torch.no_grad():
        for name, p in mend.named_parameters():
            if name.endswith(".u"):
                p.normal_(0, 0.01)
    loss, info = editor._outer_loss(net, mend, batch, train=True)
    assert float(loss.detach()) == pytest.approx(info["sss"]) and info["sss"] > 0
    loss.backward()
    grads = {n: p.grad for n, p in mend.named_parameters()}
    assert grads["edit_lrs"] is not None and float(grads["edit_lrs"].abs().sum()) > 0
    assert any(g is not None and float(g.abs().sum()) > 0 for n, g in grads.items() if n.endswith(".v"))
    plain, _ = _editor(arch)._outer_loss(net, mend, batch, train=True)
    assert float(plain.detach()) != pytest.approx(float(loss.detach()))
    net.zero_grad(set_to_none=True)


def test_the_recipe_keys_the_artifact_and_excludes_what_does_not_change_the_weights():
    spec = SPECS["gpt2"]
    base = Mend(MendConfig(layers=[-1]), spec).requirements()[0]
    assert base.name == "mend" and json.loads(base.data) == {"name": "zsre_train", "size": None}
    assert json.loads(base.recipe)["layers"] == [2] and json.loads(base.recipe)["modules"] == [spec.mlp_out]
    assert Mend(MendConfig(layers=[2]), spec).requirements()[0] == base  # -1 is layer 2 of 3
    assert (
        Mend(MendConfig(layers=[-1], edit_batch_size=4, checkpoint_every=7), spec).requirements()[0] == base
    )
    assert Mend(MendConfig(layers=[-1], sss_coefficient=0.9), spec).requirements()[0].recipe != base.recipe
    other = Mend(MendConfig(layers=[-1], train_data={"name": "counterfact_train", "size": 10}), spec)
    assert other.requirements()[0].data != base.data


def test_bad_settings_fail_naming_the_key():
    with pytest.raises(ValueError, match="editor.modules"):
        MendConfig(modules=["c_fc"])
    with pytest.raises(ValueError, match="editor.sss_coefficient"):
        MendConfig(sss_coefficient=1.5)
    with pytest.raises(ValueError, match="editor.layers"):
        Mend(MendConfig(layers=[5]), SPECS["gpt2"]).targets(model("gpt2", tokenizer("gpt2")))


def test_prepare_trains_and_caches_the_hypernetwork_then_an_edit_run_loads_it(tmp_path, caplog):
    from runner import run
    from tests.conftest import compose_config

    def cfg(*extra: str):
        return compose_config(
            "task=prepare",
            "editor=mend",
            "model=tiny-gpt2",
            "+size=tiny",
            "threads=1",
            "progress=false",
            "stats.n_samples=150",
            "editor.train_data.name=counterfact_train",
            "editor.train_data.size=24",
            "editor.max_iters=40",
            "editor.val_every=20",
            "editor.accumulate=2",
            "editor.rank=8",
            f"paths.cache_dir={tmp_path / 'cache'}",
            f"paths.output_dir={tmp_path / 'out'}",
            *extra,
        )

    with caplog.at_level(logging.INFO, logger="runner.artifacts"):
        first = run(cfg())
    folder = Path(first["artifacts"]["mend"])
    report = json.loads((folder / "artifact.json").read_text())
    assert (folder / "mend.pt").exists() and report["steps"] == 20 and report["n_train_cases"] == 24
    assert len(report["validation"]) == 3 and "training artifact mend" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="runner.artifacts"):
        again = run(cfg())
    assert again["artifacts"]["mend"] == str(folder) and "loaded from" in caplog.text
    other = run(cfg("editor.lr=2e-3"))
    assert other["artifacts"]["mend"] != str(folder)
    summary = run(cfg("task=edit", "dataset.size=4", "train_artifacts=false"))
    assert 0 <= summary["efficacy"] <= 100
