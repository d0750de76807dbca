"""ModelSpec: the architecture facts editors need (module names), resolved from conf/model/*.yaml."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ModelSpec:
    """Module-name templates of one architecture. ``{}`` is the layer index.

    layer:     a transformer block; its output is the residual stream after that block.
    mlp_out:   the MLP down-projection (GPT-2 ``mlp.c_proj``, GPT-J ``mlp.fc_out``, LLaMA
               ``mlp.down_proj``). Its input is the key k, its output the MLP's contribution.
    attn_out:  the attention output projection.
    final_norm, lm_head: plain module names.
    """

    layer: str
    mlp_out: str
    attn_out: str
    final_norm: str
    lm_head: str
    n_layers: int

    def layer_name(self, layer: int) -> str:
        return self.layer.format(self._check(layer))

    def mlp_out_name(self, layer: int) -> str:
        return self.mlp_out.format(self._check(layer))

    def attn_out_name(self, layer: int) -> str:
        return self.attn_out.format(self._check(layer))

    def _check(self, layer: int) -> int:
        if not 0 <= layer < self.n_layers:
            raise ValueError(f"layer {layer} out of range for a model with {self.n_layers} layers")
        return layer

    def validate(self, model: torch.nn.Module) -> None:
        """Fail with a message naming the template when a module does not exist in ``model``."""
        names = dict(model.named_modules())
        checks = {
            "layer": self.layer_name(0),
            "mlp_out": self.mlp_out_name(0),
            "attn_out": self.attn_out_name(0),
            "final_norm": self.final_norm,
            "lm_head": self.lm_head,
        }
        for key, name in checks.items():
            if name not in names:
                close = [n for n in names if n.split(".")[-1] == name.split(".")[-1]][:3]
                hint = f" Modules with the same last part: {close}." if close else ""
                raise ValueError(
                    f"model.{key} template resolves to {name!r}, which is not a module of "
                    f"{type(model).__name__}.{hint}"
                )
