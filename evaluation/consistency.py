"""Consistency (reference score): TF-IDF cosine between a case's generated texts and reference texts
about the NEW object.

As ROME/MEMIT/CoME compute it: all of the case's generated texts joined by spaces, against all
Wikipedia snippets ``attribute_snippets.json`` lists for (relation_id, target_new id), joined by
spaces; TF-IDF with the IDF vector ``idf.npy`` and vocabulary ``tfidf_vocab.json`` (scikit-learn's
``TfidfVectorizer`` defaults: lower case, tokens of 2+ word characters, raw counts times IDF, L2
norm). Those three files come from the reference's data host (``ROME_DATA_URL``); ``TfIdf`` and
``AttributeSnippets`` read them.

When they are not available, or the dataset has no relation and object ids (the EasyEdit
CounterFact schema), ``dataset_references`` builds the references from the loaded dataset itself
(statements of the new object about OTHER subjects: rewrite prompts with their true object and
neighborhood prompts with theirs), and ``TfIdf.fit`` fits the IDF on a stated corpus. The runner
labels the source in summary.json: such a number is not comparable with the papers'.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from evaluation.cases import EditCase

__all__ = [
    "ROME_DATA_FILES",
    "ROME_DATA_URL",
    "AttributeSnippets",
    "TfIdf",
    "dataset_references",
]

#: where the reference code downloads its generation-metric files (MEMIT's host; ROME's
#: https://rome.baulab.info/data/dsets/ serves the same files).
ROME_DATA_URL = "https://memit.baulab.info/data/dsets/"
ROME_DATA_FILES = ("attribute_snippets.json", "idf.npy", "tfidf_vocab.json")

_TOKEN = re.compile(r"(?u)\b\w\w+\b")  # scikit-learn's default token_pattern


class TfIdf:
    """A fixed-vocabulary TF-IDF encoder (scikit-learn ``TfidfVectorizer`` semantics, no dependency)."""

    def __init__(self, vocabulary: Mapping[str, int], idf: np.ndarray, source: str) -> None:
        idf = np.asarray(idf, dtype=np.float64)
        if idf.ndim != 1 or len(idf) != len(vocabulary):
            raise ValueError(
                f"TF-IDF from {source}: the IDF vector has shape {idf.shape} but the vocabulary has "
                f"{len(vocabulary)} entries"
            )
        if vocabulary and max(vocabulary.values()) >= len(idf):
            raise ValueError(f"TF-IDF from {source}: vocabulary indices exceed the IDF vector")
        self.vocabulary = dict(vocabulary)
        self.idf = idf
        self.source = source

    @classmethod
    def load(cls, directory: Path) -> TfIdf:
        """The reference's ``idf.npy`` + ``tfidf_vocab.json`` from ``directory``."""
        directory = Path(directory)
        vocab = json.loads((directory / "tfidf_vocab.json").read_text())
        return cls(vocab, np.load(directory / "idf.npy"), source=f"{directory} (idf.npy, tfidf_vocab.json)")

    @classmethod
    def fit(cls, documents: Iterable[str], source: str, min_df: int = 1) -> TfIdf:
        """Smoothed IDF fitted on ``documents``: ln((1 + n) / (1 + df)) + 1, as scikit-learn."""
        df: Counter[str] = Counter()
        n = 0
        for doc in documents:
            n += 1
            df.update(set(tokens(doc)))
        words = sorted(w for w, c in df.items() if c >= min_df)
        if not words:
            raise ValueError(f"TF-IDF fit on {source}: no tokens in {n} documents")
        idf = np.array([math.log((1 + n) / (1 + df[w])) + 1 for w in words])
        return cls({w: i for i, w in enumerate(words)}, idf, source=f"fitted on {source} ({n} documents)")

    def encode(self, text: str) -> np.ndarray:
        """The L2-normalised TF-IDF vector of ``text`` (zeros when no token is in the vocabulary)."""
        vec = np.zeros(len(self.idf))
        for word, count in Counter(tokens(text)).items():
            index = self.vocabulary.get(word)
            if index is not None:
                vec[index] = count * self.idf[index]
        norm = np.linalg.norm(vec)
        return vec / norm if norm > 0 else vec

    def similarity(self, a: str, b: str) -> float:
        """Cosine of the two texts' TF-IDF vectors (0 when either has no known token)."""
        return float(self.encode(a) @ self.encode(b))


def tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


class AttributeSnippets:
    """The reference's ``attribute_snippets.json``: (relation_id, object id) -> Wikipedia snippets."""

    def __init__(self, snippets: Mapping[tuple[str, str], list[str]], source: str) -> None:
        self.snippets = dict(snippets)
        self.source = source

    @classmethod
    def load(cls, path: Path) -> AttributeSnippets:
        records = json.loads(Path(path).read_text())
        out: dict[tuple[str, str], list[str]] = defaultdict(list)
        for i, rec in enumerate(records):
            try:
                key = (str(rec["relation_id"]), str(rec["target_id"]))
                out[key].extend(sample["text"] for sample in rec["samples"])
            except (KeyError, TypeError) as err:
                raise ValueError(f"{path}: record {i} is not an attribute-snippet record ({err!r})") from err
        return cls(out, source=str(path))

    def for_case(self, case: EditCase) -> list[str] | None:
        """The case's reference texts, or None when it lacks relation/object ids."""
        relation, target = case.meta.get("relation_id"), case.meta.get("target_new_id")
        if relation is None or target is None:
            return None
        return self.snippets.get((str(relation), str(target)), [])


def dataset_references(cases: Sequence[EditCase], max_texts: int = 50) -> dict[str, list[str]]:
    """Per case: statements from the dataset that give the case's NEW object as the true answer of
    another subject (rewrite prompt + true object; neighborhood prompt + its target), at most
    ``max_texts``, in dataset order. Statements that mention the case's own subject are left out."""
    by_answer: dict[str, list[str]] = defaultdict(list)
    for case in cases:
        if case.true_answer:
            by_answer[case.true_answer].append(f"{case.request.text} {case.true_answer}")
        for probe in case.probes.get("neighborhood", ()):
            by_answer[probe.target].append(f"{probe.prompt} {probe.target}")
    out: dict[str, list[str]] = {}
    for case in cases:
        subject = case.request.subject
        seen: dict[str, None] = {}
        for text in by_answer.get(case.request.target_new, ()):
            if subject not in text:
                seen.setdefault(text)
        out[case.case_id] = list(seen)[:max_texts]
    return out
