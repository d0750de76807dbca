"""Model inputs for any subset of a fixed set of rows, with the tokens before the edit position
run once.

Target-vector optimisation runs the same rows (prompts with their teacher-forced answer) through
the model at every step, and changes the hidden state at one position per row: the subject's last
token. In a causal LM nothing before that position depends on the change, so :class:`RowFeed`
runs those tokens once, keeps their keys and values (a ``transformers`` ``DynamicCache``), and
feeds only the tokens from the edit position on at every step: in CounterFact-style prompts with
MEMIT's context templates that is about a quarter of the tokens. The result is the same up to
float rounding.

The cached path needs a ``transformers`` model with SDPA or eager attention (it passes its own
4-D additive attention masks and position ids); any other model, or ``reuse_prefix=False``, gets
whole right-padded rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from editors.core.logits import logits_at
from editors.core.tokens import Encoded

#: What one more forward pass costs, in padded tokens, when rows are grouped by length (``RowFeed.plan``).
PASS_COST = 64


def supports_prefix_cache(model: torch.nn.Module) -> bool:
    """A ``transformers`` model whose attention takes a 4-D additive mask (SDPA or eager)."""
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) in ("sdpa", "eager")


def _float_dtype(model: torch.nn.Module) -> torch.dtype:
    for param in model.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.float32


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, Q, K] bool -> [B, 1, Q, K] additive mask (0 where allowed, the dtype's minimum elsewhere)."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def cache_argument(model: torch.nn.Module) -> str:
    """The forward keyword that takes a key/value cache: ``cache`` (transformers >= 5.24, where
    ``past_key_values`` is deprecated and goes in 5.40) or ``past_key_values`` (earlier versions).
    Read from the forward signature, not from a version number or a model name."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def output_cache(out):
    """The key/value cache of a model output, under either name."""
    return out["cache"] if "cache" in out else out["past_key_values"]


def _cache_tensors(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) per layer of a ``transformers`` cache, whatever its version's layout."""
    if hasattr(cache, "layers"):  # transformers >= 4.56
        return [(layer.keys, layer.values) for layer in cache.layers]
    if hasattr(cache, "key_cache"):
        return list(zip(cache.key_cache, cache.value_cache))
    return [(k, v) for k, v, *_ in cache]  # legacy tuple of tuples


@dataclass
class Step:
    """One forward pass over a subset of rows: ``kwargs`` for the model, and per selected row the
    column of the edit position (``edit_cols``) and how far its columns are shifted from the
    encoded row's (``shift``: a column c of the row is column c - shift of the input)."""

    kwargs: dict
    edit_cols: torch.Tensor
    shift: torch.Tensor


class RowFeed:
    """Inputs for subsets of ``enc``'s rows; ``edit_positions[r]`` is where row r is changed.

    With ``reuse_prefix`` (and a model that allows it) the tokens before each row's edit position
    are run once here, with no gradient; :meth:`step` then feeds the rest of the rows.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        enc: Encoded,
        edit_positions: torch.Tensor,
        reuse_prefix: bool = True,
    ) -> None:
        self.enc = enc
        self.edit = edit_positions.cpu()
        self.lengths = enc.lengths.cpu()
        self.device = next(model.parameters()).device
        self.dtype = _float_dtype(model)
        self.cache_kw = cache_argument(model)
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        if reuse_prefix and supports_prefix_cache(model) and int(self.edit.max()) > 0:
            self._run_prefix(model)

    @property
    def cached(self) -> bool:
        return self.kv is not None

    @torch.no_grad()
    def _run_prefix(self, model: torch.nn.Module) -> None:
        n_rows = len(self.lengths)
        width = int(self.edit.max())
        ids = self.enc.input_ids.cpu()
        # Prefixes left-padded to a common width, so that every row's edit position comes next.
        prefix = torch.zeros((n_rows, width), dtype=torch.long)
        valid = torch.zeros((n_rows, width), dtype=torch.bool)
        positions = torch.zeros((n_rows, width), dtype=torch.long)
        # Suffixes (edit position to end) right-padded.
        suffix_len = self.lengths - self.edit
        suffix = torch.zeros((n_rows, int(suffix_len.max())), dtype=torch.long)
        for row in range(n_rows):
            e, n = int(self.edit[row]), int(self.lengths[row])
            prefix[row, width - e :] = ids[row, :e]
            valid[row, width - e :] = True
            positions[row, width - e :] = torch.arange(e)
            suffix[row, : n - e] = ids[row, e:n]
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        allowed = causal & valid[:, None, :]
        allowed |= torch.eye(width, dtype=torch.bool) & ~valid[:, :, None]  # pad queries: no NaN
        nothing = torch.zeros(0, dtype=torch.long, device=self.device)
        with logits_at(model, nothing, nothing):  # the prefix needs no logits
            out = model(
                input_ids=prefix.to(self.device),
                attention_mask=_additive(allowed, self.dtype).to(self.device),
                position_ids=positions.to(self.device),
                use_cache=True,
            )
        self.kv = [(k.detach(), v.detach()) for k, v in _cache_tensors(output_cache(out))]
        self.prefix_valid = valid
        self.suffix = suffix
        self.suffix_len = suffix_len

    def fed_lengths(self, rows: torch.Tensor) -> torch.Tensor:
        """Tokens fed per row at each step (the suffix with a prefix cache, else the whole row)."""
        return (self.suffix_len if self.kv is not None else self.lengths)[rows.cpu()]

    def plan(self, rows: torch.Tensor, pass_cost: int = PASS_COST) -> list[torch.Tensor]:
        """``rows`` cut into groups of similar length, one forward pass each, so that padding stays
        small: the cut minimises padded tokens fed + ``pass_cost`` per pass (exact, over the
        distinct lengths). One group when padding costs less than another pass."""
        rows = rows.cpu()
        lengths = self.fed_lengths(rows)
        values, counts = torch.unique(lengths, return_counts=True)  # ascending
        values, counts = values.tolist(), counts.tolist()
        n = len(values)
        prefix = [0]
        for c in counts:
            prefix.append(prefix[-1] + c)
        best = [0.0] + [float("inf")] * n  # best[j]: cost of the j shortest distinct lengths
        cut = [0] * (n + 1)
        for j in range(1, n + 1):
            for i in range(j):
                cost = best[i] + pass_cost + (prefix[j] - prefix[i]) * values[j - 1]
                if cost < best[j]:
                    best[j], cut[j] = cost, i
        bounds, j = [], n
        while j > 0:
            bounds.append((values[cut[j]], values[j - 1]))
            j = cut[j]
        groups = []
        for low, high in reversed(bounds):
            chosen = rows[(lengths >= low) & (lengths <= high)]
            if len(chosen):
                groups.append(chosen)
        return groups

    def step(self, rows: torch.Tensor) -> Step:
        """Model inputs for ``rows`` (CPU indices of encoded rows, in the order given)."""
        rows = rows.cpu()
        if self.kv is None:
            width = int(self.lengths[rows].max())
            kwargs = {
                "input_ids": self.enc.input_ids[rows, :width].to(self.device),
                "attention_mask": self.enc.attention_mask[rows, :width].to(self.device),
            }
            return Step(kwargs, self.edit[rows].to(self.device), torch.zeros(len(rows), dtype=torch.long))
        from transformers import DynamicCache

        width = int(self.suffix_len[rows].max())
        # Prefixes are left-padded: the rows' longest prefix is the last ``keep`` columns.
        keep = int(self.edit[rows].max())
        start = self.prefix_valid.shape[1] - keep
        valid = torch.arange(width)[None, :] < self.suffix_len[rows][:, None]  # [n, S]
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        allowed = torch.cat(
            [
                self.prefix_valid[rows, start:][:, None, :].expand(-1, width, -1),
                causal & valid[:, None, :],  # a pad query still sees its row's edit position
            ],
            dim=2,
        )
        kwargs = {
            "input_ids": self.suffix[rows, :width].to(self.device),
            "attention_mask": _additive(allowed, self.dtype).to(self.device),
            "position_ids": (self.edit[rows][:, None] + torch.arange(width)[None, :]).to(self.device),
        }
        if keep:  # else every row starts at its edit position: nothing before it to reuse
            cache = DynamicCache()
            for layer, (keys, values) in enumerate(self.kv):
                index = rows.to(keys.device)  # layers may sit on different devices
                cache.update(
                    keys[:, :, start:].index_select(0, index),
                    values[:, :, start:].index_select(0, index),
                    layer,
                )
            kwargs.update({self.cache_kw: cache, "use_cache": True})
        return Step(kwargs, torch.zeros(len(rows), dtype=torch.long, device=self.device), self.edit[rows])
