"""pnnctl: compare ways of cutting neural-network training across workers, fairly.

Python API (the CLI is a thin layer over it)::

    import pnnctl
    metrics, summary = pnnctl.run(pnnctl.RunConfig(strategy="allreduce", workers=4, epochs=2))
    metrics, cells = pnnctl.compare(["centralized", "allreduce"], workers=[2, 4], seeds=2, epochs=2,
                                    out="results", name="my-grid")
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def run(config: Any, *, resume: bool = False) -> tuple[Any, dict]:
    """Train one run; returns (metrics DataFrame, summary dict)."""
    import pandas as pd

    from pnnctl.config import validate
    from pnnctl.trainer import train

    result = train(validate(config), resume=resume)
    return pd.DataFrame(result.rows), result.summary


def compare(
    strategies: list[str],
    *,
    workers: list[int] | tuple[int, ...] = (4,),
    seeds: int = 1,
    datasets: list[str] | tuple[str, ...] = (),
    name: str = "compare",
    plots: bool = True,
    options: dict[str, dict[str, Any]] | None = None,
    **run_fields: Any,
) -> tuple[Any, Any]:
    """Run (or resume) a grid; returns (all metrics rows, one summary row per cell) as DataFrames.

    ``run_fields`` are RunConfig fields shared by every cell (epochs, lr, out, ...); ``options``
    holds per-strategy option tables, e.g. ``{"local-sgd": {"local_steps": 10}}``.
    """
    from pnnctl.config import resolve_layers
    from pnnctl.grid import GridSpec
    from pnnctl.grid import compare as run_grid

    grid = GridSpec.build(
        {"strategies": list(strategies), "workers": list(workers), "seeds": seeds, "datasets": list(datasets),
         "name": name}
    )
    layers = resolve_layers({**run_fields, **(options or {})}, source="pnnctl.compare")
    outcome = run_grid(layers, grid, plots=plots)
    return outcome.metrics, outcome.cells


def __getattr__(name: str) -> Any:
    if name == "RunConfig":
        from pnnctl.config import RunConfig

        return RunConfig
    raise AttributeError(name)
