"""Target vectors: the hidden value each edit should produce, optimised for a batch at once.

For request i a perturbation δ_i is added to the output of one or more *sites* (modules: the
block output for MEMIT, the MLP output for ROME, MLP and attention outputs for PMET) at the
subject's last token of every prompt of that request. δ_i minimises

    NLL(answer | rewriting prompts) + kl_factor · KL(p_δ ‖ p_0 on "{subject} is a") + wd · ‖δ_i‖ / ‖h_i‖²

where h_i is the site's original output at the subject's last token of the plain prompt.
All requests of a batch share the forward passes of a step (their rows grouped by length, so
that padding stays small); each request keeps its own early stop (loss < ``loss_stop``) and its
own norm clamp (‖δ_i‖ ≤ clamp_norm_factor · ‖h_i‖), so the result equals optimising every
request alone with the reference loop (up to float rounding).

Each step computes only what the result needs: the rows of requests that have stopped are no
longer run, the tokens before the subject's last token (context template and prompt prefix,
which δ cannot change) are run once per batch and kept as a key/value cache
(``editors.core.rows``, ``reuse_prefix``), and the output embedding is applied only at the
positions the loss reads (``editors.core.logits``). The optimised δ stays in float32 whatever the
model's dtype; it is cast to the activations' dtype where it is added.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from editors.core.context import flatten
from editors.core.logits import logits_at
from editors.core.rows import RowFeed
from editors.core.tokens import answer_ids, encode, model_device
from editors.hooks import edit_outputs
from editors.requests import EditRequest

KL_PROMPT = "{} is a"
#: TargetConfig fields that change how fast, not what, is computed (left out of cache keys).
SPEED_ONLY = ("batch_size", "reuse_prefix")


@dataclass
class TargetConfig:
    """Hyperparameters of the target-vector optimisation (reference names in comments)."""

    steps: int = 25  # v_num_grad_steps: iterations (loss evaluations)
    # Adam steps at most; null: steps − 1 (the reference loops break before stepping at their last
    # iteration). At most ``steps``; iteration ``updates`` only evaluates the loss.
    updates: int | None = None
    lr: float = 0.5  # v_lr: Adam learning rate
    kl_factor: float = 0.0625  # kl_factor: weight of the KL term on "{subject} is a"
    weight_decay: float = 0.5  # v_weight_decay: weight of ‖δ‖/‖h‖² (numerator not squared)
    clamp_norm_factor: float = 0.75  # clamp_norm_factor: ‖δ‖ ≤ factor · ‖h‖ after each step
    loss_stop: float = 0.05  # stop a request once its loss is below this
    nll_weight: float = 1.0  # nll_loss_factor (PMET): weight of the NLL term
    adaptive_nll: bool = False  # PMET: once every answer token is the argmax, weigh the NLL 0.1× next step
    kl_stop: float = 0.01  # PMET: ...and stop when the KL (see kl_stop_weighted) is at most this
    # the KL that rule reads: kl_factor · KL (xpq-tech/PMET and ekgus9/COME: `kl_loss <= 0.01`) |
    # false: KL itself (xpq-tech/BLUE's PMET: `kl_loss / kl_factor < 0.01`); equal for kl_factor 1
    kl_stop_weighted: bool = True
    batch_size: int = 32  # requests optimised together in one forward pass per step (not in cache keys)
    reuse_prefix: bool = True  # run what precedes the subject once, not every step (not in cache keys)


@dataclass
class Targets:
    """Per-request results, rows in request order. ``delta[site]`` and ``init[site]`` are [N, d]."""

    delta: dict[str, torch.Tensor]
    init: dict[str, torch.Tensor]
    steps: torch.Tensor  # [N] Adam steps taken
    loss: torch.Tensor  # [N] loss at the last evaluated iteration
    nll: torch.Tensor  # [N] NLL part of that loss

    def value(self, site: str) -> torch.Tensor:
        """h + δ for ``site``: the target value z."""
        return self.init[site] + self.delta[site]


def optimize_targets(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    sites: Sequence[str],
    context_groups: Sequence[Sequence[str]],
    cfg: TargetConfig,
    answers: Sequence[str] | None = None,
    progress: bool = False,
    norm_lengths: Sequence[int] | None = None,
) -> Targets:
    """Optimise δ at ``sites`` for every request; ``answers`` default to ``" " + target_new``.

    ``norm_lengths`` replaces the per-request answer length that normalises the NLL (CoME's
    released code divides the old-object NLL by the length of the *new* object).
    """
    if answers is None:
        answers = new_answers(requests)
    chunks = []
    starts = range(0, len(requests), max(cfg.batch_size, 1))
    for start in tqdm(starts, desc="target vectors", disable=not progress or len(starts) < 2):
        stop = start + cfg.batch_size
        lengths = None if norm_lengths is None else norm_lengths[start:stop]
        chunks.append(
            _optimize_batch(
                model,
                tokenizer,
                requests[start:stop],
                answers[start:stop],
                sites,
                context_groups,
                cfg,
                lengths,
            )
        )
    return Targets(
        delta={s: torch.cat([c.delta[s] for c in chunks]) for s in sites},
        init={s: torch.cat([c.init[s] for c in chunks]) for s in sites},
        steps=torch.cat([c.steps for c in chunks]),
        loss=torch.cat([c.loss for c in chunks]),
        nll=torch.cat([c.nll for c in chunks]),
    )


def new_answers(requests: Sequence[EditRequest]) -> list[str]:
    """The reference prepends a space to target_new (only to it)."""
    return [" " + r.target_new.lstrip() for r in requests]


def _optimize_batch(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    answers: Sequence[str],
    sites: Sequence[str],
    context_groups: Sequence[Sequence[str]],
    cfg: TargetConfig,
    norm_lengths: Sequence[int] | None,
) -> Targets:
    """One batch of requests (see the module docstring).

    Work per step is kept to what the result needs: only the rows of requests still being
    optimised are run (a request that stopped early costs nothing more), the tokens before the
    subject's last token are run once (``RowFeed``), and the output embedding is applied only at
    the positions the loss reads (``logits_at``).
    """
    device = model_device(model)
    templates = flatten(context_groups)
    n_req, n_tmpl = len(requests), len(templates)

    # Rows: for each request, one rewriting prompt per context template (teacher-forced answer
    # prefix appended as token ids), then its KL prompt. Row r belongs to request owner[r].
    texts, subjects, suffixes, targets = [], [], [], []
    for request, answer in zip(requests, answers):
        ids = answer_ids(tokenizer, answer)
        for template in templates:
            texts.append(template.replace("{}", request.prompt, 1))
            subjects.append(request.subject)
            suffixes.append(ids[:-1])
            targets.append(ids)
        # (without a subject there is no "{subject} is a": the row is the prompt, its KL weighed 0)
        texts.append(KL_PROMPT if request.subject is not None else request.prompt)
        subjects.append(request.subject)
        suffixes.append([])
        targets.append([])
    enc = encode(tokenizer, texts, subjects, suffixes)
    has_kl = torch.tensor([r.subject is not None for r in requests], dtype=torch.float32, device=device)
    rows_per_req = n_tmpl + 1
    owner = torch.arange(n_req).repeat_interleave(rows_per_req)  # [R] (CPU, like all row bookkeeping)
    plain_rows = torch.arange(n_req) * rows_per_req  # template "{}" comes first
    lookup = enc.subject_last

    # What the loss reads ("picks"): the logits at position p predict token p+1, so the T answer
    # tokens of a rewriting row are predicted from positions len-T .. len-1; a KL row is read at
    # the subject's last token (gold -1).
    pick_row, pick_col, pick_gold = [], [], []
    row_norm = torch.ones(len(texts))
    for row, ids in enumerate(targets):
        if ids:
            end = int(enc.lengths[row])
            pick_row += [row] * len(ids)
            pick_col += range(end - len(ids), end)
            pick_gold += ids
            row_norm[row] = len(ids) if norm_lengths is None else norm_lengths[int(owner[row])]
        else:
            pick_row.append(row)
            pick_col.append(int(lookup[row]))
            pick_gold.append(-1)
    pick_row_t, pick_col_t = torch.tensor(pick_row), torch.tensor(pick_col)
    pick_gold_t = torch.tensor(pick_gold)
    feed = RowFeed(model, enc, lookup, cfg.reuse_prefix)

    # Every site (block, MLP or attention output) writes to the residual stream: width d.
    d_model = model.get_input_embeddings().embedding_dim
    deltas = {s: torch.zeros(n_req, d_model, device=device, requires_grad=True) for s in sites}
    init = {s: torch.zeros(n_req, d_model, device=device) for s in sites}  # filled at the first step
    is_plain = torch.zeros(len(texts), dtype=torch.bool)
    is_plain[plain_rows] = True

    def run(rows: torch.Tensor, first: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One forward pass over ``rows``: per request, its NLL summed over these rows (over
        n_tmpl) and the number of answer tokens that are not the argmax; the KL rows' log-probs."""
        step = feed.step(rows)
        local = torch.full((len(texts),), -1, dtype=torch.long)
        local[rows] = torch.arange(len(rows))
        keep = local[pick_row_t] >= 0
        p_rows, p_gold = pick_row_t[keep], pick_gold_t[keep]
        p_cols = pick_col_t[keep] - step.shift[local[p_rows]]
        row_owner = owner[rows].to(device)
        cols = step.edit_cols
        where = torch.arange(len(rows), device=device)
        plain = is_plain[rows].to(device)

        def make_edit(site: str):
            def edit(out: torch.Tensor) -> torch.Tensor:
                # (with a model dispatched over several devices, the site may not be on `device`)
                at, col, on_plain = where.to(out.device), cols.to(out.device), plain.to(out.device)
                if first:
                    init[site][row_owner[plain]] = (
                        out[at[on_plain], col[on_plain]].detach().float().to(device)
                    )
                out = out.clone()
                out[at, col] = out[at, col] + deltas[site][row_owner].to(device=out.device, dtype=out.dtype)
                return out

            return edit

        with edit_outputs(model, {s: make_edit(s) for s in sites}):
            with logits_at(model, local[p_rows].to(device), p_cols.to(device)) as chosen:
                out = model(**step.kwargs)
        log_probs = torch.log_softmax(chosen.select(out.logits).float(), dim=-1)  # [P, V]
        is_kl = (p_gold < 0).to(device)
        gold = p_gold.clamp(min=0).to(device)
        pick_owner = owner[p_rows].to(device)
        token_lp = log_probs.gather(1, gold[:, None]).squeeze(1).masked_fill(is_kl, 0.0)
        token_nll = -token_lp / row_norm[p_rows].to(device) / n_tmpl
        nll = torch.zeros(n_req, device=device).index_add(0, pick_owner, token_nll)
        wrong = ((log_probs.argmax(-1) != gold) & ~is_kl).float()
        n_wrong = torch.zeros(n_req, device=device).index_add(0, pick_owner, wrong)
        return nll, n_wrong, log_probs[is_kl], pick_owner[is_kl]

    optimizer = torch.optim.Adam(list(deltas.values()), lr=cfg.lr)
    active = torch.ones(n_req, dtype=torch.bool, device=device)
    steps = torch.zeros(n_req, dtype=torch.long)
    kl_init = torch.zeros(0)
    last_loss = torch.zeros(n_req, device=device)
    last_nll = torch.zeros(n_req, device=device)
    nll_weight = torch.full((n_req,), cfg.nll_weight, device=device)
    requires_grad = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    updates = cfg.steps - 1 if cfg.updates is None else min(cfg.updates, cfg.steps)
    try:
        for it in range(cfg.steps):
            # The rows of the requests still being optimised, in groups of similar length.
            evaluated = active.clone()
            rows = evaluated.cpu()[owner].nonzero()[:, 0]
            nll = n_wrong = torch.zeros(n_req, device=device)
            kl_parts, kl_owners = [], []
            for group in feed.plan(rows):
                part_nll, part_wrong, part_kl, part_owner = run(group, first=it == 0)
                nll, n_wrong = nll + part_nll, n_wrong + part_wrong
                kl_parts.append(part_kl)
                kl_owners.append(part_owner)
            kl_req = torch.cat(kl_owners)
            kl_lp = torch.cat(kl_parts)
            if it == 0:  # every request is evaluated at the first step
                kl_init = torch.zeros_like(kl_lp).index_copy(0, kl_req, kl_lp.detach())
            kl_raw = torch.zeros(n_req, device=device).index_put(
                (kl_req,), (kl_lp.exp() * (kl_lp - kl_init[kl_req])).sum(-1)
            )
            kl_raw = kl_raw * has_kl
            kl = cfg.kl_factor * kl_raw

            wd = sum(
                cfg.weight_decay * deltas[s].norm(dim=1) / init[s].norm(dim=1).pow(2).clamp(min=1e-12)
                for s in sites
            )
            loss = nll_weight * nll + kl + wd
            if cfg.adaptive_nll:
                # PMET: "prob == maxprob", i.e. every answer token of every prompt is the argmax.
                solved = evaluated & (n_wrong == 0)
                kl_read = kl if cfg.kl_stop_weighted else kl_raw
                active &= ~(solved & (kl_read.detach() <= cfg.kl_stop))
                nll_weight = torch.where(
                    evaluated,
                    torch.where(solved, 0.1 * cfg.nll_weight, cfg.nll_weight),
                    nll_weight,
                )
            active &= loss.detach() >= cfg.loss_stop
            last_loss = torch.where(evaluated, loss.detach(), last_loss)
            last_nll = torch.where(evaluated, nll.detach(), last_nll)
            if it == updates or not bool(active.any()):  # no Adam step after iteration `updates`
                break
            frozen = {s: d.detach().clone() for s, d in deltas.items()}
            optimizer.zero_grad()
            loss[active].sum().backward()  # each request's loss depends on its own δ only
            optimizer.step()
            with torch.no_grad():
                for s, d in deltas.items():
                    d[~active] = frozen[s][~active]
                    limit = cfg.clamp_norm_factor * init[s].norm(dim=1, keepdim=True)
                    norm = d.norm(dim=1, keepdim=True)
                    d.mul_(torch.where(norm > limit, limit / norm.clamp(min=1e-12), torch.ones_like(norm)))
            steps += active.cpu().long()
    finally:
        for p, flag in zip(model.parameters(), requires_grad):
            p.requires_grad_(flag)
    return Targets(
        delta={s: d.detach() for s, d in deltas.items()},
        init=init,
        steps=steps,
        loss=last_loss.cpu(),
        nll=last_nll.cpu(),
    )


class TargetCache:
    """Target vectors on disk, one file per request, named by a hash of everything that shapes
    them: model, sites, optimisation settings (not the batch size or ``reuse_prefix``), context templates, the
    request, the answer, and the model's state (the editor's history of kept edits in sequential
    mode, ``EditorBase.history_state``; empty for the unedited model).
    Settings that only act after the optimisation (CoME's α and p) are not part of the key, so a
    sweep over them reuses the vectors.
    """

    def __init__(self, directory: Path | str, model_id: str) -> None:
        self.dir = Path(directory)
        self.model_id = model_id
        self.hits = 0
        self.misses = 0

    def key(self, payload: dict, state: str = "") -> str:
        blob = json.dumps({"model": self.model_id, "state": state, **payload}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()

    def path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.pt"

    def load(self, key: str) -> dict | None:
        path = self.path(key)
        if not path.exists():
            return None
        return torch.load(path, map_location="cpu", weights_only=True)

    def save(self, key: str, entry: dict) -> None:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(entry, tmp)
        tmp.replace(path)


def cache_settings(cfg: TargetConfig) -> dict:
    """The settings that go into a cache key: every field but the speed-only ones, and the fields
    added after cache files were written only where they change the result from the earlier
    behaviour (so the earlier files stay valid, and are not reused where they no longer apply):
    ``updates`` unless null; ``kl_stop_weighted`` (earlier: the unweighted KL) only when the
    adaptive stop rule runs with a kl_factor other than 1."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in SPEED_ONLY}
    if settings["updates"] is None:
        del settings["updates"]
    if not (cfg.kl_stop_weighted and cfg.adaptive_nll and cfg.kl_factor != 1):
        del settings["kl_stop_weighted"]
    return settings


def cached_targets(
    cache: TargetCache | None,
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    sites: Sequence[str],
    context_groups: Sequence[Sequence[str]],
    cfg: TargetConfig,
    answers: Sequence[str] | None = None,
    norm_lengths: Sequence[int] | None = None,
    progress: bool = False,
    state: str = "",
) -> Targets:
    """:func:`optimize_targets`, reading and writing ``cache`` per request when one is given;
    ``state`` names the edits the model already holds (see :class:`TargetCache`)."""
    if answers is None:
        answers = new_answers(requests)
    if cache is None:
        return optimize_targets(
            model, tokenizer, requests, sites, context_groups, cfg, answers, progress, norm_lengths
        )
    settings = cache_settings(cfg)
    keys = [
        cache.key(
            {
                "sites": list(sites),
                "settings": settings,
                "context": [list(g) for g in context_groups],
                "prompt": r.prompt,
                "subject": r.subject,
                "answer": answer,
                "norm_length": None if norm_lengths is None else int(norm_lengths[i]),
            },
            state,
        )
        for i, (r, answer) in enumerate(zip(requests, answers))
    ]
    entries = [cache.load(k) for k in keys]
    todo = [i for i, e in enumerate(entries) if e is None]
    cache.hits += len(requests) - len(todo)
    cache.misses += len(todo)
    if todo:
        fresh = optimize_targets(
            model,
            tokenizer,
            [requests[i] for i in todo],
            sites,
            context_groups,
            cfg,
            [answers[i] for i in todo],
            progress,
            None if norm_lengths is None else [norm_lengths[i] for i in todo],
        )
        for j, i in enumerate(todo):
            entries[i] = {
                "delta": {s: fresh.delta[s][j].cpu() for s in sites},
                "init": {s: fresh.init[s][j].cpu() for s in sites},
                "steps": int(fresh.steps[j]),
                "loss": float(fresh.loss[j]),
                "nll": float(fresh.nll[j]),
            }
            cache.save(keys[i], entries[i])
    device = model_device(model)
    return Targets(
        delta={s: torch.stack([e["delta"][s] for e in entries]).to(device) for s in sites},
        init={s: torch.stack([e["init"][s] for e in entries]).to(device) for s in sites},
        steps=torch.tensor([e["steps"] for e in entries]),
        loss=torch.tensor([e["loss"] for e in entries]),
        nll=torch.tensor([e["nll"] for e in entries]),
    )
