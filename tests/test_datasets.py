"""runner.datasets: three source schemas -> EditCase, validation, sources. Fast, no network."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from editors.requests import EditRequest
from evaluation.cases import EditCase, Probe
from runner.datasets import (
    DatasetConfig,
    DatasetDownloadError,
    DatasetError,
    DuplicateCaseIdError,
    InvalidRecordError,
    LoadedDataset,
    UnknownSchemaError,
    bundled_path,
    cases_from_records,
    load_cases,
    load_from_config,
)

ASSETS = Path(__file__).parent / "assets"
ROME3 = ASSETS / "counterfact_rome_3.json"
MALFORMED = ASSETS / "counterfact_easyedit_malformed.json"

# sha256 of the bundled files, as written in runner/data/SOURCES.md
BUNDLED_SHA256 = {
    "counterfact": "befa79af9606039634cc22cebc071630cf693ea76b605ad8012caabbf0a04836",
    "counterfact_easyedit": "58fafce2d076e689c93878d4ec31ff47ff617b5964600787c9adf3869afa1e4d",
    "zsre": "f7328469f6b45a3d5fdd68b794c3d8ccd2ceb75e40ae1f118e3f7c03485f1382",
    "wikitext2": "bbf94c53a05abe9ee670d3b6343608095822c85e26de37c70b24fc571964574a",
}


@pytest.fixture(scope="module")
def cf() -> LoadedDataset:
    return load_cases("counterfact_easyedit")


@pytest.fixture(scope="module")
def zsre() -> LoadedDataset:
    return load_cases("zsre")


def _easyedit(**over: object) -> dict:
    rec = {
        "case_id": 0,
        "prompt": "The mother tongue of Danielle Darrieux is",
        "target_new": "English",
        "subject": "Danielle Darrieux",
        "ground_truth": "French",
        "rephrase_prompt": "Where Danielle Darrieux is from, people speak the language of",
        "locality_prompt": "Michel Rocard is a native speaker of",
        "locality_ground_truth": "French",
    }
    rec.update(over)
    return {k: v for k, v in rec.items() if v is not ...}


def _mend(**over: object) -> dict:
    rec = {
        "subject": "Ramalinaceae",
        "src": "Which family does Ramalinaceae belong to?",
        "pred": "Ramalinales",
        "rephrase": "What family are Ramalinaceae?",
        "alt": "Lamiinae",
        "answers": ["Lecanorales"],
        "loc": "nq question: types of skiing in the winter olympics 2018",
        "loc_ans": "Downhill",
        "cond": "Ramalinales >> Lamiinae || Which family does Ramalinaceae belong to?",
    }
    rec.update(over)
    return {k: v for k, v in rec.items() if v is not ...}


def _rome(**over: object) -> dict:
    rec = json.loads(ROME3.read_text())[1]
    rw = dict(rec["requested_rewrite"])
    for key in ("prompt", "subject", "target_new", "target_true"):
        if key in over:
            rw[key] = over.pop(key)
    rec["requested_rewrite"] = {k: v for k, v in rw.items() if v is not ...}
    rec.update(over)
    return {k: v for k, v in rec.items() if v is not ...}


def _write(tmp_path: Path, records: list, name: str = "data.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(records))
    return path


# ------------------------------------------------------------------------------------------- schemas


def test_rome_schema_fixture() -> None:
    ds = load_cases("counterfact", path=ROME3)
    assert ds.schema == "rome" and ds.n_records == 3 and len(ds) == 3 and ds.n_skipped == 0
    assert [c.case_id for c in ds.cases] == ["0", "1", "7"]
    case = ds.cases[0]
    assert isinstance(case, EditCase)
    assert case.request == EditRequest(
        "0", "The mother tongue of {} is", "Danielle Darrieux", "English", "French"
    )
    assert case.probes["rewrite"] == (
        Probe("The mother tongue of Danielle Darrieux is", "English", "French"),
    )
    assert len(case.probes["paraphrase"]) == 2
    assert all(p.target == "English" and p.foil == "French" for p in case.probes["paraphrase"])
    assert len(case.probes["neighborhood"]) == 10
    assert case.probes["neighborhood"][0] == Probe("The mother tongue of Léon Blum is", "French", "English")
    assert len(case.probes["attribute"]) == 10
    assert all(p.target == "English" and p.foil == "French" for p in case.probes["attribute"])
    assert len(case.generation_prompts) == 10 and case.generation_prompts[1].startswith("Where Danielle")
    assert case.meta["relation_id"] == "P103"
    assert (case.meta["target_new_id"], case.meta["target_true_id"]) == ("Q1860", "Q150")
    assert case.true_answer == "French"
    # an empty attribute list gives no "attribute" probe set; the subject may open the template
    last = ds.cases[2]
    assert "attribute" not in last.probes
    assert last.request.text == "Toko Yasuda, the"


def test_easyedit_schema_bundled(cf: LoadedDataset) -> None:
    assert cf.schema == "easyedit" and cf.n_records == 500 and len(cf) == 500
    case = cf.cases[0]
    assert case.request == EditRequest(
        "0", "The mother tongue of {} is", "Danielle Darrieux", "English", "French"
    )
    assert case.probes["rewrite"] == (
        Probe("The mother tongue of Danielle Darrieux is", "English", "French"),
    )
    assert case.probes["paraphrase"] == (
        Probe("Where Danielle Darrieux is from, people speak the language of", "English", "French"),
    )
    # neighborhood: the OLD object must still win, so the foil is target_new
    assert case.probes["neighborhood"] == (
        Probe("Michel Rocard is a native speaker of", "French", "English"),
    )
    assert case.generation_prompts == () and case.meta["generation_prompts_source"] == "none"
    assert case.true_answer == "French"
    assert cf.cases[2].case_id == "4"  # case ids come from the file, as strings
    assert all(c.request.text == c.probes["rewrite"][0].prompt for c in cf.cases)


def test_mend_schema_bundled(zsre: LoadedDataset) -> None:
    assert zsre.schema == "mend" and len(zsre) == 500 and zsre.target_field == "answers"
    case = zsre.cases[0]
    assert case.request == EditRequest(
        "0", "When was the inception of {}?", "IAAF Combined Events Challenge", "1998", None
    )
    assert case.probes["rewrite"] == (
        Probe("When was the inception of IAAF Combined Events Challenge?", "1998"),
    )
    assert case.probes["paraphrase"] == (
        Probe("When was the IAAF Combined Events Challenge launched?", "1998"),
    )
    assert case.probes["neighborhood"] == (
        Probe("nq question: what is the name of the last episode of spongebob?", "The String"),
    )
    assert all(p.foil is None for c in zsre.cases for ps in c.probes.values() for p in ps)
    assert case.true_answer == "2011"  # pred
    assert [c.case_id for c in zsre.cases[:3]] == ["0", "1", "2"]
    # portability was written for `alt`: only scored with target_field=alt
    assert "portability" not in case.probes and "portability_dropped" in case.meta


def test_mend_target_field_alt() -> None:
    ds = load_cases("zsre", size=30, target_field="alt")
    case = ds.cases[0]
    assert case.request.target_new == "2006" and case.request.target_true is None
    assert case.probes["portability"] == (
        Probe(
            "What type of sports event is the IAAF Combined Events Challenge, which was established in 2006?",
            "Athletics",
        ),
    )
    assert ds.cases[26].request.target_new == "MAT-49"  # ' MAT-49' in the file: targets are stripped


def test_template_extraction_and_strip() -> None:
    cases, _, schema = cases_from_records(
        [_easyedit(prompt="What is the twin city of Lyon? It is", subject="Lyon", target_new=" Manila")]
    )
    assert schema == "easyedit"
    assert cases[0].request.prompt == "What is the twin city of {}? It is"
    assert cases[0].request.target_new == "Manila"
    cases, _, _ = cases_from_records([_mend()])
    assert cases[0].request.prompt == "Which family does {} belong to?"


def test_easyedit_lists_and_missing_case_id() -> None:
    rec = _easyedit(
        case_id=...,
        rephrase_prompt=["Danielle Darrieux speaks", "Danielle Darrieux was raised speaking"],
        locality_prompt=["Michel Rocard speaks", "Léon Blum speaks"],
        locality_ground_truth="French",
    )
    cases, _, _ = cases_from_records([rec, dict(rec, subject="Paris", prompt="Paris speaks")])
    assert [c.case_id for c in cases] == ["0", "1"]  # no case_id: the record index
    assert len(cases[0].probes["paraphrase"]) == 2
    assert [p.target for p in cases[0].probes["neighborhood"]] == ["French", "French"]


# ------------------------------------------------------------------------------- sources and formats


def test_size_keeps_first_valid_cases(tmp_path: Path) -> None:
    ds = load_cases("counterfact", size=7)
    assert len(ds) == 7 and ds.n_records == 500
    records = [_easyedit(case_id=0), _easyedit(case_id=1, subject="Nobody"), _easyedit(case_id=2)]
    ds = load_cases("x", path=_write(tmp_path, records), size=2, on_invalid="skip")
    assert [c.case_id for c in ds.cases] == ["0", "2"] and ds.n_skipped == 1
    with pytest.raises(ValueError, match="size"):
        load_cases("counterfact", size=0)


def test_jsonl_equals_json() -> None:
    a = load_cases("cf", path=ROME3)
    b = load_cases("cf", path=ASSETS / "counterfact_rome_3.jsonl")
    assert a.cases == b.cases and a.sha256 != b.sha256


def test_jsonl_bad_line_is_a_record_error(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(_easyedit()) + "\n\n{not json\n" + json.dumps(_easyedit(case_id=5)) + "\n")
    with pytest.raises(InvalidRecordError, match=r"d\.jsonl record 1: line 3 is not valid JSON"):
        load_cases("x", path=path)
    ds = load_cases("x", path=path, on_invalid="skip")
    assert [c.case_id for c in ds.cases] == ["0", "5"] and ds.n_skipped == 1 and ds.n_records == 3


def test_not_a_list(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"data": [_easyedit()]}, indent=2))
    with pytest.raises(DatasetError, match="one JSON object spread over several lines"):
        load_cases("x", path=path)
    path.write_text("hello")
    with pytest.raises(DatasetError, match="neither a JSON list nor JSONL"):
        load_cases("x", path=path)
    path.write_text("[]")
    with pytest.raises(DatasetError, match="no records"):
        load_cases("x", path=path)


def test_sha256_stable_and_matches_sources() -> None:
    for name in ("counterfact", "counterfact_easyedit", "zsre"):
        ds = load_cases(name, size=1)
        assert ds.sha256 == BUNDLED_SHA256[name] == hashlib.sha256(Path(ds.path).read_bytes()).hexdigest()
        assert ds.source == ds.path == str(bundled_path(name))
    wiki = bundled_path("wikitext2").read_bytes()
    assert hashlib.sha256(wiki).hexdigest() == BUNDLED_SHA256["wikitext2"] and b"\r" not in wiki
    assert bundled_path("wikitext") == bundled_path("wikitext2")
    sources = (bundled_path("counterfact").parent / "SOURCES.md").read_text()
    assert all(sha in sources for sha in BUNDLED_SHA256.values())
    with pytest.raises(ValueError, match="bundled"):
        bundled_path("nope")


def test_download_cache_hit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import urllib.request

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("network used")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    (tmp_path / "multi_counterfact.json").write_bytes(ROME3.read_bytes())
    ds = load_cases("mcf", download=True, cache_dir=tmp_path)
    assert ds.source == "https://memit.baulab.info/data/dsets/multi_counterfact.json"
    assert ds.path == str(tmp_path / "multi_counterfact.json") and len(ds) == 3
    cfg = DatasetConfig(name="multi_counterfact", download=True, size=2, cache_dir=str(tmp_path))
    assert len(load_from_config(cfg)) == 2


def test_download_offline_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import urllib.error
    import urllib.request

    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DatasetDownloadError, match=r"dataset\.path") as err:
        load_cases("zsre", download=True, cache_dir=tmp_path)
    assert "zsre_mem_eval.json" in str(err.value) and "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []  # no partial file left in the cache


def test_no_bundled_sample_and_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="download=true"):
        load_cases("multi_counterfact")
    with pytest.raises(FileNotFoundError):
        load_cases("counterfact", path=tmp_path / "absent.json")


def test_dataset_config_is_structured_config() -> None:
    omegaconf = pytest.importorskip("omegaconf")
    base = omegaconf.OmegaConf.structured(DatasetConfig)
    cfg = omegaconf.OmegaConf.merge(base, {"name": "zsre", "size": 4, "target_field": "alt"})
    ds = load_from_config(cfg)
    assert len(ds) == 4 and ds.cases[0].request.target_new == "2006"


# -------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("record", "problem"),
    [
        (_easyedit(subject="Paris"), "subject 'Paris' not found in prompt 'The mother tongue"),
        (_easyedit(target_new=""), "empty target 'target_new'"),
        (_easyedit(ground_truth="  "), "empty target 'ground_truth'"),
        (_easyedit(ground_truth=...), "missing field 'ground_truth'"),
        (_easyedit(target_new=["English"]), "field 'target_new' must be a string, got list"),
        (_easyedit(rephrase_prompt=3), "field 'rephrase_prompt' must be a string or a list of strings"),
        (_easyedit(prompt="{} is {}", subject="X"), "prompt already contains '{}'"),
        (_easyedit(prompt="Lyon, Lyon", subject="Lyon"), "subject 'Lyon' occurs 2 times"),
        (_easyedit(target_new="French"), "target_new equals ground_truth"),
        (_easyedit(case_id=1.5), "field 'case_id' must be an integer or a string"),
        (_rome(prompt="The official religion of {} is {}"), "exactly one '{}', found 2"),
        (_rome(prompt="The official religion of Edwin is"), "exactly one '{}', found 0"),
        (_rome(target_new={"str": "", "id": "Q1"}), "empty target 'requested_rewrite.target_new.str'"),
        (_rome(target_true="Christianity"), "'requested_rewrite.target_true' must be an object"),
        (_rome(subject=...), "missing field 'requested_rewrite.subject'"),
        (_rome(neighborhood_prompts=...), "missing field 'neighborhood_prompts'"),
        (_rome(paraphrase_prompts=["ok", 4]), "'paraphrase_prompts[1]' must be a string"),
        (_mend(subject="Lichen"), "subject 'Lichen' not found in src"),
        (_mend(answers=[]), "field 'answers' must be a non-empty list"),
        (_mend(answers=[""]), "empty target 'answers[0]'"),
        (_mend(loc_ans=...), "missing field 'loc_ans'"),
        (_mend(portability={"New Question": "Q?"}), "missing field 'portability.New Answer'"),
    ],
)
def test_malformed_record_errors(tmp_path: Path, record: dict, problem: str) -> None:
    good = _rome() if "requested_rewrite" in record else _mend() if "src" in record else _easyedit()
    if "case_id" in good:
        good["case_id"] = 100
    path = _write(tmp_path, [good, record], name="bad-file.json")
    with pytest.raises(InvalidRecordError) as err:
        load_cases("x", path=path)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("bad-file.json record 1")
    assert problem in message
    assert err.value.index == 1 and isinstance(err.value, ValueError)
    ds = load_cases("x", path=path, on_invalid="skip")
    assert len(ds) == 1 and ds.n_skipped == 1 and ds.skipped_reasons == [message]


def test_error_names_case_id() -> None:
    with pytest.raises(InvalidRecordError) as err:
        load_cases("counterfact", path=MALFORMED)
    assert str(err.value) == (
        "counterfact_easyedit_malformed.json record 1 (case_id 11): "
        "subject 'Paris' not found in prompt 'The capital of France is'"
    )
    assert err.value.case_id == "11"


def test_skip_mode_counts() -> None:
    ds = load_cases("counterfact", path=MALFORMED, on_invalid="skip")
    assert [c.case_id for c in ds.cases] == ["10", "14"]
    assert ds.n_records == 6 and ds.n_skipped == 4 and len(ds.skipped_reasons) == 4
    assert [r.split(":")[0] for r in ds.skipped_reasons] == [
        "counterfact_easyedit_malformed.json record 1 (case_id 11)",
        "counterfact_easyedit_malformed.json record 2 (case_id 12)",
        "counterfact_easyedit_malformed.json record 3 (case_id 13)",
        "counterfact_easyedit_malformed.json record 5 (case_id 15)",
    ]


def test_all_invalid_is_an_error(tmp_path: Path) -> None:
    path = _write(tmp_path, [_easyedit(subject="Paris")])
    with pytest.raises(DatasetError, match="no valid record"):
        load_cases("x", path=path, on_invalid="skip")


def test_non_object_record(tmp_path: Path) -> None:
    path = _write(tmp_path, [_easyedit(), "oops"])
    with pytest.raises(InvalidRecordError, match="record 1: record is a str"):
        load_cases("x", path=path)


def test_duplicate_case_ids(tmp_path: Path) -> None:
    path = _write(tmp_path, [_easyedit(case_id=3), _easyedit(case_id="3")], name="dup.json")
    for mode in ("error", "skip"):
        with pytest.raises(
            DuplicateCaseIdError, match=r"dup\.json record 1 \(case_id 3\): duplicate case_id '3' "
        ):
            load_cases("x", path=path, on_invalid=mode)


def test_unknown_schema(tmp_path: Path) -> None:
    path = _write(tmp_path, [{"question": "q", "answer": "a"}], name="odd.json")
    with pytest.raises(UnknownSchemaError) as err:
        load_cases("x", path=path)
    message = str(err.value)
    assert "fields seen: answer, question" in message
    assert all(s in message for s in ("rome:", "easyedit:", "mend:", "requested_rewrite", "loc_ans"))


def test_forced_schema(tmp_path: Path) -> None:
    path = _write(tmp_path, [_easyedit()])
    with pytest.raises(InvalidRecordError, match="missing field 'requested_rewrite'"):
        load_cases("x", path=path, schema="rome")
    assert load_cases("x", path=path, schema="easyedit").schema == "easyedit"
    with pytest.raises(ValueError, match="schema"):
        load_cases("x", path=path, schema="csv")
    with pytest.raises(ValueError, match="on_invalid"):
        load_cases("x", path=path, on_invalid="ignore")
    with pytest.raises(ValueError, match="target_field"):
        load_cases("x", path=path, target_field="pred")


def test_full_schema_counterfact_is_the_bundled_default() -> None:
    ds = load_cases("counterfact")
    assert ds.schema == "rome" and ds.n_records == len(ds) == 500
    case = ds.cases[0]
    assert case.request.subject == "Danielle Darrieux" and case.request.target_new == "English"
    assert len(case.probes["paraphrase"]) == 2 and len(case.probes["neighborhood"]) == 10
    assert {p.target for p in case.probes["neighborhood"]} == {"French"}
    assert len(case.generation_prompts) == 10 and case.meta["relation_id"] == "P103"
