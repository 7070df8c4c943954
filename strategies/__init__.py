"""The strategy registry: one dict, one module per strategy, a name registered twice is an error.

``pnnctl list strategies`` prints each strategy's summary and the docstrings of its options.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from pnnctl.errors import UsageError
from strategies.base import Strategy

STRATEGIES: dict[str, type[Strategy]] = {}



def register(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: add a strategy under ``cls.name``."""
    if cls.name in STRATEGIES:
        raise ValueError(f"strategy {cls.name!r} is already registered")
    STRATEGIES[cls.name] = cls
    return cls


def get_strategy(name: str) -> type[Strategy]:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise UsageError("strategy", f"unknown strategy {name!r}; choose one of: {', '.join(STRATEGIES)}") from None


def _discover() -> None:
    """Import every module of this package (baselines first): each registers its strategies."""
    names = sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)]) if m.name != "base")
    for name in sorted(names, key=lambda n: (n != "baselines", n)):
        importlib.import_module(f"strategies.{name}")


_discover()
