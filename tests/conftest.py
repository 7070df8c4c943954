"""Shared helpers for the tests: small configs, a strategy built the way the trainer builds it,
the CLI run in-process, and ``python -m pnnctl`` as a real subprocess.

Nothing here is autouse: a test module opts in to the fixtures it needs.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]

#: Columns of metrics.csv (and summary.json's per-rank fields) that measure time or memory on this
#: machine, so differ between two runs.
TIMING_COLUMNS = frozenset(
    {"wall_s", "compute_s", "collective_s", "projected_s", "peak_rss_bytes", "peak_memory_bytes"}
)


def is_timing_column(name: str) -> bool:
    """Measured seconds or memory. ``comm_s`` is projected from the ledger, so it is deterministic."""
    return name in TIMING_COLUMNS or (name.endswith("_s") and name != "comm_s")


def every_strategy_config(strategy: str, out: Path, **fields: Any) -> Any:
    """The config the every-strategy tests train: digits, mlp 64-64-64-10, 2 workers, 2 epochs, lr 0.1."""
    from pnnctl.config import RunConfig, validate

    # psl's exponential loss diverges under plain SGD at this lr; its L-BFGS master is the quick choice.
    options = {"optimizer": "lbfgs"} if strategy == "psl" else {}
    return validate(RunConfig(strategy=strategy, dataset="digits", model="mlp:64-64-64-10", workers=2, epochs=2.0,
                              lr=0.1, out=str(out), options=options, **fields))  # fmt: skip


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run torch on one thread: the machine is shared, and 2 threads contending are ~10x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture
def small_config() -> Callable[..., Any]:
    """``small_config(**fields)``: a validated RunConfig on ``digits`` with a tiny MLP, on the CPU."""
    from pnnctl.config import RunConfig, validate

    def make(**fields: Any) -> Any:
        values: dict[str, Any] = {
            "dataset": "digits",
            "model": "mlp:64-32-10",
            "device": "cpu",
            "optimizer": "sgd",
            "lr": 0.1,
            "seed": 0,
        }
        values.update(fields)
        return validate(RunConfig(**values))

    return make


@pytest.fixture
def build_strategy() -> Callable[[Any], Any]:
    """``build_strategy(config)``: the strategy with its context built as ``pnnctl.trainer.train`` does."""
    from pnnctl.data import shard_indices
    from pnnctl.network import parse_network
    from pnnctl.trainer import prepare_data
    from pnnctl.workers import Ledger, WorkerGroup
    from strategies import get_strategy
    from strategies.base import StrategyContext

    def build(config: Any) -> Any:
        device = torch.device("cpu")
        data, x_train, y_train = prepare_data(config, device)
        n_workers = config.effective_workers
        shards = shard_indices(data.y_train, n_workers, config.sharding, config.seed)
        ledger = Ledger(n_workers, parse_network(config.network))
        group = WorkerGroup(n_workers, ledger)
        ctx = StrategyContext(config, data, group, device, shards, x_train, y_train)
        return get_strategy(config.strategy)(ctx, config.strategy_options())

    return build


@dataclass
class CliResult:
    code: int
    out: str
    err: str

    @property
    def err_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., CliResult]:
    """``cli(*argv)``: ``pnnctl.cli.main(argv)`` in-process; exit code 0 when main returns normally."""
    from pnnctl.cli import main

    def run(*argv: str) -> CliResult:
        capsys.readouterr()  # drop whatever an earlier call printed
        try:
            main([str(a) for a in argv])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        else:
            code = 0
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH", "")]))
    env["OMP_NUM_THREADS"] = "1"
    env["MKL_NUM_THREADS"] = "1"
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    env.pop("LOCAL_RANK", None)
    return env


@pytest.fixture
def pnnctl_process() -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """``pnnctl_process(*args, cwd=...)``: start ``python -m pnnctl ARGS``; killed at teardown if alive."""
    started: list[subprocess.Popen[str]] = []

    def start(*args: str, cwd: Path) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pnnctl", *[str(a) for a in args]],
            cwd=cwd,
            env=subprocess_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def read_metrics(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Header and rows of a metrics.csv, as the strings written."""
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
        return list(reader.fieldnames or []), rows
