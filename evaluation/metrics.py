"""Metric registry and per-case metrics computed from the batched scorer's outputs.

Every metric is registered with its name, direction and aggregation. Per-case metrics
(``aggregation="mean"``) are averaged over cases by ``evaluation.aggregate``; dataset-level
metrics (``score``: the harmonic mean of efficacy, generality and locality) name another
aggregation and the metrics they are computed from.

Per probe set (``rewrite`` -> ``efficacy``, ``paraphrase`` -> ``generality``,
``neighborhood`` -> ``locality``, any other set under its own name):

- probes with foils (CounterFact): ``<name>`` = mean of 1[target_logprob > foil_logprob],
  ``<name>_magnitude`` = mean of exp(target_logprob) - exp(foil_logprob);
- probes without foils (zsRE): ``<name>`` = mean teacher-forced token accuracy of the target;
- always: ``<name>_acc`` = fraction of probes whose target tokens are all the argmax.

For locality the probe's target is the OLD object, so "success" already means that the old
object still wins; nothing is special-cased by name.

The locality and portability probe sets of Yao et al. (2023), as the SSS paper (seed 002, section
7) names them, are probe sets like any other (``runner.datasets`` builds them from the record
fields); :data:`SSS_PROBE_METRICS` maps each paper name to its metric. Pre-Neighbor is the
ordinary neighbourhood set (``locality``) and Post-Neighbor CounterFact's attribute prompts
(``attribute``): neither is scored twice under a second name.

``fluency`` and ``consistency`` are per-case metrics of sampled generations
(``evaluation.generation.GenerationMetrics``).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from evaluation.cases import EditCase, Probe
from evaluation.scoring import ProbeScore, score_probes

__all__ = [
    "METRICS",
    "PREFIXES",
    "PROBE_SET_METRIC",
    "SSS_PROBE_METRICS",
    "SUFFIXES",
    "MetricInfo",
    "MetricRegistry",
    "UnknownMetricError",
    "case_metrics",
    "metric_name_for",
    "probe_set_metrics",
    "register_metric",
    "score_case_probes",
    "score_cases",
]

#: probe set name -> base metric name; other probe sets keep their own name.
PROBE_SET_METRIC: dict[str, str] = {
    "rewrite": "efficacy",
    "paraphrase": "generality",
    "neighborhood": "locality",
}
#: per-set derived metric suffixes, and the prefixes the runner uses for pre-/post-edit values.
SUFFIXES = ("_magnitude", "_acc")
PREFIXES = ("pre_", "post_")


class UnknownMetricError(KeyError):
    """An unknown metric name (the message suggests close registered names)."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class MetricInfo:
    """What the aggregation and the tables need to know about a metric.

    ``aggregation`` is ``"mean"`` for per-case metrics, or the name of a dataset-level
    aggregation (see ``evaluation.aggregate.DATASET_AGGREGATIONS``) computed from ``inputs``.
    ``scale`` multiplies the mean and stderr in summaries (100: percent, as the papers report).
    """

    name: str
    higher_is_better: bool = True
    aggregation: str = "mean"
    inputs: tuple[str, ...] = ()
    scale: float = 100.0
    description: str = ""

    @property
    def arrow(self) -> str:
        return "↑" if self.higher_is_better else "↓"

    def _settings(self) -> tuple:
        return (self.higher_is_better, self.aggregation, self.inputs, self.scale)


class MetricRegistry(Mapping[str, MetricInfo]):
    """Name -> MetricInfo. ``registry[name]`` also resolves ``pre_``/``post_`` prefixed names, and
    raises ``UnknownMetricError`` with "did you mean" suggestions for unknown names."""

    def __init__(self) -> None:
        self._metrics: dict[str, MetricInfo] = {}

    def register(self, info: MetricInfo) -> MetricInfo:
        old = self._metrics.get(info.name)
        if old is not None:
            if old._settings() != info._settings():
                raise ValueError(
                    f"metric {info.name!r} is already registered with different settings: {old} vs {info}"
                )
            if info.description and not old.description:
                self._metrics[info.name] = info
            return self._metrics[info.name]
        self._metrics[info.name] = info
        return info

    def unregister(self, name: str) -> None:
        """Remove a metric (for tests and interactive use)."""
        self._metrics.pop(name, None)

    def resolve(self, name: str) -> MetricInfo | None:
        """The MetricInfo for ``name`` (``pre_``/``post_`` prefixes understood), or ``None``."""
        if name in self._metrics:
            return self._metrics[name]
        for prefix in PREFIXES:
            if name.startswith(prefix):
                return self.resolve(name[len(prefix) :])
        return None

    def __getitem__(self, name: str) -> MetricInfo:
        info = self.resolve(name)
        if info is None:
            close = difflib.get_close_matches(name, list(self._metrics), n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise UnknownMetricError(
                f"unknown metric {name!r}{hint} (registered: {', '.join(sorted(self._metrics))})"
            )
        return info

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.resolve(name) is not None

    def __iter__(self) -> Iterator[str]:
        return iter(self._metrics)

    def __len__(self) -> int:
        return len(self._metrics)

    def dataset_level(self) -> list[MetricInfo]:
        """Metrics computed from other metrics' summaries (aggregation other than ``"mean"``)."""
        return [m for m in self._metrics.values() if m.aggregation != "mean"]


METRICS = MetricRegistry()


def register_metric(
    name: str,
    higher_is_better: bool = True,
    aggregation: str = "mean",
    *,
    inputs: Sequence[str] = (),
    scale: float = 100.0,
    description: str = "",
) -> Callable:
    """Register a metric. Works as a plain call or as a decorator (the function is returned
    unchanged); registering the same name again with the same settings is a no-op."""
    METRICS.register(
        MetricInfo(
            name=name,
            higher_is_better=higher_is_better,
            aggregation=aggregation,
            inputs=tuple(inputs),
            scale=scale,
            description=description,
        )
    )

    def decorator(fn):
        return fn

    return decorator


def _register_probe_set(base: str, description: str = "") -> None:
    register_metric(base, description=description)
    register_metric(
        f"{base}_magnitude",
        description=f"mean exp(logprob target) - exp(logprob foil) on the {base} probes",
    )
    register_metric(f"{base}_acc", description=f"fraction of {base} probes whose target is all argmax")


_register_probe_set("efficacy", "rewrite prompts: P(new) > P(old) (CounterFact) / token accuracy (zsRE)")
_register_probe_set("generality", "paraphrase prompts: P(new) > P(old) / token accuracy")
_register_probe_set("locality", "neighborhood prompts: P(old) > P(new) / token accuracy")

# The locality and portability sets of Yao et al. 2023 (EasyEdit), as the SSS paper evaluates them
# (seed 002, sections 7.1-7.2; bundled as dataset=cf_distract_neighbor, cf_one_hop, cf_subject_replace,
# zsre_subject_replace, zsre_reversed_relation). All higher is better. "P(a) > P(b)": the
# CounterFact pairwise comparison of the probe's target a with its foil b; "token accuracy": the
# teacher-forced top-1 accuracy of the answer's tokens (zsRE / EasyEdit portability).
_register_probe_set(
    "attribute",
    "Post-Neighbor: attribute prompts, other subjects whose TRUE object is the new one: P(new) > P(old)",
)
_register_probe_set(
    "distract_neighbor",
    "Distract-Neighbor: the edit statement with the new object, then a neighbourhood prompt: P(old) > P(new)",
)
_register_probe_set(
    "unrelated_attribute",
    "Unrelated Attributes: another attribute of the edited subject (question -> its unchanged "
    "object): token accuracy of that object",
)
_register_probe_set(
    "subject_replace",
    "Subject Replace: the edit prompt with an alias of the subject: P(new) > P(old) (CounterFact) / "
    "token accuracy of the new object (zsRE)",
)
_register_probe_set(
    "reversed_relation",
    "Reversed Relation: the relation asked the other way round about the new object: token "
    "accuracy of the subject (zsRE)",
)
_register_probe_set(
    "one_hop",
    "One-Hop: a question whose answer follows from the new object: token accuracy of that answer",
)

#: The SSS paper's names of the probe sets (Tables 3 and 5) -> the metric each is reported under.
SSS_PROBE_METRICS: dict[str, str] = {
    "Pre-Neighbor": "locality",  # the neighbourhood prompts themselves (label: the old object)
    "Post-Neighbor": "attribute",  # CounterFact's attribute prompts (label: the new object)
    "Distract-Neighbor": "distract_neighbor",
    "Unrelated Attributes": "unrelated_attribute",
    "Subject Replace": "subject_replace",
    "Reversed Relation": "reversed_relation",
    "One-Hop": "one_hop",
}
register_metric(
    "score",
    aggregation="harmonic_mean",
    inputs=("efficacy", "generality", "locality"),
    description="harmonic mean of the dataset-level efficacy, generality and locality",
)
register_metric(
    "fluency",
    description="generation entropy: (2/3 H2 + 4/3 H3) / 2, bits of the NLTK-word 2-/3-gram distributions "
    "of top-k 5 samples (100 tokens with the prompt), mean over a case's texts, x100",
)
register_metric(
    "consistency",
    description="TF-IDF cosine between a case's generated texts and reference texts about the new object, "
    "x100 (reference source: protocol.generation in summary.json)",
)


def metric_name_for(probe_set: str) -> str:
    """The base metric name of a probe set (registering it when it is a new, extra set)."""
    base = PROBE_SET_METRIC.get(probe_set, probe_set)
    if base not in METRICS:
        _register_probe_set(base, f"extra probe set {probe_set!r}")
    return base


def probe_set_metrics(name: str, scores: Sequence[ProbeScore]) -> dict[str, float]:
    """The metrics of one probe set (``name`` is the base metric name, e.g. ``efficacy``)."""
    if not scores:
        return {}
    with_foil = [s.foil_logprob is not None for s in scores]
    out: dict[str, float] = {}
    if all(with_foil):
        out[name] = sum(float(s.target_logprob > s.foil_logprob) for s in scores) / len(scores)
        out[f"{name}_magnitude"] = sum(
            math.exp(s.target_logprob) - math.exp(s.foil_logprob) for s in scores
        ) / len(scores)
    elif not any(with_foil):
        out[name] = sum(s.target_token_acc for s in scores) / len(scores)
    else:
        raise ValueError(
            f"probe set for {name!r} mixes probes with and without foils; "
            "a set is scored either by P(target) > P(foil) or by token accuracy"
        )
    out[f"{name}_acc"] = sum(float(s.target_exact) for s in scores) / len(scores)
    return out


def case_metrics(case: EditCase, scores: Mapping[str, Sequence[ProbeScore]]) -> dict[str, float]:
    """Per-case metrics from the ProbeScores of each of the case's probe sets."""
    out: dict[str, float] = {}
    for set_name, probes in case.probes.items():
        if not probes:
            continue
        if set_name not in scores:
            raise KeyError(f"case {case.case_id}: no scores for probe set {set_name!r}")
        set_scores = scores[set_name]
        if len(set_scores) != len(probes):
            raise ValueError(
                f"case {case.case_id}: probe set {set_name!r} has {len(probes)} probes "
                f"but {len(set_scores)} scores"
            )
        out.update(probe_set_metrics(metric_name_for(set_name), set_scores))
    return out


def score_case_probes(
    model,
    tokenizer,
    cases: Sequence[EditCase],
    batch_size: int = 64,
    progress: bool = False,
    pack: bool = True,
) -> list[dict[str, list[ProbeScore]]]:
    """ProbeScores of every probe of every case, from ONE batched ``score_probes`` call,
    split back per case and probe set."""
    flat: list[Probe] = []
    layout: list[list[tuple[str, int, int]]] = []
    for case in cases:
        spans = []
        for set_name, probes in case.probes.items():
            spans.append((set_name, len(flat), len(flat) + len(probes)))
            flat.extend(probes)
        layout.append(spans)
    scores = score_probes(model, tokenizer, flat, batch_size=batch_size, progress=progress, pack=pack)
    return [{name: scores[lo:hi] for name, lo, hi in spans} for spans in layout]


def score_cases(
    model,
    tokenizer,
    cases: Sequence[EditCase],
    batch_size: int = 64,
    progress: bool = False,
    pack: bool = True,
) -> list[dict[str, float]]:
    """Per-case metric dicts (unprefixed: ``efficacy``, ``locality_magnitude``...), all cases'
    probes scored together. The runner calls it before and after an edit; ``pack`` False when
    the edit changed the forward pass (``Handle.changes_forward``): no packed rows."""
    per_case = score_case_probes(model, tokenizer, cases, batch_size=batch_size, progress=progress, pack=pack)
    return [case_metrics(case, scores) for case, scores in zip(cases, per_case)]
