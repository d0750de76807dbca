"""Bad input fails in one line naming the problem (run.py: ``error: ...``, exit 2), before the
model loads or trains where it can: prompts longer than the model, bad dataset/editor settings,
``+key`` typos, internal schema names, an unreachable hub model, an unknown optimized_metric."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from evaluation.cases import EditCase, Probe
from runner import USER_ERRORS, ConfigError, run
from runner.hub import ModelUnavailableError
from runner.validate import (
    PromptTooLongError,
    check_optimized_metric,
    check_prompt_lengths,
    optimized_value,
)
from tests.conftest import compose_config, project_config

ROOT = Path(__file__).resolve().parents[1]
LONG = " ".join(["word"] * 600)


def _cfg(tmp_path: Path, *overrides: str):
    return compose_config(
        "model=tiny-gpt2",
        "logger=none",
        "progress=false",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"paths.output_dir={tmp_path / 'out'}",
        *overrides,
    )


def _cli(tmp_path: Path, *overrides: str, env: dict[str, str] | None = None) -> str:
    """run.py's stderr for ``overrides``, asserting the one-line contract: exit 2, the last line
    ``error: ...``, no traceback."""
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "run.py"),
            "model=tiny-gpt2",
            "logger=none",
            "progress=false",
            f"hydra.run.dir={tmp_path / 'run'}",
            f"paths.cache_dir={tmp_path / 'cache'}",
            *overrides,
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
        timeout=300,
    )
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines and lines[-1].startswith("error: "), proc.stderr[-3000:]
    return lines[-1]


def _case(case_id: str, neighborhood: str = "The mother tongue of Paris is") -> EditCase:
    from editors.requests import EditRequest

    request = EditRequest(case_id, "The mother tongue of {} is", "Danielle Darrieux", "English", "French")
    return EditCase(
        request=request,
        probes={
            "rewrite": (Probe(request.text, "English", "French"),),
            "neighborhood": (Probe(neighborhood, "French", "English"),),
        },
        generation_prompts=("Danielle Darrieux's mother tongue is",),
    )


# ------------------------------------------------------------------------------ too-long prompts


def test_prompt_length_check_names_case_probe_length_and_limit(tiny_tokenizer):
    cases = [_case("1"), _case("42", neighborhood=LONG), _case("43", neighborhood=LONG)]
    check_prompt_lengths(cases[:1], tiny_tokenizer, 128)  # short cases pass
    check_prompt_lengths(cases, tiny_tokenizer, None)  # unknown limit: nothing checked
    with pytest.raises(PromptTooLongError) as info:
        check_prompt_lengths(cases, tiny_tokenizer, 128, limit_name="model.sizes.max_positions")
    message = str(info.value)
    n = len(tiny_tokenizer(f"{LONG} French")["input_ids"])
    assert message.startswith(
        f"case 42: neighborhood probe 0 is {n} tokens, more than model.sizes.max_positions (128)"
    )
    assert "1 more case(s)" in message and "\n" not in message
    assert isinstance(info.value, USER_ERRORS)


def test_prompt_length_check_keeps_room_for_context_prefixes_and_generation(tiny_tokenizer):
    case = _case("7")
    n = len(tiny_tokenizer(f"{case.request.text} English")["input_ids"])
    check_prompt_lengths([case], tiny_tokenizer, n)
    with pytest.raises(
        PromptTooLongError, match=rf"case 7: request is {n} tokens \+ 12 for context prefixes"
    ):
        check_prompt_lengths([case], tiny_tokenizer, n, reserve=12)
    with pytest.raises(
        PromptTooLongError, match=r"generation prompt 0 .* eval.generation.max_length - 1 \(2\)"
    ):
        check_prompt_lengths([case], tiny_tokenizer, 128, generation_max_length=3)


def test_cli_prompt_longer_than_the_model_is_one_line_before_statistics(tmp_path):
    record = {
        "case_id": 7,
        "prompt": "The mother tongue of Toko Yasuda is",
        "subject": "Toko Yasuda",
        "target_new": "English",
        "ground_truth": "Japanese",
        "rephrase_prompt": "Toko Yasuda speaks",
        "locality_prompt": LONG + " The mother tongue of Thomas is",
        "locality_ground_truth": "French",
    }
    path = tmp_path / "long.json"
    path.write_text(json.dumps([record]))
    line = _cli(tmp_path, f"dataset.path={path}", "model.tokenizer.max_corpus_chars=20000")
    assert line.startswith("error: case 7: neighborhood probe 0 is ")
    assert "more than model.sizes.max_positions (128)" in line
    assert not (tmp_path / "cache" / "stats").exists()  # failed before the covariance statistics


# ------------------------------------------------------------------------------ dataset settings


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("dataset.size=-3", "dataset.size must be a positive integer or null (all cases), got -3"),
        ("dataset.on_invalid=ignore", "dataset.on_invalid must be one of error, skip, got 'ignore'"),
        ("dataset.schema=json", "dataset.schema must be auto or one of rome, easyedit, mend, got 'json'"),
        ("dataset.target_field=best", "dataset.target_field must be one of answers, alt, got 'best'"),
    ],
)
def test_bad_dataset_setting_is_one_line_at_the_start(tmp_path, override, message):
    with pytest.raises(ConfigError) as info:
        run(_cfg(tmp_path, override))
    assert str(info.value) == message
    assert not (tmp_path / "cache").exists()  # nothing loaded


def test_cli_negative_dataset_size(tmp_path):
    assert _cli(tmp_path, "dataset.size=-3") == (
        "error: dataset.size must be a positive integer or null (all cases), got -3"
    )


# ------------------------------------------------------------------------------- editor settings


@pytest.mark.parametrize(
    ("editor", "override", "message"),
    [
        ("come_memit", "editor.top_p_fraction=2", "editor.top_p_fraction must be in (0, 1], got 2.0"),
        ("come_pmet", "editor.top_p_fraction=0", "editor.top_p_fraction must be in (0, 1], got 0.0"),
        ("come_memit", "editor.unlearn_weight=-0.1", "editor.unlearn_weight must be ≥ 0, got -0.1"),
        ("come_memit", "editor.restriction=top", "editor.restriction must be one of"),
        ("come_pmet", "editor.unlearn_norm=both", "editor.unlearn_norm must be 'new' or 'old'"),
        ("memit", "editor.layers=[]", "editor.layers must be a non-empty list of layer indices, got []"),
        ("memit", "editor.update_weight=-1", "editor.update_weight must be > 0, got -1.0"),
        ("memit", "editor.target.steps=0", "editor.target.steps must be an integer ≥ 1, got 0"),
        ("pmet", "editor.target.lr=0", "editor.target.lr must be > 0, got 0.0"),
        ("memit", "editor.target_site=mlp", "editor.target_site must be one of layer, mlp_out, got 'mlp'"),
        ("pmet", "editor.residual_spread=cube", "editor.residual_spread must be one of linear, sqrt"),
        ("memit", "editor.key_averaging=median", "editor.key_averaging must be one of grouped, uniform"),
        ("memit", "editor.context_templates=[[0,5]]", "editor.context_templates must be a list of [max_len"),
        ("rome", "editor.layer=-1", "editor.layer must be a layer index ≥ 0, got -1"),
        ("rome", "editor.target.clamp_norm_factor=0", "editor.target.clamp_norm_factor must be > 0"),
        ("ft", "editor.lr=-1e-4", "editor.lr must be > 0, got -0.0001"),
        ("ft", "editor.module=attn", "editor.module must be one of mlp_out, layer, got 'attn'"),
        ("ft_l", "editor.norm_constraint=0", "editor.norm_constraint must be > 0 or null, got 0.0"),
        ("ft_w", "editor.wd_power_law=[1.0]", "editor.wd_power_law must be [a, b] or null, got [1.0]"),
        ("f_learning", "editor.forget_lr=0", "editor.forget_lr must be > 0 or null, got 0.0"),
    ],
)
def test_bad_editor_setting_fails_before_the_model_loads(tmp_path, editor, override, message):
    with pytest.raises(ConfigError) as info:
        run(_cfg(tmp_path, f"editor={editor}", override))
    assert str(info.value).startswith(message) and "\n" not in str(info.value)
    assert not (tmp_path / "cache").exists()


def test_editor_config_dataclasses_check_their_ranges():
    from editors.come import ComeMemitConfig
    from editors.finetune import FLearningConfig

    with pytest.raises(ValueError, match=r"editor.top_p_fraction must be in \(0, 1\]"):
        ComeMemitConfig(top_p_fraction=2.0)
    FLearningConfig(layers=[1], num_steps=0)  # forgetting only: no learning steps is allowed


def test_cli_top_p_fraction_out_of_range(tmp_path):
    line = _cli(tmp_path, "editor=come_memit", "editor.top_p_fraction=2")
    assert line == "error: editor.top_p_fraction must be in (0, 1], got 2.0"


# ----------------------------------------------------------------------------- `+key` typos


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "+editor.unlearn_weigth=0.1",
            "unknown config key editor.unlearn_weigth; did you mean editor.unlearn_weight?",
        ),
        ("+editor.target.lrr=0.1", "unknown config key editor.target.lrr; did you mean editor.target.lr?"),
        ("+model.sizes.hiden=3", "unknown config key model.sizes.hiden; did you mean model.sizes.hidden?"),
        ("+batch_sise=3", "unknown config key batch_sise; did you mean batch_size?"),
        ("+dataset.zzz=1", "unknown config key dataset.zzz"),
    ],
)
def test_plus_key_typo_is_refused_with_the_close_match(tmp_path, override, message):
    with pytest.raises(ConfigError) as info:
        run(_cfg(tmp_path, "editor=come_memit", override))
    assert str(info.value) == message


def test_cli_plus_key_typo(tmp_path):
    line = _cli(tmp_path, "editor=come_memit", "+editor.unlearn_weigth=0.1")
    assert line == "error: unknown config key editor.unlearn_weigth; did you mean editor.unlearn_weight?"


# ------------------------------------------------------------------------------ schema names


def test_schemas_are_not_editor_options():
    from hydra import compose
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import MissingConfigException

    from editors.registry import CONFIG_SCHEMAS

    yaml_names = {p.stem for p in (ROOT / "conf" / "editor").glob("*.yaml")}
    with project_config():
        loader = GlobalHydra.instance().config_loader()
        for group in ("editor", "model", "dataset", "eval", "stats", "logger"):
            assert not [o for o in loader.get_group_options(group) if "schema" in o], group
        assert set(loader.get_group_options("editor")) == yaml_names
        with pytest.raises(MissingConfigException) as info:
            compose("config", overrides=["editor=memitt"])
        assert "memit" in str(info.value) and "_schema" not in str(info.value)
        for name in ("memit_schema", *(f"{n}_schema" for n in CONFIG_SCHEMAS)):
            with pytest.raises(MissingConfigException):
                compose("config", overrides=[f"editor={name}"])
    # ...and every editor still composes onto its typed schema.
    for name in CONFIG_SCHEMAS:
        assert OmegaConf.get_type(compose_config(f"editor={name}").editor) is CONFIG_SCHEMAS[name]


# ------------------------------------------------------------------------------ hub models


def test_offline_hub_model_is_one_line_and_fast(tmp_path, monkeypatch):
    from runner.models import ModelConfig, load_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(ModelUnavailableError) as info:
        load_model(
            ModelConfig(name="llama3", source="hub", hub_id="nobody/no-such-model-4f2a"), cache_dir=tmp_path
        )
    assert time.perf_counter() - t0 < 5
    message = str(info.value)
    assert message.startswith("model 'llama3': could not fetch nobody/no-such-model-4f2a")
    assert (
        "HF_HUB_OFFLINE" in message
        and "hf auth login" in message
        and "model.hub_id=/path/to/folder" in message
    )
    assert "\n" not in message and isinstance(info.value, USER_ERRORS)


def test_unreachable_or_unknown_hub_repository_is_one_line(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    from runner import hub

    monkeypatch.setattr(hub, "_offline", lambda: False)

    def no_network(*args, **kwargs):
        raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub, "model_info", no_network)
    with pytest.raises(ModelUnavailableError, match="hub cannot be reached .*hf auth login"):
        hub.check_hub_access("llama3", "meta-llama/Meta-Llama-3-8B")

    def not_found(*args, **kwargs):
        response = SimpleNamespace(headers={}, request=None, status_code=404)
        raise RepositoryNotFoundError("404 Repository Not Found", response=response)

    monkeypatch.setattr(huggingface_hub, "model_info", not_found)
    with pytest.raises(ModelUnavailableError, match="no such repository, or it is private or gated"):
        hub.check_hub_access("x", "nobody/no-such-model-4f2a")


def test_local_folder_without_a_checkpoint_is_one_line(tmp_path):
    from runner.models import ModelConfig, load_model

    with pytest.raises(ModelUnavailableError, match=r"cannot load the folder model.hub_id=.*save_pretrained"):
        load_model(ModelConfig(name="mine", source="hub", hub_id=str(tmp_path)), cache_dir=tmp_path)


def test_cli_llama3_offline(tmp_path):
    line = _cli(tmp_path, "model=llama3")
    assert line.startswith("error: model 'llama3': could not fetch meta-llama/Meta-Llama-3-8B")
    assert "hf auth login" in line and "model.hub_id=/path/to/folder" in line


# ----------------------------------------------------------------------------- optimized_metric


def test_optimized_value_reads_the_top_level_then_the_metric_means():
    summary = {
        "score": 80.0,
        "n_cases": 4,
        "metrics": {
            "post": {"locality_magnitude": {"mean": 12.5}, "efficacy": {"mean": 90.0}},
            "pre": {"efficacy": {"mean": 10.0}},
        },
    }
    assert optimized_value(summary, "score") == 80.0
    assert optimized_value(summary, "n_cases") == 4.0
    assert optimized_value(summary, "locality_magnitude") == 12.5
    assert optimized_value(summary, "post_efficacy") == 90.0
    assert optimized_value(summary, "pre_efficacy") == 10.0
    assert optimized_value(summary, "fluency") is None  # not computed by this run


def test_unknown_optimized_metric_lists_the_valid_names():
    for name in ("score", "locality_magnitude", "pre_efficacy", "post_generality_acc", "n_cases"):
        check_optimized_metric(name)
    check_optimized_metric("portability", [EditCase(_case("1").request, {"portability": ()})])
    with pytest.raises(ValueError) as info:
        check_optimized_metric("locality_magnitud")
    message = str(info.value)
    assert message.startswith("optimized_metric='locality_magnitud' is not a summary metric; did you mean")
    assert "locality_magnitude" in message and "efficacy" in message and "n_cases" in message


def test_cli_unknown_optimized_metric_fails_before_the_model_loads(tmp_path):
    line = _cli(tmp_path, "optimized_metric=locality_magnitud")
    assert line.startswith("error: optimized_metric='locality_magnitud' is not a summary metric")
    assert not (tmp_path / "cache").exists()
