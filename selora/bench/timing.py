"""Wall-clock timing of several forwards, interleaved so that machine drift hits all alike.

Each repetition runs every variant once, in turn (after ``warmup`` untimed rounds), so the
ratios between variants taken in one run are fair even on a shared, noisy CPU.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Mapping

import torch


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    forwards: Mapping[str, Callable[[torch.Tensor], object]],
    x: torch.Tensor,
    warmup: int,
    reps: int,
    on_step: Callable[[], None] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each forward on ``x``: ``reps`` samples each, round-robin order."""
    samples: dict[str, list[float]] = {name: [] for name in forwards}
    device = x.device
    for rep in range(warmup + reps):
        for name, fn in forwards.items():
            _sync(device)
            start = time.perf_counter()
            fn(x)
            _sync(device)
            if rep >= warmup:
                samples[name].append(time.perf_counter() - start)
            if on_step is not None:
                on_step()
    return samples


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated ``q``-th percentile (0-100) of ``values``."""
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(seconds: list[float], rows: int) -> dict:
    """Median and p50/p99 seconds per batch, images/s at the median."""
    med = statistics.median(seconds)
    return {
        "median_s": med, "p50_s": percentile(seconds, 50), "p99_s": percentile(seconds, 99),
        "images_per_s": rows / med, "samples_s": seconds,
    }
