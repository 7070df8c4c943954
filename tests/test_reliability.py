"""Killed at any point, a run or a grid resumes to the same result; write errors leave results intact."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import pandas as pd
import pytest

from distributed_utils import deterministic, run_cli

RUN = ["train", "--strategy", "local-sgd", "--dataset", "digits", "--model", "mlp:64-32-10", "--workers", "3",
       "--epochs", "3", "--eval-every", "0.5", "--set", "local-sgd.local_steps=5", "--set", "momentum=0.9"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    out = tmp_path_factory.mktemp("uninterrupted")
    result = run_cli([*RUN, "--out", str(out)])
    assert result.returncode == 0, result.stderr
    return pd.read_csv(out / "local-sgd-w3-s0" / "metrics.csv")


@pytest.mark.parametrize(
    "point", ["round:4", "checkpoint-write:3", "metrics-append:2", "summary-write:3", "checkpoint-write:1"]
)
def test_sigkill_at_any_point_resumes_to_identical_metrics(point: str, tmp_path: Path, uninterrupted) -> None:
    killed = run_cli([*RUN, "--out", str(tmp_path)], env={"PNNCTL_FAULT": point})
    assert killed.returncode == -9, f"the fault point {point} was not reached: {killed.stderr[-500:]}"
    run_dir = tmp_path / "local-sgd-w3-s0"
    # What the kill left is whole: the real files parse (a half-written temporary may remain).
    if (run_dir / "summary.json").exists():
        json.loads((run_dir / "summary.json").read_text())
    pd.read_csv(run_dir / "metrics.csv")
    resumed = run_cli([*RUN, "--out", str(tmp_path), "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert not list(run_dir.glob(".*.tmp")), "resume leaves no temporaries behind"
    final = pd.read_csv(run_dir / "metrics.csv")
    pd.testing.assert_frame_equal(deterministic(final), deterministic(uninterrupted))


WITHOUT_EPOCHS = RUN[: RUN.index("--epochs")] + RUN[RUN.index("--epochs") + 2 :]


def test_a_resume_that_does_not_repeat_the_epochs_trains_to_the_runs_own(tmp_path: Path) -> None:
    # It trained to the default 5 epochs instead, whatever the run was started with.
    whole = run_cli([*WITHOUT_EPOCHS, "--epochs", "1.5", "--out", str(tmp_path / "whole")])
    assert whole.returncode == 0, whole.stderr
    killed = run_cli([*WITHOUT_EPOCHS, "--epochs", "1.5", "--out", str(tmp_path)], env={"PNNCTL_FAULT": "round:3"})
    assert killed.returncode == -9
    resumed = run_cli([*WITHOUT_EPOCHS, "--out", str(tmp_path), "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    metrics = [pd.read_csv(folder / "local-sgd-w3-s0" / "metrics.csv") for folder in (tmp_path, tmp_path / "whole")]
    pd.testing.assert_frame_equal(*(deterministic(rows) for rows in metrics))
    assert metrics[0]["epoch"].iloc[-1] == pytest.approx(1.5, abs=0.05)


@pytest.mark.parametrize("damage", ["config.toml gone", "summary.json gone", "summary.json torn"])
def test_a_finished_run_with_a_lost_file_resumes_as_it_was(cli, damage: str, tmp_path: Path) -> None:
    # Without config.toml a plain --resume trained the finished 0.5-epoch run on to the default 5 epochs and
    # overwrote it; without a whole summary.json it was a FileNotFoundError or JSONDecodeError traceback.
    args = [*WITHOUT_EPOCHS, "--out", tmp_path]
    assert cli(*args, "--epochs", "0.5").code == 0
    run_dir = tmp_path / "local-sgd-w3-s0"
    rows = (run_dir / "metrics.csv").read_text()
    summary = json.loads((run_dir / "summary.json").read_text())
    name, _, how = damage.partition(" ")
    if how == "gone":
        (run_dir / name).unlink()
    else:
        (run_dir / name).write_text((run_dir / name).read_text()[:40])
    resumed = cli(*args, "--resume")
    assert resumed.code == 0, resumed.err
    assert (run_dir / "metrics.csv").read_text() == rows
    rebuilt = json.loads((run_dir / "summary.json").read_text())
    assert rebuilt["final"] == summary["final"] and rebuilt["status"] == "finished"


def test_a_resume_with_a_budget_the_checkpoint_meets_exactly_finishes_without_training(tmp_path: Path) -> None:
    import torch

    killed = run_cli([*RUN, "--out", str(tmp_path)], env={"PNNCTL_FAULT": "round:4"})
    assert killed.returncode == -9
    run_dir = tmp_path / "local-sgd-w3-s0"
    samples = torch.load(run_dir / "checkpoint.pt", weights_only=True)["loop"]["samples"]
    budget = ["--budget", f"samples={samples}"]
    # It was refused as "trained past" the budget it had exactly reached.
    resumed = run_cli([*RUN, *budget, "--out", str(tmp_path), "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    whole = run_cli([*RUN, *budget, "--out", str(tmp_path / "whole")])
    assert whole.returncode == 0, whole.stderr
    metrics = [pd.read_csv(folder / "local-sgd-w3-s0" / "metrics.csv") for folder in (tmp_path, tmp_path / "whole")]
    pd.testing.assert_frame_equal(*(deterministic(rows) for rows in metrics))
    assert metrics[0]["samples_seen"].iloc[-1] == samples and metrics[0]["status"].iloc[-1] == "finished"


def test_a_run_being_written_is_not_resumed_alongside(cli, tmp_path: Path, uninterrupted) -> None:
    # Two resumptions at once appended every metrics row twice.
    killed = run_cli([*RUN, "--out", str(tmp_path)], env={"PNNCTL_FAULT": "round:3"})
    assert killed.returncode == -9
    run_dir = tmp_path / "local-sgd-w3-s0"
    (run_dir / ".lock").write_text(str(os.getppid()))  # a live process writes it
    before = {p: p.read_bytes() for p in run_dir.iterdir()}
    refused = cli(*RUN, "--out", tmp_path, "--resume")
    assert refused.code == 2
    assert refused.err_lines == [f"error: out: {run_dir} is being written by another train (pid {os.getppid()}); "
                                 "wait for it"]
    assert {p: p.read_bytes() for p in run_dir.iterdir()} == before
    (run_dir / ".lock").write_text("999999999")  # left by a killed run: taken over
    assert cli(*RUN, "--out", tmp_path, "--resume").code == 0
    assert not (run_dir / ".lock").exists()
    final = pd.read_csv(run_dir / "metrics.csv")
    pd.testing.assert_frame_equal(deterministic(final), deterministic(uninterrupted))


def test_torn_metrics_line_is_dropped_on_resume_with_a_warning(tmp_path: Path, uninterrupted) -> None:
    killed = run_cli([*RUN, "--out", str(tmp_path)], env={"PNNCTL_FAULT": "round:5"})
    assert killed.returncode == -9
    metrics = tmp_path / "local-sgd-w3-s0" / "metrics.csv"
    with open(metrics, "a") as handle:  # what a crash in the middle of a write would leave
        handle.write("local-sgd-w3-s0,local-sgd,dig")
    resumed = run_cli([*RUN, "--out", str(tmp_path), "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert "warning: dropped a torn last line" in resumed.stderr
    pd.testing.assert_frame_equal(deterministic(pd.read_csv(metrics)), deterministic(uninterrupted))


def test_checkpoint_from_another_config_is_refused(tmp_path: Path) -> None:
    killed = run_cli([*RUN, "--out", str(tmp_path)], env={"PNNCTL_FAULT": "round:3"})
    assert killed.returncode == -9
    metrics = tmp_path / "local-sgd-w3-s0" / "metrics.csv"
    before = metrics.read_bytes()
    changed = run_cli([*RUN, "--out", str(tmp_path), "--resume", "--lr", "0.2"])
    assert changed.returncode == 2
    assert changed.stderr.strip().splitlines() == [changed.stderr.strip()]
    assert "error: resume:" in changed.stderr and "lr=" in changed.stderr
    assert metrics.read_bytes() == before


def test_corrupt_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    killed = run_cli([*RUN, "--out", str(tmp_path)], env={"PNNCTL_FAULT": "round:3"})
    assert killed.returncode == -9
    (tmp_path / "local-sgd-w3-s0" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    result = run_cli([*RUN, "--out", str(tmp_path), "--resume"])
    assert result.returncode == 2
    assert result.stderr.startswith("error: resume:") and "Traceback" not in result.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_results_folder_is_a_clear_error(tmp_path: Path) -> None:
    tmp_path.chmod(0o500)
    try:
        result = run_cli([*RUN, "--out", str(tmp_path / "sub")])
    finally:
        tmp_path.chmod(0o700)
    assert result.returncode == 2 and result.stderr.startswith("error: out:")


def test_write_error_keeps_earlier_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pnnctl import io as pio
    from pnnctl.errors import UsageError

    target = tmp_path / "summary.json"
    pio.atomic_write_text(target, "old")

    def full_disk(*_a, **_k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pio.os, "fsync", full_disk)
    with pytest.raises(UsageError, match="No space left on device"):
        pio.atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


GRID = ["compare", "--strategies", "centralized,local-sgd", "--workers", "2", "--datasets", "digits",
        "--model", "mlp:64-32-10", "--epochs", "1", "--eval-every", "0.5", "--name", "grid"]


def test_killed_compare_resumes_without_redoing_finished_cells(tmp_path: Path) -> None:
    killed = run_cli([*GRID, "--out", str(tmp_path)], env={"PNNCTL_FAULT": "plot:3"})
    assert killed.returncode == -9
    runs = tmp_path / "grid" / "runs"
    finished = {p: p.stat().st_mtime_ns for p in runs.glob("*/metrics.csv")}
    assert len(finished) == 2
    resumed = run_cli([*GRID, "--out", str(tmp_path)])
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stderr.count("already finished, skipped") == 2
    assert {p: p.stat().st_mtime_ns for p in runs.glob("*/metrics.csv")} == finished
    assert (tmp_path / "grid" / "report.md").exists()


def test_a_grid_rerun_with_other_settings_is_refused_before_anything_changes(cli, tmp_path: Path) -> None:
    first = cli(*GRID, "--out", tmp_path, "--no-plots")
    assert first.code == 0, first.err
    folder = tmp_path / "grid"
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    # Skipping the finished cells would report lr 0.05 results under an lr 0.01 command.
    changed = cli(*GRID, "--out", tmp_path, "--no-plots", "--lr", "0.01")
    assert changed.code == 2
    (line,) = changed.err_lines
    assert line.startswith("error: lr: ") and "runs/centralized-digits-w1-s0 was trained with lr=0.05" in line
    assert "asks 0.01" in line and "--name" in line
    refused = cli(*GRID, "--out", tmp_path, "--no-plots", "--precision", "bf16")
    assert refused.code == 2 and refused.err_lines[0].startswith("error: precision: ")
    network = cli(*GRID, "--out", tmp_path, "--no-plots", "--network", "wan")
    assert network.code == 2 and f"pnnctl plot {folder} --network wan re-projects them" in network.err
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before


def test_a_grid_rerun_with_more_epochs_extends_its_finished_cells(cli, tmp_path: Path) -> None:
    assert cli(*GRID, "--out", tmp_path, "--no-plots").code == 0
    two_epochs = [*GRID, "--epochs", "2", "--out", tmp_path, "--no-plots"]  # the later flag wins
    longer = cli(*two_epochs)
    assert longer.code == 0, longer.err
    assert "already finished" not in longer.err
    assert cli(*GRID, "--epochs", "2", "--out", tmp_path / "fresh", "--no-plots").code == 0
    for run in (tmp_path / "grid" / "runs").iterdir():
        rows = pd.read_csv(run / "metrics.csv")
        assert rows["epoch"].iloc[-2] < 2.0 <= rows["epoch"].iloc[-1] and rows["epoch"].is_monotonic_increasing
        assert "epochs = 2.0" in (run / "config.toml").read_text()
        # Extended from before its last round (cut to epoch 1), each cell trains what a fresh one does.
        fresh = pd.read_csv(tmp_path / "fresh" / "grid" / "runs" / run.name / "metrics.csv")
        pd.testing.assert_frame_equal(deterministic(rows), deterministic(fresh))
    again = cli(*two_epochs)
    assert again.code == 0 and again.err.count("already finished, skipped") == 2


def test_a_grid_rerun_with_fewer_epochs_or_a_smaller_budget_is_refused(cli, tmp_path: Path) -> None:
    # Its finished cells trained further than asked: reporting them under the shorter command would show
    # a longer run's results, and calling them "extend" would promise training that never came.
    assert cli(*GRID, "--epochs", "2", "--out", tmp_path, "--no-plots").code == 0
    folder = tmp_path / "grid"
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    trained = float(pd.read_csv(folder / "runs" / "local-sgd-digits-w2-s0" / "metrics.csv")["epoch"].iloc[-1])
    for shorter in (["--epochs", "1"], ["--epochs", "2", "--budget", "samples=500"], ["--epochs", "1", "--dry-run"]):
        refused = cli(*GRID, *shorter, "--out", tmp_path, "--no-plots")
        assert refused.code == 2, (shorter, refused.err)
        assert len(refused.err_lines) == 1 and "cannot be cut back" in refused.err
        assert refused.err.startswith("error: budget: " if "--budget" in shorter else "error: epochs: ")
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before
    # A limit the runs already reached, though not lower than the one they ran under, is no extension.
    reached = f"{math.floor(trained * 1e6) / 1e6:.6f}"  # metrics.csv rounds the epoch: not above the run's
    listed = cli(*GRID, "--strategies", "local-sgd", "--epochs", reached, "--out", tmp_path, "--dry-run")
    assert listed.code == 0 and "[done]" in listed.err and "[extend]" not in listed.err, listed.err
    config = folder / "runs" / "local-sgd-digits-w2-s0" / "config.toml"
    resumed = cli("train", "--config", config, "--epochs", "1", "--resume")
    assert resumed.code == 2 and "cannot be cut back to epochs=1" in resumed.err, resumed.err
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before


def test_a_cell_that_fails_while_running_is_recorded_and_the_grid_goes_on(
    cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pnnctl.launch

    real = pnnctl.launch.run_training

    def rank_died_in_local_sgd(config, **kwargs):  # a failure no check before the run can foresee
        if config.strategy == "local-sgd":
            raise RuntimeError("rank 1 died")
        return real(config, **kwargs)

    monkeypatch.setattr(pnnctl.launch, "run_training", rank_died_in_local_sgd)
    result = cli(*GRID, "--out", tmp_path, "--no-plots")
    assert result.code == 1, result.err  # the grid went on, and the exit code still says a cell failed
    assert "1 cell(s) failed (listed in" in result.err
    failures = json.loads((tmp_path / "grid" / "failures.json").read_text())
    assert failures == [{"run_id": "local-sgd-digits-w2-s0", "error": "RuntimeError: rank 1 died"}]
    summary = pd.read_csv(tmp_path / "grid" / "summary.csv")
    assert list(summary["strategy"]) == ["centralized"]
    # With every cell failing the failures were hidden behind "not a pnnctl results folder (no metrics.csv)", exit 2.
    monkeypatch.setattr(pnnctl.launch, "run_training", lambda config, **kwargs: rank_died_in_local_sgd(
        dataclasses.replace(config, strategy="local-sgd")))
    every = cli(*GRID, "--out", tmp_path, "--name", "all-failed", "--no-plots")
    assert every.code == 1 and "2 cell(s) failed (listed in" in every.err, every.err
    assert "not a pnnctl results folder" not in every.err
    assert len(json.loads((tmp_path / "all-failed" / "failures.json").read_text())) == 2


def test_a_grid_with_a_cell_its_strategy_or_data_refuses_runs_nothing(cli, tmp_path: Path) -> None:
    assert cli(*GRID, "--out", tmp_path, "--no-plots").code == 0
    folder = tmp_path / "grid"
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    # psl's class-pair placement gives digits' 10 classes at most 45 workers; the other cells come first.
    too_many = cli(*GRID, "--strategies", "centralized,local-sgd,psl", "--workers", "2,46", "--out", tmp_path)
    assert too_many.code == 2
    assert too_many.err_lines == [
        "error: workers: psl with placement=pairs (one or more class pairs each) takes at most 45 workers, "
        "not 46 (cell psl-digits-w46)"
    ]
    empty = tmp_path / "no-data"
    empty.mkdir()
    no_mnist = run_cli(
        [*GRID, "--datasets", "digits,mnist", "--out", str(tmp_path)], env={"PNNCTL_DATA": str(empty)}
    )
    assert no_mnist.returncode == 2 and no_mnist.stderr.count("\n") == 1
    assert no_mnist.stderr.startswith(f"error: {empty / 'MNIST' / 'raw' / 'train-images-idx3-ubyte'}: missing")
    assert no_mnist.stderr.endswith("(cell centralized-mnist-w1)\n")
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before
    # Refused into a folder that did not exist: no folder is left behind (the lock had made it).
    elsewhere = tmp_path / "new" / "deeper"
    assert cli(*GRID, "--strategies", "psl", "--workers", "46", "--out", elsewhere).code == 2
    assert not (tmp_path / "new").exists()


def test_second_writer_is_refused_by_the_lock(tmp_path: Path) -> None:
    from pnnctl.errors import UsageError
    from pnnctl.io import folder_lock

    folder = tmp_path / "grid"
    folder.mkdir()
    with folder_lock(folder, "compare"):
        (folder / ".lock").write_text(str(os.getppid()))  # another live process holds it
        with pytest.raises(UsageError, match="another compare"), folder_lock(folder, "compare"):
            pass
    # A lock left by a dead process (a killed compare) is taken over.
    (folder / ".lock").write_text("999999999")
    with folder_lock(folder, "compare"):
        assert (folder / ".lock").read_text() == str(os.getpid())


def test_a_folder_that_cannot_be_locked_is_a_usage_error(tmp_path: Path) -> None:
    # A file where the folder goes and a folder named .lock were NotADirectoryError / IsADirectoryError tracebacks.
    from pnnctl.errors import UsageError
    from pnnctl.io import folder_lock

    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError) as info, folder_lock(tmp_path / "file" / "grid", "compare"):
        pass
    assert str(info.value) == f"out: cannot create {tmp_path / 'file' / 'grid'}: Not a directory"
    (tmp_path / "grid" / ".lock").mkdir(parents=True)
    with pytest.raises(UsageError) as info, folder_lock(tmp_path / "grid", "train"):
        pass
    assert str(info.value) == f"out: cannot remove the stale lock {tmp_path / 'grid' / '.lock'}: Is a directory"


#: One small deterministic run per registered strategy: (workers, model, extra flags).
EVERY_STRATEGY = {
    "centralized": (1, "mlp:64-32-10", []),
    "allreduce": (2, "mlp:64-32-10", []),
    "local-sgd": (2, "mlp:64-32-10", ["--set", "local-sgd.local_steps=8"]),
    "ist": (2, "mlp:64-32-32-10", ["--set", "ist.local_steps=8"]),
    "psl": (3, "mlp:64-32-10", ["--set", "psl.optimizer=lbfgs"]),
    "sil": (2, "mlp:64-32-32-10", ["--set", "sil.recovery_epochs=1", "--optimizer", "adam", "--lr", "0.01"]),
    "consensus": (3, "mlp:64-32-10", []),
    "dgd": (3, "mlp:64-32-10", []),
}


def test_every_registered_strategy_has_a_kill_and_resume_case() -> None:
    from strategies import STRATEGIES

    assert set(EVERY_STRATEGY) == set(STRATEGIES)


def whole_and_killed_then_resumed(args: list[str], run_id: str, fault: str, tmp_path: Path) -> pd.DataFrame:
    """Runs ``args`` uninterrupted and again SIGKILLed at ``fault`` then resumed; asserts the two runs'
    metrics match (timing columns aside) and returns the uninterrupted run's."""
    reference = run_cli([*args, "--out", str(tmp_path / "whole")])
    assert reference.returncode == 0, reference.stderr
    killed = run_cli([*args, "--out", str(tmp_path / "killed")], env={"PNNCTL_FAULT": fault})
    assert killed.returncode == -9, killed.stderr[-500:]
    resumed = run_cli([*args, "--out", str(tmp_path / "killed"), "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    whole = pd.read_csv(tmp_path / "whole" / run_id / "metrics.csv")
    again = pd.read_csv(tmp_path / "killed" / run_id / "metrics.csv")
    pd.testing.assert_frame_equal(deterministic(again), deterministic(whole))
    return whole


@pytest.mark.parametrize("strategy", sorted(EVERY_STRATEGY))
def test_every_strategy_resumes_after_sigkill_to_identical_metrics(strategy: str, tmp_path: Path) -> None:
    workers, model, extra = EVERY_STRATEGY[strategy]
    args = ["train", "--strategy", strategy, "--dataset", "digits", "--model", model, "--workers", str(workers),
            "--epochs", "3", "--eval-every", "1", "--batch-size", "16", *extra]
    whole = whole_and_killed_then_resumed(args, f"{strategy}-w{workers}-s0", "round:2", tmp_path)
    assert len(whole) >= 3


def test_a_run_cut_by_a_bytes_budget_resumes_after_sigkill_to_identical_metrics(tmp_path: Path) -> None:
    # Rounds sized from the ledger (a one-step first round, then cut to the bytes left) are sized alike
    # after a resume, which reads the ledger and the samples from the checkpoint.
    args = ["train", "--strategy", "consensus", "--dataset", "digits", "--model", "mlp:64-32-10", "--workers", "3",
            "--epochs", "3", "--eval-every", "0.5", "--batch-size", "16", "--budget", "bytes=2e6"]
    whole = whole_and_killed_then_resumed(args, "consensus-w3-s0", "round:3", tmp_path)
    # Each NEXT iteration sends weights and tracker to both other agents: 2 x 2 x 9,640 bytes.
    assert 2e6 <= whole["bytes_sent_max_worker"].iloc[-1] < 2e6 + 4 * 9640 and whole["round"].iloc[-1] > 3


def test_sigterm_checkpoints_exits_143_and_resumes_to_identical_metrics(tmp_path: Path, uninterrupted) -> None:
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-m", "pnnctl", *RUN, "--out", str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    metrics = tmp_path / "local-sgd-w3-s0" / "metrics.csv"
    deadline = time.time() + 60
    while not metrics.exists() or metrics.read_text().count("\n") < 3:
        assert proc.poll() is None, proc.communicate()[1]
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert proc.returncode == 143
    assert "interrupted; resume with: pnnctl train" in stderr and "--resume" in stderr
    resumed = run_cli([*RUN, "--out", str(tmp_path), "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    pd.testing.assert_frame_equal(deterministic(pd.read_csv(metrics)), deterministic(uninterrupted))


@pytest.mark.parametrize(("signum", "code"), [(2, 130), (15, 143)])  # SIGINT, SIGTERM
def test_a_signal_during_a_compare_cell_stops_the_grid_with_the_rerun_command(
    signum: int, code: int, tmp_path: Path
) -> None:
    # The cell checkpointed and the grid stopped with exit 130 for either signal and not a word on how
    # to go on; a rerun of the same command resumes the cell.
    import subprocess
    import sys
    import time

    args = ["compare", "--strategies", "allreduce", "--workers", "2", "--datasets", "digits", "--model",
            "mlp:64-32-10", "--epochs", "12", "--eval-every", "0.25", "--no-plots", "--out", str(tmp_path)]
    proc = subprocess.Popen([sys.executable, "-m", "pnnctl", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
    metrics = tmp_path / "compare" / "runs" / "allreduce-digits-w2-s0" / "metrics.csv"
    deadline = time.time() + 60
    while not metrics.exists() or metrics.read_text().count("\n") < 4:
        assert proc.poll() is None, proc.communicate()[1]
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr[-2000:]  # at epoch 0.75 of 12: finishing would mean it was ignored
    assert f"interrupted; rerun the same command to continue (finished cells are skipped, a stopped one " \
           f"resumes): pnnctl {' '.join(args)}" in " ".join(stderr.split()), stderr[-2000:]
    assert "Traceback" not in stderr
    rerun = run_cli(args)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    rows = pd.read_csv(metrics)
    assert rows["status"].iloc[-1] == "finished" and rows["epoch"].iloc[-1] >= 12 - 1e-6
    assert rows["round"].is_unique and rows["round"].is_monotonic_increasing
