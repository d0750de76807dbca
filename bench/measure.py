"""Wall time and peak memory of a callable.

Memory: on a GPU, ``torch.cuda.max_memory_allocated`` (reset before the call; the model's own
weights are included, and the increase over the start is reported too). On the CPU the resident
set size (RSS) is sampled every few milliseconds by a thread while the call runs (Linux
``/proc/self/statm``), since ``tracemalloc`` does not see PyTorch's allocations; freed heap is
handed back to the OS first (glibc ``malloc_trim``) so that each call's increase is its own.
Elsewhere the process-wide ``ru_maxrss`` is reported (not per call).
"""

from __future__ import annotations

import gc
import os
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

MIB = 1024 * 1024


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm", encoding="ascii") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _release_freed_memory() -> None:
    """Give memory freed by earlier calls back to the OS (glibc), so that an RSS increase measured
    next is the call's own and not hidden by memory the allocator kept."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _maxrss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


class _RssSampler:
    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.start = _rss_bytes() or 0
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            value = _rss_bytes()
            if value is not None and value > self.peak:
                self.peak = value
            self._stop.wait(self.interval)

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        value = _rss_bytes()
        if value is not None:
            self.peak = max(self.peak, value)


@dataclass
class Measurement:
    """Seconds of every repeat, and the peak memory over them (MiB)."""

    seconds: list[float] = field(default_factory=list)
    peak_mib: float | None = None  # peak allocated (GPU) or peak RSS (CPU) during the calls
    peak_increase_mib: float | None = None  # ... minus the value when the call started
    memory_kind: str = ""

    @property
    def best(self) -> float:
        return min(self.seconds)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def as_dict(self, items: int) -> dict[str, Any]:
        return {
            "seconds_min": self.best,
            "seconds_median": self.median,
            "seconds_all": self.seconds,
            "per_second": items / self.best if self.best > 0 else None,
            "peak_mib": self.peak_mib,
            "peak_increase_mib": self.peak_increase_mib,
            "memory": self.memory_kind,
        }


def measure_once(fn: Callable[[], Any], device: torch.device, into: Measurement) -> Any:
    """Run ``fn`` once, adding its time and peak memory to ``into``; returns what ``fn`` returns."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start_mem = torch.cuda.memory_allocated(device)
        t0 = time.perf_counter()
        result = fn()
        torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated(device)
        into.memory_kind = "cuda max_memory_allocated"
        _update_peak(into, peak, peak - start_mem)
    elif _rss_bytes() is not None:
        _release_freed_memory()
        with _RssSampler() as sampler:
            t0 = time.perf_counter()
            result = fn()
            elapsed = time.perf_counter() - t0
        into.memory_kind = "RSS, sampled every 2 ms"
        _update_peak(into, sampler.peak, sampler.peak - sampler.start)
    else:
        t0 = time.perf_counter()
        result = fn()
        elapsed = time.perf_counter() - t0
        into.memory_kind = "process ru_maxrss (not per call)"
        _update_peak(into, _maxrss_bytes(), None)
    into.seconds.append(elapsed)
    return result


def _update_peak(into: Measurement, peak: int, increase: int | None) -> None:
    peak_mib = peak / MIB
    into.peak_mib = peak_mib if into.peak_mib is None else max(into.peak_mib, peak_mib)
    if increase is not None:
        inc = increase / MIB
        into.peak_increase_mib = inc if into.peak_increase_mib is None else max(into.peak_increase_mib, inc)
