"""A SERAC-edited model saved and loaded back (runner/export.py, model-level routers): the folder
is the base checkpoint plus the router (memory, classifier, counterfactual model, config), and the
loaded model gives the same logits, routes and generations as the edited one; a whole
``save_model=true`` run reloads through ``model.hub_id=<folder>`` and scores as the run did."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from editors.serac import _ROUTER, Serac, SeracConfig, SeracRouter
from evaluation.metrics import score_cases
from runner import run
from runner.datasets import load_cases
from runner.export import ADAPTERS_JSON, load_edited, save_edited
from runner.models import load_model
from tests.conftest import compose_config
from tests.editing_fixtures import SPECS, model, tokenizer
from tests.test_serac import _batch_logits, _left_padded

UNRELATED = "In 1907, the weather over the harbour was"


@pytest.fixture(scope="module")
def cases():
    return list(load_cases("counterfact", size=3).cases)


@pytest.fixture
def edited(cases):
    """A tiny GPT-2 with two sequential SERAC edits (untrained networks: an edit's own prompt has
    similarity 1 to its key, an unrelated prompt next to none); yields (net, tok, handle, before)."""
    torch.set_num_threads(1)
    tok = tokenizer("gpt2")
    net = model("gpt2", tok)
    editor = Serac(SeracConfig(classifier=None, train_data={"name": "counterfact_train"}), SPECS["gpt2"])
    classifier, cf = editor._build(net, tok)
    editor.classifier, editor.counterfactual = classifier.eval(), cf.eval()
    for p in list(classifier.parameters()) + list(cf.parameters()):
        p.requires_grad_(False)
    before = _logits(net, tok, _texts(cases))[0]
    h1 = editor.apply(net, tok, [cases[0].request]).attach(net)
    handle = h1.merge(editor.apply(net, tok, [cases[1].request]).attach(net))
    yield net, tok, handle, before
    handle.restore()
    editor.reset()


def _texts(cases) -> list[str]:
    return [cases[0].request.text, cases[1].request.text, UNRELATED]


def _logits(net, tok, texts) -> tuple[torch.Tensor, list[int]]:
    """Right-padded logits of ``texts`` and, when routed, the router's routes."""
    logits, _ = _batch_logits(net, tok, texts)
    router = net.__dict__.get(_ROUTER)
    return logits, (list(router.last_routes) if router is not None else [])


def _generate(net, tok, texts) -> torch.Tensor:
    ids, mask = _left_padded(tok, texts)
    kwargs = dict(do_sample=False, max_new_tokens=3, pad_token_id=tok.eos_token_id)
    return net.generate(input_ids=ids, attention_mask=mask, **kwargs)


def test_a_serac_model_loads_back_with_the_same_logits_routes_and_generations(edited, cases, tmp_path):
    net, tok, _, before = edited
    texts = _texts(cases)
    expected, routes = _logits(net, tok, texts)
    assert routes == [0, 1, -1]  # each rewrite prompt to its edit, the unrelated prompt to the base
    assert not torch.allclose(expected[0], before[0]) and torch.equal(expected[2], before[2])
    generated = _generate(net, tok, texts)

    folder = save_edited(net, tok, tmp_path / "edited")
    index = json.loads((folder / ADAPTERS_JSON).read_text())
    assert index["adapters"] == []
    assert index["routers"] == [{"class": "editors.serac.SeracRouter", "folder": "routers/r0"}]
    saved = folder / "routers" / "r0"
    assert {p.name for p in saved.iterdir()} >= {
        "classifier",
        "counterfactual",
        "router.json",
        "keys.safetensors",
    }
    memory = json.loads((saved / "router.json").read_text())["memory"]
    assert [m["case_id"] for m in memory] == [cases[0].case_id, cases[1].case_id]
    # saving put the router back: the edited model still routes and scores as before
    assert torch.equal(_logits(net, tok, texts)[0], expected)
    assert "save_pretrained" in net.__dict__ and "generate" in net.__dict__

    # the folder's weights are the base checkpoint: loaded without the router, the unedited logits
    plain = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert torch.equal(_logits(plain, tok, texts)[0], before)

    again, again_tok = load_edited(folder)
    assert isinstance(again.__dict__[_ROUTER], SeracRouter)
    logits, again_routes = _logits(again, again_tok, texts)
    assert again_routes == routes
    assert torch.equal(logits, expected)
    assert torch.equal(_generate(again, again_tok, texts), generated)

    # model.hub_id=<folder> (runner.models) attaches the router the same way
    hub = compose_config(
        "model=tiny-gpt2",
        "model.source=hub",
        f"model.hub_id={folder}",
        "model.device=cpu",
        "model.sizes.n_layer=3",  # the fixture model's depth
    )
    loaded = load_model(hub.model, cases=cases, cache_dir=tmp_path / "cache", seed=0)
    hub_logits, hub_routes = _logits(loaded.model, loaded.tokenizer, texts)
    assert hub_routes == routes and torch.equal(hub_logits, expected)


def test_a_loaded_serac_model_is_scored_unpacked_or_refused_in_one_line(edited, cases, tmp_path):
    net, tok, *_ = edited
    expected = score_cases(net, tok, cases, pack=False)
    again, again_tok = load_edited(save_edited(net, tok, tmp_path / "edited"))
    assert score_cases(again, again_tok, cases, pack=False) == expected
    with pytest.raises(RuntimeError, match=r"score this model unpacked \(pack=False\)") as info:
        score_cases(again, again_tok, cases, batch_size=4)  # packed rows share a prompt: not routable
    assert "\n" not in str(info.value)


def test_saving_without_the_tokenizer_or_through_save_pretrained_is_refused_in_one_line(edited, tmp_path):
    net, *_ = edited
    with pytest.raises(ValueError, match=r"router \(SeracRouter\) needs its tokenizer") as info:
        save_edited(net, None, tmp_path / "edited")
    assert "\n" not in str(info.value) and not (tmp_path / "edited").exists()
    with pytest.raises(RuntimeError, match="use runner.export.save_edited"):
        net.save_pretrained(tmp_path / "plain")


def test_a_sequential_serac_run_saves_a_model_that_scores_as_the_run_did(tmp_path):
    out = tmp_path / "out"
    cfg = compose_config(
        "model=tiny-gpt2",
        "editor=serac",
        "editor.classifier=null",
        "editor.train_data={name: counterfact_train, size: 12}",
        "editor.max_steps=2",
        "editor.val_every=2",
        "editor.val_cases=2",
        "editor.accumulate=1",
        "stats.n_samples=60",
        "threads=1",
        "progress=false",
        "logger=none",
        "dataset.size=4",
        "batch_size=2",
        "edit_mode=sequential",
        "eval.timing=at_end",
        "eval.generation.enabled=false",
        "save_model=true",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"paths.output_dir={out}",
    )
    summary = run(cfg)
    folder = out / "edited_model"
    assert summary["timing"]["edited_model"] == str(folder)
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    cases = load_cases("counterfact", size=4).cases
    hub = compose_config("model=tiny-gpt2", "model.source=hub", f"model.hub_id={folder}", "model.device=cpu")
    loaded = load_model(hub.model, cases=cases, cache_dir=tmp_path / "cache", seed=0)
    assert isinstance(loaded.model.__dict__[_ROUTER], SeracRouter)
    scores = score_cases(loaded.model, loaded.tokenizer, cases, pack=False)
    # the toy's random weights give magnitudes near 1e-4: the tolerance is relative
    assert any(r["post_efficacy_magnitude"] != r["pre_efficacy_magnitude"] for r in records)  # routed
    for record, score in zip(records, scores):
        for key in ("efficacy_magnitude", "generality_magnitude", "locality_magnitude"):
            assert record[f"post_{key}"] == pytest.approx(score[key], rel=1e-6, abs=1e-12), key
    # ... and a run on the saved folder (model.hub_id) scores it unpacked, as the edited run did
    again = tmp_path / "again"
    cfg = compose_config(
        "model=tiny-gpt2",
        "model.source=hub",
        f"model.hub_id={folder}",
        "model.device=cpu",
        "editor=unedited",
        "threads=1",
        "progress=false",
        "logger=none",
        "dataset.size=4",
        "eval.generation.enabled=false",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"paths.output_dir={again}",
    )
    run(cfg)
    reloaded = [json.loads(line) for line in (again / "results.jsonl").read_text().splitlines()]
    for record, other in zip(records, reloaded):
        for key in ("efficacy_magnitude", "generality_magnitude", "locality_magnitude"):
            assert other[f"pre_{key}"] == pytest.approx(record[f"post_{key}"], rel=1e-6, abs=1e-12), key
