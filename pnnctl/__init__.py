"""pnnctl: compare ways of cutting neural-network training across workers, fairly.

Python API (the CLI is a thin layer over it)::

    import pnnctl
    metrics, summary = pnnctl.run(pnnctl.RunConfig(strategy="allreduce", workers=4, epochs=2))
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


def __getattr__(name: str) -> Any:
    if name == "RunConfig":
        from pnnctl.config import RunConfig

        return RunConfig
    if name == "compare":
        from pnnctl.compare import compare

        return compare
    raise AttributeError(name)
