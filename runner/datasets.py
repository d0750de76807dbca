"""Dataset loading: CounterFact (ROME or EasyEdit schema) and zsRE (MEND schema) -> ``list[EditCase]``.

Nothing downstream knows the source format. Three record schemas are understood:

* ``rome``: the original ROME/MEMIT CounterFact record (``counterfact.json``, ``multi_counterfact.json``):
  ``case_id``, ``requested_rewrite`` {``prompt`` (template with ``{}``), ``subject``, ``target_new``
  {``str``, ``id``}, ``target_true`` {``str``, ``id``}, ``relation_id``}, ``paraphrase_prompts``,
  ``neighborhood_prompts``, ``attribute_prompts``, ``generation_prompts``.
* ``easyedit``: the reduced CounterFact of EasyEdit/MEND: ``case_id`` (optional), ``prompt`` (subject
  filled in), ``subject``, ``target_new``, ``ground_truth``, ``rephrase_prompt``, ``locality_prompt``,
  ``locality_ground_truth`` (the last three a string or a list).
* ``mend``: zsRE as released by MEND and used by ROME/MEMIT (``zsre_mem_eval.json``): ``subject``,
  ``src``, ``pred``, ``rephrase``, ``alt``, ``answers``, ``loc``, ``loc_ans`` (+ optional ``portability``).

Optional fields become extra probe sets (``case.probes[name]``, each scored under its own metric
name; ``evaluation.metrics.SSS_PROBE_METRICS``): the locality and portability sets of Yao et al.
(2023) that the SSS paper (seed 002, section 7) evaluates on, bundled as ``cf_distract_neighbor``,
``cf_one_hop``, ``cf_subject_replace``, ``zsre_subject_replace`` and ``zsre_reversed_relation``.

* ``rome``: ``attribute_prompts`` -> ``attribute`` (other subjects whose true object is the NEW one:
  SSS's Post-Neighbor), ``distracting_neighborhood_prompts`` -> ``distract_neighbor`` (old object
  wins), ``unrelated_relation`` {question, object} -> ``unrelated_attribute`` (token accuracy of the
  unchanged object), ``alternative_subject`` -> ``subject_replace`` (the rewrite prompt with the
  alias: new object wins), ``portability`` {New Question, New Answer} -> ``one_hop`` (token accuracy).
* ``mend``: ``alter_subject_question`` -> ``subject_replace`` (token accuracy of the new object),
  ``inverse question`` -> ``reversed_relation`` (token accuracy of the subject; written for the
  ``alt`` object, so scored only with ``target_field=alt``), ``portability`` -> ``portability``
  (likewise). ``loc``/``loc_ans`` may both be absent (the probe files have none): no
  ``neighborhood`` set then, so no Locality and no Score.

Files are a JSON list of records or JSONL (one record per line). Every malformed record raises
:class:`InvalidRecordError` with a one-line message naming the file, the record and the problem, or is
skipped and counted with ``on_invalid="skip"``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from editors.requests import SUBJECT_SLOT, EditRequest, fill
from evaluation.cases import EditCase, Probe

__all__ = [
    "BUNDLED_DATASETS",
    "BUNDLED_FILES",
    "DOWNLOAD_URLS",
    "SCHEMAS",
    "DatasetConfig",
    "DatasetDownloadError",
    "DatasetError",
    "DuplicateCaseIdError",
    "InvalidRecordError",
    "LoadedDataset",
    "UnknownSchemaError",
    "bundled_path",
    "cases_from_records",
    "fetch_url",
    "default_cache_dir",
    "detect_schema",
    "load_cases",
    "load_from_config",
]

SCHEMAS = ("rome", "easyedit", "mend")
TARGET_FIELDS = ("answers", "alt")
ON_INVALID = ("error", "skip")

DATA_DIR = Path(__file__).resolve().parent / "data"

#: Offline files shipped in ``runner/data`` (see ``runner/data/SOURCES.md``).
BUNDLED_FILES: dict[str, str] = {
    "counterfact": "multi_counterfact_sample.json",  # full ROME/MEMIT schema (the papers' protocol)
    "counterfact_easyedit": "counterfact_sample.json",  # EasyEdit schema (1 paraphrase, 1 neighbour)
    "zsre": "zsre_sample.json",
    # The locality/portability sets of Yao et al. 2023 (EasyEdit) as the SSS paper uses them, whole:
    "cf_distract_neighbor": "probes/counterfact_distracting_neighbor.json",  # 804 records
    "cf_one_hop": "probes/counterfact_portability_gpt4.json",  # 1,031 records
    "cf_subject_replace": "probes/counterfact_subject_replace.json",  # 213 records
    "zsre_subject_replace": "probes/zsre_subject_replace.json",  # 293 records
    "zsre_reversed_relation": "probes/zsre_inverse_relation.json",  # 385 records
    # Training splits of the trained editors (MEND, SERAC), whole (EasyEdit's / MEND's releases):
    "counterfact_train": "train/counterfact-train.json",  # 10,000 records, EasyEdit schema
    "zsre_train": "train/zsre_mend_train-1k.json",  # 1,000 records of zsre_mend_train, MEND schema
    "wikitext2": "wikitext2_test.txt",
}
#: The bundled files that are datasets of edit cases (not text corpora).
BUNDLED_DATASETS = tuple(name for name in BUNDLED_FILES if name != "wikitext2")
_BUNDLED_ALIASES = {
    "wikitext": "wikitext2",
    "wikitext-2": "wikitext2",
    "cf": "counterfact",
    "zsre_inverse_relation": "zsre_reversed_relation",
}

#: Public full files, fetched only with ``download=True``.
DOWNLOAD_URLS: dict[str, str] = {
    "counterfact": "https://rome.baulab.info/data/dsets/counterfact.json",
    "multi_counterfact": "https://memit.baulab.info/data/dsets/multi_counterfact.json",
    "zsre": "https://rome.baulab.info/data/dsets/zsre_mem_eval.json",
}
_DOWNLOAD_ALIASES = {"mcf": "multi_counterfact", "cf": "counterfact"}

_SCHEMA_FIELDS = {
    "rome": "case_id, requested_rewrite{prompt, subject, target_new{str,id}, target_true{str,id}, "
    "relation_id}, paraphrase_prompts, neighborhood_prompts, attribute_prompts, generation_prompts",
    "easyedit": "case_id (optional), prompt, subject, target_new, ground_truth, rephrase_prompt, "
    "locality_prompt, locality_ground_truth",
    "mend": "subject, src, pred, rephrase, alt, answers, loc, loc_ans (+ portability, alter_subject_question, "
    "inverse question)",
}


# ----------------------------------------------------------------------------------------------- errors


class DatasetError(ValueError):
    """A dataset file cannot be used (unreadable, not JSON/JSONL, no valid record...)."""


class InvalidRecordError(DatasetError):
    """One malformed record. The message is one line: ``FILE record I (case_id C): PROBLEM``."""

    def __init__(self, file: str, index: int, problem: str, case_id: str | None = None) -> None:
        self.file = file
        self.index = index
        self.case_id = case_id
        self.problem = problem
        where = f"record {index}" + (f" (case_id {case_id})" if case_id is not None else "")
        super().__init__(_one_line(f"{file} {where}: {problem}"))


class DuplicateCaseIdError(InvalidRecordError):
    """Two records share a case id (the resume key). Always raised, also with ``on_invalid="skip"``."""


class UnknownSchemaError(DatasetError):
    """The records match none of :data:`SCHEMAS`."""


class DatasetDownloadError(DatasetError):
    """The public file could not be fetched (offline machine, HTTP error...)."""


class _Problem(Exception):
    """Internal: a record-level problem, turned into :class:`InvalidRecordError` by the caller."""


# --------------------------------------------------------------------------------------------- configs


@dataclass
class DatasetConfig:
    """Structured-config schema of the Hydra ``dataset`` group; mirrors :func:`load_cases`."""

    name: str
    path: str | None = None
    size: int | None = None
    on_invalid: str = "error"
    schema: str = "auto"
    target_field: str = "answers"
    download: bool = False
    cache_dir: str | None = None
    generation_metrics: bool = True  # the protocol reports Fluency/Consistency (CounterFact), not zsRE
    download_name: str | None = (
        None  # the public file download=true fetches (null: name), e.g. multi_counterfact
    )

    def __post_init__(self) -> None:
        _check_args(self.size, self.on_invalid, self.schema, self.target_field, prefix="dataset.")


@dataclass
class LoadedDataset:
    """The cases of one file and where they came from.

    ``source`` is the URL for a downloaded file, else the local path; ``path`` is always the local
    file that was read; ``sha256`` is over its bytes. ``n_records`` counts the records in the file;
    ``n_skipped``/``skipped_reasons`` the invalid ones skipped (``on_invalid="skip"``) among those
    examined (reading stops once ``size`` valid cases are found).
    """

    cases: list[EditCase]
    name: str
    source: str
    sha256: str
    n_records: int
    n_skipped: int
    skipped_reasons: list[str]
    schema: str
    path: str = ""
    target_field: str | None = None

    def __len__(self) -> int:
        return len(self.cases)


# ------------------------------------------------------------------------------------------ public API


def bundled_path(name: str) -> Path:
    """Path of a file shipped in ``runner/data``: one of :data:`BUNDLED_FILES` (``counterfact``,
    ``zsre``, the probe sets ``cf_distract_neighbor``..., ``wikitext2``)."""
    key = _BUNDLED_ALIASES.get(name, name)
    if key not in BUNDLED_FILES:
        raise ValueError(f"no bundled file named {name!r}; bundled: {sorted(BUNDLED_FILES)}")
    path = DATA_DIR / BUNDLED_FILES[key]
    if not path.is_file():
        raise FileNotFoundError(f"bundled file {path} is missing (broken install?)")
    return path


def default_cache_dir() -> Path:
    """``$KNOWEDIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/knowedit-runner/datasets`` (``~/.cache`` default)."""
    if os.environ.get("KNOWEDIT_CACHE_DIR"):
        return Path(os.environ["KNOWEDIT_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "knowedit-runner" / "datasets"


def load_cases(
    name: str,
    path: str | os.PathLike[str] | None = None,
    size: int | None = None,
    on_invalid: str = "error",
    schema: str = "auto",
    target_field: str = "answers",
    download: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    download_name: str | None = None,
) -> LoadedDataset:
    """Load ``name`` as a list of :class:`EditCase`.

    ``path`` given: read that file (``name`` is then only a label). ``path`` None: the bundled offline
    file of ``name`` (one of :data:`BUNDLED_DATASETS`), or with ``download=True`` the public full file
    (``counterfact``, ``multi_counterfact``/``mcf``, ``zsre``; ``download_name`` when it differs from
    ``name``), fetched once into ``cache_dir``.
    ``size`` keeps the first N valid cases. ``schema`` is ``auto`` or one of :data:`SCHEMAS`.
    ``target_field`` (zsRE only) picks the new object: ``answers`` (``answers[0]``, as ROME/MEMIT/CoME)
    or ``alt`` (as EasyEdit).
    """
    _check_args(size, on_invalid, schema, target_field)
    if path is not None:
        file = Path(path).expanduser()
        source = str(file)
        if not file.is_file():
            raise FileNotFoundError(f"dataset {name!r}: no file at {file}")
    elif download:
        file, source = _fetch(download_name or name, cache_dir)
    else:
        key = _BUNDLED_ALIASES.get(name, name)
        if key not in BUNDLED_DATASETS:
            raise ValueError(
                f"dataset {name!r} has no bundled sample (bundled: {', '.join(BUNDLED_DATASETS)}); "
                "pass dataset.path=FILE"
                + (" or dataset.download=true" if _DOWNLOAD_ALIASES.get(name, name) in DOWNLOAD_URLS else "")
            )
        file = bundled_path(key)
        source = str(file)

    data = file.read_bytes()
    records = _parse_records(data, file.name)
    cases, skipped, used_schema = cases_from_records(
        records,
        file=file.name,
        size=size,
        on_invalid=on_invalid,
        schema=schema,
        target_field=target_field,
    )
    return LoadedDataset(
        cases=cases,
        name=name,
        source=source,
        sha256=hashlib.sha256(data).hexdigest(),
        n_records=len(records),
        n_skipped=len(skipped),
        skipped_reasons=skipped,
        schema=used_schema,
        path=str(file),
        target_field=target_field if used_schema == "mend" else None,
    )


def load_from_config(cfg: object, cache_dir: str | os.PathLike[str] | None = None) -> LoadedDataset:
    """:func:`load_cases` from a :class:`DatasetConfig` (or a DictConfig/object with its fields)."""
    get = cfg.get if isinstance(cfg, Mapping) else (lambda k, d=None: getattr(cfg, k, d))
    return load_cases(
        name=get("name"),
        path=get("path", None),
        size=get("size", None),
        on_invalid=get("on_invalid", "error"),
        schema=get("schema", "auto"),
        target_field=get("target_field", "answers"),
        download=bool(get("download", False)),
        cache_dir=cache_dir if cache_dir is not None else get("cache_dir", None),
        download_name=get("download_name", None),
    )


def detect_schema(records: Sequence[object]) -> str | None:
    """The schema of the first record that looks like one of :data:`SCHEMAS`, else None."""
    for rec in records:
        if isinstance(rec, Mapping):
            found = _record_schema(rec)
            if found is not None:
                return found
    return None


def cases_from_records(
    records: Sequence[object],
    *,
    file: str = "<records>",
    size: int | None = None,
    on_invalid: str = "error",
    schema: str = "auto",
    target_field: str = "answers",
) -> tuple[list[EditCase], list[str], str]:
    """Convert parsed records; returns ``(cases, skipped_reasons, schema)``.

    ``records`` items that are :class:`InvalidRecordError` (e.g. a JSONL line that is not JSON) are
    treated as invalid records.
    """
    _check_args(size, on_invalid, schema, target_field)
    if not records:
        raise DatasetError(f"{file}: no records")
    if schema == "auto":
        found = detect_schema(records)
        if found is None:
            raise UnknownSchemaError(_unknown_schema_message(file, records))
        schema = found
    convert = _CONVERTERS[schema]

    cases: list[EditCase] = []
    skipped: list[str] = []
    first_index: dict[str, int] = {}
    for index, rec in enumerate(records):
        if size is not None and len(cases) >= size:
            break
        try:
            if isinstance(rec, InvalidRecordError):
                raise rec
            if not isinstance(rec, Mapping):
                raise InvalidRecordError(
                    file, index, f"record is a {type(rec).__name__}, expected a JSON object"
                )
            case_id = _case_id(rec, index, file)
            try:
                case = convert(rec, case_id, index, target_field)
            except _Problem as exc:
                raise InvalidRecordError(file, index, str(exc), case_id) from None
        except InvalidRecordError as exc:
            if on_invalid == "skip":
                skipped.append(str(exc))
                continue
            raise
        if case.case_id in first_index:
            raise DuplicateCaseIdError(
                file,
                index,
                f"duplicate case_id {case.case_id!r} (first at record {first_index[case.case_id]}); "
                "case ids must be unique (they are the resume key)",
                case.case_id,
            )
        first_index[case.case_id] = index
        cases.append(case)
    if not cases:
        first = f"; first: {skipped[0]}" if skipped else ""
        raise DatasetError(f"{file}: no valid record ({len(skipped)} skipped{first})")
    return cases, skipped, schema


# --------------------------------------------------------------------------------------- file parsing


def _parse_records(data: bytes, file: str) -> list[object]:
    """A JSON list, or JSONL (a line that is not JSON becomes an :class:`InvalidRecordError` item)."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{file}: not UTF-8 text ({exc})") from None
    body = text.strip()
    if not body:
        raise DatasetError(f"{file}: empty file")
    if body[0] == "[":
        try:
            parsed = json.loads(body)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{file}: not valid JSON ({exc})") from None
        if not isinstance(parsed, list):  # pragma: no cover - "[" always opens a list
            raise DatasetError(f"{file}: expected a JSON list of records")
        return parsed
    lines = [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if len(lines) > 1 and body[0] == "{":
        try:
            whole = json.loads(body)
        except json.JSONDecodeError:
            whole = None
        if isinstance(whole, dict):
            raise DatasetError(
                f"{file}: holds one JSON object spread over several lines (keys: {_keys(whole)}); "
                "expected a JSON list of records or JSONL (one record per line)"
            )
    records: list[object] = []
    for index, (lineno, line) in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if index == 0 and body[0] not in "{[":
                raise DatasetError(
                    f"{file}: neither a JSON list nor JSONL ({exc.msg} on line {lineno})"
                ) from None
            records.append(InvalidRecordError(file, index, f"line {lineno} is not valid JSON: {exc.msg}"))
    return records


def fetch_url(url: str, dest: Path, what: str, hint: str, expect_json: bool = False) -> Path:
    """Download ``url`` to ``dest`` (atomically: a partial file never takes its name). An existing
    non-empty ``dest`` is kept. Errors are ``DatasetDownloadError`` naming ``what`` and ``hint``."""
    if dest.is_file() and dest.stat().st_size > 0:
        return dest
    tmp = dest.with_name(f"{dest.name}.part-{os.getpid()}")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        request = urllib.request.Request(url, headers={"User-Agent": "knowedit-runner"})
        with urllib.request.urlopen(request, timeout=60) as response, open(tmp, "wb") as out:
            shutil.copyfileobj(response, out, 1 << 20)
        if expect_json:
            with open(tmp, "rb") as fh:
                head = fh.read(4096).lstrip()
            if not head.startswith((b"[", b"{")):
                raise DatasetDownloadError(
                    f"could not download {what}: {url} did not return JSON (starts with {head[:40]!r}); {hint}"
                )
        os.replace(tmp, dest)
    except DatasetDownloadError:
        tmp.unlink(missing_ok=True)
        raise
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        tmp.unlink(missing_ok=True)
        reason = getattr(exc, "reason", None) or exc
        raise DatasetDownloadError(f"could not download {what} from {url} ({reason}); {hint}") from exc
    return dest


def _fetch(name: str, cache_dir: str | os.PathLike[str] | None) -> tuple[Path, str]:
    key = _DOWNLOAD_ALIASES.get(name, name)
    if key not in DOWNLOAD_URLS:
        raise ValueError(f"no download known for dataset {name!r}; known: {sorted(DOWNLOAD_URLS)}")
    url = DOWNLOAD_URLS[key]
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    dest = cache / Path(urlparse(url).path).name
    hint = (
        f"this machine may be offline: fetch {url} elsewhere and pass dataset.path=/path/to/{dest.name} "
        f"(or put the file at {dest})"
    )
    fetch_url(url, dest, f"dataset {name!r}", hint, expect_json=True)
    return dest, url


# ------------------------------------------------------------------------------------------ converters


def _convert_rome(rec: Mapping, case_id: str, index: int, target_field: str) -> EditCase:
    rw = rec.get("requested_rewrite")
    if rw is None:
        raise _Problem("missing field 'requested_rewrite'")
    if not isinstance(rw, Mapping):
        raise _Problem(f"field 'requested_rewrite' must be an object, got {type(rw).__name__}")
    template = _text(rw, "prompt", "requested_rewrite.prompt")
    subject = _text(rw, "subject", "requested_rewrite.subject")
    _check_template(template)
    new, new_id = _rome_target(rw, "target_new")
    true, true_id = _rome_target(rw, "target_true")
    if new == true:
        raise _Problem(f"target_new equals target_true ({new!r})")
    relation_id = _optional_text(rw, "relation_id", "requested_rewrite.relation_id")

    paraphrases = _text_list(rec, "paraphrase_prompts")
    neighbors = _text_list(rec, "neighborhood_prompts")
    attributes = _text_list(rec, "attribute_prompts", required=False)
    generation = _text_list(rec, "generation_prompts", required=False)

    probes = {
        "rewrite": (Probe(fill(template, subject), target=new, foil=true),),
        "paraphrase": tuple(Probe(p, target=new, foil=true) for p in paraphrases),
        "neighborhood": tuple(Probe(p, target=true, foil=new) for p in neighbors),
    }
    if attributes:  # other subjects whose TRUE object is the new one: SSS's Post-Neighbor
        probes["attribute"] = tuple(Probe(p, target=new, foil=true) for p in attributes)
    # The locality/portability sets of Yao et al. 2023 (the SSS paper's section 7), when present.
    distracting = _text_list(rec, "distracting_neighborhood_prompts", required=False)
    if distracting:  # the edit statement (NEW object) before a neighbourhood prompt: old must win
        probes["distract_neighbor"] = tuple(Probe(p, target=true, foil=new) for p in distracting)
    if "unrelated_relation" in rec:  # another attribute of the subject: must not change
        probes["unrelated_attribute"], unrelated_ids = _unrelated(rec["unrelated_relation"])
    if "alternative_subject" in rec:  # the rewrite prompt with an alias of the subject: new must win
        alias = _text(rec, "alternative_subject").strip()
        probes["subject_replace"] = (Probe(fill(template, alias), target=new, foil=true),)
    if "portability" in rec:  # a question whose answer follows from the NEW object
        one_hop, relations = _portability(rec["portability"])
        if one_hop:
            probes["one_hop"] = one_hop
    meta: dict[str, object] = {
        "schema": "rome",
        "record_index": index,
        "relation_id": relation_id,
        "target_new_id": new_id,
        "target_true_id": true_id,
        "generation_prompts_source": "record" if "generation_prompts" in rec else "none",
    }
    if "pararel_idx" in rec:
        meta["pararel_idx"] = rec["pararel_idx"]
    if "unrelated_relation" in rec:
        meta["unrelated_relation"] = unrelated_ids[0] if len(unrelated_ids) == 1 else unrelated_ids
    if "alternative_subject" in rec:
        meta["alternative_subject"] = alias
    if "portability" in rec:
        meta["recalled_relation"] = relations[0] if len(relations) == 1 else relations
    subjects = _neighborhood_subjects(rec.get("neighborhood_samples"), neighbors)
    if subjects is not None:
        meta["neighborhood_subjects"] = subjects
    return EditCase(
        request=_request(case_id, template, subject, new, true),
        probes=probes,
        generation_prompts=generation,
        meta=meta,
        true_answer=true,
    )


def _neighborhood_subjects(samples: object, prompts: Sequence[str]) -> tuple[str, ...] | None:
    """The subject of each neighbourhood prompt, from a record's ``neighborhood_samples``
    ({subject, prompt template} per prompt, as in the multi_counterfact subsets), when they line
    up with the prompts; else None (the field is optional and unchecked upstream)."""
    if not isinstance(samples, list) or len(samples) != len(prompts):
        return None
    subjects = []
    for sample, prompt in zip(samples, prompts):
        if not isinstance(sample, Mapping):
            return None
        subject, template = sample.get("subject"), sample.get("prompt")
        if not isinstance(subject, str) or not isinstance(template, str) or "{}" not in template:
            return None
        if fill(template, subject) != prompt:
            return None
        subjects.append(subject)
    return tuple(subjects)


def _convert_easyedit(rec: Mapping, case_id: str, index: int, target_field: str) -> EditCase:
    prompt = _text(rec, "prompt")
    subject = _text(rec, "subject")
    template = _template_from(prompt, subject, "prompt")
    new = _target(rec, "target_new")
    true = _target(rec, "ground_truth")
    if new == true:
        raise _Problem(f"target_new equals ground_truth ({new!r})")
    rephrases = _text_or_list(rec, "rephrase_prompt")
    loc_prompts = _text_or_list(rec, "locality_prompt")
    loc_answers = _target_or_list(rec, "locality_ground_truth")
    if len(loc_answers) == 1 and len(loc_prompts) != 1:
        loc_answers = loc_answers * len(loc_prompts)
    if len(loc_answers) != len(loc_prompts):
        raise _Problem(
            f"{len(loc_prompts)} locality_prompt(s) but {len(loc_answers)} locality_ground_truth value(s)"
        )
    probes = {
        "rewrite": (Probe(prompt, target=new, foil=true),),
        "paraphrase": tuple(Probe(p, target=new, foil=true) for p in rephrases),
        "neighborhood": tuple(Probe(p, target=a, foil=new) for p, a in zip(loc_prompts, loc_answers)),
    }
    meta: dict[str, object] = {
        "schema": "easyedit",
        "record_index": index,
        "generation_prompts_source": "none",
    }
    return EditCase(
        request=_request(case_id, template, subject, new, true),
        probes=probes,
        meta=meta,
        true_answer=true,
    )


def _convert_mend(rec: Mapping, case_id: str, index: int, target_field: str) -> EditCase:
    subject = _text(rec, "subject")
    src = _text(rec, "src")
    template = _template_from(src, subject, "src")
    if target_field == "answers":
        answers = rec.get("answers")
        if answers is None:
            raise _Problem("missing field 'answers' (target_field=answers)")
        if not isinstance(answers, list) or not answers:
            raise _Problem(f"field 'answers' must be a non-empty list, got {_show(answers)}")
        if not isinstance(answers[0], str):
            raise _Problem(f"field 'answers[0]' must be a string, got {type(answers[0]).__name__}")
        new = answers[0].strip()
        if not new:
            raise _Problem("empty target 'answers[0]'")
    else:
        new = _target(rec, "alt")
    pred = _target(rec, "pred")
    rephrases = _text_or_list(rec, "rephrase")
    loc = loc_ans = None
    if "loc" in rec or "loc_ans" in rec:  # both or neither (the portability files have neither)
        loc = _text(rec, "loc")
        loc_ans = _target(rec, "loc_ans")

    probes = {
        "rewrite": (Probe(src, target=new),),
        "paraphrase": tuple(Probe(p, target=new) for p in rephrases),
    }
    if loc is not None:
        probes["neighborhood"] = (Probe(loc + "?", target=loc_ans),)
    meta: dict[str, object] = {
        "schema": "mend",
        "record_index": index,
        "target_field": target_field,
        "answers": list(rec["answers"]) if isinstance(rec.get("answers"), list) else None,
        "alt": rec["alt"].strip() if isinstance(rec.get("alt"), str) else None,
        "loc": loc,
        "loc_ans": loc_ans,
        "generation_prompts_source": "none",
    }
    if isinstance(rec.get("cond"), str):
        meta["cond"] = rec["cond"]
    if "portability" in rec:
        # Validated either way. EasyEdit wrote these questions for the ``alt`` object (record 0: "...,
        # which was established in 2006?" where alt = 2006, answers[0] = 1998), so they are scored only
        # when ``alt`` is the new object.
        port_probes, relations = _portability(rec["portability"])
        if port_probes and target_field == "alt":
            probes["portability"] = port_probes
        elif port_probes:
            meta["portability_dropped"] = "written for the 'alt' object; use target_field=alt to score it"
        meta["recalled_relation"] = relations[0] if len(relations) == 1 else relations
    # The portability sets of Yao et al. 2023 (the SSS paper's section 7.2), when present.
    if "alter_subject_question" in rec:
        # The edit's question about an alias of the subject: its answer is the new object, whichever
        # field that is (the question does not name the object).
        question = _text(rec, "alter_subject_question")
        probes["subject_replace"] = (Probe(question, target=new),)
        if isinstance(rec.get("alternative_subject"), str):
            meta["alternative_subject"] = rec["alternative_subject"]
    if "inverse question" in rec:
        # The relation asked the other way round ABOUT the new object ("Who is Marian Clairmont's
        # sister?" for the edit Claire Clairmont's sister -> Marian Clairmont): the answer is the
        # subject. The question names ``alt``, so it is scored only when ``alt`` is the new object.
        question = _text(rec, "inverse question")
        if target_field == "alt":
            probes["reversed_relation"] = (Probe(question, target=subject.strip()),)
        else:
            meta["reversed_relation_dropped"] = (
                "written for the 'alt' object; use target_field=alt to score it"
            )
    return EditCase(
        request=_request(case_id, template, subject, new, None),
        probes=probes,
        meta=meta,
        true_answer=pred,
    )


_CONVERTERS: dict[str, Callable[[Mapping, str, int, str], EditCase]] = {
    "rome": _convert_rome,
    "easyedit": _convert_easyedit,
    "mend": _convert_mend,
}


# ------------------------------------------------------------------------------------- field helpers


def _record_schema(rec: Mapping) -> str | None:
    if "requested_rewrite" in rec:
        return "rome"
    if "src" in rec and ({"answers", "alt", "loc", "loc_ans"} & rec.keys()):
        return "mend"
    if "prompt" in rec and ({"target_new", "ground_truth"} & rec.keys()):
        return "easyedit"
    return None


def _unknown_schema_message(file: str, records: Sequence[object]) -> str:
    seen: set[str] = set()
    kinds: set[str] = set()
    for rec in records[:50]:
        if isinstance(rec, Mapping):
            seen.update(map(str, rec.keys()))
        elif not isinstance(rec, InvalidRecordError):
            kinds.add(type(rec).__name__)
    fields = ", ".join(sorted(seen)) if seen else "none"
    extra = f" (non-object records: {', '.join(sorted(kinds))})" if kinds else ""
    expected = "; ".join(f"{name}: {fields_}" for name, fields_ in _SCHEMA_FIELDS.items())
    return (
        f"{file}: unknown dataset schema; fields seen: {fields}{extra}. Expected one of {expected}. "
        "Force one with schema=rome|easyedit|mend"
    )


def _case_id(rec: Mapping, index: int, file: str) -> str:
    if "case_id" not in rec or rec["case_id"] is None:
        return str(index)
    value = rec["case_id"]
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise InvalidRecordError(
            file, index, f"field 'case_id' must be an integer or a string, got {_show(value)}"
        )
    if isinstance(value, str) and not value.strip():
        raise InvalidRecordError(file, index, "empty 'case_id'")
    return str(value)


def _text(rec: Mapping, key: str, label: str | None = None) -> str:
    """A required non-blank string, kept as is."""
    label = label or key
    if key not in rec:
        raise _Problem(f"missing field '{label}'")
    value = rec[key]
    if not isinstance(value, str):
        raise _Problem(f"field '{label}' must be a string, got {_show(value)}")
    if not value.strip():
        raise _Problem(f"empty '{label}'")
    return value


def _optional_text(rec: Mapping, key: str, label: str) -> str | None:
    if rec.get(key) is None:
        return None
    return _text(rec, key, label)


def _target(rec: Mapping, key: str, label: str | None = None) -> str:
    """A required answer string, stripped (targets are stored without a leading space)."""
    label = label or key
    if key not in rec:
        raise _Problem(f"missing field '{label}'")
    value = rec[key]
    if not isinstance(value, str):
        raise _Problem(f"field '{label}' must be a string, got {_show(value)}")
    if not value.strip():
        raise _Problem(f"empty target '{label}'")
    return value.strip()


def _rome_target(rw: Mapping, key: str) -> tuple[str, str | None]:
    label = f"requested_rewrite.{key}"
    if key not in rw:
        raise _Problem(f"missing field '{label}'")
    value = rw[key]
    if not isinstance(value, Mapping):
        raise _Problem(f"field '{label}' must be an object {{str, id}}, got {_show(value)}")
    text = _target(value, "str", f"{label}.str")
    ident = value.get("id")
    if ident is not None and not isinstance(ident, str):
        raise _Problem(f"field '{label}.id' must be a string, got {_show(ident)}")
    return text, ident


def _text_list(rec: Mapping, key: str, required: bool = True) -> tuple[str, ...]:
    if key not in rec:
        if required:
            raise _Problem(f"missing field '{key}'")
        return ()
    value = rec[key]
    if not isinstance(value, list):
        raise _Problem(f"field '{key}' must be a list of strings, got {_show(value)}")
    return tuple(_item(value, i, key) for i in range(len(value)))


def _text_or_list(rec: Mapping, key: str) -> tuple[str, ...]:
    if key not in rec:
        raise _Problem(f"missing field '{key}'")
    value = rec[key]
    if isinstance(value, str):
        return (_text(rec, key),)
    if not isinstance(value, list):
        raise _Problem(f"field '{key}' must be a string or a list of strings, got {_show(value)}")
    return tuple(_item(value, i, key) for i in range(len(value)))


def _target_or_list(rec: Mapping, key: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in _text_or_list(rec, key))


def _item(values: list, i: int, key: str) -> str:
    value = values[i]
    if not isinstance(value, str):
        raise _Problem(f"'{key}[{i}]' must be a string, got {_show(value)}")
    if not value.strip():
        raise _Problem(f"empty '{key}[{i}]'")
    return value


def _question_probes(
    value: object, field: str, question: str, answer: str, relation: str
) -> tuple[tuple[Probe, ...], list[object]]:
    """A record's ``field``: an object (or a list of them) holding a ``question`` and the ``answer`` it
    must be answered with after the edit; their probes, and each object's ``relation`` value."""
    items = value if isinstance(value, list) else [value]
    probes: list[Probe] = []
    relations: list[object] = []
    for i, item in enumerate(items):
        label = field if not isinstance(value, list) else f"{field}[{i}]"
        if not isinstance(item, Mapping):
            raise _Problem(
                f"field '{label}' must be an object with '{question}'/'{answer}', got {_show(item)}"
            )
        text = _text(item, question, f"{label}.{question}")
        target = _target(item, answer, f"{label}.{answer}")
        probes.append(Probe(text, target=target))
        relations.append(item.get(relation))
    return tuple(probes), relations


def _portability(value: object) -> tuple[tuple[Probe, ...], list[object]]:
    """``portability`` {New Question, New Answer, Recalled Relation} (or a list of them)."""
    return _question_probes(value, "portability", "New Question", "New Answer", "Recalled Relation")


def _unrelated(value: object) -> tuple[tuple[Probe, ...], list[object]]:
    """``unrelated_relation`` {relation_id, object, question} (or a list of them): the question, with
    the object it must still be answered with after the edit; and the relation ids."""
    return _question_probes(value, "unrelated_relation", "question", "object", "relation_id")


def _check_template(template: str) -> None:
    n = template.count(SUBJECT_SLOT)
    if n != 1:
        raise _Problem(f"prompt template must contain exactly one '{{}}', found {n} in {_short(template)}")


def _template_from(prompt: str, subject: str, field_name: str) -> str:
    if SUBJECT_SLOT in prompt:
        raise _Problem(f"{field_name} already contains '{{}}': {_short(prompt)}")
    n = prompt.count(subject)
    if n == 0:
        raise _Problem(f"subject {_short(subject)} not found in {field_name} {_short(prompt)}")
    if n > 1:
        raise _Problem(
            f"subject {_short(subject)} occurs {n} times in {field_name} {_short(prompt)} (ambiguous)"
        )
    return prompt.replace(subject, SUBJECT_SLOT, 1)


def _request(case_id: str, template: str, subject: str, new: str, true: str | None) -> EditRequest:
    try:
        return EditRequest(
            case_id=case_id, prompt=template, subject=subject, target_new=new, target_true=true
        )
    except ValueError as exc:  # pragma: no cover - the checks above come first
        raise _Problem(str(exc)) from None


def _check_args(size: int | None, on_invalid: str, schema: str, target_field: str, prefix: str = "") -> None:
    """One-line :class:`DatasetError` for a bad setting (``prefix``: ``dataset.`` from the config)."""
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise DatasetError(f"{prefix}size must be a positive integer or null (all cases), got {size!r}")
    if on_invalid not in ON_INVALID:
        raise DatasetError(f"{prefix}on_invalid must be one of {', '.join(ON_INVALID)}, got {on_invalid!r}")
    if schema != "auto" and schema not in SCHEMAS:
        raise DatasetError(f"{prefix}schema must be auto or one of {', '.join(SCHEMAS)}, got {schema!r}")
    if target_field not in TARGET_FIELDS:
        raise DatasetError(
            f"{prefix}target_field must be one of {', '.join(TARGET_FIELDS)}, got {target_field!r}"
        )


def _short(text: str, limit: int = 80) -> str:
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def _show(value: object) -> str:
    shown = repr(value)
    return f"{type(value).__name__} {shown if len(shown) <= 60 else shown[:57] + '...'}"


def _keys(obj: Mapping) -> str:
    keys = list(map(str, obj.keys()))
    return ", ".join(keys[:12]) + (", ..." if len(keys) > 12 else "")


def _one_line(text: str) -> str:
    return " ".join(text.splitlines())
