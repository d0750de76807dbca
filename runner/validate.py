"""Checks of the run's input that fail in one line before the expensive work, and the lookup of
the value ``optimized_metric`` names in a summary.

- :func:`check_prompt_lengths`: every text the run will feed the model fits in its positions
  (else the embedding lookup fails deep in a forward pass with ``index out of range in self``).
- :func:`check_optimized_metric` / :func:`optimized_value`: the metric a sweeper optimises.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from evaluation.cases import EditCase
from evaluation.metrics import METRICS, metric_name_for
from runner.datasets import DatasetError

__all__ = [
    "PromptTooLongError",
    "UnknownOptimizedMetricError",
    "check_optimized_metric",
    "check_prompt_lengths",
    "context_length",
    "optimized_metric_names",
    "optimized_value",
]

#: Summary values that are not per-metric means (run.py can hand them to a sweeper too).
TOP_LEVEL = ("n_cases",)


class PromptTooLongError(DatasetError):
    """A probe of a case is longer (in tokens) than the model's positions."""


class UnknownOptimizedMetricError(ValueError):
    """``optimized_metric`` names no value of the summary."""


# ------------------------------------------------------------------------------------ prompt lengths


def context_length(model: Any) -> int | None:
    """The model's positions (``n_positions`` / ``max_position_embeddings``), or None if unknown."""
    config = getattr(model, "config", None)
    for key in ("n_positions", "max_position_embeddings"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _texts(case: EditCase, reserve: int, generation: bool) -> Iterator[tuple[str, str, int]]:
    """(what, text, extra positions) for everything the run feeds the model for ``case``.

    Probes are scored as ``prompt + " " + answer`` (``evaluation.scoring``), for the target and the
    foil; the edit request is optimised as ``prefix + prompt + " " + answer`` with context prefixes
    of up to ``reserve`` tokens; generation prompts (``generation``) are continued."""
    request = case.request
    text = request.text
    for answer in (request.target_new, request.target_true):
        if answer:
            yield "request", f"{text} {answer}", reserve
    for set_name, probes in case.probes.items():
        for i, probe in enumerate(probes):
            for answer in (probe.target, probe.foil):
                if answer:
                    yield f"{set_name} probe {i}", f"{probe.prompt} {answer}", 0
    if generation:
        for i, prompt in enumerate(case.generation_prompts):
            yield f"generation prompt {i}", prompt, 0


def check_prompt_lengths(
    cases: Sequence[EditCase],
    tokenizer: Any,
    max_positions: int | None,
    *,
    reserve: int = 0,
    generation_max_length: int | None = None,
    limit_name: str = "the model's positions",
) -> None:
    """Raise :class:`PromptTooLongError` naming the first case whose probe (or edit request, or
    generation prompt) tokenises to more than ``max_positions`` tokens, with its length and the
    limit. ``reserve`` positions are kept free before the edit request for the editor's context
    prefixes; with ``generation_max_length`` (the run generates texts of that many tokens, prompt
    included) each generation prompt must also leave room for one new token. Nothing is checked
    when ``max_positions`` is None.

    Tokenises every text once (batched), as the scorer does (``add_special_tokens=True``): call it
    once the tokenizer is known and before the model trains or statistics are computed."""
    if not max_positions:
        return
    generation = generation_max_length is not None
    items = [
        (case, what, text, extra) for case in cases for what, text, extra in _texts(case, reserve, generation)
    ]
    if not items:
        return
    lengths = _token_lengths(tokenizer, [text for _, _, text, _ in items])

    def limit(what: str) -> tuple[int, str]:
        if generation and what.startswith("generation") and generation_max_length <= max_positions:
            return generation_max_length - 1, "eval.generation.max_length - 1"
        return max_positions, limit_name

    too_long = [(item, n) for item, n in zip(items, lengths) if n + item[3] > limit(item[1])[0]]
    if not too_long:
        return
    (case, what, text, extra), n = too_long[0]
    cases_over = len({item[0].case_id for item, _ in too_long})
    more = f"; {cases_over - 1} more case(s) are too long" if cases_over > 1 else ""
    room = f" + {extra} for context prefixes" if extra else ""
    shown = text if len(text) <= 60 else text[:57] + "..."
    bound, name = limit(what)
    raise PromptTooLongError(
        f"case {case.case_id}: {what} is {n} tokens{room}, more than {name} ({bound}): "
        f"{shown!r}{more}; shorten it or drop the case from the dataset file"
    )


def _token_lengths(tokenizer: Any, texts: list[str]) -> list[int]:
    lengths: list[int] = []
    for start in range(0, len(texts), 4096):
        enc = tokenizer(texts[start : start + 4096], add_special_tokens=True, truncation=False)
        lengths.extend(len(ids) for ids in enc["input_ids"])
    return lengths


# ---------------------------------------------------------------------------------- optimized metric


def optimized_metric_names(cases: Iterable[EditCase] = ()) -> list[str]:
    """What ``optimized_metric`` may name: every registered metric (the extra probe sets of
    ``cases`` included), ``pre_<metric>`` for its value on the unedited model, and ``n_cases``."""
    for case in cases:
        for set_name in case.probes:
            metric_name_for(set_name)  # registers an extra probe set's metrics, as scoring does
    return [*sorted(METRICS), *TOP_LEVEL]


def check_optimized_metric(name: str, cases: Iterable[EditCase] = ()) -> None:
    """Raise :class:`UnknownOptimizedMetricError` (one line, listing the valid names) unless
    :func:`optimized_value` can find ``name`` in a run's summary."""
    valid = optimized_metric_names(cases)
    if name in valid or name in METRICS:  # METRICS also resolves pre_/post_ prefixes
        return
    close = difflib.get_close_matches(name, valid + [f"pre_{n}" for n in valid], n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]}?" if close else ""
    raise UnknownOptimizedMetricError(
        f"optimized_metric={name!r} is not a summary metric{hint} "
        f"(valid: {', '.join(valid)}; pre_<name> for the unedited model)"
    )


def optimized_value(summary: Mapping[str, Any], name: str) -> float | None:
    """The value of ``name`` in a summary: a top-level number (``score``, ``efficacy``...,
    ``n_cases``), else ``metrics.post.<name>.mean`` (``metrics.pre`` for ``pre_<name>``;
    ``post_<name>`` is the same as ``<name>``). None when the run did not compute it."""
    value = summary.get(name)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    stage, base = "post", name
    for prefix in ("pre_", "post_"):
        if name.startswith(prefix):
            stage, base = prefix[:-1], name[len(prefix) :]
    entry = (summary.get("metrics") or {}).get(stage, {}).get(base)
    if isinstance(entry, Mapping) and isinstance(entry.get("mean"), (int, float)):
        return float(entry["mean"])
    return None
