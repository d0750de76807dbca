"""Weight solves and weight layout.

A delta is always computed in (out, in) orientation: ΔW k = Δv. ``nn.Linear`` stores its weight
as (out, in); GPT-2's ``Conv1D`` stores (in, out). The layout is read from the module's type,
never from the model's name.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from editors.hooks import get_module


def is_transposed(module: nn.Module) -> bool:
    """True when ``module.weight`` is stored (in, out), as in GPT-2's Conv1D."""
    if isinstance(module, nn.Linear):
        return False
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - very old transformers
        Conv1D = ()  # noqa: N806
    if isinstance(module, Conv1D):
        return True
    raise TypeError(f"cannot edit a {type(module).__name__}: expected nn.Linear or transformers Conv1D")


def weight_name(module_name: str) -> str:
    return f"{module_name}.weight"


def to_weight_layout(model: nn.Module, module_name: str, delta_out_in: torch.Tensor) -> torch.Tensor:
    """The (out, in) ``delta`` reshaped to the stored weight's layout, checked against its shape."""
    module = get_module(model, module_name)
    delta = delta_out_in.T if is_transposed(module) else delta_out_in
    if delta.shape != module.weight.shape:
        raise ValueError(
            f"update for {module_name} has shape {tuple(delta.shape)}, weight is {tuple(module.weight.shape)}"
        )
    return delta.contiguous()


def spread_divisor(remaining_layers: int, mode: str) -> float:
    """How much of the residual the current layer takes: 1/(L-i) for MEMIT, 1/sqrt(L-i) for PMET."""
    if mode == "linear":
        return float(remaining_layers)
    if mode == "sqrt":
        return math.sqrt(remaining_layers)
    raise ValueError(f"unknown residual spread {mode!r}: expected 'linear' or 'sqrt'")


def least_squares_update(
    keys: torch.Tensor, residuals: torch.Tensor, second_moment: torch.Tensor, update_weight: float
) -> torch.Tensor:
    """MEMIT's batched update Δ = R Kᵀ (λ C + K Kᵀ)⁻¹, in (out, in) orientation, float32.

    ``keys`` [N, d_in], ``residuals`` [N, d_out], ``second_moment`` C [d_in, d_in], λ =
    ``update_weight``. Solved in float64 as (λC + KᵀK) A = Kᵀ, Δ = Rᵀ Aᵀ: the minimiser of
    ‖ΔK - R‖² + λ tr(Δ C Δᵀ).
    """
    k = keys.double().T  # [d_in, N]
    r = residuals.double().T  # [d_out, N]
    c = second_moment.to(k)
    a = torch.linalg.solve(update_weight * c + k @ k.T, k)  # [d_in, N]
    return (r @ a.T).float()


def rank_one_update(
    key_star: torch.Tensor,
    key: torch.Tensor,
    value_star: torch.Tensor,
    value: torch.Tensor,
    second_moment: torch.Tensor,
) -> torch.Tensor:
    """ROME's update ΔW = (v* − W k) uᵀ / (k·u) with u = C⁻¹k*/‖C⁻¹k*‖, (out, in), float32.

    ``key_star`` is the template-averaged key that picks the direction; ``key``/``value`` are the
    bare prompt's key and current output, so ΔW k = v* − W k exactly on the bare prompt.
    """
    c = second_moment.double()
    u = torch.linalg.solve(c, key_star.double())
    u = u / u.norm()
    right = (value_star.double() - value.double()) / torch.dot(key.double(), u)
    return torch.outer(right, u).float()
