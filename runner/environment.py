"""What a run's numbers depend on besides its config: library versions, threads, CPU kernels.

Recorded in every ``summary.json`` (``protocol.environment``); the toy model's cache key holds the
subset that its trained weights depend on (:func:`training_environment`).
"""

from __future__ import annotations

import platform
import sys
from importlib import metadata
from pathlib import Path

import torch

PACKAGES = ("torch", "transformers", "tokenizers", "numpy", "hydra-core")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def cpu_capability() -> str:
    """The SIMD level torch's CPU kernels were dispatched to (``AVX2``, ``AVX512``, ...)."""
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except AttributeError:  # older torch
        return "unknown"


def cpu_model() -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def training_environment(device: torch.device | str) -> dict[str, str | None]:
    """What locally trained weights depend on beyond data, settings and seed: the kernels
    (library versions, the device kind and the CPU's SIMD level). Training itself runs on one
    thread with deterministic algorithms, so the thread count is not part of it."""
    device = torch.device(device)
    env: dict[str, str | None] = {
        "torch": torch.__version__.split("+")[0],
        "transformers": _version("transformers"),
        "tokenizers": _version("tokenizers"),
        "device": device.type,
    }
    if device.type == "cpu":
        env["cpu_capability"] = cpu_capability()
    else:
        env["accelerator"] = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return env


def run_environment() -> dict[str, object]:
    """Everything recorded in ``protocol.environment``."""
    return {
        "python": platform.python_version(),
        "implementation": sys.implementation.name,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "packages": {name: _version(name) for name in PACKAGES},
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": cpu_capability(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
