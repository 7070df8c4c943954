"""NEXT (``consensus``) and DGD (``dgd``): graphs and mixing weights, convergence on least squares,
l1 sparsity, Gauss–Newton algebra, ledger bytes on unequal degrees, resume, and 2-process runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from distributed_utils import NONDETERMINISTIC, assert_states_match, load_block_state, train_via_cli
from pnnctl.config import RunConfig
from pnnctl.errors import UsageError
from pnnctl.network import parse_network
from pnnctl.training import evaluate, precision_context
from pnnctl.workers import Ledger, WorkerGroup, sparse_mixing
from strategies.consensus import (
    TrackingState,
    dgd_iteration,
    next_iteration,
    single_hidden_layer_products,
    soft_threshold,
)
from strategies.graphs import (
    GraphSequence,
    complete_graph,
    components,
    is_connected,
    metropolis_hastings,
    parse_topology,
    spectral_gap,
)

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = ["complete", "ring", "torus", "star", "erdos-renyi:0.3", "erdos-renyi:0.05", "random-er:0.2",
            "edge-dropout:0.5"]
MLP = "mlp:64-8-10"
MLP_PARAMS = 64 * 8 + 8 + 8 * 10 + 10


def sequence(text: str, n: int, seed: int = 0, window: int = 4, base: str = "ring") -> GraphSequence:
    return GraphSequence(parse_topology(text), n, seed, window, parse_topology(base))


# -- graphs and weights ---------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("n", [5, 12, 16])
def test_mixing_weights_are_doubly_stochastic_and_respect_the_graph(family: str, n: int) -> None:
    graphs = sequence(family, n)
    for iteration in range(8):
        adj = graphs.at(iteration)
        weights = graphs.weights_at(iteration)
        assert torch.equal(adj, adj.T) and not adj.diagonal().any()
        assert torch.allclose(weights.sum(dim=0), torch.ones(n, dtype=torch.float64), atol=1e-12)
        assert torch.allclose(weights.sum(dim=1), torch.ones(n, dtype=torch.float64), atol=1e-12)
        assert (weights >= 0).all() and (weights.diagonal() > 0).all()
        off_diagonal = weights.clone().fill_diagonal_(0.0)
        assert torch.equal(off_diagonal != 0, adj)  # a weight exactly where the graph has an edge
        if not graphs.time_varying:
            assert is_connected(adj)
            assert torch.equal(adj, graphs.at(0))


def test_static_families_have_their_shape() -> None:
    assert (sequence("ring", 8).base.sum(dim=1) == 2).all()
    assert (sequence("complete", 6).base.sum(dim=1) == 5).all()
    assert (sequence("torus", 16).base.sum(dim=1) == 4).all()  # 4 x 4 torus
    star = sequence("star", 7).base.sum(dim=1)
    assert star[0] == 6 and (star[1:] == 1).all()
    er_a, er_b = sequence("erdos-renyi:0.3", 16, seed=0).base, sequence("erdos-renyi:0.3", 16, seed=1).base
    assert not torch.equal(er_a, er_b)  # graph_seed matters
    assert torch.equal(er_a, sequence("erdos-renyi:0.3", 16, seed=0).base)  # and fixes the graph
    # MH on a ring: a_ij = 1/3, so |lambda_2| = 1/3 + 2/3 cos(2 pi / n).
    for n in (5, 8, 16):
        expected = 1 - (1 / 3 + 2 / 3 * math.cos(2 * math.pi / n))
        assert spectral_gap(metropolis_hastings(sequence("ring", n).base)) == pytest.approx(expected, abs=1e-12)
    assert spectral_gap(metropolis_hastings(complete_graph(8))) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize(("family", "base"), [("random-er:0.03", "ring"), ("edge-dropout:0.3", "ring"),
                                              ("edge-dropout:0.2", "erdos-renyi:0.3")])
def test_time_varying_families_are_jointly_connected(family: str, base: str) -> None:
    n, window = 12, 3
    graphs = sequence(family, n, seed=5, window=window, base=base)
    allowed = graphs.base
    single_disconnected = 0
    for start in range(0, 30 * window, window):
        union = torch.zeros(n, n, dtype=torch.bool)
        for iteration in range(start, start + window):
            adj = graphs.at(iteration)
            assert not (adj & ~allowed).any()  # edge-dropout only uses base edges
            single_disconnected += not is_connected(adj)
            union |= adj
        assert is_connected(union), f"window starting at {start} is not jointly connected"
    assert single_disconnected > 0  # the graphs alone are not connected, so the repair mattered
    # A pure function of the iteration: a fresh sequence (a resumed run, another rank) agrees.
    again = sequence(family, n, seed=5, window=window, base=base)
    assert all(torch.equal(graphs.at(k), again.at(k)) for k in (7, 3, 29, 0))
    assert not all(torch.equal(graphs.at(k), graphs.at(k + 1)) for k in range(5))


def test_components_label_each_piece() -> None:
    adj = torch.zeros(5, 5, dtype=torch.bool)
    adj[0, 2] = adj[2, 0] = adj[3, 4] = adj[4, 3] = True
    assert components(adj).tolist() == [0, 1, 0, 3, 3]


def test_bad_topology_names_the_field(small_config) -> None:
    with pytest.raises(UsageError, match=r"^consensus\.topology: must be one of"):
        small_config(strategy="consensus", options={"topology": "hypercube"})
    with pytest.raises(UsageError, match=r"^dgd\.topology: the probability"):
        small_config(strategy="dgd", options={"topology": "erdos-renyi:1.5"})
    with pytest.raises(UsageError, match=r"^consensus\.surrogate: gauss-newton needs loss=squared"):
        small_config(strategy="consensus", options={"surrogate": "gauss-newton"})
    with pytest.raises(UsageError, match=r"^consensus\.base_topology: must be a static"):
        small_config(strategy="consensus", options={"topology": "edge-dropout:0.5", "base_topology": "random-er:0.5"})


def test_a_step_decay_that_would_reach_zero_is_refused(small_config, build_strategy) -> None:
    # alpha[n+1] = alpha[n] (1 - epsilon alpha[n]): epsilon alpha0 = 1 made every step after the first 0 (a run
    # that never learned, reported finished); above 1 the steps turned negative (a divergence blamed on --lr).
    with pytest.raises(UsageError) as next_error:
        small_config(strategy="consensus", options={"epsilon": 2.0, "alpha0": 0.5})
    assert str(next_error.value).startswith("consensus.epsilon: must be < 1/alpha0 = 2: ")
    with pytest.raises(UsageError) as dgd_error:
        build_strategy(small_config(strategy="dgd", lr=0.05, options={"epsilon": 25.0}))
    assert str(dgd_error.value).startswith("dgd.epsilon: must be < 1/--lr = 20: ")
    decaying = build_strategy(small_config(strategy="dgd", lr=0.05, options={"epsilon": 19.0}))
    decaying.run_round()
    assert 0 < decaying.alpha < 0.05


# -- the iteration on a strongly convex least-squares problem ---------------------------------------


def least_squares(n_agents: int = 8, m: int = 20, dim: int = 10, lam: float = 0.01):
    """Agents with different local optima (heterogeneous data), U = sum_i g_i + lam ||w||^2."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n_agents, m, dim, generator=g, dtype=torch.float64)
    truths = torch.randn(n_agents, dim, 1, generator=g, dtype=torch.float64)
    b = (a @ truths).squeeze(-1) + 0.1 * torch.randn(n_agents, m, generator=g, dtype=torch.float64)
    total = n_agents * m

    def grad_fn(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        residual = torch.bmm(a, w.unsqueeze(-1)).squeeze(-1) - b
        return torch.bmm(a.transpose(1, 2), residual.unsqueeze(-1)).squeeze(-1) / total, 0.5 * (residual**2).mean(1)

    flat_a, flat_b = a.reshape(total, dim), b.reshape(total)
    hessian = flat_a.T @ flat_a / total
    optimum = torch.linalg.solve(hessian + 2 * lam * torch.eye(dim, dtype=torch.float64), flat_a.T @ flat_b / total)
    return grad_fn, optimum, hessian, flat_a, flat_b


def ring_group(n: int) -> tuple[WorkerGroup, torch.Tensor]:
    return WorkerGroup(n, Ledger(n, parse_network("lan-1g"))), sequence("ring", n).base_weights


@pytest.mark.parametrize("topology", ["ring", "random-er:0.2"])
def test_next_reaches_the_centralized_optimum(topology: str) -> None:
    n, lam = 8, 0.01
    grad_fn, optimum, hessian, _, _ = least_squares(n, lam=lam)
    lipschitz = float(torch.linalg.eigvalsh(hessian).max())
    group, graphs = ring_group(n)[0], sequence(topology, n, window=4)
    w0 = torch.zeros(n, optimum.numel(), dtype=torch.float64)
    grad, _ = grad_fn(w0)
    state = TrackingState(w=w0.clone(), y=grad.clone(), grad=grad, alpha=1.0)
    for k in range(400):
        weights = graphs.weights_at(k)
        next_iteration(state, grad_fn, weights, group, tau=2 * lipschitz, lam=lam, reg="l2", epsilon=0.0)
    assert float((state.w - optimum).norm(dim=1).max()) < 1e-4
    assert torch.allclose(state.y.sum(dim=0), state.grad.sum(dim=0), atol=1e-12)  # the tracker keeps the sum


@pytest.mark.parametrize("model", ["mlp:64-16-10", "mlp:64-16-10,bias=false"])
def test_gradient_blocks_are_the_whole_gradient_cut_and_dgd_steps_alike_with_either(
    small_config, build_strategy, model: str
) -> None:
    # Full batches, so that both calls see the same samples; independent inits, so that the agents differ.
    config = small_config(strategy="dgd", workers=4, model=model,
                          options={"batch": "full", "init": "independent", "topology": "ring"})
    strategy = build_strategy(config)
    w = strategy.w.clone()
    blocks, losses = strategy.gradient_blocks(w)
    whole, whole_losses = strategy.gradient(w)
    assert [b.shape[1] for b in blocks] == strategy.numels
    assert torch.equal(torch.cat(blocks, dim=1), whole) and torch.equal(losses, whole_losses)
    group, weights = strategy.ctx.group, strategy.weights()
    by_blocks, _ = dgd_iteration(w, 0.1, lambda _: (blocks, losses), weights, group, lam=1e-3, reg="l2")
    by_whole, _ = dgd_iteration(w, 0.1, lambda _: (whole, losses), weights, group, lam=1e-3, reg="l2")
    assert torch.equal(by_blocks, by_whole)
    assert not torch.equal(by_blocks, w)


def test_dgd_with_a_constant_step_stalls_at_a_bias() -> None:
    n, lam = 8, 0.01
    grad_fn, optimum, hessian, _, _ = least_squares(n, lam=lam)
    lipschitz = float(torch.linalg.eigvalsh(hessian).max())
    group, weights = ring_group(n)
    w = torch.zeros(n, optimum.numel(), dtype=torch.float64)
    distances = []
    for _ in range(1500):
        w, _ = dgd_iteration(w, 0.5 / (n * lipschitz), grad_fn, weights, group, lam=lam, reg="l2")
        distances.append(float((w - optimum).norm(dim=1).max()))
    assert distances[-1] > 1e-2  # a bias of order alpha: DGD's fixed point is not the optimum
    assert abs(distances[-1] - distances[-200]) < 1e-6  # ... and it has stopped moving


def test_l1_gives_exact_zeros_at_the_lasso_solution() -> None:
    n, lam = 8, 0.3
    grad_fn, _, hessian, flat_a, flat_b = least_squares(n, lam=0.0)
    lipschitz = float(torch.linalg.eigvalsh(hessian).max())
    tau = 2 * lipschitz
    # The centralized lasso optimum by proximal gradient.
    lasso = torch.zeros(flat_a.shape[1], dtype=torch.float64)
    for _ in range(5000):
        gradient = flat_a.T @ (flat_a @ lasso - flat_b) / len(flat_b)
        lasso = soft_threshold(lasso - gradient / tau, lam / tau)
    assert 0 < int((lasso == 0).sum()) < lasso.numel()
    group, weights = ring_group(n)
    w0 = torch.ones(n, lasso.numel(), dtype=torch.float64)
    grad, _ = grad_fn(w0)
    state = TrackingState(w=w0.clone(), y=grad.clone(), grad=grad, alpha=1.0)
    for _ in range(400):
        next_iteration(state, grad_fn, weights, group, tau=tau, lam=lam, reg="l1", epsilon=0.0)
    assert float((state.w - lasso).abs().max()) < 1e-6
    assert torch.equal(state.w == 0, (lasso == 0).expand_as(state.w))  # exactly zero where the lasso is


def test_l1_through_the_strategy_zeroes_weights_exactly(small_config, build_strategy) -> None:
    options = {"reg": "l1", "lam": 0.05, "iterations_per_round": 10, "topology": "complete"}
    strategy = build_strategy(small_config(strategy="consensus", workers=4, batch_size=16, options=options))
    for _ in range(3):
        strategy.run_round()
    zeros = strategy.state.w == 0
    assert zeros.float().mean() > 0.3  # exact zeros, not merely small weights
    assert float(strategy.eval_extras()["zero_fraction"]) > 0.3


# -- the strategies on real data ------------------------------------------------------------------


def test_tracker_sum_equals_gradient_sum_and_gradients_are_each_agents_own(small_config, build_strategy) -> None:
    config = small_config(strategy="consensus", workers=4, batch_size=8,
                          options={"topology": "random-er:0.4", "iterations_per_round": 5})
    strategy = build_strategy(config)
    strategy.run_round()
    s = strategy.state
    assert torch.allclose(s.y.sum(dim=0), s.grad.sum(dim=0), atol=1e-6)
    # The stacked gradient of agent i equals a separate computation on its own batch, times m_i / M.
    w = s.w.clone()
    position = list(strategy.sampler.positions)
    grad, _ = strategy.gradient(w)
    strategy.sampler.positions = position
    index = strategy.sampler.next_indices()
    shard_sizes = torch.tensor([len(sh) for sh in strategy.ctx.shards], dtype=torch.float32)
    for i in range(4):
        wi = w[i : i + 1].clone().requires_grad_(True)
        x, y = strategy.ctx.x_train[index[i : i + 1]], strategy.ctx.y_train[index[i : i + 1]]
        loss = strategy.agent_losses(strategy.forward(wi, x), y).sum() * shard_sizes[i] / shard_sizes.sum()
        (own,) = torch.autograd.grad(loss, wi)
        assert torch.allclose(own[0], grad[i], atol=1e-6)


def test_full_batch_gradients_sum_to_the_gradient_of_the_mean_training_loss(small_config, build_strategy) -> None:
    # digits' 1437 training samples over 4 agents: shards of 360, 359, 359, 359 (padded and masked).
    config = small_config(strategy="dgd", workers=4, options={"batch": "full", "iterations_per_round": 1})
    strategy = build_strategy(config)
    assert len({len(s) for s in strategy.ctx.shards}) == 2
    grad, _ = strategy.gradient(strategy.w)
    w = strategy.w[:1].clone().requires_grad_(True)  # identical initial weights: any agent's copy
    x, y = strategy.ctx.x_train.unsqueeze(0), strategy.ctx.y_train.unsqueeze(0)
    (centralized,) = torch.autograd.grad(strategy.agent_losses(strategy.forward(w, x), y).sum(), w)
    assert torch.allclose(grad.sum(dim=0), centralized[0], atol=1e-6)
    assert strategy.run_round().samples == len(strategy.ctx.y_train)


def test_eval_model_is_the_agents_average_and_extras_measure_the_agents(small_config, build_strategy) -> None:
    config = small_config(strategy="dgd", workers=4, batch_size=8,
                          options={"topology": "ring", "iterations_per_round": 5, "init": "independent"})
    strategy = build_strategy(config)
    strategy.run_round()
    w = strategy.w
    model = strategy.eval_model()
    average = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert torch.allclose(average, w.mean(dim=0), atol=1e-7)
    extras = strategy.eval_extras()
    expected = float(((w - w.mean(dim=0)) ** 2).sum(dim=1).mean())
    assert extras["consensus_error"] == pytest.approx(expected, rel=1e-5)
    assert extras["consensus_error"] > 0  # independent inits, a sparse graph: not yet agreed
    data = strategy.ctx.data
    own = []
    for i in range(4):
        single = strategy.single
        with torch.no_grad():
            for param, value in zip(single.parameters(), strategy.unflatten(w[i : i + 1]).values(), strict=True):
                param.copy_(value)
        own.append(evaluate(single, data.x_test, data.y_test)[1])
    assert extras["agent_acc_min"] == pytest.approx(min(own), abs=1e-6)
    assert extras["agent_acc_max"] == pytest.approx(max(own), abs=1e-6)
    assert extras["agent_acc_mean"] == pytest.approx(sum(own) / 4, abs=1e-6)


def test_next_on_digits_learns_and_agents_agree(small_config, build_strategy) -> None:
    config = small_config(strategy="consensus", workers=4, batch_size=16, options={"topology": "ring"})
    strategy = build_strategy(config)
    data = strategy.ctx.data
    before = evaluate(strategy.eval_model(), data.x_test, data.y_test)[1]
    for _ in range(4):
        result = strategy.run_round()
    after = evaluate(strategy.eval_model(), data.x_test, data.y_test)[1]
    assert after > max(0.8, before + 0.5)
    assert math.isfinite(result.loss)
    extras = strategy.eval_extras()
    assert extras["agent_acc_min"] > 0.7 and extras["consensus_error"] < 1.0
    assert extras["spectral_gap"] == pytest.approx(1 - (1 / 3 + 2 / 3 * math.cos(2 * math.pi / 4)))


# -- ledger -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("strategy_name", "multiple"), [("consensus", 2), ("dgd", 1)])
def test_ledger_bytes_are_degree_times_message_size_on_a_star(
    strategy_name: str, multiple: int, small_config, build_strategy
) -> None:
    n, iterations = 5, 3
    config = small_config(strategy=strategy_name, workers=n, batch_size=4, model=MLP,
                          options={"topology": "star", "iterations_per_round": iterations})
    strategy = build_strategy(config)
    strategy.run_round()
    ledger = strategy.ctx.group.ledger
    ledger.end_round()
    degree = [n - 1] + [1] * (n - 1)  # the hub and the leaves
    expected = [iterations * d * multiple * MLP_PARAMS * 4 for d in degree]
    assert ledger.sent[:n].tolist() == expected
    assert ledger.recv[:n].tolist() == expected
    assert ledger.messages[:n].tolist() == [iterations * d for d in degree]  # tracker rides along
    assert ledger.sent[n] == ledger.recv[n] == 0


def test_time_varying_ledger_charges_each_iterations_own_graph(small_config, build_strategy) -> None:
    n, iterations = 6, 7
    options = {"topology": "random-er:0.3", "iterations_per_round": iterations, "window": 3}
    strategy = build_strategy(small_config(strategy="consensus", workers=n, batch_size=4, model=MLP, options=options))
    strategy.run_round()
    ledger = strategy.ctx.group.ledger
    ledger.end_round()
    degrees = sum(strategy.graphs.at(k).sum(dim=1) for k in range(iterations))
    assert ledger.sent[:n].tolist() == (degrees * 2 * MLP_PARAMS * 4).double().tolist()
    assert ledger.messages[:n].tolist() == degrees.double().tolist()
    # Projected time: each iteration on its own busiest agent. Over the round's totals, the round's busiest agent
    # stood for every iteration, so the figure changed with the round's length (--eval-every).
    network = ledger.network
    per_neighbour = network.latency_s + 2 * MLP_PARAMS * 4 / network.bandwidth_bytes_per_s
    each = [strategy.graphs.at(k).sum(dim=1).max().item() for k in range(iterations)]
    assert ledger.comm_s == pytest.approx(sum(each) * per_neighbour, rel=1e-12)
    assert ledger.comm_s > max(degrees).item() * per_neighbour


# -- Gauss–Newton -------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["mlp:6-5-3,act=tanh", "mlp:6-5-3,bias=false", "mlp:6-4-2,act=sigmoid"])
def test_gauss_newton_gram_and_jvp_are_the_jacobian_products(model: str) -> None:
    from pnnctl.models import build_model

    net = build_model(model, 2, (6,), int(model.split(",")[0].split("-")[-1]), seed=1, identical=False)
    names = [name for name, _ in net.named_parameters()]
    flat = torch.cat([p.detach().reshape(2, -1) for p in net.parameters()], dim=1).double()
    numels = [p[0].numel() for p in net.parameters()]
    shapes = [p.shape[1:] for p in net.parameters()]
    net = net.double()
    x = torch.randn(2, 4, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def unflatten(w: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: p.reshape(w.shape[0], *s) for n, p, s in zip(names, w.split(numels, dim=1), shapes, strict=True)}

    tangent = torch.randn(flat.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    gram, jv = single_hidden_layer_products(net, unflatten(flat), unflatten(tangent), x)
    for agent in range(2):
        def f(w: torch.Tensor, agent: int = agent) -> torch.Tensor:
            return torch.func.functional_call(net, unflatten(w.unsqueeze(0)), (x[agent : agent + 1],)).reshape(-1)

        jacobian = torch.func.jacrev(f)(flat[agent])
        assert torch.allclose(gram[agent], jacobian @ jacobian.T, atol=1e-10)
        assert torch.allclose(jv[agent].reshape(-1), jacobian @ tangent[agent], atol=1e-10)


def test_gauss_newton_step_solves_the_regularised_normal_equations(small_config, build_strategy) -> None:
    options = {"surrogate": "gauss-newton", "loss": "squared", "lam": 0.01, "tau": 3.0, "topology": "ring"}
    config = small_config(strategy="consensus", workers=2, batch_size=3, model="mlp:64-5-10", options=options)
    strategy = build_strategy(config)
    w = strategy.state.w
    d = torch.randn(w.shape, generator=torch.Generator().manual_seed(0))
    step = strategy.gauss_newton_step(w, d) - w
    x = strategy.ctx.x_train[strategy.last_index]
    scale = strategy.share / 3
    c = 3.0 + 2 * 0.01
    for agent in range(2):
        def f(v: torch.Tensor, agent: int = agent) -> torch.Tensor:
            return strategy.forward(v.unsqueeze(0), x[agent : agent + 1]).reshape(-1)

        jacobian = torch.func.jacrev(f)(w[agent]).double()
        lhs = scale[agent].double() * jacobian.T @ (jacobian @ step[agent].double()) + c * step[agent].double()
        rhs = -(d[agent] + 2 * 0.01 * w[agent]).double()
        assert torch.allclose(lhs, rhs, atol=1e-4 * float(rhs.abs().max()))


def test_gauss_newton_refuses_a_deep_model(small_config, build_strategy) -> None:
    options = {"surrogate": "gauss-newton", "loss": "squared"}
    with pytest.raises(UsageError, match=r"^consensus\.surrogate: gauss-newton needs a single-hidden-layer"):
        build_strategy(small_config(strategy="consensus", workers=2, model="mlp:64-8-8-10", options=options))


# -- state --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy_name", ["consensus", "dgd"])
def test_resume_from_state_dict_is_bit_exact(strategy_name: str, small_config, build_strategy) -> None:
    options = {"topology": "edge-dropout:0.5", "iterations_per_round": 3, "epsilon": 0.1}
    config = small_config(strategy=strategy_name, workers=3, batch_size=8, options=options)
    straight = build_strategy(config)
    for _ in range(3):
        straight.run_round()
    first = build_strategy(config)
    first.run_round()
    state = first.state_dict()
    resumed = build_strategy(config)
    resumed.load_state_dict(state)
    for _ in range(2):
        resumed.run_round()
    a, b = straight.state_dict(), resumed.state_dict()
    assert torch.equal(a["w"], b["w"]) and a["alpha"] == b["alpha"] < (1.0 if strategy_name == "consensus" else 0.1)
    if strategy_name == "consensus":
        assert torch.equal(a["y"], b["y"])


def assert_runs_agree(config: RunConfig, tmp_path: Path, nproc: int = 2) -> pd.DataFrame:
    """``distributed_utils.assert_simulated_equals_distributed``, except that the extras column is compared
    number by number within the same tolerance: consensus error and friends are sums over agents whose
    weights differ between the layouts by float rounding, so their JSON text need not be identical."""
    sim_dir = train_via_cli(config, tmp_path, "sim", nproc=1)
    dist_dir = train_via_cli(config, tmp_path, "dist", nproc=nproc)
    sim, dist = pd.read_csv(sim_dir / "metrics.csv"), pd.read_csv(dist_dir / "metrics.csv")
    assert len(sim) == len(dist) >= 2 and (dist["world_size"] == nproc).all()
    for column in sim.columns:
        if column in NONDETERMINISTIC:
            continue
        if column == "extras":
            for a, b in zip(sim[column].map(json.loads), dist[column].map(json.loads), strict=True):
                assert a.keys() == b.keys()
                for key, value in a.items():
                    if isinstance(value, float):
                        assert b[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
                    else:
                        assert b[key] == value, key
        elif pd.api.types.is_numeric_dtype(sim[column]):
            diff = (sim[column].astype(float) - dist[column].astype(float)).abs().max()
            assert diff <= 1e-5 * max(1.0, float(sim[column].abs().max())), column
        else:
            assert list(sim[column]) == list(dist[column]), column
    assert_states_match(load_block_state(sim_dir, 1)[0], load_block_state(dist_dir, nproc), config.effective_workers)
    return dist


@pytest.mark.distributed
@pytest.mark.parametrize(("workers", "topology", "sparse"), [(3, "random-er:0.5", False), (8, "ring", True)])
def test_two_process_run_equals_simulation(tmp_path: Path, workers: int, topology: str, sparse: bool) -> None:
    # 3 agents over 2 ranks (blocks of 2 and 1) on a time-varying graph with independent initial weights,
    # mixed by dense products; and a ring of 8, which the CPU mixes by a sparse product of each rank's rows.
    graph = GraphSequence(parse_topology(topology), workers, 0, window=2).weights_at(0)
    assert (sparse_mixing(graph, graph) is not None) == sparse
    options = {"topology": topology, "window": 2, "iterations_per_round": 6, "init": "independent"}
    config = RunConfig(strategy="consensus", dataset="digits", model="mlp:64-16-10", workers=workers, epochs=0.2,
                       batch_size=8, lr=0.1, eval_every=0.1, device="cpu", options=options)
    rows = assert_runs_agree(config, tmp_path, nproc=2)
    extras = [json.loads(e) for e in rows["extras"]]
    assert extras[-1]["consensus_error"] > 0 and rows["bytes_sent_max_worker"].iloc[-1] > 0


@pytest.mark.parametrize("model", ["mlp:64-5-10", "mlp:64-5-10,bias=false"])
def test_gauss_newton_step_solves_in_fp32_under_bf16(small_config, build_strategy, model: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # CUDA's autocast, unlike the CPU's, does not cast linalg.solve's operands to fp32: without biases
    # a bf16 right-hand side met the fp32 matrix there and raised. The system must reach the solver
    # in fp32 with autocast off, as it would on CUDA.
    options = {"surrogate": "gauss-newton", "loss": "squared", "lam": 0.01, "tau": 3.0, "topology": "ring"}
    config = small_config(strategy="consensus", workers=2, batch_size=3, model=model, options=options)
    strategy = build_strategy(config)
    w = strategy.state.w
    d = torch.randn(w.shape, generator=torch.Generator().manual_seed(0))
    fp32 = strategy.gauss_newton_step(w, d)
    solve, seen = torch.linalg.solve, []

    def spy(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        seen.append((a.dtype, b.dtype, torch.is_autocast_enabled("cpu")))
        return solve(a, b)

    monkeypatch.setattr(torch.linalg, "solve", spy)
    with precision_context(torch.device("cpu"), "bf16"):
        bf16 = strategy.gauss_newton_step(w, d)
    assert seen == [(torch.float32, torch.float32, False)]
    assert bf16.dtype == torch.float32
    assert torch.allclose(bf16, fp32, rtol=0, atol=1e-2 * float((fp32 - w).abs().max()))
