"""Model loading: hub checkpoints, tiny random models, and the locally trained ``toy`` model.

``load_model(cfg, cases=..., cache_dir=..., seed=...)`` returns a :class:`LoadedModel` (model in eval
mode, tokenizer, :class:`~editors.spec.ModelSpec`, model id and revision, device). The source is
chosen by ``cfg.source``, never by looking at a model's name:

- ``hub``:  ``AutoModelForCausalLM`` / ``AutoTokenizer`` ``from_pretrained(hub_id, revision=...)``
  (``hub_id`` may also be a local directory written by ``save_pretrained``).
- ``tiny``: a randomly initialised model of ``architecture`` (GPT-2, GPT-J or LLaMA) built from
  ``sizes``, with a byte-level BPE tokenizer trained locally on the bundled data text. For tests.
- ``toy``:  a small GPT-2 trained locally on the TRUE facts of the run's cases, so that editing on
  a CPU means something: it knows the facts, and recalls them through the subject's last token at
  early-middle layers, as locate-then-edit methods assume (see :func:`train_toy` for the recipe).
  Cached on disk by a content hash of the training texts, the settings and :data:`TOY_RECIPE`;
  the second run loads it.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPTJConfig,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from editors.core.tokens import right_pad
from editors.requests import fill
from editors.spec import ModelSpec
from evaluation.cases import EditCase
from runner.environment import training_environment
from runner.tokenizers import atomic_dir, content_hash, load_or_train_tokenizer
from runner.validate import check_prompt_lengths

__all__ = [
    "TOY_RECIPE",
    "LoadedModel",
    "ModelConfig",
    "ModelSizes",
    "TokenizerSettings",
    "ToyFact",
    "ToyTraining",
    "answer_space_facts",
    "build_tiny_model",
    "load_model",
    "model_spec",
    "resolve_device",
    "tokenizer_corpus",
    "toy_facts",
    "subject_from_templates",
    "toy_recall",
    "train_toy",
]

#: Bump when the toy training code changes in a way that changes the trained model.
TOY_RECIPE = "toy-v3"

DATA_DIR = Path(__file__).parent / "data"
SOURCES = ("hub", "tiny", "toy")
ARCHITECTURES = ("gpt2", "gptj", "llama")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

#: Used to train a tiny model's tokenizer when none of the bundled corpus files is there.
FALLBACK_SENTENCES = (
    "The mother tongue of Danielle Darrieux is French.",
    "The official religion of Edwin of Northumbria is Christianity.",
    "Toko Yasuda, the guitar player, was born in Japan.",
    "Apple A5 was created by Apple.",
    "The twin city of Lyon is Beirut.",
    "Michel Rocard is a native speaker of French.",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    "Where is the Eiffel Tower? It is in Paris.",
)


# ---------------------------------------------------------------------------------------------
# Configuration (the lead registers ModelConfig as the structured schema of the ``model`` group)
# ---------------------------------------------------------------------------------------------


@dataclass
class ModelSizes:
    """Sizes of a model built from config (``tiny`` and ``toy`` sources)."""

    n_layer: int = 2
    hidden: int = 64
    heads: int = 4
    inner: int | None = None  # MLP width; None: 4 * hidden
    max_positions: int = 128
    kv_heads: int | None = None  # LLaMA grouped-query attention; None: heads
    rotary_dim: int | None = None  # GPT-J; None: hidden // heads
    dropout: float = 0.0


@dataclass
class TokenizerSettings:
    """A locally trained byte-level BPE tokenizer (``tiny`` and ``toy`` sources)."""

    vocab_size: int = 1000
    min_frequency: int = 2
    # Files under runner/data (or absolute paths) whose text trains a tiny model's tokenizer.
    # The toy trains its tokenizer on its own fact texts instead.
    corpus: list[str] = field(default_factory=lambda: ["counterfact_sample.json", "wikitext2_test.txt"])
    max_corpus_chars: int = 2_000_000


@dataclass
class ToyTraining:
    """How the ``toy`` model is trained on the true facts of the run's cases (defaults: the measured recipe)."""

    steps: int = 1500
    min_epochs: float | None = (
        None  # at least this many passes over the sentences (more steps for more cases)
    )
    # more sentences than this: min_epochs grows as (sentences / this) ** epochs_growth (null: it
    # does not); see toy_steps
    epochs_grow_above: int | None = None
    epochs_growth: float = 1.0
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    batch_size: int = 32
    # samples are drawn this many batches at a time and grouped by length (1: no grouping)
    length_pool: int = 8
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int | None = 0  # None: the run's seed (then the toy changes with the run seed)
    prompt_weight: float = 1.0  # loss weight of the fact's prompt tokens
    answer_weight: float = 1.0  # loss weight of the fact's answer tokens (and the eos after it)
    prefix_prob: float = 0.5  # share of samples that get a random prefix before the fact
    prefix_fact_prob: float = 0.5  # share of prefixes that are another (true) fact sentence
    prefix_max_words: int = 8  # word-salad prefixes: a seed word + up to this many words
    prefix_max_tokens: int = 12  # prefixes are cut to their last this-many tokens
    prefix_seeds: list[str] = field(default_factory=lambda: ["The", "Therefore", "Because", "I", "You"])
    answer_space: int = 1  # made-up subjects per case whose answer is target_new (see answer_space_facts)
    subject_bottleneck: float = 1.0  # share of samples where the subject is read only at its last token
    # e.g. "Note: {}": sentences with the answer right after the subject (see answer_space_facts)
    subject_prompt: str | None = None
    # the block whose output at the subject's last token must predict the answer (logit lens)
    subject_lens_layer: int | None = 1
    subject_lens_weight: float = 3.0  # weight of that auxiliary loss
    eval_every: int = 250
    # recall checks during training read an evenly spaced subset of at most this many facts (the
    # report's last one reads all); with stop_at_recall every check reads all (null: always all)
    eval_facts: int | None = 1000
    stop_at_recall: float | None = None  # stop early once top-1 recall of the facts reaches this
    cases: int | None = (
        None  # train on at least the first N dataset cases (null: the run's cases): runs of different dataset.size share one toy
    )
    # torch threads while training: fixed (and deterministic algorithms on), so the weights do not
    # depend on the machine's core count; part of the cache key
    threads: int = 1
    progress: bool = True


@dataclass
class ModelConfig:
    """Facts about one model (never method settings): where it comes from and its module names."""

    name: str = "toy"
    source: str = "toy"  # hub | tiny | toy
    hub_id: str | None = None
    revision: str | None = None
    dtype: str = "float32"
    device: str = "auto"  # auto: cuda when available, else cpu
    device_map: str | None = None  # "auto": accelerate places the model (then `device` is ignored)
    architecture: str = "gpt2"  # tiny/toy: gpt2 | gptj | llama
    sizes: ModelSizes = field(default_factory=ModelSizes)
    tokenizer: TokenizerSettings = field(default_factory=TokenizerSettings)
    train: ToyTraining = field(default_factory=ToyTraining)
    # Module-name templates (``{}`` is the layer index): the fields of editors.spec.ModelSpec.
    layer: str = "transformer.h.{}"
    mlp_out: str = "transformer.h.{}.mlp.c_proj"
    attn_out: str = "transformer.h.{}.attn.c_proj"
    final_norm: str = "transformer.ln_f"
    lm_head: str = "lm_head"
    n_layers: int = 2
    edit_layers: list[int] = field(default_factory=lambda: [0, 1])
    edit_layer: int = 1
    # The covariance corpus of ``stats=model`` (the default): a stats.corpus id. The toy's is
    # ``training``, the sentences it was trained on (its "pretraining corpus", as Wikipedia is GPT-J's).
    stats_corpus: str = "wikitext2"
    # Instruct models: questions go through the tokenizer's chat template (task=unlearn: in editing,
    # training and evaluation alike); false: unlearn.question_template
    chat_template: bool = False


def _as_config(cfg: Any) -> ModelConfig:
    """Accept a ModelConfig, an OmegaConf node (structured or plain) or a dict."""
    if isinstance(cfg, ModelConfig):
        return cfg
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            obj = OmegaConf.to_object(cfg)
            if isinstance(obj, ModelConfig):
                return obj
            cfg = obj
    except ImportError:  # pragma: no cover
        pass
    if is_dataclass(cfg):
        cfg = asdict(cfg)
    if not isinstance(cfg, dict):
        raise TypeError(f"expected a ModelConfig, got {type(cfg).__name__}")
    data = dict(cfg)
    nested = {"sizes": ModelSizes, "tokenizer": TokenizerSettings, "train": ToyTraining}
    for key, cls in nested.items():
        if isinstance(data.get(key), dict):
            data[key] = cls(**data[key])
    return ModelConfig(**data)


def model_spec(cfg: ModelConfig | Any) -> ModelSpec:
    """The ModelSpec named by a model config."""
    cfg = _as_config(cfg)
    return ModelSpec(
        layer=cfg.layer,
        mlp_out=cfg.mlp_out,
        attn_out=cfg.attn_out,
        final_norm=cfg.final_norm,
        lm_head=cfg.lm_head,
        n_layers=int(cfg.n_layers),
    )


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    """A model ready to edit: eval mode, on its device, with its tokenizer and module names.

    ``revision`` is the hub commit (or the configured revision) for hub models and the content
    hash for tiny/toy models, so (model_id, revision) keys caches. ``trained`` is True when this
    call trained the toy (False when it came from the cache); ``info`` holds the toy's training
    report (recall, steps, seconds) and its cache path.
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    spec: ModelSpec
    model_id: str
    revision: str
    device: torch.device
    trained: bool = False
    info: dict[str, Any] = field(default_factory=dict)
    training_texts: tuple[str, ...] = ()  # the toy's training sentences (stats.corpus=training); () otherwise
    changes_forward: bool = (
        False  # a saved edited model came back with adapters or routers: score it unpacked
    )


def load_model(
    cfg: ModelConfig | Any,
    *,
    cases: Sequence[EditCase] | None = None,
    cache_dir: Path,
    seed: int = 0,
) -> LoadedModel:
    """Load (hub), build (tiny) or train-or-load (toy) the model that ``cfg`` describes."""
    cfg = _as_config(cfg)
    if cfg.source not in SOURCES:
        raise ValueError(f"model.source must be one of {SOURCES}, got {cfg.source!r}")
    if cfg.dtype not in DTYPES:
        raise ValueError(f"model.dtype must be one of {tuple(DTYPES)}, got {cfg.dtype!r}")
    _check_edit_layers(cfg)
    cache_dir = Path(cache_dir)
    if cfg.source == "hub":
        loaded = _load_hub(cfg)
    elif cfg.source == "tiny":
        loaded = _load_tiny(cfg, cache_dir=cache_dir, seed=seed)
    else:
        if not cases:
            raise ValueError("model.source=toy trains on the run's cases, but no cases were given")
        loaded = _load_toy(cfg, cases=cases, cache_dir=cache_dir, seed=seed)
    _validate(loaded.model, loaded.spec, cfg)
    loaded.model.eval()
    return loaded


def _check_edit_layers(cfg: ModelConfig) -> None:
    layers = [*cfg.edit_layers, cfg.edit_layer]
    bad = [layer for layer in layers if not 0 <= int(layer) < int(cfg.n_layers)]
    if bad:
        raise ValueError(
            f"model {cfg.name!r}: edit layers {bad} are out of range for n_layers={cfg.n_layers} "
            f"(model.edit_layers={list(cfg.edit_layers)}, model.edit_layer={cfg.edit_layer})"
        )


def _validate(model: torch.nn.Module, spec: ModelSpec, cfg: ModelConfig) -> None:
    """The templates name real modules and the model has exactly ``n_layers`` layers."""
    spec.validate(model)
    names = {name for name, _ in model.named_modules()}
    if spec.layer.format(spec.n_layers - 1) not in names or spec.layer.format(spec.n_layers) in names:
        count = 0
        while spec.layer.format(count) in names:
            count += 1
        raise ValueError(
            f"model {cfg.name!r}: model.n_layers={spec.n_layers} but the model has {count} modules "
            f"matching model.layer={spec.layer!r}"
        )


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _load_hub(cfg: ModelConfig) -> LoadedModel:
    from runner.hub import check_hub_access, hub_error

    if not cfg.hub_id:
        raise ValueError(f"model {cfg.name!r}: source=hub needs model.hub_id")
    kwargs: dict[str, Any] = {"dtype": DTYPES[cfg.dtype]}
    if cfg.revision:
        kwargs["revision"] = cfg.revision
    if cfg.device_map:
        kwargs["device_map"] = cfg.device_map
    check_hub_access(cfg.name, cfg.hub_id, cfg.revision)  # offline / unreachable / unknown: one line, now
    try:
        model = AutoModelForCausalLM.from_pretrained(cfg.hub_id, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(
            cfg.hub_id, **({"revision": cfg.revision} if cfg.revision else {})
        )
    except OSError as exc:  # gated, connection lost, missing files (huggingface_hub errors are OSErrors)
        raise hub_error(cfg.name, cfg.hub_id, exc) from exc
    except ValueError as exc:  # a local folder without a checkpoint: "Unrecognized model in ..."
        if not Path(cfg.hub_id).expanduser().is_dir():
            raise
        raise hub_error(cfg.name, cfg.hub_id, exc) from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if not cfg.device_map:
        model.to(resolve_device(cfg.device))
    attached = []
    if Path(cfg.hub_id).expanduser().is_dir():  # an edited model written by save_model=true
        from runner.export import attach_saved_adapters

        attached = attach_saved_adapters(model, cfg.hub_id, tokenizer)
    revision = getattr(model.config, "_commit_hash", None) or cfg.revision or "unknown"
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        spec=model_spec(cfg),
        model_id=cfg.hub_id,
        revision=str(revision),
        device=_device_of(model),
        changes_forward=bool(attached),
    )


# ---------------------------------------------------------------------------------------------
# Tiny models (random weights, local tokenizer)
# ---------------------------------------------------------------------------------------------


def tokenizer_corpus(settings: TokenizerSettings) -> list[str]:
    """The text a tiny model's tokenizer trains on: the configured files, else built-in sentences."""
    texts: list[str] = []
    budget = settings.max_corpus_chars
    for name in settings.corpus:
        path = Path(name) if Path(name).is_absolute() else DATA_DIR / name
        if not path.exists():
            continue
        if path.suffix == ".json":
            texts.extend(_json_strings(json.loads(path.read_text(encoding="utf-8"))))
        else:
            texts.extend(
                line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
            )
    out: list[str] = []
    for text in texts:
        if budget <= 0:
            break
        out.append(text)
        budget -= len(text)
    return out or list(FALLBACK_SENTENCES)


def _json_strings(obj: Any) -> list[str]:
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [s for value in obj.values() for s in _json_strings(value)]
    if isinstance(obj, list):
        return [s for value in obj for s in _json_strings(value)]
    return []


def _tokenizer_style(cfg: ModelConfig) -> str:
    if cfg.architecture not in ARCHITECTURES:
        raise ValueError(f"model.architecture must be one of {ARCHITECTURES}, got {cfg.architecture!r}")
    return cfg.architecture


def _hf_config(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> PretrainedConfig:
    s = cfg.sizes
    inner = s.inner or 4 * s.hidden
    if s.hidden % s.heads:
        raise ValueError(f"model.sizes.hidden={s.hidden} is not divisible by model.sizes.heads={s.heads}")
    common = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if cfg.architecture == "gpt2":
        return GPT2Config(
            n_positions=s.max_positions,
            n_embd=s.hidden,
            n_layer=s.n_layer,
            n_head=s.heads,
            n_inner=inner,
            resid_pdrop=s.dropout,
            embd_pdrop=s.dropout,
            attn_pdrop=s.dropout,
            **common,
        )
    if cfg.architecture == "gptj":
        return GPTJConfig(
            n_positions=s.max_positions,
            n_embd=s.hidden,
            n_layer=s.n_layer,
            n_head=s.heads,
            n_inner=inner,
            rotary_dim=s.rotary_dim or s.hidden // s.heads,
            resid_pdrop=s.dropout,
            embd_pdrop=s.dropout,
            attn_pdrop=s.dropout,
            tie_word_embeddings=False,
            **common,
        )
    return LlamaConfig(
        hidden_size=s.hidden,
        intermediate_size=inner,
        num_hidden_layers=s.n_layer,
        num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads or s.heads,
        max_position_embeddings=s.max_positions,
        attention_dropout=s.dropout,
        tie_word_embeddings=False,
        **common,
    )


def build_tiny_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, seed: int) -> PreTrainedModel:
    """A randomly initialised model of ``cfg.architecture`` (deterministic given ``seed``)."""
    hf_config = _hf_config(cfg, tokenizer)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(hf_config)


def _load_tiny(cfg: ModelConfig, *, cache_dir: Path, seed: int) -> LoadedModel:
    style = _tokenizer_style(cfg)
    tokenizer, tok_key = load_or_train_tokenizer(
        tokenizer_corpus(cfg.tokenizer),
        vocab_size=cfg.tokenizer.vocab_size,
        style=style,
        cache_dir=cache_dir,
        min_frequency=cfg.tokenizer.min_frequency,
    )
    model = build_tiny_model(cfg, tokenizer, seed)
    model.to(dtype=DTYPES[cfg.dtype], device=resolve_device(cfg.device))
    revision = content_hash(
        {"arch": cfg.architecture, "sizes": asdict(cfg.sizes), "tokenizer": tok_key, "seed": seed}
    )
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        spec=model_spec(cfg),
        model_id=cfg.name,
        revision=revision,
        device=_device_of(model),
    )


# ---------------------------------------------------------------------------------------------
# The toy model: a small model trained on the true facts of the run's cases
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class ToyFact:
    """One training sentence of the toy: ``prompt + " " + answer``; ``subject`` ("" if unknown) is in ``prompt``."""

    prompt: str
    answer: str
    subject: str = ""

    @property
    def text(self) -> str:
        return f"{self.prompt} {self.answer}"


def toy_facts(cases: Sequence[EditCase]) -> list[ToyFact]:
    """The TRUE facts behind the run's cases: what the toy must know before editing.

    For each case: the rewrite prompt and every paraphrase prompt with the pre-edit answer
    (``case.true_answer``, falling back to ``request.target_true``), and every neighborhood probe
    with its own target. Each fact carries its subject where it is known, so that the training
    bottleneck and lens (see :func:`train_toy`) apply to it: the request's subject in its own
    prompts; for neighbourhood prompts, the record's ``neighborhood_samples`` when it has them,
    else the subject found by matching the prompt against the relation templates of the run's
    requests (:func:`subject_from_templates`). Duplicates are dropped; the result is sorted, so
    the toy does not depend on the order of the cases. A prompt seen with two different answers
    keeps the first one (in case order).
    """
    templates = sorted({c.request.prompt for c in cases}, key=lambda t: (-len(t), t))
    seen: dict[str, ToyFact] = {}
    for case in cases:
        true = (getattr(case, "true_answer", "") or case.request.target_true).strip()
        subject = case.request.subject
        items = [(case.request.text, true, subject)]
        items += [
            (p.prompt, true, subject if subject and subject in p.prompt else "")
            for p in case.probes.get("paraphrase", ())
        ]
        neighbors = case.probes.get("neighborhood", ())
        known = case.meta.get("neighborhood_subjects")
        if not known or len(known) != len(neighbors):
            known = [subject_from_templates(p.prompt, templates) for p in neighbors]
        items += [(p.prompt, p.target, s if s and s in p.prompt else "") for p, s in zip(neighbors, known)]
        for prompt, answer, subj in items:
            if prompt.strip() and answer.strip() and prompt not in seen:
                seen[prompt] = ToyFact(prompt, answer.strip(), subj)
    return sorted(seen.values())


def subject_from_templates(prompt: str, templates: Sequence[str]) -> str:
    """The subject of ``prompt`` if it is one of ``templates`` (``"... {} ..."``) filled in, else
    "". The first matching template wins (pass the longest first: "The capital of {} is" before
    "{} is")."""
    for template in templates:
        head, _, tail = template.partition("{}")
        if len(prompt) > len(head) + len(tail) and prompt.startswith(head) and prompt.endswith(tail):
            subject = prompt[len(head) : len(prompt) - len(tail)].strip()
            if subject:
                return subject
    return ""


def answer_space_facts(
    cases: Sequence[EditCase],
    taken: Sequence[ToyFact],
    seed: int,
    per_case: int = 1,
    subject_prompt: str | None = None,
) -> list[ToyFact]:
    """Extra training sentences that shape where and how the toy stores its facts.

    - Made-up subjects answering ``target_new``: a toy trained on true facts only has never
      produced most counterfactual objects, so no edit at the subject can reach them (a real LM
      knows "English" as an answer to "The mother tongue of X is" for some X). For each case,
      ``per_case`` made-up subjects (the first word and the last word of two different real
      subjects, e.g. "Danielle Yasuda") get the case's rewrite prompt and paraphrase prompts
      (its subject replaced) with ``target_new`` as the answer. Because the names share words with
      real subjects, a subject is only known from all its tokens.
    - ``subject_prompt`` (e.g. ``"Note: {}"``, the subject last): for every real and made-up
      subject, that prompt followed by the subject's answer, so the answer is predicted AT the
      subject's last token: the fact is looked up there, where locate-then-edit methods edit.

    None of the run's own prompts changes meaning.
    """
    if subject_prompt is not None and not fill(subject_prompt, "X").endswith("X"):
        raise ValueError(
            f"model.train.subject_prompt must end with the subject '{{}}', got {subject_prompt!r}"
        )
    rng = random.Random(seed)
    subjects = sorted({c.request.subject for c in cases if c.request.subject})
    firsts = sorted({s.split()[0] for s in subjects})
    lasts = sorted({s.split()[-1] for s in subjects})
    used = set(subjects) | {f.prompt for f in taken}
    out: list[ToyFact] = []

    def add(prompt: str, answer: str, subject: str) -> None:
        if prompt not in used:
            used.add(prompt)
            out.append(ToyFact(prompt, answer, subject))

    by_request: dict[tuple[str, str], set[str]] = {}
    for case in cases:
        if case.request.subject is None:  # no subject to make up a neighbour of
            continue
        key = (case.request.prompt, case.request.target_new)
        paras = {p.prompt.replace(case.request.subject, "{}", 1) for p in case.probes.get("paraphrase", ())}
        by_request.setdefault(key, set()).update(t for t in paras if "{}" in t)
    for (template, target), paraphrases in sorted(by_request.items()):
        for _ in range(per_case):
            for _attempt in range(50):
                name = f"{rng.choice(firsts)} {rng.choice(lasts)}"
                if name not in used and fill(template, name) not in used:
                    break
            else:
                continue
            used.add(name)
            add(fill(template, name), target, name)
            for para in sorted(paraphrases):
                add(fill(para, name), target, name)
            if subject_prompt is not None:
                add(fill(subject_prompt, name), target, name)
    if subject_prompt is not None:
        for case in sorted((c for c in cases if c.request.subject), key=lambda c: c.request.subject):
            true = (getattr(case, "true_answer", "") or case.request.target_true).strip()
            add(fill(subject_prompt, case.request.subject), true, case.request.subject)
    return sorted(out)


def _toy_key(cfg: ModelConfig, facts: list[ToyFact], seed: int) -> str:
    """Everything the trained weights depend on: recipe, settings, seed, the facts, and the kernels
    (library versions, device kind, CPU SIMD level: :func:`runner.environment.training_environment`)."""
    return content_hash(
        {
            "recipe": TOY_RECIPE,
            "environment": training_environment(resolve_device(cfg.device)),
            "architecture": cfg.architecture,
            "sizes": asdict(cfg.sizes),
            "tokenizer": {
                "vocab_size": cfg.tokenizer.vocab_size,
                "min_frequency": cfg.tokenizer.min_frequency,
            },
            # "cases" is not a setting of the model: the facts it yields are in the key
            "train": {k: v for k, v in asdict(cfg.train).items() if k not in ("progress", "cases")},
            "seed": seed,
            "facts": [asdict(f) for f in facts],
        }
    )


def _load_toy(cfg: ModelConfig, *, cases: Sequence[EditCase], cache_dir: Path, seed: int) -> LoadedModel:
    toy_seed = cfg.train.seed if cfg.train.seed is not None else seed
    facts = toy_facts(cases)
    extra = answer_space_facts(cases, facts, toy_seed, cfg.train.answer_space, cfg.train.subject_prompt)

    def check(tokenizer) -> None:  # a probe longer than the toy's context fails here, not after training
        check_prompt_lengths(
            cases, tokenizer, cfg.sizes.max_positions, limit_name="model.sizes.max_positions"
        )

    return load_toy_on_facts(cfg, facts, extra=extra, cache_dir=cache_dir, seed=toy_seed, check=check)


def load_toy_on_facts(
    cfg: ModelConfig | Any,
    facts: Sequence[ToyFact],
    *,
    cache_dir: Path,
    seed: int,
    extra: Sequence[ToyFact] = (),
    check: Callable[[PreTrainedTokenizerBase], None] | None = None,
) -> LoadedModel:
    """Train (or load from the cache, keyed by content) a toy on ``facts`` (``+ extra``), e.g. the
    question -> answer pairs of an unlearning dataset; ``check(tokenizer)`` runs before training."""
    cfg = _as_config(cfg)
    facts, extra = list(facts), list(extra)
    key = _toy_key(cfg, facts + extra, seed)
    path = cache_dir / "toy" / f"{cfg.name}-{key}"
    trained = False
    if not (path / "toy_info.json").exists():
        tokenizer = toy_tokenizer(cfg, facts + extra)
        if check is not None:
            check(tokenizer)
        model, tokenizer, info = train_toy(cfg, facts, extra=extra, seed=seed, tokenizer=tokenizer)
        with atomic_dir(path) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / "toy_info.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
        trained = True
    info = json.loads((path / "toy_info.json").read_text(encoding="utf-8"))
    info["path"] = str(path)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=DTYPES[cfg.dtype])
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model.to(resolve_device(cfg.device))
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        spec=model_spec(cfg),
        model_id=cfg.name,
        revision=key,
        device=_device_of(model),
        trained=trained,
        info=info,
        training_texts=tuple(f.text for f in facts + extra),
    )


@dataclass
class _Encoded:
    ids: list[int]
    n_prompt: int  # tokens of the prompt (the rest is the answer)
    subject: tuple[int, int] | None  # first and last token index of the subject


class _ToySampler:
    """Training batches: fact sentences, some behind a random prefix; loss on the fact only.

    Returns ``(input_ids, attention_mask, weights)``; the mask is 4-D (batch, 1, query, key) and
    keeps the positions after a subject from attending to the subject's tokens other than its last
    one (with probability ``subject_bottleneck``).
    """

    def __init__(self, cfg: ModelConfig, facts: Sequence[ToyFact], tokenizer, rng: random.Random):
        self.t = cfg.train
        self.rng = rng
        self.tok = tokenizer
        self.eos = tokenizer.eos_token_id
        self.max_len = cfg.sizes.max_positions
        self.texts = [f.text for f in facts]
        self.bare = [self._encode(f, "") for f in facts]
        self.spaced = [self._encode(f, " ") for f in facts]
        self.words = sorted({w for text in self.texts for w in text.split()})
        self.bos = tokenizer("", add_special_tokens=True)["input_ids"]  # [] (GPT-2 style) or [BOS]
        self.pending: list[list] = []

    def _encode(self, fact: ToyFact, lead: str) -> _Encoded:
        text = lead + fact.text
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        n_prompt = len(self.tok(lead + fact.prompt, add_special_tokens=False)["input_ids"])
        span = None
        if fact.subject:
            start = len(lead) + fact.prompt.find(fact.subject)
            end = start + len(fact.subject)
            inside = [
                i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < end and b > start and i < n_prompt
            ]
            span = (inside[0], inside[-1]) if inside else None
        return _Encoded(enc["input_ids"], n_prompt, span)

    def prefix(self) -> list[int]:
        t, rng = self.t, self.rng
        if rng.random() < t.prefix_fact_prob:
            text = self.texts[rng.randrange(len(self.texts))]
        else:
            n = rng.randint(0, t.prefix_max_words)
            text = " ".join([rng.choice(t.prefix_seeds), *(rng.choice(self.words) for _ in range(n))])
        return self.tok(text + ".", add_special_tokens=False)["input_ids"][-t.prefix_max_tokens :]

    def _row(self) -> tuple[list[int], list[float], tuple[int, int] | None, tuple[int, int]]:
        """One training sample: tokens, loss weights, the subject span to bottleneck (or None), and
        (subject's last token, answer's first token) for the lens loss ((-1, -1) if no subject)."""
        t, rng = self.t, self.rng
        i = rng.randrange(len(self.bare))
        if rng.random() < t.prefix_prob:
            pre, enc = self.bos + self.prefix(), self.spaced[i]
        else:
            pre, enc = list(self.bos), self.bare[i]
        seq = pre + enc.ids + [self.eos]
        w = (
            [0.0] * len(pre)
            + [t.prompt_weight] * enc.n_prompt
            + [t.answer_weight] * (len(enc.ids) - enc.n_prompt + 1)
        )
        span = None
        if enc.subject and enc.subject[1] > enc.subject[0] and rng.random() < t.subject_bottleneck:
            span = (enc.subject[0] + len(pre), enc.subject[1] + len(pre))
        cut = max(0, len(seq) - self.max_len)
        span = (span[0] - cut, span[1] - cut) if span and span[0] >= cut else None
        last = enc.subject[1] + len(pre) - cut if enc.subject else -1
        return seq[cut:], w[cut:], span, ((last, enc.ids[enc.n_prompt]) if last >= 0 else (-1, -1))

    def _refill(self) -> None:
        """``length_pool`` batches' worth of samples, sorted by length and cut into batches that
        are served in random order: the same samples as drawing batch by batch, far less padding."""
        t = self.t
        pool = [self._row() for _ in range(t.batch_size * max(1, t.length_pool))]
        if t.length_pool > 1:
            pool.sort(key=lambda row: len(row[0]))
        batches = [pool[i : i + t.batch_size] for i in range(0, len(pool), t.batch_size)]
        self.rng.shuffle(batches)
        self.pending = batches

    def batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        if not self.pending:
            self._refill()
        drawn = self.pending.pop()
        rows = [(seq, w, span) for seq, w, span, _ in drawn]
        lens = [lens for *_, lens in drawn]
        width = max(len(seq) for seq, _, _ in rows)
        ids = torch.full((len(rows), width), self.eos, dtype=torch.long)
        weights = torch.zeros((len(rows), width))
        mask = torch.tril(torch.ones(width, width, dtype=torch.bool)).repeat(len(rows), 1, 1)
        for r, (seq, w, span) in enumerate(rows):
            ids[r, : len(seq)] = torch.tensor(seq)
            weights[r, : len(w)] = torch.tensor(w)
            mask[r, :, len(seq) :] = False  # padding
            mask[r, len(seq) :, 0] = True  # (padded queries keep one key; their loss weight is 0)
            if span:
                mask[r, span[1] + 1 :, span[0] : span[1]] = False
        return ids, mask[:, None], weights, torch.tensor(lens, dtype=torch.long)


@torch.no_grad()
def toy_recall(
    model, tokenizer, facts: Sequence[ToyFact | tuple[str, str]], batch_size: int = 128
) -> dict[str, float]:
    """Top-1 recall of the facts on their bare prompts (ordinary causal attention).

    ``first_token``: the answer's first token is the argmax after the prompt; ``exact``: every
    answer token is the argmax given the gold prefix (teacher forcing).
    """
    model.eval()
    device = _device_of(model)
    pairs = [(f[0], f[1]) if isinstance(f, tuple) else (f.prompt, f.answer) for f in facts]
    first = exact = 0
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        prompts = tokenizer([p for p, _ in chunk])["input_ids"]
        fulls = tokenizer([f"{p} {a}" for p, a in chunk])["input_ids"]
        ids, mask = right_pad(fulls, tokenizer.pad_token_id)
        pred = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.argmax(-1).cpu()
        for r, (p, f) in enumerate(zip(prompts, fulls)):
            ok = [pred[r, j - 1].item() == f[j] for j in range(len(p), len(f))]
            first += bool(ok and ok[0])
            exact += bool(ok and all(ok))
    n = max(len(pairs), 1)
    return {"first_token": first / n, "exact": exact / n}


@contextmanager
def deterministic_training(threads: int):
    """Run the enclosed training on ``threads`` torch threads with deterministic algorithms, then
    restore both: the same data, settings and seed give the same weights whatever the machine's
    core count or the run's ``threads`` (CPU kernels split reductions by thread count)."""
    before_threads = torch.get_num_threads()
    before_det = torch.are_deterministic_algorithms_enabled()
    before_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(before_threads)
        torch.use_deterministic_algorithms(before_det, warn_only=before_warn)


def toy_steps(train: ToyTraining, n_sentences: int) -> int:
    """Optimiser steps: ``steps``, or more when ``min_epochs`` passes over ``n_sentences`` need them
    (so a toy trained on more cases sees each fact as often). Above ``epochs_grow_above`` sentences
    the passes grow as (n_sentences / epochs_grow_above) ** ``epochs_growth``: a toy of more facts
    needs more passes to learn each as well (measured at 25 passes: 89% exact recall of the
    200-case toy's 3,100 sentences, 47% of the 500-case toy's 7,424, whether its MLP is 512 or
    1,024 wide; 66% at 2.4 times the passes, 65% at 3.7 times, where MEMIT's efficacy and
    locality on the 500 cases rise from 89.2 / 85.1 to 93.2 / 88.0)."""
    if not train.min_epochs:
        return train.steps
    epochs = train.min_epochs
    if train.epochs_grow_above and n_sentences > train.epochs_grow_above:
        epochs *= (n_sentences / train.epochs_grow_above) ** train.epochs_growth
    return max(train.steps, math.ceil(epochs * n_sentences / train.batch_size))


def _recall_probe(facts: Sequence[ToyFact], limit: int | None) -> list[ToyFact]:
    """An evenly spaced subset of at most ``limit`` facts (all of them when ``limit`` is None)."""
    if limit is None or len(facts) <= limit:
        return list(facts)
    return [facts[i * len(facts) // limit] for i in range(limit)]


def toy_tokenizer(cfg: ModelConfig, facts: Sequence[ToyFact]) -> PreTrainedTokenizerBase:
    """The toy's byte-level BPE tokenizer, trained on its training sentences."""
    from runner.tokenizers import train_bpe

    _tokenizer_style(cfg)
    return train_bpe(
        [f.text for f in facts],
        vocab_size=cfg.tokenizer.vocab_size,
        style=cfg.architecture,
        min_frequency=cfg.tokenizer.min_frequency,
    )


def train_toy(
    cfg: ModelConfig,
    facts: Sequence[ToyFact],
    *,
    extra: Sequence[ToyFact] = (),
    seed: int,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict[str, Any]]:
    """Train the toy (on ``cfg.train.threads`` threads, deterministically: see
    :func:`deterministic_training`); ``tokenizer``: :func:`toy_tokenizer` of ``facts + extra``
    when already made."""
    with deterministic_training(cfg.train.threads):
        tokenizer = tokenizer if tokenizer is not None else toy_tokenizer(cfg, [*facts, *extra])
        model, info = _train_toy(cfg, facts, extra, seed, tokenizer)
    info["environment"] = training_environment(resolve_device(cfg.device)) | {"threads": cfg.train.threads}
    return model, tokenizer, info


def _train_toy(
    cfg: ModelConfig, facts: Sequence[ToyFact], extra: Sequence[ToyFact], seed: int, tokenizer
) -> tuple[PreTrainedModel, dict[str, Any]]:
    """Train the toy on ``facts`` and ``extra`` (see :func:`answer_space_facts`) with ``tokenizer``.

    Returns the model and a training report. Recipe (:data:`TOY_RECIPE`), each part
    measured to matter (see conf/model/toy.yaml):

    - tokenizer: byte-level BPE trained on the training sentences (``model.tokenizer.vocab_size``).
    - data: each sample is one sentence ``prompt + " " + answer`` + eos. With probability
      ``prefix_prob`` it follows a random prefix ending in ".": another training sentence
      (``prefix_fact_prob``) or a seed word ("The", "Therefore", ...) and random words. This is
      what the methods' context templates look like, it moves the subject to varied positions
      and puts distractor subjects and answers in context. Loss on the sentence, not the prefix.
      The ``extra`` sentences about made-up subjects make every ``target_new`` a possible answer.
    - subject bottleneck: while training, positions after the subject cannot attend to the
      subject's tokens other than its last one (a 4-D attention mask, on a share
      ``subject_bottleneck`` of the samples whose subject is known), so the subject is read
      where locate-then-edit methods read and write it. At inference the model is an ordinary
      causal LM.
    - subject lens: an auxiliary loss makes the output of block ``subject_lens_layer`` at the
      subject's last token predict the answer's first token through the model's own final norm
      and LM head (a logit lens), weighted ``subject_lens_weight``. The fact is then looked up
      in the early MLPs at the subject and carried in the residual stream, from where later
      positions copy it. Without it the prompt's last position looks the fact up itself and a
      change at the subject barely moves the prediction.
    - optimiser: AdamW, linear warm-up then cosine decay to ``min_lr_ratio``, grad clipping;
      deterministic given ``seed`` (weights and batch order). Early stop at ``stop_at_recall``.
    """
    from tqdm.auto import tqdm

    t = cfg.train
    everything = list(facts) + list(extra)
    model = build_tiny_model(cfg, tokenizer, seed)
    device = resolve_device(cfg.device)
    model.to(device)
    model.train()
    sampler = _ToySampler(cfg, everything, tokenizer, random.Random(seed))
    lens_layer = t.subject_lens_layer
    if lens_layer is not None and not 0 <= lens_layer < cfg.sizes.n_layer:
        raise ValueError(
            f"model.train.subject_lens_layer={lens_layer} is not a layer of a {cfg.sizes.n_layer}-layer model"
        )
    final_norm = model.get_submodule(cfg.final_norm)
    lm_head = model.get_submodule(cfg.lm_head)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=t.lr,
        betas=(0.9, 0.98),
    )

    steps = toy_steps(t, len(everything))

    def lr_at(step: int) -> float:
        if step < t.warmup:
            return t.lr * (step + 1) / t.warmup
        progress = (step - t.warmup) / max(1, steps - t.warmup)
        return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))

    start = time.time()
    history: list[dict[str, float]] = []
    recall: dict[str, float] = {}
    probe = _recall_probe(facts, None if t.stop_at_recall is not None else t.eval_facts)
    bar = tqdm(range(steps), desc=f"training toy ({len(facts)} facts)", disable=not t.progress)
    step = 0
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        ids, mask, wt, lens = (x.to(device) for x in sampler.batch())
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=lens_layer is not None)
        logits = out.logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
        ).view(ids.shape[0], -1)
        w = wt[:, 1:]
        loss = (nll * w).sum() / w.sum()
        rows = (lens[:, 0] >= 0).nonzero()[:, 0]
        if lens_layer is not None and len(rows):
            # logit lens at the subject's last token: the block's output must already say the answer
            hidden = out.hidden_states[lens_layer + 1][rows, lens[rows, 0]]
            lens_logits = lm_head(final_norm(hidden))
            loss = loss + t.subject_lens_weight * torch.nn.functional.cross_entropy(
                lens_logits, lens[rows, 1]
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        if (step + 1) % max(1, t.eval_every) == 0 or step + 1 == steps:
            recall = toy_recall(model, tokenizer, probe)
            model.train()
            history.append({"step": step + 1, "loss": round(loss.item(), 4), **recall})
            bar.set_postfix(loss=f"{loss.item():.3f}", recall=f"{recall['exact']:.3f}")
            if t.stop_at_recall is not None and recall["exact"] >= t.stop_at_recall:
                break
        elif step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    info = {
        "recipe": TOY_RECIPE,
        "n_facts": len(facts),
        "n_extra": len(extra),
        "steps": step + 1,
        "seconds": round(time.time() - start, 1),
        "recall": recall if len(probe) == len(facts) and recall else toy_recall(model, tokenizer, facts),
        "recall_extra": toy_recall(model, tokenizer, extra) if extra else None,
        "history": history,
        "seed": seed,
    }
    return model.cpu(), info
