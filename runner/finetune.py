"""``task=finetune``: the models that hold an unlearning dataset's knowledge, for any hub model.

TOFU is fine-tuned knowledge: unlearning it needs a ``full`` model fine-tuned on all of TOFU
(``train["full"]`` of the loaded :class:`~runner.unlearning_data.UnlearningSet`) and a ``retain``
model fine-tuned on the retain split only (``train["retain"]``), the reference of forget quality and
privleak. ``python run.py task=finetune dataset=tofu model=<hub model> finetune.which=full|retain``
makes one of them; ``task=unlearn ... unlearn.finetuned=true`` (same model, dataset and
``finetune.*`` settings) then unlearns the full one against the retain one (:func:`load_finetuned`).
On CPU the ``toy`` plays both roles already (it is trained on the same pairs by ``task=unlearn``).

The recipe (open-unlearning's ``configs/trainer/finetune.yaml`` with
``configs/experiment/finetune/tofu/default.yaml``; conf/config.yaml's ``finetune:`` block names the
source of each default):

- data: one (prompt, answer) pair per item of ``train[which]``; the prompt exactly as ``task=unlearn``
  formats it (:class:`runner.unlearn.Prompter`: the chat template with ``model.chat_template=true``,
  else ``unlearn.question_template``); the loss reads the answer tokens only (" " + answer, then
  the tokenizer's EOS), teacher-forced, as open-unlearning's finetune (labels -100 on the prompt)
  and the unlearning baselines (:mod:`editors.unlearning`) do. ``dataset.size`` caps the evaluated
  splits, not the training set.
- loss: the batch's mean NLL over all its answer tokens (token-weighted, HF's causal-LM loss).
- loop: the shared :func:`editors.training.fit`, AdamW (:func:`~editors.training.loop.make_optimizer`;
  the release's ``paged_adamw_32bit``), HF's linear warm-up/decay schedule
  (``transformers.get_linear_schedule_with_warmup``; warm-up = ``warmup`` epochs, counted as
  open-unlearning's ``src/trainer/__init__.py`` counts ``warmup_epochs``), gradient clipping at
  ``grad_clip``, ``accumulate`` batches per step; the items reshuffled every epoch from the run's
  ``seed`` (HF's sampler) and the epochs chained into one pass, so an accumulation carries over an
  epoch's end. The model trains in train mode and in its own dtype (the release: bf16), with
  gradient checkpointing (the release's ``gradient_checkpointing: True``).
- LoRA (``finetune.lora.enabled``): a peft adapter (:class:`editors.unlearning.LoraSettings`),
  merged into the weights at the end (``merge_and_unload``), so the artifact is a plain model.

Known differences from the release: weight decay applies to every parameter (HF exempts biases and
norm weights); a last partial accumulation of the whole run takes no step.

The result is a ``save_pretrained`` folder (model and tokenizer) in the artifact store
(:mod:`runner.artifacts`), keyed by content: the model id and revision, the artifact name
(``finetune-<dataset>-<which>``), the recipe (the training settings and the seed) and the sha256 of
the formatted training pairs. A rerun loads it; any other folder path works as ``model.hub_id`` too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from editors import checks
from editors.base import Artifact, recipe_json
from editors.core.tokens import answer_ids, model_device
from editors.training import AnswerBatch, LoopConfig, answer_batch, answer_logits, answer_nll, fit
from editors.training.loop import OPTIMIZERS, make_optimizer
from editors.unlearning import LoraSettings
from runner.artifacts import REPORT, ArtifactStore
from runner.models import LoadedModel, load_model

log = logging.getLogger(__name__)

WHICH = ("full", "retain")
#: bump when the training code changes what the same settings produce (part of the artifact key)
RECIPE_VERSION = 1


@dataclass
class FinetuneConfig:
    """``finetune.*``: which model ``task=finetune`` makes and how it trains (defaults: conf/config.yaml
    names the source of each)."""

    which: str = "full"  # full | retain: the dataset's train[which]
    epochs: int = 5
    lr: float = 1e-5
    batch_size: int = 8  # items per batch
    accumulate: int = 4  # batches per optimiser step
    weight_decay: float = 0.01
    warmup: float = 1.0  # epochs of linear warm-up
    optimizer: str = "adamw"
    grad_clip: float | None = 1.0
    eos: bool = True  # append the tokenizer's EOS to every answer
    gradient_checkpointing: bool = True  # memory only: not in the artifact's key
    max_steps: int | None = None  # cap on the optimiser steps (CPU checks); null: all epochs
    lora: LoraSettings = field(default_factory=LoraSettings)

    def __post_init__(self) -> None:
        if isinstance(self.lora, dict):
            self.lora = LoraSettings(**self.lora)
        checks.one_of("finetune.which", self.which, WHICH)
        checks.training_loop("finetune", self)
        checks.one_of("finetune.optimizer", self.optimizer, OPTIMIZERS)
        checks.positive("finetune.grad_clip", self.grad_clip, optional=True)
        checks.at_least_one("finetune.max_steps", self.max_steps, optional=True)
        checks.at_least_one("finetune.lora.r", self.lora.r)
        checks.positive("finetune.lora.alpha", self.lora.alpha)


class FinetuneError(ValueError):
    """A ``task=finetune`` (or ``unlearn.finetuned``) input that cannot work (one line)."""


# ------------------------------------------------------------------------------------------ the data


def training_pairs(data, which: str, prompter) -> list[tuple[str, str]]:
    """The (prompt, answer) pairs of ``data.train[which]``, prompts formatted by ``prompter``."""
    items = [
        i for i in data.train.get(which, ()) if i.text is None and i.question.strip() and i.answer.strip()
    ]
    if not items:
        have = ", ".join(sorted(data.train)) or "none"
        raise FinetuneError(
            f"dataset {data.name} has no train[{which!r}] items to fine-tune on (it has: {have}; RWKU's "
            "knowledge is pre-trained, nothing to fine-tune)"
        )
    return [(prompter(item.question), item.answer.strip()) for item in items]


def artifact_for(fcfg: FinetuneConfig, dataset: str, pairs: Sequence[tuple[str, str]], seed: int):
    """The artifact of a fine-tuned model and the sha256 of its training pairs: everything its
    weights depend on besides the base model (the store adds the model id and revision)."""
    settings = {k: v for k, v in asdict(fcfg).items() if k not in ("which", "gradient_checkpointing")}
    recipe = recipe_json({"version": RECIPE_VERSION, "settings": settings, "seed": seed})
    sha = hashlib.sha256(json.dumps([list(p) for p in pairs], ensure_ascii=False).encode("utf-8")).hexdigest()
    return Artifact(f"finetune-{dataset}-{fcfg.which}", recipe), sha


def check_pair_lengths(tokenizer, pairs: Sequence[tuple[str, str]], limit: int | None, eos: bool) -> None:
    """Every prompt + answer (+ EOS) fits the model's positions; one line naming the first that does not."""
    from runner.validate import PromptTooLongError, _token_lengths

    if not limit:
        return
    lengths = _token_lengths(tokenizer, [f"{p} {a}" for p, a in pairs])
    over = [(k, n + int(eos)) for k, n in enumerate(lengths) if n + int(eos) > limit]
    if over:
        k, n = over[0]
        raise PromptTooLongError(
            f"training pair {k} (prompt {pairs[k][0][:40]!r}...) is {n} tokens, over the model's {limit} "
            f"positions ({len(over)} too long)"
        )


def _batches(
    tokenizer, pairs: Sequence[tuple[str, str]], size: int, eos: bool, device, order: Sequence[int]
) -> list[AnswerBatch]:
    """Teacher-forced answer batches of ``pairs`` in ``order``."""
    tail = [tokenizer.eos_token_id] if eos and tokenizer.eos_token_id is not None else []
    targets = {k: answer_ids(tokenizer, " " + pairs[k][1]) + tail for k in set(order)}
    out = []
    for lo in range(0, len(order), size):
        ks = order[lo : lo + size]
        prompts = [(pairs[k][0], None) for k in ks]
        out.append(answer_batch(tokenizer, prompts, [targets[k] for k in ks], "target_tokens", device))
    return out


def _batch_loss(model, batch: AnswerBatch) -> torch.Tensor:
    """The batch's mean NLL over all its answer tokens (HF's causal-LM loss)."""
    logits, _ = answer_logits(model, batch)
    n_tokens = batch.mask.sum(1)
    return (answer_nll(logits, batch) * n_tokens).sum() / n_tokens.sum()


def mean_answer_nll(model, batches: Sequence[AnswerBatch]) -> float:
    """The mean NLL per answer token over every item of ``batches`` (no gradient)."""
    total, count = 0.0, 0.0
    with torch.no_grad():
        for b in batches:
            n_tokens = b.mask.sum(1)
            total += float((answer_nll(answer_logits(model, b)[0], b) * n_tokens).sum())
            count += float(n_tokens.sum())
    return total / count


# ----------------------------------------------------------------------------------------- training


def _checkpointing(model, on: bool) -> None:
    """Activation (gradient) checkpointing on or off (transformers 5 renamed the methods)."""
    name = (
        "activation_checkpointing"
        if hasattr(model, "activation_checkpointing_enable")
        else "gradient_checkpointing"
    )
    getattr(model, f"{name}_{'enable' if on else 'disable'}")()


def finetune(
    model: torch.nn.Module,
    tokenizer,
    pairs: Sequence[tuple[str, str]],
    fcfg: FinetuneConfig,
    seed: int,
    progress: bool = False,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Fine-tune ``model`` on ``pairs`` (module docstring); returns the trained model (with LoRA:
    the adapter merged into a plain model) and the training report."""
    from transformers import get_linear_schedule_with_warmup

    device = model_device(model)
    rng = random.Random(seed)
    order: list[int] = []
    for _ in range(fcfg.epochs):  # HF's sampler: a fresh shuffle every epoch
        epoch = list(range(len(pairs)))
        rng.shuffle(epoch)
        order += epoch
    per_epoch = -(-len(pairs) // fcfg.batch_size)
    steps = [
        b
        for e in range(fcfg.epochs)
        for b in _batches(
            tokenizer, pairs, fcfg.batch_size, fcfg.eos, device, order[e * len(pairs) : (e + 1) * len(pairs)]
        )
    ]
    probe = _batches(tokenizer, pairs, fcfg.batch_size, fcfg.eos, device, range(len(pairs)))
    model.eval()
    before = mean_answer_nll(model, probe)
    total = len(steps) // fcfg.accumulate
    if fcfg.max_steps is not None:
        total = min(total, fcfg.max_steps)
    # open-unlearning src/trainer/__init__.py: warmup_steps = int(warmup_epochs · N // effective batch)
    warmup = int((fcfg.warmup * len(pairs)) // (fcfg.batch_size * fcfg.accumulate))
    peft_model = None
    if fcfg.lora.enabled:
        from peft import LoraConfig, get_peft_model

        lora = fcfg.lora
        peft_model = get_peft_model(
            model,
            LoraConfig(
                r=lora.r,
                lora_alpha=lora.alpha,
                lora_dropout=lora.dropout,
                target_modules=lora.target_modules,  # null: peft's default for the model type
                bias="none",
            ),
        )
        trained = peft_model
        params = {n: p for n, p in peft_model.named_parameters() if "lora_" in n}
    else:
        trained = model
        params = dict(model.named_parameters())
    checkpointing = fcfg.gradient_checkpointing and getattr(model, "supports_gradient_checkpointing", False)
    if checkpointing:
        _checkpointing(model, True)
        if peft_model is not None:
            model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still get gradients
    loop = LoopConfig(
        epochs=1,  # the epochs are chained in ``steps``
        lr=fcfg.lr,
        optimizer=fcfg.optimizer,
        weight_decay=fcfg.weight_decay,
        accumulate=fcfg.accumulate,
        grad_clip=fcfg.grad_clip,
        max_steps=fcfg.max_steps,
    )
    opt = make_optimizer(list(params.values()), loop)
    schedule = get_linear_schedule_with_warmup(opt, warmup, max(1, total))
    torch.manual_seed(seed)  # dropout, if the model has any
    trained.train()
    try:
        report = fit(
            params,
            lambda b: _batch_loss(trained, b),
            steps,
            loop,
            model=trained,
            after_step=schedule.step,
            optimizer=opt,
            progress=progress,
            desc=f"finetune ({fcfg.which})",
        )
    finally:
        trained.eval()
        if checkpointing:
            _checkpointing(model, False)
    if peft_model is not None:
        model = peft_model.merge_and_unload()
    for p in model.parameters():
        p.requires_grad_(True)
    after = mean_answer_nll(model, probe)
    return model, {
        "which": fcfg.which,
        "n_items": len(pairs),
        "batches_per_epoch": per_epoch,
        "steps": report.steps,
        "warmup_steps": warmup,
        "schedule_steps": total,
        "stopped": report.stopped,
        "final_loss": report.final_loss,
        "answer_nll_before": before,
        "answer_nll_after": after,
    }


# ------------------------------------------------------------------------------------------ the task


def finetune_cfg(cfg: DictConfig) -> FinetuneConfig:
    obj = OmegaConf.to_object(cfg.finetune)
    return obj if isinstance(obj, FinetuneConfig) else FinetuneConfig(**obj)


def _store(cfg: DictConfig, base: LoadedModel, allow_train: bool, command: str = "") -> ArtifactStore:
    return ArtifactStore(
        Path(cfg.paths.cache_dir) / "artifacts", base.model_id, base.revision, allow_train, command
    )


def _prompter(cfg: DictConfig, tokenizer):
    from runner.unlearn import Prompter, _unlearn_cfg

    return Prompter(
        _unlearn_cfg(cfg).question_template, tokenizer, bool(cfg.model.get("chat_template", False))
    )


def _load_data(cfg: DictConfig):
    from runner.unlearning_data import load_unlearning

    spec = OmegaConf.to_container(cfg.dataset, resolve=True)
    cache = Path(cfg.paths.cache_dir) / "datasets"
    return load_unlearning({**spec, "cache_dir": spec.get("cache_dir") or str(cache)})


def finetune_command(cfg: DictConfig, which: str) -> str:
    """The ``task=finetune`` command that makes the ``which`` model of this run's model and dataset:
    the run's own model/dataset/finetune/seed/cache overrides (in a Hydra app), else the choices."""
    from hydra.core.hydra_config import HydraConfig

    keep = ("model", "dataset", "finetune.", "seed=", "paths.cache_dir=")
    if HydraConfig.initialized():
        overrides = [
            o
            for o in HydraConfig.get().overrides.task
            if o.lstrip("+~").startswith(keep) and not o.startswith("finetune.which=")
        ]
    else:
        overrides = [f"dataset={cfg.dataset.name}", f"model={cfg.model.name}"]
        for key in ("forget_split", "retain_authors", "path"):
            value = cfg.dataset.get(key)
            if value is not None:
                overrides.append(f"dataset.{key}={value}")
    return " ".join(["python run.py task=finetune", *overrides, f"finetune.which={which}"])


def run_finetune(cfg: DictConfig) -> dict[str, Any]:
    """Make (or find) the ``finetune.which`` model; returns the summary (``summary.json``'s content)."""
    from omegaconf.errors import OmegaConfBaseException

    from runner.pipeline import ConfigError, _one_line

    try:
        fcfg = finetune_cfg(cfg)
        if OmegaConf.get_type(cfg.dataset).__name__ != "UnlearningDatasetConfig":
            raise FinetuneError(
                f"task=finetune fine-tunes on an unlearning dataset's train split (dataset=tofu), got dataset={cfg.dataset.name}"
            )
        if cfg.model.source == "toy":
            raise FinetuneError(
                "task=finetune is for hub models (model.source=hub): task=unlearn trains the toy on the "
                "same question -> answer pairs itself"
            )
    except (ValueError, OmegaConfBaseException) as exc:
        raise ConfigError(_one_line(exc)) from None
    data = _load_data(cfg)
    base = load_model(cfg.model, cache_dir=Path(cfg.paths.cache_dir), seed=cfg.seed)
    try:
        pairs = training_pairs(data, fcfg.which, _prompter(cfg, base.tokenizer))
    except FinetuneError as exc:
        raise ConfigError(str(exc)) from None
    from runner.validate import context_length

    check_pair_lengths(base.tokenizer, pairs, context_length(base.model), fcfg.eos)
    artifact, sha = artifact_for(fcfg, data.name, pairs, int(cfg.seed))
    calls = []

    def train(folder: Path, checkpoints: Path) -> dict[str, Any]:
        model, report = finetune(base.model, base.tokenizer, pairs, fcfg, int(cfg.seed), bool(cfg.progress))
        model.save_pretrained(folder)
        base.tokenizer.save_pretrained(folder)
        calls.append(folder)
        return {**report, "base_model": {"id": base.model_id, "revision": base.revision}}

    folder = _store(cfg, base, allow_train=True).get(artifact, sha, train)
    report = json.loads((folder / REPORT).read_text(encoding="utf-8"))
    summary = {
        "task": "finetune",
        "which": fcfg.which,
        "artifact": str(folder),
        "trained": bool(calls),
        "report": report,
        "model": {"id": base.model_id, "revision": base.revision},
        "dataset": {"name": data.name, "sha256": data.sha256, "train_sha256": sha},
    }
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
    print(
        f"\nfine-tuned {fcfg.which} model ({report.get('n_items')} items, answer NLL "
        f"{report.get('answer_nll_before', float('nan')):.3f} -> {report.get('answer_nll_after', float('nan')):.3f}): "
        f"{folder}\nunlearn it with the same model, dataset and finetune settings and unlearn.finetuned=true"
    )
    return summary


def load_finetuned(cfg: DictConfig, data, cache_dir: Path, ucfg) -> tuple[LoadedModel, LoadedModel | None]:
    """``task=unlearn`` with ``unlearn.finetuned=true``: the cached ``full`` model (the one to
    unlearn) and, with ``unlearn.reference=retain``, the cached ``retain`` model (the reference),
    made by ``task=finetune`` from ``model`` on ``dataset`` with the run's ``finetune.*`` settings and
    seed. Each keeps the base model's id; its revision is the artifact's folder name. A missing
    one: one line naming the command that makes it."""
    from runner.pipeline import ConfigError

    if ucfg.reference_hub_id:
        raise ConfigError(
            "unlearn.finetuned=true takes the reference from task=finetune's retain model: unset unlearn.reference_hub_id"
        )
    base = load_model(cfg.model, cache_dir=cache_dir, seed=cfg.seed)  # its id and revision key the artifacts
    prompter = _prompter(cfg, base.tokenizer)
    fcfg = finetune_cfg(cfg)
    store = _store(cfg, base, allow_train=False)
    folders = {}
    for which in ("full", "retain") if ucfg.reference == "retain" else ("full",):
        try:
            pairs = training_pairs(data, which, prompter)
        except FinetuneError as exc:
            raise ConfigError(f"unlearn.finetuned=true: {exc}") from None
        artifact, sha = artifact_for(replace(fcfg, which=which), data.name, pairs, int(cfg.seed))
        folder = store.folder(artifact, sha)
        if not (folder / REPORT).exists():
            raise ConfigError(
                f"unlearn.finetuned=true: the {which} model of {base.model_id} fine-tuned on {data.name} "
                f"({artifact.name}) is not in {store.root}; make it with: {finetune_command(cfg, which)}"
            )
        folders[which] = folder
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    base_id = base.model_id
    del base
    loaded: dict[str, LoadedModel] = {}
    for which, folder in folders.items():
        model = load_model(
            {**model_cfg, "source": "hub", "hub_id": str(folder), "revision": None}, cache_dir=cache_dir
        )
        model.model_id, model.revision = base_id, folder.name
        model.info["finetuned"] = str(folder)
        loaded[which] = model
        log.info("unlearn.finetuned: the %s model from %s", which, folder)
    return loaded["full"], loaded.get("retain")
