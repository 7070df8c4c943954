"""The one training loop every strategy runs under.

::

    pnnctl train --strategy allreduce --workers 4                 # simulated, one process
    pnnctl train --strategy allreduce --workers 4 --nproc 2       # two gloo processes on loopback
    torchrun --nproc-per-node 2 -m pnnctl train --strategy allreduce --workers 4

The loop knows nothing about which strategy runs: ``run_round`` -> ledger -> evaluate when due ->
append a metrics row -> checkpoint. It owns the clock, seeds, checkpoints, the divergence guard and
the run folder; rank 0 alone writes results.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import platform
import signal
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from pnnctl import __version__
from pnnctl.config import (
    RESUME_CARRIES,
    RunConfig,
    check_processes,
    config_to_dict,
    load_toml,
    parse_budget,
    samples_allowed,
    stored_form,
    to_toml,
)
from pnnctl.data import Dataset, data_folder, load_dataset, shard_indices, shard_stats
from pnnctl.errors import UsageError
from pnnctl.faults import fault_point
from pnnctl.io import (
    append_csv_row,
    atomic_write_bytes,
    atomic_write_text,
    folder_lock,
    json_text,
    repair_csv_tail,
)
from pnnctl.network import parse_network
from pnnctl.runtime import (
    Runtime,
    detect_runtime,
    keep_freed_cpu_memory,
    peak_memory_bytes,
    reset_peak_memory,
    resolve_device,
    wait_for_gpu,
)
from pnnctl.schema import METRIC_COLUMNS
from pnnctl.training import evaluate, model_is_finite, precision_context
from pnnctl.workers import Comm, Ledger, LocalComm, WorkerGroup
from strategies import get_strategy
from strategies.base import RoundResult, Strategy, StrategyContext

CHECKPOINT_FORMAT = 2  # 2: allreduce keeps one shared replica per process

#: Files of a run folder that belong to the trainer; strategy artifacts may not take these names.
RESERVED_FILES = frozenset({"metrics.csv", "summary.json", "config.toml", "env.json", "checkpoint.pt"})

#: Config fields that may change between a run and its resumption without changing its results.
RESUMABLE_CHANGES = frozenset({"out", "device", *RESUME_CARRIES})


class Progress(Protocol):
    """Where the trainer reports progress; the CLI supplies a rich one. The trainer never prints."""

    def start(self, run_id: str, total_epochs: float, epoch: float) -> None: ...

    def update(self, epoch: float, loss: float, acc: float | None) -> None: ...

    def finish(self, status: str) -> None: ...


class NullProgress:
    def start(self, run_id: str, total_epochs: float, epoch: float) -> None:
        return None

    def update(self, epoch: float, loss: float, acc: float | None) -> None:
        return None

    def finish(self, status: str) -> None:
        return None


@dataclass
class RunResult:
    run_dir: Path
    status: str
    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    notes: list[str] = field(default_factory=list)


@dataclass
class LoopState:
    """The trainer's own counters; checkpointed with the strategy's state."""

    round: int = 0
    samples: int = 0
    compute_s: float = 0.0
    collective_s: float = 0.0
    worker_compute_s: float = 0.0
    wall_s: float = 0.0
    next_eval_epoch: float = 0.0
    longest_round: float = 0.0  # epochs
    loss_sum: float = 0.0
    loss_rounds: int = 0
    phase: str = "train"
    extras: dict[str, float | str] = field(default_factory=dict)


#: Seconds within which a second stop signal is the same request: a signal sent to a ``--nproc`` run's
#: process group reaches each rank twice, straight and passed on by the parent.
SAME_STOP_REQUEST_S = 1.0


class StopRequest:
    """SIGINT/SIGTERM set a flag; the loop finishes the current round, checkpoints and stops.

    A second signal more than :data:`SAME_STOP_REQUEST_S` after the first stops at once."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._first_at = 0.0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread (e.g. a notebook worker): no handlers
            self._previous.clear()
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.signal is None:
            self.signal, self._first_at = signum, time.monotonic()
        elif time.monotonic() - self._first_at > SAME_STOP_REQUEST_S:  # asked again: stop now
            raise KeyboardInterrupt

    def __exit__(self, *_exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def git_sha() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def environment(config: RunConfig, runtime: Runtime, device: torch.device, backend: str) -> dict[str, Any]:
    import numpy

    return {
        "pnnctl": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_malloc_keeps_freed_memory": device.type == "cpu" and keep_freed_cpu_memory(),
        "device": str(device),
        "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" else "",
        "seed": config.seed,
        "data_dir": data_folder(config.dataset, config.data_dir),
        "git_sha": git_sha(),
        "world_size": runtime.world_size,
        "backend": backend,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def checkpoint_path(run_dir: Path, rank: int) -> Path:
    return run_dir / ("checkpoint.pt" if rank == 0 else f"checkpoint.rank{rank}.pt")


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue(), fault="checkpoint-write")


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Tensors and plain data only (``weights_only=True``): a checkpoint cannot run code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a damaged or foreign file
        raise UsageError("resume", f"{path} is not a readable pnnctl checkpoint ({type(exc).__name__})") from None


def changed_fields(before: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """Keys of two ``config_to_dict`` views that differ, leaving out what a resumption may change."""
    return [
        key
        for key in sorted(set(now) | set(before))
        if key not in RESUMABLE_CHANGES and now.get(key) != before.get(key)
    ]


def check_resumable(saved: dict[str, Any], config: RunConfig, path: Path, world_size: int = 1) -> None:
    if saved.get("format") != CHECKPOINT_FORMAT:
        msg = f"{path} has checkpoint format {saved.get('format')!r}; this pnnctl reads {CHECKPOINT_FORMAT}"
        raise UsageError("resume", msg)
    # torchrun's processes record nproc=1 in the config: the checkpoint says how many there were.
    written_by = int(saved.get("world_size", world_size))
    if written_by != world_size:
        raise _written_by_other_processes(path, written_by, world_size)
    now = config_to_dict(config)
    before = saved.get("config", {})
    changed = changed_fields(before, now)
    if changed:
        key = changed[0]
        raise UsageError(
            "resume",
            f"{path} was written with {key}={before.get(key)!r}, not {now.get(key)!r}; resume with the same config",
        )


def _before_last_round(
    candidates: list[dict[str, Any]], finished: dict[str, Any], comm: Comm
) -> dict[str, Any] | None:
    """Of this rank's checkpoints (``_agreed_checkpoint``'s candidates), the one a finished run kept from before
    its last round, where every rank has it at the same round; None for a run finished before pnnctl kept one."""
    before = next((c for c in candidates if not c.get("finished") and c["loop"]["round"] < finished["loop"]["round"]),
                  None)  # fmt: skip
    round_here = -1 if before is None else int(before["loop"]["round"])
    agreed = comm.min_int(round_here)
    if agreed < 0 or comm.any_true(round_here != agreed):
        return None
    return before


def _restore(saved: dict[str, Any], strategy: Strategy, comm: Comm) -> LoopState:
    """Load a checkpoint's strategy, ledger and wire counter; returns its loop state."""
    strategy.load_state_dict(saved["strategy"])
    strategy.ctx.group.ledger.load_state_dict(saved["ledger"])
    comm.wire_bytes_sent = float(saved.get("wire_bytes_sent", 0.0))
    return LoopState(**saved["loop"])


def _raise_on_every_rank(comm: Comm, problem: str) -> None:
    """Rank 0's usage error ("field: text"; none if empty) raised on every rank: one rank stopping alone would
    leave the others waiting for it in a collective."""
    problem = comm.share_text(problem)
    if problem:
        field_name, _, text = problem.partition(": ")
        raise UsageError(field_name, text)


def _written_by_other_processes(path: Path, written_by: int, world_size: int) -> UsageError:
    return UsageError("resume", f"{path} was written by {written_by} processes, not {world_size}; resume it with "
                                f"--nproc {written_by} (or torchrun --nproc-per-node {written_by})")


def _prepare_run_dir(run_dir: Path, resume: bool, config: RunConfig, held: contextlib.ExitStack) -> None:
    """Check that ``run_dir`` may be (re)written, make it and lock it for this process until ``held`` closes
    (``io.folder_lock``): two ``train --resume`` of one run at once wrote every metrics row twice."""
    if (run_dir / "grid.toml").exists() or (run_dir / "runs").is_dir():  # its report then showed this run alone
        raise UsageError("run_name", f"{run_dir} holds a compare grid, not a run; choose another --run-name or --out")
    if (run_dir / "metrics.csv").exists() and not resume:
        msg = f"{run_dir} already holds a run; pass --resume to continue it, or choose --run-name or --out"
        raise UsageError("run_name", msg)
    stored = run_dir / "config.toml"
    if resume and not checkpoint_path(run_dir, 0).exists() and stored.exists():
        # Nothing to continue: the run starts afresh, over the files of a run that may be another one.
        changed = changed_fields(load_toml(stored), stored_form(config))
        if changed:
            raise UsageError("resume", f"{run_dir} has no checkpoint to resume, and holds a run with other "
                                       f"settings (it differs in {', '.join(changed)}); choose --run-name or --out, "
                                       "or delete that run folder")
    held.enter_context(folder_lock(run_dir, "train"))  # makes the folder, and proves it writable
    for stale in run_dir.glob(".*.tmp"):  # half-written temporaries of a killed run; the real files are whole
        stale.unlink(missing_ok=True)


def _agreed_checkpoint(ckpt: Path, comm: Comm) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """This rank's checkpoint at the newest round every rank has (None: start afresh), and every checkpoint
    of this rank's that was read (``ckpt`` and its predecessor)."""
    candidates = [load_checkpoint(p) for p in (ckpt, ckpt.with_suffix(".prev.pt")) if p.exists()]
    newest = max((c["loop"]["round"] for c in candidates), default=-1)
    agreed = comm.min_int(newest)
    if agreed < 0:
        if comm.any_true(bool(candidates)):
            # Some ranks have a checkpoint and others none: more processes than wrote it. Starting afresh here
            # overwrote the run's files with a new run, saying "nothing to resume".
            problem = ""
            written_by = int(candidates[0].get("world_size", 1)) if candidates else comm.world_size
            if written_by != comm.world_size:
                problem = str(_written_by_other_processes(ckpt, written_by, comm.world_size))
            _raise_on_every_rank(comm, problem or f"resume: some processes' checkpoints beside {ckpt} are missing")
        return None, candidates
    for candidate in candidates:
        if candidate["loop"]["round"] == agreed:
            return candidate, candidates
    raise UsageError("resume", f"{ckpt} and its predecessor do not hold round {agreed}, which every rank has")


def _spent(state: LoopState, ledger: Ledger) -> dict[str, float]:
    """What the run has used of each thing a budget can cap: samples, the busiest worker's bytes, compute seconds."""
    return {"samples": state.samples, "bytes": float(ledger.sent[: ledger.n_workers].max()), "seconds": state.compute_s}


def _slack(kind: str, n_train: int) -> float:
    """How far below its cap ``_limits`` puts a limit of ``kind``: a billionth of an epoch for samples."""
    return 1e-9 * n_train if kind == "samples" else 0.0


def _limits(config: RunConfig, n_train: int) -> dict[str, float]:
    """The caps on what ``_spent`` measures: epochs and a samples budget cap samples; another budget its own.
    The samples cap is lowered by a billionth of an epoch, so that a fractional epoch (0.1 x 1437 samples,
    143.70000000000002) counts as reached by the samples that make it up."""
    limits = {"samples": samples_allowed(config, n_train) - _slack("samples", n_train)}
    budget = parse_budget(config.budget)
    if budget is not None and budget[0] != "samples":
        limits[budget[0]] = budget[1]
    return limits


def _samples_left(config: RunConfig, spent: dict[str, float], n_train: int, cut_by_bytes: bool) -> float:
    """What the next round may train, given what the run has ``spent``: the remainder of the epochs or a
    samples budget and, under a seconds budget or (for a strategy whose traffic grows with its steps) a
    bytes budget, the samples what is left of it pays for at the run's rate so far (a first round of one
    step measures the rate). A round of up to an epoch used to carry a run up to an epoch's bytes or
    seconds past its budget."""
    left = samples_allowed(config, n_train) - spent["samples"]
    limits = _limits(config, n_train)
    for kind in ("bytes", "seconds"):
        if kind not in limits or (kind == "bytes" and not cut_by_bytes):
            continue
        if spent["samples"] == 0:
            return min(left, 1.0)  # one step: a round holds at least one
        if spent[kind] > 0:
            left = min(left, (limits[kind] - spent[kind]) * spent["samples"] / spent[kind])
    return left


def _reached(spent: Mapping[str, float], limits: Mapping[str, float]) -> bool:
    return any(spent[kind] >= limit for kind, limit in limits.items())


def budget_reached_on_resume(
    before: Mapping[str, Any], config: RunConfig, spent: Mapping[str, float], n_train: int, run_dir: Path
) -> bool:
    """Whether a run trained under ``before`` (its config_to_dict view) that has ``spent`` this much
    (samples, busiest worker's bytes, compute seconds) has nothing left to train under ``config``.

    A run that went past a limit ``config`` lowers cannot be cut back: a usage error, since reporting it
    would show a longer run's results under the shorter command (and a resumed run used to train one
    more step past it)."""
    earlier = dataclasses.replace(config, epochs=float(before.get("epochs", config.epochs)),
                                  budget=str(before.get("budget", config.budget)))  # fmt: skip
    old, new = _limits(earlier, n_train), _limits(config, n_train)
    for kind, limit in new.items():
        # Past the cap itself, not the limit below it: a run stopped exactly at a samples budget was refused.
        if spent[kind] > limit + _slack(kind, n_train) and limit < old.get(kind, math.inf):
            key = "epochs" if kind == "samples" and config.epochs != earlier.epochs else "budget"
            trained = {"samples": f"{spent['samples'] / n_train:.4g} epochs", "bytes": f"{spent['bytes']:.4g} bytes",
                       "seconds": f"{spent['seconds']:.4g} s of compute"}[kind]  # fmt: skip
            raise UsageError(key, f"{run_dir} was trained to {trained} (epochs={earlier.epochs:g}, budget="
                                  f"{earlier.budget}) and cannot be cut back to epochs={config.epochs:g}, budget="
                                  f"{config.budget}; give it another --out or name, or delete that run folder")
    return _reached(spent, new)


def _unused_settings(config: RunConfig, strategy: Strategy, simulated: bool) -> list[str]:
    """Notes naming the fields set away from their defaults that this run does not read: those the strategy
    says it ignores, and the backend of a run simulated in one process."""
    defaults = RunConfig()
    notes = []
    for fields, why in strategy.unused_settings():
        changed = [f"{name}={getattr(config, name)}" for name in fields
                   if getattr(config, name) != getattr(defaults, name)]  # fmt: skip
        if changed:
            notes.append(f"{config.strategy} does not use {', '.join(changed)}: {why}")
    if simulated and config.backend != defaults.backend:
        notes.append(f"backend={config.backend} has no effect on a simulated run (it is for --nproc or torchrun)")
    return notes


def _sparse_evaluations(config: RunConfig, longest_round: float) -> list[str]:
    """A note where a round lasted more than a quarter longer than ``--eval-every``: the trainer evaluates
    between rounds, so evaluations came further apart than asked."""
    if longest_round <= 1.25 * config.eval_every:
        return []
    return [f"rounds of {config.strategy} lasted up to {longest_round:.3g} epochs where --eval-every asked for "
            f"{config.eval_every:g}: the trainer evaluates between rounds, so evaluations came further apart "
            "(a round is a period the strategy fixes, such as sil's epochs or local_steps, or a whole step)"]


def _budget_overshoot(
    config: RunConfig, before: dict[str, float], after: dict[str, float], n_train: int, strategy: Strategy
) -> list[str]:
    """Notes where the last round carried the run more than a quarter past a budget it began under.

    A last round is cut to what the epochs, a samples or seconds budget or (the strategy's traffic grows
    with its steps) a bytes budget allow, but only to a whole step of every worker, or not at all where a
    strategy cannot cut one (``Strategy.uncut_round``: sil's epochs; a local-sgd or ist exchange for bytes).
    """
    whole_step = "rounds stop on a whole step of every worker"
    why = {
        "samples": whole_step,
        "bytes": whole_step if strategy.traffic_grows_with_steps else "each round is one exchange, whatever its steps",
        "seconds": f"{whole_step}; the time left is turned into steps at the run's rate so far",
    }
    if strategy.uncut_round:  # the note said "rounds stop on a whole step" of sil's whole epochs
        why = dict.fromkeys(why, f"a round is {strategy.uncut_round}, which a budget does not cut")
    notes = []
    for kind, limit in _limits(config, n_train).items():
        if after[kind] <= 1.25 * limit or before[kind] >= limit:
            continue  # within a quarter, or stopped by another budget or the strategy
        last = after[kind] - before[kind]
        if kind == "samples":
            spent = f"trained {after[kind] / n_train:.3g} epochs ({after[kind]:.0f} samples)"
            allowed, took = f"{samples_allowed(config, n_train) / n_train:.3g}", f"held {last:.0f} samples"
        else:
            scale, unit = (1e6, "MB") if kind == "bytes" else (1.0, "s")
            spent = f"{'the busiest worker sent' if kind == 'bytes' else 'computed'} {after[kind] / scale:.3g} {unit}"
            allowed, took = f"{limit / scale:.3g} {unit}", f"took {last / scale:.3g} {unit}"
        notes.append(f"{spent} where the budget allowed {allowed}: the last round of {config.strategy} {took} "
                     f"({why[kind]})")
    return notes


def run_summary(rows: list[dict[str, Any]], config: RunConfig) -> dict[str, Any]:
    """Final and best figures and the first crossing of the target accuracy."""
    last = rows[-1]
    evaluated = [r for r in rows if not math.isnan(float(r["test_acc"]))]
    best = max(evaluated, key=lambda r: float(r["test_acc"])) if evaluated else last
    summary: dict[str, Any] = {
        "run_id": last["run_id"],
        "strategy": config.strategy,
        "status": last["status"],
        "final": {k: last[k] for k in METRIC_COLUMNS if k not in ("extras",)},
        "best_test_acc": float(best["test_acc"]),
        "best_epoch": float(best["epoch"]),
        "target_acc": config.target_acc or None,
        "to_target": None,
    }
    if config.target_acc:
        hit = next((r for r in evaluated if float(r["test_acc"]) >= config.target_acc), None)
        if hit is not None:
            summary["to_target"] = {
                key: hit[key]
                for key in ("round", "epoch", "samples_seen", "wall_s", "compute_s", "projected_s",
                            "bytes_sent_max_worker", "messages_max_worker")
            }
    return summary


def _extension_note(before: Mapping[str, Any], stopped_at_epoch: float) -> str:
    """What a finished run (its config ``before``) extended to larger limits keeps of the shorter run, where
    it kept no checkpoint from before its last round (runs finished before pnnctl kept one)."""
    budget = str(before.get("budget", "epochs"))
    limits = f"epochs={float(before.get('epochs', 0)):g}" + (f", budget {budget}" if budget != "epochs" else "")
    return (f"extended a finished run ({limits}; it stopped at epoch {stopped_at_epoch:.4g}): its rows up to there, "
            "its last evaluation among them, are that run's, and a last round it cut short to its limit is not "
            "redone, so this run can differ from one started with the new limits (a new --name or --run-name "
            "starts one)")


def _finished_summary(run_dir: Path, rows: list[dict[str, Any]], config: RunConfig) -> dict[str, Any]:
    """A finished run's summary.json, rebuilt from its rows where it is gone or damaged (a traceback on resume)."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
        if isinstance(summary, dict):
            return summary
    except (OSError, ValueError):
        pass
    if not rows:
        return {}
    summary = run_summary(rows, config)
    atomic_write_text(run_dir / "summary.json", json_text(summary, indent=2) + "\n")
    return summary


def _read_rows(path: Path) -> list[dict[str, Any]]:
    import csv

    if not path.exists():
        return []
    with open(path, encoding="utf-8", newline="") as handle:
        return [{key: _typed(value) for key, value in row.items()} for row in csv.DictReader(handle)]


def _typed(text: str) -> Any:
    """A CSV cell back to the int or float it was written from (text stays text)."""
    for kind in (int, float):
        try:
            return kind(text)
        except (TypeError, ValueError):
            continue
    return text


def _rewrite_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    import csv

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(METRIC_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row.get(k, "") for k in METRIC_COLUMNS})
    atomic_write_text(path, buffer.getvalue())


def prepare_data(config: RunConfig, device: torch.device) -> tuple[Dataset, torch.Tensor, torch.Tensor]:
    from pnnctl.data import SyntheticSpec

    data = load_dataset(
        config.dataset,
        data_dir=config.data_dir or None,
        download=config.download,
        seed=config.seed,
        synthetic=SyntheticSpec(**vars(config.synthetic)),
    )
    return data, data.x_train.to(device), data.y_train.to(device)


def _check_precision(config: RunConfig, device: torch.device) -> None:
    if config.precision == "tf32" and device.type != "cuda":
        raise UsageError("precision", f"tf32 needs a CUDA device; use fp32 or bf16 on {device}")


def check_run(config: RunConfig) -> None:
    """Raise the UsageError a run of ``config`` would start with (device, precision, data, or a model or
    worker count its strategy cannot take) without touching its run folder.

    The strategy is built simulated on the CPU: its checks are the same on every device and process count,
    and a grid's parent process should not take GPU memory its runs need.
    """
    _check_precision(config, resolve_device(config.device, 0, config.nproc))
    build_strategy(config, torch.device("cpu"))


def build_strategy(config: RunConfig, device: torch.device, comm: Comm | None = None) -> Strategy:
    """The run's strategy on its data shards, worker group and ledger (reached through ``strategy.ctx``);
    a setting the strategy cannot take for this data or model raises a UsageError here."""
    data, x_train, y_train = prepare_data(config, device)
    n_workers = config.effective_workers
    shards = shard_indices(data.y_train, n_workers, config.sharding, config.seed)
    group = WorkerGroup(n_workers, Ledger(n_workers, parse_network(config.network)), comm)
    ctx = StrategyContext(config, data, group, device, shards, x_train, y_train)
    return get_strategy(config.strategy)(ctx, config.strategy_options())


def train(
    config: RunConfig,
    *,
    resume: bool = False,
    progress: Progress | None = None,
    comm: Comm | None = None,
    runtime: Runtime | None = None,
) -> RunResult:
    """Run (or resume) one training run into ``<out>/<run_id>/`` and return its rows and summary."""
    with contextlib.ExitStack() as held:  # the run folder's lock, on the process that writes it
        return _train_holding(config, resume, progress, comm, runtime, held)


def _train_holding(
    config: RunConfig,
    resume: bool,
    progress: Progress | None,
    comm: Comm | None,
    runtime: Runtime | None,
    held: contextlib.ExitStack,
) -> RunResult:
    progress = progress or NullProgress()
    runtime = runtime or detect_runtime()
    device = resolve_device(config.device, runtime.local_rank, runtime.local_world_size)
    if device.type == "cpu":
        keep_freed_cpu_memory()
    elif device.type == "cuda":  # the run's GPU becomes the current one (ranks set theirs): synchronize()
        torch.cuda.set_device(device)  # waits for it, not for cuda:0 (--device cuda:1 timed kernel launches)
    reset_peak_memory(device)
    _check_precision(config, device)
    # Every round runs under the run's precision (bf16: autocast), so strategies need no precision
    # code of their own; evaluations run in fp32 (tf32 in a tf32 run).
    eval_precision = "tf32" if config.precision == "tf32" else "fp32"
    n_workers = config.effective_workers
    if comm is not None:
        check_processes(config, comm.world_size)

    run_dir = Path(config.out) / config.run_id
    metrics_path = run_dir / "metrics.csv"
    main = runtime.is_main
    shared_comm = comm or LocalComm()

    # The strategy is built before the run folder is touched: a config it refuses leaves nothing behind.
    strategy = build_strategy(config, device, comm)
    ctx, group = strategy.ctx, strategy.ctx.group
    data, shards, y_train, ledger = ctx.data, ctx.shards, ctx.y_train, group.ledger
    unused = _unused_settings(config, strategy, simulated=comm is None)

    problem = ""
    if main:
        try:
            _prepare_run_dir(run_dir, resume, config, held)
        except UsageError as exc:
            problem = str(exc)
    _raise_on_every_rank(shared_comm, problem)
    x_test, y_test = data.x_test.to(device), data.y_test.to(device)
    backend = "simulated" if comm is None else getattr(comm, "backend", "distributed")

    state = LoopState()
    warnings: list[str] = []  # about the run's outcome, kept in summary.json (notes are about this call)
    rows: list[dict[str, Any]] = []
    ranks: list[dict[str, Any]] = []  # measured per process at the last evaluation
    notes: list[str] = []
    extended: list[str] = []  # the note on a finished run given larger limits
    ckpt = checkpoint_path(run_dir, runtime.rank)
    saved, kept = _agreed_checkpoint(ckpt, shared_comm) if resume else (None, [])
    if resume and saved is None:  # a mistyped --run-name would otherwise start a new run without a word
        notes.append(f"nothing to resume in {run_dir} (no checkpoint): started a new run")
    if saved is not None:
        check_resumable(saved, config, ckpt, shared_comm.world_size)
        state = _restore(saved, strategy, shared_comm)
        reached = budget_reached_on_resume(saved["config"], config, _spent(state, ledger), len(y_train), run_dir)
        # A finished run asked for more goes on from before its last round: that round was cut to the old
        # limits and ended in an evaluation off the schedule, which a run started with the new limits has not.
        before = _before_last_round(kept, saved, shared_comm) if saved.get("finished") and not reached else None
        if before is not None:
            notes.append(f"extended a finished run from round {before['loop']['round']}, before its last round, as "
                         "a run started with these limits trains")
            state, saved = _restore(before, strategy, shared_comm), before
            save_checkpoint(ckpt, before)  # the finished one goes first: a kill from here resumes from this round
        torch.set_rng_state(saved["torch_rng"])
        if main:
            if repair_csv_tail(metrics_path):
                notes.append(f"dropped a torn last line of {metrics_path} left by an earlier crash")
            rows = [r for r in _read_rows(metrics_path) if int(r["round"]) <= state.round]
            _rewrite_rows(metrics_path, rows)
        # Finished and nothing more asked (an epochs or budget change may ask for more): report it as it is.
        if saved.get("finished") and not reached:
            extended = [_extension_note(saved["config"], state.samples / len(y_train))]
        if saved.get("finished") and reached:
            summary = _finished_summary(run_dir, rows, config) if main else {}
            return RunResult(run_dir, summary.get("status", "finished"), rows, summary, notes)
    if main:  # the config the run goes on with: a resumption may ask for more epochs or another budget
        atomic_write_text(run_dir / "config.toml", to_toml(config_to_dict(config)))
    if saved is None and main:
        if resume and metrics_path.exists():
            _rewrite_rows(metrics_path, [])  # no checkpoint to continue from: start the rows afresh too
        env = environment(config, runtime, device, backend)
        if not any("sharding" in fields for fields, _ in strategy.unused_settings()):  # not what psl, sil train on
            env["shards"] = shard_stats(data.y_train, shards, data.n_classes)
        atomic_write_text(run_dir / "env.json", json.dumps(env, indent=2) + "\n")
        for name, text in strategy.artifacts().items():
            if "/" in name or name.startswith(".") or name in RESERVED_FILES:
                raise ValueError(f"strategy {config.strategy} asked for an artifact named {name!r}")
            atomic_write_text(run_dir / name, text)

    footprint = strategy.footprint()
    n_train = len(y_train)

    def make_row(status: str) -> dict[str, Any]:
        model = strategy.eval_model()
        finite = model_is_finite(model)
        with precision_context(device, eval_precision):
            test_loss, test_acc = evaluate(model, x_test, y_test) if finite else (float("nan"), float("nan"))
            extras = {**state.extras, **strategy.eval_extras()}
        totals = ledger.totals()
        per_rank = shared_comm.gather_floats([float(peak_memory_bytes(device)), shared_comm.wire_bytes_sent])
        ranks[:] = [
            {"rank": r, "peak_memory_bytes": int(values[0]), "wire_bytes_sent": values[1]}
            for r, values in enumerate(per_rank)
        ]
        row = {
            "run_id": config.run_id,
            "cell": "/".join(
                [config.strategy, config.dataset, config.model, f"w{n_workers}"]
                + ([config.variant] if config.variant else [])
            ),
            "strategy": config.strategy,
            "dataset": config.dataset,
            "model": config.model,
            "seed": config.seed,
            "workers": n_workers,
            "world_size": runtime.world_size,
            "backend": backend,
            "round": state.round,
            "epoch": round(state.samples / n_train, 6),
            "samples_seen": state.samples,
            "phase": state.phase,
            "wall_s": round(state.wall_s, 6),
            "compute_s": round(state.compute_s, 6),
            "collective_s": round(state.collective_s, 6),
            "worker_compute_s": round(state.worker_compute_s, 6),
            "train_loss": state.loss_sum / state.loss_rounds if state.loss_rounds else float("nan"),
            "test_loss": test_loss,
            "test_acc": test_acc,
            **{k: v for k, v in totals.items() if k in METRIC_COLUMNS},
            "params_max_worker": footprint.params,
            "memory_max_worker_bytes": footprint.memory_bytes,
            "projected_s": round(state.worker_compute_s + totals["comm_s"], 6),
            "network": ledger.network.name,
            "peak_rss_bytes": int(max(r[0] for r in per_rank)),
            "wire_bytes_sent_max_rank": max(r[1] for r in per_rank),
            "status": status if finite else "diverged",
            "extras": json.dumps(extras, sort_keys=True),
        }
        state.loss_sum, state.loss_rounds = 0.0, 0
        return row

    def full_summary() -> dict[str, Any]:
        """summary.json's content: the rows' summary, each rank's measurements and the run's warnings."""
        summary = run_summary(rows, config)
        summary["ranks"] = ranks
        if warnings:  # kept with the run: a compare prints none of its cells' notes as they go
            summary["warnings"] = warnings
        return summary

    def emit(row: dict[str, Any]) -> None:
        rows.append(row)
        if main:
            append_csv_row(metrics_path, METRIC_COLUMNS, row)
            fault_point("metrics-append")
            write_summary()
        progress.update(float(row["epoch"]), float(row["train_loss"]), float(row["test_acc"]))

    def write_summary() -> None:
        atomic_write_text(run_dir / "summary.json", json_text(full_summary(), indent=2) + "\n", fault="summary-write")

    def checkpoint(finished: bool = False) -> None:
        if (shared_comm.world_size > 1 or finished) and ckpt.exists():
            # Ranks may die between their writes; keep the previous round so all can agree on one. A finished
            # run keeps it too: extended with larger limits, it goes on from there (see _before_last_round).
            os.replace(ckpt, ckpt.with_suffix(".prev.pt"))
        save_checkpoint(
            ckpt,
            {
                "format": CHECKPOINT_FORMAT,
                "pnnctl": __version__,
                "config": config_to_dict(config),
                "strategy": strategy.state_dict(),
                "ledger": ledger.state_dict(),
                "loop": vars(state).copy(),
                "torch_rng": torch.get_rng_state(),
                "finished": finished,
                "world_size": shared_comm.world_size,
                "wire_bytes_sent": shared_comm.wire_bytes_sent,
            },
        )

    # A samples budget below the epochs is what the run will train (bytes and seconds cannot be foreseen).
    progress.start(config.run_id, samples_allowed(config, n_train) / n_train, state.samples / n_train)
    # Said whatever the outcome: a diverged or interrupted run dropped them (only a finished one set them).
    standing = warnings = extended + unused
    if saved is None:  # every rank decides alike: only rank 0 holds the rows, and emitting is a collective
        emit(make_row("running"))
        state.next_eval_epoch = config.eval_every
        checkpoint()  # so that a run diverging in its first round still has a good checkpoint

    status = "running"
    if saved is not None and reached:
        # Resumed with a limit the run stopped exactly at (a lower --epochs or budget): nothing is left to
        # train, and the run ends as an uninterrupted one with that limit would have (it used to train a step).
        warnings = standing + _sparse_evaluations(config, state.longest_round)
        if shared_comm.any_true(bool(rows) and int(rows[-1]["round"]) == state.round):
            rows[-1]["status"] = "finished"  # evaluated at this round already: that row is the last
            if main:
                _rewrite_rows(metrics_path, rows)
                write_summary()
        else:
            emit(make_row("finished"))
        checkpoint(finished=True)
        status = "finished"
    with StopRequest() as stop:
        while status == "running":
            if shared_comm.any_true(stop.signal is not None):
                checkpoint()
                status = "interrupted"
                break
            started = time.perf_counter()
            collectives_before = group.collective_s
            spent_before = _spent(state, ledger)
            try:
                with precision_context(device, config.precision):
                    samples_left = _samples_left(config, spent_before, n_train, strategy.traffic_grows_with_steps)
                    result = strategy.run_round(samples_left)
                wait_for_gpu()
            except RuntimeError as exc:
                # torch refuses a float32 overflow (say, Adam's lr / (1 - beta1) past 3.4e38): that is divergence.
                if "overflow" not in str(exc):
                    raise
                result = RoundResult(loss=float("inf"), samples=0)
            # Ranks agree on the round's time (the slowest rank's): each measuring its own, a seconds budget
            # stopped one rank a round before the others, which then waited in a collective until the timeout.
            round_compute = max(times[0] for times in shared_comm.gather_floats([time.perf_counter() - started]))
            state.compute_s += round_compute
            state.collective_s += group.collective_s - collectives_before
            # This process computed its n_local workers one after another; with a machine per worker
            # the round takes its share of that: divide by the workers that ran side by side here.
            parallel = result.parallel_workers if result.parallel_workers is not None else n_workers
            side_by_side = max(1.0, parallel * group.n_local / n_workers)
            state.worker_compute_s += round_compute / side_by_side
            ledger.end_round()
            fault_point("round")
            state.round += 1
            state.samples += result.samples
            state.phase = result.phase
            state.extras = dict(result.extras)
            if math.isfinite(result.loss):
                state.loss_sum += result.loss
                state.loss_rounds += 1
            else:
                state.wall_s += time.perf_counter() - started
                emit(make_row("diverged"))
                status = "diverged"
                break
            epoch = state.samples / n_train
            spent = _spent(state, ledger)
            done = _reached(spent, _limits(config, n_train)) or strategy.is_done()
            overshoot = _budget_overshoot(config, spent_before, spent, n_train, strategy) if done else []
            if not overshoot:  # a last round that ran past the budget has the budget's note, not this one too
                # The last round counts as well: a run of one long round (local-sgd's period, 0.5 epochs with
                # --eval-every 0.1) evaluated once at its end, and said nothing.
                state.longest_round = max(state.longest_round, result.samples / n_train)
            if done:
                warnings = standing + overshoot + _sparse_evaluations(config, state.longest_round)
            if done or epoch >= state.next_eval_epoch - 1e-9:
                # The next multiple of eval_every after this epoch (a round may cross several).
                state.next_eval_epoch = (math.floor(epoch / config.eval_every + 1e-9) + 1) * config.eval_every
                state.wall_s += time.perf_counter() - started
                row = make_row("finished" if done else "running")
                started = time.perf_counter()
                emit(row)
                if row["status"] == "diverged":
                    status = "diverged"
                    break
            if done:
                status = "finished"
                state.wall_s += time.perf_counter() - started
                checkpoint(finished=True)
                break
            if state.round % config.checkpoint_every == 0:
                checkpoint()
            state.wall_s += time.perf_counter() - started
    progress.finish(status)
    notes.extend(warnings)
    summary = full_summary() if rows else {}  # what summary.json holds (an interrupted run adds its signal)
    if status == "interrupted":
        summary["status"] = "interrupted"
        summary["signal"] = signal.Signals(stop.signal).name if stop.signal else "SIGTERM"
        if main:
            atomic_write_text(run_dir / "summary.json", json_text(summary, indent=2) + "\n")
    return RunResult(run_dir, status, rows, summary, notes)
