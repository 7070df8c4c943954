"""Run the same config simulated (one process) and on real gloo ranks, and compare the results.

Every strategy's test module uses :func:`assert_simulated_equals_distributed`; the distributed
runs go through ``pnnctl train --nproc P`` in a subprocess, the real user path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import torch

from pnnctl.config import RunConfig, config_to_dict, to_toml

#: Columns that depend on the clock or the process layout, not on the training.
NONDETERMINISTIC = {"wall_s", "compute_s", "collective_s", "worker_compute_s", "projected_s", "peak_rss_bytes",
                    "world_size", "backend",
                    "wire_bytes_sent_max_rank", "run_id"}


def deterministic(rows: pd.DataFrame) -> pd.DataFrame:
    """Metrics rows without the columns that differ between identical runs (timings, rank layout)."""
    return rows.drop(columns=[c for c in rows.columns if c in NONDETERMINISTIC])


def assert_extras_close(simulated: dict, distributed: dict, tol: float = 1e-5) -> None:
    """Strategy extras agree: numbers within a relative 1e-5 (summation order differs), text exactly."""
    assert simulated.keys() == distributed.keys()
    for key, value in simulated.items():
        other = distributed[key]
        if isinstance(value, int | float) and isinstance(other, int | float):
            assert abs(value - other) <= tol * max(1.0, abs(value)), f"extras[{key}]: {value} vs {other}"
        else:
            assert value == other, f"extras[{key}]: {value!r} vs {other!r}"


def run_cli(args: list[str], timeout: float = 240, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "pnnctl", *args], capture_output=True, text=True, timeout=timeout, env=full_env
    )


def train_via_cli(config: RunConfig, out: Path, name: str, nproc: int = 1, extra: list[str] | None = None,
                  env: dict[str, str] | None = None) -> Path:
    """Write ``config`` as TOML and train it through the CLI; returns the run folder."""
    config_file = out / f"{name}.toml"
    values = config_to_dict(config)
    values.update(out=str(out), run_name=name, nproc=nproc)
    config_file.write_text(to_toml(values))
    # --nproc on the command line as well, as a user types it: the ranks' server then starts early.
    ranks = ["--nproc", str(nproc)] if nproc > 1 else []
    result = run_cli(["train", "--config", str(config_file), *ranks, *(extra or [])], env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return out / name


def load_block_state(run_dir: Path, nproc: int) -> list[dict]:
    paths = [run_dir / "checkpoint.pt", *(run_dir / f"checkpoint.rank{r}.pt" for r in range(1, nproc))]
    return [torch.load(p, map_location="cpu", weights_only=True)["strategy"] for p in paths]


def _flatten(state, prefix: str = "") -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    if isinstance(state, dict):
        for key, value in state.items():
            out.update(_flatten(value, f"{prefix}{key}."))
    elif isinstance(state, list | tuple):
        for index, value in enumerate(state):
            out.update(_flatten(value, f"{prefix}{index}."))
    elif isinstance(state, torch.Tensor) and state.is_floating_point():
        out[prefix.rstrip(".")] = state
    return out


def assert_states_match(simulated: dict, blocks: list[dict], n_workers: int, atol: float = 1e-5) -> int:
    """Every float tensor of the simulated state equals the ranks' blocks joined along the worker dim
    (tensors with a leading dim of N), or equals every rank's copy (replicated state such as a master).
    Returns how many tensors were compared."""
    sim = _flatten(simulated)
    ranks = [_flatten(b) for b in blocks]
    compared = 0
    for key, tensor in sim.items():
        parts = [r[key] for r in ranks if key in r]
        assert len(parts) == len(ranks), f"{key} missing on some rank"
        if tensor.dim() > 0 and tensor.shape[0] == n_workers and sum(p.shape[0] for p in parts) == n_workers:
            joined = torch.cat(parts)
            assert torch.allclose(joined, tensor, atol=atol, rtol=0), f"{key}: max diff {(joined - tensor).abs().max()}"
        else:
            for part in parts:
                assert part.shape == tensor.shape, f"{key}: {part.shape} vs {tensor.shape}"
                assert torch.allclose(part, tensor, atol=atol, rtol=0), f"{key}: max diff {(part - tensor).abs().max()}"
        compared += 1
    assert compared > 0
    return compared


def assert_simulated_equals_distributed(config: RunConfig, tmp_path: Path, nproc: int = 2) -> pd.DataFrame:
    """Train ``config`` simulated and on ``nproc`` gloo ranks; metrics and final states must agree.

    Both run one torch thread per process: kernels that split a reduction over threads sum in another
    order at another thread count, which is not what this compares."""
    one_thread = {"OMP_NUM_THREADS": "1"}
    sim_dir = train_via_cli(config, tmp_path, "sim", nproc=1, env=one_thread)
    dist_dir = train_via_cli(config, tmp_path, "dist", nproc=nproc, env=one_thread)
    sim_rows = pd.read_csv(sim_dir / "metrics.csv")
    dist_rows = pd.read_csv(dist_dir / "metrics.csv")
    assert len(sim_rows) == len(dist_rows) >= 2
    assert (dist_rows["world_size"] == nproc).all()
    for column in sim_rows.columns:
        if column in NONDETERMINISTIC:
            continue
        if column == "extras":
            for sim_text, dist_text in zip(sim_rows[column], dist_rows[column], strict=True):
                assert_extras_close(json.loads(sim_text), json.loads(dist_text))
        elif pd.api.types.is_numeric_dtype(sim_rows[column]):
            diff = (sim_rows[column].astype(float) - dist_rows[column].astype(float)).abs().max()
            scale = max(1.0, float(sim_rows[column].abs().max()))
            assert diff <= 1e-5 * scale, f"{column}: simulated and distributed differ by {diff}"
        else:
            assert list(sim_rows[column]) == list(dist_rows[column]), column
    simulated = load_block_state(sim_dir, 1)[0]
    blocks = load_block_state(dist_dir, nproc)
    assert_states_match(simulated, blocks, config.effective_workers)
    return dist_rows
