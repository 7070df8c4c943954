"""Every registered strategy at growing worker counts: time per round, samples/s per worker, and the
share of time spent in the worker group's collectives and ledger (goal < 5% in simulated runs).

The share is ``collective_s / compute_s`` from the metrics. A second column splits out the part of it
spent in graph mixing's neighbour-weighted sums (``pnnctl.workers.weighted_rows``, timed here by a
wrapper): arithmetic a real agent does on the vectors it received, as opposed to moving data and
keeping the ledger. A third gives the sums' rate in GB/s, counting the fewest bytes they must move (each
source row a product uses read once, each output row written once), and its ratio to a streaming
``c = a + 0.5 b`` over the same working set measured right after the cell: near 1x the sums are
memory-bound, and only moving fewer bytes (not faster arithmetic) would shrink them.

Each cell trains through the real trainer on `synthetic` data with a 784-256-256-10 MLP for a fixed
sample budget. sil cuts the network into one part per worker and this MLP has 3 linear layers, so sil
runs at its own worker counts (``--workers-for sil=2,3``, the default); cells a strategy refuses are
listed with its reason.

    python benchmarks/strategy_scaling.py [--workers 1,4,16,64,256] [--strategies all] [--samples 20000]
        [--workers-for sil=2,3] [--batch 16]
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, median_seconds, print_table

import pnnctl.workers
from pnnctl.config import RunConfig, SyntheticConfig, validate
from pnnctl.errors import UsageError
from pnnctl.runtime import wait_for_gpu
from pnnctl.trainer import train
from strategies import STRATEGIES


class TimedNeighbourSums:
    """Wraps ``pnnctl.workers.weighted_rows`` (looked up at call time by WorkerGroup.mix) to add up its
    seconds and the fewest bytes they must move: each source row the product uses read once (a sparse
    product: the columns holding weights; a dense one: all) and each output row written once."""

    def __init__(self) -> None:
        self.inner = pnnctl.workers.weighted_rows
        pnnctl.workers.weighted_rows = self
        self.reset()

    def sources(self, values: torch.Tensor, sparse_rows: torch.Tensor | None) -> int:
        """Source rows a product reads, counted once per CSR tensor (a graph's plan keeps one): this runs
        inside the group's timed mix, where a ``unique`` every call added its microseconds to the
        collectives' share of small graphs."""
        if sparse_rows is None:
            return values.shape[0]
        if self.last_sparse is None or self.last_sparse[0] is not sparse_rows:
            self.last_sparse = (sparse_rows, sparse_rows.col_indices().unique().numel())
        return self.last_sparse[1]

    def reset(self) -> None:
        self.last_sparse: tuple[torch.Tensor, int] | None = None
        self.seconds = 0.0
        self.bytes = 0
        self.largest: torch.Tensor | None = None  # the biggest mixed state's shape (meta), for the reference

    def __call__(
        self, rows: torch.Tensor, values: torch.Tensor, sparse_rows: torch.Tensor | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        wait_for_gpu()
        start = time.perf_counter()
        try:
            return self.inner(rows, values, sparse_rows, out=out)
        finally:
            wait_for_gpu()
            self.seconds += time.perf_counter() - start
            moved = self.sources(values, sparse_rows) + rows.shape[0]
            self.bytes += moved * math.prod(values.shape[1:]) * values.element_size()
            if self.largest is None or values.numel() > self.largest.numel():
                self.largest = torch.empty_like(values, device="meta")


def streaming_add_gbps(like: torch.Tensor, device: str) -> float:
    """GB/s of ``c = a + 0.5 b`` on tensors the shape of ``like``: what memory-bound arithmetic reaches here."""
    a, b, c = (torch.rand(like.shape, dtype=like.dtype, device=device) for _ in range(3))

    def add() -> None:
        torch.add(a, b, alpha=0.5, out=c)
        wait_for_gpu()

    return 3 * like.numel() * like.element_size() / median_seconds(add, repeats=7) / 1e9


def sums_bandwidth(sums: TimedNeighbourSums, device: str) -> str:
    """The neighbour sums' rate against streaming arithmetic on the same working set (1.0x: memory-bound)."""
    if sums.largest is None or sums.seconds == 0:
        return "-"
    achieved = sums.bytes / sums.seconds / 1e9
    return f"{achieved:.0f} ({achieved / streaming_add_gbps(sums.largest, device):.2f}x)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", default="1,4,16,64,256")
    parser.add_argument("--strategies", default="all")
    parser.add_argument("--samples", type=int, default=20000, help="training samples per cell (all workers)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--model", default="mlp:784-256-256-10")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers-for", action="append", metavar="STRATEGY=N,N", default=None,
                        help="worker counts for one strategy instead of --workers (repeatable; default sil=2,3)")
    args = parser.parse_args()
    names = list(STRATEGIES) if args.strategies == "all" else args.strategies.split(",")
    counts = {name: [int(w) for w in args.workers.split(",")] for name in names}
    for item in args.workers_for or ["sil=2,3"]:
        name, _, values = item.partition("=")
        if name in counts:
            counts[name] = [int(w) for w in values.split(",")]
    rows = []
    neighbour_sums = TimedNeighbourSums()
    for name in names:
        # sil trains its parts apart for at least one epoch before its recovery epoch (joined): the same
        # sample budget over two epochs of half the data.
        epochs = 2 if name == "sil" else 1
        synthetic = SyntheticConfig(samples=max(args.samples * 5 // 4 // epochs, 1000), dim=784, classes=10)
        for n in counts[name]:
            with tempfile.TemporaryDirectory() as out:
                try:
                    config = validate(RunConfig(
                        strategy=name, dataset="synthetic", model=args.model, workers=n, batch_size=args.batch,
                        epochs=float(epochs), eval_every=1000.0, device=args.device, synthetic=synthetic, out=out,
                        checkpoint_every=1000000,
                    ))
                    if STRATEGIES[name].single_worker and n > 1:
                        continue
                    neighbour_sums.reset()
                    result = train(config)
                except UsageError as exc:
                    rows.append([name, str(n), "-", "-", "-", "-", "-", "-", f"n/a: {exc}"])
                    continue
            last = result.rows[-1]
            rounds = max(int(last["round"]), 1)
            compute = float(last["compute_s"])
            samples = float(last["samples_seen"])
            rows.append([
                name, str(n), f"{compute / rounds * 1e3:.1f}", f"{samples / compute / n:,.0f}",
                f"{samples / compute:,.0f}", f"{float(last['collective_s']) / compute:.1%}",
                f"{neighbour_sums.seconds / compute:.1%}", sums_bandwidth(neighbour_sums, args.device), "",
            ])
    print_table(
        f"strategy scaling: {args.model}, synthetic 784-d, batch {args.batch}/worker, {args.samples} samples per "
        f"cell, simulated on {args.device}; {machine()}",
        ["strategy", "N", "ms/round", "samples/s/worker", "samples/s total", "collectives+ledger share",
         "of which neighbour sums", "sums GB/s (x streaming add)", "note"],
        rows,
    )


if __name__ == "__main__":
    main()
