"""Communication graphs of N agents and their Metropolis–Hastings mixing weights.

This module defines no strategy; :mod:`strategies.consensus` (``consensus``, ``dgd``) uses it.

Topologies (``--set consensus.topology=...``; node 0..N-1 are the logical workers)::

    complete           every pair of agents
    ring               i -- i+1 (mod N)
    torus              2-D torus r x c, r the largest divisor of N with r <= sqrt(N); a prime N gives a ring
    star               agent 0 is the hub
    erdos-renyi:P      each pair with probability P, redrawn (up to 100 times) until connected; if still
                       disconnected, random edges are added between components until it is connected
    random-er:P        time-varying: a fresh Erdős–Rényi(P) graph every iteration (not connected itself)
    edge-dropout:Q     time-varying: each edge of a static base graph is on with probability Q per iteration

Time-varying graphs are *jointly connected*: iterations are cut into windows of ``window``
iterations [kW, (k+1)W); at the last iteration of each window, edges of the allowed graph (the base
for edge-dropout, every pair for random-er) are added, chosen at random, until the union of the
window's graphs is connected. The published convergence theory of NEXT assumes exactly this
(B-strong connectivity); the repair rule is ours.

Every random graph is a pure function of ``(topology, N, graph_seed, window, iteration)``, so a run
resumes, and processes of a distributed run agree, without sharing any generator state.

Mixing weights (Metropolis–Hastings) on the graph of the iteration, d_i the degree of agent i::

    a_ij = 1 / (1 + max(d_i, d_j))   for every edge (i, j)
    a_ii = 1 - sum_{j != i} a_ij,     a_ij = 0 otherwise

symmetric, hence doubly stochastic, with a positive diagonal. The spectral gap of a static graph is
1 - max_{k >= 2} |lambda_k(A)| = 1 - ||A - 11^T/N||_2. For a time-varying family the same norm is
taken of the product of the first window's matrices, reported per iteration:
1 - ||A_{W-1} ... A_0 - 11^T/N||_2^(1/W).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from pnnctl.errors import UsageError
from pnnctl.training import stream_seed

STATIC_FAMILIES = ("complete", "ring", "torus", "star", "erdos-renyi")
TIME_VARYING_FAMILIES = ("random-er", "edge-dropout")
WITH_PROBABILITY = ("erdos-renyi", "random-er", "edge-dropout")
TOPOLOGY_HELP = "complete, ring, torus, star, erdos-renyi:P, random-er:P or edge-dropout:Q (0 < P, Q <= 1)"

#: Redraws of a static Erdős–Rényi graph before components are joined by added edges.
ER_REDRAWS = 100

# Salts that keep the graph's random streams apart from each other.
_SALT_STATIC = 101
_SALT_DRAW = 102
_SALT_REPAIR = 103


@dataclass(frozen=True)
class Topology:
    """A parsed topology: its family and, for random families, the edge probability."""

    family: str
    p: float = 1.0
    text: str = ""

    @property
    def time_varying(self) -> bool:
        return self.family in TIME_VARYING_FAMILIES


def parse_topology(text: str, field: str = "topology") -> Topology:
    """``ring`` / ``erdos-renyi:0.3`` -> Topology; a one-line UsageError naming ``field`` otherwise."""
    family, sep, amount = text.strip().partition(":")
    if family not in STATIC_FAMILIES + TIME_VARYING_FAMILIES:
        raise UsageError(field, f"must be one of {TOPOLOGY_HELP}, not {text!r}")
    if family not in WITH_PROBABILITY:
        if sep:
            raise UsageError(field, f"{family} takes no probability, not {text!r}")
        return Topology(family, 1.0, text)
    try:
        p = float(amount)
    except ValueError:
        raise UsageError(field, f"{family} needs a probability such as {family}:0.3, not {text!r}") from None
    if not 0 < p <= 1:
        raise UsageError(field, f"the probability in {text!r} must be in (0, 1]")
    return Topology(family, p, text)


# -- static graphs ------------------------------------------------------------------------------


def _symmetric(n: int, edges: list[tuple[int, int]]) -> Tensor:
    adj = torch.zeros(n, n, dtype=torch.bool)
    for i, j in edges:
        if i != j:
            adj[i, j] = adj[j, i] = True
    return adj


def complete_graph(n: int) -> Tensor:
    return ~torch.eye(n, dtype=torch.bool)


def ring_graph(n: int) -> Tensor:
    return _symmetric(n, [(i, (i + 1) % n) for i in range(n)])


def torus_shape(n: int) -> tuple[int, int]:
    """Rows and columns of the 2-D torus of n agents: the most square factorisation."""
    rows = max(r for r in range(1, math.isqrt(n) + 1) if n % r == 0)
    return rows, n // rows


def torus_graph(n: int) -> Tensor:
    rows, cols = torus_shape(n)
    edges = []
    for r in range(rows):
        for c in range(cols):
            node = r * cols + c
            edges.append((node, r * cols + (c + 1) % cols))
            edges.append((node, ((r + 1) % rows) * cols + c))
    return _symmetric(n, edges)


def star_graph(n: int) -> Tensor:
    return _symmetric(n, [(0, j) for j in range(1, n)])


def _bernoulli_graph(allowed: Tensor, p: float, generator: torch.Generator) -> Tensor:
    """Each allowed pair independently with probability p (one draw per unordered pair)."""
    n = allowed.shape[0]
    upper = torch.triu(torch.rand(n, n, generator=generator, dtype=torch.float64) < p, diagonal=1)
    return (upper | upper.T) & allowed


def components(adj: Tensor) -> Tensor:
    """The connected component of every node, labelled by its smallest member."""
    n = adj.shape[0]
    label = torch.arange(n)
    neighbours = [torch.nonzero(adj[i]).flatten().tolist() for i in range(n)]
    seen = [False] * n
    for start in range(n):
        if seen[start]:
            continue
        stack, seen[start] = [start], True
        while stack:
            node = stack.pop()
            label[node] = start
            for other in neighbours[node]:
                if not seen[other]:
                    seen[other] = True
                    stack.append(other)
    return label


def is_connected(adj: Tensor) -> bool:
    return bool((components(adj) == 0).all())


def connecting_edges(union: Tensor, allowed: Tensor, generator: torch.Generator) -> list[tuple[int, int]]:
    """Random edges of ``allowed`` that, added to ``union``, make it connected (one per merge)."""
    union = union.clone()
    added = []
    while True:
        label = components(union)
        crossing = torch.triu(allowed & (label[:, None] != label[None, :]), diagonal=1)
        candidates = torch.nonzero(crossing)
        if len(candidates) == 0:
            break
        i, j = candidates[int(torch.randint(len(candidates), (1,), generator=generator))].tolist()
        union[i, j] = union[j, i] = True
        added.append((i, j))
    if not is_connected(union):
        raise ValueError("the allowed graph is disconnected, so no edges of it can connect this graph")
    return added


def erdos_renyi_graph(n: int, p: float, generator: torch.Generator) -> Tensor:
    """A connected Erdős–Rényi(n, p) graph: redrawn while disconnected, then components joined."""
    allowed = complete_graph(n)
    adj = _bernoulli_graph(allowed, p, generator)
    for _ in range(ER_REDRAWS - 1):
        if is_connected(adj):
            return adj
        adj = _bernoulli_graph(allowed, p, generator)
    for i, j in connecting_edges(adj, allowed, generator):
        adj[i, j] = adj[j, i] = True
    return adj


def static_graph(topology: Topology, n: int, seed: int) -> Tensor:
    """The adjacency ``[n, n]`` (bool, symmetric, no self loops) of a static topology."""
    if topology.family == "complete":
        return complete_graph(n)
    if topology.family == "ring":
        return ring_graph(n)
    if topology.family == "torus":
        return torus_graph(n)
    if topology.family == "star":
        return star_graph(n)
    if topology.family == "erdos-renyi":
        return erdos_renyi_graph(n, topology.p, torch.Generator().manual_seed(stream_seed(seed, 0, _SALT_STATIC)))
    raise ValueError(f"{topology.text!r} is not a static topology")


# -- weights and spectra --------------------------------------------------------------------------


def metropolis_hastings(adj: Tensor) -> Tensor:
    """Metropolis–Hastings mixing matrix (float64, symmetric, doubly stochastic) of a graph."""
    adj = adj.to(torch.bool)
    degree = adj.sum(dim=1).to(torch.float64)
    weights = torch.where(adj, 1.0 / (1.0 + torch.maximum(degree[:, None], degree[None, :])), 0.0)
    weights.diagonal().copy_(1.0 - weights.sum(dim=1))
    return weights


def contraction(matrix: Tensor) -> float:
    """||A - 11^T/N||_2: how much A shrinks disagreement (the second eigenvalue's modulus for symmetric A)."""
    n = matrix.shape[0]
    if n == 1:
        return 0.0
    centred = matrix.to(torch.float64) - 1.0 / n
    return float(torch.linalg.matrix_norm(centred, ord=2))


def spectral_gap(weights: Tensor) -> float:
    """1 - max_{k>=2} |lambda_k| of a doubly stochastic mixing matrix."""
    return 1.0 - contraction(weights)


def edge_list(adj: Tensor) -> list[tuple[int, int]]:
    return [tuple(e) for e in torch.nonzero(torch.triu(adj, diagonal=1)).tolist()]


# -- the graph of every iteration -----------------------------------------------------------------


class GraphSequence:
    """The graph and mixing weights of every iteration, static or time-varying (pure in the iteration)."""

    def __init__(self, topology: Topology, n: int, seed: int, window: int = 1, base: Topology | None = None) -> None:
        self.topology, self.n, self.seed, self.window = topology, n, seed, max(1, window)
        if topology.family == "random-er":
            self.base = complete_graph(n)
        elif topology.family == "edge-dropout":
            base = base or Topology("ring", 1.0, "ring")
            if base.time_varying:
                raise UsageError("base_topology", f"must be a static topology, not {base.text!r}")
            self.base = static_graph(base, n, seed)
        else:
            self.base = static_graph(topology, n, seed)
        self.base_weights = metropolis_hastings(self.base)
        self._draws: dict[int, Tensor] = {}

    @property
    def time_varying(self) -> bool:
        return self.topology.time_varying

    def _draw(self, iteration: int) -> Tensor:
        """The iteration's random graph before the window's connectivity repair."""
        cached = self._draws.get(iteration)
        if cached is None:
            generator = torch.Generator().manual_seed(stream_seed(self.seed, iteration, _SALT_DRAW))
            cached = _bernoulli_graph(self.base, self.topology.p, generator)
            if len(self._draws) > 2 * self.window:
                self._draws.clear()
            self._draws[iteration] = cached
        return cached

    def at(self, iteration: int) -> Tensor:
        """Adjacency ``[n, n]`` of the graph used at ``iteration`` (0-based)."""
        if not self.time_varying:
            return self.base
        adj = self._draw(iteration).clone()
        if (iteration + 1) % self.window == 0:
            start = iteration + 1 - self.window
            union = adj.clone()
            for k in range(start, iteration):
                union |= self._draw(k)
            generator = torch.Generator().manual_seed(stream_seed(self.seed, iteration, _SALT_REPAIR))
            for i, j in connecting_edges(union, self.base, generator):
                adj[i, j] = adj[j, i] = True
        return adj

    def weights_at(self, iteration: int) -> Tensor:
        """Metropolis–Hastings weights ``[n, n]`` (float64, CPU) of the iteration's graph."""
        if not self.time_varying:
            return self.base_weights
        return metropolis_hastings(self.at(iteration))

    def spectral_gap(self) -> float:
        """Static: 1 - |lambda_2|. Time-varying: the first window's contraction, per iteration."""
        if not self.time_varying:
            return spectral_gap(self.base_weights)
        product = torch.eye(self.n, dtype=torch.float64)
        for k in range(self.window):
            product = self.weights_at(k) @ product
        return 1.0 - contraction(product) ** (1.0 / self.window)
