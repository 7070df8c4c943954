"""The worker group: N logical workers stacked along dim 0, their collectives, and the byte ledger.

Every strategy is written once against :class:`WorkerGroup`. A tensor that "belongs to the workers"
is shaped ``[n_local, ...]``: one slice per logical worker held by this process (all N in a
simulated run, a contiguous block of them on each rank of a torch.distributed run). Collectives take
and return such tensors; only the traffic between blocks crosses processes (see
:mod:`pnnctl.distributed`).

The ledger counts what each logical worker would send and receive, and how many messages, if every
worker were its own machine, with the cost formula of each collective (S = bytes of one worker's
payload, N = workers):

=====================  ==================================  ===============================  ========
collective             bytes sent per worker                bytes received per worker        messages
=====================  ==================================  ===============================  ========
all_reduce (ring)      2(N-1)/N * S                         2(N-1)/N * S                     2(N-1)
broadcast (master)     0; master sends N*S                  S                                N (master)
scatter (master)       0; master sends sum_i S_i            S_i                              N (master)
gather (to master)     S_i; master receives sum_i S_i       0                                1 each
mix over a graph A     out_degree_j * S                     in_degree_i * S                  degree
=====================  ==================================  ===============================  ========

A master (parameter server) is a node of its own, slot N of the ledger, and never one of the workers.
"""

from __future__ import annotations

import functools
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np
import torch
from torch import Tensor

from pnnctl.network import NetworkModel
from pnnctl.runtime import wait_for_gpu


def ring_all_reduce_bytes(n_workers: int, size_bytes: float) -> tuple[float, int]:
    """Bytes each worker sends (and receives) and its messages in a ring all-reduce.

    Reduce-scatter then all-gather: N-1 steps each, every step moves one 1/N chunk.
    """
    if n_workers <= 1:
        return 0.0, 0
    return 2 * (n_workers - 1) / n_workers * size_bytes, 2 * (n_workers - 1)


def tensor_bytes(t: Tensor, workers_dim: bool = True) -> int:
    """Bytes of one worker's slice of ``t`` (or the whole tensor when it has no worker dim)."""
    numel = math.prod(t.shape[1:]) if workers_dim else t.numel()  # not t[0]: a view costs microseconds
    return numel * t.element_size()


@dataclass
class RoundTraffic:
    """What one round cost: its projected communication seconds and the busiest worker's bytes."""

    comm_s: float
    max_sent: float
    max_recv: float


class Ledger:
    """Cumulative and per-round bytes and messages of every logical worker (and the master, slot N)."""

    def __init__(self, n_workers: int, network: NetworkModel) -> None:
        self.n_workers = n_workers
        self.network = network
        nodes = n_workers + 1
        self.sent = np.zeros(nodes)
        self.recv = np.zeros(nodes)
        self.messages = np.zeros(nodes)
        self._round_sent = np.zeros(nodes)
        self._round_recv = np.zeros(nodes)
        self._round_messages = np.zeros(nodes)
        # Where an exchange ended inside the round: its traffic is already projected into _round_comm_s.
        self._projected = (np.zeros(nodes), np.zeros(nodes), np.zeros(nodes))
        self._round_comm_s = 0.0
        self.comm_s = 0.0
        self.by_op: dict[str, float] = {}

    def record(self, op: str, sent: np.ndarray, recv: np.ndarray, messages: np.ndarray) -> None:
        """Add one collective's traffic; arrays are indexed by node (workers 0..N-1, master N)."""
        self._round_sent += sent
        self._round_recv += recv
        self._round_messages += messages
        self.by_op[op] = self.by_op.get(op, 0.0) + float(sent.sum())

    def zeros(self) -> np.ndarray:
        return np.zeros(self.n_workers + 1)

    def end_exchange(self) -> None:
        """Close one synchronisation inside a round (an iteration of agents on a time-varying graph): its
        time is its own busiest node's. Projected over the whole round instead, a round's busiest node
        stood for every iteration's, and the projected time changed with the round's length (--eval-every)."""
        done_sent, done_recv, done_messages = self._projected
        per_node = self.network.seconds(
            self._round_messages - done_messages, np.maximum(self._round_sent - done_sent, self._round_recv - done_recv)
        )
        self._round_comm_s += float(per_node.max())
        for done, now in zip(self._projected, (self._round_sent, self._round_recv, self._round_messages), strict=True):
            done[:] = now

    def end_round(self) -> RoundTraffic:
        """Close the round: add it to the totals and project its time on the busiest node (of each exchange
        where ``end_exchange`` marked them)."""
        self.end_exchange()
        traffic = RoundTraffic(self._round_comm_s, float(self._round_sent.max()), float(self._round_recv.max()))
        self.comm_s += traffic.comm_s
        self.sent += self._round_sent
        self.recv += self._round_recv
        self.messages += self._round_messages
        for buf in (self._round_sent, self._round_recv, self._round_messages, *self._projected):
            buf.fill(0.0)
        self._round_comm_s = 0.0
        return traffic

    def totals(self) -> dict[str, float]:
        workers = slice(0, self.n_workers)
        return {
            "bytes_sent_total": float(self.sent.sum()),
            "bytes_recv_total": float(self.recv.sum()),
            "bytes_sent_max_worker": float(self.sent[workers].max()),
            "bytes_recv_max_worker": float(self.recv[workers].max()),
            "bytes_sent_master": float(self.sent[self.n_workers]),
            "bytes_recv_master": float(self.recv[self.n_workers]),
            "messages_total": float(self.messages.sum()),
            "messages_max_worker": float(self.messages[workers].max()),
            "messages_master": float(self.messages[self.n_workers]),
            "comm_s": self.comm_s,
        }

    def state_dict(self) -> dict:
        return {
            "sent": torch.from_numpy(self.sent.copy()),
            "recv": torch.from_numpy(self.recv.copy()),
            "messages": torch.from_numpy(self.messages.copy()),
            "comm_s": self.comm_s,
            "by_op": dict(self.by_op),
        }

    def load_state_dict(self, state: dict) -> None:
        self.sent = state["sent"].numpy().copy()
        self.recv = state["recv"].numpy().copy()
        self.messages = state["messages"].numpy().copy()
        self.comm_s = float(state["comm_s"])
        self.by_op = dict(state["by_op"])


class Comm(Protocol):
    """What the group needs from the process layer. :class:`LocalComm` is the one-process case."""

    rank: int
    world_size: int
    wire_bytes_sent: float  # bytes this rank handed to the transport (see pnnctl.distributed)

    def all_reduce_sum(self, t: Tensor, inplace: bool = False) -> Tensor: ...

    def all_gather_blocks(self, t: Tensor, block_sizes: list[int], bookkeeping: bool = False) -> Tensor: ...

    def barrier(self) -> None: ...

    def neighbor_exchange(self, t: Tensor, block_sizes: list[int], peers: list[int]) -> Tensor: ...

    def send_to(self, t: Tensor, dst_rank: int) -> None: ...

    def exchange_pieces(
        self, outgoing: dict[int, Tensor], incoming: dict[int, int], dtype: torch.dtype
    ) -> dict[int, Tensor]: ...

    def recv_from(self, shape: tuple[int, ...], dtype: torch.dtype, src_rank: int) -> Tensor: ...

    def any_true(self, flag: bool) -> bool: ...

    def min_int(self, value: int) -> int: ...

    def share_text(self, text: str) -> str: ...

    def gather_floats(self, values: list[float]) -> list[list[float]]: ...


class LocalComm:
    """A single process holding every worker: nothing crosses a process boundary."""

    rank = 0
    world_size = 1
    wire_bytes_sent = 0.0

    def all_reduce_sum(self, t: Tensor, inplace: bool = False) -> Tensor:
        return t

    def all_gather_blocks(self, t: Tensor, block_sizes: list[int], bookkeeping: bool = False) -> Tensor:
        return t

    def barrier(self) -> None:
        return None

    def neighbor_exchange(self, t: Tensor, block_sizes: list[int], peers: list[int]) -> Tensor:
        return t

    def send_to(self, t: Tensor, dst_rank: int) -> None:
        raise RuntimeError("a single process has no other rank to send to")

    def exchange_pieces(
        self, outgoing: dict[int, Tensor], incoming: dict[int, int], dtype: torch.dtype
    ) -> dict[int, Tensor]:
        if outgoing or incoming:
            raise RuntimeError("a single process has no other rank to exchange with")
        return {}

    def recv_from(self, shape: tuple[int, ...], dtype: torch.dtype, src_rank: int) -> Tensor:
        raise RuntimeError("a single process has no other rank to receive from")

    def any_true(self, flag: bool) -> bool:
        return flag

    def min_int(self, value: int) -> int:
        return value

    def share_text(self, text: str) -> str:
        return text

    def gather_floats(self, values: list[float]) -> list[list[float]]:
        return [list(values)]


F = TypeVar("F", bound=Callable[..., Any])


def _timed(method: F) -> F:
    """Add the call's seconds to ``group.collective_s`` (the ledger and data movement share of a round)."""

    @functools.wraps(method)
    def wrapper(self: WorkerGroup, *args: Any, **kwargs: Any) -> Any:
        wait_for_gpu()  # the caller's queued kernels are not the collective's time
        start = time.perf_counter()
        try:
            return method(self, *args, **kwargs)
        finally:
            wait_for_gpu()
            self.collective_s += time.perf_counter() - start

    return wrapper  # type: ignore[return-value]


def block_sizes(n_workers: int, world_size: int) -> list[int]:
    """Contiguous blocks of logical workers per rank; sizes differ by at most one (first ranks larger)."""
    base, extra = divmod(n_workers, world_size)
    return [base + (1 if r < extra else 0) for r in range(world_size)]


#: A graph mixes by a sparse (CSR) product only with at most this many terms per row on average:
#: beyond it each output row's sources scatter over more memory than the caches hold and a term
#: costs ~3x more (a 2-core EPYC VM, rows of 269k floats, 256 agents: 41-73 us a term at up to 14
#: terms per row, 100-120 us at 27-39).
SPARSE_MAX_TERMS_PER_ROW = 16
#: ... and at most this density: a small, dense graph is cheaper as one GEMM than as separate terms.
SPARSE_MAX_DENSITY = 0.4


def sparse_mixing(weights: Tensor, local_rows: Tensor) -> Tensor | None:
    """``local_rows`` (this process's rows of the mixing matrix ``weights [N, N]``, on the device and
    in the dtype of the values they will mix) as a CSR tensor where the neighbour sums are faster as a
    sparse product, or None where one dense matrix product is.

    A sparse product reads each output row's neighbours and writes the row once (MKL's sparse product
    where torch is built with it, as on Linux x86; elsewhere torch's own loop over rows, an axpy per
    term, which keeps the rows independent too). On a 2-core EPYC VM with rows of 269k floats, in one
    run (dense product / the block products pnnctl used before, dense or banded GEMMs over runs of rows
    / sparse; ms): ring N = 16 2.9 / 2.7 / 1.6; ring N = 64 37.3 / 13.0 / 6.7; ring N = 256 501 / 61.5 /
    27.1; torus 16 x 16 489 / 234 / 52.7; Erdős–Rényi(0.05) N = 256, 14 terms per row, 486 / 633 / 166;
    but Erdős–Rényi(0.1) N = 256, 26 per row, 523 / 1059 / 701 and a complete graph of 16 2.6 / 2.7 /
    6.2: hence the two limits above.

    The choice looks at the whole graph, not this process's rows, so that every rank of a distributed
    run and the simulation sum the same way: a sparse product's rows come out bit for bit the same
    whichever rows it is given. None on a GPU (one product beats many small kernels) and for dtypes
    the CPU's sparse product does not take.
    """
    if local_rows.device.type != "cpu" or local_rows.dtype not in (torch.float32, torch.float64):
        return None
    n = weights.shape[0]
    terms = int(torch.count_nonzero(weights))
    if terms > n * min(SPARSE_MAX_TERMS_PER_ROW, SPARSE_MAX_DENSITY * n):  # one agent: 1 > 0.4, dense
        return None
    with warnings.catch_warnings():  # torch calls its sparse CSR layout "beta"; it is what we need here
        warnings.simplefilter("ignore", UserWarning)
        return local_rows.to_sparse_csr()


@dataclass(frozen=True)
class _GraphPlan:
    """What mix needs from one weights tensor, with the tensor and its version it was made from."""

    weights: Tensor
    version: int
    out_degree: np.ndarray
    in_degree: np.ndarray
    peer_ranks: list[int]
    local_rows: Tensor
    sparse_rows: Tensor | None
    #: The ledger arrays (sent, received, messages) of one mix, by (bytes per worker, new_messages).
    traffic: dict[tuple[int, bool], tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=dict)

    def mix_traffic(self, size: int, new_messages: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """What a mix of ``size`` bytes per worker adds to the ledger (its N workers, then the master, who
        takes no part): worked out once per graph and size, since a static graph mixes the same tensors
        every iteration."""
        key = (size, new_messages)
        if key not in self.traffic:
            n = len(self.out_degree)  # every worker of the graph, not only this rank's
            sent, recv, msgs = np.zeros(n + 1), np.zeros(n + 1), np.zeros(n + 1)
            sent[:n] = self.out_degree * size
            recv[:n] = self.in_degree * size
            if new_messages:
                msgs[:n] = self.out_degree
            for shared in (sent, recv, msgs):  # every later mix of this size hands out the same arrays
                shared.flags.writeable = False
            self.traffic[key] = (sent, recv, msgs)
        return self.traffic[key]


def weighted_rows(rows: Tensor, values: Tensor, sparse_rows: Tensor | None = None, out: Tensor | None = None) -> Tensor:
    """``out[i] = sum_j rows[i, j] * values[j]`` for ``rows [m, N]`` and ``values [N, ...]``.

    ``sparse_rows``: ``rows`` as CSR (``sparse_mixing``), kept by the caller; None: a dense product.
    ``out``: a contiguous ``[m, ...]`` tensor to write into, not sharing memory with ``values``
    (reusing a dead buffer spares the page faults of a fresh one); otherwise a new tensor.
    """
    flat = values.reshape(values.shape[0], -1)
    shape = (rows.shape[0], *values.shape[1:])
    if out is None:
        out = torch.empty(shape, dtype=flat.dtype, device=flat.device)
    elif (
        out.shape != shape
        or not out.is_contiguous()
        or out.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
    ):
        raise ValueError(f"out must be a contiguous {tuple(shape)} tensor apart from values, not {tuple(out.shape)}")
    out_rows = out.view(rows.shape[0], -1)
    if sparse_rows is None:
        torch.matmul(rows, flat, out=out_rows)
    else:  # beta=0: out's old contents are never read, so a dead buffer's NaNs cannot leak in
        torch.addmm(out_rows, sparse_rows, flat, beta=0, out=out_rows)
    return out


class WorkerGroup:
    """N logical workers, of which this process holds ``local_workers``; collectives and ledger."""

    def __init__(self, n_workers: int, ledger: Ledger, comm: Comm | None = None) -> None:
        self.n_workers = n_workers
        self.comm: Comm = comm or LocalComm()
        self.ledger = ledger
        self.blocks = block_sizes(n_workers, self.comm.world_size)
        self.local_workers = self.workers_of(self.comm.rank)
        self.collective_s = 0.0
        self._graph: _GraphPlan | None = None  # of the last mix

    @property
    def n_local(self) -> int:
        return len(self.local_workers)

    @property
    def is_master_process(self) -> bool:
        return self.comm.rank == 0

    # -- collectives --------------------------------------------------------------------------

    def _record_ring_all_reduce(self, op: str, size_bytes: float, tag: str) -> int:
        """Check ``op`` (before anything is counted) and record one ring all-reduce; returns N."""
        if op not in ("mean", "sum"):
            raise ValueError(f"all_reduce op must be 'sum' or 'mean', not {op!r}")
        n = self.n_workers
        per_worker, messages = ring_all_reduce_bytes(n, size_bytes)
        sent, msgs = self.ledger.zeros(), self.ledger.zeros()
        sent[:n] = per_worker
        msgs[:n] = messages
        self.ledger.record(tag, sent, sent.copy(), msgs)
        return n

    @_timed
    def all_reduce(self, t: Tensor, op: str = "mean", tag: str = "all_reduce") -> Tensor:
        """Sum or mean over all N workers; every worker gets the result. ``t`` is ``[n_local, ...]``."""
        n = self._record_ring_all_reduce(op, tensor_bytes(t), tag)
        total = self.comm.all_reduce_sum(t.sum(dim=0))
        if op == "mean":
            total = total / n
        return total.unsqueeze(0).expand(self.n_local, *total.shape)

    @_timed
    def all_reduce_flat(self, tensors: list[Tensor], op: str = "mean", tag: str = "all_reduce") -> list[Tensor]:
        """All-reduce several ``[n_local, ...]`` tensors as one flat buffer (one collective, like a DDP bucket).

        Returns one reduced tensor per input, shaped like a single worker's slice (views of one buffer).
        """
        sizes = [t[0].numel() for t in tensors]
        dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors))
        local = torch.empty(sum(sizes), dtype=dtype, device=tensors[0].device)
        n = self._record_ring_all_reduce(op, tensor_bytes(local, workers_dim=False), tag)
        # Each tensor's sum over this rank's workers goes straight into its segment: concatenating the
        # stacked tensors first wrote every worker's copy once more (local-sgd at N = 256: 190 ms of
        # a 10 ms reduction, and a fresh 276 MB buffer every round).
        for t, segment in zip(tensors, local.split(sizes), strict=True):
            torch.sum(t.reshape(self.n_local, -1), dim=0, dtype=dtype, out=segment)
        reduced = self.comm.all_reduce_sum(local, inplace=True)
        if op == "mean":
            reduced.div_(n)
        out, offset = [], 0
        for t in tensors:
            size = t[0].numel()
            out.append(reduced[offset : offset + size].view(t.shape[1:]))
            offset += size
        return out

    @_timed
    def all_reduce_segments_(
        self, flat: Tensor, sizes: list[int], op: str = "mean", tag: str = "all_reduce", local_sum: bool = False
    ) -> None:
        """In-place all-reduce of a flat buffer of consecutive ``[n_local, size_i]`` blocks (see GradientBuffer).

        ``local_sum``: the buffer already holds the sum over this rank's workers (one block per size),
        as the gradient of one shared replica does. Ledger: one ring all-reduce of ``sum(sizes)``
        elements per worker either way. With one block per process the buffer itself goes on the
        wire, with no copy in or out.
        """
        n = self._record_ring_all_reduce(op, sum(sizes) * flat.element_size(), tag)
        if self.n_local == 1 or local_sum:
            self.comm.all_reduce_sum(flat, inplace=True)
            if op == "mean":
                flat.div_(n)
            return
        blocks = torch.split(flat, [self.n_local * size for size in sizes])
        local = torch.cat([block.view(self.n_local, -1).sum(dim=0) for block in blocks])
        reduced = self.comm.all_reduce_sum(local, inplace=True)
        if op == "mean":
            reduced.div_(n)
        for block, part in zip(blocks, torch.split(reduced, sizes), strict=True):
            block.view(self.n_local, -1).copy_(part.unsqueeze(0).expand(self.n_local, -1))

    @_timed
    def broadcast(self, master_value: Tensor, tag: str = "broadcast") -> Tensor:
        """The master sends the same ``master_value`` to every worker; returns ``[n_local, ...]``.

        The master's state is identical on every rank (it is computed from all-gathered inputs),
        so no bytes cross processes here; the ledger still counts the logical messages.
        """
        size = master_value.numel() * master_value.element_size()
        sent, recv, msgs = self.ledger.zeros(), self.ledger.zeros(), self.ledger.zeros()
        sent[self.n_workers] = size * self.n_workers
        msgs[self.n_workers] = self.n_workers
        recv[: self.n_workers] = size
        self.ledger.record(tag, sent, recv, msgs)
        return master_value.unsqueeze(0).expand(self.n_local, *master_value.shape)

    @_timed
    def scatter(self, pieces: Tensor, tag: str = "scatter", sizes: np.ndarray | None = None) -> Tensor:
        """The master sends worker i its piece ``pieces[i]`` (``[N, ...]``); returns this rank's block.

        ``sizes`` overrides the bytes per worker when pieces are padded to a common shape.
        """
        sizes = np.full(self.n_workers, float(tensor_bytes(pieces))) if sizes is None else sizes
        sent, recv, msgs = self.ledger.zeros(), self.ledger.zeros(), self.ledger.zeros()
        sent[self.n_workers] = sizes.sum()
        msgs[self.n_workers] = self.n_workers
        recv[: self.n_workers] = sizes
        self.ledger.record(tag, sent, recv, msgs)
        return pieces[self.local_workers.start : self.local_workers.stop]

    @_timed
    def gather(self, t: Tensor, tag: str = "gather", sizes: np.ndarray | None = None) -> Tensor:
        """Every worker sends its slice to the master; returns all N slices ``[N, ...]`` (on every rank)."""
        self._record_gather(np.full(self.n_workers, float(tensor_bytes(t))) if sizes is None else sizes, tag)
        return self.comm.all_gather_blocks(t, self.blocks)

    @_timed
    def record_gather(self, sizes: np.ndarray, tag: str = "gather") -> None:
        """The ledger of a :meth:`gather` of ``sizes[w]`` bytes per worker whose data needs no moving:
        one process holding every worker and the master already has it where the master reads it."""
        self._record_gather(sizes, tag)

    def _record_gather(self, sizes: np.ndarray, tag: str) -> None:
        sent, recv, msgs = self.ledger.zeros(), self.ledger.zeros(), self.ledger.zeros()
        sent[: self.n_workers] = sizes
        msgs[: self.n_workers] = 1
        recv[self.n_workers] = sizes.sum()
        self.ledger.record(tag, sent, recv, msgs)

    @_timed
    def all_gather(self, t: Tensor) -> Tensor:
        """All N slices on every rank, without ledger traffic: for evaluation and metrics only."""
        return self.comm.all_gather_blocks(t, self.blocks, bookkeeping=True)

    @_timed
    def mix(
        self, t: Tensor, weights: Tensor, tag: str = "mix", new_messages: bool = True, out: Tensor | None = None
    ) -> Tensor:
        """Neighbour averaging: worker i gets ``sum_j weights[i, j] * t[j]`` (``weights``: ``[N, N]``, any device).

        Returns a new tensor (never a view of ``t``), which callers may update in place, or writes
        into ``out``: a dead ``[n_local, ...]`` buffer the caller no longer reads, other than ``t``.

        Worker j sends its slice to every i != j with ``weights[i, j] != 0``. With ``new_messages``
        False the bytes ride in the messages of an earlier mix of the same round (NEXT sends its
        weights and its tracker together), so only bytes are added.
        """
        plan = self._graph_plan(weights, t)
        self.ledger.record(tag, *plan.mix_traffic(tensor_bytes(t), new_messages))
        everyone = self.comm.neighbor_exchange(t, self.blocks, plan.peer_ranks)
        return weighted_rows(plan.local_rows, everyone, plan.sparse_rows, out=out)

    def _graph_plan(self, weights: Tensor, t: Tensor) -> _GraphPlan:
        """Degrees, peer ranks and this rank's rows of ``weights`` (for ``t``'s device and dtype), kept
        while the same tensor comes back.

        A static graph hands mix the same weights every iteration; recomputing this each time cost
        about as much as a 4-agent ring's whole neighbour sum. The degrees and peers come from a CPU
        copy (the weights usually live there): on a GPU each would be a wait for the device, and a
        time-varying graph brings new weights every iteration. Only this rank's rows go to ``t``'s device.
        """
        plan = self._graph
        if (
            plan is not None
            and plan.weights is weights
            and plan.version == weights._version
            and plan.local_rows.dtype == t.dtype
            and plan.local_rows.device == t.device
        ):
            return plan
        host = weights.cpu()
        edges = (host != 0).clone()
        edges.fill_diagonal_(False)
        local_rows = host[self.local_workers.start : self.local_workers.stop].to(device=t.device, dtype=t.dtype)
        self._graph = plan = _GraphPlan(
            weights=weights,
            version=weights._version,
            out_degree=edges.sum(dim=0).double().numpy(),  # column j: who receives from j
            in_degree=edges.sum(dim=1).double().numpy(),
            peer_ranks=self._peer_ranks(edges),
            local_rows=local_rows,
            sparse_rows=sparse_mixing(host, local_rows),
        )
        return plan

    def workers_of(self, rank: int) -> range:
        """The logical workers rank ``rank`` holds (a contiguous block)."""
        start = sum(self.blocks[:rank])
        return range(start, start + self.blocks[rank])

    def rank_of(self, worker: int) -> int:
        """The rank holding logical worker ``worker``."""
        return int(np.searchsorted(np.cumsum(self.blocks), worker, side="right"))

    @_timed
    def exchange_pieces(
        self, outgoing: dict[int, Tensor], incoming: dict[int, int], dtype: torch.dtype
    ) -> dict[int, Tensor]:
        """Irregular point-to-point traffic between ranks: ``outgoing[r]`` (1-D) to rank r, and
        ``incoming[r]`` elements from it. The caller records the logical traffic (``record_p2p``);
        only these bytes go on the wire. Returns the received pieces by rank."""
        return self.comm.exchange_pieces(outgoing, incoming, dtype)

    @_timed
    def take_from_owners(self, t: Tensor, owner_rank: Tensor) -> Tensor:
        """Each element of ``t`` (same shape on every rank) as rank ``owner_rank[...]`` holds it.

        For a model stored sharded across ranks, to evaluate or save it whole: bookkeeping, like the
        evaluation gathers, so neither ledger nor wire bytes.
        """
        if self.comm.world_size == 1:
            return t
        everyone = self.comm.all_gather_blocks(t.unsqueeze(0), [1] * self.comm.world_size, bookkeeping=True)
        return everyone.gather(0, owner_rank.unsqueeze(0)).squeeze(0)

    @_timed
    def send(
        self, value: Tensor | None, src: int, dst: int, shape: tuple[int, ...], dtype: torch.dtype
    ) -> Tensor | None:
        """Move a tensor from worker ``src``'s rank to worker ``dst``'s rank, point to point.

        Returns it on ``dst``'s rank and None on the others; with both workers on one rank nothing
        moves. The caller records the logical traffic (``record_p2p``); only these bytes go on the wire.
        """
        src_rank, dst_rank = self.rank_of(src), self.rank_of(dst)
        if src_rank == dst_rank:
            return value if self.comm.rank == src_rank else None
        if self.comm.rank == src_rank:
            assert value is not None
            self.comm.send_to(value.contiguous(), dst_rank)
            return None
        if self.comm.rank == dst_rank:
            return self.comm.recv_from(shape, dtype, src_rank)
        return None

    def _peer_ranks(self, edges: Tensor) -> list[int]:
        """Ranks whose blocks share an edge (either direction) with this rank's block."""
        if self.comm.world_size == 1:
            return []
        owner = torch.repeat_interleave(torch.arange(len(self.blocks)), torch.tensor(self.blocks))
        linked = (edges | edges.T).cpu()
        mine = linked[self.local_workers.start : self.local_workers.stop].any(dim=0)
        return sorted({int(r) for r in owner[mine].tolist()} - {self.comm.rank})

    @_timed
    def record_p2p(self, op: str, sent: np.ndarray, recv: np.ndarray, messages: np.ndarray) -> None:
        """Traffic of an irregular exchange a strategy computes itself (arrays over nodes, master last)."""
        self.ledger.record(op, sent, recv, messages)
