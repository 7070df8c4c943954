"""The strategy registry: one dict, one module per strategy, a name registered twice is an error.

``pnnctl list strategies`` prints each strategy's summary and the docstrings of its options.
"""

from __future__ import annotations

import importlib

from pnnctl.errors import UsageError
from strategies.base import Strategy

STRATEGIES: dict[str, type[Strategy]] = {}

# Modules that register strategies on import, in the order `pnnctl list` shows them.
_MODULES = ("strategies.baselines",)


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


for _module in _MODULES:
    importlib.import_module(_module)
