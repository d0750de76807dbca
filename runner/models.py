"""Model loading: hub checkpoints, tiny random models, and the locally trained ``toy`` model.

``load_model(cfg, cases=..., cache_dir=..., seed=...)`` returns a :class:`LoadedModel` (model in eval
mode, tokenizer, :class:`~editors.spec.ModelSpec`, model id and revision, device). The source is
chosen by ``cfg.source``, never by looking at a model's name:

- ``hub``:  ``AutoModelForCausalLM`` / ``AutoTokenizer`` ``from_pretrained(hub_id, revision=...)``
  (``hub_id`` may also be a local directory written by ``save_pretrained``).
- ``tiny``: a randomly initialised model of ``architecture`` (GPT-2, GPT-J or LLaMA) built from
  ``sizes``, with a byte-level BPE tokenizer trained locally on the bundled data text. For tests.
- ``toy``:  a small GPT-2 trained locally on the TRUE facts of the run's cases, so that editing on
  a CPU means something (see :func:`train_toy` for the recipe). Cached on disk by a content hash
  of the training texts, the settings and :data:`TOY_RECIPE`; the second run loads it.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Sequence
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

from editors.requests import fill
from editors.spec import ModelSpec
from evaluation.cases import EditCase
from runner.tokenizers import atomic_dir, content_hash, load_or_train_tokenizer

__all__ = [
    "TOY_RECIPE",
    "LoadedModel",
    "ModelConfig",
    "ModelSizes",
    "TokenizerSettings",
    "ToyTraining",
    "build_tiny_model",
    "load_model",
    "model_spec",
    "resolve_device",
    "tokenizer_corpus",
    "toy_facts",
    "train_toy",
]

#: Bump when the toy training code changes in a way that changes the trained model.
TOY_RECIPE = "toy-v1"

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
    """How the ``toy`` model is trained on the true facts of the run's cases."""

    steps: int = 2000
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    batch_size: int = 32
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
    # Extra sentences per case that put the true answer right after the subject ("{}" is the
    # subject): they make the model look the fact up at the subject's last token.
    subject_templates: list[str] = field(default_factory=list)
    eval_every: int = 250
    stop_at_recall: float | None = None  # stop early once top-1 recall of the facts reaches this
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
    if not cfg.hub_id:
        raise ValueError(f"model {cfg.name!r}: source=hub needs model.hub_id")
    kwargs: dict[str, Any] = {"dtype": DTYPES[cfg.dtype]}
    if cfg.revision:
        kwargs["revision"] = cfg.revision
    if cfg.device_map:
        kwargs["device_map"] = cfg.device_map
    model = AutoModelForCausalLM.from_pretrained(cfg.hub_id, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(cfg.hub_id, **({"revision": cfg.revision} if cfg.revision else {}))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if not cfg.device_map:
        model.to(resolve_device(cfg.device))
    revision = getattr(model.config, "_commit_hash", None) or cfg.revision or "unknown"
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        spec=model_spec(cfg),
        model_id=cfg.hub_id,
        revision=str(revision),
        device=_device_of(model),
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
            texts.extend(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
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
    revision = content_hash({"arch": cfg.architecture, "sizes": asdict(cfg.sizes), "tokenizer": tok_key, "seed": seed})
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


def toy_facts(cases: Sequence[EditCase], subject_templates: Sequence[str] = ()) -> list[tuple[str, str]]:
    """(prompt, answer) pairs the toy learns: the TRUE facts behind the run's cases.

    For each case: the rewrite prompt and every paraphrase prompt with the pre-edit answer
    (``case.true_answer``, falling back to ``request.target_true``), and every neighborhood probe
    with its own target. Duplicates are dropped; the result is sorted, so the toy does not depend
    on the order of the cases. A prompt seen with two different answers keeps the first one
    (in case order).
    """
    seen: dict[str, str] = {}
    for case in cases:
        true = (getattr(case, "true_answer", "") or case.request.target_true).strip()
        pairs = [(case.request.text, true)]
        pairs += [(p.prompt, true) for p in case.probes.get("paraphrase", ())]
        pairs += [(p.prompt, p.target) for p in case.probes.get("neighborhood", ())]
        pairs += [(fill(t, case.request.subject), true) for t in subject_templates]
        for prompt, answer in pairs:
            if prompt.strip() and answer and prompt not in seen:
                seen[prompt] = answer
    return sorted(seen.items())


def _toy_key(cfg: ModelConfig, facts: list[tuple[str, str]], seed: int) -> str:
    return content_hash(
        {
            "recipe": TOY_RECIPE,
            "architecture": cfg.architecture,
            "sizes": asdict(cfg.sizes),
            "tokenizer": {"vocab_size": cfg.tokenizer.vocab_size, "min_frequency": cfg.tokenizer.min_frequency},
            "train": {k: v for k, v in asdict(cfg.train).items() if k != "progress"},
            "seed": seed,
            "facts": facts,
        }
    )


def _load_toy(cfg: ModelConfig, *, cases: Sequence[EditCase], cache_dir: Path, seed: int) -> LoadedModel:
    facts = toy_facts(cases, cfg.train.subject_templates)
    toy_seed = cfg.train.seed if cfg.train.seed is not None else seed
    key = _toy_key(cfg, facts, toy_seed)
    path = cache_dir / "toy" / f"{cfg.name}-{key}"
    trained = False
    if not (path / "toy_info.json").exists():
        model, tokenizer, info = train_toy(cfg, facts, seed=toy_seed)
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
    )


class _ToySampler:
    """Builds training batches: fact sentences, some behind a random prefix, loss on the fact only."""

    def __init__(self, cfg: ModelConfig, facts: list[tuple[str, str]], tokenizer, rng: random.Random):
        self.t = cfg.train
        self.rng = rng
        self.tok = tokenizer
        self.eos = tokenizer.eos_token_id
        self.max_len = cfg.sizes.max_positions
        texts = [f"{p} {a}" for p, a in facts]
        self.texts = texts
        enc = tokenizer([f"{p} {a}" for p, a in facts], add_special_tokens=False)["input_ids"]
        enc_sp = tokenizer([f" {p} {a}" for p, a in facts], add_special_tokens=False)["input_ids"]
        n_prompt = tokenizer([p for p, _ in facts], add_special_tokens=False)["input_ids"]
        n_prompt_sp = tokenizer([f" {p}" for p, _ in facts], add_special_tokens=False)["input_ids"]
        # (ids, number of prompt tokens) for the fact at the start of a text and after a prefix
        self.bare = [(ids, len(n)) for ids, n in zip(enc, n_prompt)]
        self.spaced = [(ids, len(n)) for ids, n in zip(enc_sp, n_prompt_sp)]
        self.words = sorted({w for text in texts for w in text.split()})
        bos = tokenizer("", add_special_tokens=True)["input_ids"]
        self.bos = bos  # [] for GPT-2 style, [BOS] for LLaMA style

    def prefix(self) -> list[int]:
        t, rng = self.t, self.rng
        if rng.random() < t.prefix_fact_prob:
            text = self.texts[rng.randrange(len(self.texts))]
        else:
            n = rng.randint(0, t.prefix_max_words)
            text = " ".join([rng.choice(t.prefix_seeds), *(rng.choice(self.words) for _ in range(n))])
        return self.tok(text + ".", add_special_tokens=False)["input_ids"][-t.prefix_max_tokens :]

    def batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        t, rng = self.t, self.rng
        rows, weights = [], []
        for _ in range(t.batch_size):
            i = rng.randrange(len(self.bare))
            if rng.random() < t.prefix_prob:
                pre = self.bos + self.prefix()
                ids, n_prompt = self.spaced[i]
            else:
                pre = list(self.bos)
                ids, n_prompt = self.bare[i]
            seq = (pre + ids + [self.eos])[-self.max_len :]
            w = [0.0] * len(pre) + [t.prompt_weight] * n_prompt + [t.answer_weight] * (len(ids) - n_prompt + 1)
            w = w[-self.max_len :]
            rows.append(seq)
            weights.append(w)
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.eos, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        wt = torch.zeros((len(rows), width))
        for r, (seq, w) in enumerate(zip(rows, weights)):
            ids[r, : len(seq)] = torch.tensor(seq)
            mask[r, : len(seq)] = 1
            wt[r, : len(w)] = torch.tensor(w)
        # a position's weight applies to predicting that token from the previous ones
        return ids, mask, wt


@torch.no_grad()
def toy_recall(model, tokenizer, facts: Sequence[tuple[str, str]], batch_size: int = 128) -> dict[str, float]:
    """Top-1 recall of the facts on their bare prompts.

    ``first_token``: the answer's first token is the argmax after the prompt; ``exact``: every
    answer token is the argmax given the gold prefix (teacher forcing).
    """
    model.eval()
    device = _device_of(model)
    first = exact = 0
    for start in range(0, len(facts), batch_size):
        chunk = facts[start : start + batch_size]
        prompts = tokenizer([p for p, _ in chunk])["input_ids"]
        fulls = tokenizer([f"{p} {a}" for p, a in chunk])["input_ids"]
        width = max(len(f) for f in fulls)
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, f in enumerate(fulls):
            ids[r, : len(f)] = torch.tensor(f)
            mask[r, : len(f)] = 1
        pred = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.argmax(-1).cpu()
        for r, (p, f) in enumerate(zip(prompts, fulls)):
            n = len(p)
            ok = [pred[r, j - 1].item() == f[j] for j in range(n, len(f))]
            first += bool(ok and ok[0])
            exact += bool(ok and all(ok))
    n = max(len(facts), 1)
    return {"first_token": first / n, "exact": exact / n}


def train_toy(
    cfg: ModelConfig, facts: list[tuple[str, str]], *, seed: int
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict[str, Any]]:
    """Train the toy model on ``facts`` ((prompt, answer) pairs). Returns model, tokenizer, report.

    Recipe (:data:`TOY_RECIPE`):

    - tokenizer: byte-level BPE trained on the fact sentences (``model.tokenizer.vocab_size``);
      a small vocabulary keeps subjects several tokens long, so the model has to assemble the
      subject at its last token (where locate-then-edit methods read and write) instead of
      looking it up from a single token embedding.
    - data: each sample is one fact sentence ``prompt + " " + answer`` + eos. With probability
      ``prefix_prob`` it follows a random prefix ending in ".": another fact sentence
      (``prefix_fact_prob``) or a seed word ("The", "Therefore", ...) and random words from the
      facts. This is what the methods' context templates look like, it moves the subject to
      varied positions, and it puts distractor subjects and answers in context so that the answer
      must come from the subject of the fact itself. Loss on the fact tokens (answer tokens
      weighted ``answer_weight``), none on the prefix.
    - optimiser: AdamW, linear warm-up then cosine decay to ``min_lr_ratio``, grad clipping;
      deterministic given ``seed`` (weights and batch order).
    """
    from tqdm.auto import tqdm

    t = cfg.train
    if cfg.architecture not in ARCHITECTURES:
        raise ValueError(f"model.architecture must be one of {ARCHITECTURES}, got {cfg.architecture!r}")
    from runner.tokenizers import train_bpe

    texts = [f"{p} {a}" for p, a in facts]
    tokenizer = train_bpe(
        texts, vocab_size=cfg.tokenizer.vocab_size, style=cfg.architecture, min_frequency=cfg.tokenizer.min_frequency
    )
    model = build_tiny_model(cfg, tokenizer, seed)
    device = resolve_device(cfg.device)
    model.to(device)
    model.train()
    rng = random.Random(seed)
    sampler = _ToySampler(cfg, facts, tokenizer, rng)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=t.lr,
        betas=(0.9, 0.98),
    )

    def lr_at(step: int) -> float:
        if step < t.warmup:
            return t.lr * (step + 1) / t.warmup
        progress = (step - t.warmup) / max(1, t.steps - t.warmup)
        return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))

    start = time.time()
    history: list[dict[str, float]] = []
    recall: dict[str, float] = {}
    bar = tqdm(range(t.steps), desc=f"training toy ({len(facts)} facts)", disable=not t.progress)
    step = 0
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        ids, mask, wt = (x.to(device) for x in sampler.batch())
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
        ).view(ids.shape[0], -1)
        w = wt[:, 1:]
        loss = (nll * w).sum() / w.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        if (step + 1) % max(1, t.eval_every) == 0 or step + 1 == t.steps:
            recall = toy_recall(model, tokenizer, facts)
            model.train()
            history.append({"step": step + 1, "loss": loss.item(), **recall})
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
        "steps": step + 1,
        "seconds": round(time.time() - start, 1),
        "recall": recall or toy_recall(model, tokenizer, facts),
        "history": history,
        "seed": seed,
    }
    return model.cpu(), tokenizer, info
