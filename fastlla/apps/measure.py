"""Wall time and real peak memory of a block of code.

Peak memory is measured, not estimated: on CPU a background thread samples the process's
resident set size (``/proc/self/statm``) every few milliseconds and keeps the high-water mark
above the level at entry; on CUDA it is ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import os
import statistics
import resource
import threading
import time
from dataclasses import dataclass

import torch

__all__ = ["Measurement", "measure", "current_rss", "interleaved_latency"]

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def current_rss() -> int:
    """Resident set size of this process in bytes."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:  # not Linux: the lifetime high-water mark is the best available
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class Measurement:
    seconds: float = 0.0
    peak_bytes: int = 0
    """Peak memory above the level at entry (RSS on CPU, allocated memory on CUDA)."""
    device: str = "cpu"

    @property
    def peak_mib(self) -> float:
        return self.peak_bytes / 2**20


class measure:
    """Context manager: ``with measure() as m: ...`` then ``m.seconds``, ``m.peak_bytes``."""

    def __init__(self, device: str | torch.device = "cpu", interval: float = 0.002):
        self.result = Measurement(device=str(device))
        self._cuda = torch.device(device).type == "cuda"
        self._interval = interval
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, current_rss())
            time.sleep(self._interval)

    def __enter__(self) -> Measurement:
        if self._cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            self._base = self._peak = current_rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        self._start = time.perf_counter()
        return self.result

    def __exit__(self, *exc) -> None:
        if self._cuda:
            torch.cuda.synchronize()
        self.result.seconds = time.perf_counter() - self._start
        if self._cuda:
            self.result.peak_bytes = torch.cuda.max_memory_allocated() - self._base
        else:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, current_rss())
            self.result.peak_bytes = self._peak - self._base


#: ``interleaved_latency``'s clocks: wall time, or the CPU time of the calling thread (which
#: excludes the time other processes hold the core: steadier on a shared machine, and equal to
#: the wall time for single-threaded calls on an idle one).
CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}


def interleaved_latency(
    calls: dict, x, repeat: int = 30, warmup: int = 3, clock: str = "wall"
) -> dict[str, float]:
    """Median seconds (``clock``, one of :data:`CLOCKS`) of each ``calls[name](x)``, under
    ``torch.no_grad``.

    The calls are interleaved (one of each per round, ``warmup`` rounds discarded), so a change
    in machine load moves every method alike and their ratios stay comparable.
    """
    now = CLOCKS[clock]
    times: dict[str, list[float]] = {name: [] for name in calls}
    with torch.no_grad():
        for _ in range(int(warmup)):
            for fn in calls.values():
                fn(x)
        for _ in range(int(repeat)):
            for name, fn in calls.items():
                t0 = now()
                fn(x)
                times[name].append(now() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}
