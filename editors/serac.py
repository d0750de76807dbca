"""SERAC (Mitchell et al., ICML 2022): an explicit edit memory, a scope classifier and a
counterfactual model, in front of an unchanged base model.

References read (no code copied): eric-mitchell/serac ``algs/rep.py``, ``trainer.py`` (the REP
edit step), ``losses.py``, ``config/alg/rep.yaml``; zjunlp/EasyEdit ``hparams/TRAINING/SERAC/*.yaml``;
MaybeLizzy/EditSSS (spec /work/shared/specs/sss_unlearning_merging.md §1.2-1.3: lr 1e-5, cedit
0.1, cloc 1.0, batch 3, accumulate 10, SSS ``l_edit ← C·SSS + (1−C)·l_edit``).

**Editing** adds each request to the memory: its classifier text (the filled prompt, without the
label: the reference cuts the label off GPT-style cache inputs) and its context for the
counterfactual model (``prompt + " " + target_new``, the reference's cache input). Nothing of the
base model changes.

**Routing** (the reference's ``forward`` with ``supervised: true``, hard routing): for each input row
the classifier embeds the row's text (its tokens decoded, prompt and answer alike, as the
reference decodes its GPT test inputs) and every memorised edit; the similarity is
``exp(−scale·d)``, d the squared Euclidean distance of the pooled embeddings (reference: ``cos:
false, square: true``, ``scale`` a fixed buffer of 1); ``distance: cosine`` uses 1 − cos. The most
similar edit wins; if its similarity exceeds ``threshold`` (0.5) the row's logits are the
counterfactual model's on ``context + separator + row``, read back at the row's own positions
(position j of the row is position len(context) + j of the counterfactual input; a leading BOS maps
to the context's last token, which predicts the row's first real token just as the BOS does);
otherwise the base model's logits, untouched. The scorer's per-position reads therefore work
unchanged, with ``pack=False`` (``changes_forward``).

**Training** (``train_artifact``, one artifact ``serac``: classifier + counterfactual model, trained
together on the train split with ``editors.training.fit``): per batch of ``batch_size`` edits, an
in-scope row per edit (a paraphrase prompt + " " + target_new; the rewrite prompt when a case has
none) and an out-of-scope row (a neighbourhood prompt + its answer).

- ``supervised: true`` (the original repo's default): ``l_edit`` = the counterfactual model's NLL of
  target_new on the in-scope row with its own edit in context; ``l_loc`` = the balanced BCE of the
  classifier (positives: in-scope row vs its edit; negatives: out-of-scope row vs its case's edit,
  and with ``use_all_negatives`` vs every edit of the batch).
- ``supervised: false`` (EasyEdit's hparams): soft mixing, p = (1 − s)·p_base + s·p_cntr with s the
  best similarity; ``l_edit`` = NLL of the mixture on the in-scope rows, ``l_loc`` = KL(p_base ‖
  mixture) on the out-of-scope rows' answer tokens (gradients reach both networks through s).

SSS (serac_sss): ``l_edit ← C·SSS + (1 − C)·l_edit`` with SSS = ‖∂l_edit/∂H‖², H the counterfactual
model's last hidden states on the in-scope rows (training only), then ``cedit·l_edit + cloc·l_loc``.

**Networks.** ``classifier``: a hub encoder (reference ``cls_name: distilbert-base-cased``, its own
tokenizer, CLS pooling as the reference for BERT) or, ``null`` (offline), a small BERT encoder
built here on the base model's tokenizer (word embeddings copied from the base model when the
widths agree; mean pooling). ``counterfactual``: a hub causal LM sharing the base model's tokenizer
(EasyEdit: gpt2 for gpt2-xl) or ``null``: a copy of the base model (EditSSS sets ``small_name`` to
the model itself; for the toy it is the only model that knows its vocabulary and facts).

**Generation** (``model.generate``) is routed per prompt: rows in scope generate from the
counterfactual model with the edit in context, the rest from the base model; the returned ids are
prompt + continuation as usual.

**Save/load** (``save_model=true``, ``runner.export.save_edited`` / ``load_edited``): the router is a
model-level router of ``runner.export``. The folder holds the base model's own checkpoint (the
router's overrides are lifted while ``save_pretrained`` runs) and, in ``routers/r<i>/``, the router:
``classifier/`` and ``counterfactual/`` (``save_pretrained`` folders, as the artifact's),
``router.json`` (the :class:`SeracConfig` and the memory: each edit's case id, scope text, context
and target) and ``keys.safetensors`` (the memory's classifier embeddings, so routing is bit-exact).
Loading rebuilds the router on the base model with the saved tokenizer and installs it: the same
logits and the same routes as the edited model. ``model.save_pretrained`` on a model with the router
installed is refused in one line (it would drop the edits). Routing is per whole row, so the
scorer's packed rows (a 4-D attention mask; several sequences share a prompt) are refused in one
line: a reloaded model is scored with ``pack=False``, as the runner scores its own SERAC edits (a
run on a saved folder, ``model.hub_id=<it>``, stops there while the runner scores loaded models packed).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import random
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from editors.base import Artifact, EditorBase, recipe_json
from editors.core.tokens import pad_id, right_pad
from editors.requests import EditRequest
from editors.training import LoopConfig, fit, mix_sss
from editors.training.losses import SSS_REDUCTIONS

log = logging.getLogger(__name__)

ARTIFACT = "serac"
DISTANCES = ("squared_euclidean", "euclidean", "cosine")
POOLINGS = ("mean", "cls")
_EPS = torch.finfo(torch.float32).eps
_ROUTER = "_serac_router"  # instance attribute of a model a SERAC edit is attached to
_OVERRIDES = ("generate", "get_output_embeddings", "save_pretrained")  # model methods the router replaces
ROUTER_JSON = "router.json"  # a saved router: its config and memory
KEYS_TENSORS = "keys.safetensors"  # a saved router: the memory's classifier embeddings


@dataclass
class SeracConfig:
    """SERAC settings (reference names: eric-mitchell/serac config, EasyEdit hparams/TRAINING/SERAC)."""

    _target_: str = "editors.serac.Serac"
    # scope classifier (reference rep.cls_name / cls_class AutoModel); null: a small encoder built here
    classifier: str | None = None
    classifier_layers: int = 2  # offline encoder: BERT layers
    classifier_hidden: int | None = None  # offline encoder width (null: the base model's; embeddings copied)
    classifier_heads: int = 4  # offline encoder attention heads
    pooling: str | None = (
        None  # mean | cls (null: cls for a hub encoder, the reference's BERT rule; else mean)
    )
    distance: str = "squared_euclidean"  # reference cos: false, square: true | euclidean | cosine
    scale: float = 1.0  # similarity exp(−scale·d) (reference: the fixed buffer `scale` = 1.0)
    threshold: float = 0.5  # in scope when the best similarity exceeds it (reference: 0.5)
    # counterfactual model (reference model.small_name); null: a copy of the base model
    counterfactual: str | None = None
    separator: str = " "  # between the edit context and the input (reference: " ")
    supervised: bool = (
        True  # classifier BCE + counterfactual NLL (serac rep.yaml) | false: soft mixture (EasyEdit)
    )
    use_all_negatives: bool = False  # reference rep.use_all_negatives: out-of-scope rows vs every edit
    # in-scope rows vs the batch's other edits are negatives too (reference: only locality rows)
    cross_negatives: bool = True
    train_on_rewrite: bool = (
        False  # also the edit's own prompt as an in-scope row (the reference: paraphrases only)
    )
    # training (reference: lr 1e-5, cedit 0.1, cloc 1.0, batch_size 3 (EditSSS), accumulate_bs 10,
    # Adam, grad_clip 100, max_iters 100000, val_interval 1000, early_stop_patience 40000)
    train_data: dict = field(default_factory=lambda: {"name": "counterfact_train"})
    lr: float = 1e-5
    classifier_lr: float | None = None  # null: lr (the reference has one lr for both networks)
    cedit: float = 0.1
    cloc: float = 1.0
    batch_size: int = 3  # edits per batch
    accumulate: int = 10  # batches per optimiser step (reference accumulate_bs)
    max_steps: int = 100000  # optimiser steps (reference max_iters)
    grad_clip: float | None = 100.0
    val_cases: int = 100  # held out from the end of the train split for validation
    val_every: int = 1000  # steps between validations (reference val_interval)
    patience: int | None = 40000  # steps without a better validation loss (reference early_stop_patience)
    checkpoint_every: int = 200  # steps between checkpoints (resume after an interruption)
    max_length: int = 128  # tokens per classifier input
    seed: int = 0
    sss_coefficient: float = 0.0  # C of serac_sss (0: plain SERAC)
    sss_reduction: str = "sum"  # sum (EditSSS) | mean over loss-bearing positions

    def __post_init__(self) -> None:
        if self.distance not in DISTANCES:
            raise ValueError(f"serac distance must be one of {DISTANCES}, got {self.distance!r}")
        if self.pooling is not None and self.pooling not in POOLINGS:
            raise ValueError(f"serac pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.sss_reduction not in SSS_REDUCTIONS:
            raise ValueError(
                f"serac sss_reduction must be one of {SSS_REDUCTIONS}, got {self.sss_reduction!r}"
            )
        if not 0 <= self.sss_coefficient <= 1:
            raise ValueError(f"serac sss_coefficient must be in [0, 1], got {self.sss_coefficient}")
        if self.batch_size < 1:
            raise ValueError(f"serac batch_size must be at least 1, got {self.batch_size}")

    @property
    def pooling_rule(self) -> str:
        return self.pooling or ("cls" if self.classifier else "mean")

    def recipe(self) -> dict:
        """What the trained weights depend on: everything but the routing threshold."""
        out = asdict(self)
        for key in ("_target_", "threshold"):
            out.pop(key)
        return out


# --------------------------------------------------------------------------------------------
# the scope classifier


class ScopeClassifier(nn.Module):
    """An encoder whose pooled embeddings give the similarity of (edit, input) text pairs."""

    def __init__(self, encoder: nn.Module, tokenizer, cfg: SeracConfig) -> None:
        super().__init__()
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.pooling = cfg.pooling_rule
        self.distance = cfg.distance
        self.scale = cfg.scale
        self.max_length = cfg.max_length

    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """[N, d] pooled embeddings of ``texts``."""
        rows = [list(ids)[: self.max_length] for ids in self.tokenizer(list(texts))["input_ids"]]
        rows = [r if r else [pad_id(self.tokenizer)] for r in rows]
        ids, mask = right_pad(rows, pad_id(self.tokenizer))
        device = self.device()
        hidden = self.encoder(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0].float()
        m = mask.to(device)[..., None].to(hidden.dtype)
        return ((hidden * m).sum(1) / m.sum(1)).float()

    def log_similarity(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """[Q, K] log-similarities −scale·d (≤ 0) of query and key embeddings."""
        if self.distance == "cosine":
            d = 1 - F.cosine_similarity(queries[:, None], keys[None], dim=-1)
        else:
            d = (queries[:, None] - keys[None]).pow(2).sum(-1)
            if self.distance == "euclidean":
                d = (d + 1e-12).sqrt()
        return -self.scale * d.clamp(min=0)


def _offline_encoder(model: nn.Module, tokenizer, cfg: SeracConfig) -> nn.Module:
    """A small BERT on the base tokenizer; word embeddings from the base model when widths agree."""
    from transformers import BertConfig, BertModel

    base_embed = model.get_input_embeddings().weight
    hidden = cfg.classifier_hidden or base_embed.shape[1]
    heads = cfg.classifier_heads if hidden % cfg.classifier_heads == 0 else 1
    bert = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=cfg.classifier_layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        max_position_embeddings=cfg.max_length,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=pad_id(tokenizer),
    )
    torch.manual_seed(cfg.seed)
    encoder = BertModel(bert, add_pooling_layer=False)
    if hidden == base_embed.shape[1]:
        with torch.no_grad():
            n = min(len(tokenizer), base_embed.shape[0])
            encoder.embeddings.word_embeddings.weight[:n].copy_(base_embed[:n].float())
    return encoder


def _hub_classifier(name: str):
    from transformers import AutoModel, AutoTokenizer

    encoder = AutoModel.from_pretrained(name)
    if hasattr(encoder, "pooler"):
        encoder.pooler = None  # the reference drops BERT's pooler (its CLS state is used)
    return encoder, AutoTokenizer.from_pretrained(name)


def _counterfactual(model: nn.Module, cfg: SeracConfig) -> nn.Module:
    if cfg.counterfactual is None:
        cf = copy.deepcopy(model)
    else:
        from transformers import AutoModelForCausalLM

        cf = AutoModelForCausalLM.from_pretrained(cfg.counterfactual)
    device = next(model.parameters()).device
    return cf.to(device=device, dtype=torch.float32)


# --------------------------------------------------------------------------------------------
# inputs of the counterfactual model


@dataclass
class MemoryEntry:
    case_id: str
    scope_text: str  # what the classifier compares inputs with (the filled prompt)
    context: str  # what the counterfactual model sees before the input
    target_new: str


def _entry(request: EditRequest) -> MemoryEntry:
    text = request.text
    return MemoryEntry(request.case_id, text, f"{text} {request.target_new}", request.target_new)


def _lead(tokenizer, ids: Sequence[int]) -> int:
    """1 when the row starts with the tokenizer's BOS (LLaMA), else 0."""
    bos = tokenizer.bos_token_id
    return 1 if bos is not None and len(ids) > 0 and int(ids[0]) == bos and len(ids) > 1 else 0


def _context_ids(tokenizer, context: str, separator: str) -> list[int]:
    return list(tokenizer(context + separator, add_special_tokens=True)["input_ids"])


def _joined(
    tokenizer,
    contexts: Sequence[list[int]],
    rows: Sequence[Sequence[int]],
    device,
    max_positions: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Counterfactual inputs ``context + row`` (right-padded ids and mask) and, per row position,
    the counterfactual position whose logits stand for it ([B, max row length])."""
    seqs, maps = [], []
    for ctx, row in zip(contexts, rows):
        row = [int(t) for t in row]
        lead = _lead(tokenizer, row)
        room = max_positions - (len(row) - lead) if max_positions else len(ctx)
        if room < len(ctx):  # too long for the counterfactual model: the context loses its start
            if room < 1:
                raise ValueError(f"an input of {len(row)} tokens leaves no room for a SERAC edit context")
            ctx = ctx[len(ctx) - room :]
        seqs.append(list(ctx) + row[lead:])
        maps.append([len(ctx) - 1] * lead + [len(ctx) + j - lead for j in range(lead, len(row))])
    ids, mask = right_pad(seqs, pad_id(tokenizer))
    where, _ = right_pad(maps, 0)
    return ids.to(device), mask.to(device), where.to(device)


def _fit_vocab(logits: torch.Tensor, vocab: int) -> torch.Tensor:
    """Counterfactual logits cut or padded (with the dtype's minimum) to the base vocabulary."""
    n = logits.shape[-1]
    if n == vocab:
        return logits
    if n > vocab:
        return logits[..., :vocab]
    pad = logits.new_full((*logits.shape[:-1], vocab - n), torch.finfo(logits.dtype).min)
    return torch.cat([logits, pad], dim=-1)


def _max_positions(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def counterfactual_logits(
    cf: nn.Module,
    tokenizer,
    contexts: Sequence[list[int]],
    rows: Sequence[Sequence[int]],
    vocab: int,
    hidden: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[B, T, V] counterfactual logits at each row's own positions (T: longest row), and with
    ``hidden`` the counterfactual model's last hidden states [B, T', d] (for SSS)."""
    device = next(cf.parameters()).device
    ids, mask, where = _joined(tokenizer, contexts, rows, device, _max_positions(cf))
    out = cf(input_ids=ids, attention_mask=mask, output_hidden_states=hidden, use_cache=False)
    picked = out.logits.gather(1, where[..., None].expand(-1, -1, out.logits.shape[-1]))
    return _fit_vocab(picked, vocab), (out.hidden_states[-1] if hidden else None)


# --------------------------------------------------------------------------------------------
# the edited model: routing in place


class SeracRouter:
    """Routes the forward passes (and ``generate``) of ``model``: installed once on a model, its
    memory grows with sequential edits (each :class:`SeracHandle` swaps the memory it saw back)."""

    def __init__(self, model, tokenizer, classifier, counterfactual, cfg: SeracConfig) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.classifier = classifier
        self.counterfactual = counterfactual
        self.cfg = cfg
        self.memory: tuple[MemoryEntry, ...] = ()
        self.keys: torch.Tensor | None = None  # [M, d] classifier embeddings of the memory
        self.contexts: list[list[int]] = []
        self.bypass = False
        self.last_routes: list[int] = []  # per row of the last forward: memory index, or -1 (base)
        self._hooks = []

    # -- memory
    def set_memory(self, memory: tuple[MemoryEntry, ...], keys: torch.Tensor | None) -> None:
        self.memory = memory
        self.keys = keys
        self.contexts = [_context_ids(self.tokenizer, e.context, self.cfg.separator) for e in memory]

    # -- install / remove
    def install(self) -> None:
        self._hooks = [self.model.register_forward_hook(self._hook, with_kwargs=True)]
        d = self.model.__dict__
        d[_ROUTER] = self
        d["generate"] = self.generate
        d["get_output_embeddings"] = lambda: None  # the scorer then reads full logits (ours)
        d["save_pretrained"] = self._refuse_save

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for key in (_ROUTER, *_OVERRIDES):
            self.model.__dict__.pop(key, None)

    def _refuse_save(self, *args, **kwargs):
        raise RuntimeError(
            "SERAC: model.save_pretrained would save the base model without its edits; "
            "use runner.export.save_edited (save_model=true)"
        )

    # -- storage (the model-level router protocol of runner.export)
    @contextmanager
    def detached(self) -> Iterator[None]:
        """The base model's own methods while the block runs (``save_pretrained`` of the base
        checkpoint); the forward hook stays (saving runs no forward pass), the overrides come back."""
        d = self.model.__dict__
        lifted = {key: d.pop(key) for key in _OVERRIDES if key in d}
        try:
            yield
        finally:
            d.update(lifted)

    def save_router(self, folder: Path) -> None:
        """Write the classifier, the counterfactual model, the config and the memory to ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_serac(folder, self.classifier, self.counterfactual, self.cfg)
        state = {"config": asdict(self.cfg), "memory": [asdict(e) for e in self.memory]}
        (folder / ROUTER_JSON).write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
        if self.keys is not None:
            save_file({"keys": self.keys.detach().cpu().contiguous()}, str(folder / KEYS_TENSORS))

    @classmethod
    def rebuild_router(cls, model: nn.Module, tokenizer, folder: Path) -> SeracRouter:
        """The router saved in ``folder`` by :meth:`save_router`, installed on ``model``."""
        folder = Path(folder)
        if model.__dict__.get(_ROUTER) is not None:
            raise ValueError(f"{folder}: the model already has a SERAC router installed")
        if tokenizer is None:
            raise ValueError(f"{folder}: a SERAC router needs the base model's tokenizer to load")
        state = json.loads((folder / ROUTER_JSON).read_text(encoding="utf-8"))
        cfg = SeracConfig(**state["config"])
        classifier, cf = load_serac(folder, model, tokenizer, cfg)
        memory = tuple(MemoryEntry(**e) for e in state["memory"])
        keys = None
        if memory:
            keys = load_file(str(folder / KEYS_TENSORS))["keys"].to(classifier.device())
            if keys.shape[0] != len(memory):
                raise ValueError(
                    f"{folder}: {keys.shape[0]} classifier keys for {len(memory)} memorised edits"
                )
        router = cls(model, tokenizer, classifier, cf, cfg)
        router.set_memory(memory, keys)
        router.install()
        return router

    # -- routing
    @torch.no_grad()
    def route(self, rows: Sequence[Sequence[int]]) -> list[int]:
        """Per row (valid token ids): the index of the memorised edit in scope, or -1."""
        if not self.memory or not rows:
            return [-1] * len(rows)
        texts = [self.tokenizer.decode(list(r), skip_special_tokens=True) for r in rows]
        was = self.classifier.training
        self.classifier.eval()
        try:
            queries = self.classifier.embed(texts)
        finally:
            self.classifier.train(was)
        sims = self.classifier.log_similarity(queries, self.keys.to(queries.device)).exp()
        best, index = sims.max(-1)
        return [int(i) if float(s) > self.cfg.threshold else -1 for s, i in zip(best, index)]

    def _hook(self, module, args, kwargs, output):
        if self.bypass or not self.memory:
            return None
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            raise RuntimeError("SERAC routes on input_ids (inputs_embeds cannot be routed)")
        past = kwargs.get("past_key_values")
        if past is not None and (not hasattr(past, "get_seq_length") or past.get_seq_length() > 0):
            raise RuntimeError(
                "SERAC routes whole sequences: incremental decoding goes through model.generate"
            )
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 4:  # the scorer's packed rows (several sequences a row)
            raise RuntimeError("SERAC routes whole rows: score this model unpacked (pack=False)")
        if mask is None or mask.dim() != 2:
            mask = torch.ones_like(ids)
        logits = output.logits
        if logits.dim() != 3 or logits.shape[:2] != ids.shape:
            raise RuntimeError("SERAC needs the full logits of every position")
        valid = [torch.nonzero(mask[b]).flatten() for b in range(ids.shape[0])]
        rows = [ids[b, v].tolist() for b, v in enumerate(valid)]
        routes = self.route(rows)
        self.last_routes = routes
        chosen = [b for b, r in enumerate(routes) if r >= 0]
        if not chosen:
            return None
        was = self.counterfactual.training
        self.counterfactual.eval()
        try:
            with torch.no_grad():
                cf, _ = counterfactual_logits(
                    self.counterfactual,
                    self.tokenizer,
                    [self.contexts[routes[b]] for b in chosen],
                    [rows[b] for b in chosen],
                    logits.shape[-1],
                )
        finally:
            self.counterfactual.train(was)
        logits = logits.clone()
        for k, b in enumerate(chosen):
            v = valid[b].to(logits.device)
            logits[b, v] = cf[k, : len(v)].to(device=logits.device, dtype=logits.dtype)
        output.logits = logits
        return output

    def generate(self, *args, input_ids=None, attention_mask=None, **kwargs):
        """Per row: the counterfactual model with the edit in context, or the base model."""
        cls_generate = type(self.model).generate
        if args:
            raise TypeError("SERAC generate takes keyword arguments only")
        if input_ids is None:
            raise RuntimeError("SERAC generate needs input_ids")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        valid = [torch.nonzero(attention_mask[b]).flatten() for b in range(input_ids.shape[0])]
        rows = [input_ids[b, v].tolist() for b, v in enumerate(valid)]
        routes = self.route(rows)
        self.last_routes = routes
        width = input_ids.shape[1]
        pad = kwargs.get("pad_token_id")
        pad = pad_id(self.tokenizer) if pad is None else pad
        results: dict[int, torch.Tensor] = {}
        base_rows = [b for b, r in enumerate(routes) if r < 0]
        if base_rows:
            self.bypass = True
            try:
                out = cls_generate(
                    self.model,
                    input_ids=input_ids[base_rows],
                    attention_mask=attention_mask[base_rows],
                    **kwargs,
                )
            finally:
                self.bypass = False
            for k, b in enumerate(base_rows):
                results[b] = out[k, width:]
        cf_rows = [b for b, r in enumerate(routes) if r >= 0]
        if cf_rows:
            seqs = [self.contexts[routes[b]] + rows[b][_lead(self.tokenizer, rows[b]) :] for b in cf_rows]
            cw = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), cw), pad, dtype=torch.long)
            mask = torch.zeros((len(seqs), cw), dtype=torch.long)
            for k, s in enumerate(seqs):  # left padding, as the caller's
                ids[k, cw - len(s) :] = torch.tensor(s)
                mask[k, cw - len(s) :] = 1
            device = next(self.counterfactual.parameters()).device
            was = self.counterfactual.training
            self.counterfactual.eval()
            try:
                out = self.counterfactual.generate(
                    input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs
                )
            finally:
                self.counterfactual.train(was)
            for k, b in enumerate(cf_rows):
                results[b] = out[k, cw:].to(input_ids.device)
        longest = max(len(t) for t in results.values())
        new = torch.full((input_ids.shape[0], longest), pad, dtype=input_ids.dtype, device=input_ids.device)
        for b, t in results.items():
            new[b, : len(t)] = t
        return torch.cat([input_ids, new], dim=1)


def _params_version(model: nn.Module) -> dict:
    return {n: (p, p._version) for n, p in model.named_parameters()}


class SeracHandle:
    """A SERAC memory attached to a model (routing in place; see the module docstring)."""

    changes_forward = True

    def __init__(self, model, router: SeracRouter, installed: bool, previous, before: dict) -> None:
        self.model = model
        self.router = router
        self.installed = installed  # this handle installed the router (else it swapped the memory)
        self.previous = previous  # (memory, keys) before this handle
        self._before = before

    def merge(self, later):
        from editors.patch import HandleStack

        return HandleStack([self]).merge(later)

    def restore(self) -> None:
        from editors.patch import _fingerprint

        if self.installed:
            self.router.remove()
        else:
            self.router.set_memory(*self.previous)
        after = _fingerprint(self.model)
        if after != self._before["fingerprint"]:
            raise RuntimeError("restore of a SERAC edit did not give back the same module tree and hooks")
        if self.installed and any(k in self.model.__dict__ for k in (_ROUTER, *_OVERRIDES)):
            raise RuntimeError("restore of a SERAC edit left attributes on the model")
        current = dict(self.model.named_parameters())
        for name, (param, version) in self._before["params"].items():
            if current.get(name) is not param or param._version != version:
                raise RuntimeError(f"restore of a SERAC edit: parameter {name} is not bit-exact")


@dataclass
class SeracEdit:
    memory: tuple[MemoryEntry, ...]
    keys: torch.Tensor
    editor: Serac
    tokenizer: Any
    diagnostics: dict[str, float] = field(default_factory=dict)
    case_diagnostics: dict[str, list[float]] = field(default_factory=dict)

    def attach(self, model: nn.Module) -> SeracHandle:
        from editors.patch import _fingerprint

        before = {"fingerprint": _fingerprint(model), "params": _params_version(model)}
        router = model.__dict__.get(_ROUTER)
        if router is None:
            router = SeracRouter(
                model, self.tokenizer, self.editor.classifier, self.editor.counterfactual, self.editor.config
            )
            router.set_memory(self.memory, self.keys)
            router.install()
            return SeracHandle(model, router, True, None, before)
        previous = (router.memory, router.keys)
        router.set_memory(self.memory, self.keys)
        return SeracHandle(model, router, False, previous, before)


# --------------------------------------------------------------------------------------------
# the editor


@dataclass
class _Example:
    entry: MemoryEntry
    inscope: list[tuple[str, str]]  # (prompt, answer) rows in the edit's scope
    outscope: tuple[str, str] | None  # (prompt, answer) out of it


def _examples(cases: Sequence[Any], rng: random.Random, rewrite: bool = False) -> list[_Example]:
    """One in-scope row per case (a paraphrase; with ``rewrite`` also the edit's own prompt) and one
    out-of-scope row (a neighbourhood prompt)."""
    out = []
    for case in cases:
        request = case.request
        para = list(case.probes.get("paraphrase", ()))
        loc = list(case.probes.get("neighborhood", ()))
        prompt = rng.choice(para).prompt if para else request.text
        neighbour = rng.choice(loc) if loc else None
        out.append(
            _Example(
                _entry(request),
                [(prompt, request.target_new)]
                + ([(request.text, request.target_new)] if rewrite and para else []),
                (neighbour.prompt, neighbour.target) if neighbour else None,
            )
        )
    return out


def _balanced_bce(log_sims: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The reference's balanced BCE on log-probabilities: mean positive NLL + mean negative NLL."""
    pos = log_sims[labels == 1]
    neg = log_sims[labels == 0]
    loss = log_sims.new_zeros(())
    if pos.numel():
        loss = loss - pos.mean()
    if neg.numel():
        loss = loss - torch.log((1 - neg.exp()).clamp(min=_EPS)).mean()
    return loss


class Serac(EditorBase):
    def __init__(self, config: SeracConfig, spec: Any) -> None:
        super().__init__(config, spec)
        self.classifier: ScopeClassifier | None = None
        self.counterfactual: nn.Module | None = None

    # -- artifacts
    def requirements(self) -> list:
        return [Artifact(ARTIFACT, recipe_json(self.config.recipe()), recipe_json(self.config.train_data))]

    def _build(self, model: nn.Module, tokenizer) -> tuple[ScopeClassifier, nn.Module]:
        cfg = self.config
        device = next(model.parameters()).device
        if cfg.classifier is None:
            encoder, ctok = _offline_encoder(model, tokenizer, cfg), tokenizer
        else:
            encoder, ctok = _hub_classifier(cfg.classifier)
        classifier = ScopeClassifier(encoder.to(device=device, dtype=torch.float32), ctok, cfg)
        return classifier, _counterfactual(model, cfg)

    def train_artifact(self, artifact, model, tokenizer, cases, folder: Path, checkpoints: Path) -> dict:
        cfg = self.config
        if artifact.name != ARTIFACT:
            return super().train_artifact(artifact, model, tokenizer, cases, folder, checkpoints)
        start = time.perf_counter()
        classifier, cf = self._build(model, tokenizer)
        capped = replace(cfg, max_steps=self.train_steps(cfg.max_steps))  # artifact_max_steps
        report = train_serac(
            capped, model, tokenizer, classifier, cf, list(cases), checkpoints, self.progress
        )
        save_serac(folder, classifier, cf, cfg)
        report["seconds"] = round(time.perf_counter() - start, 1)
        return report

    def prepare(self, model, tokenizer, resources) -> None:
        super().prepare(model, tokenizer, resources)
        self.classifier, self.counterfactual = load_serac(
            self.artifact(ARTIFACT), model, tokenizer, self.config
        )

    # -- editing
    def apply(self, model, tokenizer, requests: Sequence[EditRequest]) -> SeracEdit:
        if self.classifier is None or self.counterfactual is None:
            raise RuntimeError("SERAC: prepare() has not loaded the classifier and counterfactual model")
        router = model.__dict__.get(_ROUTER)
        old = router.memory if router is not None else ()
        old_keys = router.keys if router is not None else None
        new = tuple(_entry(r) for r in requests)
        was = self.classifier.training
        self.classifier.eval()
        with torch.no_grad():
            keys = self.classifier.embed([e.scope_text for e in new])
        self.classifier.train(was)
        if old_keys is not None and len(old):
            keys = torch.cat([old_keys.to(keys.device), keys])
        self.record(requests)
        return SeracEdit(
            old + new, keys, self, tokenizer, diagnostics={"serac_memory": float(len(old) + len(new))}
        )


# --------------------------------------------------------------------------------------------
# storage


def save_serac(folder: Path, classifier: ScopeClassifier, cf: nn.Module, cfg: SeracConfig) -> None:
    folder = Path(folder)
    classifier.encoder.save_pretrained(folder / "classifier", safe_serialization=True)
    if cfg.classifier is not None:
        classifier.tokenizer.save_pretrained(folder / "classifier")
    cf.save_pretrained(folder / "counterfactual", safe_serialization=True)
    meta = {
        "classifier": cfg.classifier or "offline BERT on the base tokenizer",
        "counterfactual": cfg.counterfactual,
    }
    (folder / "serac.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def load_serac(
    folder: Path, model: nn.Module, tokenizer, cfg: SeracConfig
) -> tuple[ScopeClassifier, nn.Module]:
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    device = next(model.parameters()).device
    if cfg.classifier is None:
        from transformers import BertModel

        encoder = BertModel.from_pretrained(folder / "classifier", add_pooling_layer=False)
    else:
        encoder = AutoModel.from_pretrained(folder / "classifier")
        if hasattr(encoder, "pooler"):
            encoder.pooler = None
    encoder = encoder.to(device=device, dtype=torch.float32)
    ctok = tokenizer if cfg.classifier is None else AutoTokenizer.from_pretrained(folder / "classifier")
    classifier = ScopeClassifier(encoder, ctok, cfg).eval()
    cf = AutoModelForCausalLM.from_pretrained(folder / "counterfactual").to(
        device=device, dtype=torch.float32
    )
    for p in list(classifier.parameters()) + list(cf.parameters()):
        p.requires_grad_(False)
    return classifier, cf.eval()


# --------------------------------------------------------------------------------------------
# training


@dataclass
class _Batch:
    examples: list[_Example]

    @property
    def size(self) -> int:
        return len(self.examples)


def _answer_rows(tokenizer, pairs: Sequence[tuple[str, str]]):
    from evaluation.scoring import tokenize_answers

    return tokenize_answers(tokenizer, list(pairs))


def _gather_answers(logits: torch.Tensor, seqs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per answer token: (batch row, its log-probs [N, V], gold id [N]) read at the position before it."""
    rows, cols, gold = [], [], []
    for i, s in enumerate(seqs):
        for p, is_answer in enumerate(s.answer_mask):
            if is_answer:
                rows.append(i)
                cols.append(p - 1)
                gold.append(s.input_ids[p])
    device = logits.device
    rows_t = torch.tensor(rows, device=device)
    picked = logits[rows_t, torch.tensor(cols, device=device)].float()
    return rows_t, picked, torch.tensor(gold, device=device)


def _row_mean(values: torch.Tensor, rows: torch.Tensor, n: int) -> torch.Tensor:
    """Mean over rows of each row's mean of ``values`` (per answer token)."""
    total = values.new_zeros(n).index_add(0, rows, values)
    count = values.new_zeros(n).index_add(0, rows, torch.ones_like(values))
    keep = count > 0
    return (total[keep] / count[keep]).mean()


class SeracLoss:
    """The training objective of one batch (see the module docstring); ``parts`` keeps the last values."""

    def __init__(self, cfg, model, tokenizer, classifier: ScopeClassifier, cf: nn.Module) -> None:
        self.cfg, self.model, self.tokenizer = cfg, model, tokenizer
        self.classifier, self.cf = classifier, cf
        self.vocab = int(model.get_input_embeddings().weight.shape[0])  # the base vocabulary (tied or not)
        self.parts: dict[str, float] = {}
        self._contexts: dict[str, list[int]] = {}

    def contexts(self, entries: Sequence[MemoryEntry]) -> list[list[int]]:
        out = []
        for e in entries:
            if e.context not in self._contexts:
                self._contexts[e.context] = _context_ids(self.tokenizer, e.context, self.cfg.separator)
            out.append(self._contexts[e.context])
        return out

    def _base_logits(self, seqs) -> torch.Tensor:
        device = next(self.model.parameters()).device
        ids, mask = right_pad([s.input_ids for s in seqs], pad_id(self.tokenizer))
        with torch.no_grad():
            return self.model(
                input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False
            ).logits.float()

    def __call__(self, batch: _Batch, training: bool = True) -> torch.Tensor:
        cfg = self.cfg
        examples = batch.examples
        entries = [x.entry for x in examples]
        pairs = [(i, row) for i, x in enumerate(examples) for row in x.inscope]
        inscope = _answer_rows(self.tokenizer, [row for _, row in pairs])
        owner = [i for i, _ in pairs]  # the edit each in-scope row belongs to
        loc_ex = [(i, x.outscope) for i, x in enumerate(examples) if x.outscope is not None]
        outscope = _answer_rows(self.tokenizer, [o for _, o in loc_ex]) if loc_ex else []
        keys = self.classifier.embed([e.scope_text for e in entries])
        decode = lambda seqs: [self.tokenizer.decode(s.input_ids, skip_special_tokens=True) for s in seqs]  # noqa: E731
        q_in = self.classifier.embed(decode(inscope))
        logsim_in = self.classifier.log_similarity(q_in, keys)  # [rows, B]
        logsim_out = (
            self.classifier.log_similarity(self.classifier.embed(decode(outscope)), keys) if loc_ex else None
        )
        vocab = self.vocab
        want_hidden = training and cfg.sss_coefficient > 0
        rows_in = [s.input_ids for s in inscope]
        if cfg.supervised:
            cf_logits, hidden = counterfactual_logits(
                self.cf,
                self.tokenizer,
                self.contexts([entries[i] for i in owner]),
                rows_in,
                vocab,
                hidden=want_hidden,
            )
            r, picked, gold = _gather_answers(cf_logits, inscope)
            nll = -picked.log_softmax(-1).gather(1, gold[:, None])[:, 0]
            l_edit = _row_mean(nll, r, len(inscope))
            own_in = torch.tensor(owner, device=logsim_in.device)
            pos = logsim_in[torch.arange(len(owner), device=logsim_in.device), own_in]
            if loc_ex:
                own = torch.tensor([i for i, _ in loc_ex], device=logsim_in.device)
                neg = (
                    logsim_out.flatten()
                    if cfg.use_all_negatives
                    else logsim_out[torch.arange(len(loc_ex)), own]
                )
            else:
                neg = pos.new_zeros(0)
            if cfg.cross_negatives:  # in-scope rows vs the batch's other edits (not the reference's)
                other = torch.tensor(
                    [
                        [entries[j].scope_text != entries[i].scope_text for j in range(len(entries))]
                        for i in owner
                    ],
                    device=logsim_in.device,
                )
                neg = torch.cat([neg, logsim_in[other]])
            sims = torch.cat([pos, neg])
            labels = torch.cat([torch.ones_like(pos), torch.zeros_like(neg)])
            l_loc = _balanced_bce(sims, labels)
        else:
            best_in, idx_in = logsim_in.exp().max(-1)
            cf_logits, hidden = counterfactual_logits(
                self.cf,
                self.tokenizer,
                self.contexts([entries[i] for i in idx_in.tolist()]),
                rows_in,
                vocab,
                hidden=want_hidden,
            )
            base = self._base_logits(inscope)
            r, p_cf, gold = _gather_answers(cf_logits, inscope)
            _, p_base, _ = _gather_answers(base, inscope)
            s = best_in[r][:, None]
            mix = ((1 - s) * p_base.softmax(-1) + s * p_cf.softmax(-1) + _EPS).log()
            l_edit = _row_mean(-mix.gather(1, gold[:, None])[:, 0], r, len(inscope))
            if loc_ex:
                best_out, idx_out = logsim_out.exp().max(-1)
                cf_out, _ = counterfactual_logits(
                    self.cf,
                    self.tokenizer,
                    self.contexts([entries[i] for i in idx_out.tolist()]),
                    [s_.input_ids for s_ in outscope],
                    vocab,
                )
                base_out = self._base_logits(outscope)
                r2, q_cf, _ = _gather_answers(cf_out, outscope)
                _, q_base, _ = _gather_answers(base_out, outscope)
                s2 = best_out[r2][:, None]
                pre = q_base.log_softmax(-1)
                post = ((1 - s2) * q_base.softmax(-1) + s2 * q_cf.softmax(-1) + _EPS).log()
                l_loc = _row_mean((pre.exp() * (pre - post)).sum(-1), r2, len(outscope))
            else:
                l_loc = l_edit.new_zeros(())
        raw_edit = l_edit
        if want_hidden:
            n_pos = sum(s.n_answer_tokens for s in inscope)
            l_edit = mix_sss(l_edit, hidden, cfg.sss_coefficient, cfg.sss_reduction, n_pos)
        total = cfg.cedit * l_edit + cfg.cloc * l_loc
        self.parts = {
            "edit_nll": float(raw_edit.detach()),
            "loc": float(l_loc.detach()),
            "total": float(total.detach()),
        }
        return total


def _batches(examples: list[_Example], size: int, n: int, rng: random.Random) -> list[_Batch]:
    """``n`` batches of ``size`` examples, shuffled epoch after epoch."""
    out: list[_Batch] = []
    order: list[int] = []
    while len(out) < n:
        if len(order) < size:
            fresh = list(range(len(examples)))
            rng.shuffle(fresh)
            order += fresh
        out.append(_Batch([examples[i] for i in order[:size]]))
        order = order[size:]
    return out


def train_serac(
    cfg: SeracConfig,
    model: nn.Module,
    tokenizer,
    classifier: ScopeClassifier,
    cf: nn.Module,
    cases: list,
    checkpoints: Path,
    progress: bool = False,
) -> dict:
    """Train ``classifier`` and ``cf`` in place on ``cases``; checkpoints in ``checkpoints`` (resumed)."""
    if len(cases) < 2:
        raise ValueError(f"SERAC training needs at least 2 cases, got {len(cases)}")
    rng = random.Random(cfg.seed)
    n_val = min(cfg.val_cases, max(1, len(cases) // 5))
    train_ex = _examples(cases[:-n_val], rng, cfg.train_on_rewrite)
    val_ex = _examples(cases[-n_val:], random.Random(cfg.seed + 1), cfg.train_on_rewrite)
    loss = SeracLoss(cfg, model, tokenizer, classifier, cf)
    params = {f"classifier.{n}": p for n, p in classifier.encoder.named_parameters()}
    params |= {f"counterfactual.{n}": p for n, p in cf.named_parameters()}
    groups = [
        {
            "params": [p for n, p in params.items() if n.startswith("classifier.")],
            "lr": cfg.classifier_lr or cfg.lr,
        },
        {"params": [p for n, p in params.items() if n.startswith("counterfactual.")], "lr": cfg.lr},
    ]
    opt = torch.optim.Adam(groups, lr=cfg.lr)
    loop = LoopConfig(epochs=1, lr=cfg.lr, accumulate=cfg.accumulate, grad_clip=cfg.grad_clip)
    val_batches = [_Batch(val_ex[i : i + cfg.batch_size]) for i in range(0, len(val_ex), cfg.batch_size)]

    def validate() -> dict[str, float]:
        classifier.eval()
        cf.eval()
        sums = {"total": 0.0, "edit_nll": 0.0, "loc": 0.0}
        with torch.no_grad():
            for b in val_batches:
                loss(b, training=False)
                for k in sums:
                    sums[k] += loss.parts[k] * b.size
        classifier.train()
        cf.train()
        return {k: v / len(val_ex) for k, v in sums.items()}

    state_file = Path(checkpoints) / "serac_last.pt"
    step, curve, best, since_best, stopped = 0, [], None, 0, "max_steps"
    best_state = None
    if state_file.exists():
        saved = torch.load(state_file, map_location=next(cf.parameters()).device, weights_only=False)
        classifier.encoder.load_state_dict(saved["classifier"])
        cf.load_state_dict(saved["counterfactual"])
        opt.load_state_dict(saved["optimizer"])
        step, curve, best, since_best = saved["step"], saved["curve"], saved["best"], saved["since_best"]
        best_state = saved.get("best_state")
        rng.setstate(saved["rng"])
        log.info("SERAC training resumed at step %d from %s", step, state_file)
    else:
        curve.append({"step": 0, **validate()})
        best = curve[-1]["total"]
    classifier.train()
    cf.train()
    train_losses: list[float] = []
    while step < cfg.max_steps and stopped == "max_steps":
        chunk = min(cfg.checkpoint_every, cfg.val_every, cfg.max_steps - step)
        chunk = min(chunk, cfg.val_every - step % cfg.val_every)
        batches = _batches(train_ex, cfg.batch_size, chunk * cfg.accumulate, rng)
        rep = fit(params, loss, batches, loop, optimizer=opt, progress=progress, desc="serac")
        step += rep.steps
        train_losses.append(rep.final_loss)
        if step % cfg.val_every == 0 or step >= cfg.max_steps:
            curve.append({"step": step, **validate()})
            if curve[-1]["total"] < best:
                best, since_best = curve[-1]["total"], 0
                best_state = {
                    "classifier": {k: v.detach().clone() for k, v in classifier.encoder.state_dict().items()},
                    "counterfactual": {k: v.detach().clone() for k, v in cf.state_dict().items()},
                }
            else:
                since_best += cfg.val_every
                if cfg.patience is not None and since_best >= cfg.patience:
                    stopped = "patience"
        state_file.parent.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "classifier": classifier.encoder.state_dict(),
                "counterfactual": cf.state_dict(),
                "optimizer": opt.state_dict(),
                "step": step,
                "curve": curve,
                "best": best,
                "since_best": since_best,
                "best_state": best_state,
                "rng": rng.getstate(),
            },
            state_file,
        )
        if progress:
            log.info("SERAC step %d: %s", step, curve[-1])
    if best_state is not None:  # end on the best validation loss (reference: the best checkpoint)
        classifier.encoder.load_state_dict(best_state["classifier"])
        cf.load_state_dict(best_state["counterfactual"])
    classifier.eval()
    cf.eval()
    return {
        "steps": step,
        "stopped": stopped,
        "validation": curve,
        "best_total": best,
        "train_loss": [x for x in train_losses if not math.isnan(x)][-10:],
        "n_train": len(train_ex),
        "n_val": len(val_ex),
    }
