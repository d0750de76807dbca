"""Every config group combination composes; typos and wrong types fail naming the key."""

from __future__ import annotations

import itertools
import subprocess
import sys

import pytest
from hydra import compose
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from tests.conftest import CONF, ROOT


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


MODELS, EDITORS, DATASETS, LOGGERS = (_options(g) for g in ("model", "editor", "dataset", "logger"))


pytestmark = pytest.mark.usefixtures("hydra_conf")  # every test composes on the project's conf/


def _compose(*overrides: str):
    return compose("config", overrides=[*overrides, "paths.cache_dir=/tmp/c", "paths.output_dir=/tmp/o"])


def test_the_names_users_type_exist():
    assert {"gpt2-xl", "gpt-j", "llama3", "toy", "tiny-gpt2", "tiny-gptj", "tiny-llama"} <= set(MODELS)
    assert {"rome", "memit"} <= set(EDITORS)
    assert {"counterfact", "zsre"} <= set(DATASETS)
    assert {"wandb", "none"} <= set(LOGGERS)


def _pair_datasets(model: str, editor: str) -> list[str]:
    """The datasets a pair is composed with: every one that has a per-(editor, model, dataset) file,
    and the two base ones (every other dataset is checked once, on the default pair)."""
    prefix = f"{editor}_{model}_"
    special = {p.stem[len(prefix) :] for p in (CONF / "editor_model_dataset").glob(f"{prefix}*.yaml")}
    return sorted({"counterfact", "zsre"} | (special & set(DATASETS)))


@pytest.mark.parametrize("model,editor", list(itertools.product(MODELS, EDITORS)))
def test_every_model_editor_pair_composes_and_resolves(model, editor):
    for dataset, logger in itertools.product(_pair_datasets(model, editor), LOGGERS):
        cfg = _compose(f"model={model}", f"editor={editor}", f"dataset={dataset}", f"logger={logger}")
        container = OmegaConf.to_container(cfg, resolve=True)
        node = container["editor"]
        layers = node.get("layers") or ([node["layer"]] if "layer" in node else [])
        assert all(0 <= layer < container["model"]["n_layers"] for layer in layers)
        OmegaConf.to_object(cfg.editor)  # the typed editor config builds


@pytest.mark.parametrize("dataset", DATASETS)
def test_every_dataset_composes_and_resolves(dataset):
    container = OmegaConf.to_container(_compose(f"dataset={dataset}"), resolve=True)
    assert container["dataset"]["name"] == dataset


def test_ablations_are_a_group_of_the_come_editors_only():
    for editor in ("come_memit", "come_pmet", "come_alphaedit"):
        cfg = compose(
            "config",
            overrides=[f"editor={editor}", "editor/ablation=no_common", "paths.output_dir=/tmp/o"],
            return_hydra_config=True,
        )
        assert cfg.editor.add_common is False and cfg.editor.subtract_unlearning is True
        assert cfg.hydra.runtime.choices["editor/ablation"] == "no_common"  # the results' method label
    with pytest.raises(ConfigCompositionException, match="editor/ablation"):
        _compose("editor=memit", "editor/ablation=no_common")


def test_per_pair_settings_override_method_defaults():
    assert list(_compose("model=gpt2-xl", "editor=memit").editor.layers) == [13, 14, 15, 16, 17]
    assert _compose("model=gpt2-xl", "editor=memit").editor.update_weight == 20000
    assert list(_compose("model=llama3", "editor=memit").editor.layers) == [4, 5, 6, 7, 8]
    assert _compose("model=gpt-j", "editor=rome").editor.layer == 5


def test_default_statistics_are_the_models_own_corpus():
    assert _compose("model=toy").stats.corpus == "training"  # the sentences the toy was trained on
    for model in ("gpt2-xl", "gpt-j", "llama3", "tiny-gpt2"):
        assert _compose(f"model={model}").stats.corpus == "wikitext2"
    assert _compose("model=toy", "stats=wikitext2").stats.corpus == "wikitext2"


def test_unknown_key_fails_naming_it():
    with pytest.raises(ConfigCompositionException) as info:
        _compose("editor.update_wieght=3")
    assert "update_wieght" in str(info.value.__cause__ or info.value)


def test_wrong_type_fails_naming_it():
    with pytest.raises((ConfigCompositionException, ValidationError)) as info:
        _compose("editor.target.steps=many")
    assert "steps" in str(info.value.__cause__ or info.value) or "many" in str(
        info.value.__cause__ or info.value
    )


def test_cli_prints_composed_llama3_config_and_one_line_errors():
    ok = subprocess.run(
        [sys.executable, "run.py", "editor=memit", "model=llama3", "--cfg", "job"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    assert "meta-llama/Meta-Llama-3-8B" in ok.stdout and "model.layers.{}.mlp.down_proj" in ok.stdout
    bad = subprocess.run(
        [sys.executable, "run.py", "editor.lyers=[1]", "--cfg", "job"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0
    assert "lyers" in bad.stderr
