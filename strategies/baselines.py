"""The baselines every partitioning strategy is measured against.

- ``centralized``: one model, all data, one worker. Nothing is communicated.
- ``allreduce``: data sharded over N workers, gradients averaged by a ring all-reduce every step,
  all in one flat buffer (what ``DistributedDataParallel`` does with its buckets). Workers stay
  identical; N workers with batch b equal ``centralized`` with batch N*b under SGD. Because the
  replicas never differ, a process keeps one copy for all its workers and runs their batches as
  one (the backward pass sums their gradients); only models with batch norm, whose statistics are
  per worker batch, keep one copy per worker. The ledger is the same either way.
- ``local-sgd``: every worker takes H local steps on its shard, then parameters (and batch-norm
  statistics) are averaged by a ring all-reduce. Optimizer state stays local and is not averaged.
  With H = 1 and plain SGD it equals ``allreduce``. A run's last period is cut to the steps its
  budget allows and still ends in the average.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from pnnctl.errors import UsageError
from pnnctl.models import (
    StackedBatchNorm,
    activation_elements,
    build_model,
    replicate,
    select_workers,
    worker_memory_bytes,
)
from pnnctl.training import GradientBuffer, ShardSampler, make_optimizer, stacked_cross_entropy
from strategies import register
from strategies.base import Footprint, RoundResult, Strategy, StrategyContext, steps_this_round


@dataclass(frozen=True, kw_only=True)
class DataParallelOptions:
    steps_per_round: int = 0
    """optimizer steps per round, the unit between checkpoints and budget checks (0: one epoch, or
    eval_every where shorter; a run's last round is cut to its budget)"""

    def validate(self) -> None:
        if self.steps_per_round < 0:
            raise UsageError("steps_per_round", f"must be >= 0, not {self.steps_per_round}")


@dataclass(frozen=True, kw_only=True)
class LocalSGDOptions:
    local_steps: int = 20
    """local steps H between parameter averages (one round)"""

    def validate(self) -> None:
        if self.local_steps < 1:
            raise UsageError("local-sgd.local_steps", f"must be >= 1, not {self.local_steps}")


class DataParallel(Strategy):
    """Replicas of one model on data shards; subclasses choose what is synchronised and when."""

    #: gradient all-reduce after every step
    sync_gradients = False

    def __init__(self, ctx: StrategyContext, options: Any) -> None:
        super().__init__(ctx, options)
        config, group = ctx.config, ctx.group
        model = build_model(config.model, 1, ctx.data.input_shape, ctx.data.n_classes, seed=config.seed)
        # Identical replicas of a model without batch statistics are one copy: the gradient of the
        # summed per-worker losses is the sum of the workers' gradients, and N copies would only
        # multiply the memory, the optimizer's work and the simulated averaging by N. (The copies
        # are never materialised: at N = 256 they would be 256 models' worth of memory at start-up.)
        self.shared_replica = self.sync_gradients and not any(
            isinstance(m, StackedBatchNorm) for m in model.modules()
        )
        if not self.shared_replica and group.n_local > 1:
            model = replicate(model, group.n_local)
        self.model = model.to(ctx.device)
        self.optimizer = make_optimizer(
            config.optimizer, self.model.parameters(), config.lr, config.momentum, config.weight_decay
        )
        self.sampler = ShardSampler(
            ctx.x_train, ctx.y_train, ctx.shards, group.local_workers, config.batch_size, config.seed
        )
        self.samples_per_step = group.n_workers * config.batch_size
        self.steps_per_round = self.round_steps()
        self.gradients = (
            GradientBuffer(list(self.model.parameters()))
            if self.sync_gradients and group.n_workers > 1
            else None
        )

    def round_steps(self) -> int:
        return self.options.steps_per_round or self.ctx.default_round_steps(self.samples_per_step)

    def train_step(self, x: Tensor, y: Tensor) -> float:
        """One optimizer step of every local worker on ``x [n_local, B, ...]``; returns the mean loss."""
        return self._mean_over_workers(self._step(x, y))

    def _step(self, x: Tensor, y: Tensor) -> Tensor:
        """One optimizer step; returns the local workers' losses (no cross-process traffic)."""
        if self.gradients is None:
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.gradients.zero_()
        if self.shared_replica:
            # [n_local, B, ...] -> [1, n_local * B, ...]; per-worker losses come back from the sample losses.
            logits = self.model(x.reshape(1, -1, *x.shape[2:]))
            loss_sum, per_worker = stacked_cross_entropy(logits.reshape(*y.shape, -1), y)
        else:
            loss_sum, per_worker = stacked_cross_entropy(self.model(x), y)
        if self.gradients is None:
            loss_sum.backward()
        else:
            # The mean of the N workers' gradients is the gradient of their summed losses over N: dividing
            # the scalar spares a pass over the gradient after every all-reduce (a 1 MB div_ was 72 us of
            # a 1.6 ms step of 4 workers, half of the step's collective time).
            (loss_sum / self.ctx.group.n_workers).backward()
            buffer = self.gradients
            self.ctx.group.all_reduce_segments_(
                buffer.flat, buffer.sizes, op="sum", tag="grad_all_reduce", local_sum=self.shared_replica
            )
        self.optimizer.step()
        return per_worker

    def _mean_over_workers(self, per_worker: Tensor) -> float:
        # Each rank sees its own block; the reported loss is over all N workers without ledger traffic.
        group = self.ctx.group
        if group.comm.world_size == 1:
            return float(per_worker.mean())
        return float(group.all_gather(per_worker.reshape(-1, 1)).mean())

    def run_round(self, samples_left: float = math.inf) -> RoundResult:
        steps = steps_this_round(self.steps_per_round, self.samples_per_step, samples_left)
        # Losses are summed locally and gathered once per round: a gather per step would add a
        # collective (and its latency) to every step of a distributed run.
        total = torch.zeros(self.ctx.group.n_local, dtype=torch.float64, device=self.ctx.device)
        for _ in range(steps):
            x, y = self.sampler.next_batch()
            total += self._step(x, y)
        self.after_round()
        return RoundResult(loss=self._mean_over_workers(total) / steps, samples=steps * self.samples_per_step)

    def after_round(self) -> None:
        """Synchronisation at the end of a round (none for gradient all-reduce)."""

    def eval_model(self) -> torch.nn.Module:
        return select_workers(self.model, torch.tensor([0]))

    def footprint(self) -> Footprint:
        config = self.ctx.config
        params = self.model.worker_parameter_count()
        activations = activation_elements(self.model, config.batch_size)
        return Footprint(params, worker_memory_bytes(params, activations, config.optimizer, config.momentum))

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "sampler": self.sampler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.sampler.load_state_dict(state["sampler"])


@register
class Centralized(DataParallel):
    name = "centralized"
    summary = "one model trained on all data by one worker; nothing is communicated"
    Options = DataParallelOptions
    single_worker = True


@register
class AllReduce(DataParallel):
    name = "allreduce"
    summary = "data parallel: gradients averaged by ring all-reduce every step (what DDP does)"
    Options = DataParallelOptions
    sync_gradients = True


@register
class LocalSGD(DataParallel):
    name = "local-sgd"
    summary = "H local steps per worker, then parameters averaged by ring all-reduce"
    Options = LocalSGDOptions
    traffic_grows_with_steps = False

    def round_steps(self) -> int:
        return self.options.local_steps

    def after_round(self) -> None:
        group = self.ctx.group
        if group.n_workers == 1:
            return
        state = [t for t in self.model.state_dict().values() if t.is_floating_point()]
        averaged = group.all_reduce_flat(state, op="mean", tag="param_all_reduce")
        with torch.no_grad():
            for tensor, mean in zip(state, averaged, strict=True):
                tensor.copy_(mean.unsqueeze(0).expand_as(tensor))
