"""PMET (Li et al., AAAI 2024): MEMIT with the target on the MLP output, attention co-optimised.

Differences from MEMIT, all in configuration or in :meth:`optimized_sites`:
- δ_m on the MLP down-projection output and δ_a on the attention output of layer L are optimised
  jointly (one Adam, each clamped to its own initial norm); only z_m = h_m + δ_m is used, and only
  MLP weights are written;
- the residual is spread by 1/sqrt(L − i) instead of 1/(L − i);
- kl_factor 1, lr 0.2, 30 iterations (at most 29 Adam steps), and the adaptive NLL weight with its
  stop rule: once every answer token is the argmax, the NLL weighs 0.1× and the loop stops if
  kl_factor · KL ≤ 0.01 (``TargetConfig.adaptive_nll``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from editors.core.targets import TargetConfig
from editors.memit import Memit, MemitConfig


def _pmet_target() -> TargetConfig:
    # xpq-tech/PMET hparams/PMET/EleutherAI_gpt-j-6B.json
    return TargetConfig(
        steps=30, lr=0.2, kl_factor=1.0, weight_decay=0.5, clamp_norm_factor=0.75, adaptive_nll=True
    )


@dataclass
class PmetConfig(MemitConfig):
    _target_: str = "editors.pmet.Pmet"
    update_weight: float = 6000.0  # λ: PMET GPT-J CounterFact value (zsRE: 4500)
    target: TargetConfig = field(default_factory=_pmet_target)
    target_site: str = "mlp_out"  # z_m is the MLP output of layer L
    residual_spread: str = "sqrt"  # R / sqrt(L − i)
    co_optimize_attention: bool = True  # also optimise δ_a on the attention output (then dropped)


class Pmet(Memit):
    config: PmetConfig

    def optimized_sites(self) -> list[str]:
        sites = super().optimized_sites()
        if self.config.co_optimize_attention:
            sites.append(self.spec.attn_out_name(self.config.layers[-1]))
        return sites
