"""Text corpora for covariance statistics, by id: ``wikitext2`` (bundled), ``file:<path>``,
``hf:<dataset path>[/<config>]`` (streamed with HF datasets; needs the network on first use), and
``training``: the sentences a locally trained model (the toy) was trained on, one document each."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from runner.datasets import bundled_path


def _paragraphs(path: Path) -> Iterator[str]:
    """Paragraphs of a plain-text file: WikiText's ` = Heading = ` lines are skipped."""
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            text = line.strip()
            if text and not (text.startswith("=") and text.endswith("=")):
                yield text


def _hf_texts(spec: str) -> Iterator[str]:
    from datasets import load_dataset

    parts = spec.split("/")
    if len(parts) >= 3:
        path, name = "/".join(parts[:2]), "/".join(parts[2:])
    else:
        path, name = spec, None
    stream = load_dataset(path, name, split="train", streaming=True)
    for record in stream:
        yield record["text"]


def corpus_texts(corpus: str, training: Sequence[str] = ()) -> Callable[[], Iterable[str]]:
    """A re-iterable source of documents for ``corpus``; a clear error for an unknown id.
    ``training``: the model's own training sentences, for ``corpus="training"``."""
    if corpus == "training":
        if not training:
            raise ValueError(
                "stats.corpus=training needs a model trained here (model=toy); "
                "for this model use stats=wikitext2, stats=wikipedia or stats.corpus=file:<path>"
            )
        texts = tuple(training)
        return lambda: iter(texts)
    if corpus in ("wikitext2", "wikitext"):
        path = bundled_path("wikitext2")
        return lambda: _paragraphs(path)
    if corpus.startswith("file:"):
        path = Path(corpus[len("file:") :]).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"stats.corpus file {path} does not exist")
        return lambda: _paragraphs(path)
    if corpus.startswith("hf:"):
        spec = corpus[len("hf:") :]
        return lambda: _hf_texts(spec)
    raise ValueError(
        f"unknown stats.corpus {corpus!r}: expected wikitext2, training, file:<path> or hf:<dataset>[/<config>]"
    )
