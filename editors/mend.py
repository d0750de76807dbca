"""MEND (Mitchell et al., ICLR 2022: "Fast Model Editing at Scale"), and MEND w/ SSS (Wang et al.,
Findings of ACL 2024), as one editor with a trained artifact, the hypernetwork.

**The edit.** For an edited weight W of a linear layer, the gradient of the edit loss is a sum of
rank-one terms, ∇_W L = Σ_t δ_t x_tᵀ, where x_t is the layer's input at token t and δ_t the loss's
gradient with respect to its output there (GPT-2's ``Conv1D`` stores W as [in, out], so there it is
Σ_t x_t δ_tᵀ: the layout follows the module's type, never the model's name). MEND never forms ∇_W L:
it normalises x and δ (running mean and variance over the training tokens, per weight shape), maps
[x, δ] through a small MLP to pseudo-activations x̃ and pseudo-deltas δ̃, and edits
W ← W − η_l · Σ_t δ̃_t x̃_tᵀ with a learned edit learning rate η_l per weight (init ``edit_lr``).
Tokens whose x or δ is all zero (padding, the last position) are dropped, as in the reference.

**The MLP** (reference ``nn.IDMLP``/``LRLinear``): ``n_hidden`` + 1 low-rank residual layers
h ← h + relu(u vᵀ h + b), u zero-initialised (``init: id``: the identity at the start), v normal;
with ``combine`` one MLP reads [x, δ] and its output is split back; with ``shared`` one MLP per
weight shape serves every layer of that shape, with a per-layer scale and shift of the
pre-activation (``mode``). The reference clamps at every layer, including the last; so does this.

**Training** (the artifact ``mend``; :meth:`Mend.train_artifact`, on the shared loop
:func:`editors.training.fit`): for each training case, (edit input, equivalence input, locality
input) = (the rewrite prompt + " " + target_new, its first paraphrase + target_new, its first
neighbourhood prompt + its answer). The update is computed from the edit input's gradient and put in
functionally (``torch.func.functional_call`` with W − η·update; the model's weights are never
written), then L_edit = teacher-forced NLL of target_new on the paraphrase with the edited weights,
L_loc = KL(pre ‖ post) over every token of the locality text, and the outer loss
cedit·L_edit + cloc·L_loc is backpropagated into the MLPs and the edit learning rates (Adam,
``lr`` and ``lr_lr``), ``accumulate`` edits per step, gradient norm clipped to ``grad_clip``,
validated every ``val_every`` edits on held-out cases (the same loss, no SSS), early stopping after
``patience`` edits without improvement, ending on the best validation parameters. x and δ are
captured detached, as the reference's hooks do: the outer gradient flows through the MLP, not
through the model's second derivatives.

**SSS** (spec §1.2, EditSSS ``EditTrainer.edit_step``): with ``sss_coefficient`` C > 0, during
training only, the post-edit model is run on the edit input with its final hidden states H, and the
outer loss becomes C·‖∂L_edit_inner/∂H‖² + (1 − C)·(cedit·L_edit + cloc·L_loc), the gradient taken
with ``create_graph`` so that it reaches the MEND parameters through the edited weights.

**At edit time** (:meth:`Mend.apply`): the edit loss is the teacher-forced NLL of " " + target_new
after the rewrite prompt; each request's loss is its own mean over its answer tokens and the batch's
loss is their sum, so the factors of a request are the ones it would have alone and the batch update
is the sum of the single-request updates (the MLP works token by token with frozen statistics). The
model's weights are not written (only ``requires_grad`` of the edited weights is switched on while δ
is taken, then put back); the update is returned as a :class:`WeightDelta`.

Deviations from the reference (eric-mitchell/mend ``algs/mend.py``, ``trainer.py``;
EasyEdit/EditSSS ``trainer/algs/MEND.py``): the update is subtracted (W − η·Σδ̃x̃ᵀ, a gradient step
at the identity init without normalisation) where the reference adds η·Σδ̃x̃ᵀ and lets the MLP and the
learned η take the sign; the model stays in eval mode while training (no dropout; deterministic);
running statistics are merged per batch (Chan et al.'s parallel update, equal to the reference's
per-token Welford loop up to rounding); the loss at edit time sums per-request means (the reference
pools the tokens of the batch, which shrinks each δ with the batch size). Training-progress logging:
editors have no tracker; the validation curve is the report's ``validation`` ([step, loss] pairs,
step 0 the initial loss, in artifact.json), which the runner logs to the run's tracker
(runner.artifacts.log_artifact_reports).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call
from transformers import PreTrainedTokenizerBase

from editors import checks
from editors.base import Artifact, EditorBase, recipe_json
from editors.core.tokens import answer_ids, model_device
from editors.delta import WeightDelta
from editors.hooks import get_module
from editors.requests import EditRequest
from editors.spec import ModelSpec
from editors.training import (
    SSS_REDUCTIONS,
    AnswerBatch,
    FitReport,
    LoopConfig,
    answer_batch,
    answer_nll,
    fit,
    sss_term,
)

log = logging.getLogger(__name__)

SPEC_MODULES = ("mlp_out",)
INITS = ("id", "xavier")
WEIGHTS = "mend.pt"
CHECKPOINT = "latest.pt"


@dataclass
class MendConfig:
    """MEND's settings (reference names from eric-mitchell/mend config/alg/mend.yaml and
    EditSSS/EasyEdit hparams/TRAINING/MEND/*.yaml in the comments; per model:
    conf/editor_model/mend_<model>.yaml)."""

    _target_: str = "editors.mend.Mend"
    modules: list[str] = field(
        default_factory=lambda: ["mlp_out"]
    )  # inner_params: mlp_out | templates with {}
    layers: list[int] = field(default_factory=lambda: [-3, -2, -1])  # inner_params' layers; < 0: from the end
    # hypernetwork (reference `mend:` block)
    rank: int = 1920  # mend.rank: width of the low-rank layers (capped at the input width)
    n_hidden: int = 1  # mend.n_hidden: hidden layers (n_hidden + 1 low-rank layers)
    init: str = "id"  # mend.init: id (u = 0: identity at the start) | xavier
    norm: bool = True  # mend.norm: normalise x and δ by their running mean and std
    combine: bool = True  # mend.combine: one MLP over [x, δ] (else one for x, one for δ)
    shared: bool = True  # mend.shared: one MLP per weight shape, with per-layer scale/shift
    # outer loop (reference trainer settings)
    edit_lr: float = 1e-4  # edit_lr: initial per-weight edit learning rate η
    lr: float = 1e-6  # lr: Adam learning rate of the MLPs
    lr_lr: float = 1e-4  # lr_lr: Adam learning rate of the edit learning rates
    cedit: float = 0.1  # cedit: weight of the post-edit NLL on the equivalence input
    cloc: float = 1.0  # cloc: weight of KL(pre ‖ post) on the locality input
    batch_size: int = 1  # batch_size: edits per training batch
    accumulate: int = 10  # accumulate_bs: batches per optimiser step
    grad_clip: float = 100.0  # grad_clip: max gradient norm of the outer parameters
    max_iters: int = 100000  # max_iters: training batches at most
    val_every: int = 1000  # val_interval: training batches between validations
    patience: int = 20000  # early_stop_patience: batches without a better validation loss
    val_fraction: float = 0.1  # share of the training cases held out for validation
    val_max: int = 500  # at most this many validation cases (reference val_steps 500)
    train_data: dict[str, Any] = field(
        default_factory=lambda: {"name": "zsre_train", "size": None}
    )  # the dataset config the hypernetwork trains on (runner.datasets.load_from_config)
    seed: int = 42  # seed (reference 42): train/validation split, batch order, v's initialisation
    checkpoint_every: int = 100  # optimiser steps between checkpoints (resume after an interruption)
    edit_batch_size: int = 64  # requests per forward/backward pass at edit time (memory only)
    sss_coefficient: float = 0.0  # C: C·SSS + (1 − C)·(cedit·L_edit + cloc·L_loc) while training (0: off)
    sss_reduction: str = "sum"  # sum (the release) | mean over the loss-bearing positions

    def __post_init__(self) -> None:
        if not self.modules:
            checks.fail("editor.modules", "a non-empty list of mlp_out or templates with {}", self.modules)
        for m in self.modules:
            if m not in SPEC_MODULES and "{}" not in m:
                checks.fail("editor.modules", "mlp_out or module-name templates with {}", list(self.modules))
        if not self.layers or any(isinstance(x, bool) or not isinstance(x, int) for x in self.layers):
            checks.fail("editor.layers", "a non-empty list of layer indices (< 0: from the end)", self.layers)
        checks.at_least_one("editor.rank", self.rank)
        checks.non_negative("editor.n_hidden", self.n_hidden)
        checks.one_of("editor.init", self.init, INITS)
        for key in ("edit_lr", "lr", "lr_lr", "grad_clip"):
            checks.positive(f"editor.{key}", getattr(self, key))
        checks.non_negative("editor.cedit", self.cedit)
        checks.non_negative("editor.cloc", self.cloc)
        for key in ("batch_size", "accumulate", "max_iters", "val_every", "patience", "val_max"):
            checks.at_least_one(f"editor.{key}", getattr(self, key))
        checks.at_least_one("editor.checkpoint_every", self.checkpoint_every)
        checks.at_least_one("editor.edit_batch_size", self.edit_batch_size)
        if not 0 < self.val_fraction < 1:
            checks.fail("editor.val_fraction", "in (0, 1)", self.val_fraction)
        if not isinstance(self.train_data, dict) or not self.train_data.get("name"):
            checks.fail("editor.train_data", "a dataset config with a name", self.train_data)
        checks.fraction("editor.sss_coefficient", self.sss_coefficient, low_open=False)
        checks.one_of("editor.sss_reduction", self.sss_reduction, SSS_REDUCTIONS)


# ---------------------------------------------------------------------------------------------
# The hypernetwork


class LowRankLayer(nn.Module):
    """h + relu(u vᵀ h + b) (``init: id``; ``xavier``: relu(...) alone), with a per-mode scale and
    shift of the pre-activation when ``n_modes`` is set (the reference's LRLinear)."""

    def __init__(self, dim: int, rank: int, init: str, n_modes: int | None) -> None:
        super().__init__()
        mid = min(rank, dim)
        self.init = init
        if init == "id":
            self.u = nn.Parameter(torch.zeros(dim, mid))
            self.v = nn.Parameter(torch.randn(mid, dim))
        else:
            self.u = nn.Parameter(torch.empty(dim, mid))
            self.v = nn.Parameter(torch.empty(mid, dim))
            nn.init.xavier_uniform_(self.u, gain=nn.init.calculate_gain("relu"))
            nn.init.xavier_uniform_(self.v, gain=1.0)
        self.bias = nn.Parameter(torch.zeros(dim))
        self.n_modes = n_modes
        if n_modes is not None:
            self.mode_scale = nn.Parameter(torch.ones(n_modes, dim))
            self.mode_shift = nn.Parameter(torch.zeros(n_modes, dim))

    def forward(self, h: torch.Tensor, mode: int | None = None) -> torch.Tensor:
        pre = (h @ self.v.T) @ self.u.T + self.bias
        if mode is not None:
            pre = pre * self.mode_scale[mode] + self.mode_shift[mode]
        act = pre.clamp(min=0)  # the reference's clamp: its gradient at 0 is not 0
        return act + h if self.init == "id" else act


class LowRankMLP(nn.Module):
    def __init__(self, dim: int, rank: int, n_hidden: int, init: str, n_modes: int | None) -> None:
        super().__init__()
        self.layers = nn.ModuleList(LowRankLayer(dim, rank, init, n_modes) for _ in range(n_hidden + 1))

    def forward(self, h: torch.Tensor, mode: int | None = None) -> torch.Tensor:
        for layer in self.layers:
            h = layer(h, mode)
        return h


class GradientTransform(nn.Module):
    """Normalisation (running statistics, per shape) and the MLP(s) of one weight shape."""

    def __init__(self, x_dim: int, d_dim: int, cfg: MendConfig, n_modes: int | None) -> None:
        super().__init__()
        self.x_dim, self.d_dim, self.norm = x_dim, d_dim, cfg.norm
        for side, dim in (("x", x_dim), ("d", d_dim)):
            self.register_buffer(f"{side}_mean", torch.zeros(dim))
            self.register_buffer(f"{side}_m2", torch.zeros(dim))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.combine = cfg.combine
        args = (cfg.rank, cfg.n_hidden, cfg.init, n_modes)
        if cfg.combine:
            self.mlp = LowRankMLP(x_dim + d_dim, *args)
        else:
            self.mlp_x = LowRankMLP(x_dim, *args)
            self.mlp_d = LowRankMLP(d_dim, *args)

    @torch.no_grad()
    def observe(self, x: torch.Tensor, d: torch.Tensor) -> None:
        """Merge a batch of rows into the running mean and sum of squared deviations."""
        n = x.shape[0]
        if n == 0:
            return
        k = float(self.count)
        total = k + n
        for side, rows in (("x", x), ("d", d)):
            mean, m2 = getattr(self, f"{side}_mean"), getattr(self, f"{side}_m2")
            b_mean = rows.mean(0)
            b_m2 = (rows - b_mean).pow(2).sum(0)
            diff = b_mean - mean
            mean.add_(diff * (n / total))
            m2.add_(b_m2 + diff.pow(2) * (k * n / total))
        self.count.fill_(total)

    def forward(
        self, x: torch.Tensor, d: torch.Tensor, mode: int | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.norm:
            k = float(self.count)
            if k < 2:
                raise RuntimeError(
                    f"MEND normalisation needs ≥ 2 observed tokens, has {k:.0f} (train it first)"
                )
            x = (x - self.x_mean) / ((self.x_m2 / (k - 1)).sqrt() + 1e-7)
            d = (d - self.d_mean) / ((self.d_m2 / (k - 1)).sqrt() + 1e-7)
        if self.combine:
            out = self.mlp(torch.cat([x, d], -1), mode)
            return out[:, : self.x_dim], out[:, self.x_dim :]
        return self.mlp_x(x, mode), self.mlp_d(d, mode)


@dataclass(frozen=True)
class Target:
    """One edited weight: its module, parameter name, layout, and which transform (and mode) maps it."""

    module: str
    param: str
    x_dim: int
    d_dim: int
    out_in: bool  # nn.Linear (weight [out, in]); False: Conv1D (weight [in, out])
    key: str  # the transform's name in MendNet.transforms
    mode: int | None


def layer_dims(module: nn.Module) -> tuple[int, int, bool]:
    """(input width, output width, weight is [out, in]) of ``nn.Linear`` or GPT-2's ``Conv1D``."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, True
    weight, nf = getattr(module, "weight", None), getattr(module, "nf", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2 and nf is not None:
        return int(weight.shape[0]), int(nf), False
    raise TypeError(f"MEND edits linear layers (nn.Linear or Conv1D), got {type(module).__name__}")


class MendNet(nn.Module):
    """The trained artifact: the gradient transforms and the per-weight edit learning rates."""

    def __init__(self, targets: Sequence[Target], cfg: MendConfig) -> None:
        super().__init__()
        self.targets = list(targets)
        groups: dict[str, list[Target]] = {}
        for t in self.targets:
            groups.setdefault(t.key, []).append(t)
        self.transforms = nn.ModuleDict(
            {
                key: GradientTransform(ts[0].x_dim, ts[0].d_dim, cfg, len(ts) if cfg.shared else None)
                for key, ts in groups.items()
            }
        )
        self.edit_lrs = nn.Parameter(torch.full((len(self.targets),), float(cfg.edit_lr)))

    def updates(
        self, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], observe: bool = False
    ) -> dict[str, torch.Tensor]:
        """param name -> −η·Σ δ̃ x̃ᵀ in the parameter's layout (``observe``: update the statistics)."""
        out = {}
        for i, t in enumerate(self.targets):
            x, d = factors[t.param]
            transform = self.transforms[t.key]
            if observe:
                transform.observe(x, d)
            xt, dt = transform(x, d, t.mode)
            grad = dt.T @ xt if t.out_in else xt.T @ dt
            out[t.param] = -self.edit_lrs[i] * grad
        return out


def build_targets(model: nn.Module, spec: ModelSpec, cfg: MendConfig) -> list[Target]:
    n_layers = spec.n_layers
    layers = [layer + n_layers if layer < 0 else layer for layer in cfg.layers]
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad:
        raise ValueError(f"editor.layers {list(cfg.layers)} out of range for a model with {n_layers} layers")
    raw = []
    for template in cfg.modules:
        for layer in layers:
            name = spec.mlp_out_name(layer) if template == "mlp_out" else template.format(layer)
            x_dim, d_dim, out_in = layer_dims(get_module(model, name))
            raw.append((name, x_dim, d_dim, out_in))
    shapes: dict[tuple[int, int], int] = {}
    targets = []
    for name, x_dim, d_dim, out_in in raw:
        if cfg.shared:
            key = f"{x_dim}x{d_dim}"
            mode = shapes.get((x_dim, d_dim), 0)
            shapes[(x_dim, d_dim)] = mode + 1
        else:
            key, mode = name.replace(".", "#"), None
        targets.append(Target(name, name + ".weight", x_dim, d_dim, out_in, key, mode))
    return targets


# ---------------------------------------------------------------------------------------------
# Factors: x and δ of the edited layers


def edit_loss(logits: torch.Tensor, batch: AnswerBatch) -> torch.Tensor:
    """The sum over requests of each one's mean answer NLL (one request's factors do not depend on
    the others in its batch)."""
    return answer_nll(logits, batch).sum()


def read_logits(out: Any, batch: AnswerBatch) -> torch.Tensor:
    """Float logits at the batch's read positions [B, K, V] (reads past a row's answer, masked
    out, are clamped into the sequence)."""
    rows = torch.arange(batch.enc.input_ids.shape[0], device=batch.enc.input_ids.device)
    return out.logits[rows[:, None], batch.positions.clamp(max=out.logits.shape[1] - 1)].float()


def factors(
    model: nn.Module, targets: Sequence[Target], batch: AnswerBatch
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """param name -> (x [N, in], δ [N, out]) in float32, detached, over the tokens where both are
    non-zero, for the edit loss of ``batch`` on the model as it is."""
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}
    handles = []
    params = dict(model.named_parameters())
    flags = {t.param: params[t.param].requires_grad for t in targets}
    try:
        for t in targets:

            def hook(_mod, args, output, _name=t.param):
                inputs[_name] = args[0]
                outputs[_name] = output

            handles.append(get_module(model, t.module).register_forward_hook(hook))
            params[t.param].requires_grad_(True)  # so the layer outputs are in the graph
        with torch.enable_grad():
            out = model(input_ids=batch.enc.input_ids, attention_mask=batch.enc.attention_mask)
            loss = edit_loss(read_logits(out, batch), batch)
            grads = torch.autograd.grad(loss, [outputs[t.param] for t in targets])
    finally:
        for h in handles:
            h.remove()
        for name, flag in flags.items():
            params[name].requires_grad_(flag)
    mask = batch.enc.attention_mask.reshape(-1).bool()
    result = {}
    for t, delta in zip(targets, grads):
        x = inputs[t.param].detach().reshape(-1, t.x_dim).float()
        d = delta.detach().reshape(-1, t.d_dim).float()
        keep = mask & (x != 0).any(-1) & (d != 0).any(-1)
        result[t.param] = (x[keep], d[keep])
    return result


# ---------------------------------------------------------------------------------------------
# The editor


@dataclass
class _Case:
    edit: AnswerBatch
    equiv: AnswerBatch
    loc: AnswerBatch  # the locality text, every token compared (prompt_last positions unused)


class Mend(EditorBase):
    """MEND (see the module docstring)."""

    MEMORY_KNOBS = (("editor.edit_batch_size", "requests per forward/backward pass of a MEND edit"),)

    def __init__(self, config: MendConfig, spec: ModelSpec) -> None:
        super().__init__(config, spec)
        self.net: MendNet | None = None
        self._targets: list[Target] | None = None

    # -- the artifact ---------------------------------------------------------------------------

    def recipe(self) -> dict[str, Any]:
        """Every setting the hypernetwork's weights depend on (besides the model and its data)."""
        cfg = asdict(self.config)
        for key in ("_target_", "train_data", "checkpoint_every", "edit_batch_size"):
            cfg.pop(key)
        n = self.spec.n_layers
        cfg["layers"] = [layer + n if layer < 0 else layer for layer in self.config.layers]
        cfg["modules"] = [
            self.spec.mlp_out if m == "mlp_out" else m for m in self.config.modules
        ]  # the templates, resolved
        return cfg

    def requirements(self) -> list[Artifact]:
        return [Artifact("mend", recipe_json(self.recipe()), recipe_json(self.config.train_data))]

    def targets(self, model: nn.Module) -> list[Target]:
        if self._targets is None:
            self._targets = build_targets(model, self.spec, self.config)
        return self._targets

    def new_net(self, model: nn.Module) -> MendNet:
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(self.config.seed)
        try:
            net = MendNet(self.targets(model), self.config)
        finally:
            torch.random.set_rng_state(gen_state)
        return net.to(model_device(model))

    def prepare(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, resources: Any) -> None:
        super().prepare(model, tokenizer, resources)
        folder = self.artifact("mend")
        net = self.new_net(model)
        state = torch.load(folder / WEIGHTS, map_location=model_device(model), weights_only=True)
        net.load_state_dict(state)
        self.net = net.eval()

    # -- training -------------------------------------------------------------------------------

    def _encode_case(
        self, tokenizer: PreTrainedTokenizerBase, case: Any, device: torch.device
    ) -> _Case | None:
        req = case.request
        para = case.probes.get("paraphrase") or ()
        loc = case.probes.get("neighborhood") or ()
        if not para or not loc:
            return None
        new = answer_ids(tokenizer, " " + req.target_new)
        edit = answer_batch(tokenizer, [(req.prompt, req.subject)], [new], "target_tokens", device)
        equiv = answer_batch(tokenizer, [(para[0].prompt, None)], [new], "target_tokens", device)
        loc_b = answer_batch(
            tokenizer,
            [(loc[0].prompt, None)],
            [answer_ids(tokenizer, " " + loc[0].target)],
            "target_tokens",
            device,
        )
        return _Case(edit, equiv, loc_b)

    @staticmethod
    def _stack(tokenizer: PreTrainedTokenizerBase, cases: Sequence[_Case], part: str) -> AnswerBatch:
        """Concatenate one-row batches (right-padded to one width)."""
        from editors.core.tokens import Encoded, pad_id

        rows = [getattr(c, part) for c in cases]
        if len(rows) == 1:
            return rows[0]
        width = max(r.enc.input_ids.shape[1] for r in rows)
        awidth = max(r.gold.shape[1] for r in rows)

        def pad(t: torch.Tensor, w: int, value: int) -> torch.Tensor:
            return torch.nn.functional.pad(t, (0, w - t.shape[1]), value=value)

        enc = Encoded(
            torch.cat([pad(r.enc.input_ids, width, pad_id(tokenizer)) for r in rows]),
            torch.cat([pad(r.enc.attention_mask, width, 0) for r in rows]),
            torch.cat([r.enc.lengths for r in rows]),
            torch.cat([r.enc.subject_last for r in rows]),
        )
        return AnswerBatch(
            enc,
            torch.cat([pad(r.positions, awidth, 0) for r in rows]),
            torch.cat([pad(r.gold, awidth, 0) for r in rows]),
            torch.cat([pad(r.mask, awidth, 0) for r in rows]),
        )

    def _batch(self, tokenizer: PreTrainedTokenizerBase, cases: Sequence[_Case]) -> dict[str, AnswerBatch]:
        return {part: self._stack(tokenizer, cases, part) for part in ("edit", "equiv", "loc")}

    def _outer_loss(
        self,
        model: nn.Module,
        net: MendNet,
        batch: dict[str, AnswerBatch],
        train: bool,
        observe: bool | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The outer loss of one batch of edits (``train``: with a graph, SSS mixed in; ``observe``
        (default ``train``): the batch's tokens update the statistics)."""
        cfg = self.config
        targets = net.targets
        params = dict(model.named_parameters())
        with torch.no_grad():
            base = model(input_ids=batch["loc"].enc.input_ids, attention_mask=batch["loc"].enc.attention_mask)
            base_logp = torch.log_softmax(base.logits.float(), -1)
        fac = factors(model, targets, batch["edit"])
        with torch.set_grad_enabled(train):
            updates = net.updates(fac, observe=train if observe is None else observe)
            edited = {
                t.param: params[t.param].detach() + updates[t.param].to(params[t.param].dtype)
                for t in targets
            }

            def run(b: AnswerBatch, hidden: bool = False):
                return functional_call(
                    model,
                    edited,
                    args=(),
                    kwargs={
                        "input_ids": b.enc.input_ids,
                        "attention_mask": b.enc.attention_mask,
                        "output_hidden_states": hidden,
                    },
                )

            eq = batch["equiv"]
            l_edit = answer_nll(read_logits(run(eq), eq), eq).mean()
            loc = batch["loc"]
            post_logp = torch.log_softmax(run(loc).logits.float(), -1)
            kl = (base_logp.exp() * (base_logp - post_logp)).sum(-1)
            m = loc.enc.attention_mask.float()
            l_loc = (kl * m).sum() / m.sum()
            total = cfg.cedit * l_edit + cfg.cloc * l_loc
            info = {"edit": float(l_edit.detach()), "loc": float(l_loc.detach())}
            if train and cfg.sss_coefficient > 0:
                ed = batch["edit"]
                out = run(ed, hidden=True)
                inner = answer_nll(read_logits(out, ed), ed).mean()
                reads = int(ed.mask.sum())
                sss = sss_term(inner, out.hidden_states[-1], cfg.sss_reduction, positions=reads)
                total = cfg.sss_coefficient * sss + (1 - cfg.sss_coefficient) * total
                info["sss"] = float(sss.detach())
        return total, info

    def train_artifact(
        self,
        artifact: Artifact,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        cases: Sequence[Any],
        folder: Path,
        checkpoints: Path,
    ) -> dict[str, Any]:
        cfg = self.config
        start_time = time.perf_counter()
        device = model_device(model)
        encoded = [self._encode_case(tokenizer, c, device) for c in cases]
        usable = [e for e in encoded if e is not None]
        skipped = len(encoded) - len(usable)
        if len(usable) < 4:
            raise ValueError(
                f"MEND needs ≥ 4 training cases with a paraphrase and a neighbourhood prompt, got {len(usable)}"
            )
        rng = np.random.default_rng(cfg.seed)
        order = rng.permutation(len(usable))
        n_val = max(1, min(cfg.val_max, int(round(cfg.val_fraction * len(usable)))))
        val = [usable[i] for i in order[:n_val]]
        train = [usable[i] for i in order[n_val:]]

        val_batches = [
            self._batch(tokenizer, val[i : i + cfg.batch_size]) for i in range(0, len(val), cfg.batch_size)
        ]
        n_batches = cfg.max_iters
        index: list[int] = []
        while len(index) < n_batches * cfg.batch_size:  # the training cases reshuffled every pass
            index.extend(rng.permutation(len(train)).tolist())
        plan = [index[i * cfg.batch_size : (i + 1) * cfg.batch_size] for i in range(n_batches)]

        net = self.new_net(model)
        opt = torch.optim.Adam(
            [
                {"params": [p for n, p in net.named_parameters() if n != "edit_lrs"], "lr": cfg.lr},
                {"params": [net.edit_lrs], "lr": cfg.lr_lr},
            ]
        )
        outer = {n: p for n, p in net.named_parameters()}
        steps = lambda iters: max(1, math.ceil(iters / cfg.accumulate))  # noqa: E731
        loop = LoopConfig(
            epochs=1,
            accumulate=cfg.accumulate,
            grad_clip=cfg.grad_clip,
            max_steps=self.train_steps(steps(cfg.max_iters)),  # capped by artifact_max_steps
            eval_every=steps(cfg.val_every),
            patience=steps(cfg.patience),
            keep_best=False,  # kept here instead, so that a resumed run keeps its best too
        )

        def validate() -> float:
            net.eval()
            try:
                losses = [self._outer_loss(model, net, b, train=False)[0] for b in val_batches]
                return float(torch.stack(losses).mean())
            finally:
                net.train()

        warm = min(cfg.accumulate, len(plan))  # batches whose tokens seed the statistics
        start = None
        best: dict[str, torch.Tensor] | None = None
        best_val, best_at, initial, resumed_from = math.inf, 0, None, None
        ckpt = checkpoints / CHECKPOINT
        if ckpt.exists():
            saved = torch.load(ckpt, map_location=device, weights_only=False)
            net.load_state_dict(saved["net"])
            opt.load_state_dict(saved["opt"])
            start = FitReport(**saved["report"])
            best, best_val, best_at, initial = (
                saved["best"],
                saved["best_val"],
                saved["best_at"],
                saved["initial"],
            )
            resumed_from = start.steps
            log.info("MEND: resuming from step %d (%s)", start.steps, ckpt)
        else:
            # The statistics need tokens before the first (initial) validation: the first step's
            # batches are observed now (and not again while training on them).
            for i in range(warm):
                batch = self._batch(tokenizer, [train[j] for j in plan[i]])
                fac = factors(model, net.targets, batch["edit"])
                for t in net.targets:
                    net.transforms[t.key].observe(*fac[t.param])
            initial = best_val = validate()
            best = {n: t.detach().clone() for n, t in net.state_dict().items()}

        def on_step(report: FitReport) -> None:
            nonlocal best, best_val, best_at
            if (
                report.validation
                and report.validation[-1][0] == report.steps
                and report.validation[-1][1] < best_val
            ):
                best_val, best_at = report.validation[-1][1], report.steps
                best = {n: t.detach().clone() for n, t in net.state_dict().items()}
            if report.validation and report.validation[-1][0] == report.steps:
                log.info(
                    "MEND step %d: validation loss %.4f (best %.4f at step %d)",
                    report.steps,
                    report.validation[-1][1],
                    best_val,
                    best_at,
                )
            if report.steps % cfg.checkpoint_every == 0 or report.stopped != "epochs":
                state = {
                    "net": net.state_dict(),
                    "opt": opt.state_dict(),
                    "report": asdict(report),
                    "best": best,
                    "best_val": best_val,
                    "best_at": best_at,
                    "initial": initial,
                }
                tmp = ckpt.with_suffix(".tmp")
                torch.save(state, tmp)
                tmp.replace(ckpt)

        def loss_fn(item: tuple[int, list[int]]) -> torch.Tensor:
            position, cases_at = item
            batch = self._batch(tokenizer, [train[i] for i in cases_at])
            return self._outer_loss(model, net, batch, train=True, observe=position >= warm)[0]

        done = start.batches if start is not None else 0
        report = start or FitReport()
        net.train()
        if done < len(plan) and report.stopped == "epochs":
            report = fit(
                outer,
                loss_fn,
                list(enumerate(plan))[done:],
                loop,
                model=model,
                optimizer=opt,
                validate=validate,
                progress=self.progress,
                desc="MEND",
                start=start,
                on_step=on_step,
            )
        if best is not None:
            net.load_state_dict(best)
        net.eval()
        torch.save(net.state_dict(), folder / WEIGHTS)
        self.net = net
        return {
            "steps": report.steps,
            "batches": report.batches,
            "seconds": round(time.perf_counter() - start_time, 1),
            "validation": [[0, initial]] + [[s, v] for s, v in report.validation],
            "best_step": best_at,
            "best_val_loss": best_val,
            "stopped": report.stopped,
            "resumed_from_step": resumed_from,
            "train_cases": len(train),
            "val_cases": len(val),
            "skipped_cases": skipped,
            "edit_lrs": [float(x) for x in net.edit_lrs.detach()],
            "logging": "validation: [step, loss]; the runner logs it to the run's tracker",
        }

    # -- editing --------------------------------------------------------------------------------

    def apply(
        self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, requests: Sequence[EditRequest]
    ) -> WeightDelta:
        if self.net is None:
            raise RuntimeError("MEND's hypernetwork is not loaded (prepare has not run)")
        net = self.net.eval()
        device = model_device(model)
        result = WeightDelta()
        size = self.config.edit_batch_size
        for lo in range(0, len(requests), size):
            chunk = requests[lo : lo + size]
            batch = answer_batch(
                tokenizer,
                [(r.prompt, r.subject) for r in chunk],
                [answer_ids(tokenizer, " " + r.target_new) for r in chunk],
                "target_tokens",
                device,
            )
            fac = factors(model, net.targets, batch)
            with torch.no_grad():
                for name, update in net.updates(fac).items():
                    result.add(name, update.float())
        result.diagnostics = {
            f"mend_norm_{i}": float(result.deltas[t.param].norm()) for i, t in enumerate(net.targets)
        }
        self.record(requests)
        return result
