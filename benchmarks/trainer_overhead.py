"""The `centralized` strategy under pnnctl's trainer against a hand-written PyTorch loop.

Same MLP (784-512x5-47), data (synthetic, 784 inputs, 47 classes), batch (128) and optimizer (Adam),
measured alternately in one run. Goal: pnnctl >= 0.97x the loop's samples/s. Each repeat runs the
three side by side; a ratio is the median over repeats of the ratio within a repeat (with the
lowest and highest beside it), as this shared machine's speed drifts between repeats more than the
sides differ (best-of rates across repeats put pnnctl at 0.95x and 1.15x the loop in two runs).

    python benchmarks/trainer_overhead.py [--samples 20000] [--repeats 5] [--device cpu]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import itertools

from common import machine, matmul_peak_gflops, paired_ratio, print_table

from pnnctl.config import RunConfig, SyntheticConfig, validate
from pnnctl.runtime import wait_for_gpu
from pnnctl.trainer import prepare_data, train

WIDTHS = (784, 512, 512, 512, 512, 512, 47)


def hand_loop(x: torch.Tensor, y: torch.Tensor, batch: int, epochs: int, seed: int, fused: bool = False) -> float:
    """The loop a researcher would write: nn.Sequential, Adam, shuffled mini-batches. Returns seconds.

    ``fused``: Adam's fused kernel, as pnnctl uses; the default is what a plain ``Adam(...)`` gets.
    """
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(WIDTHS)):
        layers.append(nn.Linear(a, b))
        if i < len(WIDTHS) - 2:
            layers.append(nn.ReLU())
    model = nn.Sequential(nn.Flatten(), *layers).to(x.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=fused or None)
    start = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(x), device=x.device)
        for i in range(0, len(x) - batch + 1, batch):
            index = order[i : i + batch]
            optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x[index]), y[index])
            loss.backward()
            optimizer.step()
    wait_for_gpu()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=25000, help="synthetic samples (80%% train)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    config = validate(
        RunConfig(
            strategy="centralized", dataset="synthetic", model="mlp:" + "-".join(map(str, WIDTHS)),
            synthetic=SyntheticConfig(samples=args.samples, dim=784, classes=47), batch_size=128,
            optimizer="adam", lr=1e-3, epochs=float(args.epochs), eval_every=1000.0, device=args.device,
            checkpoint_every=1,
        )
    )
    data, x_train, y_train = prepare_data(config, torch.device(args.device))
    n_train = len(y_train)
    params = sum(a * b + b for a, b in itertools.pairwise(WIDTHS))
    loop_rates, fused_rates, pnnctl_rates = [], [], []
    for repeat in range(args.repeats):
        seconds = hand_loop(x_train, y_train, 128, args.epochs, seed=repeat)
        loop_rates.append(n_train * args.epochs / seconds)
        seconds = hand_loop(x_train, y_train, 128, args.epochs, seed=repeat, fused=True)
        fused_rates.append(n_train * args.epochs / seconds)
        with tempfile.TemporaryDirectory() as out:
            result = train(config.with_updates(out=out, seed=repeat))
        # wall_s: the trainer's whole training time (rounds, ledger, checkpoints), evaluation excluded.
        pnnctl_rates.append(float(result.rows[-1]["samples_seen"]) / float(result.rows[-1]["wall_s"]))
    peak = matmul_peak_gflops()
    flops_per_sample = 6 * params  # forward 2*params, backward 4*params

    def versus(rates: list[float], reference: list[float]) -> str:
        ratio = paired_ratio(rates, reference)
        return f"{ratio.median:.3f}x ({ratio.lowest:.3f}-{ratio.highest:.3f})"

    def row(name: str, rates: list[float]) -> list[str]:
        gflops = max(rates) * flops_per_sample / 1e9
        return [name, f"{max(rates):,.0f}", f"{gflops:.1f}", f"{gflops / peak:.0%}", versus(rates, loop_rates),
                versus(rates, fused_rates)]

    rows = [
        row(name, rates)
        for name, rates in [
            ("hand-written loop, Adam()", loop_rates),
            ("hand-written loop, Adam(fused=True)", fused_rates),
            ("pnnctl centralized (fused Adam)", pnnctl_rates),
        ]
    ]
    print_table(
        f"trainer overhead: MLP {'-'.join(map(str, WIDTHS))}, batch 128, Adam, {n_train} samples x {args.epochs} "
        f"epochs, {args.repeats} repeats (rates: best; ratios: median of paired repeats, lowest-highest); "
        f"{machine()}; fp32 matmul peak {peak:.0f} GFLOP/s",
        ["loop", "samples/s (best)", "GFLOP/s", "of matmul peak", "vs Adam() loop (goal >= 0.97)",
         "vs fused loop"],
        rows,
    )
    del data


if __name__ == "__main__":
    main()
