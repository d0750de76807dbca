"""Out-of-memory errors become one message naming the real config keys that lower the memory."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import get_class
from omegaconf import OmegaConf

from editors.memit import Memit
from editors.registry import CONFIG_SCHEMAS
from runner.oom import KNOBS, OutOfMemory, explain_oom, is_out_of_memory
from tests.conftest import compose_config

CUDA_OOM = (
    "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.10 GiB of which "
    "1.02 GiB is free. Of the allocated memory 75.31 GiB is allocated by PyTorch"
)


def _cfg(*overrides: str):
    return compose_config(
        "logger=none", "paths.cache_dir=/tmp/unused", "paths.output_dir=/tmp/unused", *overrides
    )


def test_every_knob_is_a_real_config_key():
    memit = _cfg("editor=memit")
    for knobs in KNOBS.values():
        for knob in knobs:
            assert OmegaConf.select(memit, knob.key, default="<missing>") != "<missing>", knob.key


@pytest.mark.parametrize("name", sorted(CONFIG_SCHEMAS))
def test_every_editors_memory_knobs_are_keys_of_its_config(name):
    cfg = _cfg(f"editor={name}")
    editor = get_class(cfg.editor._target_)
    for key, _what in editor.MEMORY_KNOBS:
        assert OmegaConf.select(cfg, key, default="<missing>") != "<missing>", f"{name}: {key}"


def test_gpu_oom_while_editing_names_the_batch_knobs_with_values():
    cfg = _cfg("editor=memit", "model=gpt-j")  # float32, no device_map, batch_size 10
    with pytest.raises(OutOfMemory) as caught:
        with explain_oom("edit", cfg, Memit.MEMORY_KNOBS):
            raise torch.cuda.OutOfMemoryError(CUDA_OOM)
    message = str(caught.value)
    assert "out of memory while computing the edit on the GPU (tried to allocate 2.00 GiB)" in message
    target = cfg.editor.target.batch_size
    for setting in (
        f"editor.target.batch_size={target // 2}",
        f"editor.read_batch_size={cfg.editor.read_batch_size // 2}",
        "batch_size=5",
        "model.dtype=bfloat16",
        "model.device_map=auto",
    ):
        assert setting in message
    assert caught.value.knobs[0].startswith("editor.target.batch_size=")
    assert "editor.batch_size" not in message  # MEMIT has no such key
    assert isinstance(caught.value.__cause__, torch.cuda.OutOfMemoryError)


def test_cpu_allocator_failure_while_scoring_names_eval_batch_size():
    cfg = _cfg("model=llama3")  # already bfloat16: not suggested again
    with pytest.raises(OutOfMemory) as caught:
        with explain_oom("eval", cfg):
            torch.empty(2**60, dtype=torch.uint8)  # a real allocation failure
    message = str(caught.value)
    assert "while scoring the probes on the CPU" in message
    assert f"eval.batch_size={cfg.eval.batch_size // 2}" in message
    assert "model.dtype" not in message and "model.device_map=auto" in message


def test_without_config_and_other_stages():
    with pytest.raises(OutOfMemory, match=r"stats\.batch_tokens=<smaller>") as caught:
        with explain_oom("stats"):
            raise RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 1024 bytes.")
    assert caught.value.stage == "stats"
    with pytest.raises(OutOfMemory, match=r"eval\.generation\.batch_size=16"):
        with explain_oom("generation", _cfg()):
            raise MemoryError()


def test_other_errors_pass_through_unchanged():
    error = RuntimeError("shape mismatch")
    with pytest.raises(RuntimeError) as caught:
        with explain_oom("edit"):
            raise error
    assert caught.value is error
    assert not is_out_of_memory(ValueError("out of memory"))  # only allocation errors
    assert is_out_of_memory(torch.cuda.OutOfMemoryError(CUDA_OOM))
