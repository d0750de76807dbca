"""CoME (Jung et al., NAACL 2025): conflict-free editing by unlearning the old object.

CoME changes only how each request's target vector is built, on top of MEMIT, PMET or AlphaEdit:

  A. δ′: optimised like δ but toward the OLD object (the "unlearning vector");
  B. δ:  the base method's vector toward the new object; z₀ = h + δ;
  C. δ″ = (δ′·c) c, the projection of δ′ on the bisector c of δ and δ′ (the part the two share);
     on the top-p fraction M of coordinates of z₀ (largest signed values):
         z = z₀ − α·δ′ + w·δ″    (w = 1 in the released code, α in the paper's formula)
     and z = z₀ elsewhere.

Keys, covariance, residual spreading and the solve are the base method's. Defaults follow the
released code (ekgus9/COME); each deviation from the paper is a switch below.

Adam steps, as released (v_num_grad_steps = S). δ takes S − 1: its loop runs S iterations and
breaks before stepping at the last one (the MEMIT/PMET loop). δ′ runs int(ratio × S) iterations,
but the released loops test that same break, ``it == S − 1``, so δ′ takes
min(int(ratio × S), S − 1) steps: COME_MEMIT 12 for S = 25 (range(12) never reaches it = 24, so
every iteration steps); COME_PMET 29 for S = 30, like δ.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
from transformers import PreTrainedTokenizerBase

from editors.alphaedit import AlphaEdit, AlphaEditConfig
from editors.checks import non_negative
from editors.core.targets import TargetConfig, Targets, new_answers
from editors.core.tokens import answer_ids
from editors.memit import Memit, MemitConfig
from editors.pmet import Pmet, PmetConfig, _pmet_target
from editors.requests import EditRequest

RESTRICTIONS = ("signed", "magnitude", "none")
COEFFICIENTS = ("code", "paper")


@dataclass
class ComeSettings:
    """CoME's knobs, shared by both bases (paper symbols in comments)."""

    unlearn_weight: float = 0.1  # α: weight of the unlearning vector δ′ (released GPT-J value `a`)
    top_p_fraction: float = 0.2  # p: fraction of coordinates of z₀ that CoME changes (`p`)
    common_coefficient: str = (
        "code"  # weight w of δ″: code (1, released code) | paper (α: z = z₀ − α(δ′ − δ″))
    )
    restriction: str = "signed"  # which coordinates: signed (largest values of z₀, code) | magnitude (largest |z₀|) | none (all)
    subtract_unlearning: bool = True  # ablation switch: the −α·δ′ term
    add_common: bool = True  # ablation switch: the +w·δ″ term
    old_target_space: bool = False  # prepend a space to the old object; the released code does not
    # δ′ iterations = int(ratio × the base method's iterations); its Adam steps are capped by the
    # base loop's break (module docstring): COME_MEMIT 0.5 → 12 of 25, COME_PMET 1.0 → 29 of 30
    unlearn_step_ratio: float = 1.0
    unlearn_norm: str = "new"  # δ′ NLL divided by the length of: new (released code) | old object

    def __post_init__(self) -> None:
        _check(self)
        non_negative("editor.unlearn_weight", self.unlearn_weight)
        non_negative("editor.unlearn_step_ratio", self.unlearn_step_ratio)


def _check(settings: ComeSettings) -> None:
    if settings.restriction not in RESTRICTIONS:
        raise ValueError(f"editor.restriction must be one of {RESTRICTIONS}, got {settings.restriction!r}")
    if settings.common_coefficient not in COEFFICIENTS:
        raise ValueError(
            f"editor.common_coefficient must be one of {COEFFICIENTS}, got {settings.common_coefficient!r}"
        )
    if settings.unlearn_norm not in ("new", "old"):
        raise ValueError(f"editor.unlearn_norm must be 'new' or 'old', got {settings.unlearn_norm!r}")
    if not 0.0 < settings.top_p_fraction <= 1.0:
        raise ValueError(f"editor.top_p_fraction must be in (0, 1], got {settings.top_p_fraction}")


def top_p_mask(z0: torch.Tensor, fraction: float, mode: str = "signed") -> torch.Tensor:
    """[N, d] bool: the coordinates CoME changes.

    ``signed`` (released code): z₀ ≥ τ, τ the k-th smallest value of z₀ with k = ⌊(1 − p)·d⌋
    (1-indexed), i.e. d − k + 1 coordinates when there are no ties (821 of 4096 for p = 0.2).
    ``magnitude``: the same rule on |z₀|. ``none``: every coordinate.
    """
    if mode == "none":
        return torch.ones_like(z0, dtype=torch.bool)
    values = z0.abs() if mode == "magnitude" else z0
    k = max(int((1 - fraction) * z0.shape[-1]), 1)
    tau = values.kthvalue(k, dim=-1, keepdim=True).values
    return values >= tau


def common_component(delta: torch.Tensor, delta_old: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """δ″ = (δ′·c) c with c the unit bisector of δ and δ′, row-wise; and the rows where the guard fired.

    δ″ has norm ‖δ′‖cos(θ/2). When δ or δ′ is zero (the optimisation stopped at once) or they are
    opposite, the bisector is undefined: δ″ = 0 there (the released code would produce NaN).
    """
    n_new, n_old = delta.norm(dim=-1, keepdim=True), delta_old.norm(dim=-1, keepdim=True)
    u, u_old = delta / n_new.clamp(min=1e-12), delta_old / n_old.clamp(min=1e-12)
    bisector = u + u_old
    n_bis = bisector.norm(dim=-1, keepdim=True)
    guard = ((n_new == 0) | (n_old == 0) | (n_bis < 1e-6)).squeeze(-1)
    c = bisector / n_bis.clamp(min=1e-12)
    common = (delta_old * c).sum(-1, keepdim=True) * c
    return torch.where(guard[:, None], torch.zeros_like(common), common), guard


def combine(
    h: torch.Tensor, delta: torch.Tensor, delta_old: torch.Tensor, settings: ComeSettings
) -> tuple[torch.Tensor, dict[str, list[float]]]:
    """CoME's target z from h, δ and δ′ ([N, d] each), with per-request diagnostics."""
    z0 = h + delta
    common, guard = common_component(delta, delta_old)
    alpha = settings.unlearn_weight
    weight = 1.0 if settings.common_coefficient == "code" else alpha
    change = torch.zeros_like(z0)
    if settings.subtract_unlearning:
        change = change - alpha * delta_old
    if settings.add_common:
        change = change + weight * common
    mask = top_p_mask(z0, settings.top_p_fraction, settings.restriction)
    z = torch.where(mask, z0 + change, z0)
    cos = torch.nn.functional.cosine_similarity(delta, delta_old, dim=-1)
    return z, {
        "come_unlearn_norm": delta_old.norm(dim=-1).tolist(),
        "come_common_norm": common.norm(dim=-1).tolist(),
        "come_cos_new_old": cos.tolist(),
        "come_mask_fraction": mask.float().mean(-1).tolist(),
        "come_zero_norm_guard": guard.float().tolist(),
    }


class ComeMixin:
    """Replaces the base editor's target step by CoME's (steps A, B, C above)."""

    config: ComeSettings

    def compute_targets(
        self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, requests: Sequence[EditRequest]
    ) -> tuple[torch.Tensor, Targets, dict[str, list[float]]]:
        settings = self.config
        _check(settings)
        site = self.optimized_sites()[0]
        # A. the unlearning vector δ′, toward the old object (EOS where there is none, as for zsRE:
        # the released loader's "<|endoftext|>", never preceded by a space).
        space = " " if settings.old_target_space else ""
        old = [tokenizer.eos_token if r.target_true is None else space + r.target_true for r in requests]
        base = self.config.target
        iterations = max(int(base.steps * settings.unlearn_step_ratio), 1)
        # The released δ′ loop keeps the base loop's break test (`it == v_num_grad_steps − 1`), so it
        # steps at every one of its iterations unless it runs as many as the base loop.
        base_updates = base.steps - 1 if base.updates is None else base.updates
        lengths = None
        if settings.unlearn_norm == "new":
            lengths = [len(answer_ids(tokenizer, a)) for a in new_answers(requests)]
        unlearn = self.optimize(
            model,
            tokenizer,
            requests,
            cfg=replace(base, steps=iterations, updates=min(iterations, base_updates)),
            answers=old,
            norm_lengths=lengths,
        )
        # B. the base method's vector δ toward the new object.
        targets = self.optimize(model, tokenizer, requests)
        # C. combine.
        z, diagnostics = combine(targets.init[site], targets.delta[site], unlearn.delta[site], settings)
        diagnostics["come_unlearn_steps"] = unlearn.steps.float().tolist()
        return z, targets, diagnostics


@dataclass
class ComeMemitConfig(MemitConfig, ComeSettings):
    _target_: str = "editors.come.ComeMemit"
    unlearn_step_ratio: float = 0.5  # COME_MEMIT: int(25 / 2) = 12 iterations, 12 Adam steps (δ: 24)

    def __post_init__(self) -> None:
        MemitConfig.__post_init__(self)
        ComeSettings.__post_init__(self)


class ComeMemit(ComeMixin, Memit):
    config: ComeMemitConfig


@dataclass
class ComePmetConfig(PmetConfig, ComeSettings):
    _target_: str = "editors.come.ComePmet"
    update_weight: float = 4500.0  # λ in the released COME_PMET GPT-J file (PMET's CounterFact value is 6000)
    target: TargetConfig = field(default_factory=_pmet_target)
    unlearn_step_ratio: float = 1.0  # COME_PMET: the full 30 iterations, 29 Adam steps, PMET's stop rules

    def __post_init__(self) -> None:
        PmetConfig.__post_init__(self)
        ComeSettings.__post_init__(self)


class ComePmet(ComeMixin, Pmet):
    config: ComePmetConfig


@dataclass
class ComeAlphaEditConfig(AlphaEditConfig, ComeSettings):
    """CoME's target step on AlphaEdit's null-space solve (no released code has this pair).
    AlphaEdit's targets are MEMIT's, so δ′ follows COME_MEMIT."""

    _target_: str = "editors.come.ComeAlphaEdit"
    unlearn_step_ratio: float = 0.5  # as COME_MEMIT: int(25 / 2) = 12 iterations, 12 Adam steps

    def __post_init__(self) -> None:
        AlphaEditConfig.__post_init__(self)
        ComeSettings.__post_init__(self)


class ComeAlphaEdit(ComeMixin, AlphaEdit):
    config: ComeAlphaEditConfig
