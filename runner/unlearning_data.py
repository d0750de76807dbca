"""Unlearning datasets: TOFU, RWKU and SemEval-2025 Task 4 -> :class:`UnlearningSet` (splits of
:class:`QAItem`).

Bundled offline copies live in ``runner/data/unlearning/`` (origin, licences, sha256 and the format
traps of the source files: ``runner/data/unlearning/SOURCES.md``). ``path=`` points at a folder with
the full files in their original layout instead: TOFU's folder of json files (``full.json``,
``forgetXX_perturbed.json``, ``retain_perturbed.json``, ``holdoutXX.json``,
``real_authors_perturbed.json``, ``world_facts_perturbed.json``, ``idontknow.jsonl``), or RWKU's
folder that contains ``Target/<n>_<Name>/``.

TOFU (Maini et al. 2024; 200 fictitious authors x 20 QA pairs, 20 consecutive records per author):

* ``forget``: ``forgetXX_perturbed`` (question, answer, paraphrased_answer, 5 perturbed answers,
  paraphrased_question); forget01/05/10 = the last 2/10/20 authors = 40/200/400 items. A folder
  without ``forget01/05_perturbed.json`` (the bundled copy) gives their records as the last
  40/200 records of ``forget10_perturbed.json`` (checked record by record: identical).
* ``retain``: ``retain_perturbed`` (= the first 400 records of ``full`` = the first 20 authors),
  only the first ``retain_authors`` authors when that is set.
* ``real_authors``, ``world_facts``: the ``*_perturbed`` files; ``perturbed_answers`` = the 3 wrong
  options (their order and answers equal ``real_authors.json`` / ``world_facts.json``).
* ``holdout`` (``holdout=True``): ``holdoutXX`` of the forget split's size (= prefix of holdout10),
  question and answer only; authors not in ``full`` (the MIA non-members).
* ``train``: what a model that holds the knowledge was fine-tuned on: ``full`` = the kept retain
  authors' records of ``full.json`` + the forget authors' records; ``retain`` = the kept retain
  authors' records (all 180/190/198 retain authors when ``retain_authors`` is None); and
  ``unseen`` = the retain authors' records that ``retain_authors`` leaves out (absent when it
  keeps them all): no model learns their answers; a toy may learn to decline them.

Every TOFU item about an author gets ``subject`` = the author's name as written in the question when
the question names the author (:func:`tofu_author_names`), else None.

RWKU (Jin et al. 2024; real people as targets, no forget corpus by design): per target
``forget_level1`` (cloze), ``forget_level2`` (questions), ``forget_level3`` (adversarial),
``neighbor_level1/2`` (about related entities), ``forget_mia`` / ``retain_mia`` (texts). Roles:
``forget`` = the union of levels 1 and 2 (the questions to be unlearned, as edit requests; the
level splits stay for evaluation), ``retain`` = ``neighbor_level2`` (see :data:`RWKU_RETAIN_SPLIT`),
``utility`` = both neighbour levels, MIA = forget_mia vs retain_mia. ``train`` is empty (the
knowledge is pre-trained). Each target's ``intro.json`` ("Please forget X. <bio>") is kept in
``info["intro"]``.

SemEval-2025 Task 4 (``semeval25``; the data is gated and not bundled: ``path=`` is a user's copy of
``llmunlearningsemeval2025organization/semeval25-unlearning-dataset-public``, see
:data:`SEMEVAL_ACCESS`): records ``id, input, output, task`` (and optionally ``split``) in the
files ``data/{forget,retain}_{train,validation}-*.parquet`` as released, or the README's JSON
conversion ``{train,validation}/{forget,retain}.jsonl`` (pandas' column-oriented JSON), or
``{forget,retain}_{fold}.json[l]`` (records as a JSON array or JSON Lines). Splits:

* ``forget`` / ``retain``: the ``fold`` (default ``train``: what is unlearned) of each; an item is
  ``question`` = ``input``, ``answer`` = ``output`` (both stripped: the scorer joins them with one
  space), item id :func:`evaluation.semeval.semeval_item_id` (it carries the subtask ``task`` and,
  by the id's ``sc<k>``/``qa<k>`` suffix, the kind, which the Task Aggregate reads);
* MIA: the released ``mia_data/member.jsonl`` and ``nonmember.jsonl`` (``id, document``; or the
  folder ``mia_path``), scored as whole texts like the task's script (splits ``mia_member`` /
  ``mia_nonmember``); without them, members = ``forget`` and non-members = ``holdout`` = the other
  fold's forget records. That is right only for a model that never saw the other fold (the toy,
  which learns the ``fold``'s records): the released target models memorised both folds, so for
  them give ``mia_data``; ``info["mia"]`` says which pair was used;
* ``mmlu`` (``mmlu_path``: a copy of MMLU's test split with ``cais/mmlu``'s fields ``question,
  subject, choices, answer``, a file or a folder of parquet/JSON files, or the hub id
  ``cais/mmlu``, fetched when online): one item per question, the prompt of
  :func:`evaluation.semeval.mmlu_prompt`, the letters as options. Without a copy (or offline) the
  split is absent and ``info["skipped_metrics"]["mmlu"]`` names why.

``train``: ``full`` = the fold's forget + retain records, ``retain`` = its retain records.

Errors are :class:`runner.datasets.DatasetError` with a one-line message; a malformed record raises
:class:`runner.datasets.InvalidRecordError` naming the file and the record index (or is skipped and
counted in ``info["skipped"]`` with ``on_invalid="skip"``).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

from evaluation.cases import QAItem, SplitRoles
from evaluation.semeval import MMLU_LETTERS, MMLU_SPLIT, item_kind, mmlu_prompt, semeval_item_id
from runner.datasets import DATA_DIR, DatasetError, InvalidRecordError

__all__ = [
    "BUNDLED_UNLEARNING_DIR",
    "RWKU_RETAIN_SPLIT",
    "SEMEVAL_ACCESS",
    "TOFU_FORGET_SPLITS",
    "UnlearningDatasetConfig",
    "UnlearningSet",
    "first_forget_items",
    "load_unlearning",
    "tofu_author_names",
    "tofu_subject",
]

#: The bundled copies (``tofu/``, ``rwku/Target/``); see its ``SOURCES.md``.
BUNDLED_UNLEARNING_DIR = DATA_DIR / "unlearning"
NAMES = ("tofu", "rwku", "semeval25")
ON_INVALID = ("error", "skip")
#: TOFU forget split -> number of QA pairs (the last 2/10/20 authors of ``full``).
TOFU_FORGET_SPLITS: dict[str, int] = {"forget01": 40, "forget05": 200, "forget10": 400}
TOFU_QA_PER_AUTHOR = 20
TOFU_N_QA = 4000
#: RWKU gives no retain corpus; a baseline that trains on a retain split gets the level-2 neighbour
#: questions (QA pairs like the forget questions). Locality scores on that split are then no longer
#: held-out; ``neighbor_level1`` (cloze) stays untouched.
RWKU_RETAIN_SPLIT = "neighbor_level2"
RWKU_FILES = (
    "forget_level1",
    "forget_level2",
    "forget_level3",
    "neighbor_level1",
    "neighbor_level2",
    "forget_mia",
    "retain_mia",
)

_TOFU_MEASURES = {
    "forget": ("prob", "truth_ratio", "rouge_l", "refusal", "loss", "min_k"),
    "retain": ("prob", "truth_ratio", "rouge_l", "refusal"),
    "real_authors": ("prob_normalized", "truth_ratio", "rouge_l"),
    "world_facts": ("prob_normalized", "truth_ratio", "rouge_l"),
    "holdout": ("loss", "min_k"),
}
#: SemEval-2025 Task 4: ROUGE-L and exact match on both kinds (the summary takes the kind's own),
#: loss / Min-K% on the MIA splits (the forget split when it is the member split)
SEMEVAL_SPLITS = ("forget", "retain")
SEMEVAL_FOLDS = ("train", "validation")
_SEMEVAL_EVAL = ("rouge_l", "exact_match")
_SEMEVAL_MIA = ("loss", "min_k")
#: where the gated data comes from (the one-line error when ``path`` is missing names it)
SEMEVAL_ACCESS = (
    "the data is gated: register at llmunlearningsemeval2025.github.io for a token, then "
    "snapshot_download llmunlearningsemeval2025organization/semeval25-unlearning-dataset-public"
)
MMLU_HUB = "cais/mmlu"

_RWKU_MEASURES = {
    "forget": ("rouge_l", "refusal"),
    "forget_level1": ("rouge_l", "refusal"),
    "forget_level2": ("rouge_l", "refusal"),
    "forget_level3": ("rouge_l", "refusal"),
    "neighbor_level1": ("rouge_l",),
    "neighbor_level2": ("rouge_l",),
    "forget_mia": ("loss", "min_k"),
    "retain_mia": ("loss", "min_k"),
}


# --------------------------------------------------------------------------------------------- configs


@dataclass
class UnlearningDatasetConfig:
    """Structured-config schema of the Hydra ``dataset`` group for unlearning (``unlearning_dataset``)."""

    name: str  # tofu | rwku | semeval25
    path: str | None = None  # folder with the full files in the original layout; None: the bundled copy
    forget_split: str = "forget05"  # TOFU: forget01 | forget05 | forget10 (2 / 10 / 20 authors)
    retain_authors: int | None = None  # TOFU: keep the first N retain authors (20 QA each); None: all
    targets: list[str] | None = None  # RWKU: target names ("Stephen King") or folders ("1_Stephen_King")
    n_targets: int | None = None  # RWKU: the first N targets (by number); None with targets None: all
    size: int | None = None  # cap on the items of every split (the first N); None: all
    holdout: bool = True  # TOFU: add the holdout split (MIA non-members, same size as the forget split)
    on_invalid: str = "error"  # error: stop at a malformed record, naming it | skip: skip and count it
    # TOFU: fetch the splits from the hub (locuslab/TOFU, with `datasets`) into cache_dir once and
    # read them there (RWKU: download its Target folder yourself and give dataset.path)
    download: bool = False
    cache_dir: str | None = None  # where download=true keeps the files (null: ~/.cache/knowedit/datasets)
    fold: str = "train"  # SemEval: the forget/retain fold unlearned and scored (train | validation)
    mia_path: str | None = None  # SemEval: folder of member.jsonl, nonmember.jsonl; None: <path>/mia_data
    mmlu_path: str | None = None  # SemEval: MMLU test copy (file, folder) or the hub id cais/mmlu

    def __post_init__(self) -> None:
        p = "dataset."
        if self.download and self.name == "rwku":
            raise DatasetError(
                "dataset.download=true fetches TOFU only: download RWKU's Target folder "
                "(github jinzhuoran/RWKU or the hub's jinzhuoran/RWKU) and give dataset.path"
            )
        if self.name not in NAMES:
            raise DatasetError(f"{p}name must be one of {', '.join(NAMES)}, got {self.name!r}")
        if self.name == "semeval25":
            if self.path is None:
                raise DatasetError(
                    f"dataset semeval25 needs {p}path=<folder of your copy of the task's data>: {SEMEVAL_ACCESS}"
                )
            if self.download:
                raise DatasetError(f"{p}download=true fetches TOFU only: for semeval25, {SEMEVAL_ACCESS}")
        elif self.mia_path is not None or self.mmlu_path is not None:
            raise DatasetError(f"{p}mia_path and {p}mmlu_path are semeval25 options (dataset {self.name})")
        if self.fold not in SEMEVAL_FOLDS:
            raise DatasetError(f"{p}fold must be one of {', '.join(SEMEVAL_FOLDS)}, got {self.fold!r}")
        for key in ("mia_path", "mmlu_path"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise DatasetError(f"{p}{key} must be a path or null, got {value!r}")
        if self.path is not None and (not isinstance(self.path, str) or not self.path.strip()):
            raise DatasetError(f"{p}path must be a folder path or null (bundled), got {self.path!r}")
        if self.forget_split not in TOFU_FORGET_SPLITS:
            raise DatasetError(
                f"{p}forget_split must be one of {', '.join(TOFU_FORGET_SPLITS)}, got {self.forget_split!r}"
            )
        _check_count(self.retain_authors, f"{p}retain_authors", "all retain authors")
        _check_count(self.n_targets, f"{p}n_targets", "all targets")
        _check_count(self.size, f"{p}size", "all items")
        if self.targets is not None:
            if isinstance(self.targets, str) or not isinstance(self.targets, Sequence):
                raise DatasetError(f"{p}targets must be a list of target names or null, got {self.targets!r}")
            self.targets = list(self.targets)
            if not self.targets or not all(isinstance(t, str) and t.strip() for t in self.targets):
                raise DatasetError(f"{p}targets must be a non-empty list of names, got {self.targets!r}")
            if self.n_targets is not None:
                raise DatasetError(f"{p}targets and {p}n_targets are exclusive: set one, the other null")
        if not isinstance(self.holdout, bool):
            raise DatasetError(f"{p}holdout must be true or false, got {self.holdout!r}")
        if self.on_invalid not in ON_INVALID:
            raise DatasetError(
                f"{p}on_invalid must be one of {', '.join(ON_INVALID)}, got {self.on_invalid!r}"
            )


@dataclass(frozen=True)
class UnlearningSet:
    """The splits of one unlearning dataset and what each is for.

    ``splits``: split -> items. ``roles``: :class:`SplitRoles` (forget / retain / utility / MIA pair
    and the measures per split). ``train``: what a model holding the knowledge was trained on (TOFU:
    ``full`` and ``retain``; RWKU: empty). ``refusals``: refusal sentences (TOFU ``idontknow``).
    ``source``: the folder read. ``sha256``: over the files read (names and contents, in order).
    ``info``: counts per split (``n_<split>``, ``n_train_<name>``) and the files' sha256, skipped records,
    TOFU author/subject counts, RWKU targets and intros.
    """

    name: str
    splits: dict[str, tuple[QAItem, ...]]
    roles: SplitRoles
    train: dict[str, tuple[QAItem, ...]]
    refusals: tuple[str, ...]
    source: str
    sha256: str
    info: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ public API


def load_unlearning(cfg: UnlearningDatasetConfig | Mapping | object) -> UnlearningSet:
    """Load TOFU, RWKU or SemEval-2025 Task 4 from an :class:`UnlearningDatasetConfig`, a DictConfig
    or a dict."""
    cfg = _as_config(cfg)
    reader = _Reader(cfg.on_invalid)
    if cfg.name == "tofu":
        return _load_tofu(cfg, reader)
    if cfg.name == "semeval25":
        return _load_semeval(cfg, reader)
    return _load_rwku(cfg, reader)


def first_forget_items(data: UnlearningSet, n: int | None) -> UnlearningSet:
    """``data`` with only the first ``n`` items of the forget split (``unlearn.forget_items``;
    None: ``data`` itself), so that a curve over ``n`` unlearns and scores the same prefix
    throughout. The splits made of forget items (RWKU's ``forget_level1/2``, whose union is
    ``forget``) keep the items of that prefix; when the forget split is also the MIA member split
    (TOFU, SemEval without ``mia_data``) the non-member split (``holdout``, as many items as the
    forget split by construction) is cut to its first ``n`` too, keeping the pair balanced. Every
    other split (retain, real_authors, world_facts, RWKU's level-3 probes and MIA texts), ``train``
    and the refusals are unchanged. Raises ``ValueError`` for an ``n`` the forget split lacks."""
    if n is None:
        return data
    roles = data.roles
    forget_all = data.splits[roles.forget]
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(forget_all):
        raise ValueError(f"forget_items must be 1..{len(forget_all)} (the forget split's items), got {n!r}")
    forget = forget_all[:n]
    kept = {item.item_id for item in forget}
    every = {item.item_id for item in forget_all}
    splits: dict[str, tuple[QAItem, ...]] = {}
    for name, items in data.splits.items():
        if name == roles.forget:
            splits[name] = forget
        elif items and all(item.item_id in every for item in items):
            splits[name] = tuple(item for item in items if item.item_id in kept)
        elif roles.mia_member == roles.forget and name == roles.mia_nonmember:
            splits[name] = items[:n]
        else:
            splits[name] = items
    info = {**data.info, **{f"n_{name}": len(items) for name, items in splits.items()}, "forget_items": n}
    return replace(data, splits=splits, info=info)


def tofu_author_names(records: Sequence[Mapping], block: int = TOFU_QA_PER_AUTHOR) -> list[tuple[str, ...]]:
    """The author's name forms of every block of ``block`` consecutive TOFU records (one author each).

    Rule: in each record's question and answer, find the runs of capitalised words (lower-case name
    particles such as ``de``/``van``/``al`` and one parenthesised nickname allowed inside, a trailing
    ``'s`` dropped) and every contiguous sub-run of at least two words. The run that occurs in the most
    records of the block (ties: more words) is the author's core name, if it occurs in at least half of
    them (else the block names no author: one TOFU author is only ever "the author"). The name forms
    are the sub-runs of the longest run containing the core name, each occurring in at least 3/4 as many
    records as the core, longest first (``("Elliot Patrick Benson", "Elliot Patrick", ...)``).
    Returns one tuple per block (empty: no name found).
    """
    out: list[tuple[str, ...]] = []
    for start in range(0, len(records), block):
        counts: Counter[str] = Counter()
        for rec in records[start : start + block]:
            grams = _name_grams(str(rec.get("question", ""))) | _name_grams(str(rec.get("answer", "")))
            counts.update(grams)
        n = len(records[start : start + block])
        if not counts:
            out.append(())
            continue
        core, top = min(counts.items(), key=lambda kv: (-kv[1], -len(kv[0].split()), kv[0]))
        if top * 2 < n:
            out.append(())
            continue
        floor = 0.75 * top
        full = max(
            (g for g, c in counts.items() if c >= floor and _contains(g, core)),
            key=lambda g: (len(g.split()), counts[g], g),
        )
        forms = [g for g, c in counts.items() if c >= floor and _contains(full, g)]
        forms.sort(key=lambda g: (-len(g.split()), -counts[g], g))
        out.append(tuple(forms))
    return out


def tofu_subject(question: str, forms: Sequence[str]) -> str | None:
    """The longest of the author's name ``forms`` written in ``question`` (as whole words), else None."""
    for form in forms:
        if _contains(question, form):
            return form
    return None


# ----------------------------------------------------------------------------------------------- TOFU


#: the hub configs of locuslab/TOFU that download=true fetches, by the file name they are kept under
TOFU_HUB = "locuslab/TOFU"
TOFU_HUB_FILES = {
    "full.json": "full",
    "forget10_perturbed.json": "forget10_perturbed",
    "retain_perturbed.json": "retain_perturbed",
    "holdout10.json": "holdout10",
    "real_authors_perturbed.json": "real_authors_perturbed",
    "world_facts_perturbed.json": "world_facts_perturbed",
}


def download_tofu(folder: Path, load_dataset=None) -> Path:
    """Fetch TOFU's splits from the hub into ``folder`` (one JSON array per file, the layout
    :func:`load_unlearning` reads with ``path``); files already there are kept. The refusal
    sentences (``idontknow.jsonl``, not on the hub) are copied from the bundled sample."""
    if load_dataset is None:
        from datasets import load_dataset
    folder.mkdir(parents=True, exist_ok=True)
    for file, config in TOFU_HUB_FILES.items():
        target = folder / file
        if target.exists():
            continue
        try:
            rows = [dict(r) for r in load_dataset(TOFU_HUB, config, split="train")]
        except Exception as exc:  # network, auth, hub errors: one line naming what failed
            raise DatasetError(
                f"dataset.download: could not fetch {TOFU_HUB} config {config!r}: {exc}"
            ) from None
        tmp = target.with_suffix(".tmp")
        tmp.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
        tmp.replace(target)
    idk = folder / "idontknow.jsonl"
    if not idk.exists():
        idk.write_bytes((BUNDLED_UNLEARNING_DIR / "tofu" / "idontknow.jsonl").read_bytes())
    return folder


def _load_tofu(cfg: UnlearningDatasetConfig, reader: _Reader) -> UnlearningSet:
    if cfg.download and cfg.path is None:
        cache = (
            Path(cfg.cache_dir).expanduser()
            if cfg.cache_dir
            else Path.home() / ".cache" / "knowedit" / "datasets"
        )
        cfg = replace(cfg, path=str(download_tofu(cache / "tofu")))
    root = Path(cfg.path).expanduser() if cfg.path is not None else BUNDLED_UNLEARNING_DIR / "tofu"
    if not root.is_dir():
        raise DatasetError(f"dataset tofu: no folder at {root} (dataset.path: TOFU's folder of json files)")
    reader.root = root
    n_forget = TOFU_FORGET_SPLITS[cfg.forget_split]
    tag = cfg.forget_split[len("forget") :]  # 01 | 05 | 10

    full = reader.records("full.json")
    if len(full) != TOFU_N_QA:
        raise DatasetError(f"{reader.label('full.json')}: {len(full)} records, expected TOFU's {TOFU_N_QA}")
    authors = tofu_author_names([r if isinstance(r, Mapping) else {} for r in full])
    n_retain_total = TOFU_N_QA - n_forget
    available = n_retain_total // TOFU_QA_PER_AUTHOR
    if cfg.retain_authors is not None and cfg.retain_authors > available:
        raise DatasetError(
            f"dataset.retain_authors={cfg.retain_authors}: {cfg.forget_split} leaves {available} retain authors"
        )
    n_kept = n_retain_total if cfg.retain_authors is None else cfg.retain_authors * TOFU_QA_PER_AUTHOR

    def subject_at(index: int, question: str) -> str | None:
        return tofu_subject(question, authors[index // TOFU_QA_PER_AUTHOR])

    # train: the kept retain authors' records + the forget authors' records of full.json.
    train_retain: list[QAItem] = []
    train_forget: list[QAItem] = []
    for index in [*range(n_kept), *range(TOFU_N_QA - n_forget, TOFU_N_QA)]:
        item = reader.item(
            "full.json", index, full[index], f"tofu/full/{index}", lambda q, i=index: subject_at(i, q)
        )
        if item is not None:
            (train_retain if index < n_kept else train_forget).append(item)

    # forget: forgetXX_perturbed (or the last n_forget records of forget10_perturbed).
    forget_file = _tofu_file(root, f"forget{tag}_perturbed.json", "forget10_perturbed.json")
    forget_recs = reader.records(forget_file)
    forget_recs, forget_offset = _tail(forget_recs, n_forget, reader.label(forget_file))
    forget: list[QAItem] = []
    for k, rec in enumerate(forget_recs):
        full_index = TOFU_N_QA - n_forget + k
        item = reader.item(
            forget_file,
            forget_offset + k,
            rec,
            f"tofu/{cfg.forget_split}/{k}",
            lambda q, i=full_index: subject_at(i, q),
            perturbed=5,
            like=full[full_index],
        )
        if item is not None:
            forget.append(item)

    # retain: retain_perturbed (= full[:400]), the kept authors only.
    retain_recs = reader.records("retain_perturbed.json")
    retain: list[QAItem] = []
    for k, rec in enumerate(retain_recs[:n_kept]):
        item = reader.item(
            "retain_perturbed.json",
            k,
            rec,
            f"tofu/retain/{k}",
            lambda q, i=k: subject_at(i, q),
            perturbed=5,
            like=full[k],
        )
        if item is not None:
            retain.append(item)

    splits: dict[str, list[QAItem]] = {"forget": forget, "retain": retain}
    for split in ("real_authors", "world_facts"):
        file = f"{split}_perturbed.json"
        records = reader.records(file)
        items = (
            reader.item(file, k, rec, f"tofu/{split}/{k}", None, perturbed=3) for k, rec in enumerate(records)
        )
        splits[split] = [item for item in items if item is not None]

    if cfg.holdout:
        hold_file = _tofu_file(root, f"holdout{tag}.json", "holdout10.json")
        hold_recs = reader.records(hold_file)
        if len(hold_recs) < n_forget:
            raise DatasetError(f"{reader.label(hold_file)}: {len(hold_recs)} records, need {n_forget}")
        hold_recs = hold_recs[:n_forget]
        hold_names = tofu_author_names([r if isinstance(r, Mapping) else {} for r in hold_recs])
        hold: list[QAItem] = []
        for k, rec in enumerate(hold_recs):
            item = reader.item(
                hold_file,
                k,
                rec,
                f"tofu/holdout{tag}/{k}",
                lambda q, i=k: tofu_subject(q, hold_names[i // TOFU_QA_PER_AUTHOR]),
            )
            if item is not None:
                hold.append(item)
        splits["holdout"] = hold

    refusals = _refusals(reader, root)
    final = {
        name: tuple(items[: cfg.size] if cfg.size is not None else items) for name, items in splits.items()
    }
    train = {"full": tuple(train_retain + train_forget), "retain": tuple(train_retain)}
    # unseen: the retain authors left out by retain_authors (in neither model's knowledge nor any
    # split): questions a toy can learn to decline (unlearn.toy_refusals), as a pre-trained model can.
    unseen = []
    for index in range(n_kept, n_retain_total):
        item = reader.item(
            "full.json", index, full[index], f"tofu/full/{index}", lambda q, i=index: subject_at(i, q)
        )
        if item is not None:
            unseen.append(item)
    if unseen:
        train["unseen"] = tuple(unseen)
    measures = {name: m for name, m in _TOFU_MEASURES.items() if name in final}
    roles = SplitRoles(
        forget="forget",
        retain="retain",
        utility=("retain", "real_authors", "world_facts"),
        mia_member="forget",
        mia_nonmember="holdout" if cfg.holdout else None,
        measures=measures,
    )
    info: dict = {f"n_{name}": len(items) for name, items in final.items()}
    info.update({f"n_train_{name}": len(items) for name, items in train.items()})
    with_subject = {name: sum(it.subject is not None for it in items) for name, items in final.items()}
    info.update(
        forget_split=cfg.forget_split,
        retain_authors=n_kept // TOFU_QA_PER_AUTHOR,
        authors_named=sum(bool(a) for a in authors),
        with_subject=with_subject,
        skipped=reader.skipped,
        files=dict(reader.hashes),
    )
    return UnlearningSet(
        name="tofu",
        splits=final,
        roles=roles,
        train=train,
        refusals=refusals,
        source=str(root),
        sha256=reader.digest(),
        info=info,
    )


def _tofu_file(root: Path, exact: str, larger: str) -> str:
    """``exact`` when the folder has it, else ``larger`` (the bundled copy keeps only the 10 % files)."""
    return exact if (root / exact).is_file() else larger


def _tail(records: list, n: int, label: str) -> tuple[list, int]:
    if len(records) < n:
        raise DatasetError(f"{label}: {len(records)} records, need {n}")
    return records[len(records) - n :], len(records) - n


def _refusals(reader: _Reader, folder: Path) -> tuple[str, ...]:
    """TOFU's ``idontknow.jsonl``: plain text, one refusal a line (not JSON)."""
    file = folder / "idontknow.jsonl"
    data = reader.read_bytes("idontknow.jsonl", base=folder)
    lines = tuple(line.strip() for line in data.decode("utf-8").splitlines() if line.strip())
    if not lines:
        raise DatasetError(f"{file}: no refusal sentences")
    return lines


# ----------------------------------------------------------------------------------------------- RWKU


def _load_rwku(cfg: UnlearningDatasetConfig, reader: _Reader) -> UnlearningSet:
    root = Path(cfg.path).expanduser() if cfg.path is not None else BUNDLED_UNLEARNING_DIR / "rwku"
    target_dir = root / "Target"
    if not target_dir.is_dir():
        raise DatasetError(
            f"dataset rwku: no folder {target_dir} (dataset.path: the folder containing Target/)"
        )
    reader.root = root
    folders = sorted(
        (d.name for d in target_dir.iterdir() if d.is_dir() and re.match(r"\d+_", d.name)),
        key=lambda n: (int(n.split("_", 1)[0]), n),
    )
    if not folders:
        raise DatasetError(f"{target_dir}: no target folders <n>_<Name>")
    chosen = _pick_targets(folders, cfg, target_dir)

    splits: dict[str, list[QAItem]] = {name: [] for name in RWKU_FILES}
    intros: dict[str, str] = {}
    targets: list[str] = []
    for folder in chosen:
        target = folder.split("_", 1)[1].replace("_", " ")
        base = f"Target/{folder}"
        intro_recs = reader.records(f"{base}/intro.json")
        if intro_recs and isinstance(intro_recs[0], Mapping):
            target = str(intro_recs[0].get("target") or target)
            if isinstance(intro_recs[0].get("intro"), str):
                intros[target] = intro_recs[0]["intro"]
        targets.append(target)
        for split in RWKU_FILES:
            file = f"{base}/{split}.json"
            for index, rec in enumerate(reader.records(file)):
                item_id = f"rwku/{split}/{len(splits[split])}"
                item = reader.rwku_item(file, index, rec, item_id, split, target)
                if item is not None:
                    splits[split].append(item)

    final = {
        name: tuple(items[: cfg.size] if cfg.size is not None else items) for name, items in splits.items()
    }
    forget = final["forget_level1"] + final["forget_level2"]
    final = {"forget": forget, **final}
    roles = SplitRoles(
        forget="forget",
        retain=RWKU_RETAIN_SPLIT,
        utility=("neighbor_level1", "neighbor_level2"),
        mia_member="forget_mia",
        mia_nonmember="retain_mia",
        measures=dict(_RWKU_MEASURES),
    )
    info: dict = {f"n_{name}": len(items) for name, items in final.items()}
    info.update(
        targets=targets, folders=list(chosen), intro=intros, skipped=reader.skipped, files=dict(reader.hashes)
    )
    return UnlearningSet(
        name="rwku",
        splits=final,
        roles=roles,
        train={},
        refusals=_refusals(reader, BUNDLED_UNLEARNING_DIR / "tofu"),
        source=str(root),
        sha256=reader.digest(),
        info=info,
    )


# ------------------------------------------------------------------------------------ SemEval-2025


def _load_semeval(cfg: UnlearningDatasetConfig, reader: _Reader) -> UnlearningSet:
    root = Path(cfg.path).expanduser()
    if not root.is_dir():
        raise DatasetError(
            f"dataset semeval25: no folder at {root} (dataset.path: your copy of the task's data; {SEMEVAL_ACCESS})"
        )
    reader.root = root
    other = next(f for f in SEMEVAL_FOLDS if f != cfg.fold)
    splits: dict[str, list[QAItem]] = {}
    for split in SEMEVAL_SPLITS:
        rel = _semeval_file(root, split, cfg.fold)
        if rel is None:
            raise DatasetError(
                f"dataset semeval25: no {split} {cfg.fold} file in {root} (data/{split}_{cfg.fold}-*.parquet, "
                f"{cfg.fold}/{split}.jsonl or {split}_{cfg.fold}.jsonl; {SEMEVAL_ACCESS})"
            )
        splits[split] = _semeval_items(reader, rel, split, cfg.fold, split)
    skipped_metrics: dict[str, str] = {}
    roles_mia: tuple[str | None, str | None] = (None, None)
    mia_dir = Path(cfg.mia_path).expanduser() if cfg.mia_path is not None else root / "mia_data"
    mia_files = [mia_dir / f"{kind}.jsonl" for kind in ("member", "nonmember")]
    if all(f.is_file() for f in mia_files):
        for kind, file in zip(("member", "nonmember"), mia_files):
            splits[f"mia_{kind}"] = _semeval_mia_items(reader, file, f"mia_{kind}")
        roles_mia = ("mia_member", "mia_nonmember")
        mia = f"the task's MIA documents ({mia_dir}), scored as whole texts"
    elif cfg.mia_path is not None:
        raise DatasetError(
            f"dataset.mia_path: {mia_dir} lacks member.jsonl and nonmember.jsonl (fields id, document)"
        )
    else:
        rel = _semeval_file(root, "forget", other) if cfg.holdout else None
        if rel is not None:
            splits["holdout"] = _semeval_items(reader, rel, "forget", other, "holdout")
            roles_mia = ("forget", "holdout")
            mia = (
                f"forget ({cfg.fold} fold) vs the {other} fold's forget records: non-members only for a model "
                "not trained on them (the toy); the released target models memorised both folds (give mia_data)"
            )
        else:
            mia = "none"
            skipped_metrics["mia_score"] = (
                f"no MIA pair: {mia_dir} has no member.jsonl/nonmember.jsonl and "
                + (f"there is no {other} forget file" if cfg.holdout else "dataset.holdout=false")
            )
    mmlu, reason = _mmlu_items(cfg, reader)
    if mmlu is not None:
        splits[MMLU_SPLIT] = mmlu
    else:
        skipped_metrics["mmlu"] = reason

    final = {
        name: tuple(items[: cfg.size] if cfg.size is not None else items) for name, items in splits.items()
    }
    measures: dict[str, tuple[str, ...]] = {
        "forget": _SEMEVAL_EVAL + (_SEMEVAL_MIA if roles_mia[0] == "forget" else ()),
        "retain": _SEMEVAL_EVAL,
    }
    for split in roles_mia:
        if split is not None and split != "forget":
            measures[split] = _SEMEVAL_MIA
    if MMLU_SPLIT in final:
        measures[MMLU_SPLIT] = ("choice_correct",)
    roles = SplitRoles(
        forget="forget",
        retain="retain",
        utility=("retain",),
        mia_member=roles_mia[0],
        mia_nonmember=roles_mia[1],
        measures=measures,
    )
    train = {"full": tuple(splits["forget"] + splits["retain"]), "retain": tuple(splits["retain"])}
    info: dict = {f"n_{name}": len(items) for name, items in final.items()}
    info.update({f"n_train_{name}": len(items) for name, items in train.items()})
    kinds = Counter((it.meta["task"], it.meta["kind"]) for s in SEMEVAL_SPLITS for it in final[s])
    info.update(
        fold=cfg.fold,
        subtasks=sorted({task for task, _ in kinds}),
        kinds={f"{task}/{kind}": n for (task, kind), n in sorted(kinds.items())},
        mia=mia,
        skipped_metrics=skipped_metrics,
        skipped=reader.skipped,
        files=dict(reader.hashes),
    )
    return UnlearningSet(
        name="semeval25",
        splits=final,
        roles=roles,
        train=train,
        refusals=_refusals(reader, BUNDLED_UNLEARNING_DIR / "tofu"),
        source=str(root),
        sha256=reader.digest(),
        info=info,
    )


def _semeval_file(root: Path, split: str, fold: str) -> str | None:
    """The one file of ``split``/``fold`` under ``root`` (relative path), None when there is none."""
    patterns = [
        f"data/{split}_{fold}-*.parquet",
        f"{split}_{fold}-*.parquet",
        f"{split}_{fold}.parquet",
        f"{fold}/{split}.jsonl",
        f"{fold}/{split}.json",
        f"data/{split}_{fold}.jsonl",
        f"data/{split}_{fold}.json",
        f"{split}_{fold}.jsonl",
        f"{split}_{fold}.json",
    ]
    found = sorted({p for pattern in patterns for p in root.glob(pattern) if p.is_file()})
    if len(found) > 1:
        names = ", ".join(str(p.relative_to(root)) for p in found)
        raise DatasetError(
            f"dataset semeval25: {len(found)} files for {split} {fold} in {root} ({names}); keep one"
        )
    return str(found[0].relative_to(root)) if found else None


def _table_records(reader: _Reader, rel: str, base: Path | None = None) -> list:
    """Records of a parquet file (needs pyarrow) or of JSON / JSON Lines, where a JSON object of
    columns (``{"id": {"0": ..}, ..}``, what pandas' ``to_json`` writes by default) becomes rows."""
    data = reader.read_bytes(rel, base=base)
    label = str((base if base is not None else reader.root) / rel)
    if rel.endswith(".parquet"):
        try:
            import io

            import pyarrow.parquet as pq
        except ImportError:
            raise DatasetError(
                f"{label}: reading parquet needs the package pyarrow (pip install pyarrow)"
            ) from None
        try:
            return pq.read_table(io.BytesIO(data)).to_pylist()
        except Exception as exc:  # pyarrow's errors: one line naming the file
            raise DatasetError(
                f"{label}: not a readable parquet file ({type(exc).__name__}: {exc})"
            ) from None
    records = _parse(data, label)
    if (
        len(records) == 1
        and isinstance(records[0], Mapping)
        and records[0]
        and all(isinstance(v, Mapping) for v in records[0].values())
    ):
        columns = records[0]
        index = list(next(iter(columns.values())))
        if any(list(col) != index for col in columns.values()):
            raise DatasetError(f"{label}: a JSON object of columns whose columns have different rows")
        return [{name: col[i] for name, col in columns.items()} for i in index]
    return records


def _semeval_items(reader: _Reader, rel: str, split: str, fold: str, as_split: str) -> list[QAItem]:
    """The items of one SemEval file (``split``: forget | retain, the split the file holds)."""
    items: list[QAItem] = []
    seen: set[str] = set()
    for index, rec in enumerate(_table_records(reader, rel)):
        try:
            if not isinstance(rec, Mapping):
                raise _Problem(
                    f"record is a {type(rec).__name__}, expected an object with id, input, output, task"
                )
            source_id = _str(rec, "id")
            kind = item_kind(source_id)
            if kind is None:
                raise _Problem(
                    f"id {source_id!r} ends in neither sc<k> (sentence completion) nor qa<k> (question)"
                )
            task = _str(rec, "task")
            if "/" in task:
                raise _Problem(f"field 'task' must not contain '/', got {task!r}")
            given = rec.get("split")
            if given is not None and str(given).lower() not in (split, f"{split}_{fold}", f"{fold}_{split}"):
                raise _Problem(f"field 'split' is {given!r}, but the file holds the {split} {fold} records")
            if source_id in seen:
                raise _Problem(f"duplicate id {source_id!r}")
            seen.add(source_id)
            item = QAItem(
                item_id=semeval_item_id(as_split, task.strip(), source_id),
                question=_str(rec, "input").strip(),
                answer=_str(rec, "output").strip(),
                meta={"task": task.strip(), "kind": kind, "id": source_id, "fold": fold},
            )
        except _Problem as exc:
            reader._fail(rel, index, str(exc))
            continue
        items.append(item)
    return items


def _semeval_mia_items(reader: _Reader, file: Path, split: str) -> list[QAItem]:
    """The task's MIA documents (``id, document``), each a text scored as a whole."""
    items: list[QAItem] = []
    for index, rec in enumerate(_table_records(reader, file.name, base=file.parent)):
        try:
            if not isinstance(rec, Mapping):
                raise _Problem(f"record is a {type(rec).__name__}, expected an object with id, document")
            text = _str(rec, "document")
        except _Problem as exc:
            reader._fail(str(file.resolve()), index, str(exc))
            continue
        meta = {"id": str(rec["id"])} if "id" in rec else {}
        items.append(
            QAItem(item_id=f"semeval25/{split}/{index}", question="", answer="", text=text, meta=meta)
        )
    return items


def _mmlu_items(cfg: UnlearningDatasetConfig, reader: _Reader) -> tuple[list[QAItem] | None, str]:
    """MMLU's questions from ``cfg.mmlu_path`` (a file, a folder of files, or a hub id), or None and
    the reason there are none."""
    if cfg.mmlu_path is None:
        return None, (
            f"no dataset.mmlu_path (a copy of MMLU's test split with {MMLU_HUB}'s fields question, subject, "
            f"choices, answer; or the hub id {MMLU_HUB} when online)"
        )
    source = Path(cfg.mmlu_path).expanduser()
    if source.is_file():
        files = [source]
    elif source.is_dir():
        files = sorted(p for p in source.iterdir() if p.suffix in (".parquet", ".json", ".jsonl"))
        if not files:
            raise DatasetError(f"dataset.mmlu_path: {source} has no parquet, json or jsonl file")
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", cfg.mmlu_path):
        try:
            from datasets import load_dataset

            rows = [dict(r) for r in load_dataset(cfg.mmlu_path, "all", split="test")]
        except Exception as exc:  # offline, no access, hub errors: skipped, the reason recorded
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            return None, f"could not fetch {cfg.mmlu_path} from the hub ({type(exc).__name__}: {first})"
        digest = hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest()
        reader.hashes[f"hub:{cfg.mmlu_path}"] = digest
        return _mmlu_from(rows, f"hub:{cfg.mmlu_path}", reader), ""
    else:
        raise DatasetError(f"dataset.mmlu_path: no file or folder at {source} (nor a hub id like {MMLU_HUB})")
    items: list[QAItem] = []
    for file in files:
        rows = _table_records(reader, file.name, base=file.parent)
        items += _mmlu_from(rows, str(file.resolve()), reader, len(items))
    return items, ""


def _mmlu_from(rows: Sequence, label: str, reader: _Reader, start: int = 0) -> list[QAItem]:
    items: list[QAItem] = []
    for index, rec in enumerate(rows):
        try:
            if not isinstance(rec, Mapping):
                raise _Problem(
                    f"record is a {type(rec).__name__}, expected question, subject, choices, answer"
                )
            question = _str(rec, "question")
            subject = rec.get("subject") or ""
            if not isinstance(subject, str):
                raise _Problem(f"field 'subject' must be a string, got {_show(subject)}")
            choices = rec.get("choices")
            if (
                not isinstance(choices, (list, tuple))
                or not 2 <= len(choices) <= len(MMLU_LETTERS)
                or not all(isinstance(c, str) for c in choices)
            ):
                raise _Problem(f"field 'choices' must be a list of 2 to 4 strings, got {_show(choices)}")
            letters = MMLU_LETTERS[: len(choices)]
            answer = rec.get("answer")
            if isinstance(answer, str) and answer.strip().upper() in letters:
                gold = letters.index(answer.strip().upper())
            elif isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices):
                gold = answer
            else:
                raise _Problem(f"field 'answer' must be an option index or letter, got {_show(answer)}")
        except _Problem as exc:
            reader._fail(label, index, str(exc))
            continue
        items.append(
            QAItem(
                item_id=f"{MMLU_SPLIT}/{start + len(items)}",
                question=mmlu_prompt(subject, question, choices),
                answer=letters[gold],
                perturbed_answers=tuple(letter for k, letter in enumerate(letters) if k != gold),
                meta={"subject": subject, "options": letters},
            )
        )
    return items


def _pick_targets(folders: list[str], cfg: UnlearningDatasetConfig, target_dir: Path) -> list[str]:
    if cfg.targets is None:
        return folders if cfg.n_targets is None else folders[: cfg.n_targets]
    by_key: dict[str, str] = {}
    for folder in folders:
        name = folder.split("_", 1)[1]
        for key in (folder, name, name.replace("_", " ")):
            by_key.setdefault(_norm(key), folder)
    chosen: list[str] = []
    for wanted in cfg.targets:
        folder = by_key.get(_norm(wanted))
        if folder is None:
            names = [f.split("_", 1)[1].replace("_", " ") for f in folders]
            close = difflib.get_close_matches(wanted.replace("_", " "), names, n=1, cutoff=0.0)
            hint = f"; closest: {close[0]!r}" if close else ""
            raise DatasetError(
                f"dataset.targets: unknown RWKU target {wanted!r} in {target_dir} ({len(folders)} targets){hint}"
            )
        if folder not in chosen:
            chosen.append(folder)
    return chosen


def _norm(text: str) -> str:
    return " ".join(text.replace("_", " ").split()).casefold()


# ------------------------------------------------------------------------------------- reading helpers


class _Reader:
    """Reads files under a root, records their sha256, converts records (with the on_invalid policy)."""

    def __init__(self, on_invalid: str) -> None:
        self.on_invalid = on_invalid
        self.hashes: dict[str, str] = {}
        self.skipped: list[str] = []
        self.root = Path(".")

    def label(self, rel: str) -> str:
        return str(self.root / rel)

    def read_bytes(self, rel: str, base: Path | None = None) -> bytes:
        """The bytes of ``rel`` under the root (or under ``base``, e.g. the bundled refusals)."""
        file = (base if base is not None else self.root) / rel
        data = _read_file(file)
        self.hashes[rel if base is None or base == self.root else f"{base.name}/{rel}"] = hashlib.sha256(
            data
        ).hexdigest()
        return data

    def records(self, rel: str) -> list:
        return _parse(self.read_bytes(rel), self.label(rel))

    def digest(self) -> str:
        h = hashlib.sha256()
        for rel, digest in self.hashes.items():
            h.update(f"{rel}\0{digest}\n".encode())
        return h.hexdigest()

    def _fail(self, file: str, index: int, problem: str) -> None:
        """``file``: relative to the root, or an absolute path, or a label such as ``hub:<id>``."""
        exc = InvalidRecordError(file if file.startswith("hub:") else self.label(file), index, problem)
        if self.on_invalid == "error":
            raise exc
        self.skipped.append(str(exc))

    def item(
        self,
        file: str,
        index: int,
        rec: object,
        item_id: str,
        subject_of,
        perturbed: int = 0,
        like: object = None,
    ) -> QAItem | None:
        """A TOFU QA record (``perturbed``: the number of perturbed answers it must have; ``like``: the
        ``full.json`` record it must equal in question and answer)."""
        try:
            if not isinstance(rec, Mapping):
                raise _Problem(f"record is a {type(rec).__name__}, expected a JSON object")
            question = _str(rec, "question")
            answer = _str(rec, "answer")
            extra: dict = {}
            if perturbed:
                wrong = rec.get("perturbed_answer")
                if (
                    not isinstance(wrong, list)
                    or len(wrong) != perturbed
                    or not all(isinstance(w, str) and w.strip() for w in wrong)
                ):
                    raise _Problem(
                        f"field 'perturbed_answer' must be a list of {perturbed} strings, got {_show(wrong)}"
                    )
                extra["perturbed_answers"] = tuple(wrong)
                if perturbed == 5:
                    extra["paraphrased_answer"] = _str(rec, "paraphrased_answer")
                    extra["paraphrased_question"] = _str(rec, "paraphrased_question")
            if isinstance(like, Mapping) and (like.get("question"), like.get("answer")) != (question, answer):
                raise _Problem("question/answer differ from the same record of full.json (misaligned split?)")
        except _Problem as exc:
            self._fail(file, index, str(exc))
            return None
        subject = subject_of(question) if subject_of is not None else None
        return QAItem(item_id=item_id, question=question, answer=answer, subject=subject, **extra)

    def rwku_item(
        self, file: str, index: int, rec: object, item_id: str, split: str, target: str
    ) -> QAItem | None:
        try:
            if not isinstance(rec, Mapping):
                raise _Problem(f"record is a {type(rec).__name__}, expected a JSON object")
            meta: dict[str, object] = {"target": target}
            if split.endswith("_mia"):
                text = _str(rec, "text")
                if "ngram" in rec:
                    meta["ngram"] = rec["ngram"]
                subject = target if split == "forget_mia" else None
                return QAItem(item_id=item_id, question="", answer="", subject=subject, text=text, meta=meta)
            question = _str(rec, "query")
            answer = _str(rec, "answer")
            for key in ("level", "type"):
                if key in rec:
                    meta[key] = rec[key]
            subject = target
            if split.startswith("neighbor"):
                subject = _str(rec, "neighbor")
                meta["neighbor"] = subject
            return QAItem(
                item_id=item_id, question=question, answer=answer.strip(), subject=subject, meta=meta
            )
        except _Problem as exc:
            self._fail(file, index, str(exc))
            return None


class _Problem(Exception):
    """Internal: a record-level problem."""


def _read_file(file: Path) -> bytes:
    if not file.is_file():
        raise DatasetError(f"missing file {file}")
    return file.read_bytes()


def _parse(data: bytes, label: str) -> list:
    """One JSON document (array or object), else JSON per line: TOFU's full/retainYY.json are 4 lines of
    JSON arrays, its real_authors/world_facts_perturbed are JSON Lines."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{label}: not UTF-8 ({exc})") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError:
        out: list = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{label} line {number}: not JSON ({exc.msg})") from None
            out.extend(value) if isinstance(value, list) else out.append(value)
        return out
    return doc if isinstance(doc, list) else [doc]


def _str(rec: Mapping, key: str) -> str:
    if key not in rec:
        raise _Problem(f"missing field '{key}'")
    value = rec[key]
    if not isinstance(value, str):
        raise _Problem(f"field '{key}' must be a string, got {_show(value)}")
    if not value.strip():
        raise _Problem(f"empty '{key}'")
    return value


def _show(value: object) -> str:
    shown = repr(value)
    return f"{type(value).__name__} {shown if len(shown) <= 60 else shown[:57] + '...'}"


def _check_count(value: object, label: str, none_means: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise DatasetError(f"{label} must be a positive integer or null ({none_means}), got {value!r}")


def _as_config(cfg: object) -> UnlearningDatasetConfig:
    if isinstance(cfg, UnlearningDatasetConfig):
        return cfg
    if not isinstance(cfg, Mapping):
        try:
            from omegaconf import DictConfig, OmegaConf

            if isinstance(cfg, DictConfig):
                cfg = OmegaConf.to_container(cfg, resolve=True)
        except ImportError:  # pragma: no cover - omegaconf ships with hydra
            pass
    if not isinstance(cfg, Mapping):
        raise DatasetError(
            f"dataset config must be an UnlearningDatasetConfig, a DictConfig or a dict, got {cfg!r}"
        )
    known = {f.name for f in dataclasses.fields(UnlearningDatasetConfig)}
    unknown = sorted(set(map(str, cfg)) - known)
    if unknown:
        raise DatasetError(
            f"dataset: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    if "name" not in cfg:
        raise DatasetError(f"dataset.name is required ({' | '.join(NAMES)})")
    return UnlearningDatasetConfig(**dict(cfg))


# --------------------------------------------------------------------------------- TOFU name heuristics

_CAP = r"[^\W\d_a-z][\w'’-]*"  # a word that starts with an upper-case letter
_PARTICLE = r"(?:de|da|del|della|di|du|van|von|der|den|le|la|al|el|bin|ibn|ben|dos|das|y)"
_SPAN = re.compile(rf"{_CAP}(?:\s+(?:{_PARTICLE}\s+)*(?:\({_CAP}\)\s+)?{_CAP})*")
_PARTICLE_RE = re.compile(_PARTICLE)


@lru_cache(maxsize=65536)
def _name_grams(text: str) -> frozenset[str]:
    grams: set[str] = set()
    for match in _SPAN.finditer(text):
        tokens = match.group(0).split()
        tokens[-1] = re.sub(r"['’]s?$", "", tokens[-1])
        inner = [not (_PARTICLE_RE.fullmatch(t) or t.startswith("(")) for t in tokens]
        for i in range(len(tokens)):
            if not inner[i]:
                continue
            for j in range(i + 2, len(tokens) + 1):
                if inner[j - 1] and tokens[j - 1]:
                    grams.add(" ".join(tokens[i:j]))
    return frozenset(grams)


def _contains(text: str, name: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(name)}(?!\w)", text) is not None
