"""The batched scorer against a plain, unbatched forward pass done by hand."""

from __future__ import annotations

import math
import types

import pytest
import torch

from evaluation.cases import Probe
from evaluation.scoring import ProbeScore, score_probes, tokenize_answers

BOS = "<|begin_of_text|>"

PROBES = [
    Probe("The mother tongue of Danielle Darrieux is", "French", "English"),
    Probe("Paris", "Zanzibar Archipelago of the Indian Ocean", "Italy"),
    Probe("Toko Yasuda plays the instrument", "piano"),
    Probe("Barack Obama was born in the year", "1867", "1990"),
    Probe(
        "In 1907, Edwin of Northumbria moved to Spain. The headquarters of the Autonomous University "
        "of Madrid is in",
        "Birmingham",
        "Tokyo",
    ),
    Probe("The year is ", "1990", "1867"),  # prompt ending with a space: two spaces in the text
    Probe("Mount Everest is located in the country of", "Nepal"),
    Probe("Rome is a citizen of", "Japan, Georgia and the Kingdom of Spain", "Italy"),
]


def _llama_style_tokenizer(gpt2_tokenizer, trim_offsets: bool):
    """The tiny BPE with a LLaMA-3 style post-processor that prepends ``<|begin_of_text|>``."""
    from tokenizers import AddedToken, Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_str(gpt2_tokenizer.backend_tokenizer.to_str())
    tok.add_special_tokens([AddedToken(BOS, special=True)])
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=trim_offsets),
            processors.TemplateProcessing(
                single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
            ),
        ]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def llama_tokenizer(tiny_tokenizer):
    return _llama_style_tokenizer(tiny_tokenizer, trim_offsets=False)


@pytest.fixture(scope="module")
def llama_tokenizer_trimmed(tiny_tokenizer):
    return _llama_style_tokenizer(tiny_tokenizer, trim_offsets=True)


@pytest.fixture(scope="module")
def tiny_llama(llama_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    config = LlamaConfig(
        vocab_size=len(llama_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=llama_tokenizer.bos_token_id,
        eos_token_id=llama_tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    model.eval()
    return model


@pytest.fixture(params=["gpt2", "llama", "llama_trimmed_offsets"])
def model_and_tokenizer(request, tiny_gpt2, tiny_tokenizer):
    if request.param == "gpt2":
        return tiny_gpt2, tiny_tokenizer
    llama = request.getfixturevalue("tiny_llama")
    name = "llama_tokenizer" if request.param == "llama" else "llama_tokenizer_trimmed"
    return llama, request.getfixturevalue(name)


def hand_score(model, tokenizer, prompt: str, answer: str) -> tuple[float, float, bool, int]:
    """Reference: tokenise the prompt alone (special tokens included) to find where the answer
    starts, run ONE unbatched, unpadded forward pass, log_softmax and gather token by token."""
    prefix = tokenizer(prompt)["input_ids"]
    full = tokenizer(f"{prompt} {answer}")["input_ids"]
    assert full[: len(prefix)] == prefix, "prompt tokens must be a prefix of the full text's"
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([full])).logits[0].float()  # [T, V]
    logprobs = torch.log_softmax(logits, dim=-1)
    lps, hits = [], []
    for pos in range(len(prefix), len(full)):
        lps.append(logprobs[pos - 1, full[pos]].item())
        hits.append(int(logits[pos - 1].argmax().item() == full[pos]))
    return sum(lps) / len(lps), sum(hits) / len(hits), all(hits), len(lps)


def test_llama_style_tokenizer_prepends_bos(llama_tokenizer, tiny_tokenizer):
    ids = llama_tokenizer("Paris is")["input_ids"]
    assert ids[0] == llama_tokenizer.bos_token_id
    assert ids[1:] == tiny_tokenizer("Paris is")["input_ids"]
    assert tiny_tokenizer("Paris is")["input_ids"][0] != llama_tokenizer.bos_token_id


def test_scores_match_unbatched_hand_computation(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    scores = score_probes(model, tokenizer, PROBES, batch_size=4)
    assert len(scores) == len(PROBES)
    for probe, score in zip(PROBES, scores):
        assert isinstance(score, ProbeScore)
        lp, acc, exact, n = hand_score(model, tokenizer, probe.prompt, probe.target)
        assert score.n_target_tokens == n
        assert score.target_logprob == pytest.approx(lp, abs=1e-5)
        assert score.target_token_acc == pytest.approx(acc)
        assert score.target_exact == exact
        if probe.foil is None:
            assert score.foil_logprob is None
        else:
            foil_lp, *_ = hand_score(model, tokenizer, probe.prompt, probe.foil)
            assert score.foil_logprob == pytest.approx(foil_lp, abs=1e-5)


def test_answer_tokens_are_the_tokens_of_space_plus_answer(tiny_tokenizer):
    pairs = [(p.prompt, p.target) for p in PROBES if not p.prompt.endswith(" ")]
    for (_, answer), tok in zip(pairs, tokenize_answers(tiny_tokenizer, pairs)):
        answer_ids = [i for i, m in zip(tok.input_ids, tok.answer_mask) if m]
        assert answer_ids == tiny_tokenizer(" " + answer)["input_ids"]
        # the answer tokens are the contiguous tail of the sequence
        assert tok.answer_mask == sorted(tok.answer_mask)


def _assert_same_score(together, alone) -> None:
    """A probe scored in a batch gives what it gives alone (up to float rounding)."""
    assert together.n_target_tokens == alone.n_target_tokens
    assert together.target_logprob == pytest.approx(alone.target_logprob, abs=1e-5)
    assert together.target_token_acc == pytest.approx(alone.target_token_acc)
    assert together.target_exact == alone.target_exact
    assert (together.foil_logprob is None) == (alone.foil_logprob is None)
    if alone.foil_logprob is not None:
        assert together.foil_logprob == pytest.approx(alone.foil_logprob, abs=1e-5)


def test_batched_equals_unbatched_and_order_is_preserved(tiny_llama, llama_tokenizer):
    # many lengths, deliberately not sorted, so sorting and bucketing reorders them internally
    probes = [Probe(p.prompt, p.target, p.foil) for p in PROBES] + [
        Probe("Rome", "Italy", "Spain"),
        Probe("The official religion of Marie Curie, who was born in the year 1867, is", "Islam"),
    ]
    one_by_one = [score_probes(tiny_llama, llama_tokenizer, [p], batch_size=1)[0] for p in probes]
    for batch_size in (1, 3, 64):
        batched = score_probes(tiny_llama, llama_tokenizer, probes, batch_size=batch_size)
        for alone, together in zip(one_by_one, batched):
            _assert_same_score(together, alone)
    # distinct probes really get distinct scores (no accidental broadcast of one row)
    assert len({round(s.target_logprob, 6) for s in one_by_one}) == len(probes)


class _OracleLM(torch.nn.Module):
    """Puts logit ``margin`` on the NEXT input token at every position: argmax is always right."""

    def __init__(self, vocab_size: int, margin: float = 10.0, shift: int = 1):
        super().__init__()
        self.vocab_size, self.margin, self.shift = vocab_size, margin, shift
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None, **kwargs):
        nxt = torch.roll(input_ids, -self.shift, dims=1)
        logits = self.margin * torch.nn.functional.one_hot(nxt, self.vocab_size).float()
        return types.SimpleNamespace(logits=logits)


def test_token_accuracy_and_alignment_with_an_oracle(tiny_tokenizer, llama_tokenizer):
    for tokenizer in (tiny_tokenizer, llama_tokenizer):
        vocab = len(tokenizer)
        expected_lp = 10.0 - math.log(math.exp(10.0) + vocab - 1)
        scores = score_probes(_OracleLM(vocab), tokenizer, PROBES, batch_size=3)
        for score in scores:
            assert score.target_exact and score.target_token_acc == 1.0
            assert score.target_logprob == pytest.approx(expected_lp, abs=1e-5)
        # off by one (predicts the current token): no answer token is the argmax, except repeats
        lagged = score_probes(_OracleLM(vocab, shift=0), tokenizer, [PROBES[0]])[0]
        assert lagged.target_token_acc == 0.0 and not lagged.target_exact


def test_model_mode_restored_and_dropout_off(tiny_gpt2, tiny_tokenizer):
    expected = score_probes(tiny_gpt2, tiny_tokenizer, PROBES[:3])
    tiny_gpt2.train()
    try:
        got = score_probes(tiny_gpt2, tiny_tokenizer, PROBES[:3])
        assert tiny_gpt2.training
    finally:
        tiny_gpt2.eval()
    assert [s.target_logprob for s in got] == pytest.approx([s.target_logprob for s in expected])


def test_empty_inputs_and_errors(tiny_gpt2, tiny_tokenizer, llama_tokenizer):
    assert score_probes(tiny_gpt2, tiny_tokenizer, []) == []
    with pytest.raises(ValueError, match="empty answer"):
        score_probes(tiny_gpt2, tiny_tokenizer, [Probe("Paris is in", "  ")])
    with pytest.raises(ValueError, match="position 0"):
        tokenize_answers(tiny_tokenizer, [("", "Paris")])  # no BOS: nothing to condition on
    # with a BOS the answer is predicted from it
    (tok,) = tokenize_answers(llama_tokenizer, [("", "Paris")])
    assert tok.input_ids[0] == llama_tokenizer.bos_token_id and not tok.answer_mask[0]
    with pytest.raises(TypeError, match="fast"):
        tokenize_answers(types.SimpleNamespace(is_fast=False), [("a", "b")])
    with pytest.raises(ValueError, match="batch_size"):
        score_probes(tiny_gpt2, tiny_tokenizer, PROBES[:1], batch_size=0)


@pytest.mark.parametrize("arch", ["gpt2", "gptj", "llama"])
def test_packed_target_and_foil_equal_one_sequence_per_pass(arch):
    """Batched scoring packs a probe's target and foil into one row (shared prompt, 4-D mask when
    both continue past one token) and feeds no token after the last answer token: the scores are
    those of one plain sequence per forward pass."""
    from evaluation.scoring import _causal_lm, _score_tokenized
    from tests.editing_fixtures import model, tokenizer

    tok = tokenizer(arch)
    net = model(arch, tok, init=0.5)
    assert _causal_lm(net)
    probes = PROBES + [
        Probe("Rome is a citizen of", "the Kingdom of Spain", "the Republic of Italy"),
        Probe("Marie Curie works in the field of", "physics", "Christianity and Islam"),
    ]
    alone = score_probes(net, tok, probes, batch_size=1)
    for batch_size in (2, 5, 64):
        together = score_probes(net, tok, probes, batch_size=batch_size)
        for a, b in zip(alone, together):
            _assert_same_score(b, a)
    # the multi-token pairs really were packed with a branched mask
    pairs = [(p.prompt, a) for p in probes[-2:] for a in (p.target, p.foil)]
    seqs = tokenize_answers(tok, pairs)
    from evaluation.scoring import _row

    assert _row([0, 1], seqs, causal=True).branched
    assert len(_score_tokenized(net, tok, seqs, 4, False, [(0, 1), (2, 3)])) == 4
