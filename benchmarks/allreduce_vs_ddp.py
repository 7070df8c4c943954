"""The `allreduce` strategy on P gloo processes against torch's DistributedDataParallel.

Same MLP, synthetic data, batch per worker and SGD; one worker per process; both measured in the
same processes, alternately. Goal: pnnctl >= 0.95x DDP's samples/s.

The ratio is the median over repeats of DDP's time / pnnctl's time for the round pair measured side
by side: on a shared 2-core VM the best-of rates of the two drift apart from one run to the next
(2 processes, four runs of best-of-5: 0.79x to 1.19x), while each pair sees the same machine. The
lowest and highest pair ratios show the spread.

    python benchmarks/allreduce_vs_ddp.py [--procs 2,4] [--steps 30] [--model mlp:784-512-512-10]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import itertools

from common import paired_ratio, print_table


def _rank(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    from pnnctl.config import RunConfig, SyntheticConfig, validate
    from pnnctl.data import shard_indices
    from pnnctl.distributed import TorchComm
    from pnnctl.network import parse_network
    from pnnctl.trainer import prepare_data
    from pnnctl.training import ShardSampler
    from pnnctl.workers import Ledger, WorkerGroup
    from strategies.base import StrategyContext
    from strategies.baselines import AllReduce, DataParallelOptions

    widths = [int(w) for w in args.model.split(":")[1].split("-")]
    config = validate(RunConfig(
        strategy="allreduce", dataset="synthetic", model=args.model, workers=world, batch_size=args.batch,
        lr=0.01, device="cpu", synthetic=SyntheticConfig(samples=8000, dim=widths[0], classes=widths[-1]),
    ))
    data, x_train, y_train = prepare_data(config, torch.device("cpu"))
    shards = shard_indices(data.y_train, world, "iid", 0)
    group = WorkerGroup(world, Ledger(world, parse_network("lan-1g")), TorchComm("gloo", torch.device("cpu")))
    ctx = StrategyContext(config, data, group, torch.device("cpu"), shards, x_train, y_train)
    strategy = AllReduce(ctx, DataParallelOptions(steps_per_round=args.steps))

    layers: list[nn.Module] = [nn.Flatten()]
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    ddp = nn.parallel.DistributedDataParallel(nn.Sequential(*layers))
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.01)
    sampler = ShardSampler(x_train, y_train, shards, [rank], args.batch, seed=0)

    def ddp_round() -> None:
        for _ in range(args.steps):
            x, y = sampler.next_batch()
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(ddp(x[0]), y[0]).backward()
            optimizer.step()

    def timed(fn) -> float:
        dist.barrier()
        start = time.perf_counter()
        fn()
        dist.barrier()
        return time.perf_counter() - start

    timed(strategy.run_round)
    timed(ddp_round)
    ours, theirs = [], []
    for _ in range(args.repeats):
        ours.append(timed(strategy.run_round))
        theirs.append(timed(ddp_round))
    if rank == 0:
        samples = args.steps * args.batch * world
        ratio = paired_ratio(theirs, ours)
        Path(out).write_text(json.dumps({
            "pnnctl": samples / min(ours), "ddp": samples / min(theirs), "ratio": ratio.median,
            "lowest": ratio.lowest, "highest": ratio.highest,
        }))
    # Every rank done before the group goes (one rank of eight runs aborted in gloo's teardown with
    # "terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--procs", default="2,4")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--model", default="mlp:784-512-512-10")
    args = parser.parse_args()
    rows = []
    for world in (int(p) for p in args.procs.split(",")):
        with tempfile.NamedTemporaryFile(suffix=".json") as result:
            from pnnctl.distributed import free_port

            mp.spawn(_rank, args=(world, free_port(), args, result.name), nprocs=world, join=True)
            rates = json.loads(Path(result.name).read_text())
        rows.append([str(world), f"{rates['ddp']:,.0f}", f"{rates['pnnctl']:,.0f}", f"{rates['ratio']:.3f}x",
                     f"{rates['lowest']:.2f}-{rates['highest']:.2f}x"])
    print_table(
        f"allreduce vs DDP: {args.model}, batch {args.batch}/process, SGD, gloo on loopback, "
        f"{args.repeats} alternating pairs of {args.steps} steps, {os.cpu_count()} cores shared by the processes",
        ["processes", "DDP samples/s (best)", "pnnctl allreduce samples/s (best)", "median pair ratio (goal >= 0.95)",
         "pair ratios"],
        rows,
    )


if __name__ == "__main__":
    main()
