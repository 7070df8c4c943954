"""The narrow contract every strategy implements, and what the trainer hands it.

A strategy sets up its partitioned state in ``__init__``, trains one round in :meth:`run_round`,
assembles a model for evaluation in :meth:`eval_model`, and saves and loads its state. It never
prints, parses arguments or writes files: the trainer owns the loop, the clock, checkpoints and
metrics (the shape torchtitan and Flower share: one loop, strategies as plug-ins).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from pnnctl.models import StackedNet

if TYPE_CHECKING:
    from pnnctl.config import RunConfig
    from pnnctl.data import Dataset
    from pnnctl.workers import WorkerGroup


@dataclass(frozen=True, kw_only=True)
class NoOptions:
    """This strategy takes no options."""


@dataclass
class StrategyContext:
    """What the trainer gives a strategy: config, data, worker group, device and data shards."""

    config: RunConfig
    data: Dataset
    group: WorkerGroup
    device: torch.device
    shards: list[Tensor]  # per logical worker: indices into data.x_train
    x_train: Tensor  # on device
    y_train: Tensor  # on device

    def default_round_steps(self, samples_per_step: int) -> int:
        """Steps in a round whose length the user left open: an epoch, or ``eval_every`` where shorter
        (the trainer evaluates between rounds only, so epoch-long rounds evaluated ``eval_every 0.25``
        once an epoch). Where the run's budget ends sooner, ``run_round(samples_left)`` cuts the round."""
        n_train = len(self.y_train)
        return steps_for(min(n_train, self.config.eval_every * n_train), samples_per_step)


def steps_for(samples: float, samples_per_step: int) -> int:
    """The fewest whole steps (at least one) that train ``samples``."""
    return max(1, math.ceil(samples / samples_per_step - 1e-9))


def steps_this_round(period: int, samples_per_step: int, samples_left: float) -> int:
    """A round's steps: its ``period``, or fewer in the run's last round, where the budget ends sooner.

    A period the algorithm fixes (local SGD's and IST's local steps) ends early too, and still
    synchronises: a run of E epochs trains E epochs (to a step) whatever its period.
    """
    if samples_left >= period * samples_per_step:  # every round but the last (and the default, inf)
        return period
    return min(period, steps_for(samples_left, samples_per_step))


@dataclass
class RoundResult:
    """One round's outcome: mean training loss, samples processed by all workers, phase, extras."""

    loss: float
    samples: int
    phase: str = "train"
    extras: dict[str, float | str] = field(default_factory=dict)
    #: How many workers' compute ran side by side this round if each had its own machine (None: all
    #: N). A pipeline without micro-batches, where one stage works at a time, says 1.
    parallel_workers: float | None = None


@dataclass(frozen=True)
class Footprint:
    """The largest worker's parameters and analytic training memory in bytes."""

    params: int
    memory_bytes: int


#: The names ``--loss`` may give softmax cross-entropy: psl's options call it ce, consensus's and dgd's
#: cross-entropy; each takes both, so that one ``--loss`` serves a grid of them all.
CROSS_ENTROPY = ("ce", "cross-entropy")


def spell_cross_entropy(options: Any, spelling: str) -> None:
    """Give a frozen options dataclass's ``loss`` its strategy's own ``spelling`` where it names cross-entropy."""
    if options.loss in CROSS_ENTROPY:
        object.__setattr__(options, "loss", spelling)


class Strategy(ABC):
    name: ClassVar[str]
    summary: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    #: True for strategies that train one model whatever ``--workers`` says.
    single_worker: ClassVar[bool] = False
    #: What the strategy's paper reports, quoted beside our numbers in reports ("" for baselines).
    published: ClassVar[str] = ""
    #: True where a round's traffic grows with its steps, so a bytes budget can cut a round short;
    #: False where a round is one exchange whatever its length (a cut period would cost the same bytes).
    traffic_grows_with_steps: ClassVar[bool] = True
    #: The period every round trains whole whatever a budget leaves (sil: an epoch of its schedule), named in
    #: the note on an overshot budget; "" where a round stops on a whole step of every worker.
    uncut_round: ClassVar[str] = ""

    def __init__(self, ctx: StrategyContext, options: Any) -> None:
        self.ctx = ctx
        self.options = options

    @abstractmethod
    def run_round(self, samples_left: float = math.inf) -> RoundResult:
        """Train one round (the unit between synchronisations) and return its outcome.

        ``samples_left``: what the run's epochs or samples budget still allows, summed over the
        workers; a round shortens itself to it (to a whole step) where it can (``steps_this_round``).
        """

    @abstractmethod
    def eval_model(self) -> StackedNet:
        """A model with one worker slot that represents what the strategy has learned so far."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit-for-bit after a restart (tensors and plain data only)."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    @abstractmethod
    def footprint(self) -> Footprint: ...

    def eval_extras(self) -> dict[str, float | str]:
        """Strategy-specific figures computed at evaluation time (consensus error, ...)."""
        return {}

    def artifacts(self) -> dict[str, str]:
        """Text files describing the run's fixed structure (a graph, a label table), by file name.

        The trainer writes them into the run folder once, after setup; strategies never write files.
        """
        return {}

    def unused_settings(self) -> list[tuple[tuple[str, ...], str]]:
        """Run-config fields this strategy, as configured, does not read, in groups with the reason for each
        group; [] where it reads all.

        The trainer says so when such a field is set away from its default (an ``--optimizer adam`` grid
        would otherwise train consensus with its own update and no word about it)."""
        return []

    def is_done(self) -> bool:
        """True when the strategy has nothing left to train (multi-phase strategies)."""
        return False
