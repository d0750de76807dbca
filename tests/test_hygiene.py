"""Rules of the code base that a grep can check."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHOD_MODULES = ("rome", "memit", "pmet", "come", "finetune", "unedited")


def _code(folder: str):
    for path in sorted((ROOT / folder).rglob("*.py")):
        yield path, path.read_text(encoding="utf-8")


def test_runner_and_evaluation_never_name_an_editing_method():
    pattern = re.compile(
        rf"editors\.({'|'.join(METHOD_MODULES)})\b|\b(Rome|Memit|Pmet|ComeMemit|ComePmet|FineTune|FLearning|Unedited)\w*\("
    )
    for folder in ("runner", "evaluation"):
        for path, text in _code(folder):
            assert not pattern.search(text), f"{path.relative_to(ROOT)} names an editing method"


def test_editors_and_evaluation_do_not_import_the_runner():
    for folder in ("editors", "evaluation"):
        for path, text in _code(folder):
            assert not re.search(r"^\s*(from|import) runner\b", text, re.M), (
                f"{path.relative_to(ROOT)} imports runner"
            )


def test_hooks_module_is_a_leaf_and_no_device_is_hard_coded():
    hooks = (ROOT / "editors" / "hooks.py").read_text(encoding="utf-8")
    assert not re.search(r"^\s*(from|import) (editors|runner|evaluation)\b", hooks, re.M)
    for folder in ("editors", "runner", "evaluation"):
        for path, text in _code(folder):
            assert not re.search(r"""["']cuda:\d|\.cuda\(\)""", text), (
                f"{path.relative_to(ROOT)} hard-codes a device"
            )
            assert not re.search(r"^\s*global\s", text, re.M), f"{path.relative_to(ROOT)} uses a global"


def test_ci_runs_every_experiment_preset_and_checks_its_table():
    """A preset added to conf/experiment/ is run at tiny size by `make presets-tiny` and its table
    is checked by .ci/run (else CI would never notice it broke)."""
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    checked = re.search(r"for preset in ([^;]+);", ci).group(1).split()
    for path in sorted((ROOT / "conf" / "experiment").glob("*.yaml")):
        assert f"+experiment={path.stem} $(TINY)" in makefile, f"make presets-tiny does not run {path.stem}"
        assert path.stem in checked, f".ci/run does not check the table of {path.stem}"
    assert "sweep=sss_c $(TINY)" in makefile and "curve_editor.sss_coefficient.png" in ci
    assert "sweep=forget_items" in makefile and "curve_unlearn.forget_items.png" in ci
