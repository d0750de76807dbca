"""Hook context managers and the subject-last-token lookup."""

from __future__ import annotations

import pytest
import torch

from editors.core.tokens import encode
from editors.hooks import edit_outputs, get_module, record
from tests.editing_fixtures import SPECS, model, tokenizer


@pytest.fixture(scope="module")
def gptj():
    tok = tokenizer("gptj")
    return tok, model("gptj", tok)


def _hook_count(net):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in net.modules())


def test_record_reads_inputs_and_tuple_outputs(gptj):
    tok, net = gptj
    block, mlp_out = SPECS["gptj"].layer_name(1), SPECS["gptj"].mlp_out_name(1)
    ids = torch.tensor([tok("Paris is the capital of")["input_ids"]])
    net(ids, output_hidden_states=True)  # transformers may add hooks of its own: count after it
    hooks = _hook_count(net)
    with record(net, [block, mlp_out], inputs=True, outputs=True) as rec:
        assert _hook_count(net) > hooks
        out = net(ids, output_hidden_states=True)
    # GPT-J blocks return tuples; the recording holds the hidden-state tensor.
    torch.testing.assert_close(rec.outputs[block], out.hidden_states[2])
    assert rec.inputs[mlp_out].shape[-1] == get_module(net, mlp_out).in_features
    assert _hook_count(net) == hooks


def test_edit_outputs_changes_the_forward_and_is_removed_even_on_error(gptj):
    tok, net = gptj
    block = SPECS["gptj"].layer_name(0)
    ids = torch.tensor([tok("Paris is the capital of")["input_ids"]])
    base = net(ids).logits
    hooks = _hook_count(net)
    with edit_outputs(net, {block: lambda h: h + 1.0}):
        edited = net(ids).logits
    assert not torch.allclose(base, edited)
    with pytest.raises(RuntimeError, match="boom"), edit_outputs(net, {block: lambda h: h}):
        raise RuntimeError("boom")
    assert _hook_count(net) == hooks
    torch.testing.assert_close(net(ids).logits, base)


def test_record_works_with_keyword_inputs():
    layer = torch.nn.Linear(3, 2)

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = layer

        def forward(self, x):
            return self.inner(input=x)

    net = Wrapper()
    x = torch.randn(4, 3)
    with record(net, ["inner"], inputs=True) as rec:
        net(x)
    torch.testing.assert_close(rec.inputs["inner"], x)


def test_unknown_module_names_the_template():
    net = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="no module 'transformer.h.0.mlp'"):
        get_module(net, "transformer.h.0.mlp")


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_subject_last_token(arch):
    tok = tokenizer(arch)
    templates = ["The mother tongue of {} is", "{} is located in", "Where is {}?"]
    subjects = ["Danielle Darrieux", "Paris", "Mount Everest"]
    enc = encode(tok, templates, subjects)
    has_bos = arch == "llama"
    for row, (template, subject) in enumerate(zip(templates, subjects)):
        ids = enc.input_ids[row, : enc.lengths[row]].tolist()
        idx = int(enc.subject_last[row])
        assert (ids[0] == tok.bos_token_id) == has_bos
        upto = tok.decode(ids[: idx + 1], skip_special_tokens=True)
        prefix = template[: template.index("{}")]
        assert upto == prefix + subject, (upto, prefix + subject)


def test_subject_not_in_prompt_is_a_clear_error():
    tok = tokenizer("gpt2")
    with pytest.raises(ValueError, match="no '\\{\\}'"):
        encode(tok, ["Paris is in"], ["Paris"])


def test_right_pad_fills_ids_and_mask_to_the_longest_row():
    from editors.core.tokens import right_pad

    ids, mask = right_pad([[5, 6, 7], [8], []], pad=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0], [0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0]]
    assert ids.dtype == mask.dtype == torch.long
