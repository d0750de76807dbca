"""Merging LoRA adapters (editors/merging.py ``merge_lora_adapters``) in its two spaces: ``lora_factors``
equals peft's own ``add_weighted_adapter`` + ``merge_and_unload`` (ties, linear, dare_ties) on tiny
models; ``delta_weights`` is TIES on ΔW = s·B·A, checked against hand computations on 2×2 rank-1
cases, and differs from the factor-space merge."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from editors.merging import merge_lora_adapters

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config).eval()


def adapter_factors(model, adapter: str) -> dict:
    """``{module: (A, B, scaling)}`` of one adapter of a peft LoRA model, names as in the base model."""
    from peft.tuners.lora import LoraLayer

    return {
        name: (
            m.lora_A[adapter].weight.detach(),
            m.lora_B[adapter].weight.detach(),
            float(m.scaling[adapter]),
        )
        for name, m in model.get_base_model().named_modules()
        if isinstance(m, LoraLayer) and adapter in m.lora_A
    }


def _two_adapters(base, targets, alphas=(8, 4), r=4, fan_in_fan_out=False):
    """A peft model over a copy of ``base`` with two random (B ≠ 0) LoRA adapters m1, m2 of rank r."""
    torch.manual_seed(1)
    configs = [
        LoraConfig(
            r=r,
            lora_alpha=alpha,
            target_modules=targets,
            init_lora_weights=False,
            fan_in_fan_out=fan_in_fan_out,
        )
        for alpha in alphas
    ]
    model = get_peft_model(copy.deepcopy(base), configs[0], adapter_name="m1")
    model.add_adapter("m2", configs[1])
    return model


def _peft_merged_deltas(model, base, combination, weights, density, seed):
    """What peft's add_weighted_adapter + merge_and_unload adds to each base weight. For dare_ties the
    global CPU generator is seeded right after peft creates the new adapter (its init draws random
    numbers), where peft's merge loop starts drawing its masks."""
    model = copy.deepcopy(model)
    lora = model.base_model
    inject = lora.inject_adapter

    def inject_then_seed(*args, **kwargs):
        out = inject(*args, **kwargs)
        torch.manual_seed(seed)
        return out

    lora.inject_adapter = inject_then_seed
    model.add_weighted_adapter(
        ["m1", "m2"], list(weights), "merged", combination_type=combination, density=density
    )
    model.delete_adapter("m1")
    model.delete_adapter("m2")
    merged = model.merge_and_unload().state_dict()
    return {n: merged[n] - t for n, t in base.state_dict().items()}


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize(
    ("method", "combination"),
    [("ties", "ties"), ("task_arithmetic", "linear"), ("dare_ties", "dare_ties")],
)
@pytest.mark.parametrize(("weights", "density"), [((1.0, 1.0), 0.8), ((1.0, -0.7), 0.5)])
def test_lora_factors_equals_peft_add_weighted_adapter_then_merge_and_unload(
    method, combination, weights, density
):
    base = _llama()
    model = _two_adapters(base, TARGETS)  # scalings 2 and 1: the √(w·s) factor weights matter
    factors = [adapter_factors(model, "m1"), adapter_factors(model, "m2")]
    assert len(factors[0]) == 6 and factors[0]["model.layers.0.self_attn.q_proj"][2] == 2.0
    ours = merge_lora_adapters(
        factors, space="lora_factors", method=method, density=density, weights=weights, seed=3
    )
    peft = _peft_merged_deltas(model, base, combination, weights, density, seed=3)
    changed = {n.removesuffix(".weight") for n, d in peft.items() if d.abs().max() > 0}
    assert changed == set(ours)
    for name, delta in ours.items():
        torch.testing.assert_close(delta, peft[name + ".weight"], atol=1e-6, rtol=0)
    if method == "dare_ties":  # another seed draws other masks
        other = merge_lora_adapters(factors, method=method, density=density, weights=weights, seed=4)
        assert any(not torch.allclose(other[n], ours[n]) for n in ours)


@pytest.mark.filterwarnings("ignore")
def test_gpt2_conv1d_gets_the_transposed_delta():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2)).eval()
    model = _two_adapters(base, ["c_attn", "c_fc"], fan_in_fan_out=True)
    factors = [adapter_factors(model, "m1"), adapter_factors(model, "m2")]
    ours = merge_lora_adapters(factors, method="ties", density=0.8)
    peft = _peft_merged_deltas(model, base, "ties", (1.0, 1.0), 0.8, seed=0)
    assert set(ours) == {"transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_fc"}
    for name, delta in ours.items():
        torch.testing.assert_close(delta.T, peft[name + ".weight"], atol=1e-6, rtol=0)


@pytest.mark.filterwarnings("ignore")
def test_delta_weights_task_arithmetic_is_peft_cat_and_the_weighted_sum():
    base = _llama()
    model = _two_adapters(base, TARGETS)
    factors = [adapter_factors(model, "m1"), adapter_factors(model, "m2")]
    ours = merge_lora_adapters(factors, space="delta_weights", method="task_arithmetic", weights=(1.0, 0.5))
    peft = _peft_merged_deltas(model, base, "cat", (1.0, 0.5), None, seed=0)
    for name, delta in ours.items():
        (a1, b1, s1), (a2, b2, s2) = factors[0][name], factors[1][name]
        torch.testing.assert_close(delta, s1 * b1 @ a1 + 0.5 * s2 * b2 @ a2, atol=1e-6, rtol=0)
        torch.testing.assert_close(delta, peft[name + ".weight"], atol=1e-6, rtol=0)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("method", ["ties", "task_arithmetic", "dare_ties"])
def test_delta_weights_differs_from_lora_factors_on_random_adapters(method):
    base = _llama()
    model = _two_adapters(base, TARGETS)
    factors = [adapter_factors(model, "m1"), adapter_factors(model, "m2")]
    delta = merge_lora_adapters(factors, space="delta_weights", method=method, density=0.8)
    lora = merge_lora_adapters(factors, space="lora_factors", method=method, density=0.8)
    for name in delta:
        gap = (delta[name] - lora[name]).norm() / delta[name].norm()
        assert gap > 0.1, (name, float(gap))


# --------------------------------------------------------------------------------------------
# hand computations: rank-1 factors whose ΔW = s·B·A is a known 2×2 matrix


def _rank1(b, a, scaling=1.0):
    return {"w": (torch.tensor([a]), torch.tensor([[x] for x in b]), scaling)}


# ΔW1 = [1, 2]ᵀ·[2, -3] = [[2, -3], [4, -6]];  ΔW2 = 2·[0.5, -0.25]ᵀ·[4, 1] = [[4, 1], [-2, -0.5]]
M1 = _rank1([1.0, 2.0], [2.0, -3.0])
M2 = _rank1([0.5, -0.25], [4.0, 1.0], scaling=2.0)


def test_hand_ties_in_delta_space_agree_mean_disagree_larger_trimmed_survivor():
    merged = merge_lora_adapters([M1, M2], space="delta_weights", method="ties", density=1.0)["w"]
    # (2, 4) agree → mean 3; (-3, 1) disagree, sum -2 → -3 alone; (4, -2) sum 2 → 4; (-6, -0.5) → -3.25
    assert merged.tolist() == [[3.0, -3.0], [4.0, -3.25]]
    # density 0.5 keeps int(0.5·4) = 2 entries of each ΔW: [[0, 0], [4, -6]] and [[4, 0], [-2, 0]]
    merged = merge_lora_adapters([M1, M2], space="delta_weights", method="ties", density=0.5)["w"]
    # (0, 4) → the survivor 4; (0, 0) → 0; (4, -2) → 4; (-6, 0) → the survivor -6
    assert merged.tolist() == [[4.0, 0.0], [4.0, -6.0]]


def test_hand_ties_weights_apply_after_the_sign_election_count_divisor():
    merged = merge_lora_adapters([M1, M2], space="delta_weights", weights=(1.0, 0.5), density=1.0)["w"]
    # signs elected on the unweighted ΔW's (as peft); agreeing entries summed weighted, divided by count
    # (2, 4·0.5) → 2; (-3, ·) → -3; (4, ·) → 4 (unweighted sum 2 > 0); (-6, -0.5·0.5) → -3.125
    assert merged.tolist() == [[2.0, -3.0], [4.0, -3.125]]


def test_hand_ties_in_factor_space_merges_a_and_b_separately():
    # factor weights √(w·s): member 1 → 1, member 2 → √2 on A and on B
    # A's [2, -3], √2·[4, 1]: (2, 4) agree → (2 + 4√2)/2; (-3, 1) sum -2 → -3
    # B's [1, 2], √2·[0.5, -0.25]: (1, 0.5) agree → (1 + 0.5√2)/2; (2, -0.25) sum 1.75 → 2
    merged = merge_lora_adapters([M1, M2], space="lora_factors", method="ties", density=1.0)["w"]
    r2 = 2**0.5
    a = torch.tensor([[(2 + 4 * r2) / 2, -3.0]])
    b = torch.tensor([[(1 + 0.5 * r2) / 2], [2.0]])
    torch.testing.assert_close(merged, b @ a, atol=1e-6, rtol=0)
    delta = merge_lora_adapters([M1, M2], space="delta_weights", method="ties", density=1.0)["w"]
    assert (merged - delta).abs().max() > 1  # B_ties·A_ties is not TIES(ΔW1, ΔW2)


def test_hand_task_arithmetic_is_the_weighted_sum_in_delta_space():
    merged = merge_lora_adapters(
        [M1, M2], space="delta_weights", method="task_arithmetic", weights=(1.0, -2.0)
    )
    assert merged["w"].tolist() == [[2.0 - 8.0, -3.0 - 2.0], [4.0 + 4.0, -6.0 + 1.0]]


def test_dare_keeps_a_density_fraction_rescaled_and_is_seeded():
    # one member of 4000 equal entries: DARE keeps each with probability 0.3 and divides by 0.3; a
    # single member's TIES returns its own nonzero entries
    member = {"w": (torch.ones(1, 4000), torch.ones(1, 1), 1.0)}
    merged = merge_lora_adapters(
        [member], space="delta_weights", method="dare_ties", density=0.3, weights=(1.0,)
    )
    kept = merged["w"] != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.03  # 3 standard deviations ≈ 0.022
    assert torch.allclose(merged["w"][kept], torch.tensor(1 / 0.3))
    assert abs(merged["w"].mean().item() - 1.0) < 0.1  # expected value preserved
    again = merge_lora_adapters(
        [member], space="delta_weights", method="dare_ties", density=0.3, weights=(1.0,)
    )
    assert torch.equal(again["w"], merged["w"])
    other = merge_lora_adapters(
        [member], space="delta_weights", method="dare_ties", density=0.3, weights=(1.0,), seed=1
    )
    assert not torch.equal(other["w"], merged["w"])


def test_bad_input_is_named():
    r4 = {"w": (torch.ones(4, 2), torch.ones(2, 4), 1.0)}
    r2 = {"w": (torch.ones(2, 2), torch.ones(2, 2), 1.0)}
    with pytest.raises(ValueError, match="ranks differ"):
        merge_lora_adapters([r4, r2])
    merge_lora_adapters([r4, r2], space="delta_weights")  # ΔW's of any rank merge
    with pytest.raises(ValueError, match="merge space"):
        merge_lora_adapters([r4, r4], space="weights")
    with pytest.raises(ValueError, match="merge method"):
        merge_lora_adapters([r4, r4], method="dare_linear")
    with pytest.raises(ValueError, match="differ in modules"):
        merge_lora_adapters([r4, {"v": r4["w"]}])
    with pytest.raises(ValueError, match="3 weights for 2"):
        merge_lora_adapters([r4, r4], weights=(1, 1, 1))
    with pytest.raises(ValueError, match="density"):
        merge_lora_adapters([r4, r4], method="dare_ties", density=0.0)
