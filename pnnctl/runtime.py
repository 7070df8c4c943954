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
from dataclasses import dataclass

import torch

from pnnctl.errors import UsageError


@dataclass(frozen=True)
class Runtime:
    rank: int
    world_size: int
    local_rank: int

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or "RANK" in os.environ

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def detect_runtime() -> Runtime:
    if "RANK" not in os.environ:
        return Runtime(rank=0, world_size=1, local_rank=0)
    return Runtime(
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ.get("WORLD_SIZE", "1")),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )


def resolve_device(requested: str, local_rank: int = 0) -> torch.device:
    """``auto`` picks CUDA when present (one GPU per local rank), else the CPU."""
    if requested == "cpu":
        return torch.device("cpu")
    cuda = torch.cuda.is_available()
    if requested == "auto":
        return torch.device("cuda", local_rank % torch.cuda.device_count()) if cuda else torch.device("cpu")
    if not cuda:
        raise UsageError("device", f"{requested} was asked for but no CUDA device is available; use cpu or auto")
    index = int(requested.split(":")[1]) if ":" in requested else local_rank % torch.cuda.device_count()
    if index >= torch.cuda.device_count():
        raise UsageError("device", f"{requested}: only {torch.cuda.device_count()} CUDA devices are present")
    return torch.device("cuda", index)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process: allocated CUDA memory on a GPU, resident set size on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


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
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        mallopt = None
    return mallopt is not None and bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
