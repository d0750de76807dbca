"""TIES merging of task vectors (Yadav et al., 2023, arXiv 2306.01708), built on peft's
``peft.utils.merge_utils``: the project's one merging module (WISE's knowledge shards, and the
merge of two LoRA-unlearned models in ZJUKLAB's SemEval-2025 recipe, ``merge_lora_adapters``, with
task arithmetic and DARE-TIES beside TIES).

A task vector is a ``{name: tensor}`` change of some parameters, τ_t = θ_t − θ₀. For each tensor
name (``merge_task_vectors``):

1. **trim**: keep the ``density`` fraction of τ_t's entries of largest magnitude, zero the rest
   (peft ``prune(..., "magnitude")``: k = int(density · numel), ties broken by ``torch.topk``).
   ``trim_scope="tensor"``: per tensor; ``"global"``: over the task vector's tensors flattened
   together (the original repo's top-k over the whole model).
2. **elect the sign** per entry (peft ``calculate_majority_sign_mask``): γ = sign(Σ_t v_t)
   (``majority_sign="total"``, the paper's "mass") or sign(Σ_t sign v_t) (``"frequency"``), where
   v_t is the trimmed τ_t (``sign_from="trimmed"``) or w_t times it (``"weighted"``); a zero sum
   counts as +1. Entries trimmed to zero never agree with γ.
3. **disjoint merge**: τ_m = Σ_t a_t w_t τ̂_t / divisor, a_t = [sign τ̂_t = γ]; divisor
   ``"count"`` = Σ_t a_t (peft ``disjoint_merge``; at least 1) or ``"weight"`` = Σ_t a_t w_t (a
   weighted mean; 1 where no task agrees).
4. θ = θ₀ + λ·τ_m with λ = ``scale``.

With two models of weight 1: an entry where both survive and agree gets their mean, where they
disagree the larger-magnitude one alone, where only one survives that value.

**Which implementation each setting reproduces** (spec §3.2; ``VARIANTS`` holds them by name):

| knob          | ``original`` (Yadav et al.) | ``mergekit`` ``ties`` | ``peft`` ``ties`` | ``easyedit`` (WISE's GTA) |
|---------------|-----------------------------|-----------------------|-------------------|---------------------------|
| trim_scope    | global (topk over the model) | tensor               | tensor            | tensor (``magnitude``)    |
| sign_from     | trimmed (no weights)        | weighted              | trimmed           | weighted                  |
| majority_sign | total                       | total (``sum``)       | total (default) or frequency | total (``sum``) |
| divisor       | count                       | weight (``normalize: true``) | count      | weight (``normalize=True``) |
| scale λ       | searched in [0.8, 2.5]      | 1 (weights play λ)    | 1                 | 1                         |
| weights       | none (all 1)                | per model             | per adapter       | per shard (WISE: ``weights / n``) |

Differences not reproduced: the original repo resolves a zero sign sum with the sign of the
majority over all entries (here, as in peft/mergekit/EasyEdit, +1; this only matters where the
sum is exactly 0, e.g. a ±1 tie under ``frequency``). Arithmetic is in float32 (float64 kept), the
result cast to the base tensor's dtype.

**LoRA adapters: two merge spaces** (``merge_lora_adapters``, spec §3.1; ZJUKLAB's SemEval-2025
merge of two LoRA-unlearned models). Member t is ``{module: (A_t [r, in], B_t [out, r], s_t)}``
with s_t its LoRA scaling (α/r); the result is the merged ΔW per module, in B·A orientation.

| space | what is merged | reproduces |
|-------|----------------|------------|
| ``lora_factors`` | the stacked A_t's and, separately, the stacked B_t's; A_t weighted by sign(w_t s_t)·√|w_t s_t|, B_t by √|w_t s_t|; ΔW = B_m·A_m (merged scaling 1) | peft LoRA ``add_weighted_adapter(combination_type=…, density=…)`` + ``merge_and_unload()`` (ZJUKLAB's released merge); equal ranks needed |
| ``delta_weights`` | the full task vectors ΔW_t = s_t·B_t·A_t, weights w_t | the TIES paper's merge of the task vectors (per-tensor trim, the ``peft`` variant above); ranks may differ |

| method | per tensor of the members | peft name (``PEFT_COMBINATION``) |
|--------|---------------------------|----------------------------------|
| ``ties`` | magnitude trim to ``density``, sign elected by the total of the unweighted trimmed values, weighted sum of the agreeing ones / their count | ``ties`` (majority ``total``) |
| ``task_arithmetic`` | Σ_t w_t x_t | ``linear`` (``merge_utils.task_arithmetic`` on the factors) |
| ``dare_ties`` | DARE (keep each entry with probability ``density``, divide by it), then TIES's sign election and disjoint merge | ``dare_ties`` |

What differs between the spaces: B_m·A_m is not TIES(ΔW_1, ΔW_2) (trim and sign election act on
factor entries, and the product mixes members: (B_1+B_2)(A_1+A_2)/4 for two agreeing members),
and factor-space ``task_arithmetic`` (peft's ``linear``) = (Σ√(w s)B)(Σ√(w s)A) has cross terms;
delta-space ``task_arithmetic`` is exactly Σ w_t s_t B_t A_t, which is peft's ``cat`` (A's and B's
concatenated into a rank-Σr adapter). ``dare_ties``'s masks come from a CPU ``torch.Generator``
seeded with ``seed``, drawn module by module in the adapters' order, A's before B's: the order of
peft's draws from the global generator, so the factor-space result equals peft's when that is
seeded where its merge loop starts (after the new adapter's initialisation).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from peft.utils.merge_utils import (
    calculate_majority_sign_mask,
    disjoint_merge,
    prune,
    reshape_weight_task_tensors,
)

MAJORITY_SIGNS = ("total", "frequency")
SIGN_FROM = ("trimmed", "weighted")
DIVISORS = ("count", "weight")
TRIM_SCOPES = ("tensor", "global")


@dataclass(frozen=True)
class TiesConfig:
    """One TIES variant (see the module docstring's table)."""

    density: float | Sequence[float] = 1.0  # fraction of each task vector kept (per task when a list)
    weights: Sequence[float] | None = None  # w_t per task (None: 1 each)
    majority_sign: str = "total"  # total (sum of values) | frequency (sum of signs)
    sign_from: str = "trimmed"  # trimmed (peft, original) | weighted (mergekit, EasyEdit GTA)
    divisor: str = "count"  # count (peft, original) | weight (mergekit / EasyEdit normalize=True)
    trim_scope: str = "tensor"  # tensor (peft, mergekit, EasyEdit) | global (original repo)
    scale: float = 1.0  # λ: θ = θ₀ + λ·τ_m (the original repo's; 1 elsewhere)

    def __post_init__(self) -> None:
        for key, value, choices in (
            ("majority_sign", self.majority_sign, MAJORITY_SIGNS),
            ("sign_from", self.sign_from, SIGN_FROM),
            ("divisor", self.divisor, DIVISORS),
            ("trim_scope", self.trim_scope, TRIM_SCOPES),
        ):
            if value not in choices:
                raise ValueError(f"ties {key} must be one of {', '.join(choices)}, got {value!r}")
        densities = self.density if isinstance(self.density, Sequence) else [self.density]
        if any(not 0 <= d <= 1 for d in densities):
            raise ValueError(f"ties density must be in [0, 1], got {self.density!r}")

    def densities(self, n: int) -> list[float]:
        if isinstance(self.density, Sequence):
            if len(self.density) != n:
                raise ValueError(f"ties: {len(self.density)} densities for {n} task vectors")
            return [float(d) for d in self.density]
        return [float(self.density)] * n

    def task_weights(self, n: int) -> list[float]:
        if self.weights is None:
            return [1.0] * n
        if len(self.weights) != n:
            raise ValueError(f"ties: {len(self.weights)} weights for {n} task vectors")
        return [float(w) for w in self.weights]


VARIANTS: dict[str, TiesConfig] = {
    "original": TiesConfig(trim_scope="global", sign_from="trimmed", divisor="count"),
    "mergekit": TiesConfig(trim_scope="tensor", sign_from="weighted", divisor="weight"),
    "peft": TiesConfig(trim_scope="tensor", sign_from="trimmed", divisor="count"),
    "easyedit": TiesConfig(trim_scope="tensor", sign_from="weighted", divisor="weight"),
}


def variant(name: str, **settings) -> TiesConfig:
    """The named variant of ``VARIANTS`` with ``settings`` (density, weights, scale, ...) set."""
    if name not in VARIANTS:
        raise ValueError(f"unknown TIES variant {name!r}; known: {', '.join(VARIANTS)}")
    return replace(VARIANTS[name], **settings)


def _work(t: torch.Tensor) -> torch.Tensor:
    return t.double() if t.dtype == torch.float64 else t.float()


def _trim(t: torch.Tensor, density: float) -> torch.Tensor:
    return t if density >= 1 else prune(t, density, method="magnitude")


def _trimmed(
    task_vectors: Sequence[Mapping[str, torch.Tensor]], names: Sequence[str], config: TiesConfig
) -> list[dict[str, torch.Tensor]]:
    """Each task vector over ``names`` (a missing tensor is zero), trimmed, in working precision."""
    shapes = {}
    for tv in task_vectors:
        for name in names:
            if name in tv:
                shapes.setdefault(name, tv[name])
    out = []
    for tv, density in zip(task_vectors, config.densities(len(task_vectors))):
        full = {n: _work(tv[n]) if n in tv else torch.zeros_like(_work(shapes[n])) for n in names}
        if config.trim_scope == "tensor":
            out.append({n: _trim(t, density) for n, t in full.items()})
            continue
        flat = torch.cat([t.reshape(-1) for t in full.values()])
        flat = _trim(flat, density)
        pieces, start = {}, 0
        for n, t in full.items():
            pieces[n] = flat[start : start + t.numel()].view_as(t)
            start += t.numel()
        out.append(pieces)
    return out


def ties_tensor(
    trimmed: Sequence[torch.Tensor], weights: Sequence[float], config: TiesConfig
) -> torch.Tensor:
    """Steps 2-3 for one tensor: the merged τ_m (before λ) of already trimmed task tensors."""
    stacked = torch.stack(list(trimmed), dim=0)
    w = reshape_weight_task_tensors(
        stacked, torch.tensor(weights, dtype=stacked.dtype, device=stacked.device)
    )
    weighted = stacked * w
    agree = calculate_majority_sign_mask(
        weighted if config.sign_from == "weighted" else stacked, method=config.majority_sign
    )
    if config.divisor == "count":
        return disjoint_merge(weighted, agree)
    total = (weighted * agree).sum(dim=0)
    weight_sum = (w * agree).sum(dim=0)
    return total / torch.where(weight_sum == 0, torch.ones_like(weight_sum), weight_sum)


def ties_task_vector(
    task_vectors: Sequence[Mapping[str, torch.Tensor]], config: TiesConfig
) -> dict[str, torch.Tensor]:
    """The merged task vector τ_m (working precision, λ not applied), over every name any task has."""
    if not task_vectors:
        raise ValueError("ties: no task vectors to merge")
    names = list(dict.fromkeys(n for tv in task_vectors for n in tv))
    weights = config.task_weights(len(task_vectors))
    trimmed = _trimmed(task_vectors, names, config)
    return {n: ties_tensor([t[n] for t in trimmed], weights, config) for n in names}


def merge_task_vectors(
    base: Mapping[str, torch.Tensor],
    task_vectors: Sequence[Mapping[str, torch.Tensor]],
    config: TiesConfig,
) -> dict[str, torch.Tensor]:
    """θ₀ + λ·TIES(τ_1..τ_n) for every tensor of ``base`` (tensors no task changes stay as they are)."""
    unknown = {n for tv in task_vectors for n in tv} - set(base)
    if unknown:
        raise ValueError(f"ties: task vectors name tensors the base lacks: {sorted(unknown)[:5]}")
    merged = ties_task_vector(task_vectors, config)
    out = {}
    for name, theta in base.items():
        if name in merged:
            out[name] = (_work(theta) + config.scale * merged[name].to(theta.device)).to(theta.dtype)
        else:
            out[name] = theta.clone()
    return out


def task_vectors(
    base: Mapping[str, torch.Tensor], models: Sequence[Mapping[str, torch.Tensor]]
) -> list[dict[str, torch.Tensor]]:
    """τ_t = θ_t − θ₀ for each fine-tuned ``{name: tensor}`` (names the base lacks are refused)."""
    out = []
    for model in models:
        missing = set(model) - set(base)
        if missing:
            raise ValueError(f"ties: tensors not in the base: {sorted(missing)[:5]}")
        out.append({n: _work(t) - _work(base[n]) for n, t in model.items()})
    return out


def merge_models(
    base: Mapping[str, torch.Tensor],
    models: Sequence[Mapping[str, torch.Tensor]],
    config: TiesConfig,
) -> dict[str, torch.Tensor]:
    """TIES-merge fine-tuned parameter sets onto their common base: θ₀ + λ·TIES(θ_t − θ₀)."""
    return merge_task_vectors(base, task_vectors(base, models), config)


# --------------------------------------------------------------------------------------------
# LoRA adapters: two merge spaces (see the module docstring)

SPACES = ("lora_factors", "delta_weights")
METHODS = ("ties", "task_arithmetic", "dare_ties")
# the combination_type of peft's LoRA ``add_weighted_adapter`` that ``space="lora_factors"`` reproduces
PEFT_COMBINATION = {"ties": "ties", "task_arithmetic": "linear", "dare_ties": "dare_ties"}

LoraFactors = tuple[torch.Tensor, torch.Tensor, float]  # (A [r, in], B [out, r], scaling)


def _dare(t: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE's drop and rescale (peft ``prune(..., "random", rescale=True)``): each entry kept with
    probability ``density`` and divided by it; the mask is drawn on the CPU from ``generator``
    (the same stream as peft's ``torch.bernoulli`` on the global CPU generator) and moved to t."""
    if density >= 1:
        return t
    p = torch.full(t.shape, density, dtype=t.dtype)
    return t * torch.bernoulli(p, generator=generator).to(t.device) / density


def _merge_members(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    method: str,
    density: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """One tensor per member merged as peft's ``merge_utils.task_arithmetic`` / ``ties`` /
    ``dare_ties`` (weights applied after the sign election, count divisor, majority "total")."""
    work = [_work(t) for t in tensors]
    if method == "task_arithmetic":
        return sum(w * t for w, t in zip(weights, work))
    if method == "ties":
        pruned = [_trim(t, density) for t in work]
    else:
        pruned = [_dare(t, density, generator) for t in work]
    return ties_tensor(pruned, weights, VARIANTS["peft"])


def merge_lora_adapters(
    adapters: Sequence[Mapping[str, LoraFactors]],
    *,
    space: str = "lora_factors",
    method: str = "ties",
    density: float = 0.8,
    weights: Sequence[float] = (1.0, 1.0),
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """The merged ΔW [out, in] (= B·A orientation; transpose it for a ``fan_in_fan_out`` layer such
    as GPT-2's Conv1D) of each module, from one ``{module: (A, B, scaling)}`` per member.

    ``space="lora_factors"``: what peft's ``add_weighted_adapter(..., combination_type=
    PEFT_COMBINATION[method], density=density)`` followed by ``merge_and_unload()`` adds to each
    weight: the stacked A's and the stacked B's merged separately, member t's A weighted by
    sign(w_t s_t)·√|w_t s_t| and its B by √|w_t s_t|, then ΔW = B_m·A_m (the merged adapter's
    scaling is 1). ``space="delta_weights"``: the same method on the full ΔW_t = s_t·B_t·A_t per
    module (per-tensor trim, the TIES paper's merge). ``dare_ties`` draws its masks from a CPU
    generator seeded with ``seed``, module by module in ``adapters``' order (A's then B's).
    Working precision float32 (float64 kept)."""
    if space not in SPACES:
        raise ValueError(f"merge space must be one of {', '.join(SPACES)}, got {space!r}")
    if method not in METHODS:
        raise ValueError(f"merge method must be one of {', '.join(METHODS)}, got {method!r}")
    if not adapters:
        raise ValueError("merge_lora_adapters: no adapters to merge")
    if len(weights) != len(adapters):
        raise ValueError(f"merge_lora_adapters: {len(weights)} weights for {len(adapters)} adapters")
    if not (0 < density <= 1 if method == "dare_ties" else 0 <= density <= 1):
        bounds = "(0, 1] for dare_ties" if method == "dare_ties" else "[0, 1]"
        raise ValueError(f"merge density must be in {bounds}, got {density!r}")
    names = list(adapters[0])
    for i, adapter in enumerate(adapters[1:], start=1):
        if set(adapter) != set(names):
            diff = sorted(set(adapter) ^ set(names))[:3]
            raise ValueError(f"merge_lora_adapters: adapter {i} and adapter 0 differ in modules, e.g. {diff}")
    weights = [float(w) for w in weights]
    generator = torch.Generator().manual_seed(seed) if method == "dare_ties" else None
    out = {}
    for name in names:
        factors = [adapter[name] for adapter in adapters]
        if space == "delta_weights":
            deltas = [float(s) * (_work(b) @ _work(a)) for a, b, s in factors]
            out[name] = _merge_members(deltas, weights, method, density, generator)
            continue
        ranks = {a.shape[0] for a, _, _ in factors}
        if len(ranks) != 1:
            combination = PEFT_COMBINATION[method]
            raise ValueError(
                f"lora_factors {combination} of {name}: ranks differ {sorted(ranks)} (peft needs equal ranks)"
            )
        scaled = [w * float(s) for w, (_, _, s) in zip(weights, factors)]
        w_a = [math.sqrt(abs(ws)) * (1.0 if ws >= 0 else -1.0) for ws in scaled]  # sign on A only
        w_b = [math.sqrt(abs(ws)) for ws in scaled]
        dtype = factors[0][0].dtype
        a_m = _merge_members([a for a, _, _ in factors], w_a, method, density, generator).to(dtype)
        b_m = _merge_members([b for _, b, _ in factors], w_b, method, density, generator).to(dtype)
        out[name] = _work(b_m) @ _work(a_m)
    return out
