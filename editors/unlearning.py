"""Gradient-based unlearning baselines of open-unlearning (github locuslab/open-unlearning): GA,
GradDiff and NPO, on the shared training loop, as one editor returning a :class:`WeightDelta`.

In ``task=unlearn`` each forget item arrives as an :class:`EditRequest`: ``text`` is the formatted
question and ``target_true`` the gold answer to forget; the retain split's (prompt, answer) pairs
come in ``Resources.retain``. Every loss reads the teacher-forced NLL of the answer tokens
(" " + answer, with EOS appended as open-unlearning's ``preprocess_chat_instance`` does).

- ``ga`` (``src/trainer/unlearn/grad_ascent.py``): loss = γ·(−mean NLL of the forget answers).
- ``grad_diff`` (``grad_diff.py``): γ·(−forget NLL) + α·retain loss.
- ``npo`` (``npo.py``, ``utils.py`` ``compute_dpo_loss``): γ·NPO(forget) + α·retain loss, with
  NPO = −(2/β)·mean log σ(β·(nll − nll_ref)) and nll each answer's SUM of token NLLs (the release's
  ``compute_batch_nll``; ``npo_nll: mean`` for the per-token mean). The reference model is the
  unedited one and frozen, so each forget item's reference NLL is a constant: it is computed once
  before training, and no second copy of the model is kept.
- ``npo_kl_nll`` (ZJUKLAB at SemEval-2025 Task 4, zjunlp/unlearn ``semeval25/unlearn-merging.py``):
  ``ga_ratio``·NPO + ``gd_ratio``·KL + ``gk_ratio``·NLL, with NPO on ONE scalar per forget batch,
  the mean token NLL over the whole batch (:func:`~editors.training.losses.batch_nll`), against the
  same under the reference; KL(reference ‖ current) on the retain batch over EVERY position, prompt
  and padding included, divided by B·T (``kl_divergence(..., mask=None)``); NLL the retain batch's
  mean token NLL. Naming trap kept from the release: ``gd_ratio`` weights the KL, ``gk_ratio`` the
  NLL. The reference is the model with the LoRA adapter disabled (KL), and its forget NLL per batch
  is computed once before training (the batches are fixed and the reference frozen: the same
  constants the release recomputes each step). Differences: the release left-pads every sequence
  to max_length 256, so its B·T counts padding up to 256; here T is the batch's widest row, so the
  KL is the same per-position KL averaged over fewer padding positions; the release's base weights
  are fp16 with gradient checkpointing, here the model trains in its own dtype; its retain item
  ``i mod |retain|`` per forget item is the cycled retain batch here.
- retain loss ``nll`` (the release's ``NLL``): mean answer NLL of the retain batch; ``kl``
  (``KL``): KL(reference ‖ current) over the retain sequence's tokens (``compute_kl_divergence``).
  The reference logits come from the same model with the LoRA adapter disabled, so ``kl`` needs
  ``lora.enabled``; without LoRA they would have to be precomputed for every retain item
  (items × tokens × vocabulary floats: ~180 GB for TOFU's retain90 on LLaMA-3), which we refuse.

Batches (``ForgetRetainDataset``, anchor ``forget``): each forget batch is paired with a retain
batch of the same size. The release draws a random retain item per forget item; here the retain
pairs are cycled in order, one retain batch per forget batch, across epochs. Forget batches keep the
request order (the release's sampler shuffles). The model is trained in the mode it is in (eval:
no dropout; LoRA's dropout is switched on alone), in its own dtype (the release trains in bf16).

Schedule: AdamW (the release's ``paged_adamw_32bit``), HF's linear schedule with
``warmup`` epochs of linear warm-up (``warmup_epochs``, ``src/trainer/__init__.py``) and gradient
clipping at 1.0 (HF ``TrainingArguments.max_grad_norm``). As in HF the first step of a warm-up runs at
lr 0; unlike HF, ``fit`` carries a partial accumulation over an epoch's end into the next epoch.

Parameters: all of the model's (``layers: null``, the release's full fine-tuning), or the blocks at
``layers``; or, with ``lora.enabled``, a peft LoRA adapter on ``lora.target_modules`` (null: peft's
default for the architecture) within those blocks, whose merged ΔW = scale·B·A per base weight is
returned; the adapter is unloaded and the model's module tree, weights and ``requires_grad`` flags
are as before ``apply``. ``lora.target_modules: [all-linear]``: every ``nn.Linear`` (and
transformers' ``Conv1D``) but the model's ``lm_head`` (ZJUKLAB's targets). Without LoRA the trained
parameters' originals are cloned (one copy of them) to restore the model bit-exactly.

**LoRA adapters as artifacts** (:class:`LoraAdapter`): the trained factors per adapted module
(A [r, in], B [out, r], scaling α/r), ΔW = scaling·B·A per base weight. With
``Resources.adapter_cache`` (task=unlearn: a folder per model id and revision, or the toy's content
key) the adapter is stored there as ``lora-<key>.pt``, the key a hash of the editor class, its whole
config (``seed`` included) and the forget requests' (prompt, answer) and retain pairs in order; a
second run with the same key loads it instead of training (``unlearn_adapter_cached`` = 1). Only
a seeded adapter is cached: ``seed`` (npo_lora: the release's 42) seeds LoRA's initialisation and
dropout in a forked generator; null leaves them to the global generator as the run left it, which
no key names. The device is not in the key (a GPU-trained adapter loaded on CPU is the GPU's).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from editors import checks
from editors.base import EditorBase, recipe_json
from editors.core.tokens import answer_ids, model_device
from editors.delta import WeightDelta, WeightHandle
from editors.requests import EditRequest
from editors.spec import ModelSpec
from editors.training import (
    AnswerBatch,
    LoopConfig,
    answer_batch,
    answer_logits,
    answer_nll,
    batch_nll,
    fit,
    ga_loss,
    kl_divergence,
    npo_loss,
    read_answer_logits,
)
from editors.training.loop import OPTIMIZERS, make_optimizer

METHODS = ("ga", "grad_diff", "npo", "npo_kl_nll")
RETAIN_LOSSES = ("nll", "kl")
NPO_NLL = ("sum", "mean")
SCHEDULES = ("linear", "constant")
NEEDS_RETAIN = ("grad_diff", "npo", "npo_kl_nll")
ALL_LINEAR = "all-linear"  # lora.target_modules: [all-linear]: every linear layer but the lm_head


@dataclass
class LoraSettings:
    """A peft LoRA adapter (open-unlearning ships no LoRA config: peft ``LoraConfig``'s defaults)."""

    enabled: bool = False
    r: int = 8  # rank (peft default)
    alpha: float = 8.0  # lora_alpha: ΔW = (alpha / r)·B·A (peft default)
    dropout: float = 0.0  # lora_dropout (peft default)
    target_modules: list[str] | None = None  # module names (last part); [all-linear]; null: peft's default


@dataclass
class GradientUnlearningConfig:
    """GA / GradDiff / NPO settings; defaults are open-unlearning's (conf/editor/{ga,grad_diff,npo}.yaml
    name the file of each)."""

    _target_: str = "editors.unlearning.GradientUnlearning"
    method: str = "ga"  # ga | grad_diff | npo | npo_kl_nll
    epochs: int = 10  # passes over the forget set
    lr: float = 1e-5  # peak learning rate
    batch_size: int = 8  # forget items per batch (and as many retain items)
    accumulate: int = 4  # batches per optimiser step (effective batch: batch_size × accumulate)
    weight_decay: float = 0.01
    warmup: float = 1.0  # epochs of linear warm-up (0: none)
    schedule: str = "linear"  # linear (decay to 0 after warm-up) | constant (after warm-up)
    optimizer: str = "adamw"  # adam | adamw | sgd
    grad_clip: float | None = 1.0  # max gradient norm (null: none)
    beta: float = 0.1  # NPO's β
    npo_nll: str = "sum"  # NPO's per-item NLL: sum over answer tokens (the release) | mean
    forget_weight: float = 1.0  # γ: weight of the forget loss (ga, grad_diff, npo)
    retain_weight: float = 1.0  # α: weight of the retain loss (grad_diff, npo)
    retain_loss: str = "nll"  # nll | kl (kl needs lora.enabled)
    ga_ratio: float = 0.4  # npo_kl_nll: weight of NPO (ZJUKLAB's model1)
    gd_ratio: float = 0.4  # npo_kl_nll: weight of the KL (the release's name)
    gk_ratio: float = 0.2  # npo_kl_nll: weight of the retain NLL (the release's name)
    seed: int | None = None  # seeds LoRA's init and dropout (null: the global generator)
    eos: bool = True  # append the tokenizer's EOS to every answer
    layers: list[int] | None = None  # null: every parameter; else the blocks at these indices
    lora: LoraSettings = field(default_factory=LoraSettings)

    def __post_init__(self) -> None:
        checks.one_of("editor.method", self.method, METHODS)
        checks.training_loop("editor", self)
        checks.one_of("editor.schedule", self.schedule, SCHEDULES)
        checks.one_of("editor.optimizer", self.optimizer, OPTIMIZERS)
        checks.positive("editor.grad_clip", self.grad_clip, optional=True)
        checks.positive("editor.beta", self.beta)
        checks.one_of("editor.npo_nll", self.npo_nll, NPO_NLL)
        checks.non_negative("editor.forget_weight", self.forget_weight)
        checks.non_negative("editor.retain_weight", self.retain_weight)
        checks.one_of("editor.retain_loss", self.retain_loss, RETAIN_LOSSES)
        for key in ("ga_ratio", "gd_ratio", "gk_ratio"):
            checks.non_negative(f"editor.{key}", getattr(self, key))
        if self.layers is not None:
            checks.layer_list("editor.layers", self.layers)
        checks.at_least_one("editor.lora.r", self.lora.r)
        checks.positive("editor.lora.alpha", self.lora.alpha)
        checks.fraction("editor.lora.dropout", self.lora.dropout, low_open=False)
        if self.retain_loss == "kl" and not self.lora.enabled:
            checks.fail(
                "editor.retain_loss",
                "nll without LoRA (kl reads reference logits with the adapter disabled: set "
                "editor.lora.enabled=true)",
                self.retain_loss,
            )
        if self.method == "npo_kl_nll" and self.gd_ratio > 0 and not self.lora.enabled:
            checks.fail(
                "editor.lora.enabled",
                "true for npo_kl_nll with gd_ratio > 0 (its KL's reference is the model with the "
                "adapter disabled)",
                self.lora.enabled,
            )
        targets = self.lora.target_modules
        if targets is not None and ALL_LINEAR in targets and len(targets) > 1:
            checks.fail("editor.lora.target_modules", f"[{ALL_LINEAR}] alone or module names", targets)


@dataclass
class _Batch:
    """A forget batch, with its items' reference NLLs (NPO) once computed."""

    forget: AnswerBatch
    ref: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return self.forget.size


LoraFactors = tuple[torch.Tensor, torch.Tensor, float]  # (A [r, in], B [out, r], scaling α/r)


@dataclass
class LoraAdapter:
    """A trained LoRA adapter: ``factors`` per adapted module name (as in the unwrapped model, so
    ``name + ".weight"`` is its base weight), and the modules whose weight is stored [in, out]
    (``fan_in_fan_out``: GPT-2's Conv1D)."""

    factors: dict[str, LoraFactors]
    fan_in_fan_out: frozenset[str] = frozenset()

    def weight_deltas(self, module_deltas: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """ΔW [out, in] per module (B·A orientation, e.g. a merge's) -> float32 deltas per base
        weight name, in the weight's own layout."""
        return {
            f"{name}.weight": (delta.T if name in self.fan_in_fan_out else delta).float()
            for name, delta in module_deltas.items()
        }

    def delta(self) -> dict[str, torch.Tensor]:
        """ΔW = scaling·B·A per base weight name (peft ``get_delta_weight``'s product, in float32)."""
        return self.weight_deltas({n: (b.float() @ a.float()) * s for n, (a, b, s) in self.factors.items()})

    def save(self, path: Path, extra: Mapping[str, object]) -> None:
        """Write the factors (and JSON-able ``extra``) to ``path`` atomically."""
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "factors": {
                n: {"A": a.cpu(), "B": b.cpu(), "scaling": float(sc)}
                for n, (a, b, sc) in self.factors.items()
            },
            "fan_in_fan_out": sorted(self.fan_in_fan_out),
            "extra": json.dumps(extra, sort_keys=True, default=str),
        }
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        torch.save(payload, tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path, device: torch.device | None = None) -> tuple[LoraAdapter, dict]:
        """The adapter at ``path`` (factors on ``device``) and its ``extra``."""
        payload = torch.load(path, map_location=device or "cpu", weights_only=True)
        factors = {n: (f["A"], f["B"], float(f["scaling"])) for n, f in payload["factors"].items()}
        return cls(factors, frozenset(payload["fan_in_fan_out"])), json.loads(payload["extra"])


def _token_nll(logits: torch.Tensor, batch: AnswerBatch, reduction: str) -> torch.Tensor:
    """[B]: each item's NLL over its answer tokens, the per-token mean or the sum."""
    nll = answer_nll(logits, batch)
    return nll * batch.mask.sum(1) if reduction == "sum" else nll


class GradientUnlearning(EditorBase):
    """GA / GradDiff / NPO (see the module docstring)."""

    config: GradientUnlearningConfig
    APPLY_ONCE = True  # trains on the whole forget set: task=unlearn passes every request at once
    MEMORY_KNOBS = (
        ("editor.batch_size", "forget (and retain) items per batch of an unlearning baseline"),
        ("editor.lora.enabled", "train a LoRA adapter instead of every parameter"),
        ("editor.layers", "train only these blocks"),
    )

    def __init__(self, config: GradientUnlearningConfig, spec: ModelSpec) -> None:
        super().__init__(config, spec)

    # --- which parameters ------------------------------------------------------------------------

    def _prefixes(self) -> tuple[str, ...] | None:
        if self.config.layers is None:
            return None
        return tuple(self.spec.layer_name(layer) + "." for layer in self.config.layers)

    def parameters(self, model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        """The trained parameters (full fine-tuning), by name."""
        prefixes = self._prefixes()
        params = {n: p for n, p in model.named_parameters() if prefixes is None or n.startswith(prefixes)}
        if not params:
            raise ValueError(f"no parameters under {prefixes} (check model.layer)")
        return params

    def lora_targets(self, model: torch.nn.Module) -> list[str]:
        """Full names of the modules the LoRA adapter wraps."""
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

        wanted = self.config.lora.target_modules
        prefixes = self._prefixes()
        if wanted is not None and ALL_LINEAR in wanted:  # every linear layer but the LM head (ZJUKLAB)
            from transformers.pytorch_utils import Conv1D

            names = [
                name
                for name, module in model.named_modules()
                if isinstance(module, (torch.nn.Linear, Conv1D))
                and name != self.spec.lm_head
                and (prefixes is None or name.startswith(prefixes))
            ]
            if not names:
                raise ValueError(
                    f"editor.lora.target_modules [{ALL_LINEAR}]: no linear layer under {prefixes}"
                )
            return names
        if wanted is None:
            kind = getattr(getattr(model, "config", None), "model_type", None)
            if kind not in DEFAULTS:
                raise ValueError(f"editor.lora.target_modules: peft has no default for model type {kind!r}")
            wanted = list(DEFAULTS[kind])
        names = [
            name
            for name, module in model.named_modules()
            if name.split(".")[-1] in wanted
            and (prefixes is None or name.startswith(prefixes))
            and isinstance(getattr(module, "weight", None), torch.Tensor)
        ]
        if not names:
            raise ValueError(f"editor.lora.target_modules {wanted} match no module under {prefixes}")
        return names

    # --- apply -----------------------------------------------------------------------------------

    def apply(
        self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, requests: Sequence[EditRequest]
    ) -> WeightDelta:
        if self.config.lora.enabled:
            adapter, diagnostics, per_case = self.adapter(model, tokenizer, requests)
            deltas = adapter.delta()
        else:
            deltas, diagnostics, per_case = self._unlearn(model, tokenizer, requests)
        self.record(requests)
        return WeightDelta(deltas=deltas, diagnostics=diagnostics, case_diagnostics=per_case)

    # --- LoRA adapters as artifacts --------------------------------------------------------------

    def adapter_key(self, requests: Sequence[EditRequest]) -> str:
        """What the adapter depends on besides the model (whose folder ``adapter_cache`` is)."""
        payload = {
            "editor": f"{type(self).__module__}.{type(self).__qualname__}",
            "config": json.loads(recipe_json(self.config)),
            "forget": [[r.text, r.target_true] for r in requests],
            "retain": [list(pair) for pair in self.resources.retain],
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def adapter_path(self, requests: Sequence[EditRequest]) -> Path | None:
        """Where the adapter is cached; None without a cache folder or a ``seed`` (unseeded, the
        adapter depends on the global generator's state, which no key names)."""
        folder = self.resources.adapter_cache
        if folder is None or self.config.seed is None:
            return None
        return Path(folder) / f"lora-{self.adapter_key(requests)}.pt"

    def adapter(
        self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, requests: Sequence[EditRequest]
    ) -> tuple[LoraAdapter, dict[str, float], dict[str, list[float]]]:
        """The trained LoRA adapter with its diagnostics: loaded from ``Resources.adapter_cache``
        when there, else trained (and stored there). ``model`` is left as it was found."""
        if not self.config.lora.enabled:
            raise ValueError("editor.lora.enabled must be true for a LoRA adapter, got false")
        path = self.adapter_path(requests)
        if path is not None and path.exists():
            adapter, extra = LoraAdapter.load(path, model_device(model))
            return adapter, extra["diagnostics"] | {"unlearn_adapter_cached": 1.0}, extra["case_diagnostics"]
        adapter, diagnostics, per_case = self._unlearn(model, tokenizer, requests)
        if path is not None:
            adapter.save(path, {"diagnostics": diagnostics, "case_diagnostics": per_case})
        return adapter, diagnostics | {"unlearn_adapter_cached": 0.0}, per_case

    @contextlib.contextmanager
    def _seeded(self, device: torch.device) -> Iterator[None]:
        """A forked generator seeded with ``seed`` (CPU and ``device``); nothing when null."""
        if self.config.seed is None:
            yield
            return
        with torch.random.fork_rng(devices=[device] if device.type != "cpu" else [], device_type=device.type):
            torch.manual_seed(self.config.seed)
            yield

    def _unlearn(self, model, tokenizer, requests):
        """Train; (the deltas, or with LoRA the adapter), diagnostics, per-case diagnostics."""
        with self._seeded(model_device(model)):
            return self._train(model, tokenizer, requests)

    def _train(self, model, tokenizer, requests):
        cfg = self.config
        retain = list(self.resources.retain)
        if cfg.method in NEEDS_RETAIN and not retain:
            raise ValueError(f"editor.method={cfg.method} needs retain pairs (Resources.retain is empty)")
        missing = [r.case_id for r in requests if not r.target_true]
        if missing:
            raise ValueError(f"unlearning needs each request's target_true (the answer to forget): {missing}")
        start = time.perf_counter()
        device = model_device(model)
        forget = self._batches(tokenizer, [(r.text, r.target_true) for r in requests], device)
        retain_batches = self._batches(tokenizer, retain, device) if retain else []  # GA: diagnostics only
        steps: list[_Batch] = [_Batch(b) for b in forget]
        # what the diagnostics read: every forget item, and as many retain batches as forget batches
        probe = (
            [retain_batches[i % len(retain_batches)] for i in range(len(forget))] if retain_batches else []
        )
        with torch.no_grad():
            before = [answer_nll(answer_logits(model, b)[0], b) for b in forget]
            if cfg.method == "npo":  # the frozen reference: the unedited model's NLL, a constant per item
                for step in steps:
                    step.ref = _token_nll(answer_logits(model, step.forget)[0], step.forget, cfg.npo_nll)
            elif cfg.method == "npo_kl_nll":  # ZJUKLAB: one batch-mean NLL per forget batch
                for step in steps:
                    step.ref = batch_nll(answer_logits(model, step.forget)[0], step.forget)
            retain_before = self._mean_nll(model, probe)
        if cfg.lora.enabled:
            result, report, after, retain_after = self._train_lora(
                model, steps, retain_batches, forget, probe
            )
        else:
            result, report, after, retain_after = self._train_full(
                model, steps, retain_batches, forget, probe
            )
        per_case = torch.cat(after).tolist()
        diagnostics = {
            "unlearn_steps": float(report.steps),
            "unlearn_final_loss": report.final_loss,
            "unlearn_forget_nll_before": float(torch.cat(before).mean()),
            "unlearn_forget_nll": float(sum(per_case) / len(per_case)),
            "unlearn_seconds": time.perf_counter() - start,
        }
        if probe:  # the retain items paired with the forget batches (GA trains on none of them)
            diagnostics |= {"unlearn_retain_nll_before": retain_before, "unlearn_retain_nll": retain_after}
        return result, diagnostics, {"forget_nll": per_case}

    def _batches(
        self, tokenizer: PreTrainedTokenizerBase, pairs: Sequence[tuple[str, str]], device: torch.device
    ) -> list[AnswerBatch]:
        """Teacher-forced batches of (prompt, answer) pairs, tokenised once."""
        eos = [tokenizer.eos_token_id] if self.config.eos and tokenizer.eos_token_id is not None else []
        targets = [answer_ids(tokenizer, " " + answer) + eos for _, answer in pairs]
        prompts = [(prompt, None) for prompt, _ in pairs]
        size = self.config.batch_size
        return [
            answer_batch(tokenizer, prompts[lo : lo + size], targets[lo : lo + size], "target_tokens", device)
            for lo in range(0, len(pairs), size)
        ]

    @staticmethod
    def _mean_nll(model: torch.nn.Module, batches: Sequence[AnswerBatch]) -> float:
        """The mean per-token answer NLL over the items of ``batches`` (nan when there are none)."""
        if not batches:
            return float("nan")
        with torch.no_grad():
            values = torch.cat([answer_nll(answer_logits(model, b)[0], b) for b in batches])
        return float(values.mean())

    def _loss_fn(
        self,
        model: torch.nn.Module,
        retain_batches: Sequence[AnswerBatch],
        reference: Callable[[], object] | None,
    ) -> Callable[[_Batch], torch.Tensor]:
        """γ·forget loss (+ α·retain loss on the next retain batch, cycled)."""
        cfg = self.config
        cycle: Iterator[AnswerBatch] | None = itertools.cycle(retain_batches) if retain_batches else None

        def loss(step: _Batch) -> torch.Tensor:
            logits, _ = answer_logits(model, step.forget)
            if cfg.method == "npo_kl_nll":
                assert step.ref is not None and cycle is not None
                return self._npo_kl_nll(model, logits, step, next(cycle), reference)
            if cfg.method == "npo":
                assert step.ref is not None
                nll = _token_nll(logits, step.forget, cfg.npo_nll)
                total = cfg.forget_weight * npo_loss(nll, step.ref, cfg.beta)
            else:
                total = cfg.forget_weight * ga_loss(answer_nll(logits, step.forget))
            if cfg.method == "ga" or cycle is None:
                return total
            kept = next(cycle)
            if cfg.retain_loss == "nll":
                retain_loss = answer_nll(answer_logits(model, kept)[0], kept).mean()
            else:  # KL over every real token of the retain sequence, reference = adapter disabled
                inputs = {"input_ids": kept.enc.input_ids, "attention_mask": kept.enc.attention_mask}
                assert reference is not None
                with torch.no_grad(), reference():
                    ref_logits = model(**inputs).logits
                retain_loss = kl_divergence(model(**inputs).logits, ref_logits, kept.enc.attention_mask)
            return total + cfg.retain_weight * retain_loss

        return loss

    def _npo_kl_nll(
        self,
        model: torch.nn.Module,
        logits: torch.Tensor,
        step: _Batch,
        kept: AnswerBatch,
        reference: Callable[[], object] | None,
    ) -> torch.Tensor:
        """ZJUKLAB's total: ga_ratio·NPO(batch NLL) + gd_ratio·KL(every position) + gk_ratio·NLL."""
        cfg = self.config
        assert step.ref is not None
        total = cfg.ga_ratio * npo_loss(batch_nll(logits, step.forget), step.ref, cfg.beta)
        inputs = {"input_ids": kept.enc.input_ids, "attention_mask": kept.enc.attention_mask}
        retain_logits = model(**inputs).logits  # one pass: the KL's every position and the NLL's reads
        if cfg.gd_ratio > 0:
            assert reference is not None
            with torch.no_grad(), reference():
                ref_logits = model(**inputs).logits
            total = total + cfg.gd_ratio * kl_divergence(retain_logits, ref_logits, None)
        return total + cfg.gk_ratio * batch_nll(read_answer_logits(retain_logits, kept), kept)

    def _loop(self, n_batches: int, n_items: int) -> tuple[LoopConfig, int, int]:
        """The loop settings, with the warm-up and total optimiser steps of the schedule."""
        cfg = self.config
        loop = LoopConfig(
            epochs=cfg.epochs,
            lr=cfg.lr,
            optimizer=cfg.optimizer,
            weight_decay=cfg.weight_decay,
            accumulate=cfg.accumulate,
            grad_clip=cfg.grad_clip,
        )
        total = max(1, (cfg.epochs * n_batches) // cfg.accumulate)
        # open-unlearning src/trainer/__init__.py: warmup_steps = int(warmup_epochs · N // effective batch)
        warmup = int((cfg.warmup * n_items) // (cfg.batch_size * cfg.accumulate))
        return loop, warmup, total

    def _run(
        self,
        model: torch.nn.Module,
        params: dict[str, torch.nn.Parameter],
        steps: list[_Batch],
        retain_batches: Sequence[AnswerBatch],
        reference: Callable[[], object] | None,
    ):
        """``fit`` with AdamW and HF's linear warm-up/decay schedule (set after every step)."""
        cfg = self.config
        loop, warmup, total = self._loop(len(steps), sum(s.size for s in steps))

        def factor(step: int) -> float:  # transformers' get_linear_schedule_with_warmup / constant
            if step < warmup:
                return step / max(1, warmup)
            if cfg.schedule == "constant":
                return 1.0
            return max(0.0, (total - step) / max(1, total - warmup))

        opt = make_optimizer(list(params.values()), loop)
        taken = 0

        def set_lr() -> None:
            for group in opt.param_groups:
                group["lr"] = cfg.lr * factor(taken)

        def after_step() -> None:
            nonlocal taken
            taken += 1
            set_lr()

        set_lr()
        return fit(
            params,
            self._loss_fn(model, retain_batches, reference),
            steps,
            loop,
            model=model,
            after_step=after_step,
            optimizer=opt,
            progress=self.progress,
            desc=f"unlearn ({cfg.method})",
        )

    def _train_full(self, model, steps, retain_batches, forget, probe):
        params = self.parameters(model)
        originals = {n: p.detach().clone() for n, p in params.items()}
        try:
            report = self._run(model, params, steps, retain_batches, None)
            with torch.no_grad():
                after = [answer_nll(answer_logits(model, b)[0], b) for b in forget]
            retain_after = self._mean_nll(model, probe)
            deltas = {n: (p.detach() - originals[n]).float() for n, p in params.items()}
        finally:
            WeightHandle(model, originals).restore()
        return deltas, report, after, retain_after

    def _train_lora(self, model, steps, retain_batches, forget, probe):
        """Train a peft LoRA adapter; return it (:class:`LoraAdapter`) and unload it."""
        from peft import LoraConfig, get_peft_model
        from transformers.pytorch_utils import Conv1D

        cfg = self.config.lora
        targets = self.lora_targets(model)
        conv1d = isinstance(model.get_submodule(targets[0]), Conv1D)  # GPT-2: weights stored [in, out]
        flags = {n: p.requires_grad for n, p in model.named_parameters()}
        modes = {n: m.training for n, m in model.named_modules()}
        attributes = set(vars(model))
        peft_model = get_peft_model(
            model,
            LoraConfig(
                r=cfg.r,
                lora_alpha=cfg.alpha,
                lora_dropout=cfg.dropout,
                target_modules=targets,
                fan_in_fan_out=conv1d,
                bias="none",
            ),
        )
        try:
            for name, module in model.named_modules():
                if "lora_dropout" in name:
                    module.train()  # the adapter's dropout acts; the base model stays in its mode
            params = {n: p for n, p in model.named_parameters() if "lora_" in n}
            report = self._run(model, params, steps, retain_batches, peft_model.disable_adapter)
            for name, module in model.named_modules():
                if "lora_dropout" in name:
                    module.eval()  # the diagnostics read the adapter without dropout
            with torch.no_grad():
                after = [answer_nll(answer_logits(model, b)[0], b) for b in forget]
                retain_after = self._mean_nll(model, probe)
                layers = {name: model.get_submodule(name) for name in targets}
                adapter = LoraAdapter(
                    {
                        name: (
                            layer.lora_A["default"].weight.detach().clone(),
                            layer.lora_B["default"].weight.detach().clone(),
                            float(layer.scaling["default"]),
                        )
                        for name, layer in layers.items()
                    },
                    frozenset(name for name, layer in layers.items() if layer.fan_in_fan_out),
                )
        finally:
            peft_model.unload()  # the base modules back in place, unmerged
            for extra in set(vars(model)) - attributes:  # peft_config and the like
                delattr(model, extra)
            for n, p in model.named_parameters():
                p.requires_grad_(flags[n])
            for n, m in model.named_modules():
                m.train(modes[n])
        return adapter, report, after, retain_after
