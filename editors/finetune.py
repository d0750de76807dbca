"""Fine-tuning baselines: FT, FT-L / FT-W, and F-Learning, with the same editor contract.

**FT** (ROME's and MEMIT's ``ft_main``, EasyEdit's FT-L "prompt_last" objective): Adam on the
parameters of the chosen modules at ``layers``, the rest frozen. The loss feeds the prompt only and
reads the log-probabilities of ALL tokens of " " + target_new from the distribution at the last
prompt token (not autoregressive for multi-token targets), averaged over tokens and requests. A
step is taken only while the batch loss is ≥ ``loss_floor``; training stops when an epoch's mean
loss falls below it. ``objective=target_tokens`` instead uses the teacher-forced NLL of the answer
tokens (EasyEdit's FT-M).

- ``norm_constraint`` ε: after every step each edited element is clamped into [w₀ − ε, w₀ + ε]
  (ROME's FT+L, "FT-L"; EasyEdit's norm_constraint).
- ``weight_decay``, or ``wd_power_law`` [a, b]: weight decay n^a·e^b for n edits (MEMIT's FT-W
  hparams file). MEMIT's code applies the power law only when it is a tuple, and the JSON gives a
  list, so its released FT-W runs used weight decay 0; ``conf/editor/ft_w.yaml`` follows that and
  the field turns the power law on.

**F-Learning** (Ni et al., ACL 2024: "forgetting before learning"): fine-tune on the OLD facts
(prompt -> target_true) to get Δ_old, subtract ``forget_weight`` λ times it, θ′ = θ − λ·Δ_old,
then fine-tune θ′ on the new facts; the returned delta is −λ·Δ_old + Δ_new. Requests without an old
answer (zsRE) skip the forgetting stage. The paper's λ and per-stage settings could not be read
(see the spec); the forgetting stage reuses the learning stage's settings unless set.

The model's weights are restored bit-exactly before ``apply`` returns (the runner applies the delta).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from editors import checks
from editors.base import EditorBase
from editors.core.tokens import answer_ids, model_device
from editors.delta import WeightDelta, WeightHandle
from editors.requests import EditRequest
from editors.spec import ModelSpec
from editors.training import (
    OBJECTIVES,
    SSS_REDUCTIONS,
    AnswerBatch,
    LoopConfig,
    answer_batch,
    answer_logits,
    answer_nll,
    fit,
    mix_sss,
)

MODULES = ("mlp_out", "layer")


@dataclass
class FineTuneConfig:
    """Fine-tuning hyperparameters (ROME/MEMIT reference names; GPT-J values in conf/editor_model)."""

    _target_: str = "editors.finetune.FineTune"
    layers: list[int] = field(default_factory=lambda: [21])  # layers whose modules are trained
    module: str = (
        "mlp_out"  # mlp_out: the MLP down-projection (weight, bias) | layer: the whole block (MEMIT's FT-W)
    )
    objective: str = (
        "prompt_last"  # prompt_last (FT-L, reference) | target_tokens (teacher-forced answer NLL, FT-M)
    )
    num_steps: int = 25  # epochs over the batch's requests (reference num_steps)
    lr: float = 5e-4  # Adam learning rate
    batch_size: int = 64  # requests per optimiser step
    weight_decay: float = 0.0  # Adam weight decay
    wd_power_law: list[float] | None = (
        None  # [a, b]: weight decay n^a * e^b for n edits (overrides weight_decay)
    )
    norm_constraint: float | None = None  # ε of the L∞ clamp around the original weights (FT-L); null: none
    loss_floor: float = 0.01  # no step below this batch loss; stop when an epoch's mean is below it
    sss_coefficient: float = 0.0  # C of SSS: loss = (1 − C)·L + C·‖∂L/∂H‖² (0: off; editor=ft_l_sss: 0.9)
    sss_reduction: str = "sum"  # sum (the release) | mean (over loss-bearing positions)

    def __post_init__(self) -> None:
        checks.layer_list("editor.layers", self.layers)
        checks.one_of("editor.module", self.module, MODULES)
        checks.one_of("editor.objective", self.objective, OBJECTIVES)
        checks.non_negative("editor.num_steps", self.num_steps)
        checks.positive("editor.lr", self.lr)
        checks.at_least_one("editor.batch_size", self.batch_size)
        checks.non_negative("editor.weight_decay", self.weight_decay)
        if self.wd_power_law is not None and len(self.wd_power_law) != 2:
            checks.fail("editor.wd_power_law", "[a, b] or null", list(self.wd_power_law))
        checks.positive("editor.norm_constraint", self.norm_constraint, optional=True)
        checks.non_negative("editor.loss_floor", self.loss_floor)
        checks.fraction("editor.sss_coefficient", self.sss_coefficient, low_open=False)
        checks.one_of("editor.sss_reduction", self.sss_reduction, SSS_REDUCTIONS)


@dataclass
class FLearningConfig(FineTuneConfig):
    _target_: str = "editors.finetune.FLearning"
    forget_weight: float = 1.0  # λ: θ′ = θ − λ·Δ_old (unverified default; sweep it)
    forget_num_steps: int | None = None  # null: num_steps
    forget_lr: float | None = None  # null: lr

    def __post_init__(self) -> None:
        super().__post_init__()
        checks.non_negative("editor.forget_weight", self.forget_weight)
        if self.forget_num_steps is not None:
            checks.non_negative("editor.forget_num_steps", self.forget_num_steps)
        checks.positive("editor.forget_lr", self.forget_lr, optional=True)


class FineTune(EditorBase):
    """FT / FT-L / FT-W (see the module docstring)."""

    MEMORY_KNOBS = (("editor.batch_size", "requests per optimiser step of a fine-tuning editor"),)

    def __init__(self, config: FineTuneConfig, spec: ModelSpec) -> None:
        if config.objective not in OBJECTIVES:
            raise ValueError(f"editor.objective must be one of {OBJECTIVES}, got {config.objective!r}")
        if config.module not in MODULES:
            raise ValueError(f"editor.module must be one of {MODULES}, got {config.module!r}")
        if not config.layers:
            raise ValueError("editor.layers is empty")
        if config.wd_power_law is not None and len(config.wd_power_law) != 2:
            raise ValueError(f"editor.wd_power_law must be [a, b], got {config.wd_power_law}")
        super().__init__(config, spec)

    def parameters(self, model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        """The trained parameters, by name."""
        prefixes = [
            (
                self.spec.mlp_out_name(layer)
                if self.config.module == "mlp_out"
                else self.spec.layer_name(layer)
            )
            + "."
            for layer in self.config.layers
        ]
        params = {n: p for n, p in model.named_parameters() if n.startswith(tuple(prefixes))}
        if not params:
            raise ValueError(f"no parameters under {prefixes} (check model.layer / model.mlp_out templates)")
        return params

    def weight_decay(self, n_requests: int) -> float:
        if self.config.wd_power_law is None:
            return self.config.weight_decay
        a, b = self.config.wd_power_law
        return float(n_requests**a * np.exp(b))

    def finetune(
        self,
        model: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        prompts: Sequence[tuple[str, str]],
        answers: Sequence[str],
        num_steps: int,
        lr: float,
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Train the parameters on (template, subject) -> answer; return their change and diagnostics.
        The model is left exactly as it was."""
        cfg = self.config
        params = self.parameters(model)
        originals = {n: p.detach().clone() for n, p in params.items()}
        device = model_device(model)
        targets = [answer_ids(tokenizer, " " + a) for a in answers]
        batches = [  # tokenised once: every epoch feeds the same batches
            answer_batch(
                tokenizer,
                prompts[lo : lo + cfg.batch_size],
                targets[lo : lo + cfg.batch_size],
                cfg.objective,
                device,
            )
            for lo in range(0, len(prompts), cfg.batch_size)
        ]
        loop = LoopConfig(
            epochs=num_steps,
            lr=lr,
            weight_decay=self.weight_decay(len(prompts)),
            loss_floor=cfg.loss_floor,
        )

        def clamp() -> None:  # FT-L: each element stays within ε of its original value
            if cfg.norm_constraint is not None:
                eps = cfg.norm_constraint
                with torch.no_grad():
                    for n, p in params.items():
                        p.copy_(torch.clamp(p, originals[n] - eps, originals[n] + eps))

        try:
            report = fit(params, self._loss_fn(model), batches, loop, model=model, after_step=clamp)
            deltas = {n: (p.detach() - originals[n]).float() for n, p in params.items()}
        finally:
            WeightHandle(model, originals).restore()
        return deltas, {"ft_steps": float(report.steps), "ft_final_loss": report.final_loss}

    def _loss_fn(self, model: torch.nn.Module):
        """The loss of one batch: the mean over requests of their answer NLL, mixed with SSS when
        ``sss_coefficient`` > 0 (every step, as the seed describes FT-L w/ SSS)."""
        cfg = self.config
        use_sss = cfg.sss_coefficient > 0

        def loss(batch: AnswerBatch) -> torch.Tensor:
            logits, hidden = answer_logits(model, batch, hidden=use_sss)
            nll = answer_nll(logits, batch).mean()
            if not use_sss:
                return nll
            reads = batch.size if cfg.objective == "prompt_last" else int(batch.mask.sum())
            return mix_sss(nll, hidden, cfg.sss_coefficient, cfg.sss_reduction, positions=reads)

        return loss

    def apply(
        self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, requests: Sequence[EditRequest]
    ) -> WeightDelta:
        prompts = [(r.prompt, r.subject) for r in requests]
        deltas, info = self.finetune(
            model, tokenizer, prompts, [r.target_new for r in requests], self.config.num_steps, self.config.lr
        )
        self.record(requests)
        return WeightDelta(deltas=deltas, diagnostics=info)


class FLearning(FineTune):
    """F-Learning: forget the old facts by parameter subtraction, then fine-tune on the new ones."""

    config: FLearningConfig

    def apply(
        self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, requests: Sequence[EditRequest]
    ) -> WeightDelta:
        cfg = self.config
        old = [r for r in requests if r.target_true]
        result = WeightDelta()
        diagnostics = {"f_learning_forgotten": float(len(old))}
        forget = None
        if old and cfg.forget_weight != 0:
            old_deltas, info = self.finetune(
                model,
                tokenizer,
                [(r.prompt, r.subject) for r in old],
                [r.target_true for r in old],
                cfg.forget_num_steps if cfg.forget_num_steps is not None else cfg.num_steps,
                cfg.forget_lr if cfg.forget_lr is not None else cfg.lr,
            )
            diagnostics |= {f"forget_{k}": v for k, v in info.items()}
            for name, d in old_deltas.items():
                result.add(name, -cfg.forget_weight * d)
            forget = result.attach(model)  # θ′ = θ − λ·Δ_old, for the learning stage
        try:
            new_deltas, info = self.finetune(
                model,
                tokenizer,
                [(r.prompt, r.subject) for r in requests],
                [r.target_new for r in requests],
                cfg.num_steps,
                cfg.lr,
            )
        finally:
            if forget is not None:
                forget.restore()
        for name, d in new_deltas.items():
            result.add(name, d)
        result.diagnostics = diagnostics | info
        self.record(requests)
        return result
