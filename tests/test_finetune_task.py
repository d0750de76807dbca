"""task=finetune: a (tiny, hub-like) model fine-tuned on TOFU's train["full"] / train["retain"],
stored by content, loaded again without training, and picked up by task=unlearn."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from runner import run
from runner.artifacts import ArtifactStore
from runner.finetune import FinetuneConfig, artifact_for
from runner.pipeline import ConfigError
from tests.conftest import compose_config

#: TOFU forget01 with 2 retain authors: train["full"] = 80 items, train["retain"] = 40
BASE = [
    "dataset=tofu",
    "dataset.forget_split=forget01",
    "dataset.retain_authors=2",
    "dataset.size=4",
    "model=tiny-gpt2",
    "model.sizes.max_positions=512",  # TOFU answers in a 1000-token BPE
    "finetune.lr=1e-3",  # a random tiny model: a few epochs at 1e-3 move it
    "finetune.epochs=3",
    "finetune.accumulate=1",
    "finetune.warmup=0",
    "unlearn.max_new_tokens=8",
    "threads=1",
    "progress=false",
    "logger=none",
]


def _cfg(tmp_path: Path, *overrides: str, task: str = "finetune", out: str = "out"):
    return compose_config(
        f"task={task}",
        *BASE,
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"paths.output_dir={tmp_path / out}",
        *overrides,
    )


def _answer_nll(model, tokenizer, pairs) -> float:
    """Mean NLL per answer token (" " + answer + EOS) with HF's own loss: labels -100 on the prompt."""
    total, count = 0.0, 0
    with torch.no_grad():
        for prompt, answer in pairs:
            p = tokenizer(prompt)["input_ids"]
            a = tokenizer(" " + answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            ids = torch.tensor([p + a])
            labels = torch.tensor([[-100] * len(p) + a])
            loss = model(input_ids=ids, labels=labels).loss
            total += float(loss) * len(a)
            count += len(a)
    return total / count


def _pairs(cfg, tokenizer, which="full"):
    from runner.finetune import _load_data, _prompter, training_pairs

    return training_pairs(_load_data(cfg), which, _prompter(cfg, tokenizer))


def test_finetuning_lowers_the_answer_nll_of_the_training_items(tmp_path):
    from runner.models import load_model

    cfg = _cfg(tmp_path)
    summary = run(cfg)
    assert summary["trained"] and summary["which"] == "full"
    report = summary["report"]
    assert report["n_items"] == 80 and report["steps"] == 3 * 10  # 80 items / batch 8, 3 epochs
    base = load_model(cfg.model, cache_dir=Path(cfg.paths.cache_dir), seed=cfg.seed)
    tuned = load_model(
        {**dict(cfg.model), "source": "hub", "hub_id": summary["artifact"]}, cache_dir=tmp_path / "c2"
    )
    pairs = _pairs(cfg, base.tokenizer)
    # task=unlearn's prompts (unlearn.question_template)
    assert all(p.startswith("Question: ") and p.endswith("\nAnswer:") for p, _ in pairs)
    before = _answer_nll(base.model, base.tokenizer, pairs)
    after = _answer_nll(tuned.model, tuned.tokenizer, pairs)
    # the report's measurement is the same quantity, computed the runner's way
    assert report["answer_nll_before"] == pytest.approx(before, rel=1e-4)
    assert report["answer_nll_after"] == pytest.approx(after, rel=1e-4)
    assert after < before - 0.5
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["artifact"] == summary["artifact"]


def test_a_second_run_loads_the_artifact_without_training(tmp_path, monkeypatch):
    first = run(_cfg(tmp_path))
    weights = Path(first["artifact"]) / "model.safetensors"
    saved = load_file(weights)

    def no_training(*args, **kwargs):
        raise AssertionError("the stored model was trained again")

    monkeypatch.setattr("runner.finetune.finetune", no_training)
    second = run(_cfg(tmp_path, out="out2"))
    assert not second["trained"] and second["artifact"] == first["artifact"]
    again = load_file(weights)
    assert saved.keys() == again.keys() and all(torch.equal(saved[k], again[k]) for k in saved)


def test_the_key_changes_with_the_recipe_the_items_the_seed_and_the_model(tmp_path):
    store = ArtifactStore(tmp_path, "org/model", "abc", allow_train=False)
    pairs = [("Question: Who?\nAnswer:", "Basil."), ("Question: Where?\nAnswer:", "Paris.")]
    fcfg = FinetuneConfig()

    def folder(cfg=fcfg, items=pairs, seed=0, s=store):
        return s.folder(*artifact_for(cfg, "tofu", items, seed))

    assert folder() == folder(FinetuneConfig())  # same content, same folder
    assert folder().name.startswith("finetune-tofu-full-")
    assert folder(replace(fcfg, which="retain")).name.startswith("finetune-tofu-retain-")
    others = {
        folder(replace(fcfg, lr=2e-5)),
        folder(replace(fcfg, epochs=3)),
        folder(items=pairs[:1]),
        folder(items=[(pairs[0][0], "Basil"), pairs[1]]),
        folder(seed=1),
        folder(s=ArtifactStore(tmp_path, "org/model", "def", allow_train=False)),
    }
    assert folder() not in others and len(others) == 6
    # memory settings do not change the weights, so not the key either
    assert folder(replace(fcfg, gradient_checkpointing=False)) == folder()


def test_unlearn_picks_up_the_full_model_and_the_retain_reference(tmp_path):
    from runner.finetune import load_finetuned
    from runner.unlearn import _unlearn_cfg
    from runner.unlearning_data import load_unlearning

    full = run(_cfg(tmp_path, out="full"))
    retain = run(_cfg(tmp_path, "finetune.which=retain", out="retain"))
    assert retain["report"]["n_items"] == 40 and retain["artifact"] != full["artifact"]
    cfg = _cfg(tmp_path, "editor=unedited", "unlearn.finetuned=true", task="unlearn", out="unlearn")
    loaded, reference = load_finetuned(
        cfg, load_unlearning(cfg.dataset), Path(cfg.paths.cache_dir), _unlearn_cfg(cfg)
    )
    for model, made in ((loaded, full), (reference, retain)):
        saved = load_file(Path(made["artifact"]) / "model.safetensors")
        state = model.model.state_dict()
        assert all(torch.equal(state[k], v) for k, v in saved.items())
        assert model.model_id == "tiny-gpt2" and model.revision == Path(made["artifact"]).name
    summary = run(cfg)
    protocol = summary["protocol"]
    assert protocol["model"]["revision"] == Path(full["artifact"]).name
    assert protocol["reference_model"]["revision"] == Path(retain["artifact"]).name
    assert "forget_quality" in summary["metrics"]["post"]
    # the forget items were in train["full"] only: the full model knows them better than the base
    plain = run(_cfg(tmp_path, "editor=unedited", "unlearn.reference=none", task="unlearn", out="plain"))
    assert summary["metrics"]["pre"]["forget/loss"]["mean"] < plain["metrics"]["pre"]["forget/loss"]["mean"]


def test_a_missing_artifact_names_the_command_that_makes_it(tmp_path):
    with pytest.raises(ConfigError) as info:
        run(_cfg(tmp_path, "editor=unedited", "unlearn.finetuned=true", task="unlearn"))
    message = str(info.value)
    assert "\n" not in message and "finetune-tofu-full" in message
    assert "python run.py task=finetune dataset=tofu model=tiny-gpt2" in message
    assert (
        "dataset.forget_split=forget01 dataset.retain_authors=2" in message
        and "finetune.which=full" in message
    )
    run(_cfg(tmp_path, out="full"))  # the full model exists now: the retain model is the one missing
    with pytest.raises(ConfigError, match=r"retain model .* finetune\.which=retain"):
        run(_cfg(tmp_path, "editor=unedited", "unlearn.finetuned=true", task="unlearn"))


def test_finetune_refuses_the_toy_rwku_and_a_reference_hub_id(tmp_path):
    paths = [f"paths.cache_dir={tmp_path / 'cache'}", f"paths.output_dir={tmp_path / 'out'}", "logger=none"]
    with pytest.raises(ConfigError, match="hub models"):
        run(compose_config("task=finetune", "dataset=tofu", "model=toy", *paths))
    with pytest.raises(ConfigError, match="no train"):
        run(compose_config("task=finetune", "dataset=rwku", "model=tiny-gpt2", *paths))
    with pytest.raises(ConfigError, match="unlearning dataset"):
        run(compose_config("task=finetune", "dataset=counterfact", "model=tiny-gpt2", *paths))
    with pytest.raises(ConfigError, match="finetune.which"):
        run(_cfg(tmp_path, "finetune.which=forget"))
    with pytest.raises(ConfigError, match="unset unlearn.reference_hub_id"):
        run(_cfg(tmp_path, "unlearn.finetuned=true", "unlearn.reference_hub_id=x/y", task="unlearn"))


def test_lora_finetuning_saves_a_plain_merged_model(tmp_path):
    summary = run(_cfg(tmp_path, "finetune.lora.enabled=true", "finetune.lr=1e-2"))
    report = summary["report"]
    assert report["answer_nll_after"] < report["answer_nll_before"] - 0.1
    saved = load_file(Path(summary["artifact"]) / "model.safetensors")
    assert not any("lora" in k for k in saved)
    plain = load_file(Path(run(_cfg(tmp_path, out="plain"))["artifact"]) / "model.safetensors")
    assert saved.keys() == plain.keys()
    # peft's default for GPT-2 wraps c_attn only: every other weight is the base model's
    from runner.models import load_model

    cfg = _cfg(tmp_path)
    base = load_model(cfg.model, cache_dir=Path(cfg.paths.cache_dir), seed=cfg.seed).model.state_dict()
    changed = {k for k in saved if not torch.equal(saved[k], base[k])}
    assert changed and all(".attn.c_attn.weight" in k for k in changed)


def test_the_command_carries_the_runs_model_and_dataset_overrides(tmp_path):
    from hydra.core.hydra_config import HydraConfig

    from runner.finetune import finetune_command

    cfg = _cfg(tmp_path, "editor=unedited", "unlearn.finetuned=true", task="unlearn")
    hydra_cfg = compose_config(
        "task=unlearn", "editor=ga", "dataset=tofu", "dataset.forget_split=forget10", "model=tiny-gpt2",
        "finetune.lr=2e-5", "unlearn.finetuned=true", "seed=3", return_hydra_config=True,
    )  # fmt: skip
    HydraConfig.instance().set_config(hydra_cfg)
    try:
        command = finetune_command(cfg, "retain")
    finally:
        HydraConfig.instance().cfg = None
    assert command == (
        "python run.py task=finetune dataset=tofu dataset.forget_split=forget10 model=tiny-gpt2 "
        "finetune.lr=2e-5 seed=3 finetune.which=retain"
    )
