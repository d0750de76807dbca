"""GRACE (Hartvigsen et al., NeurIPS 2023): a codebook adapter on one layer, editing by lookup.

One module (``module`` at ``layer``; EasyEdit: GPT-2 XL ``transformer.h.35.mlp.c_fc``, GPT-J
``transformer.h.25.mlp.fc_out``, LLaMA ``model.layers.27.mlp.down_proj``) is swapped for a
:class:`GraceAdapter` that holds a codebook of entries (key, value, ε, label):

- **key**: the wrapped module's *input* at the edit token, the last prompt token;
- **value**: a learnt vector that *replaces* the module's output where the entry matches;
- **ε**: the deferral radius: an input matches the entry nearest to it (Euclidean) if it lies within
  that entry's ε; an input no entry matches gets the module's own output, bit for bit;
- **label**: the edit's target (``target_new``).

**Adding an edit** (references: zjunlp/EasyEdit ``easyeditor/models/grace/GRACE.py`` @14cea82 and
Thartvigsen/GRACE ``grace/editors/grace.py`` @f674183, the codebook update at iteration 0), with q the
key of the new edit, e the entry nearest to q and d their distance (:meth:`GraceAdapter.insert`):

- empty codebook, or d > ε_init + ε_e: a new entry (q, value, ε_init, label) ("new");
- else, e's label differs: a new entry, and both radii shrink to half the distance,
  ε_e = d/2 − 1e-5 and ε_new = d/2 ("split");
- else (same label), d > ε_e: ``eps_expand: coverage`` grows ε_e to d; ``moving_average`` also moves
  e's key halfway to q ("expand"); d ≤ ε_e: nothing changes ("inside"). The edit then trains e's value.

The trained value is the new entry's (cold start: uniform [0, 1) as ``torch.rand``, seeded here per
case; ``val_init: warm``: the module's own output at the edit token), or e's for a same-label edit.
It is trained with Adam (``edit_lr``) for ``n_iter`` steps on the teacher-forced NLL of
" " + target_new after the prompt (mean over its tokens: the LM loss of the reference with the
prompt's labels masked); everything else is frozen, the other entries included (the reference's
Adam runs over all values but only the chosen one gets a gradient). Requests of a batch are added
one after another, each trained alone, as the reference edits one request per call.

**Where the codebook is consulted.** The reference looks at ONE position per forward pass,
``token_to_edit = min(key_id, T − 1)``: while editing ``key_id`` is the last prompt token of the edit
(number of −100 labels − 1); afterwards it keeps the LAST edit's ``key_id`` (EasyEdit; ``generate``
sets it to −1 and it then sticks at the first generate call's last position; the original repo uses
−1, the last position, outside its hallucination task), and the query of every row of the batch is
taken there. That depends on the padding and length of whatever is fed, which our scorer (padded
batches of whole prompt+answer sequences) and generation (left-padded prompts, then one token at
a time) do not fix. Here EVERY position is a query: its input is compared with the codebook and
decides for that position. For ``replace_last`` this is the reference's rule at the reference's
position wherever the reference looks at the edit token (the edit prompt while editing and when
scored, where its key_id is that prompt's last token): the edit's own key is found there (distance
≈ 0) and only that position's output is replaced. It differs where the reference looks elsewhere: a
paraphrase or neighbourhood prompt is matched at its own tokens (the reference: at the position of
the last edit's key_id, or at the last position in generation), and any other position whose input
falls within some ε is replaced too (the reference cannot see it). Training uses the same
per-position rule, so what is trained is what is evaluated.

``replacement`` (the reference's three): ``replace_last`` replaces the matched position's output;
``replace_prompt`` a match at position t replaces positions 0 .. t−1 of its row (the reference's
``layer_out[:, :token_to_edit]``, the matched token itself keeps its output; with several matches a
position takes the value of the first match after it); ``replace_all`` a match anywhere replaces
every position of the row with the value of the row's closest match. The adapter does not see the
attention mask: with ``replace_prompt``/``replace_all`` a padding position that matched would
replace its row's real tokens (it changes only padding outputs with ``replace_last``).

**Deviations from the reference, each a switch or a note:**

- per-position lookup instead of the sticky ``key_id`` (above; no switch: the reference's rule needs
  a position the runner does not have);
- ``label_match: text`` compares ``target_new`` strings; ``label_mean`` is the reference's test, the
  mean of the label tensor (−100 at prompt tokens, then the answer ids) compared for equality;
- EasyEdit prepends each new label to its label list (``[label] + key_labels``), so labels and keys
  are misaligned after the first add; the original repo appends. Labels here stay aligned (the
  original repo's behaviour; the misalignment is not reproduced);
- ``tie_break: latest``: equally near keys (an edit of a prompt already in the codebook) resolve
  to the latest entry; ``first`` is the reference (``min`` returns the first). With ``first`` a
  prompt edited again with another label splits at d = 0 (ε_old = −1e-5, ε_new = 0) and then
  matches the old entry, outside its radius: neither edit answers any more;
- cold values are seeded (``seed``, and the case id): the reference draws them unseeded;
- distances are float64, the nearest key found from ‖q‖² − 2q·k + ‖k‖² and its distance computed
  as ‖q − k‖ directly (the reference: ``torch.cdist`` in float32, whose matrix-product path loses
  ~1e-3 of a squared distance of inputs of norm 100, and depends on the batch); a radius expanded
  to a distance is stored rounded up to float32, so the edit that set it is matched again;
- an edit whose entry replaces nothing in its own sequence (``replace_prompt`` on a one-token
  prompt) is not trained and is counted in ``grace_missed`` (the reference trains it with zero
  gradients: its ``torch.where`` keeps the value in the graph);
- the value is trained in float32 and cast to the module's dtype where it replaces (as EasyEdit);
- ``dist_fn`` (reference: euc, mmd, cos) and ``val_train: adv`` are not offered: the reference code
  computes Euclidean distances whatever ``dist_fn`` says, and its perturbation zeroes the noise of
  row 0, the only row of a single-request edit (a no-op); ``reg: early_stop`` is not implemented in
  the reference's training loop (a fixed ``n_iter`` steps), nor here.

Run beside the original repo's ``grace/editors/grace.py`` (unmodified, ``task: hallucination`` so
that its key is the last prompt token) on tiny random GPT-2 and LLaMA models with 17 edits that
make new entries, splits, an expansion and a repeat, ``label_match=label_mean tie_break=first
val_init=warm`` gives the same actions, radii, keys and values and the same logits, bit for bit,
with ``eps_expand`` coverage and moving_average. EasyEdit's copy differs from the original in the
label misalignment above and in building a new ``GRACE`` per edit, whose ``__init__`` freezes every
parameter, the codebook's values included: a same-label edit near an entry (expand or inside)
then fails (``element 0 of tensors does not require grad``).

The codebook lives in the adapter, not in the editor: ``apply`` copies the codebook of a GRACE
adapter it finds at the module (sequential editing), adds the new entries to the copy, and returns a
:class:`ModulePatch` with that new adapter around the wrapped module, leaving the model as it found
it; restoring a batch's patch, or merging it in sequential mode, both work as for any patch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from editors import checks
from editors.base import EditorBase
from editors.core.tokens import answer_ids, encode, model_device
from editors.hooks import get_module
from editors.patch import Adapter, ModulePatch
from editors.requests import EditRequest
from editors.spec import ModelSpec

REPLACEMENTS = ("replace_last", "replace_prompt", "replace_all")
EPS_EXPANDS = ("coverage", "moving_average")
VAL_INITS = ("cold", "warm")
LABEL_MATCHES = ("text", "label_mean")
TIE_BREAKS = ("latest", "first")
SPEC_MODULES = ("mlp_out", "attn_out")
SPLIT_MARGIN = 1e-5  # the reference's margin: ε_nearest = d/2 − 1e-5 on a split

# what insert() did, as a number in the per-case diagnostics
NEW, SPLIT, EXPAND, INSIDE = 0, 1, 2, 3
ACTIONS = {NEW: "new", SPLIT: "split", EXPAND: "expand", INSIDE: "inside"}

_ROWS = 512  # query rows per distance block (bounds the float64 copies)


@dataclass
class GraceConfig:
    """GRACE hyperparameters (reference names of EasyEdit's hparams/GRACE/*.yaml; per-model values in
    conf/editor_model/grace_<model>.yaml)."""

    _target_: str = "editors.grace.Grace"
    layer: int = 27  # layer of the wrapped module (reference inner_params; EasyEdit llama-7b: 27)
    module: str = (
        "mlp_out"  # mlp_out | attn_out (the model's templates) | a module-name template with {} for the layer
    )
    eps: float = 1.0  # ε_init, the deferral radius of a new entry (reference eps)
    edit_lr: float = 1.0  # Adam learning rate of the value (reference edit_lr)
    n_iter: int = 100  # Adam steps per edit (reference n_iter: original repo 100, EasyEdit 200/50)
    replacement: str = "replace_last"  # replace_last | replace_prompt | replace_all (reference replacement)
    eps_expand: str = (
        "coverage"  # coverage | moving_average: same-label edit near an entry (reference eps_expand)
    )
    val_init: str = (
        "cold"  # cold: uniform [0, 1) | warm: the module's output at the edit token (reference val_init)
    )
    label_match: str = "text"  # text: same target_new | label_mean: the reference's label-tensor mean test
    tie_break: str = "latest"  # equally near keys: latest entry | first (the reference)
    seed: int = 0  # seed of cold values (with the case id; the reference does not seed them)

    def __post_init__(self) -> None:
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            checks.fail("editor.layer", "a layer index ≥ 0", self.layer)
        if self.module not in SPEC_MODULES and "{}" not in self.module:
            checks.fail("editor.module", "mlp_out, attn_out or a module-name template with {}", self.module)
        checks.positive("editor.eps", self.eps)
        checks.positive("editor.edit_lr", self.edit_lr)
        checks.non_negative("editor.n_iter", self.n_iter)
        checks.one_of("editor.replacement", self.replacement, REPLACEMENTS)
        checks.one_of("editor.eps_expand", self.eps_expand, EPS_EXPANDS)
        checks.one_of("editor.val_init", self.val_init, VAL_INITS)
        checks.one_of("editor.label_match", self.label_match, LABEL_MATCHES)
        checks.one_of("editor.tie_break", self.tie_break, TIE_BREAKS)


def module_dims(module: nn.Module) -> tuple[int, int]:
    """(input width, output width) of a linear layer: ``nn.Linear`` or GPT-2's ``Conv1D``."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    weight = getattr(module, "weight", None)
    nf = getattr(module, "nf", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2 and nf is not None:  # Conv1D: weight [in, out]
        return int(weight.shape[0]), int(nf)
    raise TypeError(f"GRACE wraps a linear layer (nn.Linear or Conv1D), got {type(module).__name__}")


def _at_least(value: float, like: torch.Tensor) -> torch.Tensor:
    """``value`` in ``like``'s dtype, rounded up: a radius set to a distance (float64) still covers
    it once stored in float32."""
    out = torch.tensor(value, dtype=like.dtype, device=like.device)
    if float(out) < value:
        out = torch.nextafter(out, torch.tensor(float("inf"), dtype=like.dtype, device=like.device))
    return out


@dataclass
class _Store:
    """Rows of keys and values shared by a chain of adapter copies: ``filled`` rows are in use, by
    the adapter that appended the last of them and (their first rows) by the adapters before it."""

    keys: torch.Tensor
    values: torch.Tensor
    filled: int


class GraceAdapter(Adapter):
    """The codebook around ``inner`` (see the module docstring). Buffers ``keys`` [N, d_in],
    ``values`` [N, d_out] and ``eps`` [N] (float32) and ``labels`` (N strings, in the config)."""

    def __init__(
        self,
        inner: nn.Module,
        dim_in: int,
        dim_out: int,
        replacement: str = "replace_last",
        labels: Sequence[str] = (),
        tie_break: str = "latest",
    ) -> None:
        super().__init__(inner)
        if replacement not in REPLACEMENTS:
            raise ValueError(f"replacement must be one of {REPLACEMENTS}, got {replacement!r}")
        if tie_break not in TIE_BREAKS:
            raise ValueError(f"tie_break must be one of {TIE_BREAKS}, got {tie_break!r}")
        self.tie_break = tie_break
        try:
            device = next(inner.parameters()).device
        except StopIteration:
            device = torch.device("cpu")
        n = len(labels)
        self.dim_in, self.dim_out, self.replacement = int(dim_in), int(dim_out), replacement
        self.labels: list[str] = list(labels)
        self.register_buffer("keys", torch.zeros(n, self.dim_in, device=device))
        self.register_buffer("values", torch.zeros(n, self.dim_out, device=device))
        self.register_buffer("eps", torch.zeros(n, device=device))
        self._store: _Store | None = None  # rows shared with earlier/later copies (see copy())
        self._shared = 0  # rows 0 .. _shared-1 may be seen by other adapters: copy before writing
        self._train: tuple[int, torch.Tensor] | None = None  # (entry, value being trained)
        self._record: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # (input, output) per call

    # ------------------------------------------------------------------ save / load, copies

    def adapter_config(self) -> dict:
        return {
            "dim_in": self.dim_in,
            "dim_out": self.dim_out,
            "replacement": self.replacement,
            "tie_break": self.tie_break,
            "labels": list(self.labels),
        }

    @classmethod
    def from_config(cls, inner: nn.Module, config: dict) -> GraceAdapter:
        return cls(
            inner,
            config["dim_in"],
            config["dim_out"],
            config["replacement"],
            config["labels"],
            config.get("tie_break", "latest"),
        )

    def adapter_state(self) -> dict[str, torch.Tensor]:
        # own copies: keys and values are views into storage shared with other copies
        return {"keys": self.keys.clone(), "values": self.values.clone(), "eps": self.eps.clone()}

    def copy(
        self, inner: nn.Module | None = None, replacement: str | None = None, tie_break: str | None = None
    ) -> GraceAdapter:
        """A new adapter with this codebook, around ``inner`` (default: the same module).

        A copy-on-write copy: keys and values are views of rows both adapters share (never written
        again: the copy's new entries are appended after them, in place only while no other
        adapter has rows there, and writing an existing row copies the whole codebook first); ε
        and labels are copied. N sequential edits thus hold O(N) codebook rows, not O(N²), while
        every adapter of the chain keeps its own codebook for an exact restore."""
        new = GraceAdapter(
            self.inner if inner is None else inner,
            self.dim_in,
            self.dim_out,
            self.replacement if replacement is None else replacement,
            tie_break=self.tie_break if tie_break is None else tie_break,
        )
        new.keys, new.values, new.eps = self.keys, self.values, self.eps.clone()
        new.labels = list(self.labels)
        new._store, new._shared = self._store, len(self)
        self._shared = len(self)  # the copy sees them too
        return new

    def _writable(self, entry: int) -> None:
        """Make row ``entry`` of keys/values this adapter's own before writing it."""
        if entry < self._shared:
            self.keys, self.values = self.keys.clone(), self.values.clone()
            self._store, self._shared = None, 0

    def _owns_tail(self) -> bool:
        """Whether rows can be appended in place: the store's rows end where this codebook does."""
        st = self._store
        return (
            st is not None
            and st.filled == len(self)
            and len(self) < st.keys.shape[0]
            and self.keys.data_ptr() == st.keys.data_ptr()
            and self.values.data_ptr() == st.values.data_ptr()
            and self.keys.dtype == st.keys.dtype
            and self.values.dtype == st.values.dtype
        )

    def __len__(self) -> int:
        return len(self.labels)

    def extra_repr(self) -> str:
        return f"entries={len(self)}, dim_in={self.dim_in}, dim_out={self.dim_out}, {self.replacement}"

    # ------------------------------------------------------------------ lookup

    def nearest(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Distance to, and index of, the nearest key for each row of ``queries`` [M, d_in], in
        float64; ties go to the latest entry (``tie_break: latest``) or the first (``first``, the
        reference). The nearest key is found from ‖q‖² − 2q·k + ‖k‖²; the distance returned is
        ‖q − k‖ of that key, computed directly: the same for a row whatever else is in the batch,
        so that an edit whose radius was set to its own distance (coverage) is matched again when
        its input recurs bit for bit. The codebook must not be empty."""
        latest = self.tie_break == "latest"
        keys = self.keys.to(torch.float64)
        if latest:
            keys = keys.flip(0)  # argmin's first minimum is then the latest entry
        k2 = keys.square().sum(1)
        n = keys.shape[0]
        dists, index = [], []
        for lo in range(0, queries.shape[0], _ROWS):
            q = queries[lo : lo + _ROWS].to(torch.float64)
            i = (k2[None, :] - 2.0 * (q @ keys.T)).argmin(1)  # ‖q‖² is the same for every key
            dists.append((q - keys[i]).square().sum(1).sqrt())
            index.append((n - 1) - i if latest else i)
        return torch.cat(dists), torch.cat(index)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.inner(x, *args, **kwargs)
        if self._record is not None:
            self._record.append((x.detach(), out.detach()))
        if len(self) == 0:
            return out
        flat_x = x.reshape(-1, x.shape[-1])
        if flat_x.shape[0] == 0:
            return out
        dist, idx = self.nearest(flat_x.detach())
        hit = dist <= self.eps[idx].to(torch.float64)
        if not bool(hit.any()):
            return out  # nothing matched: the module's own output, bit for bit
        values = self.values
        if self._train is not None:
            entry, trained = self._train
            values = values.index_copy(0, torch.tensor([entry], device=values.device), trained[None])
        flat = out.reshape(-1, out.shape[-1])
        if self.replacement == "replace_last":
            rows = hit.nonzero().squeeze(1)
            chosen = idx[rows]
        else:
            if out.dim() < 3:
                raise ValueError(f"{self.replacement} needs [batch, positions, width] inputs")
            width = out.shape[-2]
            pos = torch.arange(flat.shape[0], device=flat.device)
            hits = hit.view(-1, width)
            if self.replacement == "replace_prompt":
                # each position takes the first match strictly after it in its row
                big = flat.shape[0]
                at = torch.where(hit, pos, torch.full_like(pos, big)).view(-1, width)
                following = torch.cat([at[:, 1:], torch.full_like(at[:, :1], big)], dim=1)
                nxt = following.flip(1).cummin(1).values.flip(1).reshape(-1)  # index of the next match
                rows = (nxt < big).nonzero().squeeze(1)
                chosen = idx[nxt[rows]]
            else:  # replace_all: every position of a row with a match takes its closest match
                closest = torch.where(hits, dist.view(-1, width), torch.inf).argmin(1)
                row_entry = idx.view(-1, width).gather(1, closest[:, None]).squeeze(1)
                matched = hits.any(1)
                rows = pos.view(-1, width)[matched].reshape(-1)
                chosen = row_entry[matched].repeat_interleave(width)
        flat = flat.index_copy(0, rows, values[chosen].to(flat.dtype))
        return flat.view(out.shape)

    # ------------------------------------------------------------------ codebook update

    def _append(self, key: torch.Tensor, value: torch.Tensor, eps: float, label: str) -> int:
        n = len(self)
        with torch.no_grad():
            if not self._owns_tail():  # a new store (room for twice as many rows) with our rows
                cap = max(16, 2 * (n + 1))
                keys = self.keys.new_zeros(cap, self.dim_in)
                values = self.values.new_zeros(cap, self.dim_out)
                keys[:n], values[:n] = self.keys, self.values
                self._store, self._shared = _Store(keys, values, n), 0
            st = self._store
            st.keys[n] = key.detach().to(st.keys)
            st.values[n] = value.detach().to(st.values)
            st.filled = n + 1
            self.keys, self.values = st.keys[: n + 1], st.values[: n + 1]
            self.eps = torch.cat(
                [self.eps, torch.tensor([eps], dtype=self.eps.dtype, device=self.eps.device)]
            )
        self.labels.append(label)
        return n

    def set_value(self, entry: int, value: torch.Tensor) -> None:
        self._writable(entry)
        with torch.no_grad():
            self.values[entry] = value.detach().to(self.values)

    def insert(
        self,
        key: torch.Tensor,
        label: str,
        value: torch.Tensor,
        eps_init: float,
        eps_expand: str = "coverage",
    ) -> tuple[int, int, float]:
        """Add an edit with key ``key`` [d_in] and target ``label`` (the reference's codebook update at
        iteration 0). ``value`` [d_out] is the initial value if an entry is made. Returns (action, the
        entry whose value the edit trains, distance to the nearest earlier key; nan if none)."""
        if len(self) == 0:
            return NEW, self._append(key, value, eps_init, label), float("nan")
        dist, index = self.nearest(key.reshape(1, -1))
        d, j = float(dist[0]), int(index[0])
        if d > eps_init + float(self.eps[j]):
            return NEW, self._append(key, value, eps_init, label), d
        if self.labels[j] != label:
            new = self._append(key, value, eps_init, label)
            with torch.no_grad():
                self.eps[j] = d / 2 - SPLIT_MARGIN
                self.eps[new] = d / 2
            return SPLIT, new, d
        if d > float(self.eps[j]):
            with torch.no_grad():
                if eps_expand == "moving_average":
                    self._writable(j)
                    self.keys[j] = 0.5 * self.keys[j] + 0.5 * key.to(self.keys)
                self.eps[j] = _at_least(d, self.eps)
            return EXPAND, j, d
        return INSIDE, j, d


class Grace(EditorBase):
    """GRACE (see the module docstring)."""

    config: GraceConfig

    def __init__(self, config: GraceConfig, spec: ModelSpec) -> None:
        super().__init__(config, spec)
        self.module_name()  # fail on a bad layer or template before any edit

    def module_name(self) -> str:
        cfg = self.config
        if cfg.module == "mlp_out":
            return self.spec.mlp_out_name(cfg.layer)
        if cfg.module == "attn_out":
            return self.spec.attn_out_name(cfg.layer)
        if not 0 <= cfg.layer < self.spec.n_layers:
            raise ValueError(f"layer {cfg.layer} out of range for a model with {self.spec.n_layers} layers")
        return cfg.module.format(cfg.layer)

    def adapter_for(self, model: nn.Module) -> GraceAdapter:
        """A new adapter for ``model``: a copy of the GRACE codebook already at the module (earlier
        edits kept in sequential mode), around the module that adapter wraps; else an empty one
        around the module found there."""
        current = get_module(model, self.module_name())
        if isinstance(current, GraceAdapter):
            return current.copy(current.inner, self.config.replacement, self.config.tie_break)
        dim_in, dim_out = module_dims(current)
        return GraceAdapter(
            current, dim_in, dim_out, self.config.replacement, tie_break=self.config.tie_break
        )

    def _label(self, request: EditRequest, n_prompt: int, answer: Sequence[int]) -> str:
        if self.config.label_match == "text":
            return request.target_new.strip()
        labels = [-100.0] * n_prompt + [float(t) for t in answer]
        return repr(float(torch.tensor(labels).mean()))

    def _cold(self, request: EditRequest, width: int, device: torch.device) -> torch.Tensor:
        digest = hashlib.sha256(f"{self.config.seed}:{request.case_id}".encode()).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
        return torch.rand(width, generator=gen).to(device)

    def _edit(self, model, tok, adapter: GraceAdapter, request: EditRequest) -> dict[str, float]:
        cfg = self.config
        device = model_device(model)
        answer = answer_ids(tok, " " + request.target_new)
        enc = encode(tok, [request.prompt], [request.subject], suffixes=[answer]).to(device)
        n_prompt = int(enc.lengths[0]) - len(answer)
        key_pos = n_prompt - 1  # the last prompt token (reference key_id)
        targets = enc.input_ids[0, n_prompt:]
        positions = torch.arange(key_pos, key_pos + len(answer), device=device)

        def loss_of() -> torch.Tensor:
            logits = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits
            logp = torch.log_softmax(logits[0, positions].float(), dim=-1)
            return -logp.gather(1, targets[:, None]).mean()

        adapter._record = []
        try:
            with torch.no_grad():
                model(input_ids=enc.input_ids, attention_mask=enc.attention_mask)
            x, y = adapter._record[0]
        finally:
            adapter._record = None
        key = x.reshape(-1, x.shape[-1])[key_pos].float()
        own = y.reshape(-1, y.shape[-1])[key_pos].float()
        init = own if cfg.val_init == "warm" else self._cold(request, adapter.dim_out, own.device)
        action, entry, nearest = adapter.insert(
            key, self._label(request, n_prompt, answer), init, cfg.eps, cfg.eps_expand
        )
        trained = adapter.values[entry].detach().clone().requires_grad_(True)
        opt = torch.optim.Adam([trained], lr=cfg.edit_lr)
        adapter._train = (entry, trained)
        missed = 0.0
        try:
            for _ in range(cfg.n_iter):
                loss = loss_of()
                if not loss.requires_grad:  # the entry replaced no output of this sequence
                    missed = 1.0  # (replace_prompt on a one-token prompt): nothing to train
                    break
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            with torch.no_grad():
                final = float(loss_of())
        finally:
            adapter._train = None
        adapter.set_value(entry, trained)
        return {
            **{f"grace_{what}": float(action == code) for code, what in ACTIONS.items()},
            "grace_eps": float(adapter.eps[entry]),  # ε of the entry the edit trained
            "grace_final_loss": final,  # NLL of the target after training
            "grace_missed": missed,  # 1: the trained entry replaced nothing in the edit's sequence
            "_nearest": nearest,  # distance to the nearest earlier key (nan: none)
        }

    def apply(
        self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, requests: Sequence[EditRequest]
    ) -> ModulePatch:
        name = self.module_name()
        adapter = self.adapter_for(model)
        before = len(adapter)
        flags = {n: p.requires_grad for n, p in model.named_parameters()}
        rows: list[dict[str, float]] = []
        try:
            for p in model.parameters():
                p.requires_grad_(False)  # the base model is frozen; only one value is trained
            handle = ModulePatch({name: adapter}).attach(model)  # trained in place, removed below
            try:
                for request in requests:
                    rows.append(self._edit(model, tokenizer, adapter, request))
            finally:
                handle.restore()
        finally:
            for n, p in model.named_parameters():
                p.requires_grad_(flags[n])
        self.record(requests)
        nearest = [d for r in rows if (d := r.pop("_nearest")) == d]  # finite ones (no nan in JSON)
        case = {k: [r[k] for r in rows] for k in (rows[0] if rows else {})}
        diagnostics = {
            "grace_entries": float(len(adapter)),  # codebook size after the batch
            "grace_new_entries": float(len(adapter) - before),
        }
        if nearest:
            diagnostics["grace_nearest_dist_min"] = float(min(nearest))  # closest earlier key to an edit
        return ModulePatch({name: adapter}, diagnostics=diagnostics, case_diagnostics=case)
