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


@dataclass(frozen=True)
class QAItem:
    """One item of an unlearning split (TOFU, RWKU): a question and its answer, or a text.

    ``question`` is the raw question (RWKU's cloze queries keep their ``___``); the runner turns
    it into a prompt (a QA template or the model's chat template) before scoring or editing.
    ``subject`` is the entity the item is about when known (RWKU's target, a TOFU author named in
    the question), else None. ``paraphrased_answer`` and ``perturbed_answers`` feed the truth
    ratio (TOFU's ``*_perturbed`` files; real_authors/world_facts: the wrong options);
    ``paraphrased_question`` the rephrase probes. ``text`` (question and answer empty) is a passage
    scored as a whole: RWKU's MIA sets. ``meta`` keeps the source's other fields (level, type).
    """

    item_id: str
    question: str
    answer: str
    subject: str | None = None
    paraphrased_answer: str | None = None
    perturbed_answers: tuple[str, ...] = ()
    paraphrased_question: str | None = None
    text: str | None = None
    meta: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class SplitRoles:
    """What each split of an unlearning dataset is for (read by the unlearning metrics).

    ``forget``: the split unlearned (its items become edit requests / forget training data);
    ``retain``: the split a baseline may train on to keep utility; ``utility``: the splits whose
    Prob, ROUGE-L and truth ratio enter model utility (TOFU: retain, real_authors, world_facts);
    ``mia_member`` / ``mia_nonmember``: the membership-inference pair (TOFU: forget vs holdout;
    RWKU: forget_mia vs retain_mia); ``measures``: split -> the per-item measures it gets
    (``prob``, ``truth_ratio``, ``rouge_l``, ``refusal``, ``loss``, ``min_k``...).
    """

    forget: str
    retain: str | None = None
    utility: tuple[str, ...] = ()
    mia_member: str | None = None
    mia_nonmember: str | None = None
    measures: dict[str, tuple[str, ...]] = field(default_factory=dict)
