"""Fluency (generation n-gram entropy), as ROME/MEMIT/CoME compute it.

Per generated text: NLTK word tokens; the frequency-based Shannon entropy, in bits, of the 2-gram
and of the 3-gram distribution; weighted 2/3 and 4/3 and averaged (arithmetic):
``GE = (2/3 * H2 + 4/3 * H3) / 2``. A case's fluency is the mean over its texts; the runner reports
the mean over cases times 100 (hence values around 620 for GPT-J).

Word tokens: ``nltk.word_tokenize`` needs NLTK's Punkt sentence model (``punkt_tab``), a separate
data download (``python -m nltk.downloader punkt_tab``). When it is not installed, the same NLTK
word tokenizer runs on sentences split by an untrained Punkt tokenizer (no learned abbreviations:
"Dr." ends a sentence there). ``WordTokenizer.name`` says which one ran; the runner records it
in summary.json.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence

__all__ = ["NGRAM_WEIGHTS", "WordTokenizer", "case_fluency", "ngram_entropy", "weighted_entropy"]

#: n -> weight, as in the reference (arithmetic mean of the weighted entropies).
NGRAM_WEIGHTS: dict[int, float] = {2: 2 / 3, 3: 4 / 3}


class WordTokenizer:
    """NLTK's ``word_tokenize`` when its Punkt model is installed, else the fallback (module doc).
    ``name`` says which one runs."""

    def __init__(self) -> None:
        import nltk
        from nltk.tokenize import NLTKWordTokenizer
        from nltk.tokenize.punkt import PunktSentenceTokenizer

        try:
            nltk.data.find("tokenizers/punkt_tab/english/")
            self._sentences = None
            self._tokenize = nltk.word_tokenize
            self.name = "nltk.word_tokenize (punkt_tab)"
        except LookupError:
            self._sentences = PunktSentenceTokenizer()
            self._tokenize = NLTKWordTokenizer().tokenize
            self.name = "NLTK word tokenizer on untrained-Punkt sentences (punkt_tab not installed)"

    def __call__(self, text: str) -> list[str]:
        if self._sentences is None:
            return self._tokenize(text)
        return [w for s in self._sentences.tokenize(text) for w in self._tokenize(s)]


def ngram_entropy(tokens: Sequence[str], n: int) -> float:
    """Shannon entropy in bits of the frequency distribution of the text's n-grams (0 if none)."""
    grams = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    total = sum(grams.values())
    return -sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0


def weighted_entropy(tokens: Sequence[str], weights: dict[int, float] = NGRAM_WEIGHTS) -> float:
    """The weighted n-gram entropy of one tokenised text (the reference's ``compute_n_gram_entropy``)."""
    return sum(w * ngram_entropy(tokens, n) for n, w in weights.items()) / len(weights)


def case_fluency(texts: Sequence[str], tokenize: Callable[[str], list[str]]) -> float:
    """Mean weighted n-gram entropy over one case's generated texts."""
    if not texts:
        raise ValueError("fluency needs at least one generated text")
    return sum(weighted_entropy(tokenize(t)) for t in texts) / len(texts)
