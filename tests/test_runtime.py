"""Where a process runs: its rank's device, and TorchComm's in-place sums over real gloo processes."""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pnnctl.config import RunConfig, validate
from pnnctl.distributed import TorchComm, free_port
from pnnctl.errors import UsageError
from pnnctl.runtime import detect_runtime, reset_peak_memory, resolve_device
from pnnctl.trainer import train


@pytest.mark.parametrize(
    ("requested", "local_rank", "local_ranks", "gpus", "expected"),
    [
        ("cpu", 1, 2, 4, "cpu"),
        ("auto", 0, 1, 0, "cpu"),
        ("auto", 1, 2, 2, "cuda:1"),
        ("auto", 1, 2, 1, "cpu"),  # two ranks cannot share one GPU under nccl: the CPU, not a crash
        ("cuda", 0, 1, 1, "cuda:0"),
        ("cuda", 3, 4, 8, "cuda:3"),
        ("cuda:1", 0, 1, 2, "cuda:1"),
    ],
)
def test_each_local_rank_gets_a_device_of_its_own(
    requested: str, local_rank: int, local_ranks: int, gpus: int, expected: str
) -> None:
    assert resolve_device(requested, local_rank, local_ranks, cuda_devices=gpus) == torch.device(expected)


@pytest.mark.parametrize(
    ("requested", "local_ranks", "gpus", "says"),
    [
        ("cuda", 1, 0, "no CUDA device"),
        ("cuda", 2, 1, "need a GPU each"),
        ("cuda:0", 2, 2, "all 2 ranks"),
        ("cuda:2", 1, 2, "only 2 CUDA devices"),
    ],
)
def test_a_device_the_machine_cannot_give_is_a_usage_error(requested: str, local_ranks: int, gpus: int,
                                                           says: str) -> None:
    with pytest.raises(UsageError) as error:
        resolve_device(requested, 0, local_ranks, cuda_devices=gpus)
    assert error.value.field == "device"
    assert says in str(error.value)


def test_torchrun_variables_give_the_local_world(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    runtime = detect_runtime()
    assert (runtime.rank, runtime.world_size, runtime.local_rank, runtime.local_world_size) == (5, 8, 1, 4)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert detect_runtime().local_world_size == 8  # one machine unless told otherwise


def _in_place_sums(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    try:
        comm = TorchComm("gloo", torch.device("cpu"))
        base = torch.arange(12, dtype=torch.float32).reshape(3, 4) * (rank + 1)
        contiguous = base.clone()
        returned = comm.all_reduce_sum(contiguous, inplace=True)
        # A column slice cannot go on the wire itself: the sum must still land in the caller's tensor.
        strided = base.clone()
        column = strided[:, 1]
        comm.all_reduce_sum(column, inplace=True)
        fresh = comm.all_reduce_sum(base[:, 2])
        torch.save({"contiguous": contiguous, "returned_is_input": returned is contiguous, "strided": strided,
                    "fresh": fresh, "base_after": base}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_in_place_sums_land_in_the_callers_tensor_even_through_a_copy(tmp_path: Path) -> None:
    mp.spawn(_in_place_sums, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    total = base * 1 + base * 2
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.equal(got["contiguous"], total)
        assert got["returned_is_input"]
        expected = base * (rank + 1)
        expected[:, 1] = total[:, 1]
        assert torch.equal(got["strided"], expected)
        assert torch.equal(got["fresh"], total[:, 2])
        assert torch.equal(got["base_after"], base * (rank + 1))  # without inplace the input is left alone


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's resettable VmHWM")
def test_each_run_in_a_process_reports_its_own_peak_memory(tmp_path: Path) -> None:
    # compare runs its cells in one process: a small run after a big one must not report the big
    # one's peak (it did, when the peak was the process's ru_maxrss).
    def peak(model: str, name: str) -> int:
        config = validate(RunConfig(strategy="centralized", dataset="digits", model=model, epochs=1.0,
                                    optimizer="adam", lr=1e-3, device="cpu", out=str(tmp_path), run_name=name))
        return int(train(config).rows[-1]["peak_rss_bytes"])

    # 2 x 4096^2 weights with gradients and two Adam moments: ~270 MB that the small run never holds.
    big = peak("mlp:*-4096-4096-*", "big")
    small = peak("mlp:*-32-*", "small")
    assert small < big - 150e6
    assert peak("mlp:*-4096-4096-*", "big-again") > small + 150e6


def test_a_gpu_peak_reset_before_cuda_is_used_resets_nothing() -> None:
    # The first thing a CUDA run did was this reset, and torch's raises until CUDA is initialised
    # ("did you call init?"; here, with a CPU-only torch, for want of the function).
    if torch.cuda.is_initialized():
        pytest.skip("CUDA is already in use in this process")
    reset_peak_memory(torch.device("cuda", 0))
    assert not torch.cuda.is_initialized()  # and it did not start CUDA for nothing


@pytest.mark.parametrize(("platform", "unit"), [("linux", 1024), ("darwin", 1)])
def test_peak_memory_without_proc_falls_back_to_ru_maxrss_in_bytes(monkeypatch, platform: str, unit: int) -> None:
    import builtins
    import resource

    from pnnctl import runtime

    real_open = builtins.open

    def no_proc(path, *args, **kwargs):
        if str(path).startswith("/proc/"):
            raise OSError("no /proc here")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", no_proc)
    monkeypatch.setattr(runtime.sys, "platform", platform)
    runtime.reset_peak_memory(torch.device("cpu"))  # nothing to reset: must not raise
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    measured = runtime.peak_memory_bytes(torch.device("cpu"))
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert before * unit <= measured <= after * unit  # kilobytes on Linux, bytes on macOS
