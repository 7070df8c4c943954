"""Where this process runs: the one module that asks the environment.

torchrun sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; when they are present this process is one
rank of a distributed run (nanoGPT's ``ddp = int(os.environ.get('RANK', -1)) != -1``). Nothing else
in pnnctl reads these variables or picks a device.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys
from dataclasses import dataclass

import torch

from pnnctl.errors import UsageError


@dataclass(frozen=True)
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int = 1  # ranks on this machine (torchrun's LOCAL_WORLD_SIZE)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or "RANK" in os.environ

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def detect_runtime() -> Runtime:
    if "RANK" not in os.environ:
        return Runtime(rank=0, world_size=1, local_rank=0)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    return Runtime(
        rank=int(os.environ["RANK"]),
        world_size=world_size,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size))),
    )


def resolve_device(
    requested: str, local_rank: int = 0, local_ranks: int = 1, cuda_devices: int | None = None
) -> torch.device:
    """The device of local rank ``local_rank`` of ``local_ranks`` on this machine: one GPU per rank.

    ``auto`` picks CUDA when every local rank gets a GPU of its own, else the CPU: nccl refuses two
    ranks on one GPU, so ``cuda`` with fewer GPUs than ranks, or ``cuda:K`` under several ranks, is a
    usage error. ``cuda_devices`` stands in for ``torch.cuda.device_count()`` (tests).
    """
    if requested == "cpu":
        return torch.device("cpu")
    if cuda_devices is None:
        cuda_devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if requested == "auto":
        return torch.device("cuda", local_rank) if 0 < local_ranks <= cuda_devices else torch.device("cpu")
    if cuda_devices == 0:
        raise UsageError("device", f"{requested} was asked for but no CUDA device is available; use cpu or auto")
    if ":" in requested:
        if local_ranks > 1:
            raise UsageError(
                "device", f"{requested} would put all {local_ranks} ranks of this machine on one GPU; use cuda "
                "(one GPU per rank)"
            )
        index = int(requested.split(":")[1])
    else:
        if local_ranks > cuda_devices:
            raise UsageError(
                "device", f"cuda: {local_ranks} ranks on this machine need a GPU each and {cuda_devices} are "
                f"present; use cpu or at most {cuda_devices} processes"
            )
        index = local_rank
    if index >= cuda_devices:
        raise UsageError("device", f"{requested}: only {cuda_devices} CUDA devices are present")
    return torch.device("cuda", index)


def wait_for_gpu() -> None:
    """Let queued CUDA work finish (nothing to do where CUDA was never used), so that a timer read
    next counts it: kernels and nccl collectives return as soon as they are queued."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory since the last :func:`reset_peak_memory`: allocated CUDA memory on a GPU, resident
    set size on the CPU (Linux's VmHWM; elsewhere the process's lifetime peak, ru_maxrss)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    # ru_maxrss is in kilobytes on Linux and in bytes on macOS.
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * (1 if sys.platform == "darwin" else 1024)


def device_memory_bytes(device: torch.device) -> int | None:
    """The memory ``device`` has in all (a GPU's, or the machine's RAM), None where it cannot be read."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return None


def reset_peak_memory(device: torch.device) -> None:
    """Start the peak-memory record afresh, so that a run reports its own peak.

    compare runs its cells one after another in one process: without this every cell reported the
    running maximum of the cells before it. On a GPU the allocator's peak statistics are reset. On
    the CPU glibc first hands back the heap kept from earlier runs (``keep_freed_cpu_memory`` never
    trims it), then Linux's high-water mark is reset to the present resident set (``clear_refs``);
    where either is missing the peak stays the process's.
    """
    if device.type == "cuda":
        # Before CUDA's first use there is nothing to reset, and torch's reset would raise ("did you call
        # init?"): unlike the peak's getter it does not check.
        if torch.cuda.is_initialized():
            torch.cuda.reset_peak_memory_stats(device)
        return
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
            clear_refs.write("5")
    except OSError:
        pass


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


@functools.cache
def keep_freed_cpu_memory() -> bool:
    """Let glibc keep freed memory for reuse instead of handing it back to the OS (once per process).

    PyTorch's CPU allocator has no cache: each new tensor over 32 MB (and smaller ones, once
    glibc's trim threshold is hit) is mmap-ed afresh and page-faulted in, which made an element-wise
    op on 64 stacked workers' parameters 3-4x slower than the arithmetic itself. Serving every
    allocation from the heap and never trimming it costs a resident set that stays at its peak.
    Returns False where the C library has no ``mallopt`` (not glibc), and leaves malloc alone when
    ``PNNCTL_SYSTEM_MALLOC=1`` (a process that embeds pnnctl and wants its memory handed back).
    """
    if os.environ.get("PNNCTL_SYSTEM_MALLOC", "") not in ("", "0"):
        return False
    mallopt = getattr(_libc(), "mallopt", None)
    return mallopt is not None and bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
