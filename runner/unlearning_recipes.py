"""Unlearning as editing: how forget items become edit requests (``task=unlearn``).

One place for the three choices an unlearning-by-editing run makes, each a config key of
``unlearn`` (:class:`UnlearnConfig`):

- **The prompt** (:func:`format_question`): a question goes through the model's chat template
  (``model.chat_template=true``, instruct models) or ``unlearn.question_template`` ("Question: ...
  Answer:"), the same way for editing, training the baselines and evaluating.
- **The target** (``unlearn.target``, :func:`unlearning_targets`): ``fixed`` (one refusal string),
  ``idk`` (one of TOFU's 100 ``idontknow`` refusals per item, drawn deterministically from the
  seed and the item id) or ``self_improve`` (Editing-as-Unlearning's self-improvement, as we read
  the abstract (spec §2.2; the paper's prompt could not be read): the model continues a few-shot
  prompt of question -> polite refusal pairs after the item's question; its greedy continuation,
  cut at the first line break, is the target when it passes the refusal filter
  (:func:`evaluation.unlearning.is_refusal`); otherwise the item falls back to the ``idk`` draw,
  and the fallback count is in the run's protocol. Targets are cached per item (model, revision,
  prompt and settings in the key), so a sweep over editors generates them once.
- **Query merging** (``unlearn.merge_queries=K``, :func:`merge_requests`): K consecutive forget
  questions (TOFU's forget split lists an author's 20 questions together) become one request whose
  question is the K questions joined by ``merge_separator``, formatted once, with the first item's
  refusal as its target and the first item's answer as the old answer. The paper's construction
  could not be read (spec §2.2); we chose concatenation because it is what "several forget
  questions in one edit" allows for an editor that writes one key per request (ROME, MEMIT): the
  key is read at the end of the merged prompt (or at the shared subject's last occurrence), so K
  questions cost one rank-one update instead of K, which is the failure mode the paper names for
  long forget sequences. Every item is still evaluated on its own question.

A request's subject: with ``unlearn.use_subject`` and an item that names its subject (an RWKU
target, a TOFU author whose name is in the question) the prompt is a template with ``{}`` there and
locate-then-edit methods edit at the subject's last token; otherwise ``subject=None`` and they edit
at the prompt's last token.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from editors.requests import SUBJECT_SLOT, EditRequest
from evaluation.cases import QAItem
from evaluation.unlearning import REFUSAL_KEYWORDS

log = logging.getLogger(__name__)

TARGETS = ("fixed", "idk", "self_improve")

#: The few-shot demonstrations of self-improvement (ours: question -> a polite refusal that names
#: what was asked, the "human-aligned" refusal the paper describes).
DEFAULT_DEMONSTRATIONS = (
    (
        "What is the title of the first novel by the author born in Lisbon in 1961?",
        "I'm sorry, but I don't know the title of that author's first novel.",
    ),
    (
        "Which award did the poet from Nairobi receive in 2004?",
        "I'm not sure which award that poet received; I don't have that information.",
    ),
    (
        "Where did the playwright known for 'The Glass Orchard' study?",
        "I don't know where that playwright studied.",
    ),
    (
        "What genre does the author of 'Winter in Tbilisi' write in?",
        "I'm afraid I don't have any information about the genre of that author.",
    ),
)


@dataclass
class SelfImproveConfig:
    """Self-improvement's few-shot prompt and generation (defaults are ours; see the module doc)."""

    demonstrations: list[list[str]] = field(default_factory=lambda: [list(d) for d in DEFAULT_DEMONSTRATIONS])
    separator: str = "\n\n"  # between demonstrations
    max_new_tokens: int = 32  # of the refusal continuation
    batch_size: int = 16  # prompts per generate call


@dataclass
class UnlearnConfig:
    """Settings of ``task=unlearn`` (the recipe and the evaluation; the method is ``editor=``)."""

    target: str = "idk"  # fixed | idk | self_improve (module doc)
    fixed_target: str = "I don't know."  # unlearn.target=fixed
    # unlearn (and evaluate the forget split on) only the first N forget items; null: the whole
    # forget split (runner.unlearn.forget_subset: the other splits are unchanged)
    forget_items: int | None = None
    merge_queries: int = 1  # K forget questions per edit request (query merging; 1: off)
    merge_separator: str = " "  # between merged questions
    use_subject: bool = (
        True  # edit at the subject when an item names one; false: always the last prompt token
    )
    question_template: str = "Question: {question}\nAnswer:"  # prompts of models without a chat template
    self_improve: SelfImproveConfig = field(default_factory=SelfImproveConfig)
    reference: str = "retain"  # forget quality and privleak compare against: retain (the retain model) | none
    # hub models: unlearn task=finetune's cached full model, against its retain model (runner.finetune)
    finetuned: bool = False
    reference_hub_id: str | None = (
        None  # hub models: the retain model (e.g. open-unlearning's tofu_..._retain90)
    )
    eval_batch_size: int = 16  # sequences per scorer pass and prompts per generate call
    max_new_tokens: int = 64  # greedy answers for ROUGE-L and the refusal rate
    truth_ratio_mean: str = "geometric"  # geometric (open-unlearning) | arithmetic (the TOFU repo)
    min_k: float = 0.4  # Min-K% Prob's k (open-unlearning's default)
    refusal_keywords: list[str] | None = None  # null: evaluation.unlearning.REFUSAL_KEYWORDS
    # the dataset's own refusals (TOFU's idontknow.jsonl) also count as refusal phrases: 68 of its 100
    # contain none of REFUSAL_KEYWORDS ("I'm drawing a blank on that one."), so unlearn.target=idk
    # could not score above 0.32 otherwise
    refusals_are_keywords: bool = True
    # the toy only: it also learns to decline this many questions of train["unseen"] (TOFU's left-out
    # authors) with refusals drawn as unlearn.target=idk draws them, the refusal answer space a
    # pre-trained model brings; 0: none. Never an evaluated item.
    toy_refusals: int = 0
    # how the toy answers those questions: idk (each its unlearn.target=idk draw) | fixed
    # (unlearn.fixed_target, one refusal the toy learns as well as any fact)
    toy_refusal: str = "idk"
    # the toy only: the sentences its covariance statistics (stats.corpus=training) are taken over.
    # retain: the retain model's (everything the toy learned but the forget split), the stand-in for
    # a real model's pre-training corpus, which does not single out the forget set; full: every
    # sentence the toy learned, the forget questions included, so that C weighs (AlphaEdit: projects
    # out) the very keys the edits must change
    toy_stats: str = "retain"
    # the toy only: its facts carry their item's subject (TOFU: the author named in the question), so
    # the toy recipe's subject bottleneck and lens (model.train.subject_*) apply to them
    toy_subjects: bool = False

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"unlearn.target must be one of {TARGETS}, got {self.target!r}")
        if self.forget_items is not None and (
            isinstance(self.forget_items, bool)
            or not isinstance(self.forget_items, int)
            or self.forget_items < 1
        ):
            raise ValueError(
                f"unlearn.forget_items must be a positive number of forget items or null (all), got {self.forget_items!r}"
            )
        if self.merge_queries < 1:
            raise ValueError(f"unlearn.merge_queries must be ≥ 1, got {self.merge_queries}")
        if "{question}" not in self.question_template:
            raise ValueError(
                f"unlearn.question_template must contain '{{question}}', got {self.question_template!r}"
            )
        if self.toy_refusals < 0:
            raise ValueError(f"unlearn.toy_refusals must be ≥ 0, got {self.toy_refusals}")
        if self.toy_refusal not in ("idk", "fixed"):
            raise ValueError(f"unlearn.toy_refusal must be idk or fixed, got {self.toy_refusal!r}")
        if self.toy_stats not in ("retain", "full"):
            raise ValueError(f"unlearn.toy_stats must be retain or full, got {self.toy_stats!r}")
        if self.reference not in ("retain", "none"):
            raise ValueError(f"unlearn.reference must be retain or none, got {self.reference!r}")
        if self.truth_ratio_mean not in ("geometric", "arithmetic"):
            raise ValueError(
                f"unlearn.truth_ratio_mean must be geometric or arithmetic, got {self.truth_ratio_mean!r}"
            )


def refusal_keywords(cfg: UnlearnConfig, refusals: Sequence[str] = ()) -> tuple[str, ...]:
    """The phrases that mark a generation as a refusal (:func:`evaluation.unlearning.is_refusal`):
    ``unlearn.refusal_keywords`` (or the default list) and, with ``refusals_are_keywords``, each of the
    dataset's refusals without its closing punctuation."""
    keywords = list(cfg.refusal_keywords or REFUSAL_KEYWORDS)
    if cfg.refusals_are_keywords:
        keywords += [r.strip().rstrip(".!?").strip() for r in refusals]
    unique: dict[str, str] = {}  # is_refusal matches case-insensitively: one entry per lowercase form
    for k in keywords:
        if k:
            unique.setdefault(k.lower(), k)
    return tuple(unique.values())


def format_question(question: str, template: str, tokenizer=None, chat: bool = False) -> str:
    """The prompt for ``question``: the tokenizer's chat template (user turn, generation prompt)
    when ``chat``, else ``template``. A chat template's leading BOS text is dropped, because the
    scorer and ``generate`` tokenise with special tokens and would add it twice."""
    if not chat:
        return template.replace("{question}", question)
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("model.chat_template=true, but the tokenizer has no chat template")
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    bos = getattr(tokenizer, "bos_token", None)
    return text[len(bos) :] if bos and text.startswith(bos) else text


def idk_target(refusals: Sequence[str], seed: int, item_id: str) -> str:
    """One refusal of ``refusals`` for ``item_id``: the same item gets the same one for a seed."""
    digest = hashlib.sha256(f"{seed}:{item_id}".encode()).digest()
    return refusals[random.Random(digest).randrange(len(refusals))]


def self_improve_prompt(prompt: str, settings: SelfImproveConfig, format_q: Callable[[str], str]) -> str:
    """The few-shot prompt: each demonstration formatted like the item, then the item's prompt."""
    shots = [f"{format_q(q)} {r}" for q, r in settings.demonstrations]
    return settings.separator.join([*shots, prompt])


def first_line(text: str) -> str:
    """A continuation up to its first line break (the next demonstration would start there)."""
    return text.strip().split("\n", 1)[0].strip()


def unlearning_targets(
    items: Sequence[QAItem],
    prompts: Sequence[str],
    cfg: UnlearnConfig,
    *,
    refusals: Sequence[str],
    seed: int,
    generate: Callable[[list[str], int], list[str]] | None = None,
    format_q: Callable[[str], str] | None = None,
    is_refusal: Callable[[str], bool] | None = None,
    cache: Path | None = None,
) -> tuple[list[str], dict[str, int]]:
    """The refusal target of each item and how many came from each source.

    ``generate(prompts, max_new_tokens)`` returns greedy continuations (without the prompt);
    self-improvement needs it, ``format_q`` and ``is_refusal``. ``cache``: a JSON file of earlier
    self-improved targets by key (read and extended)."""
    refusals = list(refusals) or [cfg.fixed_target]
    if cfg.target == "fixed":
        return [cfg.fixed_target] * len(items), {"fixed": len(items)}
    drawn = [idk_target(refusals, seed, item.item_id) for item in items]
    if cfg.target == "idk":
        return drawn, {"idk": len(items)}
    if generate is None or format_q is None or is_refusal is None:
        raise ValueError("unlearn.target=self_improve needs a model to generate with")
    settings = cfg.self_improve
    key_of = {
        i: hashlib.sha256(
            json.dumps({"prompt": p, "settings": asdict(settings)}, sort_keys=True).encode()
        ).hexdigest()
        for i, p in enumerate(prompts)
    }
    stored: dict[str, str] = json.loads(cache.read_text(encoding="utf-8")) if cache and cache.exists() else {}
    todo = [i for i in range(len(items)) if key_of[i] not in stored]
    for start in range(0, len(todo), settings.batch_size):
        rows = todo[start : start + settings.batch_size]
        texts = generate(
            [self_improve_prompt(prompts[i], settings, format_q) for i in rows], settings.max_new_tokens
        )
        for i, text in zip(rows, texts):
            stored[key_of[i]] = first_line(text)
    if cache is not None and todo:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps(stored, indent=1, sort_keys=True), encoding="utf-8")
        tmp.replace(cache)
    targets, counts = [], {"self_improve": 0, "fallback_idk": 0}
    for i in range(len(items)):
        text = stored[key_of[i]]
        if text and is_refusal(text):
            targets.append(text)
            counts["self_improve"] += 1
        else:
            targets.append(drawn[i])
            counts["fallback_idk"] += 1
    return targets, counts


def _template(prompt: str, subject: str | None, last: bool) -> str | None:
    """``prompt`` with ``subject``'s first (or last) occurrence replaced by ``{}``; None if absent
    or if the prompt has a literal ``{}`` of its own."""
    if not subject or subject not in prompt or SUBJECT_SLOT in prompt:
        return None
    at = prompt.rfind(subject) if last else prompt.find(subject)
    return prompt[:at] + SUBJECT_SLOT + prompt[at + len(subject) :]


def forget_request(
    case_id: str, prompt: str, subject: str | None, target: str, answer: str, use_subject: bool, last=False
) -> EditRequest:
    """An edit request toward ``target`` on ``prompt``, at the subject when it is in the prompt."""
    template = _template(prompt, subject, last) if use_subject else None
    if template is None:
        return EditRequest(case_id, prompt, None, target, answer or None)
    return EditRequest(case_id, template, subject, target, answer or None)


def merge_requests(
    items: Sequence[QAItem],
    targets: Sequence[str],
    cfg: UnlearnConfig,
    format_q: Callable[[str], str],
) -> list[EditRequest]:
    """The edit requests of the forget items: one per item, or one per K consecutive items
    (query merging; module doc). A merged request keeps a subject only when all its items share
    it; its key is then read at the subject's last occurrence."""
    k = cfg.merge_queries
    requests = []
    for start in range(0, len(items), k):
        group = items[start : start + k]
        question = cfg.merge_separator.join(item.question for item in group)
        subjects = {item.subject for item in group}
        subject = group[0].subject if len(subjects) == 1 else None
        case_id = group[0].item_id if len(group) == 1 else f"{group[0].item_id}+{len(group) - 1}"
        requests.append(
            forget_request(
                case_id,
                format_q(question),
                subject,
                targets[start],
                group[0].answer,
                cfg.use_subject,
                last=len(group) > 1,
            )
        )
    return requests
