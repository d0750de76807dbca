"""EditCase: one dataset record, whatever its source format, with its evaluation probes."""

from __future__ import annotations

from dataclasses import dataclass, field

from editors.requests import EditRequest


@dataclass(frozen=True)
class Probe:
    """A prompt (subject already filled in) and the answer that should win on it.

    ``foil`` is the competing answer for success metrics (P(target) > P(foil)); ``None`` means the
    probe is scored by teacher-forced token accuracy of ``target`` alone (zsRE style). The text
    scored is ``prompt + " " + answer``.
    """

    prompt: str
    target: str
    foil: str | None = None


@dataclass(frozen=True)
class EditCase:
    """A requested rewrite plus the probes that evaluate it.

    ``probes`` maps a probe set name to its probes. Names used by the metrics:
    ``rewrite`` (efficacy), ``paraphrase`` (generality), ``neighborhood`` (locality).
    Extra probe sets a dataset carries (``attribute``, ``portability``...) are kept and scored
    under their own name. ``generation_prompts`` feed fluency/consistency.
    ``true_answer`` is the pre-edit answer: CounterFact's ``target_true``, zsRE's ``pred`` (the base
    model's prediction, which a locally trained toy model is taught); "" when unknown.
    """

    request: EditRequest
    probes: dict[str, tuple[Probe, ...]]
    generation_prompts: tuple[str, ...] = ()
    meta: dict[str, object] = field(default_factory=dict)
    true_answer: str = ""

    @property
    def case_id(self) -> str:
        return self.request.case_id
