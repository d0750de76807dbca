"""Covariance corpora by id: the bundled WikiText-2, a file, and a trained-here model's own sentences."""

from __future__ import annotations

import pytest

from runner.corpus import corpus_texts


def test_training_corpus_is_the_models_sentences_and_reiterable():
    source = corpus_texts("training", ["Paris is in France", "Rome is in Italy"])
    assert list(source()) == ["Paris is in France", "Rome is in Italy"]
    assert list(source()) == list(source())  # every pass over the corpus sees the same documents


def test_training_corpus_without_training_sentences_names_the_alternatives():
    with pytest.raises(ValueError, match="stats=wikitext2"):
        corpus_texts("training", ())


def test_file_corpus_skips_headings(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text(" = Heading = \nfirst line\n\nsecond line\n", encoding="utf-8")
    assert list(corpus_texts(f"file:{path}")()) == ["first line", "second line"]
    with pytest.raises(ValueError, match="training"):
        corpus_texts("wiki")
