"""TIES merging of task vectors (Yadav et al., 2023, arXiv 2306.01708), built on peft's
``peft.utils.merge_utils``: the project's one TIES implementation (WISE's knowledge shards, and
the merge of two LoRA-unlearned models in ZJUKLAB's SemEval-2025 recipe).

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
sum is exactly 0, e.g. a ±1 tie under ``frequency``); peft's LoRA ``add_weighted_adapter`` applies
TIES to the stacked A and B factors separately (ZJUKLAB's merge), not to ΔW = BA: give it the
factors as task vectors to reproduce that, or the ΔW's for the paper's TIES. Arithmetic is in
float32 (float64 kept), the result cast to the base tensor's dtype.
"""

from __future__ import annotations

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
