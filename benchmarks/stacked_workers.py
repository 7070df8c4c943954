"""N simulated workers held stacked (one batched kernel) against a Python loop over N models.

MLP 784-256-256-10, batch 32 per worker, SGD; one optimizer step of every worker, measured
alternately in one run; the speed-up is the median over repeats of loop / stacked time of the pair
measured side by side, with the lowest and highest pair beside it. Goal: stacked >= 1.5x the loop
at N = 16. Also reports the memory per simulated worker at N = 64 (parameters, gradients and
activations actually allocated).

A third side, measured alternately with the other two, is the step's batched matrix products alone
(each layer's forward, weight gradient and, but for the first layer, input gradient: the shapes the
step runs, on inputs that stay put): what the stacked step cannot go below on this machine. The
"ceiling" column is loop / products: the speed-up a stacked step with nothing but its products
would reach; "step / products" says how much the rest (activations, loss, optimizer, memory traffic
between the products) adds.

    python benchmarks/stacked_workers.py [--workers 4,16,64] [--steps 20] [--device cpu] [--system-malloc]

On the CPU glibc is told to keep freed memory, as ``pnnctl train`` does (pnnctl.runtime); pass
--system-malloc to measure with glibc's defaults instead.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved, machine, paired_ratio, print_table

from pnnctl.models import build_model
from pnnctl.runtime import keep_freed_cpu_memory, wait_for_gpu
from pnnctl.training import make_optimizer, stacked_cross_entropy

SPEC = "mlp:784-256-256-10"


def stacked_step_fn(n: int, batch: int, device: torch.device):
    model = build_model(SPEC, n, (1, 28, 28), 10, seed=0).to(device)
    optimizer = make_optimizer("sgd", model.parameters(), lr=0.05)
    x = torch.randn(n, batch, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (n, batch), device=device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss, _ = stacked_cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()

    return step, model


def products_fn(model: nn.Module, n: int, batch: int, device: torch.device):
    """The stacked step's batched matrix products alone, on fixed inputs of the step's shapes."""
    calls = []
    weights = [p.detach() for name, p in model.named_parameters() if name.endswith("weight")]
    for index, weight in enumerate(weights):
        _, fan_in, fan_out = weight.shape
        x = torch.randn(n, batch, fan_in, device=device)
        grad_out = torch.randn(n, batch, fan_out, device=device)
        bias = torch.randn(n, 1, fan_out, device=device)
        calls.append((torch.baddbmm, (bias, x, weight)))  # forward
        calls.append((torch.bmm, (x.transpose(1, 2), grad_out)))  # weight gradient
        if index > 0:  # the first layer's input needs no gradient
            calls.append((torch.bmm, (grad_out, weight.transpose(1, 2))))

    def products() -> None:
        for fn, operands in calls:
            fn(*operands)

    return products


def loop_step_fn(n: int, batch: int, device: torch.device):
    models = [
        nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
        .to(device)
        for _ in range(n)
    ]
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05) for m in models]
    x = torch.randn(n, batch, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (n, batch), device=device)

    def step() -> None:
        for i, (model, optimizer) in enumerate(zip(models, optimizers, strict=True)):
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x[i]), y[i]).backward()
            optimizer.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", default="4,16,64")
    parser.add_argument("--steps", type=int, default=20, help="steps per timed repeat")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--system-malloc", action="store_true", help="leave glibc's malloc settings alone")
    args = parser.parse_args()
    device = torch.device(args.device)
    kept = device.type == "cpu" and not args.system_malloc and keep_freed_cpu_memory()
    rows = []
    for n in (int(v) for v in args.workers.split(",")):
        stacked, model = stacked_step_fn(n, args.batch, device)
        looped = loop_step_fn(n, args.batch, device)
        products = products_fn(model, n, args.batch, device)

        def run(step):
            def timed() -> None:
                for _ in range(args.steps):
                    step()
                wait_for_gpu()

            return timed

        times = interleaved(
            {"stacked": run(stacked), "loop": run(looped), "products": run(products)}, repeats=args.repeats
        )
        per_step = {k: statistics.median(v) / args.steps for k, v in times.items()}
        speed_up = paired_ratio(times["loop"], times["stacked"])
        params = model.worker_parameter_count()
        # What a simulated worker occupies: parameters + gradients (fp32) + its activations for backward.
        activations = args.batch * (784 + 256 + 256 + 256 + 256 + 10)
        per_worker_mb = 4 * (2 * params + activations) / 1e6
        rows.append([
            str(n),
            f"{per_step['stacked'] * 1e3:.2f}",
            f"{per_step['loop'] * 1e3:.2f}",
            f"{speed_up.median:.2f}x",
            f"{speed_up.lowest:.2f}-{speed_up.highest:.2f}x",
            f"{per_step['products'] * 1e3:.2f}",
            f"{paired_ratio(times['loop'], times['products']).median:.2f}x",
            f"{paired_ratio(times['stacked'], times['products']).median:.2f}x",
            f"{n * args.batch / per_step['stacked']:,.0f}",
            f"{per_worker_mb:.2f}",
        ])
    print_table(
        f"stacked workers vs per-worker loop: {SPEC}, batch {args.batch}/worker, SGD, median of {args.repeats} x "
        f"{args.steps} steps; {machine()}; device {device}; malloc keeps freed memory: {kept}",
        ["N", "stacked ms/step", "loop ms/step", "speed-up (goal >= 1.5 at N=16)", "pair speed-ups",
         "products alone ms", "ceiling (loop / products)", "step / products", "samples/s stacked",
         "MB per simulated worker"],
        rows,
    )


if __name__ == "__main__":
    main()
