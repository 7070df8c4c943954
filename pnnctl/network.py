"""Network models that turn the ledger's message and byte counts into projected seconds.

A round's communication time is that of its busiest node (a worker, or the master of strategies
that have one)::

    comm_s(round) = max_node ( messages * latency_s + max(bytes_sent, bytes_recv) / bandwidth_Bps )

which assumes every node has its own full-duplex link of the given bandwidth (sending and receiving
overlap) and that a node's messages in one round go out one after another (the alpha-beta model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pnnctl.errors import UsageError


@dataclass(frozen=True)
class NetworkModel:
    name: str
    latency_s: float
    bandwidth_bytes_per_s: float

    def seconds(self, messages: Any, bytes_moved: Any) -> Any:
        """Projected seconds of a node that sends ``messages`` messages and moves ``bytes_moved`` each way
        at most (scalars or arrays alike)."""
        return messages * self.latency_s + bytes_moved / self.bandwidth_bytes_per_s


#: Presets: (one-way latency in seconds, bandwidth in bytes per second).
NETWORK_PRESETS: dict[str, NetworkModel] = {
    m.name: m
    for m in (
        NetworkModel("lan-1g", 100e-6, 1e9 / 8),
        NetworkModel("dc-10g", 20e-6, 10e9 / 8),
        NetworkModel("dc-100g", 5e-6, 100e9 / 8),
        NetworkModel("wan", 50e-3, 100e6 / 8),
        NetworkModel("edge", 20e-3, 20e6 / 8),
    )
}

NETWORK_HELP = (
    "a preset ("
    + ", ".join(NETWORK_PRESETS)
    + ") or 'LATENCY,BANDWIDTH' such as '1ms,10gbit' (latency in s/ms/us, bandwidth in bit/s with k/m/g)"
)


def _parse_latency(text: str) -> float:
    units = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
    for suffix in ("us", "ms", "s"):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * units[suffix]
    return float(text)


def _parse_bandwidth(text: str) -> float:
    """Bits per second ('10gbit', '100mbit', '1e9') to bytes per second."""
    scale = {"k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
    body = text.lower().removesuffix("bit").removesuffix("bps")
    factor = 1.0
    if body and body[-1] in scale:
        factor = scale[body[-1]]
        body = body[:-1]
    return float(body) * factor / 8


def parse_network(spec: str) -> NetworkModel:
    """A preset name or a custom ``latency,bandwidth`` pair."""
    spec = spec.strip()
    if spec in NETWORK_PRESETS:
        return NETWORK_PRESETS[spec]
    if "," in spec:
        latency_text, bandwidth_text = (part.strip() for part in spec.split(",", 1))
        try:
            latency = _parse_latency(latency_text)
            bandwidth = _parse_bandwidth(bandwidth_text)
        except ValueError:
            raise UsageError("network", f"cannot read {spec!r}; use {NETWORK_HELP}") from None
        if not (math.isfinite(latency) and math.isfinite(bandwidth)) or latency < 0 or bandwidth <= 0:
            raise UsageError("network", f"latency must be >= 0 and bandwidth > 0 in {spec!r}")
        return NetworkModel(f"custom:{spec}", latency, bandwidth)
    raise UsageError("network", f"unknown network {spec!r}; use {NETWORK_HELP}")
