"""Peak-memory measurement shared by ``peftkit train`` and ``peftkit bench``."""

from __future__ import annotations

import gc
import os
import resource
import sys
import threading
from typing import Any

import torch


def _rss_mib() -> float:
    """Current resident set size (psutil where installed, else Linux's /proc)."""
    try:
        import psutil
    except ImportError:
        with open("/proc/self/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    return psutil.Process().memory_info().rss / 2**20


def _max_rss_mib() -> float:
    # Linux reports ru_maxrss in KiB, macOS in bytes.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


class MemoryMeter:
    """Peak memory of the code run between ``start()`` and ``stop()``.

    GPU: ``torch.cuda.max_memory_allocated`` (reset at start). CPU: the peak resident set size of the process
    during the interval: the kernel's high-water mark (``ru_maxrss``) when the interval raised it, else the
    largest RSS a 5 ms sampling thread saw (the high-water mark then belongs to an earlier phase, e.g. loading).
    ``train_memory_mib`` is that peak minus the memory in use at ``start()``."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device) / 2**20
            return
        self.before = _rss_mib()
        self.high_water_before = _max_rss_mib()
        self.sampled = self.before
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.sampled = max(self.sampled, _rss_mib())

    def stop(self) -> dict[str, Any]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20
            return {"peak_memory_mib": peak, "train_memory_mib": peak - self.before, "memory_kind": "cuda_allocated"}
        self._stop.set()
        self._thread.join()
        high_water = _max_rss_mib()
        peak = high_water if high_water > self.high_water_before else max(self.sampled, _rss_mib())
        return {"peak_memory_mib": peak, "train_memory_mib": max(0.0, peak - self.before), "memory_kind": "cpu_peak_rss"}
