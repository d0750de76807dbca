"""ROME (Meng et al., 2022): one rank-one update of one MLP per edit, edits applied in turn.

For each request: u = C⁻¹k*/‖C⁻¹k*‖ from the template-averaged key k*; the value v* = h + δ
optimised at the MLP output (``core.targets``); ΔW = (v* − W k) uᵀ / (k·u) on the bare prompt.
Each edit is computed on the model that already holds the previous ones, as in the reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from editors import checks
from editors.core.keys import bare_values, compute_keys
from editors.core.targets import TargetConfig, optimize_targets
from editors.core.tokens import model_device
from editors.core.update import rank_one_update
from editors.delta import WeightDelta
from editors.locate import LocateThenEdit, scratch
from editors.requests import EditRequest
from editors.spec import ModelSpec


def _rome_target() -> TargetConfig:
    return TargetConfig(
        steps=20, lr=0.5, kl_factor=0.0625, weight_decay=0.5, clamp_norm_factor=4.0, batch_size=1
    )


@dataclass
class RomeConfig:
    """ROME hyperparameters (reference GPT-J values)."""

    _target_: str = "editors.rome.Rome"
    layer: int = 5  # the edited MLP layer
    target: TargetConfig = field(default_factory=_rome_target)  # clamp_norm_factor 4 in ROME
    context_templates: list[list[int]] = field(default_factory=lambda: [[5, 10], [10, 10]])
    key_averaging: str = "uniform"  # k*: plain mean over "{}" and the sampled templates
    seed: int = 0
    read_batch_size: int = 64

    def __post_init__(self) -> None:
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            checks.fail("editor.layer", "a layer index ≥ 0", self.layer)
        checks.target("editor.target", self.target)
        checks.context_templates("editor.context_templates", self.context_templates)
        checks.one_of("editor.key_averaging", self.key_averaging, checks.KEY_AVERAGING)
        checks.at_least_one("editor.read_batch_size", self.read_batch_size)


class Rome(LocateThenEdit):
    """ROME. Each target is computed on the model holding the batch's earlier edits, so ROME does
    not read the target cache (its key would have to name that history)."""

    def __init__(self, config: RomeConfig, spec: ModelSpec) -> None:
        super().__init__(config, spec)

    def statistics_modules(self) -> list[str]:
        return [self.spec.mlp_out_name(self.config.layer)]

    def apply(
        self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, requests: Sequence[EditRequest]
    ) -> WeightDelta:
        cfg = self.config
        module = self.spec.mlp_out_name(cfg.layer)
        self.stats.prefetch([module])
        context = self.context(model, tokenizer)
        device = model_device(model)
        second_moment = self.stats.get(module).to(device)
        norms, steps, nll = [], [], []
        with scratch(model) as work:
            for request in requests:
                one = [request]
                key_star = compute_keys(
                    model, tokenizer, one, module, context, cfg.key_averaging, cfg.read_batch_size
                )[0]
                targets = optimize_targets(model, tokenizer, one, [module], context, cfg.target)
                key = bare_values(model, tokenizer, one, module, "input")[0]
                value = bare_values(model, tokenizer, one, module, "output")[0]
                update = rank_one_update(key_star, key, targets.value(module)[0], value, second_moment)
                work.write(module, update)
                norms.append(float(targets.delta[module].norm()))
                steps.append(float(targets.steps[0]))
                nll.append(float(targets.nll[0]))
        delta = work.delta
        delta.case_diagnostics.update({"target_delta_norm": norms, "target_steps": steps, "target_nll": nll})
        self.record(requests)
        return delta
