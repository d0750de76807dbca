"""Shared test fixtures: a tiny byte-level BPE tokenizer trained locally, a tiny random GPT-2, and
the project's Hydra config (``compose_config``, the ``hydra_conf`` fixture).

Nothing is downloaded. Both fixtures are session-scoped; treat them as read-only (a test that
edits the model's weights must work on a copy, e.g. ``copy.deepcopy(tiny_gpt2)``).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

# Tiny models run fastest on one thread; with two, thread start-up dominates (and collapses when
# the cores are shared).
torch.set_num_threads(1)

EOS = "<|endoftext|>"
ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


@contextlib.contextmanager
def project_config() -> Iterator[None]:
    """Hydra initialised on the project's ``conf/`` with the schemas registered: ``compose`` works
    inside the block; Hydra's global state is cleared before and after."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from runner.schema import register

    register()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            yield
    finally:
        GlobalHydra.instance().clear()


def compose_config(*overrides: str, return_hydra_config: bool = False):
    """The run config composed from ``conf/config.yaml`` with ``overrides``, as run.py would."""
    from hydra import compose

    with project_config():
        return compose("config", overrides=list(overrides), return_hydra_config=return_hydra_config)


@pytest.fixture
def hydra_conf():
    """Compose freely inside the test (``hydra.compose("config", ...)``)."""
    with project_config():
        yield


_SUBJECTS = [
    "Danielle Darrieux",
    "Edwin of Northumbria",
    "Toko Yasuda",
    "Autonomous University of Madrid",
    "Thomas Joannes Stieltjes",
    "Anaal Nathrakh",
    "Apple A5",
    "Dimitri Amilakhvari",
    "Paris",
    "Michael Jordan",
    "the Eiffel Tower",
    "Rome",
    "Barack Obama",
    "Marie Curie",
    "Mount Everest",
]
_RELATIONS = [
    "The mother tongue of {} is",
    "{} is located in the country of",
    "{} plays the instrument",
    "{} was born in the year",
    "The official religion of {} is",
    "{} works in the field of",
    "{} is a citizen of",
    "The headquarters of {} is in",
    "{} was created by",
]
_OBJECTS = [
    "French",
    "English",
    "Christianity",
    "Spain",
    "Dutch",
    "Birmingham",
    "Apple",
    "Georgia",
    "piano",
    "guitar",
    "physics",
    "Italy",
    "Japan",
    "Islam",
    "1990",
    "1867",
    "Tokyo",
    "Nepal",
]


def make_corpus(n: int = 400, seed: int = 0) -> list[str]:
    """A few hundred fact-like English sentences (CounterFact style), deterministic."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        sentence = rng.choice(_RELATIONS).format(rng.choice(_SUBJECTS)) + " " + rng.choice(_OBJECTS) + "."
        out.append(sentence)
    out += [f"In {y}, {s} moved to {o}." for y, s, o in zip(range(1900, 2000, 7), _SUBJECTS, _OBJECTS)]
    return out


@pytest.fixture(scope="session")
def tiny_corpus() -> list[str]:
    return make_corpus()


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_corpus):
    """GPT-2 style fast tokenizer: byte-level BPE, no BOS added, ``<|endoftext|>`` as bos/eos/unk,
    pad token unset (as in GPT-2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tiny_corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS)


@pytest.fixture(scope="session")
def tiny_gpt2(tiny_tokenizer):
    """A tiny randomly initialised GPT-2 (2 layers, width 32) in eval mode, on CPU, fp32."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tiny_tokenizer),
        n_positions=128,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=tiny_tokenizer.eos_token_id,
        eos_token_id=tiny_tokenizer.eos_token_id,
    )
    model = GPT2LMHeadModel(config)
    model.eval()
    return model


@pytest.fixture(scope="module", params=("gpt2", "gptj", "llama"))
def edit_setup(request, tmp_path_factory):
    """(arch, tokenizer, tiny random model, covariance statistics) for each architecture."""
    from editors.core.covariance import SecondMoments, StatsConfig
    from tests.editing_fixtures import model, tokenizer

    arch = request.param
    tok = tokenizer(arch)
    net = model(arch, tok)
    stats = SecondMoments(
        net,
        tok,
        f"tiny-{arch}",
        StatsConfig(n_samples=200),
        make_corpus,
        tmp_path_factory.mktemp("stats"),
        progress=False,
    )
    return arch, tok, net, stats
