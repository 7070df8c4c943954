"""Every registered strategy at growing worker counts: time per round, samples/s per worker, and the
share of time spent in the worker group's collectives and ledger (goal < 5% in simulated runs).

The share is ``collective_s / compute_s`` from the metrics. A second column splits out the part of it
spent in graph mixing's neighbour-weighted sums (``pnnctl.workers.weighted_rows``, timed here by a
wrapper): arithmetic a real agent does on the vectors it received, as opposed to moving data and
keeping the ledger.

Each cell trains through the real trainer on `synthetic` data with a 784-256-256-10 MLP (strategies
that need another model get their default through --model-for) for a fixed sample budget.

    python benchmarks/strategy_scaling.py [--workers 1,4,16,64,256] [--strategies all] [--samples 20000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, print_table

import pnnctl.workers
from pnnctl.config import RunConfig, SyntheticConfig, validate
from pnnctl.errors import UsageError
from pnnctl.runtime import wait_for_gpu
from pnnctl.trainer import train
from strategies import STRATEGIES


class TimedNeighbourSums:
    """Wraps ``pnnctl.workers.weighted_rows`` (looked up at call time by WorkerGroup.mix) to add up its seconds."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.inner = pnnctl.workers.weighted_rows
        pnnctl.workers.weighted_rows = self

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        wait_for_gpu()
        start = time.perf_counter()
        try:
            return self.inner(*args, **kwargs)
        finally:
            wait_for_gpu()
            self.seconds += time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", default="1,4,16,64,256")
    parser.add_argument("--strategies", default="all")
    parser.add_argument("--samples", type=int, default=20000, help="training samples per cell (all workers)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--model", default="mlp:784-256-256-10")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    names = list(STRATEGIES) if args.strategies == "all" else args.strategies.split(",")
    synthetic = SyntheticConfig(samples=max(args.samples * 5 // 4, 1000), dim=784, classes=10)
    rows = []
    neighbour_sums = TimedNeighbourSums()
    for name in names:
        for n in (int(w) for w in args.workers.split(",")):
            with tempfile.TemporaryDirectory() as out:
                try:
                    config = validate(RunConfig(
                        strategy=name, dataset="synthetic", model=args.model, workers=n, batch_size=args.batch,
                        epochs=1.0, eval_every=1000.0, device=args.device, synthetic=synthetic, out=out,
                        checkpoint_every=1000000,
                    ))
                    if STRATEGIES[name].single_worker and n > 1:
                        continue
                    neighbour_sums.seconds = 0.0
                    result = train(config)
                except UsageError as exc:
                    rows.append([name, str(n), "-", "-", "-", "-", "-", f"n/a: {exc}"[:60]])
                    continue
            last = result.rows[-1]
            rounds = max(int(last["round"]), 1)
            compute = float(last["compute_s"])
            samples = float(last["samples_seen"])
            rows.append([
                name, str(n), f"{compute / rounds * 1e3:.1f}", f"{samples / compute / n:,.0f}",
                f"{samples / compute:,.0f}", f"{float(last['collective_s']) / compute:.1%}",
                f"{neighbour_sums.seconds / compute:.1%}", "",
            ])
    print_table(
        f"strategy scaling: {args.model}, synthetic 784-d, batch {args.batch}/worker, {args.samples} samples per "
        f"cell, simulated on {args.device}; {machine()}",
        ["strategy", "N", "ms/round", "samples/s/worker", "samples/s total", "collectives+ledger share",
         "of which neighbour sums", "note"],
        rows,
    )


if __name__ == "__main__":
    main()
