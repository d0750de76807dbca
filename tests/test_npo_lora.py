"""ZJUKLAB's LoRA unlearning (editor=npo_lora: method npo_kl_nll of editors.unlearning), its adapters
as artifacts keyed by content, and the merged editor (editor=ties_npo, editors/ties_npo.py)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from editors.base import Resources
from editors.core.tokens import answer_ids
from editors.ties_npo import TiesNpo
from editors.training import AnswerBatch, answer_logits, answer_nll, batch_nll, kl_divergence
from editors.unlearning import GradientUnlearning, GradientUnlearningConfig, LoraAdapter, LoraSettings
from tests.conftest import compose_config
from tests.test_unlearning_baselines import FORGET, SPEC, requests  # the same tiny GPT-2 forget set

RETAIN = (
    ("The headquarters of Apple A5 is in", "Tokyo"),
    ("Rome is located in the country of", "Italy"),
    ("Barack Obama works in the field of", "physics"),
    ("The official religion of Nepal is", "Islam"),
)
LORA = LoraSettings(enabled=True, r=4, alpha=8.0, dropout=0.05, target_modules=["all-linear"])
# the tiny GPT-2 moves at lr 1e-2 (tests/test_unlearning_baselines.py); the release's other settings
TOY = dict(method="npo_kl_nll", lr=1e-2, epochs=5, batch_size=2, accumulate=1, warmup=0.0, seed=42, lora=LORA)


def editor(cache=None, retain=RETAIN, **kwargs) -> GradientUnlearning:
    ed = GradientUnlearning(GradientUnlearningConfig(**(TOY | kwargs)), SPEC)
    ed.resources = Resources(retain=tuple(retain), adapter_cache=cache)
    return ed


@pytest.fixture
def net(tiny_gpt2):
    return copy.deepcopy(tiny_gpt2)


def state(model) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def assert_same(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[n], before[n]) for n in before)


def token_ce(model, tok, pairs) -> tuple[float, int]:
    """By hand, one unpadded sequence at a time: the summed CE of the answer tokens (" " + answer +
    EOS, labels −100 on the prompt) and their count."""
    total, count = 0.0, 0
    for prompt, answer in pairs:
        prompt_ids = tok(prompt)["input_ids"]
        target = answer_ids(tok, " " + answer) + [tok.eos_token_id]
        ids = torch.tensor([prompt_ids + target])
        labels = torch.tensor([[-100] * len(prompt_ids) + target])
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        total += float(F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100, reduction="sum"))
        count += len(target)
    return total, count


def forget_nll(model, tok) -> float:
    """Mean per-item answer NLL of the forget set (−log P(answer)/tokens)."""
    batches = editor()._batches(tok, FORGET, torch.device("cpu"))
    with torch.no_grad():
        return float(torch.cat([answer_nll(answer_logits(model, b)[0], b) for b in batches]).mean())


# --- the loss terms ------------------------------------------------------------------------------


def test_batch_nll_is_the_mean_over_every_answer_token_not_of_item_means():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]], [[0.2, 0.7, 0.1], [1 / 3] * 3]]))
    gold = torch.tensor([[0, 1], [2, 0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])  # the second answer has one token
    batch = AnswerBatch(None, torch.zeros(2, 2, dtype=torch.long), gold, mask)
    by_hand = -(math.log(0.5) + math.log(0.8) + math.log(0.1)) / 3
    assert float(batch_nll(logits, batch)) == pytest.approx(by_hand, rel=1e-6)
    item_means = (-(math.log(0.5) + math.log(0.8)) / 2 - math.log(0.1)) / 2
    assert abs(by_hand - item_means) > 0.05  # not the mean of per-item means


def test_unmasked_kl_averages_over_every_position_as_kl_div_batchmean():
    torch.manual_seed(0)
    logits, ref = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    p, q = ref.softmax(-1), logits.softmax(-1)
    by_hand = sum(
        float((p[b, t] * (p[b, t].log() - q[b, t].log())).sum()) for b in range(2) for t in range(3)
    ) / (2 * 3)
    assert float(kl_divergence(logits, ref, None)) == pytest.approx(by_hand, rel=1e-5)
    flat = F.kl_div(
        logits.log_softmax(-1).view(-1, 5),
        ref.log_softmax(-1).view(-1, 5),
        reduction="batchmean",
        log_target=True,
    )
    assert float(kl_divergence(logits, ref, None)) == pytest.approx(float(flat), rel=1e-5)
    masked = kl_divergence(logits, ref, torch.tensor([[1, 1, 0], [1, 0, 0]]))
    assert abs(float(masked) - by_hand) > 1e-3  # the mask changes it: padding counts here


def _peft(net):
    """A LoRA adapter on every linear layer of ``net`` with random B (a model that differs from its
    reference, the adapter disabled)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    targets = editor().lora_targets(net)
    model = get_peft_model(net, LoraConfig(r=4, lora_alpha=8, target_modules=targets, fan_in_fan_out=True))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return model


def test_total_is_the_three_ratios_times_npo_kl_and_nll_by_hand(net, tiny_tokenizer):
    beta, ratios = 0.1, dict(ga_ratio=0.3, gd_ratio=0.5, gk_ratio=0.7)
    ed = editor(**ratios, beta=beta)
    device = torch.device("cpu")
    # answers of very different lengths (batch mean ≠ mean of item means) and a padded retain batch
    forget = [("Who wrote it?", "Edwin of Northumbria and Thomas Joannes Stieltjes"), FORGET[2]]
    retain = [RETAIN[1], ("Mount Everest was created by", "Edwin of Northumbria")]
    (fb,), (rb,) = ed._batches(tiny_tokenizer, forget, device), ed._batches(tiny_tokenizer, retain, device)
    assert fb.mask.sum(1).tolist()[0] > 3 * fb.mask.sum(1).tolist()[1] and not bool(
        rb.enc.attention_mask.all()
    )
    with torch.no_grad():  # sharper next-token distributions than the random model's near-uniform ones
        net.lm_head.weight.mul_(20.0)  # (tied to the input embeddings)
    ref_sum, ref_n = token_ce(net, tiny_tokenizer, forget)  # the reference: the model before LoRA
    peft_model = _peft(net)
    try:
        from editors.unlearning import _Batch

        step = _Batch(fb, torch.tensor(ref_sum / ref_n))
        loss_fn = ed._loss_fn(net, [rb], peft_model.disable_adapter)
        with torch.no_grad():
            total = float(loss_fn(step))
            cur_sum, cur_n = token_ce(net, tiny_tokenizer, forget)
            npo = -(2 / beta) * math.log(1 / (1 + math.exp(-beta * (cur_sum / cur_n - ref_sum / ref_n))))
            inputs = {"input_ids": rb.enc.input_ids, "attention_mask": rb.enc.attention_mask}
            cur = net(**inputs).logits
            with peft_model.disable_adapter():
                ref = net(**inputs).logits
            vocab = cur.shape[-1]
            kl = F.kl_div(
                cur.log_softmax(-1).view(-1, vocab),
                ref.log_softmax(-1).view(-1, vocab),
                reduction="batchmean",
                log_target=True,
            )
            nll_sum, nll_n = token_ce(net, tiny_tokenizer, retain)
        assert abs(cur_sum / cur_n - ref_sum / ref_n) > 0.01 and float(kl) > 0.1  # every term acts
        by_hand = 0.3 * npo + 0.5 * float(kl) + 0.7 * nll_sum / nll_n
        assert total == pytest.approx(by_hand, rel=1e-5)  # (KL masked to the real tokens: off by 4e-4)
    finally:
        peft_model.unload()


def test_npo_kl_nll_without_lora_fails_in_one_line():
    with pytest.raises(ValueError, match="editor.lora.enabled must be true"):
        GradientUnlearningConfig(method="npo_kl_nll", lora=LoraSettings(enabled=False))
    GradientUnlearningConfig(method="npo_kl_nll", gd_ratio=0.0)  # no KL: full fine-tuning works
    with pytest.raises(ValueError, match="all-linear"):
        GradientUnlearningConfig(lora=LoraSettings(enabled=True, target_modules=["all-linear", "c_fc"]))


# --- training, adapters, the cache ---------------------------------------------------------------


def test_all_linear_is_every_linear_layer_but_the_lm_head(net):
    names = editor().lora_targets(net)
    assert "lm_head" not in names and len(names) == 2 * 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj per block
    assert {n.split(".")[-1] for n in names} == {"c_attn", "c_proj", "c_fc"}


def test_lora_adapter_delta_is_scaling_b_a_in_the_weights_layout():
    a, b = torch.arange(6.0).view(2, 3), torch.arange(8.0).view(4, 2)  # A [r=2, in=3], B [out=4, r]
    adapter = LoraAdapter({"x": (a, b, 0.5), "y": (a, b, 2.0)}, frozenset({"y"}))
    delta = adapter.delta()
    assert torch.equal(delta["x.weight"], 0.5 * b @ a) and delta["x.weight"].shape == (4, 3)
    assert torch.equal(delta["y.weight"], (2.0 * b @ a).T)  # Conv1D stores [in, out]


def test_training_lowers_p_forget_and_restores_bit_exactly(net, tiny_tokenizer):
    before = state(net)
    f0 = forget_nll(net, tiny_tokenizer)
    edit = editor().apply(net, tiny_tokenizer, requests())
    assert_same(net, before)  # apply leaves the model as found
    assert edit.diagnostics["unlearn_steps"] == 5 * 2  # 5 epochs of 2 batches, one step each
    handle = edit.attach(net)
    f1 = forget_nll(net, tiny_tokenizer)
    handle.restore()
    assert_same(net, before)
    assert f1 > f0 + 0.25  # P(forget answer) falls: its NLL rises (measured: 6.20 -> 6.62)
    # the retain NLL term lowers the retain NLL (measured: 6.32 -> 5.81)
    assert edit.diagnostics["unlearn_retain_nll"] < edit.diagnostics["unlearn_retain_nll_before"] - 0.25
    assert edit.diagnostics["unlearn_forget_nll"] == pytest.approx(f1, rel=1e-4)
    assert len(edit.case_diagnostics["forget_nll"]) == len(FORGET)


def test_seeded_training_repeats_and_the_cache_round_trips(net, tiny_tokenizer, tmp_path):
    first = editor(cache=tmp_path)
    a1, d1, _ = first.adapter(net, tiny_tokenizer, requests())
    assert d1["unlearn_adapter_cached"] == 0.0
    assert list(tmp_path.glob("lora-*.pt")) == [first.adapter_path(requests())]
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    a2, _, _ = editor().adapter(net, tiny_tokenizer, requests())  # no cache: trained again
    assert torch.equal(torch.rand(3), expected)  # in a forked generator: the global one untouched
    assert all(torch.equal(a1.delta()[n], a2.delta()[n]) for n in a1.delta())  # seeded: the same
    again = editor(cache=tmp_path)
    edit = again.apply(net, tiny_tokenizer, requests())
    assert edit.diagnostics["unlearn_adapter_cached"] == 1.0
    assert edit.diagnostics["unlearn_forget_nll"] == d1["unlearn_forget_nll"]
    loaded, _, _ = again.adapter(net, tiny_tokenizer, requests())
    assert loaded.fan_in_fan_out == a1.fan_in_fan_out and loaded.factors.keys() == a1.factors.keys()
    for name, (a, b, s) in a1.factors.items():
        la, lb, ls = loaded.factors[name]
        assert torch.equal(a, la) and torch.equal(b, lb) and s == ls
    scores = []
    for delta in (a1.delta(), edit.deltas):  # the same scores from the trained and the loaded adapter
        handle = edit.__class__(deltas=delta).attach(net)
        scores.append(forget_nll(net, tiny_tokenizer))
        handle.restore()
    assert scores[0] == scores[1]
    # the key: another retain set, seed or recipe is another adapter; the same settings the same one
    keys = {
        editor().adapter_key(requests()),
        editor(retain=RETAIN[:3]).adapter_key(requests()),
        editor(seed=7).adapter_key(requests()),
        editor(gk_ratio=0.4).adapter_key(requests()),
        editor().adapter_key(requests()[:3]),
    }
    assert len(keys) == 5 and editor().adapter_key(requests()) == first.adapter_key(requests())
    assert editor(cache=tmp_path, seed=None).adapter_path(requests()) is None  # unseeded: not cached


# --- the merged editor ---------------------------------------------------------------------------


def ties_npo(cache, *overrides: str) -> TiesNpo:
    """editor=ties_npo from the project's config, members shrunk to the tiny model's scale."""
    small = [
        f"editor.{m}.{k}"
        for m in ("over", "under")
        for k in ("lr=1e-2", "epochs=3", "warmup=0.0", "accumulate=1", "lora.r=4", "lora.alpha=8")
    ]
    cfg = compose_config("editor=ties_npo", "model=tiny-gpt2", *small, *overrides)
    ed = TiesNpo(OmegaConf.to_object(cfg.editor), SPEC)
    ed.resources = Resources(retain=RETAIN, adapter_cache=cache)
    return ed


def test_ties_npo_config_is_zjuklabs():
    cfg = compose_config("editor=ties_npo", "model=tiny-gpt2").editor  # the toy has its own lr
    assert (cfg.over.ga_ratio, cfg.over.gd_ratio, cfg.over.gk_ratio) == (0.4, 0.4, 0.2)
    assert (cfg.under.ga_ratio, cfg.under.gd_ratio, cfg.under.gk_ratio) == (0.3, 0.3, 0.4)
    assert (cfg.over.batch_size, cfg.under.batch_size, cfg.over.accumulate, cfg.under.accumulate) == (
        1,
        2,
        4,
        4,
    )
    assert (
        cfg.over.lora.r == 32 and cfg.over.lora.alpha == 32 and cfg.over.lr == 1e-4 and cfg.over.epochs == 5
    )
    assert (cfg.merge.space, cfg.merge.method, cfg.merge.density, list(cfg.merge.weights)) == (
        "lora_factors",
        "ties",
        0.8,
        [1.0, 1.0],
    )
    with pytest.raises(ValueError, match="editor.member must be one of over, under"):
        OmegaConf.to_object(compose_config("editor=ties_npo", "editor.member=both").editor)


def test_ties_npo_members_and_merges_from_cached_adapters(net, tiny_tokenizer, tmp_path):
    before = state(net)
    f0 = forget_nll(net, tiny_tokenizer)
    over = ties_npo(tmp_path, "editor.member=over").apply(net, tiny_tokenizer, requests())
    assert (
        over.diagnostics["over_unlearn_adapter_cached"] == 0.0
        and "under_unlearn_steps" not in over.diagnostics
    )
    merged = ties_npo(tmp_path).apply(net, tiny_tokenizer, requests())
    assert merged.diagnostics["over_unlearn_adapter_cached"] == 1.0  # over loaded, under trained
    assert merged.diagnostics["under_unlearn_adapter_cached"] == 0.0
    assert_same(net, before)
    # the members' adapters, as cached
    members = ties_npo(tmp_path).members()
    adapters = {n: m.adapter(net, tiny_tokenizer, requests())[0] for n, m in members.items()}
    assert all(torch.equal(over.deltas[k], v) for k, v in adapters["over"].delta().items())
    # delta-space task arithmetic with weights [1, 1] is ΔW_over + ΔW_under, by hand
    summed = ties_npo(tmp_path, "editor.merge.space=delta_weights", "editor.merge.method=task_arithmetic")
    total = summed.apply(net, tiny_tokenizer, requests())
    d_over, d_under = adapters["over"].delta(), adapters["under"].delta()
    assert total.deltas.keys() == d_over.keys()
    for name, delta in total.deltas.items():
        assert delta.shape == dict(net.named_parameters())[name].shape
        assert torch.allclose(delta, d_over[name] + d_under[name], atol=1e-6)
    # TIES on the factors: not the sum, and still unlearning; restored bit-exactly
    assert any(not torch.allclose(merged.deltas[n], total.deltas[n], atol=1e-4) for n in total.deltas)
    handle = merged.attach(net)
    f_merged = forget_nll(net, tiny_tokenizer)
    handle.restore()
    assert_same(net, before)
    assert f_merged > f0 + 0.2


# --- task=unlearn end to end ---------------------------------------------------------------------


@pytest.mark.slow  # ~200 s on one CPU thread, most of it the toy's training (cached across the suite)
def test_task_unlearn_runs_the_merge_and_a_member_from_the_same_cached_adapters(tmp_path):
    from runner import run
    from tests.test_unlearn_task import _cfg

    small = ("epochs=2", "lora.r=4", "lora.alpha=4")
    members = [f"editor.{m}.{k}" for m in ("over", "under") for k in small]
    merged = run(_cfg(tmp_path, "editor=ties_npo", *members, out="merged"))
    adapters = list((tmp_path.parent / "unlearn-cache" / "adapters").glob("*/lora-*.pt"))
    over = run(_cfg(tmp_path, "editor=ties_npo", *members, "editor.member=over", out="over"))
    assert len(adapters) == 2  # one per member, in the model's folder
    assert list((tmp_path.parent / "unlearn-cache" / "adapters").glob("*/lora-*.pt")) == adapters  # reused
    for summary in (merged, over):
        post, pre = summary["metrics"]["post"], summary["metrics"]["pre"]
        assert post["forget/loss"]["mean"] > pre["forget/loss"]["mean"]  # the forget answers got less likely


def test_ties_npo_rows_are_told_apart(tmp_path):
    from runner.unlearn import _method
    from runner.unlearning_recipes import UnlearnConfig

    names = {
        _method("ties_npo", ties_npo(tmp_path, *o), UnlearnConfig())
        for o in [
            ("editor.member=over",),
            ("editor.member=under",),
            (),
            ("editor.merge.space=delta_weights",),
        ]
    }
    names.add(_method("ties_npo", ties_npo(tmp_path, "editor.merge.density=0.2"), UnlearnConfig()))
    assert names == {
        "ties_npo+over",
        "ties_npo+under",
        "ties_npo+lora_factors/ties@0.8",
        "ties_npo+delta_weights/ties@0.8",
        "ties_npo+lora_factors/ties@0.2",
    }
