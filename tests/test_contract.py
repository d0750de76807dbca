"""The editor contract (editors/base.py): every registered editor satisfies it as the runner uses
it, and both kinds of edit (weight delta, module patch) restore the model exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from editors.base import Artifact, Covariance, Edit, Editor, Handle, Projector, Resources
from editors.delta import WeightDelta
from editors.patch import HandleStack, ModulePatch
from editors.registry import CONFIG_SCHEMAS
from evaluation.metrics import score_cases
from runner.datasets import load_cases
from runner.models import load_model
from runner.pipeline import build_editor, build_stats, prepare_requirements
from tests.conftest import compose_config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cache = tmp_path_factory.mktemp("contract")
    cases = load_cases("counterfact", size=4).cases
    cfg = compose_config(
        "model=tiny-gpt2",
        "logger=none",
        "stats.n_samples=40",
        f"paths.cache_dir={cache}",
        f"paths.output_dir={cache / 'out'}",
    )
    loaded = load_model(cfg.model, cases=cases, cache_dir=cache, seed=0)
    return cfg, loaded, build_stats(cfg, loaded), cases, cache


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}, [id(m) for m in model.modules()]


@pytest.mark.parametrize("name", sorted(CONFIG_SCHEMAS))
def test_every_registered_editor_satisfies_the_contract(tiny, name):
    base_cfg, loaded, stats, cases, cache = tiny
    cfg = compose_config(
        "model=tiny-gpt2",
        f"editor={name}",
        "logger=none",
        "stats.n_samples=40",
        f"paths.cache_dir={cache}",
        f"paths.output_dir={cache / 'out'}",
    )
    model, tok = loaded.model, loaded.tokenizer
    editor = build_editor(cfg.editor, loaded)
    assert isinstance(editor, Editor)
    needs = editor.requirements()
    if any(isinstance(n, Artifact) for n in needs):  # trained first (MEND, SERAC): their own test files
        pytest.skip(f"{name} needs a trained artifact; its contract is checked in tests/test_{name}.py")
    assert all(isinstance(n, (Covariance, Projector)) for n in needs)
    prepare_requirements(editor, stats)
    # retain pairs for the unlearning editors that train on them (ties_npo); the others ignore them
    retain = tuple((c.request.text, c.request.target_true) for c in cases[2:])
    editor.prepare(model, tok, Resources(stats=stats, retain=retain))
    before, modules = _snapshot(model)
    requests = [c.request for c in cases[:2]]
    edit = editor.apply(model, tok, requests)
    assert isinstance(edit, Edit)
    after, same_modules = _snapshot(model)
    assert same_modules == modules and all(torch.equal(before[n], after[n]) for n in before), (
        "apply must leave the model as it found it"
    )
    for key, values in edit.case_diagnostics.items():
        assert len(values) == len(requests), key
    handle = edit.attach(model)
    assert isinstance(handle, Handle) and handle.model is model
    handle.restore()
    restored, restored_modules = _snapshot(model)
    assert restored_modules == modules and all(torch.equal(before[n], restored[n]) for n in before)
    assert editor.history == [r.case_id for r in requests]
    editor.reset()
    assert editor.history == []
    for key, _what in editor.memory_knobs():
        assert key.startswith("editor.") or key == "batch_size"


class _Shift(nn.Module):
    """An adapter: the wrapped module's output plus a learnt offset."""

    def __init__(self, inner: nn.Module, width: int) -> None:
        super().__init__()
        self.inner = inner
        self.offset = nn.Parameter(torch.full((width,), 0.5))

    def forward(self, x):
        return self.inner(x) + self.offset


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))


def test_module_patch_swaps_and_restores_the_same_objects():
    net = _net()
    x = torch.randn(3, 4)
    y0 = net(x)
    original = net[2]
    net[0].register_forward_hook(lambda *a: None)
    handle = ModulePatch({"2": _Shift(original, 2)}).attach(net)
    assert handle.changes_forward and net[2] is not original
    torch.testing.assert_close(net(x), y0 + 0.5)
    handle.restore()
    assert net[2] is original and torch.equal(net(x), y0)


def test_module_patch_restore_refuses_a_changed_original():
    net = _net()
    adapter = _Shift(net[2], 2)
    handle = ModulePatch({"2": adapter}).attach(net)
    with torch.no_grad():
        adapter.inner.weight.add_(1.0)  # an adapter that trained the module it wraps: a bug
    with pytest.raises(RuntimeError, match="not bit-exact"):
        handle.restore()


def test_module_patch_restore_refuses_a_left_over_hook():
    net = _net()
    handle = ModulePatch({"2": _Shift(net[2], 2)}).attach(net)
    net[0].register_forward_hook(lambda *a: None)
    with pytest.raises(RuntimeError, match="module tree and hooks"):
        handle.restore()


def test_sequential_handles_of_both_kinds_restore_last_first():
    net = _net()
    x = torch.randn(3, 4)
    y0 = net(x).detach()
    weights = WeightDelta({"0.weight": torch.ones(4, 4)}).attach(net)
    kept = weights.merge(ModulePatch({"2": _Shift(net[2], 2)}).attach(net))
    kept = kept.merge(WeightDelta({"0.bias": torch.ones(4)}).attach(net))
    assert isinstance(kept, HandleStack) and kept.changes_forward
    assert not torch.allclose(net(x), y0)
    kept.restore()
    assert torch.equal(net(x), y0) and isinstance(net[2], nn.Linear)
    # two weight handles fold into one that keeps the earliest originals
    first = WeightDelta({"0.weight": torch.ones(4, 4)}).attach(net)
    both = first.merge(WeightDelta({"0.weight": torch.ones(4, 4)}).attach(net))
    assert both is first
    both.restore()
    assert torch.equal(net(x), y0)


def test_unpacked_scoring_equals_packed_scoring(tiny):
    """The plain path (for edits that change the forward pass) gives the packed path's numbers."""
    _cfg, loaded, _stats, cases, _cache = tiny
    packed = score_cases(loaded.model, loaded.tokenizer, cases, batch_size=16, pack=True)
    plain = score_cases(loaded.model, loaded.tokenizer, cases, batch_size=16, pack=False)
    for a, b in zip(packed, plain):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], abs=1e-4), key


def test_history_state_names_the_editor_its_config_and_the_cases():
    """Sequential target-cache keys: the same cases applied by another editor, or by the same one
    with another setting, are another model."""
    from editors.alphaedit import AlphaEdit, AlphaEditConfig
    from editors.memit import Memit, MemitConfig

    editors = [
        Memit(MemitConfig(update_weight=1.0), spec=None),
        Memit(MemitConfig(update_weight=2.0), spec=None),
        AlphaEdit(AlphaEditConfig(update_weight=1.0), spec=None),
    ]
    assert {e.history_state() for e in editors} == {""}  # the unedited model
    for editor in editors:
        editor.history = ["0", "1"]
    states = [e.history_state() for e in editors]
    assert len(set(states)) == 3 and "" not in states
    editors[0].history = ["1", "0"]
    assert editors[0].history_state() != states[0]
