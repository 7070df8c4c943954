"""Named points where a test can make this process die, to prove that a kill there loses nothing.

``PNNCTL_FAULT=POINT:K`` sends SIGKILL to this process the K-th time it reaches POINT (K >= 1).
Points: ``round`` (after a training round), ``checkpoint-write`` (half-way through writing the
checkpoint's temporary file), ``metrics-append`` (after a metrics row is written, before the
checkpoint), ``summary-write`` (inside the summary.json write), ``plot`` (between figures).
Unset, this costs one dictionary lookup per call.
"""

from __future__ import annotations

import os
import signal

_counts: dict[str, int] = {}


def fault_point(name: str) -> None:
    spec = os.environ.get("PNNCTL_FAULT")
    if not spec:
        return
    point, _, count = spec.partition(":")
    if point != name:
        return
    _counts[name] = _counts.get(name, 0) + 1
    if _counts[name] == int(count or "1"):
        os.kill(os.getpid(), signal.SIGKILL)
