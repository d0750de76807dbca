"""Set up the generation metrics (Fluency, Consistency) of a run from ``cfg.eval.generation``.

Consistency references, by ``consistency``:

- ``rome``: the reference's ``attribute_snippets.json``, ``idf.npy`` and ``tfidf_vocab.json`` from
  ``rome_data_dir`` (default ``${paths.cache_dir}/rome_data``), downloaded there from
  ``evaluation.consistency.ROME_DATA_URL`` when ``download=true``. Needs records with relation and
  object ids (the ROME/MEMIT CounterFact schema). This is the papers' number.
- ``dataset``: references built from the loaded dataset (``evaluation.consistency.dataset_references``)
  and an IDF fitted on ``idf_corpus``. Labelled as such in summary.json; not the papers' number.
- ``auto``: ``rome`` when the three files are there and every case has the ids, else ``dataset``.
- ``none``: Fluency only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from evaluation.cases import EditCase
from evaluation.consistency import (
    ROME_DATA_FILES,
    ROME_DATA_URL,
    AttributeSnippets,
    TfIdf,
    dataset_references,
)
from evaluation.generation import GenerationMetrics, GenerationSettings
from runner.corpus import corpus_texts
from runner.datasets import fetch_url

log = logging.getLogger(__name__)

CONSISTENCY_SOURCES = ("auto", "rome", "dataset", "none")


@dataclass
class GenerationEvalConfig:
    enabled: bool = True  # Fluency/Consistency from sampled generations (eval=fast: false)
    pre_edit: bool = False  # also generate with the unedited model (pre_fluency...; doubles the cost)
    max_length: int = 100  # tokens per text in total, prompt included (reference: 100)
    top_k: int = 5  # top-k sampling (reference: 5)
    batch_size: int = 32  # prompts per generate call
    prompts: str = (
        "record_or_probes"  # record | record_or_probes (rewrite+paraphrase prompts where a record has none)
    )
    keep_texts: bool = True  # write the generated texts to results.jsonl
    consistency: str = "auto"  # auto | rome | dataset | none (see runner/generation.py)
    rome_data_dir: str | None = None  # null: ${paths.cache_dir}/rome_data
    download: bool = False  # fetch the reference's snippet/IDF files into rome_data_dir
    idf_corpus: str = "wikitext2"  # consistency=dataset: the corpus the IDF is fitted on (a stats.corpus id)
    max_references: int = 50  # consistency=dataset: reference statements per case


class ConsistencySetupError(ValueError):
    """consistency=rome asked for but not possible (files or ids missing)."""


def _rome_files(cfg: GenerationEvalConfig, cache_dir: Path) -> Path:
    return Path(cfg.rome_data_dir).expanduser() if cfg.rome_data_dir else cache_dir / "rome_data"


def build_generation_metrics(
    cfg: GenerationEvalConfig, cases: list[EditCase], cache_dir: Path, seed: int
) -> tuple[GenerationMetrics, dict]:
    """The evaluator and a description of the protocol for summary.json."""
    if cfg.consistency not in CONSISTENCY_SOURCES:
        raise ConsistencySetupError(
            f"eval.generation.consistency must be one of {CONSISTENCY_SOURCES}, got {cfg.consistency!r}"
        )
    settings = GenerationSettings(
        max_length=cfg.max_length, top_k=cfg.top_k, batch_size=cfg.batch_size, seed=seed
    )
    directory = _rome_files(cfg, cache_dir)
    if cfg.download and cfg.consistency in ("auto", "rome"):
        for name in ROME_DATA_FILES:
            fetch_url(
                ROME_DATA_URL + name,
                directory / name,
                f"consistency file {name}",
                f"fetch {ROME_DATA_URL}{name} elsewhere and put it in {directory}, or use "
                "eval.generation.consistency=dataset",
                expect_json=name.endswith(".json"),
            )
    have_files = all((directory / name).is_file() for name in ROME_DATA_FILES)
    have_ids = all(c.meta.get("relation_id") and c.meta.get("target_new_id") for c in cases)
    source = cfg.consistency
    if source == "auto":
        source = "rome" if have_files and have_ids else "dataset"
    protocol: dict = {
        "max_length": cfg.max_length,
        "top_k": cfg.top_k,
        "prompts": cfg.prompts,
        "consistency_source": source,
    }
    if source == "rome":
        if not have_files:
            missing = [n for n in ROME_DATA_FILES if not (directory / n).is_file()]
            raise ConsistencySetupError(
                f"eval.generation.consistency=rome needs {', '.join(missing)} in {directory}: pass "
                f"eval.generation.download=true (from {ROME_DATA_URL}), set eval.generation.rome_data_dir, "
                "or use eval.generation.consistency=dataset"
            )
        if not have_ids:
            raise ConsistencySetupError(
                "eval.generation.consistency=rome needs relation and target ids in every record (the ROME/MEMIT "
                "CounterFact schema); this dataset has none: use eval.generation.consistency=dataset"
            )
        snippets = AttributeSnippets.load(directory / "attribute_snippets.json")
        tfidf = TfIdf.load(directory)
        references = snippets.for_case
        protocol |= {
            "consistency_references": f"attribute snippets from {snippets.source}",
            "tfidf": tfidf.source,
            "comparable_with_papers": True,
        }
    elif source == "dataset":
        refs = dataset_references(cases, max_texts=cfg.max_references)
        tfidf = TfIdf.fit(corpus_texts(cfg.idf_corpus)(), source=cfg.idf_corpus)
        references = lambda case: refs.get(case.case_id)  # noqa: E731
        n_with = sum(1 for v in refs.values() if v)
        protocol |= {
            "consistency_references": "dataset-derived: statements of the new object about other subjects "
            "in the loaded dataset (rewrite prompts + true object, neighborhood prompts + target)",
            "tfidf": tfidf.source,
            "cases_with_references": n_with,
            "comparable_with_papers": False,
        }
        log.info(
            "consistency: dataset-derived references (%d of %d cases have some), IDF %s; "
            "not the papers' attribute snippets",
            n_with,
            len(cases),
            tfidf.source,
        )
    else:
        tfidf, references = None, lambda case: None  # noqa: E731
    metrics = GenerationMetrics(settings, tfidf, references, prompt_source=cfg.prompts)
    protocol["word_tokenizer"] = metrics.word_tokenizer.name
    return metrics, protocol
