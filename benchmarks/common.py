"""Shared helpers for the benchmark scripts: timing, the machine's matmul peak, table printing."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from typing import NamedTuple

import torch


def median_seconds(fn: Callable[[], None], repeats: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved(fns: dict[str, Callable[[], None]], repeats: int = 5) -> dict[str, list[float]]:
    """Seconds of each repeat of each function, run alternately so drifts of the machine hit all alike."""
    for fn in fns.values():
        fn()  # warm-up
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return samples


class PairedRatio(NamedTuple):
    median: float
    lowest: float
    highest: float


def paired_ratio(top: list[float], bottom: list[float]) -> PairedRatio:
    """Median, lowest and highest of ``top[i] / bottom[i]`` over repeats measured side by side: the
    median is the ratio least moved by the machine's drift (each pair saw the same machine). Times
    of the slower side over the faster, or rates the other way round, give a speed-up."""
    ratios = sorted(t / b for t, b in zip(top, bottom, strict=True))
    return PairedRatio(statistics.median(ratios), ratios[0], ratios[-1])


def matmul_peak_gflops(size: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    seconds = median_seconds(lambda: torch.mm(a, b), repeats=repeats)
    return 2 * size**3 / seconds / 1e9


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print(f"\n{title}")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
