"""Local byte-level BPE tokenizers for tiny and toy models (no network).

Two styles, chosen by the model family:

- ``gpt2`` / ``gptj``: like GPT-2, no BOS is prepended; ``<|endoftext|>`` is eos, bos, unk and pad.
- ``llama``: like LLaMA-3, ``<|begin_of_text|>`` is prepended to every sequence by a
  ``TemplateProcessing`` post-processor; ``<|end_of_text|>`` is eos and pad.

Tokenizers are trained with the ``tokenizers`` library on the given texts and cached on disk under
a content hash of the texts and the settings, so the same inputs give the same tokenizer (and the
same ids) on every run. The result is a ``transformers`` fast tokenizer, so
``return_offsets_mapping`` works.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

GPT2_EOS = "<|endoftext|>"
LLAMA_BOS = "<|begin_of_text|>"
LLAMA_EOS = "<|end_of_text|>"
TOKENIZER_RECIPE = "bytelevel-bpe-v1"

STYLES = ("gpt2", "gptj", "llama")


def _special_tokens(style: str) -> list[str]:
    if style not in STYLES:
        raise ValueError(f"unknown tokenizer style {style!r}; expected one of {STYLES}")
    return [LLAMA_BOS, LLAMA_EOS] if style == "llama" else [GPT2_EOS]


def content_hash(payload: object) -> str:
    """A short sha256 of a JSON-serialisable payload (sorted keys), used as a cache key."""
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


def train_bpe(
    texts: Iterable[str], *, vocab_size: int, style: str, min_frequency: int = 2
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it as a ``transformers`` fast tokenizer."""
    specials = _special_tokens(style)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    byte_level = processors.ByteLevel(trim_offsets=True)
    if style == "llama":
        bos_id = tok.token_to_id(LLAMA_BOS)
        template = processors.TemplateProcessing(
            single=f"{LLAMA_BOS} $A",
            pair=f"{LLAMA_BOS} $A {LLAMA_BOS}:1 $B:1",
            special_tokens=[(LLAMA_BOS, bos_id)],
        )
        tok.post_processor = processors.Sequence([byte_level, template])
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token=LLAMA_BOS, eos_token=LLAMA_EOS, pad_token=LLAMA_EOS
        )
    tok.post_processor = byte_level
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=GPT2_EOS, eos_token=GPT2_EOS, unk_token=GPT2_EOS, pad_token=GPT2_EOS
    )


def load_or_train_tokenizer(
    texts: Sequence[str],
    *,
    vocab_size: int,
    style: str,
    cache_dir: Path,
    min_frequency: int = 2,
) -> tuple[PreTrainedTokenizerBase, str]:
    """The tokenizer trained on ``texts`` with these settings, from ``cache_dir`` when already there.

    Returns the tokenizer and its content hash (the cache key).
    """
    key = content_hash(
        {
            "recipe": TOKENIZER_RECIPE,
            "style": "llama" if style == "llama" else "gpt2",
            "vocab_size": vocab_size,
            "min_frequency": min_frequency,
            "texts": list(texts),
        }
    )
    path = Path(cache_dir) / "tokenizers" / key
    if not (path / "tokenizer.json").exists():
        tokenizer = train_bpe(texts, vocab_size=vocab_size, style=style, min_frequency=min_frequency)
        with atomic_dir(path) as tmp:
            tokenizer.save_pretrained(tmp)
    return AutoTokenizer.from_pretrained(str(path)), key


class atomic_dir:
    """``with atomic_dir(final) as tmp:`` write into ``tmp``; it becomes ``final`` on success.

    When another process finished the same directory first, its copy is kept (same content key,
    same content) and ours is discarded.
    """

    def __init__(self, final: Path) -> None:
        self.final = Path(final)

    def __enter__(self) -> Path:
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.", dir=self.final.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        try:
            os.replace(self.tmp, self.final)
        except OSError:
            if not self.final.exists():
                raise
            shutil.rmtree(self.tmp, ignore_errors=True)
