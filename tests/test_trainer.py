"""The training loop end to end: accuracy on real data, the run folder, resume after SIGKILL and
SIGINT, divergence, and refusing to overwrite a run."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import is_timing_column, read_metrics

from distributed_utils import deterministic
from pnnctl.config import RunConfig, resolve_config, validate
from pnnctl.data import load_dataset
from pnnctl.schema import METRIC_COLUMNS
from pnnctl.trainer import load_checkpoint, train

pytestmark = pytest.mark.usefixtures("one_thread")

# A local-sgd run on digits: 2 workers x 16 samples x 4 local steps = 128 samples a round, so
# ~68 rounds over 6 epochs, with an evaluation every half epoch.
RESUME_ARGS = [
    "train", "--strategy", "local-sgd", "--dataset", "digits", "--model", "mlp:64-16-10", "--workers", "2",
    "--epochs", "6", "--eval-every", "0.5", "--batch-size", "16", "--lr", "0.1", "--device", "cpu",
    "--set", "local-sgd.local_steps=4",
]  # fmt: skip
RESUME_RUN_ID = "local-sgd-w2-s0"

#: Cumulative columns of metrics.csv: never smaller than in an earlier row.
CUMULATIVE_COLUMNS = (
    "round", "epoch", "samples_seen", "bytes_sent_total", "bytes_recv_total", "bytes_sent_max_worker",
    "bytes_recv_max_worker", "messages_total", "messages_max_worker", "comm_s", "bytes_sent_master",
    "bytes_recv_master",
)  # fmt: skip


def _resume_config(out: Path) -> RunConfig:
    flags = {
        "strategy": "local-sgd", "dataset": "digits", "model": "mlp:64-16-10", "workers": 2, "epochs": 6.0,
        "eval_every": 0.5, "batch_size": 16, "lr": 0.1, "device": "cpu", "out": str(out),
    }  # fmt: skip
    return resolve_config(None, flags, ["local-sgd.local_steps=4"])


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The resume runs' config trained in one go (in-process, one thread like the subprocesses)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = train(_resume_config(tmp_path_factory.mktemp("uninterrupted")))
    finally:
        torch.set_num_threads(previous)
    assert result.status == "finished"
    return result.run_dir


def _comparable(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{k: v for k, v in row.items() if not is_timing_column(k)} for row in rows]


def assert_same_metrics(resumed_dir: Path, reference_dir: Path) -> None:
    header, rows = read_metrics(resumed_dir / "metrics.csv")
    ref_header, ref_rows = read_metrics(reference_dir / "metrics.csv")
    assert header == ref_header
    assert [r["round"] for r in rows] == [r["round"] for r in ref_rows]
    for row, ref in zip(_comparable(rows), _comparable(ref_rows), strict=True):
        assert row == ref, f"round {ref['round']}"
    assert rows[-1]["status"] == "finished"


def _wait_for_progress(run_dir: Path, proc: subprocess.Popen[str], timeout: float = 120.0) -> None:
    """Until the run has a checkpoint and has logged its first evaluation after the initial one."""

    def progressed() -> bool:
        metrics = run_dir / "metrics.csv"
        return (run_dir / "checkpoint.pt").exists() and metrics.exists() and metrics.read_text().count("\n") >= 3

    deadline = time.monotonic() + timeout
    while not progressed():
        if proc.poll() is not None:
            _, err = proc.communicate()
            raise AssertionError(f"pnnctl exited ({proc.returncode}) before making progress in {run_dir}:\n{err}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no progress in {run_dir} within {timeout} s")
        time.sleep(0.002)


def _assert_stopped_mid_run(run_dir: Path, reference_dir: Path) -> dict:
    """The interruption really happened mid-run: an unfinished checkpoint some rounds in, rows missing."""
    saved = load_checkpoint(run_dir / "checkpoint.pt")
    _, rows = read_metrics(run_dir / "metrics.csv")
    _, ref_rows = read_metrics(reference_dir / "metrics.csv")
    assert not saved["finished"]
    assert 2 <= saved["loop"]["round"] < int(ref_rows[-1]["round"])
    assert len(rows) < len(ref_rows)
    assert all(r["status"] == "running" for r in rows)
    return saved


def test_centralized_mlp_reaches_90_percent_on_mnist_small_within_10_epochs(tmp_path: Path) -> None:
    config = validate(
        RunConfig(strategy="centralized", dataset="mnist-small", epochs=10, lr=0.05, batch_size=32,
                  device="cpu", out=str(tmp_path))
    )  # fmt: skip
    result = train(config)
    assert result.status == "finished"
    final = result.rows[-1]
    assert float(final["epoch"]) <= 10 + 1e-9
    assert float(final["test_acc"]) >= 0.90
    _, rows = read_metrics(result.run_dir / "metrics.csv")
    assert float(rows[-1]["test_acc"]) == pytest.approx(float(final["test_acc"]))
    assert float(rows[0]["test_acc"]) < 0.5  # it learned: the untrained model is far below the floor


def _run_main(args: list[str]) -> int:
    """``pnnctl.cli.main(args)`` in this process, on one thread; the exit code a process would have."""
    from pnnctl.cli import main

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    finally:
        torch.set_num_threads(previous)
    return 0


def test_resume_after_sigkill_gives_the_metrics_of_an_uninterrupted_run(
    tmp_path: Path, pnnctl_process, uninterrupted_run: Path
) -> None:
    out = tmp_path / "out"
    run_dir = out / RESUME_RUN_ID
    # A checkpoint every 3 rounds: the kill usually lands after rounds (and metrics rows) that the
    # checkpoint does not hold, which the resumed run must drop and train again.
    args = [*RESUME_ARGS, "--set", "checkpoint_every=3", "--out", out]
    proc = pnnctl_process(*args, cwd=tmp_path)
    _wait_for_progress(run_dir, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    _assert_stopped_mid_run(run_dir, uninterrupted_run)

    # Resumed in this process: what matters is that the killed one really died mid-run.
    assert _run_main([*args, "--resume"]) == 0
    assert_same_metrics(run_dir, uninterrupted_run)
    summary = json.loads((run_dir / "summary.json").read_text())
    reference = json.loads((uninterrupted_run / "summary.json").read_text())
    assert summary["status"] == "finished"
    assert summary["best_test_acc"] == reference["best_test_acc"]


@dataclass
class InterruptedRun:
    run_dir: Path
    out: Path
    returncode: int
    stderr: str
    interrupted_summary: dict
    resumed_exit_code: int


@pytest.fixture(scope="module")
def sigint_run(tmp_path_factory: pytest.TempPathFactory, uninterrupted_run: Path) -> InterruptedRun:
    """A run stopped by SIGINT some rounds in, then resumed with ``--resume`` (in this process)."""
    from conftest import subprocess_env

    cwd = tmp_path_factory.mktemp("sigint")
    out = cwd / "out"
    run_dir = out / RESUME_RUN_ID
    cmd = [sys.executable, "-m", "pnnctl", *RESUME_ARGS, "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=cwd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    try:
        _wait_for_progress(run_dir, proc)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    _assert_stopped_mid_run(run_dir, uninterrupted_run)
    interrupted_summary = json.loads((run_dir / "summary.json").read_text())
    resumed = _run_main([*RESUME_ARGS, "--out", out, "--resume"])
    return InterruptedRun(run_dir, out, proc.returncode, err, interrupted_summary, resumed)


RESUME_MARKER = "resume with: "


def test_sigint_checkpoints_and_prints_the_resume_command(sigint_run: InterruptedRun) -> None:
    assert "Traceback" not in sigint_run.stderr
    assert RESUME_MARKER in sigint_run.stderr, sigint_run.stderr
    # The command may be folded over several lines (see the xfail below); its words must be right.
    printed = shlex.split(sigint_run.stderr.split(RESUME_MARKER, 1)[1])
    assert printed == ["pnnctl", *RESUME_ARGS, "--out", str(sigint_run.out), "--resume"]
    assert sigint_run.interrupted_summary["status"] == "interrupted"
    assert sigint_run.interrupted_summary["signal"] == "SIGINT"
    assert sigint_run.interrupted_summary["ranks"][0]["peak_memory_bytes"] > 0  # rewritten whole, not without it


def test_resuming_after_sigint_gives_the_metrics_of_an_uninterrupted_run(
    sigint_run: InterruptedRun, uninterrupted_run: Path
) -> None:
    assert sigint_run.resumed_exit_code == 0
    assert_same_metrics(sigint_run.run_dir, uninterrupted_run)


def test_sigint_prints_the_resume_command_on_one_line(sigint_run: InterruptedRun) -> None:
    line = next(line for line in sigint_run.stderr.splitlines() if RESUME_MARKER in line)
    assert shlex.split(line.split(RESUME_MARKER, 1)[1])[-1] == "--resume"


def test_sigint_exits_with_130(sigint_run: InterruptedRun) -> None:
    assert sigint_run.returncode == 130


def test_metrics_csv_has_the_schema_columns_and_cumulative_columns_never_decrease(uninterrupted_run: Path) -> None:
    header, rows = read_metrics(uninterrupted_run / "metrics.csv")
    assert header == list(METRIC_COLUMNS)
    assert len(rows) >= 10
    for column in (c for c in CUMULATIVE_COLUMNS if c in METRIC_COLUMNS):
        series = [float(r[column]) for r in rows]
        assert all(b >= a for a, b in itertools.pairwise(series)), column
    assert float(rows[-1]["bytes_sent_max_worker"]) > 0
    assert [r["status"] for r in rows] == ["running"] * (len(rows) - 1) + ["finished"]
    assert all(json.loads(r["extras"]) is not None for r in rows)
    summary = json.loads((uninterrupted_run / "summary.json").read_text())
    accuracies = [float(r["test_acc"]) for r in rows]
    assert summary["best_test_acc"] == pytest.approx(max(accuracies), rel=0, abs=0)
    assert float(summary["best_epoch"]) == float(rows[accuracies.index(max(accuracies))]["epoch"])
    assert summary["status"] == "finished"
    assert summary["final"]["round"] == int(rows[-1]["round"])


def test_run_folder_holds_config_env_metrics_summary_and_checkpoint(uninterrupted_run: Path) -> None:
    for name in ("config.toml", "env.json", "metrics.csv", "summary.json", "checkpoint.pt"):
        assert (uninterrupted_run / name).is_file(), name
    env = json.loads((uninterrupted_run / "env.json").read_text())
    n_train = len(load_dataset("digits").y_train)
    assert [s["worker"] for s in env["shards"]] == [0, 1]
    assert sum(s["samples"] for s in env["shards"]) == n_train  # every training sample, once


# -- divergence -------------------------------------------------------------------------------

DIVERGE_ARGS = [
    "train", "--strategy", "allreduce", "--workers", "2", "--dataset", "digits", "--model", "mlp:64-32-10",
    "--epochs", "2", "--lr", "1e8", "--optimizer", "sgd", "--set", "allreduce.steps_per_round=1",
    "--device", "cpu", "--backend", "gloo",
]  # fmt: skip


@dataclass
class DivergedRun:
    run_dir: Path
    exit_code: int


@pytest.fixture(scope="module")
def diverged_run(tmp_path_factory: pytest.TempPathFactory) -> DivergedRun:
    from pnnctl.cli import main

    out = tmp_path_factory.mktemp("diverged")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        main([*DIVERGE_ARGS, "--out", str(out)])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    else:
        code = 0  # what the process would exit with when main returns
    finally:
        torch.set_num_threads(previous)
    return DivergedRun(out / "allreduce-w2-s0", code)


def test_a_huge_learning_rate_ends_the_run_as_diverged_with_a_finite_checkpoint(diverged_run: DivergedRun) -> None:
    _, rows = read_metrics(diverged_run.run_dir / "metrics.csv")
    assert rows[-1]["status"] == "diverged"
    assert all(r["status"] == "running" for r in rows[:-1])
    summary = json.loads((diverged_run.run_dir / "summary.json").read_text())
    assert summary["status"] == "diverged"
    # A setting the run ignores is said however it ends (only a finished run's summary said it).
    assert summary["warnings"] == ["backend=gloo has no effect on a simulated run (it is for --nproc or torchrun)"]
    saved = load_checkpoint(diverged_run.run_dir / "checkpoint.pt")
    assert not saved["finished"]
    assert saved["loop"]["round"] < int(rows[-1]["round"])
    tensors = list(saved["strategy"]["model"].values())
    assert tensors
    for t in tensors:
        assert torch.isfinite(t).all()
    assert math.isfinite(float(saved["loop"]["loss_sum"]))


def test_a_diverged_run_exits_with_3(diverged_run: DivergedRun) -> None:
    assert diverged_run.exit_code == 3


# -- refusing to overwrite ----------------------------------------------------------------------


def test_a_second_train_into_the_same_run_folder_is_refused_and_leaves_it_unchanged(cli, tmp_path: Path) -> None:
    args = ["train", "--strategy", "local-sgd", "--dataset", "digits", "--model", "mlp:64-16-10", "--workers", "2",
            "--epochs", "0.5", "--device", "cpu", "--out", str(tmp_path)]  # fmt: skip
    first = cli(*args)
    assert first.code == 0, first.err
    run_dir = tmp_path / "local-sgd-w2-s0"
    before = {name: (run_dir / name).read_bytes() for name in ("metrics.csv", "summary.json", "config.toml")}

    second = cli(*args, "--lr", "0.01")
    assert second.code == 2
    assert len(second.err_lines) == 1, second.err
    assert second.err_lines[0].startswith("error: ")
    assert "--resume" in second.err_lines[0]
    for name, content in before.items():
        assert (run_dir / name).read_bytes() == content, name


def test_resume_with_a_changed_training_field_is_refused(cli, tmp_path: Path) -> None:
    args = ["train", "--strategy", "local-sgd", "--dataset", "digits", "--model", "mlp:64-16-10", "--workers", "2",
            "--epochs", "0.5", "--device", "cpu", "--out", str(tmp_path)]  # fmt: skip
    assert cli(*args).code == 0
    metrics = (tmp_path / "local-sgd-w2-s0" / "metrics.csv").read_bytes()
    refused = cli(*args, "--lr", "0.2", "--resume")
    assert refused.code == 2
    assert refused.err_lines == [refused.err_lines[0]] and refused.err_lines[0].startswith("error: resume: ")
    assert "lr" in refused.err_lines[0]
    assert (tmp_path / "local-sgd-w2-s0" / "metrics.csv").read_bytes() == metrics


# -- evaluation schedule --------------------------------------------------------------------------


def test_a_tiny_eval_every_is_refused_or_trained_without_hanging(small_config, tmp_path: Path) -> None:
    from pnnctl.errors import UsageError

    def give_up(_signum: int, _frame: object) -> None:
        raise TimeoutError("train() still running after 2 s")

    previous = signal.signal(signal.SIGALRM, give_up)
    signal.alarm(2)
    try:
        try:
            config = small_config(strategy="local-sgd", workers=2, epochs=0.3, eval_every=1e-300,
                                  options={"local_steps": 8}, checkpoint_every=1000, out=str(tmp_path))  # fmt: skip
        except UsageError as exc:
            assert exc.field == "eval_every"
            return
        result = train(config)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert result.status == "finished"


def test_evaluations_follow_eval_every(small_config, tmp_path: Path) -> None:
    config = small_config(strategy="local-sgd", workers=2, batch_size=16, epochs=2, eval_every=0.5,
                          options={"local_steps": 2}, checkpoint_every=1000, out=str(tmp_path))  # fmt: skip
    result = train(config)
    epochs = [float(r["epoch"]) for r in result.rows]
    assert epochs[0] == 0.0
    # One row at each first crossing of 0.5, 1.0, 1.5 and the last at the end of the budget.
    crossings = [next(e for e in epochs if e >= k * 0.5 - 1e-9) for k in (1, 2, 3)]
    assert epochs[1:4] == crossings
    assert len(epochs) == 5 and epochs[-1] >= 2.0 - 1e-9
    per_round = 2 * 16 * 2 / len(load_dataset("digits").y_train)
    assert all(0 <= e - k * 0.5 < per_round + 1e-6 for e, k in zip(epochs[1:4], (1, 2, 3), strict=True))


# -- the summary of a resumed run -------------------------------------------------------------------


class InterruptAtEpoch:
    """A Progress that sends this process SIGINT once an evaluation reaches ``epoch``."""

    def __init__(self, epoch: float) -> None:
        self.epoch = epoch
        self.sent = False

    def start(self, run_id: str, total_epochs: float, epoch: float) -> None:
        return None

    def update(self, epoch: float, loss: float, acc: float | None) -> None:
        if epoch >= self.epoch and not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGINT)  # the trainer's handler finishes the round and stops

    def finish(self, status: str) -> None:
        return None


def _without_timing(value):
    if isinstance(value, dict):
        return {k: _without_timing(v) for k, v in value.items() if not is_timing_column(k)}
    if isinstance(value, list):  # summary.json's per-rank records
        return [_without_timing(v) for v in value]
    return value


def test_a_run_interrupted_after_reaching_its_target_has_the_same_summary_once_resumed(
    small_config, tmp_path: Path
) -> None:
    fields = dict(strategy="local-sgd", workers=2, model="mlp:64-16-10", batch_size=16, epochs=2.5, eval_every=0.5,
                  target_acc=0.5, checkpoint_every=1000, options={"local_steps": 4})  # fmt: skip
    reference = train(small_config(out=str(tmp_path / "whole"), **fields))
    assert reference.summary["to_target"] is not None
    assert float(reference.summary["to_target"]["epoch"]) < 1.5

    config = small_config(out=str(tmp_path / "split"), **fields)
    interrupted = train(config, progress=InterruptAtEpoch(1.5))
    assert interrupted.status == "interrupted"
    resumed = train(config, resume=True)
    assert resumed.status == "finished"
    _, rows = read_metrics(resumed.run_dir / "metrics.csv")
    _, reference_rows = read_metrics(reference.run_dir / "metrics.csv")
    assert _comparable(rows) == _comparable(reference_rows)  # the metrics do match
    on_disk = json.loads((resumed.run_dir / "summary.json").read_text())
    reference_on_disk = json.loads((reference.run_dir / "summary.json").read_text())
    assert _without_timing(on_disk) == _without_timing(reference_on_disk)


@pytest.mark.parametrize("system_malloc", ["", "1"])
def test_cpu_runs_keep_freed_memory_unless_told_not_to(system_malloc: str, tmp_path: Path) -> None:
    import platform

    args = ["train", "--strategy", "centralized", "--dataset", "digits", "--model", "mlp:64-32-10", "--epochs", "0.5",
            "--out", str(tmp_path)]
    env = {**os.environ, "PNNCTL_SYSTEM_MALLOC": system_malloc}
    result = subprocess.run([sys.executable, "-m", "pnnctl", *args], capture_output=True, text=True, env=env,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    recorded = json.loads((tmp_path / "centralized-w1-s0" / "env.json").read_text())["cpu_malloc_keeps_freed_memory"]
    assert recorded is (platform.libc_ver()[0] == "glibc" and not system_malloc)


# -- round lengths and the budget -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("strategy", "workers", "samples_per_step"),
    [("centralized", 1, 16), ("allreduce", 2, 32), ("consensus", 2, 32), ("psl", 10, 16)],
)
def test_a_run_of_part_of_an_epoch_stops_there_and_evaluates_on_time(
    small_config, tmp_path: Path, strategy: str, workers: int, samples_per_step: int
) -> None:
    # Rounds left at their default length hold an epoch at most; they used to hold exactly one,
    # so --epochs 0.3 trained a whole epoch and eval_every 0.1 evaluated once.
    optimizer = {"optimizer": "adam", "lr": 1e-3} if strategy == "psl" else {}  # psl's loss diverges under SGD 0.1
    config = small_config(strategy=strategy, workers=workers, batch_size=16, epochs=0.3, eval_every=0.1,
                          checkpoint_every=1000, out=str(tmp_path), **optimizer)  # fmt: skip
    result = train(config)
    assert result.status == "finished"
    n_train = len(load_dataset("digits").y_train)
    steps_per_round = math.ceil(0.1 * n_train / samples_per_step)
    epochs = [float(r["epoch"]) for r in result.rows]
    per_round = steps_per_round * samples_per_step / n_train
    assert epochs[:-1] == pytest.approx([k * per_round for k in range(len(epochs) - 1)])
    # The last round is cut to the budget, to a whole step.
    assert epochs[-2] < 0.3
    assert int(result.rows[-1]["samples_seen"]) == math.ceil(0.3 * n_train / samples_per_step) * samples_per_step
    assert result.notes == []


def test_a_strategy_whose_rounds_outlast_eval_every_says_so_and_one_that_follows_it_does_not(
    small_config, tmp_path: Path
) -> None:
    # sil's rounds are whole epochs: --eval-every 0.5 evaluates once an epoch, which used to pass in silence.
    sil = train(small_config(strategy="sil", workers=2, epochs=2, eval_every=0.5, optimizer="adam", lr=1e-3,
                             options={"recovery_epochs": 1}, out=str(tmp_path), run_name="sil"))  # fmt: skip
    assert [float(r["epoch"]) for r in sil.rows] == [0.0, 1.0, 2.0]
    assert sil.notes == [
        "rounds of sil lasted up to 1 epochs where --eval-every asked for 0.5: the trainer evaluates between "
        "rounds, so evaluations came further apart (a round is a period the strategy fixes, such as sil's epochs "
        "or local_steps, or a whole step)"
    ]
    assert json.loads((sil.run_dir / "summary.json").read_text())["warnings"] == sil.notes
    # Rounds left open follow eval_every, to a whole step: no note.
    allreduce = train(small_config(strategy="allreduce", workers=2, epochs=1, eval_every=0.25, out=str(tmp_path),
                                   run_name="allreduce"))  # fmt: skip
    assert len(allreduce.rows) == 5 and allreduce.notes == []
    # A period shorter than eval_every (0.89 epochs against 1) still lands evaluations up to 1.78 epochs
    # apart, on the round that crosses each mark: that is not noted.
    local = train(small_config(strategy="local-sgd", workers=4, batch_size=16, epochs=3, out=str(tmp_path),
                               run_name="local"))  # fmt: skip
    epochs = [float(r["epoch"]) for r in local.rows]
    assert max(b - a for a, b in itertools.pairwise(epochs)) > 1.25 and local.notes == []
    # A run of one long round (32 workers x 32: a step is 0.71 epochs) is the budget's note alone.
    single = train(small_config(strategy="allreduce", workers=32, epochs=1, out=str(tmp_path), run_name="single"))
    assert [int(r["samples_seen"]) for r in single.rows] == [0, 2048]
    assert len(single.notes) == 1 and single.notes[0].startswith("trained 1.42 epochs (2048 samples)")


@pytest.mark.parametrize(
    ("strategy", "options", "expected"),
    [
        ("consensus", {}, "consensus does not use optimizer=adam, momentum=0.9: consensus's update is its own "
                          "(--lr sets its step; regularise with consensus.reg and lam)"),
        ("dgd", {}, "dgd does not use optimizer=adam, momentum=0.9: dgd's update is its own "
                    "(--lr sets its step; regularise with dgd.reg and lam)"),
        ("psl", {"optimizer": "lbfgs"}, "psl does not use optimizer=adam, momentum=0.9: the master optimizer is "
                                        "psl.optimizer=lbfgs"),
        ("psl", {}, None),  # psl.optimizer=config runs the run's Adam
        ("allreduce", {}, None),
    ],
)
def test_an_optimizer_setting_a_strategy_does_not_use_is_noted(
    small_config, tmp_path: Path, strategy: str, options: dict, expected: str | None
) -> None:
    # An --optimizer adam grid trained consensus and dgd with their own updates without a word.
    config = small_config(strategy=strategy, workers=2, epochs=0.1, optimizer="adam", lr=1e-3, momentum=0.9,
                          options=options, out=str(tmp_path))  # fmt: skip
    result = train(config)
    unused = [note for note in result.notes if "does not use" in note]
    assert unused == ([expected] if expected else [])
    assert json.loads((result.run_dir / "summary.json").read_text()).get("warnings", [])[: len(unused)] == unused


@pytest.mark.parametrize(
    ("strategy", "model", "epochs", "expected"),
    [
        ("psl", "mlp:64-32-10", 0.1, "psl does not use sharding=by-class: its workers own output classes and see "
                                     "every sample (psl.placement)"),
        ("sil", "mlp:64-32-24-10", 2.0, "sil does not use sharding=by-class: sil partitions depth, not data: every "
                                        "partition trains on the whole training set"),
        ("allreduce", "mlp:64-32-10", 0.1, None),
    ],
)
def test_a_sharding_a_strategy_does_not_use_is_noted_and_no_shards_are_recorded(
    small_config, tmp_path: Path, strategy: str, model: str, epochs: float, expected: str | None
) -> None:
    # psl and sil trained exactly as with iid data, silently, and env.json listed by-class shards they never used.
    config = small_config(strategy=strategy, model=model, workers=2, epochs=epochs, sharding="by-class",
                          optimizer="adam", lr=1e-3, out=str(tmp_path))  # fmt: skip
    result = train(config)
    unused = [note for note in result.notes if "does not use" in note]
    assert unused == ([expected] if expected else [])
    env = json.loads((result.run_dir / "env.json").read_text())
    assert ("shards" in env) == (expected is None)


def test_a_backend_on_a_simulated_run_is_noted(small_config, tmp_path: Path) -> None:
    result = train(small_config(strategy="allreduce", workers=2, epochs=0.5, backend="gloo", out=str(tmp_path)))
    assert result.notes == ["backend=gloo has no effect on a simulated run (it is for --nproc or torchrun)"]


def test_a_samples_budget_shortens_default_rounds(small_config, tmp_path: Path) -> None:
    config = small_config(strategy="allreduce", workers=2, batch_size=16, epochs=5, budget="samples=200",
                          checkpoint_every=1000, out=str(tmp_path))  # fmt: skip
    result = train(config)
    assert int(result.rows[-1]["samples_seen"]) == math.ceil(200 / 32) * 32  # 224, not an epoch's 1,440


@pytest.mark.parametrize("strategy", ["local-sgd", "ist"])
def test_a_fixed_period_is_cut_short_in_the_last_round_and_still_synchronises(
    small_config, tmp_path: Path, strategy: str
) -> None:
    # A period of 4 workers x 16 x 20 local steps holds 1,280 samples; one epoch of digits (1,442)
    # is a whole period and then 3 steps (192 samples), not a second whole period (2,560 in all).
    config = small_config(strategy=strategy, workers=4, batch_size=16, epochs=1.0, eval_every=0.5,
                          checkpoint_every=1000, out=str(tmp_path))  # fmt: skip
    result = train(config)
    n_train = len(load_dataset("digits").y_train)
    assert [int(r["samples_seen"]) for r in result.rows] == [0, 1280, 1280 + math.ceil((n_train - 1280) / 64) * 64]
    # The period is longer than the 0.5 epochs between evaluations asked for, and the run says so.
    assert result.notes == [
        f"rounds of {strategy} lasted up to {1280 / n_train:.3g} epochs where --eval-every asked for 0.5: the "
        "trainer evaluates between rounds, so evaluations came further apart (a round is a period the strategy "
        "fixes, such as sil's epochs or local_steps, or a whole step)"
    ]
    # Both rounds ended in their synchronisation: the bytes of two whole exchanges.
    first_round_bytes = float(result.rows[1]["bytes_sent_total"])
    assert float(result.rows[2]["bytes_sent_total"]) == pytest.approx(2 * first_round_bytes)
    if strategy == "local-sgd":
        replicas = load_checkpoint(result.run_dir / "checkpoint.pt")["strategy"]["model"]
        for name, stacked in replicas.items():
            assert torch.equal(stacked, stacked[:1].expand_as(stacked)), name


def test_a_run_of_one_round_longer_than_eval_every_is_noted(small_config, tmp_path: Path) -> None:
    # local-sgd's period of 20 steps of 2 x 32 samples (0.89 epochs) is cut to the 0.5 epochs asked: one round,
    # evaluated only at its end, where --eval-every asked for five evaluations. The last round was left out.
    config = small_config(strategy="local-sgd", workers=2, batch_size=32, epochs=0.5, eval_every=0.1,
                          checkpoint_every=1000, out=str(tmp_path))  # fmt: skip
    result = train(config)
    n_train = len(load_dataset("digits").y_train)
    trained = float(result.rows[-1]["samples_seen"]) / n_train
    assert [float(r["epoch"]) for r in result.rows] == [0.0, round(trained, 6)] and 0.5 <= trained < 0.55
    assert result.notes == [
        f"rounds of local-sgd lasted up to {trained:.3g} epochs where --eval-every asked for 0.1: the trainer "
        "evaluates between rounds, so evaluations came further apart (a round is a period the strategy fixes, such "
        "as sil's epochs or local_steps, or a whole step)"
    ]


def test_a_round_that_carries_the_run_well_past_its_budget_is_noted(small_config, tmp_path: Path) -> None:
    # A round stops on a whole step of every worker: 2 x 32 = 64 samples, so 0.1 epochs of digits
    # (144 samples) train 3 steps, 192 samples: a third over, which the run says.
    config = small_config(strategy="allreduce", workers=2, batch_size=32, epochs=0.1, checkpoint_every=1000,
                          out=str(tmp_path))  # fmt: skip
    result = train(config)
    assert int(result.rows[-1]["samples_seen"]) == 192
    (note,) = result.notes
    assert "where the budget allowed 0.1" in note and "the last round of allreduce held 192 samples" in note
    assert json.loads((result.run_dir / "summary.json").read_text())["warnings"] == [note]


def test_a_bytes_budget_stops_a_strategy_that_talks_every_step_on_the_step_that_reaches_it(
    small_config, tmp_path: Path
) -> None:
    # Each allreduce step is a ring all-reduce of the 2,410 parameters: 2 x 3/4 x 9,640 = 14,460 bytes per
    # worker (4 workers x 16), so 150,000 bytes take 11 steps. The open round is an epoch (23 steps,
    # 332,580 bytes): the run used to train it whole. Now a first step measures the cost and the next
    # round is cut to what the bytes left pay for.
    step_bytes = 2 * 3 / 4 * 4 * (64 * 32 + 32 + 32 * 10 + 10)
    config = small_config(strategy="allreduce", workers=4, batch_size=16, budget="bytes=150000",
                          checkpoint_every=1000, out=str(tmp_path))  # fmt: skip
    result = train(config)
    assert float(result.rows[-1]["bytes_sent_max_worker"]) == pytest.approx(11 * step_bytes)
    assert int(result.rows[-1]["samples_seen"]) == 11 * 64 and int(result.rows[-1]["round"]) == 2
    assert result.notes == []


def test_a_seconds_budget_cuts_rounds_to_the_time_left_at_the_runs_rate(
    small_config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A clock that moves only while a round trains, 1 ms per sample: allreduce's steps (4 workers x 16) take
    # 64 ms, so 0.7 s pays for 10.9 steps and the run stops on the 11th. The open round is an epoch (23
    # steps, 1.47 s): the run used to train it whole. A first step measures the rate, the next round is cut.
    import types

    from strategies.baselines import AllReduce

    clock = [0.0]
    fake_time = types.SimpleNamespace(**{name: getattr(time, name) for name in dir(time) if not name.startswith("_")})
    fake_time.perf_counter = lambda: clock[0]
    monkeypatch.setattr("pnnctl.trainer.time", fake_time)
    trained = AllReduce.run_round

    def one_ms_a_sample(self, samples_left: float = math.inf):
        result = trained(self, samples_left)
        clock[0] += 1e-3 * result.samples
        return result

    monkeypatch.setattr(AllReduce, "run_round", one_ms_a_sample)
    config = small_config(strategy="allreduce", workers=4, batch_size=16, budget="seconds=0.7",
                          checkpoint_every=1000, out=str(tmp_path))  # fmt: skip
    result = train(config)
    assert int(result.rows[-1]["samples_seen"]) == 11 * 64 and int(result.rows[-1]["round"]) == 2
    assert float(result.rows[-1]["compute_s"]) == pytest.approx(0.704) and result.notes == []


def test_a_bytes_budget_below_one_exchange_of_local_sgd_is_overshot_and_noted(small_config, tmp_path: Path) -> None:
    # local-sgd's round is one parameter average (14,460 bytes per worker here) however few its steps, so
    # a budget of 10,000 bytes cannot be met; the run trains its first period and says so.
    config = small_config(strategy="local-sgd", workers=4, batch_size=16, budget="bytes=10000",
                          checkpoint_every=1000, out=str(tmp_path))  # fmt: skip
    result = train(config)
    assert int(result.rows[-1]["samples_seen"]) == 20 * 64  # a whole period: the budget does not cut it
    (note,) = result.notes
    assert note == ("the busiest worker sent 0.0145 MB where the budget allowed 0.01 MB: the last round of local-sgd "
                    "took 0.0145 MB (each round is one exchange, whatever its steps)")  # fmt: skip
    assert json.loads((result.run_dir / "summary.json").read_text())["warnings"] == [note]


def test_budget_notes_name_what_was_overshot_and_only_past_a_quarter() -> None:
    from pnnctl.trainer import _budget_overshoot
    from strategies.baselines import AllReduce

    config = validate(RunConfig(strategy="allreduce", dataset="digits", epochs=1.0, budget="seconds=10"))
    before = {"samples": 500.0, "bytes": 0.0, "seconds": 9.0}
    assert _budget_overshoot(config, before, {**before, "seconds": 12.5}, 1000, AllReduce) == []  # 25% over: quiet
    (note,) = _budget_overshoot(config, before, {**before, "seconds": 13.0}, 1000, AllReduce)
    assert note.startswith("computed 13 s where the budget allowed 10 s: the last round of allreduce took 4 s (")
    assert _budget_overshoot(config, {**before, "seconds": 10.0}, {**before, "seconds": 30.0}, 1000, AllReduce) == []
    (note,) = _budget_overshoot(config, before, {**before, "samples": 1300.0}, 1000, AllReduce)  # the epochs cap too
    assert note.startswith("trained 1.3 epochs (1300 samples) where the budget allowed 1: the last round")


def assert_same_training(first: list[dict], second: list[dict]) -> None:
    """Two runs' metrics rows agree in every column but measured time, memory and the run's name."""
    # check_like: rows read back from metrics.csv hold its column order, fresh rows the trainer's
    pd.testing.assert_frame_equal(*(deterministic(pd.DataFrame(rows)) for rows in (first, second)), check_like=True)


def test_a_run_extended_on_resume_trains_what_a_fresh_run_of_the_new_budget_does(
    small_config, tmp_path: Path
) -> None:
    # The shorter run's one round was cut to its budget (704 samples) and evaluated there; extended, the
    # run goes on from before that round, so its rows and weights are the fresh run's. It used to keep the
    # 704-sample row and round (rows at 0, 704, 1408), and before that to run a whole round past the budget.
    def config(budget: str, out: Path) -> RunConfig:
        return small_config(strategy="allreduce", workers=2, batch_size=32, epochs=5.0, budget=budget,
                            checkpoint_every=1000, out=str(out))  # fmt: skip

    short = train(config("samples=700", tmp_path / "extended"))
    assert [int(r["samples_seen"]) for r in short.rows] == [0, 704]
    extended = train(config("samples=1400", tmp_path / "extended"), resume=True)
    fresh = train(config("samples=1400", tmp_path / "fresh"))
    assert [int(r["samples_seen"]) for r in fresh.rows] == [0, 1408]
    assert_same_training(extended.rows, fresh.rows)
    assert extended.notes == ["extended a finished run from round 0, before its last round, as a run started with "
                              "these limits trains"]
    assert "warnings" not in json.loads((extended.run_dir / "summary.json").read_text())
    _, written = read_metrics(extended.run_dir / "metrics.csv")
    assert [int(r["samples_seen"]) for r in written] == [0, 1408]
    weights = [load_checkpoint(run.run_dir / "checkpoint.pt")["strategy"]["model"] for run in (extended, fresh)]
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[1])


def test_a_run_finished_without_a_checkpoint_before_its_last_round_extends_from_its_end(
    small_config, tmp_path: Path
) -> None:
    # Runs finished by an older pnnctl kept no checkpoint.prev.pt: they go on from where they stopped,
    # and say what that keeps of the shorter run.
    def config(epochs: float) -> RunConfig:
        return small_config(strategy="centralized", epochs=epochs, eval_every=0.3, checkpoint_every=1000,
                            out=str(tmp_path))  # fmt: skip

    first = train(config(0.5))
    (first.run_dir / "checkpoint.prev.pt").unlink()
    longer = train(config(1.0), resume=True)
    assert [float(r["epoch"]) for r in longer.rows][:3] == [float(r["epoch"]) for r in first.rows]
    (note,) = [n for n in longer.notes if n.startswith("extended a finished run")]
    assert note.startswith(f"extended a finished run (epochs=0.5; it stopped at epoch "
                           f"{float(first.rows[-1]['epoch']):.4g}): its rows up to there")
    assert note in json.loads((first.run_dir / "summary.json").read_text())["warnings"]


def test_resuming_a_run_that_is_not_there_says_it_started_a_new_one(small_config, tmp_path: Path) -> None:
    config = small_config(strategy="allreduce", workers=2, epochs=0.5, out=str(tmp_path), run_name="typo")
    resumed = train(config, resume=True)
    assert resumed.status == "finished"
    assert resumed.notes == [f"nothing to resume in {tmp_path / 'typo'} (no checkpoint): started a new run"]
    fresh = train(dataclasses.replace(config, run_name="fresh"))
    assert fresh.notes == []
    assert [r["test_acc"] for r in resumed.rows] == [r["test_acc"] for r in fresh.rows]


def test_resuming_with_more_epochs_extends_the_run_and_its_config_file(small_config, tmp_path: Path) -> None:
    # Epoch 1 is off the 0.3-epoch schedule: the shorter run evaluated there because it ended there, and
    # its last round was cut to it. The extended run has neither, as a run started with 2 epochs.
    def config(epochs: float, out: Path) -> RunConfig:
        return small_config(strategy="centralized", epochs=epochs, eval_every=0.3, checkpoint_every=2,
                            out=str(out))  # fmt: skip

    first = train(config(1.0, tmp_path))
    assert "epochs = 1.0" in (first.run_dir / "config.toml").read_text()
    stopped_at = first.rows[-1]["epoch"]
    assert stopped_at == pytest.approx(1.0, abs=0.03)
    longer = train(config(2.0, tmp_path), resume=True)
    fresh = train(config(2.0, tmp_path / "fresh"))
    assert "epochs = 2.0" in (first.run_dir / "config.toml").read_text()
    assert stopped_at not in [r["epoch"] for r in longer.rows]
    assert_same_training(longer.rows, fresh.rows)
    _, written = read_metrics(first.run_dir / "metrics.csv")
    assert [float(r["epoch"]) for r in written] == [r["epoch"] for r in fresh.rows]
    assert [float(r["test_acc"]) for r in written] == [r["test_acc"] for r in fresh.rows]
    assert "warnings" not in json.loads((first.run_dir / "summary.json").read_text())


@pytest.mark.parametrize("finished", [True, False])
def test_a_run_resumed_with_a_smaller_budget_than_it_trained_is_refused(
    finished: bool, small_config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # It used to train another round (a killed run: one more step past the new budget) or report the
    # longer run under the shorter budget (a finished one).
    first = small_config(strategy="local-sgd", workers=2, epochs=5.0, budget="samples=700", eval_every=0.1,
                         options={"local_steps": 2}, out=str(tmp_path))  # fmt: skip
    import pnnctl.trainer
    from pnnctl.errors import UsageError

    class Killed(Exception):
        pass

    rounds = itertools.count(1)

    def killed_in_round_4(name: str) -> None:
        if name == "round" and not finished and next(rounds) == 4:
            raise Killed  # after round 3's checkpoint, as a SIGKILL would leave it

    monkeypatch.setattr(pnnctl.trainer, "fault_point", killed_in_round_4)
    with contextlib.suppress(Killed):
        train(first)
    run_dir = tmp_path / first.run_id
    saved = load_checkpoint(run_dir / "checkpoint.pt")
    assert saved["finished"] == finished
    trained = int(saved["loop"]["samples"])
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    with pytest.raises(UsageError, match=r"budget: .* was trained to .* cannot be cut back to epochs=5, budget=sampl"):
        train(dataclasses.replace(first, budget=f"samples={trained - 100}"), resume=True)
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
    if finished:  # a budget it has just reached, and no lower than before, is no cut: the run stands
        again = train(dataclasses.replace(first, budget=f"samples={trained}"), resume=True)
        _, written = read_metrics(run_dir / "metrics.csv")
        assert [int(row["samples_seen"]) for row in again.rows] == [int(row["samples_seen"]) for row in written]
        assert int(written[-1]["samples_seen"]) == trained


def test_resume_without_a_checkpoint_does_not_overwrite_another_run(small_config, tmp_path: Path) -> None:
    from pnnctl.errors import UsageError

    first = small_config(strategy="allreduce", workers=2, epochs=0.3, out=str(tmp_path), run_name="shared")
    train(first)
    run_dir = tmp_path / "shared"
    for kept in run_dir.glob("checkpoint*.pt"):  # say, the disk filled up before the first checkpoint
        kept.unlink()
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    other = dataclasses.replace(first, strategy="local-sgd", workers=3)
    with pytest.raises(UsageError, match=r"no checkpoint to resume.*differs in .*strategy.*workers"):
        train(other, resume=True)  # it used to replace the allreduce run's files with a local-sgd run
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
    again = train(first, resume=True)  # the same run starts afresh, as before
    assert again.status == "finished" and any("nothing to resume" in note for note in again.notes)


def test_a_second_stop_signal_stops_at_once_unless_it_is_the_same_request() -> None:
    from pnnctl.trainer import SAME_STOP_REQUEST_S, StopRequest

    stop = StopRequest()
    stop._handle(signal.SIGTERM, None)
    stop._handle(signal.SIGINT, None)  # at once: the same request reaching this rank a second way
    assert stop.signal == signal.SIGTERM
    stop._first_at -= SAME_STOP_REQUEST_S + 0.1  # asked again later: the user wants out now
    with pytest.raises(KeyboardInterrupt):
        stop._handle(signal.SIGINT, None)


_ROUNDS_IMPORT = """
import sys
import torch
from pnnctl.config import RunConfig
from pnnctl.trainer import build_strategy

name = sys.argv[1]
config = RunConfig(strategy=name, workers=1 if name == "centralized" else 2, dataset="digits", epochs=2,
                   model="mlp:64-32-32-10", optimizer="adam", lr=0.01)
strategy = build_strategy(config, torch.device("cpu"))
strategy.run_round()
strategy.run_round()
print(" ".join(sorted(sys.modules)))
"""


def test_no_strategy_imports_torch_dynamo() -> None:
    # The first torch.optim optimizer a process builds imports torch._dynamo, 1.5 s on this CPU: ist built
    # its optimizer in every round, so a fresh process's first ist round counted that import as compute
    # (the committed ist grid's first cell: 1.26 s first round, 0.30 s after), and every run and rank paid
    # it at start-up. Each strategy runs in a fresh process, where nothing has imported it yet; all of them
    # at once, so the test takes one start-up.
    from conftest import subprocess_env

    from strategies import STRATEGIES

    started = {
        name: subprocess.Popen([sys.executable, "-c", _ROUNDS_IMPORT, name], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=subprocess_env())
        for name in STRATEGIES
    }
    for name, process in started.items():
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err[-2000:]
        assert not [module for module in out.split() if module.startswith("torch._dynamo")], (name, out)
