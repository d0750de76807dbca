"""GA / GradDiff / NPO (editors.unlearning) and their losses (editors.training.losses)."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch

from editors.base import Resources
from editors.registry import CONFIG_SCHEMAS
from editors.requests import EditRequest
from editors.spec import ModelSpec
from editors.training import answer_logits, answer_nll, ga_loss, kl_divergence, npo_loss
from editors.unlearning import GradientUnlearning, GradientUnlearningConfig, LoraSettings

SPEC = ModelSpec(
    "transformer.h.{}",
    "transformer.h.{}.mlp.c_proj",
    "transformer.h.{}.attn.c_proj",
    "transformer.ln_f",
    "lm_head",
    2,
)

FORGET = [
    ("Who wrote the novel about Paris?", "Danielle Darrieux"),
    ("Which instrument does Toko Yasuda play?", "guitar"),
    ("Where was Marie Curie born?", "Japan"),
    ("What is the mother tongue of Michael Jordan?", "Dutch"),
]
RETAIN = (
    ("The headquarters of Apple A5 is in", "Tokyo"),
    ("Rome is located in the country of", "Italy"),
    ("Barack Obama works in the field of", "physics"),
    ("The official religion of Nepal is", "Islam"),
    ("Mount Everest was created by", "Edwin of Northumbria"),
    ("Paris is a citizen of", "Spain"),
)
TOY = dict(lr=1e-2, epochs=10, batch_size=4, accumulate=1, warmup=0.0)


def requests() -> list[EditRequest]:
    return [EditRequest(f"f{i}", q, None, "I don't know.", a) for i, (q, a) in enumerate(FORGET)]


def editor(retain=RETAIN, **kwargs) -> GradientUnlearning:
    ed = GradientUnlearning(GradientUnlearningConfig(**(TOY | kwargs)), SPEC)
    ed.resources = Resources(retain=tuple(retain))
    return ed


def nll(model, tok, pairs) -> float:
    ed = editor()
    batches = ed._batches(tok, list(pairs), torch.device("cpu"))
    with torch.no_grad():
        return float(torch.cat([answer_nll(answer_logits(model, b)[0], b) for b in batches]).mean())


@pytest.fixture
def net(tiny_gpt2):
    return copy.deepcopy(tiny_gpt2)


def state(model) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def assert_same(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[n], before[n]) for n in before)


# --- losses --------------------------------------------------------------------------------------


def test_npo_loss_matches_hand_computation():
    nll = torch.tensor([3.0, 5.0, 1.5])
    ref = torch.tensor([2.0, 6.0, 1.5])
    beta = 0.5
    by_hand = [-(2 / beta) * math.log(1 / (1 + math.exp(-beta * (n - r)))) for n, r in zip(nll, ref)]
    assert float(npo_loss(nll, ref, beta)) == pytest.approx(sum(by_hand) / 3, rel=1e-6)
    # at nll = ref every item contributes (2/β)·log 2
    assert float(npo_loss(ref, ref, beta)) == pytest.approx(2 / beta * math.log(2), rel=1e-6)


def test_ga_loss_is_minus_the_mean_nll():
    assert float(ga_loss(torch.tensor([1.0, 2.0, 6.0]))) == pytest.approx(-3.0)


def test_npo_gradient_tends_to_ga_as_beta_vanishes():
    ref = torch.tensor([2.0, 6.0, 1.5])
    ga = torch.autograd.grad(ga_loss(nll := torch.tensor([3.0, 5.0, 1.5], requires_grad=True)), nll)[0]
    gaps = []
    for beta in (1.0, 1e-2, 1e-4):
        x = torch.tensor([3.0, 5.0, 1.5], requires_grad=True)
        gaps.append(float((torch.autograd.grad(npo_loss(x, ref, beta), x)[0] - ga).abs().max()))
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-4
    with pytest.raises(ValueError, match="beta"):
        npo_loss(ref, ref, 0.0)


def test_kl_divergence_is_zero_on_itself_and_masks_positions():
    torch.manual_seed(0)
    logits, ref = torch.randn(2, 3, 7), torch.randn(2, 3, 7)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert float(kl_divergence(ref, ref, mask)) == pytest.approx(0.0, abs=1e-6)
    logp, ref_logp = logits.log_softmax(-1), ref.log_softmax(-1)
    each = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
    assert float(kl_divergence(logits, ref, mask)) == pytest.approx(float(each[mask.bool()].mean()), rel=1e-5)


# --- the editor ----------------------------------------------------------------------------------


def run(model, tok, **kwargs):
    """Apply, check the model is untouched, attach; (forget NLL, retain NLL) before and after."""
    before = state(model)
    f0, r0 = nll(model, tok, FORGET), nll(model, tok, RETAIN)
    edit = editor(**kwargs).apply(model, tok, requests())
    assert_same(model, before)  # apply leaves the model as found
    handle = edit.attach(model)
    f1, r1 = nll(model, tok, FORGET), nll(model, tok, RETAIN)
    handle.restore()
    assert_same(model, before)  # restore is bit-exact
    return edit, (f0, r0), (f1, r1)


def test_ga_raises_forget_nll_and_restores_exactly(net, tiny_tokenizer):
    edit, (f0, _), (f1, _) = run(net, tiny_tokenizer, method="ga")
    assert f1 > f0 + 1.0
    assert edit.diagnostics["unlearn_forget_nll"] == pytest.approx(f1, rel=1e-4)
    assert edit.diagnostics["unlearn_forget_nll_before"] == pytest.approx(f0, rel=1e-4)
    assert edit.diagnostics["unlearn_steps"] == 10 and edit.diagnostics["unlearn_seconds"] > 0
    assert len(edit.case_diagnostics["forget_nll"]) == len(FORGET)
    assert set(edit.deltas) == {n for n, _ in net.named_parameters()}  # layers: null, every parameter


def test_grad_diff_keeps_retain_nll_better_than_ga(net, tiny_tokenizer):
    _, (f0, r0), (f_ga, r_ga) = run(net, tiny_tokenizer, method="ga")
    _, _, (f_gd, r_gd) = run(net, tiny_tokenizer, method="grad_diff")
    assert f_gd > f0 + 0.5
    assert r_gd - r0 < 0.5 * (r_ga - r0)


def test_npo_raises_forget_nll(net, tiny_tokenizer):
    edit, (f0, _), (f1, _) = run(net, tiny_tokenizer, method="npo", beta=0.1)
    assert f1 > f0 + 0.5
    assert not math.isnan(edit.diagnostics["unlearn_retain_nll"])


def test_layers_train_only_those_blocks(net, tiny_tokenizer):
    edit, (f0, _), (f1, _) = run(net, tiny_tokenizer, method="ga", layers=[1])
    assert edit.deltas and all(n.startswith("transformer.h.1.") for n in edit.deltas)
    assert f1 > f0


def test_lora_delta_changes_outputs_and_leaves_the_module_tree(net, tiny_tokenizer):
    tree = [(n, type(m)) for n, m in net.named_modules()]
    flags = {n: p.requires_grad for n, p in net.named_parameters()}
    attributes = set(vars(net))
    lora = LoraSettings(enabled=True, r=4, alpha=8.0, dropout=0.1)
    edit, (f0, _), (f1, _) = run(
        net, tiny_tokenizer, method="grad_diff", retain_loss="kl", lora=lora, layers=[0, 1]
    )
    assert [(n, type(m)) for n, m in net.named_modules()] == tree  # no peft wrappers left
    assert {n: p.requires_grad for n, p in net.named_parameters()} == flags
    assert set(vars(net)) == attributes and not net.training
    assert set(edit.deltas) == {"transformer.h.0.attn.c_attn.weight", "transformer.h.1.attn.c_attn.weight"}
    assert all(float(d.abs().max()) > 0 for d in edit.deltas.values())
    assert f1 > f0  # the merged ΔW changes the outputs...
    assert edit.diagnostics["unlearn_forget_nll"] == pytest.approx(f1, rel=1e-4)  # ...as the adapter did


def test_missing_retain_pairs_and_kl_without_lora_fail_in_one_line(net, tiny_tokenizer):
    for method in ("grad_diff", "npo"):
        with pytest.raises(ValueError, match=f"editor.method={method} needs retain pairs") as info:
            editor(retain=(), method=method).apply(net, tiny_tokenizer, requests())
        assert "\n" not in str(info.value)
    editor(retain=(), method="ga", epochs=1).apply(net, tiny_tokenizer, requests())  # GA needs none
    with pytest.raises(ValueError, match="editor.retain_loss"):
        GradientUnlearningConfig(method="grad_diff", retain_loss="kl")
    with pytest.raises(ValueError, match="editor.method"):
        GradientUnlearningConfig(method="rmu")


def test_yaml_configs_compose(hydra_conf):
    from hydra import compose
    from omegaconf import OmegaConf

    for name, model in itertools.product(("ga", "grad_diff", "npo"), ("gpt-j", "llama3", "tiny-gpt2")):
        overrides = [f"editor={name}", f"model={model}", "paths.cache_dir=/tmp/c", "paths.output_dir=/tmp/o"]
        cfg = compose("config", overrides=overrides)
        built = OmegaConf.to_object(cfg.editor)
        assert OmegaConf.get_type(cfg.editor) is CONFIG_SCHEMAS["ga"]
        assert isinstance(built, GradientUnlearningConfig) and built.method == name
        assert (built.lr, built.epochs, built.batch_size * built.accumulate) == (1e-5, 10, 32)
    npo = compose("config", overrides=["editor=npo", "model=toy", "paths.output_dir=/tmp/o"]).editor
    assert npo.beta == 0.1 and npo.lr == 1e-3  # conf/editor_model/npo_toy.yaml


def test_the_runner_builds_ga_with_its_defaults_and_it_satisfies_the_contract(net, tiny_tokenizer):
    from omegaconf import OmegaConf

    from editors.base import Edit, Editor
    from tests.conftest import compose_config

    cfg = compose_config("model=tiny-gpt2", "editor=ga", "paths.cache_dir=/tmp/c", "paths.output_dir=/tmp/o")
    ed = GradientUnlearning(OmegaConf.to_object(cfg.editor), spec=SPEC)  # as runner.pipeline.build_editor
    assert isinstance(ed, Editor) and ed.config.lr == 1e-5 and ed.config.lora.enabled is False
    ed.prepare(net, tiny_tokenizer, Resources())
    modules, before = [id(m) for m in net.modules()], state(net)
    edit = ed.apply(net, tiny_tokenizer, requests()[:2])
    assert isinstance(edit, Edit) and [id(m) for m in net.modules()] == modules
    assert_same(net, before)
    assert "unlearn_retain_nll" not in edit.diagnostics  # no retain pairs given
    assert ed.history == ["f0", "f1"]
    ed.reset()
    assert ed.history == []
