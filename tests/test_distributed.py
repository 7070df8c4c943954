"""Real gloo processes on loopback: same results as the simulation, real bytes = logical bytes, faults."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from distributed_utils import assert_simulated_equals_distributed, deterministic, run_cli
from pnnctl.config import RunConfig
from pnnctl.distributed import free_port

pytestmark = pytest.mark.distributed


def small(strategy: str, workers: int, **kw) -> RunConfig:
    base = dict(strategy=strategy, dataset="digits", model="mlp:64-32-10", workers=workers, epochs=2.0,
                batch_size=16, lr=0.1, eval_every=1.0, device="cpu")
    base.update(kw)
    return RunConfig(**base)


@pytest.mark.parametrize("strategy", ["allreduce", "local-sgd", "centralized"])
def test_two_process_run_equals_simulation(strategy: str, tmp_path: Path) -> None:
    workers = 1 if strategy == "centralized" else 2
    config = small(strategy, workers, options={"local_steps": 5} if strategy == "local-sgd" else {})
    if strategy == "centralized":
        # centralized has one worker, so it cannot fill two processes: a clear error, exit 2.
        result = run_cli(["train", "--strategy", "centralized", "--dataset", "digits", "--model", "mlp:64-32-10",
                          "--nproc", "2", "--out", str(tmp_path)])
        assert result.returncode == 2
        assert result.stderr.strip().startswith("error: nproc: centralized trains one worker in one process")
        return
    assert_simulated_equals_distributed(config, tmp_path, nproc=2)


def test_uneven_blocks_and_adam_state_match(tmp_path: Path) -> None:
    # 3 workers over 2 ranks: blocks of 2 and 1; Adam's per-worker state must split the same way.
    config = small("local-sgd", 3, optimizer="adam", lr=0.01, options={"local_steps": 4})
    assert_simulated_equals_distributed(config, tmp_path, nproc=2)


def test_four_processes_allreduce_equals_simulation(tmp_path: Path) -> None:
    # Under a bytes budget (18 of the epoch's 23 steps): every rank cuts its rounds from the same ledger.
    rows = assert_simulated_equals_distributed(small("allreduce", 4, epochs=1.0, budget="bytes=250000"), tmp_path,
                                               nproc=4)  # fmt: skip
    assert int(rows["samples_seen"].iloc[-1]) == 18 * 64


def test_wire_bytes_equal_logical_bytes_with_one_worker_per_process(tmp_path: Path) -> None:
    for strategy in ("allreduce", "local-sgd"):
        result = run_cli(["train", "--strategy", strategy, "--dataset", "digits", "--model", "mlp:64-32-10",
                          "--workers", "2", "--nproc", "2", "--epochs", "1", "--out", str(tmp_path)])
        assert result.returncode == 0, result.stderr
        rows = pd.read_csv(tmp_path / f"{strategy}-w2-s0" / "metrics.csv")
        assert rows["bytes_sent_max_worker"].iloc[-1] > 0
        assert (rows["wire_bytes_sent_max_rank"] == rows["bytes_sent_max_worker"]).all()


def test_each_rank_takes_omp_num_threads_or_else_its_share_of_the_cores(tmp_path: Path) -> None:
    import json

    args = ["train", "--strategy", "allreduce", "--dataset", "digits", "--model", "mlp:64-16-10", "--workers", "2",
            "--nproc", "2", "--epochs", "0.1"]
    unset = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
    cores = os.cpu_count() or 1  # torch takes at most this many; told it, each rank takes all of them
    for name, omp, expected in (("told", str(cores), cores), ("share", None, max(1, cores // 2))):
        env = {**unset, "PYTHONUNBUFFERED": "1", **({"OMP_NUM_THREADS": omp} if omp else {})}
        result = subprocess.run([sys.executable, "-m", "pnnctl", *args, "--out", str(tmp_path / name)],
                                capture_output=True, text=True, timeout=240, env=env)
        assert result.returncode == 0, result.stderr[-2000:]
        written = json.loads((tmp_path / name / "allreduce-w2-s0" / "env.json").read_text())
        assert written["torch_threads"] == expected, name


def test_a_runs_ranks_see_the_environment_it_starts_with(tmp_path: Path, monkeypatch, small_config) -> None:
    # Ranks fork from a server that outlives one run (every --nproc cell of a grid, a notebook's runs):
    # they read the environment as it is when their run starts, not as it was when the server started.
    from pnnctl.errors import RankFailed
    from pnnctl.launch import run_training

    config = functools.partial(small_config, strategy="allreduce", workers=2, nproc=2, epochs=1.0, timeout_s=30)
    monkeypatch.delenv("PNNCTL_FAULT", raising=False)
    assert run_training(config(out=str(tmp_path / "plain"))).status == "finished"
    monkeypatch.setenv("PNNCTL_FAULT", "round:1")
    with pytest.raises(RankFailed, match="signal SIGKILL"):
        run_training(config(out=str(tmp_path / "faulty")))


def test_a_seconds_budget_stops_every_rank_on_the_same_round(tmp_path: Path) -> None:
    # Each rank used to add up its own compute seconds: at the budget one rank stopped a round before the
    # other, which waited in a collective until the timeout, and the run failed.
    result = run_cli(["train", "--strategy", "allreduce", "--dataset", "digits", "--model", "mlp:64-32-10",
                      "--workers", "2", "--nproc", "2", "--epochs", "100", "--budget", "seconds=1",
                      "--eval-every", "0.05", "--set", "timeout_s=20", "--out", str(tmp_path)])  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    from pnnctl.trainer import load_checkpoint

    run = tmp_path / "allreduce-w2-s0"
    loops = [load_checkpoint(run / name)["loop"] for name in ("checkpoint.pt", "checkpoint.rank1.pt")]
    assert loops[0]["round"] == loops[1]["round"] and loops[0]["compute_s"] == loops[1]["compute_s"] >= 1.0
    rows = pd.read_csv(run / "metrics.csv")
    assert rows["status"].iloc[-1] == "finished" and rows["epoch"].iloc[-1] < 100


def test_an_nproc_run_prints_its_warnings_as_a_run_in_one_process_does(tmp_path: Path) -> None:
    # The ranks' warnings reached summary.json, but the parent rebuilt the result from the files and printed
    # none: a run 36% over its bytes budget said nothing. Below one exchange of local SGD (see test_trainer).
    result = run_cli(["train", "--strategy", "local-sgd", "--dataset", "digits", "--model", "mlp:64-32-10",
                      "--workers", "4", "--batch-size", "16", "--budget", "bytes=10000", "--nproc", "2",
                      "--out", str(tmp_path)])  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert warnings == ["warning: the busiest worker sent 0.0145 MB where the budget allowed 0.01 MB: the last round "
                        "of local-sgd took 0.0145 MB (each round is one exchange, whatever its steps)"]  # fmt: skip


def _children(parent: int) -> list[tuple[int, str]]:
    """``(pid, command line)`` of the live child processes of ``parent``."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
            children.append((int(entry.name), cmdline))
    return children


def _started_ranks(parent: int) -> list[int]:
    """The ranks of the ``--nproc`` run in process ``parent``: the children of its forkserver."""
    servers = [pid for pid, cmdline in _children(parent) if "forkserver" in cmdline]
    return sorted(pid for server in servers for pid, _ in _children(server))


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.parametrize("fault", ["kill", "hang"])
def test_failed_rank_ends_run_within_timeout_and_resume_finishes(fault: str, tmp_path: Path) -> None:
    args = ["train", "--strategy", "local-sgd", "--dataset", "digits", "--model", "mlp:64-32-10", "--workers", "2",
            "--nproc", "2", "--epochs", "40", "--set", "local-sgd.local_steps=2", "--set", "timeout_s=8",
            "--eval-every", "5", "--out", str(tmp_path)]
    proc = subprocess.Popen([sys.executable, "-m", "pnnctl", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    run_dir = tmp_path / "local-sgd-w2-s0"
    deadline = time.time() + 120
    while not (run_dir / "checkpoint.rank1.pt").exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.time() < deadline
        time.sleep(0.1)
    ranks = _started_ranks(proc.pid)
    assert len(ranks) == 2
    victim = ranks[-1]
    os.kill(victim, signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
    started = time.time()
    try:
        _, stderr = proc.communicate(timeout=60)
    finally:
        if fault == "hang" and _alive(victim):
            os.kill(victim, signal.SIGKILL)
    elapsed = time.time() - started
    assert proc.returncode not in (0, 2)
    assert "rank " in stderr and "failed" in stderr and "--resume" in stderr
    assert proc.returncode == 1 and "Traceback" not in stderr.split("error: rank")[-1], stderr[-2000:]
    assert elapsed < 8 + 15  # the collective timeout plus the launcher's grace periods (2 x 5 s)
    time.sleep(1)
    assert not any(_alive(pid) for pid in ranks), "orphan rank left behind"
    # The results written so far stay valid, and --resume finishes the run.
    partial = pd.read_csv(run_dir / "metrics.csv")
    assert len(partial) >= 1
    # The short collective timeout was for the fault; the resumed run gets the normal one (a loaded CI
    # machine can hold one rank back for more than 8 s), which --resume allows to change.
    resumed = run_cli([*args, "--set", "timeout_s=60", "--resume"], timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    final = pd.read_csv(run_dir / "metrics.csv")
    assert final["status"].iloc[-1] == "finished"
    assert final["epoch"].iloc[-1] >= 40 - 1e-6
    assert final["round"].is_monotonic_increasing and final["round"].is_unique


@pytest.mark.parametrize("point", ["round:1", "round:3"])
def test_ranks_killed_early_resume_to_the_uninterrupted_metrics(point: str, tmp_path: Path) -> None:
    # round:1 kills every rank before its round-1 checkpoint, so all ranks resume from round 0: rank 0 already
    # has that round's metrics row, the others do not, and they must still run the same collectives.
    args = ["train", "--strategy", "local-sgd", "--dataset", "digits", "--model", "mlp:64-32-10", "--workers", "2",
            "--nproc", "2", "--epochs", "2", "--set", "local-sgd.local_steps=4", "--eval-every", "0.5",
            "--set", "timeout_s=30"]
    whole = run_cli([*args, "--out", str(tmp_path / "whole")])
    assert whole.returncode == 0, whole.stderr[-2000:]
    killed = run_cli([*args, "--out", str(tmp_path / "killed")], env={"PNNCTL_FAULT": point})
    assert killed.returncode not in (0, 2), killed.stderr[-2000:]
    resumed = run_cli([*args, "--out", str(tmp_path / "killed"), "--resume"], timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    whole_rows, resumed_rows = (
        deterministic(pd.read_csv(tmp_path / name / "local-sgd-w2-s0" / "metrics.csv")) for name in ("whole", "killed")
    )
    pd.testing.assert_frame_equal(resumed_rows, whole_rows)
    # One worker per process: the wire carries the ledger's bytes, counted on from the checkpoint.
    killed_rows = pd.read_csv(tmp_path / "killed" / "local-sgd-w2-s0" / "metrics.csv")
    assert (killed_rows["wire_bytes_sent_max_rank"] == killed_rows["bytes_sent_max_worker"]).all()
    # A plain resume of a two-process run (as torchrun's printed hint reads) is refused, not a traceback.
    nproc = args.index("--nproc")
    single = run_cli([*args[:nproc], *args[nproc + 2:], "--out", str(tmp_path / "killed"), "--resume", "--epochs", "3"])
    assert single.returncode == 2 and "written by 2 processes, not 1" in single.stderr, single.stderr[-2000:]


def test_a_finished_two_process_run_extended_equals_one_started_with_the_new_epochs(tmp_path: Path) -> None:
    # Every rank goes on from its own checkpoint before the last round (checkpoint.rankR.prev.pt).
    args = ["train", "--strategy", "local-sgd", "--dataset", "digits", "--model", "mlp:64-16-10", "--workers", "3",
            "--nproc", "2", "--set", "local-sgd.local_steps=7", "--eval-every", "0.3"]
    assert run_cli([*args, "--epochs", "0.5", "--out", str(tmp_path / "extended")]).returncode == 0
    extended = run_cli([*args, "--epochs", "1", "--out", str(tmp_path / "extended"), "--resume"])
    assert extended.returncode == 0, extended.stderr[-2000:]
    assert "extended a finished run from round" in extended.stderr
    assert run_cli([*args, "--epochs", "1", "--out", str(tmp_path / "fresh")]).returncode == 0
    rows = [deterministic(pd.read_csv(tmp_path / name / "local-sgd-w3-s0" / "metrics.csv"))
            for name in ("extended", "fresh")]
    pd.testing.assert_frame_equal(*rows)


def test_a_run_resumed_with_more_processes_than_wrote_it_is_refused_and_kept(tmp_path: Path) -> None:
    # Rank 1 found no checkpoint.rank1.pt, so the ranks agreed on "nothing to resume" and a new run overwrote
    # the old one's metrics, summary and checkpoint (exit 0, "started a new run").
    args = ["train", "--strategy", "allreduce", "--dataset", "digits", "--model", "mlp:64-32-10", "--workers", "2",
            "--epochs", "0.2", "--out", str(tmp_path), "--set", "timeout_s=30"]
    assert run_cli(args).returncode == 0
    run = tmp_path / "allreduce-w2-s0"
    before = {name: (run / name).read_bytes() for name in ("metrics.csv", "summary.json", "checkpoint.pt")}
    more = run_cli([*args, "--nproc", "2", "--resume", "--epochs", "0.3"], timeout=120)
    assert more.returncode == 2, more.stderr[-2000:]
    assert f"error: resume: {run / 'checkpoint.pt'} was written by 1 processes, not 2; resume it with --nproc 1" in (
        more.stdout + more.stderr)
    assert {name: (run / name).read_bytes() for name in before} == before


@pytest.mark.parametrize(
    ("target", "signum", "code"), [("parent", signal.SIGINT, 130), ("process group", signal.SIGTERM, 143)]
)
def test_a_stop_signal_to_an_nproc_run_stops_it_after_a_round_and_resume_matches(
    target: str, signum: int, code: int, tmp_path: Path
) -> None:
    # SIGINT sent to the parent alone (kill -INT PID) was dropped: the run trained on to its end. A signal
    # sent to the whole process group reaches every rank twice, straight and passed on by the parent,
    # which must count as one request, not as "asked again: stop now".
    args = ["train", "--strategy", "local-sgd", "--dataset", "digits", "--model", "mlp:64-32-10", "--workers", "2",
            "--nproc", "2", "--epochs", "12", "--set", "local-sgd.local_steps=4", "--eval-every", "0.25",
            "--set", "timeout_s=30"]
    whole = run_cli([*args, "--out", str(tmp_path / "whole")])
    assert whole.returncode == 0, whole.stderr[-2000:]
    metrics = tmp_path / "cut" / "local-sgd-w2-s0" / "metrics.csv"
    proc = subprocess.Popen([sys.executable, "-m", "pnnctl", *args, "--out", str(tmp_path / "cut")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
    try:
        deadline = time.time() + 120
        while not metrics.exists() or metrics.read_text().count("\n") < 4:
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            assert time.time() < deadline
            time.sleep(0.02)
        if target == "parent":
            proc.send_signal(signum)
        else:
            os.killpg(proc.pid, signum)  # its own session: the group is the parent and its ranks
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    # The signal comes at epoch 0.75 of 12: a run that finished (exit 0) did not stop for it.
    assert proc.returncode == code, stderr[-2000:]
    assert "interrupted; resume with: pnnctl train" in stderr and "Traceback" not in stderr
    resumed = run_cli([*args, "--out", str(tmp_path / "cut"), "--resume"], timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    whole_rows = pd.read_csv(tmp_path / "whole" / "local-sgd-w2-s0" / "metrics.csv")
    pd.testing.assert_frame_equal(deterministic(pd.read_csv(metrics)), deterministic(whole_rows))


def test_torchrun_launch_equals_simulation(tmp_path: Path) -> None:
    """The torchrun path: RANK/WORLD_SIZE from the environment, same numbers as one process."""
    args = ["train", "--strategy", "allreduce", "--dataset", "digits", "--model", "mlp:64-32-10", "--workers", "4",
            "--epochs", "1", "--lr", "0.1", "--device", "cpu"]
    simulated = run_cli([*args, "--out", str(tmp_path / "sim")])
    assert simulated.returncode == 0, simulated.stderr
    launched = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
         "--master-port", str(free_port()), "-m", "pnnctl", *args, "--out", str(tmp_path / "torchrun")],
        capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert launched.returncode == 0, launched.stderr[-2000:]
    sim = pd.read_csv(tmp_path / "sim" / "allreduce-w4-s0" / "metrics.csv")
    real = pd.read_csv(tmp_path / "torchrun" / "allreduce-w4-s0" / "metrics.csv")
    assert (real["world_size"] == 2).all() and (real["backend"] == "gloo").all()
    for column in ("test_acc", "test_loss", "bytes_sent_max_worker", "messages_total"):
        assert (sim[column] - real[column]).abs().max() <= 1e-5 * max(1.0, sim[column].abs().max()), column
    # Two workers per rank: each rank puts 2(P-1)/P x S on the wire, each worker 2(N-1)/N x S logically.
    logical = real["bytes_sent_max_worker"].iloc[-1]
    assert real["wire_bytes_sent_max_rank"].iloc[-1] == pytest.approx(logical * (2 * 1 / 2) / (2 * 3 / 4))


@pytest.mark.parametrize("strategy", ["consensus", "dgd"])
def test_graph_mixing_puts_exactly_the_logical_bytes_on_the_wire(strategy: str, tmp_path: Path) -> None:
    """One agent per process on a ring: each rank exchanges blocks with its two neighbours only."""
    result = run_cli(["train", "--strategy", strategy, "--dataset", "digits", "--model", "mlp:64-16-10", "--workers",
                      "4", "--nproc", "4", "--epochs", "0.5", "--set", f"{strategy}.topology=ring",
                      "--out", str(tmp_path)])
    assert result.returncode == 0, result.stderr[-2000:]
    rows = pd.read_csv(tmp_path / f"{strategy}-w4-s0" / "metrics.csv")
    assert rows["bytes_sent_max_worker"].iloc[-1] > 0
    assert (rows["wire_bytes_sent_max_rank"] == rows["bytes_sent_max_worker"]).all()


def test_sil_recovery_pipeline_sends_exactly_its_logical_bytes_point_to_point(tmp_path: Path) -> None:
    """Two partitions on two processes: during recovery each cut crossing is one send, so the wire
    bytes added in the recovery phase equal the busiest worker's logical bytes added there."""
    result = run_cli(["train", "--strategy", "sil", "--dataset", "digits", "--model", "mlp:64-32-32-10", "--workers",
                      "2", "--nproc", "2", "--epochs", "3", "--set", "sil.recovery_epochs=1", "--out", str(tmp_path)])
    assert result.returncode == 0, result.stderr[-2000:]
    rows = pd.read_csv(tmp_path / "sil-w2-s0" / "metrics.csv")
    joined = rows[rows["phase"] == "joined"].iloc[-1]
    last = rows.iloc[-1]
    assert last["phase"] == "recovery"
    logical = last["bytes_sent_max_worker"] - joined["bytes_sent_max_worker"]
    assert logical > 0
    assert last["wire_bytes_sent_max_rank"] - joined["wire_bytes_sent_max_rank"] == logical
