"""One training loop with pluggable losses, for every method that trains parameters.

- :mod:`editors.training.losses`: the answer batch and its NLL (FT-L's "prompt_last" objective and
  the teacher-forced answer NLL), a locality KL, and SSS's gradient-norm term with its mixing rule.
- :mod:`editors.training.loop`: :func:`fit`, the loop: an optimiser over named parameters, a loss
  callable per batch, an optional loss floor (no step below it, stop when an epoch's mean is below
  it), gradient accumulation and clipping, a hook after each step (FT-L's L∞ clamp), periodic
  validation with early stopping and the best state kept, and a progress bar.

FT / FT-L / F-Learning (editors/finetune.py) train on it; MEND's hypernetwork, SERAC's classifier
and counterfactual model and the unlearning baselines are meant to as well.
"""

from editors.training.loop import FitReport, LoopConfig, fit
from editors.training.losses import (
    OBJECTIVES,
    SSS_REDUCTIONS,
    AnswerBatch,
    answer_batch,
    answer_logits,
    answer_nll,
    batch_nll,
    ga_loss,
    kl_divergence,
    mix_sss,
    npo_loss,
    read_answer_logits,
    sss_term,
)

__all__ = [
    "OBJECTIVES",
    "SSS_REDUCTIONS",
    "AnswerBatch",
    "FitReport",
    "LoopConfig",
    "answer_batch",
    "answer_logits",
    "answer_nll",
    "batch_nll",
    "fit",
    "ga_loss",
    "kl_divergence",
    "mix_sss",
    "npo_loss",
    "read_answer_logits",
    "sss_term",
]
