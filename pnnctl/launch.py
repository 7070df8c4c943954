"""How a run is started: one simulated process, a rank under torchrun, or ``--nproc P`` local ranks."""

from __future__ import annotations

from pnnctl.config import RunConfig
from pnnctl.runtime import detect_runtime
from pnnctl.trainer import Progress, RunResult, train


def run_training(
    config: RunConfig, *, resume: bool = False, progress: Progress | None = None
) -> RunResult | None:
    """Run one training run where this process stands; returns None on non-zero ranks."""
    runtime = detect_runtime()
    if runtime.distributed or config.nproc > 1:
        from pnnctl.distributed import run_distributed

        return run_distributed(config, resume=resume, progress=progress)
    return train(config, resume=resume, progress=progress)


