"""MEMIT (Meng et al., 2023): spread one batch of edits over several MLP layers.

1. A target value z_i for every request at the last edited layer L (``core.targets``).
2. For each layer l = layers[i]: keys K_l (``core.keys``), residual R = z − (current value at L on
   the bare prompt), spread R / (len(layers) − i), and the least-squares update
   Δ_l = R K_lᵀ (λ C_l + K_l K_lᵀ)⁻¹ (``core.update``), written before the next layer's keys.

The same class runs PMET-style variants: ``target_site=mlp_out`` puts z on the MLP output of layer L
instead of the residual stream, ``residual_spread=sqrt`` divides by sqrt(L − i).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from editors import checks
from editors.core.keys import bare_values, compute_keys
from editors.core.targets import TargetConfig, Targets, cached_targets
from editors.core.tokens import model_device
from editors.core.update import least_squares_update, spread_divisor
from editors.delta import WeightDelta
from editors.locate import LocateThenEdit, scratch
from editors.requests import EditRequest
from editors.spec import ModelSpec


@dataclass
class MemitConfig:
    """MEMIT hyperparameters (reference names and GPT-J values in comments)."""

    _target_: str = "editors.memit.Memit"
    layers: list[int] = field(default_factory=lambda: [3, 4, 5, 6, 7, 8])  # layers; z at the last one
    update_weight: float = 15000.0  # λ, mom2_update_weight: weight of the covariance term
    target: TargetConfig = field(default_factory=TargetConfig)
    target_site: str = "layer"  # where z lives: layer (block output, MEMIT) | mlp_out (PMET)
    residual_spread: str = "linear"  # R/(L-i): linear (MEMIT) | sqrt (PMET)
    context_templates: list[list[int]] = field(default_factory=lambda: [[10, 5]])  # [(max_len, count)]
    key_averaging: str = "grouped"  # keys: mean of per-template-group means (MEMIT) | uniform
    seed: int = 0  # seeds context-template sampling (the reference does not seed it)
    read_batch_size: int = 64  # prompts per forward pass when reading keys and values

    def __post_init__(self) -> None:
        checks.layer_list("editor.layers", self.layers)
        checks.positive("editor.update_weight", self.update_weight)
        checks.target("editor.target", self.target)
        checks.one_of("editor.target_site", self.target_site, checks.TARGET_SITES)
        checks.one_of("editor.residual_spread", self.residual_spread, checks.RESIDUAL_SPREADS)
        checks.context_templates("editor.context_templates", self.context_templates)
        checks.one_of("editor.key_averaging", self.key_averaging, checks.KEY_AVERAGING)
        checks.at_least_one("editor.read_batch_size", self.read_batch_size)


class Memit(LocateThenEdit):
    def __init__(self, config: MemitConfig, spec: ModelSpec) -> None:
        if not config.layers:
            raise ValueError("editor.layers is empty")
        super().__init__(config, spec)

    def statistics_modules(self) -> list[str]:
        return [self.spec.mlp_out_name(layer) for layer in self.config.layers]

    def site(self, layer: int) -> str:
        """The module whose output holds z at ``layer``."""
        if self.config.target_site == "layer":
            return self.spec.layer_name(layer)
        if self.config.target_site == "mlp_out":
            return self.spec.mlp_out_name(layer)
        raise ValueError(f"unknown target_site {self.config.target_site!r}: expected 'layer' or 'mlp_out'")

    def optimized_sites(self) -> list[str]:
        """Modules perturbed while optimising targets; the first holds z (PMET adds attention)."""
        return [self.site(self.config.layers[-1])]

    def optimize(
        self,
        model: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        requests: Sequence[EditRequest],
        **options,
    ) -> Targets:
        """Target vectors through the cache; ``options`` go to :func:`cached_targets`."""
        options.setdefault("cfg", self.config.target)
        return cached_targets(
            self.cache,
            model,
            tokenizer,
            requests,
            self.optimized_sites(),
            self.context(model, tokenizer),
            progress=self.progress,
            state=self.history_state(),
            **options,
        )

    def compute_targets(
        self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, requests: Sequence[EditRequest]
    ) -> tuple[torch.Tensor, Targets, dict[str, list[float]]]:
        """z [N, d] for every request, the optimisation result, per-request diagnostics.

        CoME changes only this step."""
        targets = self.optimize(model, tokenizer, requests)
        return targets.value(self.optimized_sites()[0]), targets, {}

    def apply(
        self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, requests: Sequence[EditRequest]
    ) -> WeightDelta:
        cfg = self.config
        layers = list(cfg.layers)
        modules = self.statistics_modules()
        self.stats.prefetch(modules)
        context = self.context(model, tokenizer)
        z, targets, extra = self.compute_targets(model, tokenizer, requests)
        device = model_device(model)
        z = z.to(device)
        z_site = self.site(layers[-1])
        with scratch(model) as work:
            # The value at L on the bare prompts, read again after every layer's update.
            current = start = bare_values(model, tokenizer, requests, z_site, "output", cfg.read_batch_size)
            for i, module in enumerate(modules):
                keys = compute_keys(
                    model, tokenizer, requests, module, context, cfg.key_averaging, cfg.read_batch_size
                )
                residual = (z - current) / spread_divisor(len(layers) - i, cfg.residual_spread)
                work.write(module, self.solve(i, module, keys, residual))
                current = bare_values(model, tokenizer, requests, z_site, "output", cfg.read_batch_size)
            reached = current
            self.edited(model, tokenizer, requests, context)
        delta = work.delta
        gap_before = (z - start).norm(dim=1)
        gap_after = (z - reached).norm(dim=1)
        delta.case_diagnostics.update(
            {
                "target_delta_norm": targets.delta[z_site].norm(dim=1).tolist(),
                "target_steps": targets.steps.float().tolist(),
                "target_nll": targets.nll.tolist(),
                "target_reached": (1 - gap_after / gap_before.clamp(min=1e-12)).tolist(),
                **extra,
            }
        )
        self.record(requests)
        return delta

    def solve(self, index: int, module: str, keys: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """The (out, in) update of ``module``, the ``index``-th edited layer, that maps ``keys``
        [N, d_in] to ``residual`` [N, d_out]: MEMIT's least squares with λ·C (AlphaEdit changes
        only this)."""
        c = self.stats.get(module).to(keys.device)
        return least_squares_update(keys, residual, c, self.config.update_weight)

    def edited(
        self,
        model: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        requests: Sequence[EditRequest],
        context: list[list[str]],
    ) -> None:
        """Called with every layer's update in place, before the model is put back (AlphaEdit
        reads the edited keys here); MEMIT keeps nothing."""
