"""AlphaEdit (Fang et al., ICLR 2025): MEMIT with the update projected on the null space of the
preserved knowledge.

Targets z, keys and the residual spread are MEMIT's. Only the solve changes: per edited layer,
with P the projector onto the null space of the layer's key covariance C (eigenvectors with
eigenvalue below ``nullspace_threshold``; ``SecondMoments.projector``, cached next to C),

    (P (K Kᵀ + C_prev) + L2·I) X = P K Rᵀ,     ΔW = Xᵀ     (keys K [d_in, N], residuals R [d_out, N])

so ΔW = Xᵀ with X in the column space of P (for L2 > 0): ΔW k ≈ 0 for every key the corpus
takes, i.e. outputs on preserved keys do not move. C_prev = Σ K Kᵀ over the batches edited
before (sequential mode), read on the model after each batch's update, as in the reference's
second loop (jianghoucheng/AlphaEdit ``AlphaEdit_main.py``); ``reset`` clears it. MEMIT's λ
(``update_weight``) plays no part. Everything follows the original repository; its λ and
covariance settings are kept in the config only because MEMIT's schema has them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from editors import checks
from editors.base import Covariance, Projector, Requirement
from editors.core.keys import compute_keys
from editors.memit import Memit, MemitConfig
from editors.requests import EditRequest
from editors.spec import ModelSpec


@dataclass
class AlphaEditConfig(MemitConfig):
    """AlphaEdit = MEMIT's fields (``update_weight`` unused) and the null-space settings."""

    _target_: str = "editors.alphaedit.AlphaEdit"
    nullspace_threshold: float = 2e-2  # nullspace_threshold: eigenvalues of C below this span the null space
    l2: float = (
        10.0  # L2: ridge weight of the solve (original repo 10 for every model; EasyEdit's Llama3-8B file: 1)
    )
    accumulate: bool = True  # sequential mode: add each kept batch's K Kᵀ to C_prev (the reference's cache_c)

    def __post_init__(self) -> None:
        MemitConfig.__post_init__(self)
        checks.positive("editor.nullspace_threshold", self.nullspace_threshold)
        checks.non_negative("editor.l2", self.l2)


class AlphaEdit(Memit):
    config: AlphaEditConfig

    def __init__(self, config: AlphaEditConfig, spec: ModelSpec) -> None:
        super().__init__(config, spec)
        self.kept_keys: dict[str, torch.Tensor] = {}  # C_prev per module, float32 [d_in, d_in]

    def requirements(self) -> list[Requirement]:
        threshold = self.config.nullspace_threshold
        return [req for m in self.statistics_modules() for req in (Covariance(m), Projector(m, threshold))]

    def solve(self, index: int, module: str, keys: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        p = self.stats.projector(module, self.config.nullspace_threshold).to(keys.device).double()
        k = keys.double().T  # [d_in, N]
        r = residual.double().T  # [d_out, N]
        gram = k @ k.T
        if module in self.kept_keys:
            gram = gram + self.kept_keys[module].to(gram)
        eye = torch.eye(len(p), dtype=p.dtype, device=p.device)
        x = torch.linalg.solve(p @ gram + self.config.l2 * eye, p @ k @ r.T)  # [d_in, d_out]
        return x.T.float()

    def edited(
        self,
        model: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        requests: Sequence[EditRequest],
        context: list[list[str]],
    ) -> None:
        if not self.config.accumulate:
            return
        cfg = self.config
        for module in self.statistics_modules():
            keys = compute_keys(
                model, tokenizer, requests, module, context, cfg.key_averaging, cfg.read_batch_size
            )
            k = keys.double().T
            add = (k @ k.T).float().cpu()
            self.kept_keys[module] = self.kept_keys[module] + add if module in self.kept_keys else add

    def reset(self) -> None:
        super().reset()
        self.kept_keys.clear()
