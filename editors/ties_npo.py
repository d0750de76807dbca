"""Unlearning by merging two LoRA-unlearned models: ZJUKLAB at SemEval-2025 Task 4 (Xu et al., 2025,
arXiv 2503.21088; code zjunlp/unlearn ``semeval25/unlearn-merging.py``).

Two members are trained from the same model with the same loss (``npo_kl_nll`` of
:class:`editors.unlearning.GradientUnlearning`: NPO + KL + NLL on a LoRA adapter) at different
strengths, one over-forgetting (``over``: 0.4/0.4/0.2, batch 1) and one under-forgetting
(``under``: 0.3/0.3/0.4, batch 2); their adapters are merged (``merge``: TIES at density 0.8 on the
LoRA factors, weights [1, 1], as released: peft ``add_weighted_adapter(..., combination_type="ties",
density=0.8)`` then ``merge_and_unload``) by :func:`editors.merging.merge_lora_adapters`, whose
docstring says how the ``lora_factors`` and ``delta_weights`` spaces differ. The merged ΔW per base
weight is the edit (:class:`~editors.delta.WeightDelta`: restored bit-exactly).

Each member's adapter is an artifact keyed by content (``Resources.adapter_cache``, see
:class:`editors.unlearning.LoraAdapter`): a second run, another merge space, method or density, or
``member=over|under`` (one member unmerged: the three rows of a comparison from the same adapters)
loads them instead of training. Diagnostics: each member's, prefixed ``over_`` / ``under_``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from editors import checks
from editors.base import EditorBase
from editors.delta import WeightDelta
from editors.merging import METHODS as MERGE_METHODS
from editors.merging import SPACES as MERGE_SPACES
from editors.merging import merge_lora_adapters
from editors.requests import EditRequest
from editors.spec import ModelSpec
from editors.unlearning import GradientUnlearning, GradientUnlearningConfig, LoraAdapter

MEMBERS = ("over", "under")


@dataclass
class MergeSettings:
    """How the members' adapters are merged (:func:`editors.merging.merge_lora_adapters`)."""

    space: str = "lora_factors"  # lora_factors (peft's LoRA merge, as released) | delta_weights (TIES on B·A)
    method: str = "ties"  # ties | task_arithmetic | dare_ties
    density: float = 0.8  # fraction kept by the trim (dare_ties: keep probability)
    weights: list[float] = field(default_factory=lambda: [1.0, 1.0])  # per member: over, under
    seed: int = 0  # dare_ties's masks


@dataclass
class TiesNpoConfig:
    """Settings of the merged editor; the defaults are ZJUKLAB's (conf/editor/ties_npo.yaml names them)."""

    _target_: str = "editors.ties_npo.TiesNpo"
    over: GradientUnlearningConfig = field(default_factory=GradientUnlearningConfig)
    under: GradientUnlearningConfig = field(default_factory=GradientUnlearningConfig)
    merge: MergeSettings = field(default_factory=MergeSettings)
    member: str | None = None  # null: the merged model | over | under: that member alone, unmerged

    def __post_init__(self) -> None:
        for name in MEMBERS:
            if not getattr(self, name).lora.enabled:
                checks.fail(f"editor.{name}.lora.enabled", "true (members are LoRA adapters)", False)
        if self.member is not None:
            checks.one_of("editor.member", self.member, MEMBERS)
        checks.one_of("editor.merge.space", self.merge.space, MERGE_SPACES)
        checks.one_of("editor.merge.method", self.merge.method, MERGE_METHODS)
        checks.fraction("editor.merge.density", self.merge.density)
        if len(self.merge.weights) != len(MEMBERS):
            checks.fail("editor.merge.weights", f"{len(MEMBERS)} numbers (over, under)", self.merge.weights)


class TiesNpo(EditorBase):
    """Two LoRA-unlearned members, merged (see the module docstring)."""

    config: TiesNpoConfig
    APPLY_ONCE = True  # the members train on the whole forget set
    MEMORY_KNOBS = (
        ("editor.over.batch_size", "forget (and retain) items per batch of the over-forgetting member"),
        ("editor.under.batch_size", "forget (and retain) items per batch of the under-forgetting member"),
        ("editor.over.lora.r", "the members' LoRA rank (set under.lora.r too)"),
    )

    def __init__(self, config: TiesNpoConfig, spec: ModelSpec) -> None:
        super().__init__(config, spec)

    def variant(self) -> str:
        """``over`` / ``under`` for one member, else the merge (``lora_factors/ties@0.8``)."""
        if self.config.member is not None:
            return self.config.member
        m = self.config.merge
        return f"{m.space}/{m.method}@{m.density:g}"

    def members(self) -> dict[str, GradientUnlearning]:
        """The member editors that this configuration needs, sharing this editor's resources."""
        names = MEMBERS if self.config.member is None else (self.config.member,)
        out = {}
        for name in names:
            member = GradientUnlearning(getattr(self.config, name), self.spec)
            member.resources = self.resources
            out[name] = member
        return out

    def apply(
        self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, requests: Sequence[EditRequest]
    ) -> WeightDelta:
        adapters: dict[str, LoraAdapter] = {}
        diagnostics: dict[str, float] = {}
        per_case: dict[str, list[float]] = {}
        for name, member in self.members().items():
            adapter, diag, cases = member.adapter(model, tokenizer, requests)
            adapters[name] = adapter
            diagnostics |= {f"{name}_{k}": v for k, v in diag.items()}
            per_case |= {f"{name}_{k}": v for k, v in cases.items()}
        if self.config.member is not None:
            deltas = adapters[self.config.member].delta()
        else:
            merge = self.config.merge
            merged = merge_lora_adapters(
                [adapters[name].factors for name in MEMBERS],
                space=merge.space,
                method=merge.method,
                density=merge.density,
                weights=list(merge.weights),
                seed=merge.seed,
            )
            deltas = adapters[MEMBERS[0]].weight_deltas(merged)
        self.record(requests)
        return WeightDelta(deltas=deltas, diagnostics=diagnostics, case_diagnostics=per_case)
