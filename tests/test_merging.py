"""TIES merging (editors/merging.py): the spec's worked two-model case, trimming per tensor and
over the whole task vector, the variants against hand computations and against peft's own ``ties``."""

from __future__ import annotations

import pytest
import torch
from peft.utils.merge_utils import ties as peft_ties

from editors.merging import (
    VARIANTS,
    TiesConfig,
    merge_models,
    merge_task_vectors,
    ties_task_vector,
    variant,
)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_two_models_weight_one_agree_mean_disagree_larger_one_survivor_that_value(name):
    # entries: agree (+2, +4), disagree (+3, -5), only the first survives (+1, 0), neither (0, 0),
    # disagree the other way (-6, +1)
    t1 = torch.tensor([2.0, 3.0, 1.0, 0.0, -6.0])
    t2 = torch.tensor([4.0, -5.0, 0.0, 0.0, 1.0])
    merged = ties_task_vector([{"w": t1}, {"w": t2}], variant(name, density=1.0))["w"]
    assert merged.tolist() == [3.0, -5.0, 1.0, 0.0, -6.0]


def test_density_trims_each_tensor_by_its_own_magnitudes():
    big = torch.tensor([10.0, 20.0, 30.0, 40.0])
    small = torch.tensor([0.1, -0.4, 0.3, 0.2])
    cfg = TiesConfig(density=0.5)  # per tensor: keep int(0.5 * 4) = 2 entries of each
    merged = ties_task_vector([{"big": big, "small": small}], cfg)
    assert merged["big"].tolist() == [0.0, 0.0, 30.0, 40.0]
    assert merged["small"].tolist() == pytest.approx([0.0, -0.4, 0.3, 0.0])
    # the original repo trims over the whole task vector (4 of its 8 entries): the large tensor
    # keeps everything, the small one loses everything
    merged = ties_task_vector([{"big": big, "small": small}], variant("original", density=0.5))
    assert merged["big"].tolist() == [10.0, 20.0, 30.0, 40.0]
    assert merged["small"].tolist() == [0.0, 0.0, 0.0, 0.0]


def test_trimming_counts_entries_per_tensor_at_the_wise_density():
    torch.manual_seed(0)
    t = torch.randn(40, 25)
    merged = ties_task_vector([{"w": t}], TiesConfig(density=0.53))["w"]
    kept = merged != 0
    assert int(kept.sum()) == int(0.53 * t.numel())
    assert t.abs()[kept].min() >= t.abs()[~kept].max()  # the largest magnitudes are the ones kept
    assert torch.equal(merged[kept], t[kept])


def _hand(t, weights, density, sign_from, divisor, majority="total"):
    """TIES by hand, entry by entry, for 1-D tensors trimmed per tensor."""
    n, size = len(t), t[0].numel()
    trimmed = []
    for x in t:
        k = int(density * size)
        keep = sorted(range(size), key=lambda i: -abs(float(x[i])))[:k]
        trimmed.append([float(x[i]) if i in keep else 0.0 for i in range(size)])
    out = []
    for i in range(size):
        vals = [trimmed[j][i] for j in range(n)]
        basis = [v * w for v, w in zip(vals, weights)] if sign_from == "weighted" else vals
        if majority == "total":
            s = sum(basis)
        else:
            s = sum((v > 0) - (v < 0) for v in basis)
        gamma = 1 if s >= 0 else -1
        agree = [j for j in range(n) if vals[j] != 0 and (vals[j] > 0) == (gamma > 0)]
        num = sum(weights[j] * vals[j] for j in agree)
        if divisor == "count":
            den = max(len(agree), 1)
        else:
            den = sum(weights[j] for j in agree) or 1.0
        out.append(num / den)
    return out


@pytest.mark.parametrize("sign_from", ["trimmed", "weighted"])
@pytest.mark.parametrize("divisor", ["count", "weight"])
@pytest.mark.parametrize("majority", ["total", "frequency"])
def test_every_variant_equals_a_hand_computation(sign_from, divisor, majority):
    t = [
        torch.tensor([1.0, -2.0, 3.0, 0.5, -0.1, 2.0]),
        torch.tensor([-4.0, 1.0, 2.5, -0.2, 0.3, -1.0]),
        torch.tensor([0.5, 0.7, -3.5, 0.4, 0.2, -0.1]),
    ]
    weights = [1.0, 0.5, 2.0]  # weighted sign election differs from unweighted on entries 0 and 5
    cfg = TiesConfig(
        density=0.67, weights=weights, sign_from=sign_from, divisor=divisor, majority_sign=majority
    )
    merged = ties_task_vector([{"w": x} for x in t], cfg)["w"]
    assert merged.tolist() == pytest.approx(_hand(t, weights, 0.67, sign_from, divisor, majority))


def test_peft_variant_is_peft_ties():
    torch.manual_seed(1)
    tensors = [torch.randn(6, 7) for _ in range(3)]
    weights = [0.3, 1.2, 0.7]
    for method in ("total", "frequency"):
        ours = ties_task_vector(
            [{"w": t} for t in tensors], variant("peft", density=0.4, weights=weights, majority_sign=method)
        )["w"]
        theirs = peft_ties(tensors, torch.tensor(weights), density=0.4, majority_sign_method=method)
        assert torch.allclose(ours, theirs)


def test_easyedit_variant_is_a_weighted_mean_of_the_agreeing_shards():
    """EasyEdit's GTA('magnitude', 'sum', normalize=True): with equal weights w/n the weights cancel."""
    base = {"w": torch.zeros(4)}
    shards = [{"w": torch.tensor([1.0, 2.0, -3.0, 0.0])}, {"w": torch.tensor([3.0, -4.0, -1.0, 2.0])}]
    for w in (1.0, 0.5):
        merged = merge_task_vectors(base, shards, variant("easyedit", density=1.0, weights=[w / 2, w / 2]))
        assert merged["w"].tolist() == [2.0, -4.0, -2.0, 2.0]
    # WISE-Merge's second merge: weights 0.4/n per shard and 0.6 for the merged memory
    merged = merge_task_vectors(
        base,
        shards + [{"w": torch.tensor([1.0, 1.0, 1.0, 1.0])}],
        variant("easyedit", weights=[0.2, 0.2, 0.6]),
    )
    assert merged["w"].tolist() == pytest.approx([1.4, 1.25, -2.0, 1.25])


def test_merge_models_adds_the_scaled_merged_task_vector_to_the_base():
    base = {"a": torch.tensor([1.0, 1.0]), "b": torch.tensor([5.0]), "frozen": torch.tensor([7.0])}
    m1 = {"a": torch.tensor([2.0, 0.0]), "b": torch.tensor([6.0])}
    m2 = {"a": torch.tensor([4.0, 3.0])}  # does not change b
    merged = merge_models(base, [m1, m2], variant("original", scale=2.0))
    # τ1 = (1, -1), τ2 = (3, 2): entry 0 agrees -> mean 2; entry 1: +2 wins -> 2; b: only τ1 -> 1
    assert merged["a"].tolist() == [1.0 + 2 * 2.0, 1.0 + 2 * 2.0]
    assert merged["b"].tolist() == [5.0 + 2 * 1.0]
    assert merged["frozen"].tolist() == [7.0]
    half = {k: v.half() for k, v in base.items()}
    assert merge_models(half, [m1, m2], TiesConfig())["a"].dtype == torch.float16


def test_bad_settings_fail_in_one_line():
    with pytest.raises(ValueError, match="divisor"):
        TiesConfig(divisor="mean")
    with pytest.raises(ValueError, match="density"):
        TiesConfig(density=1.5)
    with pytest.raises(ValueError, match="weights"):
        ties_task_vector([{"w": torch.ones(2)}], TiesConfig(weights=[1.0, 2.0]))
    with pytest.raises(ValueError, match="variant"):
        variant("dare")
