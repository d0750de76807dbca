"""Batched sampling of continuations, for the generation metrics (Fluency, Consistency).

The protocol is ROME's/MEMIT's ``test_generation``: one continuation per prompt, top-k = 5 sampling
at temperature 1, ``max_length = 100`` tokens **in total, prompt included**, and the decoded text
keeps the prompt. Prompts are sorted by token length and cut into batches, left-padded so that
every row ends at the same position; each row is then cut to its own ``max_length`` budget, so a
prompt gets exactly ``max_length - len(prompt)`` new tokens whichever batch it lands in. A model
with a sequence-routed adapter (WISE: ``editors.patch.sequence_routed``) gets one prompt per batch
and no key/value cache, so that each position is routed on its whole row.

One deliberate difference: the end-of-text token is never sampled (``min_new_tokens`` masks it).
The reference samples it and deletes its string from the decoded text, which leaves the rest of
the continuation in place; masking gives the same kind of text without a short, stopped row.
Sampling is seeded (``seed``) inside a forked RNG, so the run's global RNG state is untouched.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from editors.patch import sequence_routed
from evaluation.cases import EditCase
from evaluation.consistency import TfIdf
from evaluation.fluency import WordTokenizer, case_fluency

__all__ = ["GenerationMetrics", "GenerationSettings", "generate_ids", "generate_texts"]


@dataclass(frozen=True)
class GenerationSettings:
    """How continuations are sampled (defaults: the reference protocol)."""

    max_length: int = 100  # tokens in total, prompt included (ROME/MEMIT max_out_len)
    top_k: int = 5  # top-k sampling at temperature 1
    batch_size: int = 32  # prompts per generate call
    seed: int = 0  # sampling seed
    max_spread: int = 8  # most prompt-length difference (tokens) within one batch


def _context_length(model) -> int | None:
    config = getattr(model, "config", None)
    for key in ("n_positions", "max_position_embeddings"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def _clean(text: str) -> str:
    # As the reference decodes: NFKD-normalised, paragraph breaks joined.
    return unicodedata.normalize("NFKD", text).replace("\n\n", " ")


def generate_texts(
    model, tokenizer, prompts: Sequence[str], settings: GenerationSettings, progress: bool = False
) -> list[str]:
    """One sampled continuation per prompt, decoded with the prompt, in the prompts' order."""
    ids = generate_ids(model, tokenizer, prompts, settings, progress)
    return [_clean(tokenizer.decode(row, skip_special_tokens=True)) for row in ids]


@torch.no_grad()
def generate_ids(
    model, tokenizer, prompts: Sequence[str], settings: GenerationSettings, progress: bool = False
) -> list[list[int]]:
    """Token ids (prompt + continuation, ``max_length`` in all) of one sample per prompt."""
    if not prompts:
        return []
    device = next(model.parameters()).device
    encoded = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
    too_long = [p for p, ids in zip(prompts, encoded) if len(ids) >= settings.max_length]
    if too_long:
        raise ValueError(
            f"{len(too_long)} generation prompt(s) are at least max_length={settings.max_length} tokens "
            f"long (first: {too_long[0][:80]!r}); raise eval.generation.max_length"
        )
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    whole_rows = sequence_routed(model)  # a routed adapter sees each row whole (editors.patch)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out_ids: list[list[int]] = [[] for _ in prompts]
    # A batch's rows all run to its longest prompt + the shortest prompt's budget; bound the spread
    # of prompt lengths in a batch so that this stays within the model's context and wastes little.
    context = _context_length(model)
    spread = (
        settings.max_spread if context is None else min(settings.max_spread, context - settings.max_length)
    )
    if spread < 0:
        raise ValueError(
            f"eval.generation.max_length={settings.max_length} exceeds the model's context of {context} tokens"
        )
    batches: list[list[int]] = []
    for i in order:
        if (
            batches
            and not whole_rows
            and len(batches[-1]) < settings.batch_size
            and len(encoded[i]) - len(encoded[batches[-1][0]]) <= spread
        ):
            batches[-1].append(i)
        else:
            batches.append([i])
    devices = [device] if device.type == "cuda" else []
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(settings.seed)
            for rows in tqdm(batches, desc="generation", disable=not progress):
                width = max(len(encoded[i]) for i in rows)
                ids = torch.full((len(rows), width), pad, dtype=torch.long)
                mask = torch.zeros((len(rows), width), dtype=torch.long)
                for r, i in enumerate(rows):  # left padding
                    ids[r, width - len(encoded[i]) :] = torch.tensor(encoded[i])
                    mask[r, width - len(encoded[i]) :] = 1
                new = settings.max_length - min(len(encoded[i]) for i in rows)
                out = model.generate(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    do_sample=True,
                    top_k=settings.top_k,
                    top_p=1.0,
                    temperature=1.0,
                    max_new_tokens=new,
                    min_new_tokens=new,
                    pad_token_id=pad,
                    use_cache=not whole_rows,
                )
                continuation = out[:, width:].cpu()
                for r, i in enumerate(rows):
                    budget = settings.max_length - len(encoded[i])
                    out_ids[i] = list(encoded[i]) + continuation[r, :budget].tolist()
    finally:
        model.train(was_training)
    return out_ids


class GenerationMetrics:
    """Fluency and Consistency of a batch of cases from ONE batched generation pass.

    ``references(case)`` gives the case's consistency references (``None`` or empty: no
    consistency for that case); ``tfidf`` encodes them. ``prompt_source`` chooses the prompts:
    ``record`` (the dataset's generation prompts only) or ``record_or_probes`` (where a record has
    none, e.g. the EasyEdit CounterFact schema, its rewrite and paraphrase prompts instead).
    """

    PROMPT_SOURCES = ("record", "record_or_probes")

    def __init__(
        self,
        settings: GenerationSettings,
        tfidf: TfIdf | None,
        references: Callable[[EditCase], Sequence[str] | None],
        prompt_source: str = "record_or_probes",
    ) -> None:
        if prompt_source not in self.PROMPT_SOURCES:
            raise ValueError(
                f"generation prompt source must be one of {self.PROMPT_SOURCES}, got {prompt_source!r}"
            )
        self.settings = settings
        self.tfidf = tfidf
        self.references = references
        self.prompt_source = prompt_source
        self.word_tokenizer = WordTokenizer()

    def prompts(self, case: EditCase) -> tuple[tuple[str, ...], str]:
        """The case's generation prompts and where they come from."""
        if case.generation_prompts:
            return tuple(case.generation_prompts), "record"
        if self.prompt_source == "record":
            return (), "none"
        probes = [p.prompt for name in ("rewrite", "paraphrase") for p in case.probes.get(name, ())]
        return tuple(dict.fromkeys(probes)), "rewrite+paraphrase prompts"

    def __call__(self, model, tokenizer, cases: Sequence[EditCase], progress: bool = False) -> list[dict]:
        """Per case: ``fluency``, ``consistency`` (when it has references), ``generation_prompts``
        (their source) and ``generations`` (the texts), for results.jsonl."""
        per_case = [self.prompts(c) for c in cases]
        flat = [p for prompts, _ in per_case for p in prompts]
        texts = generate_texts(model, tokenizer, flat, self.settings, progress=progress)
        out, start = [], 0
        for case, (prompts, source) in zip(cases, per_case):
            mine, start = texts[start : start + len(prompts)], start + len(prompts)
            row: dict = {"generation_prompts": source}
            if mine:
                row["fluency"] = case_fluency(mine, self.word_tokenizer)
                row["generations"] = mine
                refs = self.references(case) if self.tfidf is not None else None
                if refs:
                    row["consistency"] = self.tfidf.similarity(" ".join(mine), " ".join(refs))
            out.append(row)
        return out
