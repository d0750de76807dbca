"""The editor contract: what the runner calls, and what an edit gives back.

An editor is built from ``(config, spec)`` and then, once, on the unedited model::

    editor = Cls(config, spec)
    needs = editor.requirements()           # Covariance / Projector / Artifact: made or loaded by the runner
    editor.prepare(model, tokenizer, Resources(stats=..., targets=..., progress=...))
    edit = editor.apply(model, tokenizer, requests)   # leaves ``model`` as it found it
    handle = edit.attach(model)             # the edited model is handle.model
    ...evaluate handle.model...
    handle.restore(); editor.reset()        # batch mode: back to the unedited model
    # sequential mode: kept = kept.merge(handle), the editor keeps its history until reset()

Two kinds of :class:`Edit` exist: :class:`editors.delta.WeightDelta` (additive parameter changes:
ROME, MEMIT, PMET, CoME, AlphaEdit, fine-tuning) and :class:`editors.patch.ModulePatch`
(submodules swapped for adapters: GRACE's codebook, WISE's side memory). A handle whose
``changes_forward`` is true makes the scorer take its plain path (no packed target+foil rows):
an adapter may act per position, which packing would change.

An editor never loads models, evaluates, logs or restores: the runner does. Its sequential state
(AlphaEdit's accumulated keys, GRACE's codebook, the edit history that keys the target cache) lives
in the editor and is cleared by :meth:`Editor.reset`, which the runner calls whenever it has put the
unedited model back.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from transformers import PreTrainedTokenizerBase

from editors.requests import EditRequest

if TYPE_CHECKING:  # pragma: no cover
    from editors.core.covariance import SecondMoments
    from editors.core.targets import TargetCache


@dataclass(frozen=True)
class Covariance:
    """The second moment E[k kᵀ] of ``module``'s input over the stats corpus (``task=stats``)."""

    module: str


@dataclass(frozen=True)
class Projector:
    """The projector onto the null space of ``module``'s input covariance: the span of its
    eigenvectors with eigenvalue below ``threshold`` (AlphaEdit). Derived from, and cached next
    to, the covariance."""

    module: str
    threshold: float


@dataclass(frozen=True)
class Artifact:
    """A component the editor trains before it can edit (MEND's hypernetwork, SERAC's scope
    classifier and counterfactual model), stored content-addressed under
    ``paths.cache_dir/artifacts/``. ``recipe``: canonical JSON (:func:`recipe_json`) of every
    setting its weights depend on besides the model; ``data``: canonical JSON of the dataset config
    of its training cases (``None``: it needs none). The runner keys it by the model id and
    revision, ``name``, ``recipe`` and the training file's sha256; loads it when it exists, else
    (``train_artifacts=true``, or ``task=prepare``) loads the cases and calls
    :meth:`EditorBase.train_artifact`; and hands its folder to ``prepare`` in
    ``Resources.artifacts[name]``."""

    name: str
    recipe: str
    data: str | None = None


def recipe_json(payload: Any) -> str:
    """Canonical JSON of a recipe (dataclasses become dicts, keys sorted) for :class:`Artifact`."""
    if is_dataclass(payload) and not isinstance(payload, type):
        payload = asdict(payload)
    return json.dumps(payload, sort_keys=True, default=str)


Requirement = Covariance | Projector | Artifact


def covariance_modules(requirements: Sequence[Requirement]) -> list[str]:
    """The modules whose covariance the requirements need (a projector needs its covariance; an
    artifact none)."""
    return list(dict.fromkeys(r.module for r in requirements if isinstance(r, (Covariance, Projector))))


@dataclass
class Resources:
    """What the runner hands an editor in :meth:`Editor.prepare`."""

    stats: SecondMoments | None = None  # covariance (and projectors) of the unedited model
    targets: TargetCache | None = None  # on-disk cache of target vectors (None: no caching)
    progress: bool = False  # show progress bars on long steps
    artifacts: dict[str, Path] = field(default_factory=dict)  # Artifact.name -> its folder
    # task=unlearn: (prompt, answer) pairs of the retain split, for baselines that train on it
    # (GradDiff, NPO's retain term); () in task=edit
    retain: tuple[tuple[str, str], ...] = ()
    # task=unlearn: a folder for artifacts trained on the forget set (LoRA adapters), one per model
    # id and revision; the editor keys its files by everything else they depend on. None: no cache
    adapter_cache: Path | None = None


@runtime_checkable
class Handle(Protocol):
    """An edit attached to a model. ``restore`` puts the model back exactly (weights bit-exact,
    module tree and hooks as before) and raises if it cannot."""

    model: torch.nn.Module
    changes_forward: bool

    def merge(self, later: Handle) -> Handle: ...

    def restore(self) -> None: ...


@runtime_checkable
class Edit(Protocol):
    """What :meth:`Editor.apply` returns: a change that attaches to a model, with diagnostics
    (one value per batch, and one value per request in request order)."""

    diagnostics: dict[str, float]
    case_diagnostics: dict[str, list[float]]

    def attach(self, model: torch.nn.Module) -> Handle: ...


@runtime_checkable
class Editor(Protocol):
    """An editing method (see the module docstring for the call order)."""

    config: Any

    def requirements(self) -> Sequence[Requirement]: ...

    def prepare(
        self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, resources: Resources
    ) -> None: ...

    def apply(
        self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, requests: Sequence[EditRequest]
    ) -> Edit: ...

    def reset(self) -> None: ...

    def memory_knobs(self) -> Sequence[tuple[str, str]]: ...


class EditorBase:
    """Defaults every editor shares: no requirements, resources kept, an edit history.

    ``history`` lists the case ids of the requests applied since the last :meth:`reset`, in order:
    in sequential mode the state the next edit starts from. :meth:`history_state` names it (the
    empty string for the unedited model), e.g. for target-cache keys.
    """

    #: (config key, what it controls) of the settings that lower this editor's peak memory
    #: while editing; the runner names them when an edit runs out of memory.
    MEMORY_KNOBS: tuple[tuple[str, str], ...] = ()
    #: True for a method that trains on a whole set and reads its answers, not the requests'
    #: targets (the unlearning baselines): ``task=unlearn`` then hands ``apply`` every forget
    #: request in one call, whatever ``batch_size``, and names its row without a target.
    APPLY_ONCE: bool = False

    def variant(self) -> str | None:
        """What the results table must tell apart among this editor's configurations (a merged
        editor's member or merge: ``over``, ``lora_factors/ties@0.8``), appended to the row name;
        None: the editor's config name is enough."""
        return None

    def __init__(self, config: Any, spec: Any) -> None:
        self.config = config
        self.spec = spec
        self.resources = Resources()
        self.history: list[str] = []

    @property
    def progress(self) -> bool:
        return self.resources.progress

    def requirements(self) -> list[Requirement]:
        return []

    def prepare(
        self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, resources: Resources
    ) -> None:
        self.resources = resources

    #: A cap on the optimiser steps of every artifact this editor trains (``artifact_max_steps``;
    #: +size=tiny sets one so CI trains in seconds); None: the editor's own settings. The runner sets
    #: it before training, and it is part of the artifact's key.
    train_cap: int | None = None

    def train_steps(self, steps: int) -> int:
        """``steps`` within :attr:`train_cap`."""
        return steps if self.train_cap is None else min(steps, self.train_cap)

    def train_artifact(
        self,
        artifact: Artifact,
        model: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        cases: Sequence[Any],
        folder: Path,
        checkpoints: Path,
    ) -> dict[str, Any]:
        """Train ``artifact`` on the unedited ``model`` from ``cases`` (its training split) and
        write it into ``folder``; ``checkpoints`` is a folder kept across interrupted runs (resume
        from it). Returns a JSON-able report (steps, seconds, validation curve), kept beside it."""
        raise NotImplementedError(
            f"{type(self).__name__} names artifact {artifact.name!r} but cannot train it"
        )

    def artifact(self, name: str) -> Path:
        """The folder of a prepared artifact (``prepare`` has run)."""
        try:
            return self.resources.artifacts[name]
        except KeyError:
            raise RuntimeError(f"artifact {name!r} was not prepared (the runner's prepare step)") from None

    def record(self, requests: Sequence[EditRequest]) -> None:
        """Note that ``requests`` were applied (call at the end of ``apply``)."""
        self.history.extend(r.case_id for r in requests)

    def history_state(self) -> str:
        """ "" on the unedited model; else a hash of this editor's class, its whole config and the
        case ids applied, in order: what the edited model depends on (two editors, or one editor
        with another λ, applying the same cases make different models)."""
        if not self.history:
            return ""
        config = asdict(self.config) if is_dataclass(self.config) else repr(self.config)
        blob = json.dumps(
            {
                "editor": f"{type(self).__module__}.{type(self).__qualname__}",
                "config": config,
                "cases": self.history,
            },
            sort_keys=True,
            default=str,
        )
        return hashlib.sha256(blob.encode()).hexdigest()

    def reset(self) -> None:
        self.history.clear()

    def memory_knobs(self) -> Sequence[tuple[str, str]]:
        return self.MEMORY_KNOBS
