"""WISE (Wang et al., NeurIPS 2024): a side memory for lifelong editing, as released in EasyEdit
(zjunlp/EasyEdit ``easyeditor/models/wise/WISE.py``, ``wise_main.py``, ``utils.py``,
``hparams/WISE/*.yaml``; spec §5). Settings per model: ``conf/editor_model/wise_<model>.yaml``.

**Memories.** One FFN matrix W (``module`` at ``layer``, the reference's ``inner_params``: GPT-2
XL ``transformer.h.8.mlp.c_fc``, GPT-J ``transformer.h.21.mlp.fc_out``, LLaMA-3
``model.layers.29.mlp.down_proj``) stays frozen as the *main memory*; edits train a copy W′ of
it, the *side memory*, swapped in by a :class:`WiseAdapter` (a :class:`editors.patch.ModulePatch`).

**Routing.** At every position the activation score is d = ‖act(W′x) − act(Wx)‖₂ (act: the
model's hidden activation, applied to the layer's output as in the reference), and the layer
outputs W′x when the routed score s reaches τ = act_ratio × (the smallest in-scope score recorded
while editing), else Wx. The reference averages d over every position of the batch it is called
with (the max for inputs longer than 100 tokens); our scorer feeds right-padded batches, so
``routing`` says how s is formed, per row:

- ``prefix`` (default): s_t = mean of d over positions ≤ t (the running max from position 100 on).
  With right padding a real position never sees a pad, so a row scores as it would alone; the
  score at the last position is the reference's sequence score, and no position is routed by
  tokens after it (the scorer's answer tokens do not route the prediction of themselves).
- ``sequence``: the reference's rule per row: mean over all positions fed (pads included: exact
  only for unpadded rows, e.g. ``eval.batch_size=1``).
- ``token``: s_t = d_t.

With a key/value cache the adapter would see only the new tokens of each step (per-token routing,
as in the reference's generation), and with left padding pad positions would enter the prefix
means: the adapter is ``sequence_routed``, so the runner's generation (greedy answers, Fluency)
feeds it each row alone, without a cache, and every generated token is routed on its whole prefix
(on the TOFU toy, forget05, forget / retain ROUGE-L were 0.333 / 0.516 batched and cached, and
are 0.326 / 0.496 row by row: see the README).

**Loss** (per request, the reference's ``only_label`` objective): the teacher-forced NLL of the
target tokens, averaged over the target tokens of each row and over rows, on the edit prompt under
each context template (``"{}"`` and greedy continuations of "I", "You", "Because", "Yes", "Q: ",
``context_templates`` = [[5, 5], [10, 5]] as in ``wise_main.py``), plus the margin loss on the
in-scope scores Δ_in (each template row's mean d over its real tokens) and Δ_out (the same on one
irrelevant ``loc`` text): [Δ_out − Δ_in + γ]₊ + [Δ_out − α]₊ + [β − Δ_in]₊, each averaged over
its positive entries, act_margin = [α, β, γ]. W′ alone trains: SGD (``edit_lr``, weight decay
``weight_decay`` 1e-5), at most ``n_iter`` steps with the reference's early stop (|Δloss| ≤ 1e-4
and loss ≤ 0.02), the gradient masked to the shard's entries, W′ clamped to W ± ``norm_constraint``
after each step. The in-scope score recorded for τ is the mean Δ_in of the last forward pass
(before the last step, as released).

**Loc texts.** The reference draws edit i's irrelevant prompt from the i-th record of a held-out
split (zsRE ``zsre_mend_train.json``: an NQ question and its answer). Offline, they are sentences
of the statistics corpus the runner hands every editor (``stats.corpus``: the bundled WikiText-2
test split by default; never an evaluated prompt), the first ``loc_pool`` sentences of 6-30 words,
cut to ``loc_max_tokens`` tokens; a request takes the one its case id hashes to (the same in batch
and sequential mode). ``loc_texts`` replaces the corpus. Unlearning (``task=unlearn``) hands the
editor the retain split (``Resources.retain``); with ``loc_from_retain`` (default) its questions
with their answers are the loc texts: what must not change, in the forget questions' own format,
as the reference's held-out questions are in the edits' format. Corpus sentences are another
distribution, so the side memory learned to fire on the question format itself and answered
retain questions too (TOFU toy, forget05, both measured with batched, cached generation: retain
ROUGE-L 0.318 with corpus sentences, 0.516 with the retain pairs).

**Knowledge shards and merging.** Edit n (counted per request since the last reset) trains under
the gradient mask of shard n // ``save_freq``: a random ``mask_ratio`` of W′'s entries, drawn
from ``seed`` and the shard index. After every ``save_freq`` edits W′ is stored and restarts
from W; after every ``merge_freq`` edits the stored shards are TIES-merged (``editors.merging``,
EasyEdit's GTA variant: magnitude trim to ``densities`` per tensor, sign from the weighted sum,
weighted mean of the agreeing shards; base W):

- WISE-Retrieve (``retrieve: true``, the released files): the last merge_freq/save_freq shards
  become one memory (weights ``weights``/n), its threshold the smallest of theirs; each shard's τ
  counts only its own edits. A position takes W′ when its score reaches W′'s τ, then any memory
  whose score is above its own τ and above the best score so far (W′'s included) replaces it.
- WISE-Merge (``retrieve: false``): the shards merge into one merged memory (weights
  ``weights``/n the first time, then 0.4/n per shard and 0.6 for the merged memory); τ counts every
  edit; a position takes the main memory when both scores are below τ, else the memory with the
  larger score. ``merge_pending_at_eval`` (reference ``WISE.__call__``): once ``save_freq`` edits
  were made, evaluation sees stored shards and W′ merged in and W′ reset (computed into the
  returned adapter only: unlike the reference, evaluating never changes the editing state).

**Deviations from the released code** (switch where one exists): scores average over each row's
real tokens (the reference averages over every position of its left-padded batches, pads included,
and at inference over the whole batch: ``routing``); the target NLL is averaged over each row's
target tokens (the reference divides by n_target + 1: its label mask starts one prompt position
early); batch edits are counted per request, a batch trains under one mask and a shard is stored
after the batch that reaches a multiple of ``save_freq`` (the reference counts calls: the same at
``batch_size=1``); the side memory keeps the layer's bias (``side_bias``; the released forward
drops it for ``nn.Linear`` layers such as GPT-J's ``fc_out``, and its retrieval forward
``F.linear(x, memory)`` drops it everywhere and does not fit GPT-2's Conv1D, so a GPT-2 run of
the released code fails once a merged memory exists); W′ trains in float32 within an edit;
context templates are generated per seed word (the reference: one left-padded batch); ``replay``
(Appendix B.3) and LLaMA-3-Instruct's chat template are not implemented (the runner's ``llama3``
is the base model).

**Caveat of prefix routing.** The first positions of a row are routed on few tokens. A token that
starts every input (LLaMA's BOS) has the same score everywhere, so it takes W′ for every input
whenever that score reaches τ, which the reference's sequence mean would dilute; for such models
``routing=sequence eval.batch_size=1`` is the reference's rule, exactly.

**Cost.** An edit copies W′ once (its new adapter); stored shards, merged memories and
thresholds are shared, never copied, between successive adapters (buffers, so a patch does not
snapshot them either). Merges cost O(|W|·shards); evaluation costs one extra matmul per memory.
Memory in sequential mode is the contract's: the runner keeps every edit's handle, i.e. each
edit's adapter (its W′) and the snapshot ``ModulePatch.attach`` takes of the module it replaced
(W′ and W), about 3·|W| per kept edit: nothing for the toy (0.25 MB per edit), but 1,000 GPT-2 XL
edits of ``c_fc`` (41 MB) would hold ~120 GB.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase
from transformers.activations import ACT2FN
from transformers.pytorch_utils import Conv1D

from editors import checks
from editors.base import EditorBase, Resources
from editors.core.logits import logits_at
from editors.core.tokens import answer_ids, encode, model_device, pad_id, right_pad
from editors.hooks import get_module
from editors.merging import merge_models, variant
from editors.patch import Adapter, ModulePatch
from editors.requests import EditRequest
from editors.spec import ModelSpec

ROUTINGS = ("prefix", "sequence", "token")
MERGE_ALGS = ("ties",)
SEED_WORDS = ("I", "You", "Because", "Yes", "Q: ")  # wise/utils.py get_context_templates
WISE_MERGE_SHARD_SHARE = 0.4  # WISE-Merge after the first merge: 0.4/n per shard, 0.6 for the merged memory


@dataclass
class WiseConfig:
    """WISE hyperparameters (EasyEdit ``hparams/WISE`` names; defaults: its gpt2-xl.yaml)."""

    _target_: str = "editors.wise.Wise"
    module: str = "transformer.h.{}.mlp.c_fc"  # the side-memory matrix ({} = layer): inner_params
    layer: int = 8  # the layer filled into module
    edit_lr: float = 1.0  # SGD learning rate of W′
    n_iter: int = 40  # at most this many steps per edit (early stop as released)
    weight_decay: float = (
        1e-5  # SGD weight decay (hard-coded in WISE.edit); it moves every entry, masked or not
    )
    norm_constraint: float | None = 1.0  # W′ clamped element-wise to W ± this after each step; null: no clamp
    act_margin: list[float] = field(default_factory=lambda: [5.0, 20.0, 10.0])  # [α, β, γ] of the margin loss
    act_ratio: float = 0.8  # τ = act_ratio × the smallest recorded in-scope score
    mask_ratio: float = 0.2  # share of W′'s entries a knowledge shard trains
    save_freq: int = 500  # edits per knowledge shard
    merge_freq: int = 1000  # edits between merges (a multiple of save_freq)
    merge_alg: str = (
        "ties"  # EasyEdit's GTA('magnitude', 'sum', normalize=True) (editors.merging, variant easyedit)
    )
    densities: float = 0.53  # TIES density
    weights: float = 1.0  # TIES weight, split over the shards of a merge
    retrieve: bool = True  # true: WISE-Retrieve (merged memories kept, routed) | false: WISE-Merge
    merge_pending_at_eval: bool = (
        True  # WISE-Merge: evaluation sees pending shards and W′ merged (reference __call__)
    )
    routing: str = (
        "prefix"  # how a row's scores route each position: prefix | sequence | token (module docstring)
    )
    long_sequence: int | None = (
        100  # from this many positions on, the max of d instead of the mean (null: never)
    )
    side_bias: bool = True  # side memories keep the layer's bias (false: the released nn.Linear forward)
    context_templates: list[list[int]] = field(
        default_factory=lambda: [[5, 5], [10, 5]]
    )  # [max_new_tokens, count] groups of greedy continuations (count // 5 per seed word)
    loc_texts: list[str] | None = (
        None  # irrelevant texts for Δ_out (null: the retain pairs or the stats corpus)
    )
    # task=unlearn: the retain split's questions with their answers are the loc texts (module doc)
    loc_from_retain: bool = True
    loc_pool: int = 1000  # how many corpus sentences the loc texts are drawn from
    loc_max_tokens: int = 40  # loc texts are cut to this many tokens
    seed: int = 0  # shard masks
    act: str | None = None  # activation applied to the layer output for scores (null: the model's hidden_act)

    def __post_init__(self) -> None:
        if not isinstance(self.module, str) or not self.module:
            checks.fail("editor.module", "a module name or template", self.module)
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            checks.fail("editor.layer", "a layer index ≥ 0", self.layer)
        checks.positive("editor.edit_lr", self.edit_lr)
        checks.at_least_one("editor.n_iter", self.n_iter)
        checks.non_negative("editor.weight_decay", self.weight_decay)
        checks.positive("editor.norm_constraint", self.norm_constraint, optional=True)
        if len(self.act_margin) != 3:
            checks.fail("editor.act_margin", "[alpha, beta, gamma]", list(self.act_margin))
        checks.positive("editor.act_ratio", self.act_ratio)
        checks.fraction("editor.mask_ratio", self.mask_ratio)
        checks.at_least_one("editor.save_freq", self.save_freq)
        checks.at_least_one("editor.merge_freq", self.merge_freq)
        if self.merge_freq % self.save_freq:
            checks.fail(
                "editor.merge_freq", f"a multiple of editor.save_freq ({self.save_freq})", self.merge_freq
            )
        checks.one_of("editor.merge_alg", self.merge_alg, MERGE_ALGS)
        checks.fraction("editor.densities", self.densities)
        checks.positive("editor.weights", self.weights)
        checks.one_of("editor.routing", self.routing, ROUTINGS)
        checks.at_least_one("editor.long_sequence", self.long_sequence, optional=True)
        checks.context_templates("editor.context_templates", self.context_templates)
        checks.at_least_one("editor.loc_pool", self.loc_pool)
        checks.at_least_one("editor.loc_max_tokens", self.loc_max_tokens)
        if self.loc_texts is not None and not [t for t in self.loc_texts if t.strip()]:
            checks.fail("editor.loc_texts", "non-empty texts or null", self.loc_texts)

    @property
    def module_name(self) -> str:
        return self.module.format(self.layer) if "{}" in self.module else self.module


# ---------------------------------------------------------------------------------------------
# The adapter


@dataclass
class _Training:
    """While an edit trains: W′ as a float32 leaf, and the last forward's scores d [..., T]."""

    weight: torch.Tensor
    scores: torch.Tensor | None = None


def _route(d: torch.Tensor, routing: str, long_sequence: int | None) -> torch.Tensor:
    """Per-position routing scores from the per-position distances ``d`` [..., T]."""
    if routing == "token":
        return d
    t = d.shape[-1]
    if routing == "sequence":
        agg = (
            d.max(dim=-1, keepdim=True).values
            if long_sequence and t > long_sequence
            else d.mean(-1, keepdim=True)
        )
        return agg.expand_as(d)
    counts = torch.arange(1, t + 1, device=d.device, dtype=d.dtype)
    s = d.cumsum(dim=-1) / counts
    if long_sequence and t > long_sequence:
        s = torch.where(counts > long_sequence, d.cummax(dim=-1).values, s)
    return s


class WiseAdapter(Adapter):
    """The WISE layer: ``inner`` (main memory W, never changed), the side memory W′ (``side``),
    WISE-Retrieve's memories (``memory_<i>``, thresholds ``memory_min_act``) or WISE-Merge's stored
    shards (``pending_<i>``) and merged memory (``merged``), and the evaluation view
    (``eval_merged``). Thresholds are the raw smallest in-scope scores; τ = act_ratio × them."""

    def __init__(
        self,
        inner: nn.Module,
        *,
        act: str,
        act_ratio: float,
        retrieve: bool,
        routing: str = "prefix",
        long_sequence: int | None = 100,
        side_bias: bool = True,
    ) -> None:
        super().__init__(inner)
        if not isinstance(inner, (nn.Linear, Conv1D)):
            raise TypeError(f"WISE edits a Linear or Conv1D layer, got {type(inner).__name__}")
        self.act_name = act
        self.act_fn = ACT2FN[act]
        self.act_ratio = float(act_ratio)
        self.retrieve = bool(retrieve)
        self.routing = routing
        self.long_sequence = long_sequence
        self.side_bias = bool(side_bias)
        self.edits = 0  # edits this adapter holds (since the last reset)
        self.eval_side_base = False  # WISE-Merge evaluation view: W′ merged in, routed as W
        device = inner.weight.device
        self.side = nn.Parameter(inner.weight.detach().clone(), requires_grad=False)
        self.register_buffer("side_min_act", torch.tensor(math.inf, device=device))
        self.register_buffer("memory_min_act", torch.zeros(0, device=device))
        self.n_memories = 0
        self.n_pending = 0
        self.register_buffer("merged", None)
        self.register_buffer("eval_merged", None)
        self._train: _Training | None = None

    # --- state ---------------------------------------------------------------------------------

    @property
    def base_weight(self) -> torch.Tensor:
        return self.inner.weight

    def memories(self) -> list[torch.Tensor]:
        return [getattr(self, f"memory_{i}") for i in range(self.n_memories)]

    def pending(self) -> list[torch.Tensor]:
        return [getattr(self, f"pending_{i}") for i in range(self.n_pending)]

    def set_memories(self, tensors: Sequence[torch.Tensor], min_acts: Sequence[float]) -> None:
        for i in range(self.n_memories):
            delattr(self, f"memory_{i}")
        for i, t in enumerate(tensors):
            self.register_buffer(f"memory_{i}", t)
        self.n_memories = len(tensors)
        self.memory_min_act = torch.tensor([float(a) for a in min_acts], device=self.side.device)

    def set_pending(self, tensors: Sequence[torch.Tensor]) -> None:
        for i in range(self.n_pending):
            delattr(self, f"pending_{i}")
        for i, t in enumerate(tensors):
            self.register_buffer(f"pending_{i}", t)
        self.n_pending = len(tensors)

    def successor(self) -> WiseAdapter:
        """A new adapter around the same ``inner`` for the next edit: W′ and the thresholds
        copied, stored memories shared (they never change once stored)."""
        new = WiseAdapter(
            self.inner,
            act=self.act_name,
            act_ratio=self.act_ratio,
            retrieve=self.retrieve,
            routing=self.routing,
            long_sequence=self.long_sequence,
            side_bias=self.side_bias,
        )
        new.edits = self.edits
        new.side = nn.Parameter(self.side.detach().clone(), requires_grad=False)
        new.side_min_act = self.side_min_act.clone()
        new.set_memories(self.memories(), self.memory_min_act.tolist())
        new.set_pending(self.pending())
        new.merged = self.merged
        return new

    def adapter_config(self) -> dict:
        return {
            "act": self.act_name,
            "act_ratio": self.act_ratio,
            "retrieve": self.retrieve,
            "routing": self.routing,
            "long_sequence": self.long_sequence,
            "side_bias": self.side_bias,
            "edits": self.edits,
            "memories": self.n_memories,
            "pending": self.n_pending,
            "merged": self.merged is not None,
            "eval_merged": self.eval_merged is not None,
            "eval_side_base": self.eval_side_base,
        }

    @classmethod
    def from_config(cls, inner: nn.Module, config: dict) -> WiseAdapter:
        adapter = cls(
            inner,
            act=config["act"],
            act_ratio=config["act_ratio"],
            retrieve=config["retrieve"],
            routing=config["routing"],
            long_sequence=config["long_sequence"],
            side_bias=config["side_bias"],
        )
        adapter.edits = int(config["edits"])
        adapter.eval_side_base = bool(config["eval_side_base"])
        w = inner.weight.detach()
        adapter.set_memories(
            [torch.empty_like(w) for _ in range(config["memories"])], [0.0] * config["memories"]
        )
        adapter.set_pending([torch.empty_like(w) for _ in range(config["pending"])])
        if config["merged"]:
            adapter.merged = torch.empty_like(w)
        if config["eval_merged"]:
            adapter.eval_merged = torch.empty_like(w)
        return adapter

    # --- forward -------------------------------------------------------------------------------

    def _linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        bias = self.inner.bias if self.side_bias else None
        if isinstance(self.inner, Conv1D):
            out = x.reshape(-1, x.shape[-1]) @ weight
            if bias is not None:
                out = out + bias
            return out.view(*x.shape[:-1], weight.shape[1])
        return F.linear(x, weight, bias)

    def distance(self, main: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """d = ‖act(other) − act(main)‖₂ per position, float32, shape ``main.shape[:-1]``."""
        return torch.linalg.vector_norm(self.act_fn(other.float()) - self.act_fn(main.float()), dim=-1)

    def _scores(self, main: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        return _route(self.distance(main, other), self.routing, self.long_sequence)

    @property
    def sequence_routed(self) -> bool:  # prefix and sequence routing read the earlier positions
        return self.routing != "token"

    def threshold(self, min_act: torch.Tensor) -> torch.Tensor:
        return min_act * self.act_ratio

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        main = self.inner(x)
        if self._train is not None:  # editing: every row goes through W′
            side = self._linear(x, self._train.weight.to(x.dtype))
            self._train.scores = self.distance(main.detach(), side)
            return side
        untrained = self.eval_side_base or bool(torch.isinf(self.side_min_act))
        if self.retrieve:
            if untrained:  # W′ = W (a fresh shard) or never reaches its τ: score ≈ 0, main memory
                out, best = main, torch.zeros(main.shape[:-1], device=main.device)
            else:
                y_side = self._linear(x, self.side)
                s_side = self._scores(main, y_side)
                out = torch.where((s_side >= self.threshold(self.side_min_act))[..., None], y_side, main)
                best = s_side
            for memory, min_act in zip(self.memories(), self.memory_min_act):
                y = self._linear(x, memory)
                s = self._scores(main, y)
                pick = (s > best) & (s > self.threshold(min_act))
                out = torch.where(pick[..., None], y, out)
                best = torch.where(pick, s, best)
            return out
        merged_w = self.eval_merged if self.eval_merged is not None else self.merged
        tau = self.threshold(self.side_min_act)
        if untrained and merged_w is None:
            return main
        if untrained:  # W′ = W (merged into the evaluation view): its score is 0
            y_side, s_side = main, torch.zeros(main.shape[:-1], device=main.device)
        else:
            y_side = self._linear(x, self.side)
            s_side = self._scores(main, y_side)
        if merged_w is None:  # nothing merged yet: the merged memory is W (score 0)
            return torch.where((s_side >= tau)[..., None], y_side, main)
        y_merged = self._linear(x, merged_w)
        s_merged = self._scores(main, y_merged)
        use_main = (s_merged < tau) & (s_side < tau)
        chosen = torch.where((s_merged > s_side)[..., None], y_merged, y_side)
        return torch.where(use_main[..., None], main, chosen)


# ---------------------------------------------------------------------------------------------
# Inputs of an edit


def wise_context_templates(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, lengths: Sequence[Sequence[int]]
) -> list[str]:
    """``["{}"]`` + greedy continuations (beam count // 5, as ``wise/utils.py``) of each seed word,
    ``max_new_tokens`` long, each followed by ``" {}"``."""
    templates = ["{}"]
    device = model_device(model)
    with torch.no_grad():
        for max_new, count in lengths:
            beams = int(count) // len(SEED_WORDS)
            if beams < 1:
                continue
            for word in SEED_WORDS:
                enc = tokenizer(word, return_tensors="pt").to(device)
                out = model.generate(
                    **enc,
                    max_new_tokens=int(max_new),
                    num_beams=beams,
                    num_return_sequences=beams,
                    do_sample=False,
                    pad_token_id=pad_id(tokenizer),
                )
                for text in tokenizer.batch_decode(out, skip_special_tokens=True):
                    templates.append(text.replace("{", " ").replace("}", " ") + " {}")
    return templates


_WIKITEXT_JOINS = re.compile(r" @(.)@ ")
_SPACE_BEFORE = re.compile(r" ([.,;:!?)'%])")


def corpus_sentences(
    paragraphs: Iterable[str], count: int, min_words: int = 6, max_words: int = 30
) -> list[str]:
    """The first ``count`` sentences of ``min_words``-``max_words`` words of a corpus (WikiText's
    tokenised spacing undone), for WISE's irrelevant loc texts."""
    out: list[str] = []
    for paragraph in paragraphs:
        text = _SPACE_BEFORE.sub(r"\1", _WIKITEXT_JOINS.sub(r"\1", paragraph.strip())).replace("( ", "(")
        for sentence in re.split(r"(?<=[.!?])\s+", text):
            if min_words <= len(sentence.split()) <= max_words:
                out.append(sentence)
                if len(out) >= count:
                    return out
    return out


def _case_index(case_id: str, n: int) -> int:
    return int.from_bytes(hashlib.sha256(case_id.encode()).digest()[:8], "big") % n


class _EarlyStop:
    """wise/utils.py EarlyStopMeter: stop once the loss moved by ≤ 1e-4 and is ≤ 0.02."""

    def __init__(self) -> None:
        self.previous, self.value = 0.0, 1e9

    def update(self, value: float) -> None:
        self.previous, self.value = self.value, value

    def stop(self) -> bool:
        return abs(self.value - self.previous) <= 1e-4 and self.value <= 0.02


@dataclass
class _Batch:
    input_ids: (
        torch.Tensor
    )  # [R, T]: the edit rows (request-major, one per template), then one loc row per request
    attention_mask: torch.Tensor  # [R, T]
    pick_rows: torch.Tensor  # [K]: row and position of each target-token prediction
    pick_cols: torch.Tensor
    gold: torch.Tensor  # [K]
    owner: torch.Tensor  # [K]: its edit row
    n_requests: int
    n_templates: int


# ---------------------------------------------------------------------------------------------
# The editor


class Wise(EditorBase):
    """WISE (see the module docstring). The state of the edits lives in the model's adapter; the
    editor keeps the edit count and the current shard's mask, cleared by :meth:`reset`."""

    MEMORY_KNOBS = (
        (
            "editor.context_templates",
            "rows per edit request (templates × requests, forward and backward together)",
        ),
        ("editor.loc_max_tokens", "length of each request's loc row"),
        ("batch_size", "requests trained together"),
    )

    def __init__(self, config: WiseConfig, spec: ModelSpec) -> None:
        super().__init__(config, spec)
        self.edits = 0
        self._mask: tuple[int, torch.Tensor] | None = None
        self.templates: list[str] | None = None
        self.loc: list[str] | None = None

    # --- preparation ---------------------------------------------------------------------------

    def prepare(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, resources: Resources) -> None:
        super().prepare(model, tokenizer, resources)
        self.templates = wise_context_templates(model, tokenizer, self.config.context_templates)
        self.loc = self._loc_texts(resources)

    def _loc_texts(self, resources: Resources) -> list[str]:
        cfg = self.config
        if cfg.loc_texts is not None:
            return [t for t in cfg.loc_texts if t.strip()]
        if cfg.loc_from_retain and resources.retain:
            return [f"{prompt} {answer}" for prompt, answer in resources.retain]
        texts = getattr(resources.stats, "texts", None)
        if texts is None:
            raise ValueError(
                "WISE needs irrelevant loc texts: the run's statistics corpus (prepare with "
                "Resources(stats=...)) or editor.loc_texts"
            )
        sentences = corpus_sentences(texts(), cfg.loc_pool)
        if not sentences:
            raise ValueError("WISE: the statistics corpus has no sentence of 6-30 words for loc texts")
        return sentences

    def _activation(self, model: nn.Module) -> str:
        if self.config.act is not None:
            return self.config.act
        mc = getattr(model, "config", None)
        for key in ("hidden_act", "activation_function"):
            name = getattr(mc, key, None)
            if isinstance(name, str):
                return name
        raise ValueError("WISE: the model config names no hidden activation; set editor.act")

    def shard_mask(self, shard: int, like: torch.Tensor) -> torch.Tensor:
        """Shard ``shard``'s gradient mask: each entry kept with probability mask_ratio."""
        if self._mask is None or self._mask[0] != shard:
            gen = torch.Generator().manual_seed(int(self.config.seed) * 1_000_003 + shard)
            mask = torch.rand(like.shape, generator=gen) < self.config.mask_ratio
            self._mask = (shard, mask.to(device=like.device, dtype=torch.float32))
        return self._mask[1]

    def reset(self) -> None:
        super().reset()
        self.edits = 0
        self._mask = None

    # --- an edit -------------------------------------------------------------------------------

    def apply(
        self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, requests: Sequence[EditRequest]
    ) -> ModulePatch:
        cfg = self.config
        if self.templates is None or self.loc is None:
            raise RuntimeError("WISE: prepare() must run before apply()")
        name = cfg.module_name
        current = get_module(model, name)
        if isinstance(current, WiseAdapter):
            settings = current.adapter_config()
            wanted = {
                "act_ratio": cfg.act_ratio,
                "retrieve": cfg.retrieve,
                "routing": cfg.routing,
                "long_sequence": cfg.long_sequence,
                "side_bias": cfg.side_bias,
            }
            differ = {k: (settings[k], v) for k, v in wanted.items() if settings[k] != v}
            if differ:
                raise ValueError(
                    f"WISE: the model's adapter at {name} was built with other settings: {differ}"
                )
            adapter = current.successor()
        else:
            adapter = WiseAdapter(
                current,
                act=self._activation(model),
                act_ratio=cfg.act_ratio,
                retrieve=cfg.retrieve,
                routing=cfg.routing,
                long_sequence=cfg.long_sequence,
                side_bias=cfg.side_bias,
            )
        self.edits = before = adapter.edits  # the model's adapter is the state an edit starts from
        mask = self.shard_mask(before // cfg.save_freq, adapter.side)
        weight, info = self._train(model, tokenizer, requests, name, adapter, mask)
        adapter.side = nn.Parameter(weight.to(adapter.side.dtype), requires_grad=False)
        adapter.side_min_act = torch.minimum(
            adapter.side_min_act, torch.tensor(info["wise_act_in"], device=adapter.side_min_act.device)
        )
        info["wise_threshold"] = float(adapter.threshold(adapter.side_min_act))  # τ of the shard trained
        adapter.edits = after = before + len(requests)
        info |= self._store_and_merge(adapter, before, after)
        self.edits = after
        info["wise_memories"] = float(adapter.n_memories if cfg.retrieve else adapter.n_pending)
        self.record(requests)
        return ModulePatch({name: adapter}, diagnostics=info)

    def _store_and_merge(self, adapter: WiseAdapter, before: int, after: int) -> dict[str, float]:
        cfg = self.config
        base = adapter.base_weight.detach()
        merged = 0.0
        if after // cfg.save_freq > before // cfg.save_freq:  # the shard is complete: store it
            if cfg.retrieve:
                adapter.set_memories(
                    [*adapter.memories(), adapter.side.detach()],
                    [*adapter.memory_min_act.tolist(), float(adapter.side_min_act)],
                )
                adapter.side_min_act = torch.tensor(math.inf, device=adapter.side_min_act.device)
            else:
                adapter.set_pending([*adapter.pending(), adapter.side.detach()])
            adapter.side = nn.Parameter(base.clone(), requires_grad=False)
        if after // cfg.merge_freq > before // cfg.merge_freq:
            merged = 1.0
            if cfg.retrieve:
                memories, mins = adapter.memories(), adapter.memory_min_act.tolist()
                # merge_freq / save_freq shards (fewer only when one batch spans several shards)
                n = min(cfg.merge_freq // cfg.save_freq, len(memories))
                if n:
                    new = self._ties(base, memories[-n:], [cfg.weights / n] * n)
                    adapter.set_memories([*memories[:-n], new], [*mins[:-n], min(mins[-n:])])
            elif adapter.n_pending:
                adapter.merged = self._merge_into(base, adapter.pending(), adapter.merged)
                adapter.set_pending([])
        if not cfg.retrieve and cfg.merge_pending_at_eval and after >= cfg.save_freq:
            extra = [] if torch.equal(adapter.side, base) else [adapter.side.detach()]
            shards = adapter.pending() + extra
            if shards:  # what the reference's first call after editing merges (WISE.__call__)
                adapter.eval_merged = self._merge_into(base, shards, adapter.merged)
                adapter.eval_side_base = True
        return {"wise_merged": merged}

    def _merge_into(
        self, base: torch.Tensor, shards: list[torch.Tensor], merged: torch.Tensor | None
    ) -> torch.Tensor:
        """WISE-Merge's merge_weight: the shards (and the merged memory, if any) onto W."""
        n = len(shards)
        if merged is None:
            return self._ties(base, shards, [self.config.weights / n] * n)
        share = WISE_MERGE_SHARD_SHARE
        return self._ties(base, [*shards, merged], [share / n] * n + [1.0 - share])

    def _ties(self, base: torch.Tensor, tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
        cfg = variant("easyedit", density=self.config.densities, weights=weights)
        return merge_models({"w": base}, [{"w": t} for t in tensors], cfg)["w"]

    # --- training ------------------------------------------------------------------------------

    def _batch(self, tokenizer, requests: Sequence[EditRequest], device) -> _Batch:
        cfg = self.config
        templates = self.templates or ["{}"]
        answers = [answer_ids(tokenizer, " " + r.target_new) for r in requests]
        enc = encode(  # WISE reads no subject position: each row is a template around the prompt text
            tokenizer,
            [t.replace("{}", r.text, 1) for r in requests for t in templates],
            [None] * (len(requests) * len(templates)),
            suffixes=[a for a in answers for _ in templates],
        )
        rows = [enc.input_ids[i, : int(n)].tolist() for i, n in enumerate(enc.lengths)]
        loc = [self.loc[_case_index(r.case_id, len(self.loc))] for r in requests]
        rows += [tokenizer(text, add_special_tokens=True)["input_ids"][: cfg.loc_max_tokens] for text in loc]
        ids, attn = right_pad(rows, pad_id(tokenizer))
        pick_rows, pick_cols, gold, owner = [], [], [], []
        for i, row in enumerate(rows):
            if i < len(requests) * len(templates):
                n_answer = len(answers[i // len(templates)])
                for p in range(len(row) - n_answer, len(row)):
                    pick_rows.append(i)
                    pick_cols.append(p - 1)
                    gold.append(row[p])
                    owner.append(i)
        as_long = lambda v: torch.tensor(v, dtype=torch.long, device=device)  # noqa: E731
        return _Batch(
            ids.to(device),
            attn.to(device),
            as_long(pick_rows),
            as_long(pick_cols),
            as_long(gold),
            as_long(owner),
            len(requests),
            len(templates),
        )

    def _loss(self, model, batch: _Batch, adapter: WiseAdapter) -> tuple[torch.Tensor, dict[str, float]]:
        alpha, beta, gamma = (float(v) for v in self.config.act_margin)
        with logits_at(model, batch.pick_rows, batch.pick_cols) as picked:
            out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        logits = picked.select(out.logits).float()
        nll = F.cross_entropy(logits, batch.gold.to(logits.device), reduction="none")
        owner = batch.owner.to(nll.device)
        n_edit = batch.n_requests * batch.n_templates
        per_row = torch.zeros(n_edit, device=nll.device).index_add_(0, owner, nll)
        per_row = per_row / torch.bincount(owner, minlength=n_edit).clamp(min=1)
        ft = per_row.mean()
        d = adapter._train.scores  # [R, T]
        real = batch.attention_mask.to(d.device, d.dtype)
        score = (d * real).sum(1) / real.sum(1)  # mean over each row's real tokens
        d_in = score[:n_edit].view(batch.n_requests, batch.n_templates)
        d_out = score[n_edit:]
        margins = []
        for i in range(batch.n_requests):
            terms = (
                d_out[i] - d_in[i] + gamma,  # [Δ_out − Δ_in + γ]₊
                (d_out[i] - alpha).view(1),  # [Δ_out − α]₊
                beta - d_in[i],  # [β − Δ_in]₊
            )
            margins.append(sum(t[t > 0].mean() if bool((t > 0).any()) else t.new_zeros(()) for t in terms))
        act = torch.stack(margins).mean()
        loss = ft + act.to(ft.device)
        return loss, {
            "wise_ft_loss": float(ft.detach()),
            "wise_act_loss": float(act.detach()),
            "wise_act_in": float(d_in.detach().mean()),
            "wise_act_out": float(d_out.detach().mean()),
        }

    def _train(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        requests: Sequence[EditRequest],
        name: str,
        adapter: WiseAdapter,
        mask: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Train W′ on ``requests`` with ``adapter`` swapped in; the model is left as found."""
        cfg = self.config
        base = adapter.base_weight.detach().float()
        weight = adapter.side.detach().float().clone().requires_grad_(True)
        opt = torch.optim.SGD([weight], lr=cfg.edit_lr, weight_decay=cfg.weight_decay)
        batch = self._batch(tokenizer, requests, model_device(model))
        flags = {n: p.requires_grad for n, p in model.named_parameters()}
        stop = _EarlyStop()
        recorded: dict[str, float] = {}
        steps = 0
        if cfg.norm_constraint is not None:
            low, high = base - cfg.norm_constraint, base + cfg.norm_constraint
        adapter._train = _Training(weight)
        handle = ModulePatch({name: adapter}).attach(model)
        try:
            for p in model.parameters():
                p.requires_grad_(False)
            for i in range(cfg.n_iter):
                loss, info = self._loss(model, batch, adapter)
                if stop.stop():
                    recorded = info
                    break
                if i == cfg.n_iter - 1:
                    recorded = info
                (grad,) = torch.autograd.grad(loss, [weight])
                weight.grad = grad * mask
                opt.step()
                steps += 1
                stop.update(float(loss.detach()))
                if cfg.norm_constraint is not None:
                    with torch.no_grad():
                        weight.copy_(torch.clamp(weight, low, high))
        finally:
            adapter._train = None
            handle.restore()
            for n, p in model.named_parameters():
                p.requires_grad_(flags[n])
        return weight.detach(), recorded | {"wise_steps": float(steps), "wise_final_loss": stop.value}
