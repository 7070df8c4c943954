"""WorkerGroup collectives: their numerical results and the traffic each records in the Ledger.

Expected traffic is written out from the table in ``pnnctl.workers`` (S = bytes of one worker's
payload, N = workers, the master is node N), not recomputed with the module's own helpers.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pnnctl.network import NetworkModel
from pnnctl.workers import Ledger, WorkerGroup, sparse_mixing, weighted_rows

NETWORK = NetworkModel("test", latency_s=1e-3, bandwidth_bytes_per_s=1e6)
WORKER_COUNTS = [1, 2, 3, 8]
SHAPES = [(5,), (3, 4), (2, 3, 2)]
DTYPES = [torch.float32, torch.float64]


def group_of(n_workers: int, network: NetworkModel = NETWORK) -> tuple[WorkerGroup, Ledger]:
    ledger = Ledger(n_workers, network)
    return WorkerGroup(n_workers, ledger), ledger


def values(n_workers: int, shape: tuple[int, ...], dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n_workers, *shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def payload_bytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


class Expected:
    """Traffic per node (workers 0..N-1, master N) that a test expects, accumulated over ops."""

    def __init__(self, n_workers: int) -> None:
        self.n = n_workers
        self.sent = np.zeros(n_workers + 1)
        self.recv = np.zeros(n_workers + 1)
        self.messages = np.zeros(n_workers + 1)

    def all_reduce(self, size: float) -> None:
        n = self.n
        if n > 1:
            self.sent[:n] += 2 * (n - 1) / n * size
            self.recv[:n] += 2 * (n - 1) / n * size
            self.messages[:n] += 2 * (n - 1)

    def broadcast(self, size: float) -> None:
        self.sent[self.n] += self.n * size
        self.messages[self.n] += self.n
        self.recv[: self.n] += size

    def scatter(self, sizes: list[float]) -> None:
        self.sent[self.n] += sum(sizes)
        self.messages[self.n] += self.n
        self.recv[: self.n] += sizes

    def gather(self, sizes: list[float]) -> None:
        self.sent[: self.n] += sizes
        self.messages[: self.n] += 1
        self.recv[self.n] += sum(sizes)

    def mix(self, out_degree: list[int], in_degree: list[int], size: float, new_messages: bool = True) -> None:
        self.sent[: self.n] += np.array(out_degree) * size
        self.recv[: self.n] += np.array(in_degree) * size
        if new_messages:
            self.messages[: self.n] += out_degree

    def comm_s(self, network: NetworkModel = NETWORK) -> float:
        per_node = [
            m * network.latency_s + max(s, r) / network.bandwidth_bytes_per_s
            for s, r, m in zip(self.sent, self.recv, self.messages, strict=True)
        ]
        return max(per_node)


def assert_round(ledger: Ledger, expected: Expected) -> None:
    """Nothing reaches the totals before end_round; end_round moves exactly the expected traffic."""
    before = (ledger.sent.copy(), ledger.recv.copy(), ledger.messages.copy(), ledger.comm_s)
    traffic = ledger.end_round()
    np.testing.assert_allclose(ledger.sent - before[0], expected.sent, rtol=1e-12, atol=0)
    np.testing.assert_allclose(ledger.recv - before[1], expected.recv, rtol=1e-12, atol=0)
    np.testing.assert_allclose(ledger.messages - before[2], expected.messages, rtol=0, atol=0)
    assert traffic.comm_s == pytest.approx(expected.comm_s(ledger.network), rel=1e-12, abs=0)
    assert ledger.comm_s == pytest.approx(before[3] + traffic.comm_s, rel=1e-12)
    assert traffic.max_sent == pytest.approx(expected.sent.max(), rel=1e-12)
    assert traffic.max_recv == pytest.approx(expected.recv.max(), rel=1e-12)


@pytest.mark.parametrize("n", WORKER_COUNTS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_all_reduce_returns_the_mean_or_sum_and_records_ring_traffic(n: int, shape: tuple[int, ...], dtype) -> None:
    group, ledger = group_of(n)
    t = values(n, shape, dtype)
    mean = group.all_reduce(t, op="mean")
    total = group.all_reduce(t, op="sum")
    assert mean.shape == t.shape and total.shape == t.shape
    for i in range(n):
        torch.testing.assert_close(mean[i], t.mean(dim=0))
        torch.testing.assert_close(total[i], t.sum(dim=0))
    assert ledger.sent.sum() == 0  # recorded for the round, not yet in the totals
    expected = Expected(n)
    expected.all_reduce(payload_bytes(shape, dtype))
    expected.all_reduce(payload_bytes(shape, dtype))
    assert_round(ledger, expected)


@pytest.mark.parametrize("n", WORKER_COUNTS)
def test_all_reduce_flat_is_one_collective_over_all_tensors(n: int) -> None:
    group, ledger = group_of(n)
    tensors = [values(n, (3, 4), seed=1), values(n, (7,), seed=2), values(n, (2, 1, 2), seed=3)]
    reduced = group.all_reduce_flat(tensors, op="mean")
    for t, r in zip(tensors, reduced, strict=True):
        assert r.shape == t.shape[1:]
        torch.testing.assert_close(r, t.mean(dim=0))
    expected = Expected(n)
    expected.all_reduce((12 + 7 + 4) * 4)
    assert_round(ledger, expected)
    summed = group.all_reduce_flat(tensors, op="sum")
    torch.testing.assert_close(summed[1], tensors[1].sum(dim=0))


@pytest.mark.parametrize("n", WORKER_COUNTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_broadcast_sends_the_masters_value_to_every_worker(n: int, shape: tuple[int, ...]) -> None:
    group, ledger = group_of(n)
    master_value = values(1, shape, torch.float64)[0]
    out = group.broadcast(master_value)
    assert out.shape == (n, *shape)
    for i in range(n):
        assert torch.equal(out[i], master_value)
    expected = Expected(n)
    expected.broadcast(payload_bytes(shape, torch.float64))
    assert_round(ledger, expected)


@pytest.mark.parametrize("n", WORKER_COUNTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_scatter_gives_worker_i_piece_i(n: int, shape: tuple[int, ...]) -> None:
    group, ledger = group_of(n)
    pieces = values(n, shape)
    out = group.scatter(pieces)
    assert torch.equal(out, pieces)
    expected = Expected(n)
    expected.scatter([payload_bytes(shape, torch.float32)] * n)
    assert_round(ledger, expected)


@pytest.mark.parametrize("n", WORKER_COUNTS)
def test_scatter_and_gather_with_unequal_piece_sizes(n: int) -> None:
    group, ledger = group_of(n)
    sizes = np.arange(1, n + 1, dtype=float) * 100.0
    pieces = values(n, (4,))
    group.scatter(pieces, sizes=sizes)
    gathered = group.gather(pieces, sizes=sizes[::-1].copy())
    assert torch.equal(gathered, pieces)
    expected = Expected(n)
    expected.scatter(list(sizes))
    expected.gather(list(sizes[::-1]))
    assert_round(ledger, expected)


@pytest.mark.parametrize("n", WORKER_COUNTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_gather_collects_every_slice_at_the_master(n: int, shape: tuple[int, ...]) -> None:
    group, ledger = group_of(n)
    t = values(n, shape, torch.float64)
    out = group.gather(t)
    assert torch.equal(out, t)
    expected = Expected(n)
    expected.gather([payload_bytes(shape, torch.float64)] * n)
    assert_round(ledger, expected)


def ring_weights(n: int) -> tuple[torch.Tensor, list[int]]:
    """Ring averaging; degree 2 for N >= 3, 1 for N = 2 (both neighbours are the same worker), 0 alone."""
    w = torch.zeros(n, n)
    for i in range(n):
        for j in (i - 1, i, i + 1):
            w[i, j % n] = 1.0
    w = w / w.sum(dim=1, keepdim=True)
    degree = {1: 0, 2: 1}.get(n, 2)
    return w, [degree] * n


def star_weights(n: int) -> tuple[torch.Tensor, list[int]]:
    """Worker 0 is the hub: degree N-1 at the hub, 1 at every leaf."""
    w = torch.eye(n)
    w[0, :] = 1.0
    w[:, 0] = 1.0
    w = w / w.sum(dim=1, keepdim=True)
    return w, [n - 1] + [1] * (n - 1)


@pytest.mark.parametrize("n", WORKER_COUNTS)
@pytest.mark.parametrize("graph", [ring_weights, star_weights], ids=["ring", "star"])
@pytest.mark.parametrize("shape", SHAPES)
def test_mix_over_a_graph_is_weights_times_values_and_costs_one_payload_per_edge(
    n: int, graph, shape: tuple[int, ...]
) -> None:
    group, ledger = group_of(n)
    weights, degree = graph(n)
    t = values(n, shape)
    out = group.mix(t, weights)
    torch.testing.assert_close(out, (weights @ t.reshape(n, -1)).reshape(t.shape))
    expected = Expected(n)
    expected.mix(degree, degree, payload_bytes(shape, torch.float32))
    assert_round(ledger, expected)


def banded_and_scattered(name: str, generator: torch.Generator) -> torch.Tensor:
    """Mixing matrices of every shape the sums meet: bands with wrap-around, scattered entries, empty rows."""
    if name == "ring-40":
        return ring_weights(40)[0]
    if name == "ring-rows-13-to-33":  # a rank's rows of a ring
        return ring_weights(40)[0][13:33]
    if name == "torus-8x8":
        adj = torch.zeros(64, 64)
        for i in range(64):
            r, c = divmod(i, 8)
            for j in (r * 8 + (c + 1) % 8, ((r + 1) % 8) * 8 + c):
                adj[i, j] = adj[j, i] = 1.0
        return adj / 5 + torch.eye(64) / 5
    density = float(name.split("-")[1])
    rows = torch.rand(40, 40, generator=generator) * (torch.rand(40, 40, generator=generator) < density)
    rows[3] = 0.0  # a row with no neighbours gives zeros
    rows[16:32] = 0.0  # a run of rows without neighbours
    return rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["ring-40", "ring-rows-13-to-33", "torus-8x8", "random-0.05", "random-0.2",
                                  "random-1.0"])
def test_sparse_products_equal_the_matrix_product(name: str, dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(7)
    rows = banded_and_scattered(name, generator).to(dtype)
    values = torch.randn(rows.shape[1], 5, 3, generator=generator, dtype=dtype)
    sparse = rows.to_sparse_csr()
    out = weighted_rows(rows, values, sparse)
    assert out.shape == (rows.shape[0], 5, 3)
    expected = (rows @ values.reshape(rows.shape[1], -1)).reshape(out.shape)
    torch.testing.assert_close(out, expected)
    assert out.data_ptr() != values.data_ptr()
    buffer = torch.full(out.shape, float("nan"), dtype=dtype)  # a dead buffer: every element must be overwritten
    written = weighted_rows(rows, values, sparse, out=buffer)
    assert written.data_ptr() == buffer.data_ptr()
    torch.testing.assert_close(written, expected)
    square = values[: rows.shape[0]]
    with pytest.raises(ValueError, match="out must be"):
        # writing into the values being read would corrupt them
        weighted_rows(rows[:, : rows.shape[0]], square, rows[:, : rows.shape[0]].to_sparse_csr(), out=square)


def test_a_rank_s_rows_sum_bit_for_bit_as_in_the_whole_graph() -> None:
    # What lets a distributed run match the simulation exactly: each rank's slice of the sparse
    # product gives the same bits as the same rows of the whole product.
    generator = torch.Generator().manual_seed(3)
    weights = banded_and_scattered("random-0.2", generator)
    values = torch.randn(40, 1000, generator=generator)
    whole = weighted_rows(weights, values, weights.to_sparse_csr())
    for start, stop in [(0, 13), (13, 27), (27, 40), (5, 6)]:
        rows = weights[start:stop]
        assert torch.equal(weighted_rows(rows, values, rows.to_sparse_csr()), whole[start:stop])


def random_neighbours(n: int, k: int) -> torch.Tensor:
    """Each agent averages itself and k others drawn at random over all n (no band to exploit)."""
    generator = torch.Generator().manual_seed(0)
    weights = torch.eye(n)
    for i in range(n):
        weights[i, torch.randperm(n, generator=generator)[:k]] = 1.0
    return weights / weights.sum(dim=1, keepdim=True)


@pytest.mark.parametrize(("n", "graph", "sparse"), [(1, "ring", False), (4, "ring", False), (8, "complete", False),
                                                    (16, "ring", True), (64, "ring", True), (256, "ring", True),
                                                    (256, "8-random", True), (256, "30-random", False)])
def test_graphs_mix_sparsely_when_their_rows_are_few_and_sparse(n: int, graph: str, sparse: bool) -> None:
    # A ring of 4 (3 of 4 columns) or a complete graph is one dense product; rings of 16 and more and
    # 8 random neighbours of 256 are sparse; 30 random neighbours of 256 are past SPARSE_MAX_TERMS_PER_ROW.
    if graph == "ring":
        weights = ring_weights(n)[0] if n > 1 else torch.ones(1, 1)
    elif graph == "complete":
        weights = torch.full((n, n), 1.0 / n)
    else:
        weights = random_neighbours(n, int(graph.split("-")[0]))
    assert (sparse_mixing(weights, weights) is not None) == sparse
    local = weights[n // 2 :]  # a rank's rows follow the whole graph's choice
    chosen = sparse_mixing(weights, local)
    assert (chosen is not None) == sparse
    if chosen is not None:
        assert chosen.layout == torch.sparse_csr and torch.equal(chosen.to_dense(), local)
    assert (sparse_mixing(weights, local.double()) is not None) == sparse
    assert sparse_mixing(weights, local.half()) is None  # the CPU's sparse product takes float32/64 only


@pytest.mark.parametrize("n", [2, 3, 8])
def test_mix_counts_sends_by_out_degree_and_receives_by_in_degree(n: int) -> None:
    # Directed: worker 0 averages everyone, the others keep their own value. Each j > 0 sends once;
    # worker 0 receives N-1 payloads and sends nothing.
    group, ledger = group_of(n)
    weights = torch.eye(n)
    weights[0, :] = 1.0 / n
    t = values(n, (6,))
    out = group.mix(t, weights)
    torch.testing.assert_close(out[0], t.mean(dim=0))
    torch.testing.assert_close(out[1:], t[1:])
    expected = Expected(n)
    expected.mix([0] + [1] * (n - 1), [n - 1] + [0] * (n - 1), 6 * 4)
    assert_round(ledger, expected)


@pytest.mark.parametrize("n", [2, 3, 8])
def test_mix_without_new_messages_adds_bytes_only(n: int) -> None:
    group, ledger = group_of(n)
    weights, degree = star_weights(n)
    group.mix(values(n, (4,)), weights, new_messages=False)
    expected = Expected(n)
    expected.mix(degree, degree, 16, new_messages=False)
    assert_round(ledger, expected)
    assert ledger.messages.sum() == 0


@pytest.mark.parametrize("n", [2, 5])
def test_repeated_mixes_over_one_graph_each_add_their_own_traffic(n: int) -> None:
    # A static graph's mixes reuse one plan's ledger arrays: each size and message flag keeps its own,
    # and recording them never changes them (NEXT mixes weights and tracker every iteration).
    group, ledger = group_of(n)
    weights, degree = ring_weights(n)
    expected = Expected(n)
    for shape, new_messages in [((6,), True), ((6,), False), ((2, 3), True), ((4,), False), ((6,), True)]:
        group.mix(values(n, shape), weights, new_messages=new_messages)
        expected.mix(degree, degree, payload_bytes(shape, torch.float32), new_messages=new_messages)
    group.mix(values(n, (4,)).double(), weights)  # the same graph at another dtype: twice the bytes
    expected.mix(degree, degree, 32)
    assert_round(ledger, expected)


@pytest.mark.parametrize("n", WORKER_COUNTS)
def test_a_round_of_several_collectives_projects_the_busiest_nodes_time(n: int) -> None:
    # A slow-latency network and a slow-bandwidth one, so different nodes can be the busiest.
    for network in (NetworkModel("latency", 5e-2, 1e12), NetworkModel("bandwidth", 1e-9, 1e3)):
        group, ledger = group_of(n, network)
        expected = Expected(n)
        t = values(n, (10,))
        group.all_reduce(t)
        expected.all_reduce(40)
        group.broadcast(t[0])
        expected.broadcast(40)
        group.gather(t[:, :3])
        expected.gather([12] * n)
        weights, degree = star_weights(n)
        group.mix(t, weights)
        expected.mix(degree, degree, 40)
        assert_round(ledger, expected)
        # The next round starts from nothing: only its own collective counts in its projection.
        second = Expected(n)
        group.scatter(t)
        second.scatter([40] * n)
        first_comm = ledger.comm_s
        traffic = ledger.end_round()
        assert traffic.comm_s == pytest.approx(second.comm_s(network), rel=1e-12)
        assert ledger.comm_s == pytest.approx(first_comm + second.comm_s(network), rel=1e-12)
        np.testing.assert_allclose(ledger.sent, expected.sent + second.sent, rtol=1e-12)
        np.testing.assert_allclose(ledger.recv, expected.recv + second.recv, rtol=1e-12)


def test_totals_split_workers_from_the_master() -> None:
    n = 3
    group, ledger = group_of(n)
    t = values(n, (5,))
    group.gather(t)  # each worker sends 20 B, the master receives 60 B
    group.broadcast(t[0])  # the master sends 60 B, each worker receives 20 B
    group.all_reduce(t)  # each worker sends and receives 2*2/3*20 B in 4 messages
    ledger.end_round()
    totals = ledger.totals()
    ring = 2 * 2 / 3 * 20
    assert totals["bytes_sent_total"] == pytest.approx(3 * 20 + 60 + 3 * ring)
    assert totals["bytes_recv_total"] == pytest.approx(60 + 3 * 20 + 3 * ring)
    assert totals["bytes_sent_max_worker"] == pytest.approx(20 + ring)
    assert totals["bytes_recv_max_worker"] == pytest.approx(20 + ring)
    assert totals["bytes_sent_master"] == pytest.approx(60)
    assert totals["bytes_recv_master"] == pytest.approx(60)
    assert totals["messages_total"] == 3 * 1 + 3 + 3 * 4
    assert totals["messages_max_worker"] == 1 + 4
    assert totals["comm_s"] == pytest.approx(ledger.comm_s)
    assert ledger.by_op == pytest.approx({"gather": 60.0, "broadcast": 60.0, "all_reduce": 3 * ring})


def test_ledger_state_round_trips() -> None:
    group, ledger = group_of(4)
    group.all_reduce(values(4, (8,)), tag="grad")
    group.gather(values(4, (2,)))
    ledger.end_round()
    restored = Ledger(4, NETWORK)
    restored.load_state_dict(ledger.state_dict())
    assert restored.totals() == ledger.totals()
    assert restored.by_op == ledger.by_op


def test_an_all_reduce_with_an_unknown_op_records_no_traffic() -> None:
    group, ledger = group_of(4)
    with pytest.raises(ValueError):
        group.all_reduce(values(4, (8,)), op="max")
    ledger.end_round()
    assert ledger.totals()["bytes_sent_total"] == 0
