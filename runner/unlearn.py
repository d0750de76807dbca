"""``task=unlearn``: forget a split, evaluate every split once, one record per (split, item).

The loop (it shares model loading, the editor contract, statistics, artifacts, the results store,
tracking and reporting with ``task=edit``; it never names a method):

1. load the unlearning dataset (``dataset=tofu|rwku``: :mod:`runner.unlearning_data`) and the
   model that holds the knowledge: a hub model (e.g. one fine-tuned on TOFU) or, on CPU, the
   ``toy`` trained on the dataset's ``train["full"]`` items (question -> answer), and with
   ``unlearn.toy_refusals`` on refusals to questions it does not know (``train["unseen"]``);
2. the reference model of forget quality and privleak (``unlearn.reference=retain``): the toy
   trained on ``train["retain"]`` only, or ``unlearn.reference_hub_id``; its forget-split truth
   ratios and MIA scores are computed once and cached by content;
3. with ``unlearn.forget_items=N``, keep the first N forget items (and as many holdout items:
   :func:`runner.unlearning_data.first_forget_items`; the models above learnt every item either
   way), so that the requests, the baselines' forget data, the forget split's scores and the
   reference's truth ratios all cover the same N items; turn the forget items into edit requests
   (:mod:`runner.unlearning_recipes`: prompt, refusal target, query merging) and give the editor
   the retain split's (prompt, answer) pairs (``Resources.retain``, for the training baselines);
4. score every split on the unedited model (``pre_``), apply the requests in batches of
   ``batch_size`` that accumulate (unlearning is one model that forgot them all), score every split
   again (``post_``), restore the model bit-exactly;
5. write records as each split is scored (a rerun of the same config resumes: the unlearning is
   redone, only the missing items are scored); summarise with
   :func:`evaluation.unlearning.summarize_unlearning`; print and log the table.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from editors.base import Resources
from editors.core.targets import TargetCache
from evaluation.cases import QAItem
from evaluation.tables import format_table
from evaluation.unlearning import (
    greedy_generate,
    is_refusal,
    score_items,
    summarize_unlearning,
)
from runner.artifacts import ArtifactMissing, ArtifactStore, log_artifact_reports
from runner.environment import run_environment
from runner.models import LoadedModel, ToyFact, load_model, load_toy_on_facts
from runner.oom import explain_oom
from runner.results import ResultsStore, check_resume
from runner.tokenizers import content_hash
from runner.tracking import make_tracker
from runner.unlearning_data import NAMES as UNLEARNING_NAMES
from runner.unlearning_data import UnlearningSet, first_forget_items, load_unlearning
from runner.unlearning_recipes import (
    UnlearnConfig,
    format_question,
    idk_target,
    merge_requests,
    refusal_keywords,
    self_improve_prompt,
    unlearning_targets,
)
from runner.validate import PromptTooLongError, _token_lengths, context_length

log = logging.getLogger(__name__)

#: the columns of the printed table (others are in summary.json)
HEADLINE = (
    "forget_quality",
    "model_utility",
    "forget_rouge_l",
    "retain_rouge_l",
    "refusal_rate",
    "mia_loss_auc",
    "mia_score",
    "privleak",
    # SemEval-2025 Task 4 (dataset=semeval25); a column is printed only when a row has it
    "task_aggregate",
    "mmlu",
    "semeval_final",
)


def _unlearn_cfg(cfg: DictConfig) -> UnlearnConfig:
    """The typed ``unlearn`` block; a value out of range is a one-line :class:`ConfigError`."""
    from runner.pipeline import ConfigError

    try:
        obj = OmegaConf.to_object(cfg.unlearn)
        return obj if isinstance(obj, UnlearnConfig) else UnlearnConfig(**obj)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def check_forget_items(data: UnlearningSet, ucfg: UnlearnConfig, size: int | None) -> None:
    """``unlearn.forget_items`` is at most the forget split's length (one line otherwise, before
    any model loads). ``dataset.size`` caps every split first, so N counts from the capped split."""
    from runner.pipeline import ConfigError

    n, have = ucfg.forget_items, len(data.splits[data.roles.forget])
    if n is not None and n > have:
        cap = f" (dataset.size={size} caps it)" if size is not None else ""
        raise ConfigError(
            f"unlearn.forget_items={n} is more than the {have} items of {data.name}'s forget split{cap}; "
            f"lower it, or null for all"
        )


class Prompter:
    """Questions -> prompts, one way for editing, training and evaluation (module doc of
    :mod:`runner.unlearning_recipes`)."""

    def __init__(self, template: str, tokenizer, chat: bool) -> None:
        self.template, self.tokenizer, self.chat = template, tokenizer, chat

    def __call__(self, question: str) -> str:
        return format_question(question, self.template, self.tokenizer, self.chat)

    def item(self, item: QAItem) -> str:
        """An item's prompt; a text item (an MIA passage) is scored from its start."""
        return "" if item.text is not None else self(item.question)


def _toy_facts(
    items, prompter: Prompter, answers: Sequence[str] | None = None, subjects: bool = False
) -> list[ToyFact]:
    """The toy's (prompt, answer) facts of ``items`` (their own answers, or ``answers``); with
    ``subjects``, each with the item's subject where its prompt names it (unlearn.toy_subjects)."""
    seen: dict[str, ToyFact] = {}
    for k, item in enumerate(items):
        answer = item.answer if answers is None else answers[k]
        if item.text is None and item.question.strip() and answer.strip():
            prompt = prompter(item.question)
            subject = item.subject if subjects and item.subject and item.subject in prompt else ""
            seen.setdefault(prompt, ToyFact(prompt, answer.strip(), subject))
    return sorted(seen.values())


def _toy_refusals(
    data: UnlearningSet, prompter: Prompter, ucfg: UnlearnConfig, seed: int, capped: bool = False
) -> list[ToyFact]:
    """``unlearn.toy_refusals`` questions no toy learns, each answered with a refusal
    (``idk_target``'s draw): both toys learn them, so that a refusal is an answer the toy can give.
    The questions: ``train["unseen"]`` (TOFU's left-out retain authors) and, when ``dataset.size``
    caps the toys to the evaluated items, the training items they then do not learn."""
    if not ucfg.toy_refusals:
        return []
    pool = list(data.train.get("unseen", ()))
    if capped:
        asked = {i.question for items in data.splits.values() for i in items}
        pool += [i for i in data.train.get("retain", ()) if i.question not in asked]
    unseen = pool[: ucfg.toy_refusals]
    if len(unseen) < ucfg.toy_refusals:
        raise ValueError(
            f"unlearn.toy_refusals={ucfg.toy_refusals}: dataset {data.name} has {len(unseen)} questions no toy "
            "learns (TOFU: the retain authors dataset.retain_authors leaves out); lower it, or 0"
        )
    refusals = list(data.refusals) or [ucfg.fixed_target]
    if ucfg.toy_refusal == "fixed":
        answers = [ucfg.fixed_target] * len(unseen)
    else:
        answers = [idk_target(refusals, seed, item.item_id) for item in unseen]
    return _toy_facts(unseen, prompter, answers, ucfg.toy_subjects)


def _qa_items(data: UnlearningSet, split: str) -> list[QAItem]:
    return [item for item in data.splits.get(split, ()) if item.text is None]


def _toy_training(data: UnlearningSet, which: str, capped: bool = False) -> list[QAItem]:
    """What a toy that holds the knowledge learns: ``train[which]`` (TOFU: full or retain), and the
    splits that stand for general knowledge (TOFU's real authors and world facts, RWKU's
    neighbours: the toy has no pre-training to know them from). RWKU's forget probes are
    pre-trained knowledge: with no ``train`` of its own, the full toy learns every QA split and the
    retain toy every one but the forget splits."""
    forget = {data.roles.forget} | {s for s in data.splits if s.startswith("forget")}
    general = [s for s in data.splits if s not in forget and s not in (data.roles.retain, "holdout")]
    if data.train:
        items = list(data.train.get(which, ()))
        if capped:  # dataset.size: the toy learns the evaluated items of train[which] only
            asked = {i.question for items_ in data.splits.values() for i in items_}
            items = [i for i in items if i.question in asked]
        for split in general:
            items += _qa_items(data, split)
        return items
    splits = list(data.splits) if which == "full" else [s for s in data.splits if s not in forget]
    return [item for s in splits for item in _qa_items(data, s)]


def _load_models(cfg: DictConfig, data: UnlearningSet, cache_dir: Path, ucfg: UnlearnConfig):
    """The model to unlearn and the reference (retain) model, or None."""
    from runner.pipeline import ConfigError, _context_reserve

    reserve = _context_reserve(cfg.editor)
    chat = bool(cfg.model.get("chat_template", False))
    capped = cfg.dataset.get("size") is not None
    if cfg.model.source == "toy":
        if ucfg.finetuned:
            raise ConfigError("unlearn.finetuned=true is for hub models: the toy learns the dataset itself")
        prompter = Prompter(ucfg.question_template, None, False)
        limit = int(cfg.model.sizes.max_positions)

        def check(tokenizer) -> None:
            check_item_lengths(data, prompter, ucfg, tokenizer, limit, reserve)

        declined = _toy_refusals(data, prompter, ucfg, int(cfg.seed), capped)
        loaded = load_toy_on_facts(
            cfg.model,
            _toy_facts(_toy_training(data, "full", capped), prompter, subjects=ucfg.toy_subjects),
            cache_dir=cache_dir,
            seed=_toy_seed(cfg),
            extra=declined,
            check=check,
        )
        check(loaded.tokenizer)  # also when the toy came from the cache
        retain_facts = _toy_facts(_toy_training(data, "retain", capped), prompter, subjects=ucfg.toy_subjects)
        if ucfg.toy_stats == "retain":  # the statistics' sentences (UnlearnConfig.toy_stats)
            loaded = replace(loaded, training_texts=tuple(f.text for f in retain_facts + declined))
        reference = None
        if ucfg.reference == "retain":
            reference = load_toy_on_facts(
                cfg.model, retain_facts, cache_dir=cache_dir, seed=_toy_seed(cfg), extra=declined
            )
        return loaded, reference, prompter
    if ucfg.finetuned:  # task=finetune's cached full model, and its retain model as the reference
        from runner.finetune import load_finetuned

        loaded, reference = load_finetuned(cfg, data, cache_dir, ucfg)
    else:
        loaded = load_model(cfg.model, cache_dir=cache_dir, seed=cfg.seed)
        reference = None
        if ucfg.reference == "retain" and ucfg.reference_hub_id:
            ref_cfg = OmegaConf.to_container(cfg.model, resolve=True)
            hub_id = ucfg.reference_hub_id.replace("{retain_percent}", _retain_percent(cfg.dataset))
            reference = load_model({**ref_cfg, "hub_id": hub_id, "revision": None}, cache_dir=cache_dir)
        elif ucfg.reference == "retain":
            log.warning(
                "no reference model (unlearn.reference_hub_id is null, unlearn.finetuned=false): forget "
                "quality and privleak are not computed"
            )
    prompter = Prompter(ucfg.question_template, loaded.tokenizer, chat)
    check_item_lengths(data, prompter, ucfg, loaded.tokenizer, context_length(loaded.model), reserve)
    return loaded, reference, prompter


def _retain_percent(dataset: DictConfig) -> str:
    """TOFU's retain split that goes with the forget split: forget05 -> "95"."""
    split = str(dataset.get("forget_split") or "")
    digits = "".join(c for c in split if c.isdigit())
    if not digits:
        raise ValueError(
            f"unlearn.reference_hub_id has {{retain_percent}}, but dataset.forget_split={split!r}"
        )
    return f"{100 - int(digits):02d}"


def check_item_lengths(
    data: UnlearningSet,
    prompter: Prompter,
    ucfg: UnlearnConfig,
    tokenizer,
    limit: int | None,
    reserve: int = 0,
) -> None:
    """Every text the run feeds the model fits in ``limit`` positions (one line naming the first
    that does not, before training or editing): each question with its answer, paraphrase and
    perturbed answers; its prompt plus the greedy answer's tokens; a forget prompt behind the
    editors' context prefixes (``reserve``); the self-improvement prompt plus its continuation.
    MIA passages are cut to the context by the scorer."""
    if not limit:
        return
    texts: list[tuple[str, int, str]] = []  # (text, extra positions, what)
    for split, items in data.splits.items():
        for item in items:
            if item.text is not None:
                continue
            prompt = prompter(item.question)
            answers = [item.answer, item.paraphrased_answer or "", *item.perturbed_answers]
            texts += [(f"{prompt} {a}", 0, f"{split} item {item.item_id}") for a in answers if a]
            texts.append(
                (prompt, ucfg.max_new_tokens, f"{split} item {item.item_id} (+ unlearn.max_new_tokens)")
            )
            if split == data.roles.forget:
                texts.append(
                    (
                        f"{prompt} {item.answer}",
                        reserve,
                        f"forget request {item.item_id} (+ context prefixes)",
                    )
                )
                if ucfg.target == "self_improve":
                    shots = self_improve_prompt(prompt, ucfg.self_improve, prompter)
                    texts.append(
                        (
                            shots,
                            ucfg.self_improve.max_new_tokens,
                            f"self-improvement prompt of {item.item_id}",
                        )
                    )
    lengths = _token_lengths(tokenizer, [t for t, _, _ in texts])
    over = [(extra, what, n) for (_, extra, what), n in zip(texts, lengths) if n + extra > limit]
    if over:
        extra, what, n = over[0]
        raise PromptTooLongError(
            f"{what} is {n}{f' + {extra}' if extra else ''} tokens, over the model's {limit} positions "
            f"({len(over)} text(s) too long); raise model.sizes.max_positions (toy) or shorten them"
        )


def _toy_seed(cfg: DictConfig) -> int:
    seed = cfg.model.train.get("seed")
    return int(seed) if seed is not None else int(cfg.seed)


class Scorer:
    """Every split's measures on one model state (batched; the measures each split asks for)."""

    def __init__(self, data: UnlearningSet, prompter: Prompter, ucfg: UnlearnConfig, progress: bool) -> None:
        self.data, self.prompter, self.ucfg, self.progress = data, prompter, ucfg, progress
        self.keywords = refusal_keywords(ucfg, data.refusals)

    def split(self, model, tokenizer, split: str, items, measures=None) -> list[dict]:
        measures = measures or self.data.roles.measures.get(split, ())
        return score_items(
            model,
            tokenizer,
            items,
            [self.prompter.item(i) for i in items],
            measures,
            batch_size=self.ucfg.eval_batch_size,
            max_new_tokens=self.ucfg.max_new_tokens,
            truth_ratio_mean=self.ucfg.truth_ratio_mean,
            min_k=self.ucfg.min_k,
            refusal_keywords=self.keywords,
            progress=self.progress and len(items) > 50,
        )


def _reference_records(
    reference: LoadedModel, data: UnlearningSet, scorer: Scorer, cache_dir: Path, ucfg: UnlearnConfig
) -> list[dict]:
    """The reference model's forget truth ratios and MIA scores (``post_`` keys, as the summary
    reads them), cached by model, data and settings."""
    roles = data.roles
    wanted: dict[str, tuple[str, ...]] = {roles.forget: ("truth_ratio",)}
    for split in (roles.mia_member, roles.mia_nonmember):
        if split:
            wanted[split] = tuple(dict.fromkeys((*wanted.get(split, ()), "loss", "min_k")))
    key = hashlib.sha256(
        json.dumps(
            {
                "model": f"{reference.model_id}@{reference.revision}",
                "data": data.sha256,
                "splits": {s: [i.item_id for i in data.splits[s]] for s in wanted},
                "settings": [ucfg.truth_ratio_mean, ucfg.min_k, ucfg.question_template],
            },
            sort_keys=True,
        ).encode()
    ).hexdigest()[:20]
    path = cache_dir / "unlearn_reference" / f"{key}.jsonl"
    if path.exists():
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    records = []
    for split, measures in wanted.items():
        items = data.splits[split]
        rows = scorer.split(reference.model, reference.tokenizer, split, items, measures)
        records += [_record(split, item, {}, row, "post_") for item, row in zip(items, rows)]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, default=float) + "\n" for r in records), encoding="utf-8")
    tmp.replace(path)
    return records


def _record(split: str, item: QAItem, pre: dict, post: dict, prefix: str = "post_") -> dict:
    record = {"case_id": item.item_id, "split": split, "item_id": item.item_id}
    record.update(pre)
    record.update({f"{prefix}{k}": v for k, v in post.items()})
    return record


def run_unlearn(cfg: DictConfig) -> dict[str, Any]:
    """Run one unlearning experiment; returns the summary (``summary.json``'s content)."""
    from runner.pipeline import (  # the shared pieces of every task
        _prepare_command,
        build_editor,
        build_stats,
        git_sha,
        method_label,
        prepare_artifacts,
        prepare_requirements,
        sweep_group,
    )

    ucfg = _unlearn_cfg(cfg)
    output_dir = Path(cfg.paths.output_dir)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    check_resume(output_dir, resolved)
    cache_dir = Path(cfg.paths.cache_dir)
    spec = OmegaConf.to_container(cfg.dataset, resolve=True)
    data = load_unlearning({**spec, "cache_dir": spec.get("cache_dir") or str(cache_dir / "datasets")})
    check_forget_items(data, ucfg, cfg.dataset.get("size"))
    with explain_oom("load", cfg):
        loaded, reference, prompter = _load_models(cfg, data, cache_dir, ucfg)
    # after the models: the toys learn the same knowledge whatever the number of items forgotten
    data = first_forget_items(data, ucfg.forget_items)
    log.info("dataset %s: %s", data.name, ", ".join(f"{s} {len(v)}" for s, v in data.splits.items()))
    model, tok = loaded.model, loaded.tokenizer
    scorer = Scorer(data, prompter, ucfg, cfg.progress)

    forget = list(data.splits[data.roles.forget])
    prompts = [prompter(item.question) for item in forget]
    targets, target_sources = unlearning_targets(
        forget,
        prompts,
        ucfg,
        refusals=data.refusals,
        seed=cfg.seed,
        generate=lambda texts, n: greedy_generate(model, tok, texts, max_new_tokens=n),
        format_q=prompter,
        is_refusal=lambda text: is_refusal(text, scorer.keywords),
        cache=cache_dir / "unlearn_targets" / f"{loaded.model_id}@{loaded.revision}.json",
    )
    requests = merge_requests(forget, targets, ucfg, prompter)
    log.info(
        "%d forget items -> %d edit requests (targets: %s)",
        len(forget),
        len(requests),
        ", ".join(f"{k} {v}" for k, v in target_sources.items()),
    )

    stats = build_stats(cfg, loaded)
    editor = build_editor(cfg.editor, loaded)
    with explain_oom("stats", cfg):
        prepare_requirements(editor, stats)
    store = ArtifactStore(
        cache_dir / "artifacts",
        loaded.model_id,
        loaded.revision,
        allow_train=bool(cfg.train_artifacts),
        command=_prepare_command(cfg),
    )
    try:
        artifacts = prepare_artifacts(editor, loaded, store, cache_dir / "datasets", cfg.artifact_max_steps)
    except ArtifactMissing as exc:
        from runner.pipeline import ConfigError

        raise ConfigError(str(exc)) from None
    retain_pairs = tuple(
        (prompter(item.question), item.answer) for item in _qa_items(data, data.roles.retain or "")
    )
    targets_cache = (
        TargetCache(cache_dir / "targets", f"{loaded.model_id}@{loaded.revision}")
        if cfg.cache_targets
        else None
    )
    editor.prepare(
        model,
        tok,
        Resources(
            stats=stats,
            targets=targets_cache,
            progress=cfg.progress,
            artifacts=artifacts,
            retain=retain_pairs,
            adapter_cache=cache_dir / "adapters" / content_hash(f"{loaded.model_id}@{loaded.revision}"),
        ),
    )

    results = ResultsStore(output_dir, run_config=resolved)
    done = results.done_ids()
    todo = {s: [i for i in items if i.item_id not in done] for s, items in data.splits.items()}
    n_todo = sum(len(v) for v in todo.values())
    timings: dict[str, Any] = {"pre_eval_seconds": 0.0, "unlearn_seconds": 0.0, "post_eval_seconds": 0.0}
    name = f"{cfg.editor._target_.rsplit('.', 1)[-1]}-{cfg.model.name}-{data.name}"
    tracker = make_tracker(cfg.logger, resolved, output_dir, name, sweep_group())
    failed = True
    try:
        log_artifact_reports(tracker, artifacts, store.trained)
        if n_todo:
            if done:
                log.info(
                    "resuming: %d of %d items already in %s", len(done), n_todo + len(done), results.path
                )
            pre: dict[str, list[dict]] = {}
            t0 = time.perf_counter()
            if cfg.eval.pre_edit:
                for split, items in todo.items():
                    if items:
                        pre[split] = scorer.split(model, tok, split, items)
            timings["pre_eval_seconds"] = time.perf_counter() - t0
            kept = None
            t0 = time.perf_counter()
            try:
                size = len(requests) if getattr(editor, "APPLY_ONCE", False) else cfg.batch_size
                batches = [requests[i : i + size] for i in range(0, len(requests), size)]
                for batch in tqdm(batches, desc="unlearning", disable=not cfg.progress):
                    with explain_oom("edit", cfg, editor.memory_knobs()):
                        delta = editor.apply(model, tok, batch)
                    handle = delta.attach(model)
                    kept = handle if kept is None else kept.merge(handle)
                timings["unlearn_seconds"] = time.perf_counter() - t0
                evaluated = kept.model if kept is not None else model
                t0 = time.perf_counter()
                for split, items in todo.items():
                    if not items:
                        continue
                    post = scorer.split(evaluated, tok, split, items)
                    before = pre.get(split) or [{} for _ in items]
                    results.append(
                        _record(split, item, {f"pre_{k}": v for k, v in b.items()}, a)
                        for item, b, a in zip(items, before, post)
                    )
                timings["post_eval_seconds"] = time.perf_counter() - t0
            finally:
                if kept is not None:
                    kept.restore()
                editor.reset()
        ref_records = None
        if reference is not None:
            ref_records = _reference_records(reference, data, scorer, cache_dir, ucfg)
        printed, summary = _summarize(
            cfg, data, loaded, reference, results, ref_records, ucfg, target_sources, requests, timings
        )
        summary["protocol"]["method"] = _method(method_label(cfg), editor, ucfg)
        summary["protocol"]["git_sha"] = git_sha()
        results.write_json("summary.json", summary)
        print(printed)  # after the summary is on disk: a closed stdout loses nothing
        tracker.summary({f"post/{k}": v["mean"] for k, v in summary["metrics"]["post"].items()})
        failed = False
        return summary
    finally:
        tracker.finish(failed=failed)


def _method(label: str, editor, ucfg: UnlearnConfig) -> str:
    """The row name: the editor (with its :meth:`~editors.base.EditorBase.variant`) and its recipe
    (``memit+fixed+merge4``); a baseline that trains on the whole forget set reads the answers, not
    a target, so it is the editor alone (``ties_npo+over``, ``ties_npo+lora_factors/ties@0.8``)."""
    variant = editor.variant() if hasattr(editor, "variant") else None
    label = f"{label}+{variant}" if variant else label
    if getattr(editor, "APPLY_ONCE", False):
        return label
    merge = f"+merge{ucfg.merge_queries}" if ucfg.merge_queries > 1 else ""
    return f"{label}+{ucfg.target}{merge}"


def _entries(values: dict[str, float]) -> dict[str, dict]:
    return {k: {"mean": v, "stderr": None} for k, v in values.items() if isinstance(v, (int, float))}


def _summarize(cfg, data, loaded, reference, results, ref_records, ucfg, target_sources, requests, timings):
    wanted = {i.item_id for items in data.splits.values() for i in items}
    records = [r for r in results.load() if str(r["case_id"]) in wanted]
    if ref_records is not None:  # like for like: the reference on the same (forget) items
        ref_records = [r for r in ref_records if str(r["case_id"]) in wanted]
    kwargs = {
        "reference": ref_records,
        "truth_ratio_mean": ucfg.truth_ratio_mean,
        "reference_prefix": "post_",
    }
    post = summarize_unlearning(records, data.roles, "post_", **kwargs)
    pre = summarize_unlearning(records, data.roles, "pre_", **kwargs) if cfg.eval.pre_edit else {}
    rows = [("pre-unlearning", pre), ("post-unlearning", post)] if pre else [("post-unlearning", post)]
    columns = [c for c in HEADLINE if any(c in row for _, row in rows)]
    table = format_table(rows, columns, digits=3)
    printed = f"\n{table}\n\nresults: {results.path}\nsummary: {Path(cfg.paths.output_dir) / 'summary.json'}"
    return printed, {
        **{k: post[k] for k in HEADLINE if k in post},
        "n_items": len(records),
        # the shape of task=edit's summaries, so runner.table and the sweep summary read both
        "metrics": {"post": _entries(post), "pre": _entries(pre)},
        "timing": timings,
        "protocol": {
            "task": "unlearn",
            "editor": cfg.editor._target_,
            "edit_mode": "sequential",  # the requests' edits accumulate: one model forgets them all
            "batch_size": cfg.batch_size,
            "seed": cfg.seed,
            "unlearn": OmegaConf.to_container(cfg.unlearn, resolve=True),
            "targets": target_sources,
            "n_requests": len(requests),
            "refusal_keywords": list(refusal_keywords(ucfg, data.refusals)),
            "dataset": {
                # one table per forget split (TOFU's forget01/05/10 are different tasks)
                "name": "-".join(filter(None, [data.name, data.info.get("forget_split")])),
                "size": cfg.dataset.get("size"),
                "source": data.source,
                "sha256": data.sha256,
                "splits": {s: len(v) for s, v in data.splits.items()},
                "roles": {
                    "forget": data.roles.forget,
                    "retain": data.roles.retain,
                    "utility": list(data.roles.utility),
                    "mia": [data.roles.mia_member, data.roles.mia_nonmember],
                },
                # SemEval: which MIA pair was used, and the metrics not computed with the reason why
                **{k: data.info[k] for k in ("mia", "skipped_metrics") if k in data.info},
            },
            "model": {"id": loaded.model_id, "revision": loaded.revision, "dtype": cfg.model.dtype},
            "reference_model": (
                {"id": reference.model_id, "revision": reference.revision} if reference is not None else None
            ),
            "environment": run_environment(),
        },
    }


def check_unlearn_dataset(cfg: DictConfig) -> None:
    """task=unlearn needs an unlearning dataset, and only it does (one line otherwise)."""
    kind = OmegaConf.get_type(cfg.dataset).__name__
    if kind != "UnlearningDatasetConfig":
        raise ValueError(
            f"task=unlearn needs an unlearning dataset (dataset={'|'.join(UNLEARNING_NAMES)}), got dataset={cfg.dataset.name}"
        )
