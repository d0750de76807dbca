"""Second-moment statistics C = E[k kᵀ] of MLP down-projection inputs, cached on disk by content.

C is the uncentred second moment over every non-pad token of a text corpus, as in the reference
``layer_stats`` (``mom2``). Statistics for several layers are collected in one pass over the
corpus. A file is named by a hash of everything that determines it (model id and revision,
module, corpus, sample count, length limit, dtype); a partial file is written after every chunk of
documents so that an interrupted computation resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from editors.core.tokens import model_device, pad_id, right_pad
from editors.hooks import record

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float64": torch.float64}


class MissingStatisticsError(RuntimeError):
    """Statistics are not cached and computing them was not allowed."""


@dataclass
class StatsConfig:
    """How covariance statistics are collected (reference: mom2_dataset, mom2_n_samples, mom2_dtype)."""

    corpus: str = "wikitext2"  # corpus id: wikitext2 (bundled), training (the toy's sentences), hf:<path>[/<config>], file:<path>
    n_samples: int = 100000  # documents read (reference: 100,000 Wikipedia articles)
    max_length: int | None = None  # tokens kept per document; None: the model's context length
    dtype: str = "float32"  # accumulation dtype (reference: float32)
    batch_tokens: int = 8192  # padded tokens per forward pass
    chunk_docs: int = 2000  # documents between resumable checkpoints
    allow_compute: bool = True  # compute missing statistics; false: fail with instructions


class SecondMoments:
    """Provides C for named modules of one (unedited) model; an explicit object, no global cache.

    Call :meth:`prefetch` with every module an edit will need before the model is changed: the
    statistics describe the unedited model.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        model_id: str,
        cfg: StatsConfig,
        texts: Callable[[], Iterable[str]],
        cache_dir: Path | str,
        progress: bool = True,
        corpus_digest: str | None = None,
    ) -> None:
        if cfg.dtype not in DTYPES:
            raise ValueError(f"stats.dtype must be one of {sorted(DTYPES)}, got {cfg.dtype!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.cfg = cfg
        self.texts = texts
        self.cache_dir = Path(cache_dir)
        self.progress = progress
        self.corpus_digest = corpus_digest  # in the cache key: a corpus whose id does not fix its texts
        self._memory: dict[str, torch.Tensor] = {}
        self._projectors: dict[tuple[str, float], torch.Tensor] = {}
        self.loaded_from_cache: list[str] = []
        self.computed: list[str] = []

    def max_length(self) -> int:
        if self.cfg.max_length:
            return int(self.cfg.max_length)
        config = getattr(self.model, "config", None)
        for attr in ("n_positions", "max_position_embeddings"):
            value = getattr(config, attr, None)
            if value:
                return int(min(value, 2048))
        return 1024

    def key(self, module: str) -> dict:
        return {
            "model": self.model_id,
            "module": module,
            **{
                k: v
                for k, v in asdict(self.cfg).items()
                if k not in ("allow_compute", "batch_tokens", "chunk_docs")
            },
            "max_length": self.max_length(),
            **({"corpus_digest": self.corpus_digest} if self.corpus_digest else {}),
        }

    def path(self, module: str) -> Path:
        key = self.key(module)
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.model_id)[-60:]
        corpus = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.cfg.corpus)[-40:]
        return (
            self.cache_dir
            / "stats"
            / slug
            / f"{module}__{corpus}__n{self.cfg.n_samples}__{self.cfg.dtype}__{digest}.pt"
        )

    def get(self, module: str) -> torch.Tensor:
        """C for ``module`` as float32 [d_in, d_in] on the CPU."""
        if module not in self._memory:
            self.prefetch([module])
        return self._memory[module]

    def prefetch(self, modules: Sequence[str]) -> None:
        missing = []
        for module in dict.fromkeys(modules):
            if module in self._memory:
                continue
            path = self.path(module)
            if path.exists():
                self._memory[module] = torch.load(path, map_location="cpu", weights_only=True)["mom2"]
                self.loaded_from_cache.append(module)
                log.info("covariance statistics for %s loaded from cache %s", module, path)
            else:
                missing.append(module)
        if not missing:
            return
        if not self.cfg.allow_compute:
            raise MissingStatisticsError(
                f"no cached covariance statistics for {missing} of {self.model_id} "
                f"(corpus {self.cfg.corpus}, {self.cfg.n_samples} samples, {self.cfg.dtype}) under "
                f"{self.cache_dir / 'stats'}. Compute them with `python run.py task=stats` and the same "
                f"model/stats overrides, or allow computing them during the run with stats.allow_compute=true."
            )
        self._compute(missing)

    def projector_path(self, module: str, threshold: float) -> Path:
        path = self.path(module)
        return path.with_name(f"{path.stem}__nullspace{threshold:g}.pt")

    def projector(self, module: str, threshold: float) -> torch.Tensor:
        """P = U Uᵀ over the eigenvectors U of ``module``'s C with eigenvalue < ``threshold``: the
        projector onto the directions the corpus' keys (almost) never take (AlphaEdit's null
        space; the reference takes the SVD of C, equal to its eigendecomposition since C is
        symmetric positive semi-definite). float32 [d_in, d_in] on the CPU, cached on disk next to
        C (a function of C and the threshold only)."""
        if (module, threshold) in self._projectors:
            return self._projectors[(module, threshold)]
        path = self.projector_path(module, threshold)
        if path.exists():
            p = torch.load(path, map_location="cpu", weights_only=True)["projector"]
            log.info("null-space projector for %s loaded from cache %s", module, path)
        else:
            p, kept = nullspace_projector(self.get(module), threshold)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save({"projector": p, "threshold": threshold, "dimension": kept}, tmp)
            tmp.replace(path)
            log.info(
                "null-space projector for %s (dimension %d of %d) written to %s", module, kept, len(p), path
            )
        self._projectors[(module, threshold)] = p
        return p

    def _documents(self) -> Iterator[str]:
        docs = (t for t in self.texts() if t and t.strip())
        return islice(docs, self.cfg.n_samples)

    @torch.no_grad()
    def _compute(self, modules: list[str]) -> None:
        partial = self.path(modules[0]).with_suffix(
            ".partial." + "_".join(modules).replace("/", "_")[:80] + ".pt"
        )
        dtype = DTYPES[self.cfg.dtype]
        state = {"docs": 0, "tokens": 0, "sums": {}}
        if partial.exists():
            state = torch.load(partial, map_location="cpu", weights_only=True)
            log.info("resuming covariance statistics from %s (%d documents done)", partial, state["docs"])
        device = model_device(self.model)
        sums = {m: state["sums"].get(m) for m in modules}
        log.info(
            "computing covariance statistics for %s on %s (%d documents)",
            modules,
            self.cfg.corpus,
            self.cfg.n_samples,
        )
        docs = islice(self._documents(), state["docs"], None)
        bar = tqdm(
            total=self.cfg.n_samples,
            initial=state["docs"],
            desc="covariance stats",
            disable=not self.progress,
        )
        limit = self.max_length()
        while True:
            chunk = list(islice(docs, self.cfg.chunk_docs))
            if not chunk:
                break
            ids = self.tokenizer(chunk, truncation=True, max_length=limit, add_special_tokens=True)[
                "input_ids"
            ]
            for batch in _token_batches(ids, self.cfg.batch_tokens):
                input_ids, mask = right_pad(batch, pad_id(self.tokenizer))
                input_ids, mask = input_ids.to(device), mask.to(device)
                with record(self.model, modules, inputs=True, outputs=False) as rec:
                    self.model(input_ids=input_ids, attention_mask=mask)
                keep = mask.bool()
                for module in modules:
                    k = rec.inputs[module][keep].to(dtype)
                    contrib = (k.T @ k).cpu()
                    sums[module] = contrib if sums[module] is None else sums[module] + contrib
                state["tokens"] += int(keep.sum())
            state["docs"] += len(chunk)
            bar.update(len(chunk))
            state["sums"] = sums
            partial.parent.mkdir(parents=True, exist_ok=True)
            torch.save(state, partial)
        if state["docs"] < self.cfg.n_samples:
            bar.total = state["docs"]
            bar.refresh()
            log.info(
                "corpus %s ended after %d documents (%d asked for)",
                self.cfg.corpus,
                state["docs"],
                self.cfg.n_samples,
            )
        bar.close()
        if state["tokens"] == 0:
            raise ValueError(f"corpus {self.cfg.corpus!r} gave no tokens for covariance statistics")
        for module in modules:
            mom2 = (sums[module] / state["tokens"]).float()
            path = self.path(module)
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(
                {"mom2": mom2, "tokens": state["tokens"], "docs": state["docs"], "key": self.key(module)},
                path,
            )
            self._memory[module] = mom2
            self.computed.append(module)
            log.info("covariance statistics for %s written to %s (%d tokens)", module, path, state["tokens"])
        partial.unlink(missing_ok=True)


def nullspace_projector(second_moment: torch.Tensor, threshold: float) -> tuple[torch.Tensor, int]:
    """(P, its rank): the projector onto the eigenvectors of ``second_moment`` with eigenvalue
    below ``threshold``, computed in float64 and returned as float32."""
    values, vectors = torch.linalg.eigh(second_moment.double())
    small = vectors[:, values < threshold]
    return (small @ small.T).float(), int(small.shape[1])


def _token_batches(ids: list[list[int]], batch_tokens: int) -> Iterator[list[list[int]]]:
    """Length-sorted batches whose padded size stays within ``batch_tokens``."""
    ordered = sorted((x for x in ids if x), key=len)
    batch: list[list[int]] = []
    for x in ordered:
        if batch and len(x) * (len(batch) + 1) > batch_tokens:
            yield batch
            batch = []
        batch.append(x)
    if batch:
        yield batch
