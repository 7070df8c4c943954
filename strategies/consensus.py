"""Decentralised training over a graph of agents: NEXT (``consensus``) and its baseline DGD (``dgd``).

Scardapane & Di Lorenzo, "A framework for parallel and distributed training of neural networks",
Neural Networks 2017 (arXiv 1610.07448), after the NEXT method of Di Lorenzo & Scutari. Notes in
``shared/papers.md`` §4.

Problem. N agents (the logical workers) each hold a shard D_i of the M training samples and minimise

    U(w) = sum_i g_i(w) + r(w),   g_i(w) = (1/M) sum_{s in D_i} loss_s(w),   r = lam*||w||^2 or lam*||w||_1

so sum_i g_i is the mean training loss *(inferred: the paper does not say how g_i is normalised;
this choice makes the hyper-parameters independent of N)*. Each agent keeps its own copy w_i of all
parameters (one flat vector of P numbers) and, for NEXT, a gradient tracker y_i; both are stacked
``[n_local, P]`` and every step below is one vectorised tensor operation over the agents. A local
gradient is a minibatch estimate (m_i / M) * mean_batch grad loss (``batch=minibatch``, --batch-size
samples per agent) or the exact one over the shard (``batch=full``).

NEXT, iteration n, A[n] the Metropolis–Hastings weights of the iteration's graph (published form):

    d_i   = N * y_i                                    (estimate of grad sum_j g_j)
    pi_i  = d_i - grad g_i(w_i)                        (the other agents' gradients)
    w^_i  = argmin_w  g~_i(w; w_i) + pi_i^T (w - w_i) + r(w)
            linearised surrogate g~_i = grad g_i(w_i)^T (w - w_i) + tau/2 ||w - w_i||^2, closed forms:
              r = lam*||w||^2:  w^_i = (tau w_i - d_i) / (tau + 2 lam)
              r = lam*||w||_1:  w^_i = soft_threshold(w_i - d_i / tau, lam / tau)
    z_i   = w_i + alpha[n] (w^_i - w_i),     alpha[n+1] = alpha[n] (1 - epsilon alpha[n])
    w_i  <- sum_j a_ij z_j                                              (consensus on weights)
    y_i  <- sum_j a_ij y_j + grad g_i(w_i new) - grad g_i(w_i old)      (gradient tracking)

with y_i = grad g_i(w_i) at the start, so sum_i y_i = sum_i grad g_i(w_i) at every iteration.

Gauss–Newton surrogate (``surrogate=gauss-newton``; the authors' second surrogate, for a single-hidden-
layer MLP ``mlp:IN-H-K`` with ``loss=squared``, r = l2): the network is linearised instead of the loss,
g~_i = (s_i/2) sum_b ||f(x_b; w_i) + J_b (w - w_i) - t_b||^2 + tau/2 ||w - w_i||^2 with s_i = m_i / (M B),
on the same minibatch as grad g_i(w_i), so pi_i cancels that gradient exactly and

    (s_i J^T J + (tau + 2 lam) I) (w^_i - w_i) = -(d_i + 2 lam w_i)

is solved per agent in the B*K-dimensional sample space (Woodbury; one batched ``torch.linalg.solve``
with the Gram matrix J J^T computed in closed form for one hidden layer).

DGD (Nedić & Ozdaglar), the baseline: with f_i = N g_i + r each agent's share of N*U,

    w_i <- sum_j a_ij w_j - alpha[n] (N grad g_i(w_i) + 2 lam w_i)               (r = l2)
    w_i <- soft_threshold(sum_j a_ij w_j - alpha[n] N grad g_i(w_i), alpha[n] lam)  (r = l1, proximal DGD)

alpha[0] = --lr (N grad g_i is the agent's own mean-loss gradient on equal shards, so --lr means what
it means for SGD); alpha decays with the same rule as NEXT when epsilon > 0. A constant step stalls at
a bias of order alpha; NEXT's tracker removes it.

Bytes (ledger). At every iteration each agent sends its message to each of its current neighbours:
DGD sends w_i, NEXT sends z_i and y_i in one message, so per iteration agent i sends (and receives)

    DGD:  degree_i * P * 4 bytes        NEXT:  degree_i * 2 * P * 4 bytes,   degree_i messages

Interpretations (papers.md: *not published*): the normalisation of g_i; tau = 1/--lr by default (a full
step alpha = 1 is then an SGD step of --lr on the mean loss); minibatch gradients with the tracker
updated by differences of consecutive minibatch gradients (stochastic gradient tracking); the graph
families and the joint-connectivity repair of time-varying graphs (:mod:`strategies.graphs`); the
squared loss as half the squared error to one-hot targets; the evaluated model is the agents' average.

Metrics (extras at every evaluation): ``consensus_error`` = mean_i ||w_i - w_bar||^2, ``tracking_error``
= mean_i ||N y_i - sum_j grad g_j(w_j)||^2 (NEXT), the agents' own test accuracies ``agent_acc_min /
_mean / _max / _std``, ``spectral_gap``, ``alpha``, ``iteration``, ``zero_fraction`` (reg=l1: exact zeros
of the average model); the first row also carries ``graph_degree_min/max``. The run folder gets
``graph.json`` (through ``artifacts()``): the base graph's edges (the iteration-0 graph for random-er),
its Metropolis-Hastings weights and spectral gap. The graph of every iteration is
``strategies.graphs.GraphSequence(topology, N, graph_seed, window, base).at(n)``, a pure function of the
iteration, so resumed runs and every rank agree on it.

Notes. With reg=l1 the surrogate solutions w^_i have exact zeros; the iterates w_i get them when
alpha = 1 (z_i = w^_i), while alpha < 1 only shrinks a weight geometrically towards zero. NEXT draws
one extra minibatch at the start for y_i = grad g_i(w_i[0]) (not counted in the samples). In a
distributed run ``group.mix`` all-gathers the blocks of agents; the ledger counts the neighbour
messages above, per logical agent.

Run it::

    pnnctl train --strategy consensus --workers 8 --model mlp:784-64-10 --set consensus.topology=ring
    pnnctl train --strategy dgd --workers 8 --model mlp:784-64-10 --set dgd.topology=erdos-renyi:0.3
    pnnctl train --strategy consensus --workers 8 --nproc 2 --set consensus.topology=random-er:0.2
    pnnctl compare --config pnnctl/experiments/consensus.toml --out results/reference/consensus   # ring grid
    # other graphs: add --name erdos-renyi --set consensus.topology=erdos-renyi:0.3 --set dgd.topology=...
    # (the experiment file lists the four reference grids)
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.func import functional_call
from torch.nn import functional as F

from pnnctl.errors import UsageError
from pnnctl.models import StackedNet, activation_elements, build_model, parse_model_spec, rebuild
from pnnctl.training import ShardSampler
from pnnctl.workers import WorkerGroup
from strategies import register
from strategies.base import (
    Footprint,
    RoundResult,
    Strategy,
    StrategyContext,
    spell_cross_entropy,
    steps_this_round,
)
from strategies.graphs import GraphSequence, edge_list, metropolis_hastings, parse_topology

#: ``w -> (grad g_i(w_i) [n_local, P], mean loss of each agent [n_local])``
GradFn = Callable[[Tensor], tuple[Tensor, Tensor]]
#: ``w -> (grad g_i(w_i) as consecutive column blocks [n_local, P_k], mean loss of each agent [n_local])``
GradBlocksFn = Callable[[Tensor], tuple[list[Tensor], Tensor]]

BATCH_MODES = ("minibatch", "full")
LOSSES = ("cross-entropy", "squared")
REGULARISERS = ("l2", "l1")
SURROGATES = ("linear", "gauss-newton")
INITS = ("identical", "independent")


# -- options --------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class DGDOptions:
    topology: str = "ring"
    """graph: complete | ring | torus | star | erdos-renyi:P | random-er:P | edge-dropout:Q (strategies/graphs.py)"""
    graph_seed: int = 0
    """seed of random graphs; kept apart from the run seed so every seed trains on the same graph"""
    base_topology: str = "ring"
    """the static graph whose edges edge-dropout:Q switches on, each with probability Q per iteration"""
    window: int = 4
    """time-varying graphs: the union of every window of this many iterations is connected"""
    batch: str = "minibatch"
    """local gradients from a minibatch of --batch-size samples of the agent's shard, or its full shard"""
    loss: str = "cross-entropy"
    """cross-entropy (or ce, psl's name for it) | squared (half the squared error to one-hot targets)"""
    reg: str = "l2"
    """regulariser r(w) of the whole problem: l2 (lam*||w||^2) or l1 (lam*||w||_1)"""
    lam: float = 0.0
    """regularisation weight lambda (0: none)"""
    epsilon: float = 0.0
    """step decay alpha[n+1] = alpha[n] (1 - epsilon alpha[n]); 0 keeps the step constant; below 1/alpha[0]"""
    iterations_per_round: int = 0
    """iterations per round, the unit between checkpoints and budget checks (0: one epoch's worth of
    samples, or eval_every where shorter; a run's last round is cut to its budget)"""
    init: str = "identical"
    """identical: every agent starts from the same weights; independent: each from its own draw"""

    prefix: ClassVar[str] = "dgd"

    def __post_init__(self) -> None:
        spell_cross_entropy(self, "cross-entropy")

    def validate(self) -> None:
        p = self.prefix
        parse_topology(self.topology, f"{p}.topology")
        base = parse_topology(self.base_topology, f"{p}.base_topology")
        if base.time_varying:
            raise UsageError(f"{p}.base_topology", f"must be a static topology, not {self.base_topology!r}")
        for name, value, allowed in (
            ("batch", self.batch, BATCH_MODES),
            ("loss", self.loss, LOSSES),
            ("reg", self.reg, REGULARISERS),
            ("init", self.init, INITS),
        ):
            if value not in allowed:
                raise UsageError(f"{p}.{name}", f"must be one of {', '.join(allowed)}, not {value!r}")
        if self.window < 1:
            raise UsageError(f"{p}.window", f"must be an integer >= 1, not {self.window}")
        if self.graph_seed < 0:
            raise UsageError(f"{p}.graph_seed", f"must be an integer >= 0, not {self.graph_seed}")
        if self.lam < 0:
            raise UsageError(f"{p}.lam", f"must be a number >= 0, not {self.lam}")
        if self.epsilon < 0:
            raise UsageError(f"{p}.epsilon", f"must be a number >= 0, not {self.epsilon}")
        if self.iterations_per_round < 0:
            raise UsageError(f"{p}.iterations_per_round", f"must be >= 0, not {self.iterations_per_round}")


@dataclass(frozen=True, kw_only=True)
class NextOptions(DGDOptions):
    tau: float = 0.0
    """proximal weight tau of the surrogate (0: 1/--lr, so a full step alpha=1 is an SGD step of --lr)"""
    alpha0: float = 1.0
    """first step alpha[0] in (0, 1] of the convex combination z = w + alpha (w^ - w)"""
    surrogate: str = "linear"
    """linear (closed forms) | gauss-newton (single-hidden-layer MLP, loss=squared, reg=l2)"""

    prefix: ClassVar[str] = "consensus"

    def validate(self) -> None:
        super().validate()
        p = self.prefix
        if self.tau < 0:
            raise UsageError(f"{p}.tau", f"must be a number >= 0 (0: 1/lr), not {self.tau}")
        if not 0 < self.alpha0 <= 1:
            raise UsageError(f"{p}.alpha0", f"must be in (0, 1], not {self.alpha0}")
        check_step_decay(self.epsilon, self.alpha0, f"{p}.epsilon", "alpha0")
        if self.surrogate not in SURROGATES:
            raise UsageError(f"{p}.surrogate", f"must be one of {', '.join(SURROGATES)}, not {self.surrogate!r}")
        if self.surrogate == "gauss-newton" and (self.loss != "squared" or self.reg != "l2"):
            msg = f"gauss-newton needs loss=squared and reg=l2, not loss={self.loss}, reg={self.reg}"
            raise UsageError(f"{p}.surrogate", msg)


# -- the iteration, on plain stacked tensors --------------------------------------------------------


def soft_threshold(x: Tensor, threshold: float) -> Tensor:
    """prox of threshold*||.||_1: shrinks towards 0 and returns exact zeros inside [-threshold, threshold]."""
    return torch.sign(x) * torch.clamp(x.abs() - threshold, min=0.0)


def surrogate_argmin(w: Tensor, d: Tensor, tau: float, lam: float, reg: str) -> Tensor:
    """Closed-form minimiser of d^T (v - w) + tau/2 ||v - w||^2 + r(v), elementwise over agents and weights."""
    if reg == "l2":
        return (tau * w - d) / (tau + 2.0 * lam)
    if reg == "l1":
        return soft_threshold(w - d / tau, lam / tau)
    raise ValueError(f"unknown regulariser {reg!r}")


def check_step_decay(epsilon: float, alpha0: float, field_name: str, first_step: str) -> None:
    """``next_alpha`` from ``alpha0`` stays positive only while epsilon alpha0 < 1: at 1 the step was 0 from the
    second iteration on (a run that never learned, reported finished), above it negative (a divergence)."""
    if epsilon * alpha0 >= 1:
        raise UsageError(field_name, f"must be < 1/{first_step} = {1 / alpha0:g}: alpha[n+1] = alpha[n] (1 - epsilon "
                                     f"alpha[n]) would reach 0 or below; not {epsilon:g}")


def next_alpha(alpha: float, epsilon: float) -> float:
    """alpha[n+1] = alpha[n] (1 - epsilon alpha[n]): alpha ~ 1/(epsilon n), sum = inf, sum of squares < inf."""
    return alpha * (1.0 - epsilon * alpha)


@dataclass
class TrackingState:
    """NEXT's per-agent state, stacked ``[n_local, P]``, and the current step."""

    w: Tensor
    y: Tensor
    grad: Tensor  # grad g_i at the current w_i (the last evaluation), subtracted at the next update of y
    alpha: float


def next_iteration(
    state: TrackingState,
    grad_fn: GradFn,
    weights: Tensor,
    group: WorkerGroup,
    *,
    tau: float,
    lam: float,
    reg: str,
    epsilon: float,
    step_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> Tensor:
    """One NEXT iteration of every local agent, in place on ``state``; returns the agents' losses.

    ``step_fn(w, d) -> w^`` replaces the closed-form surrogate (the Gauss–Newton one).
    """
    alpha, n = state.alpha, group.n_workers
    if step_fn is None and reg == "l2":
        # z = w + alpha (w^ - w) with w^ = (tau w - N y) / (tau + 2 lam), in two passes over [n_local, P]
        # instead of seven: at small batches these element-wise passes cost as much as the gradient.
        c = tau + 2.0 * lam
        z = torch.mul(state.w, 1.0 - alpha * 2.0 * lam / c).add_(state.y, alpha=-alpha * n / c)
    else:
        d = n * state.y
        w_hat = surrogate_argmin(state.w, d, tau, lam, reg) if step_fn is None else step_fn(state.w, d)
        z = state.w + alpha * (w_hat - state.w)
    # The old w and then z are dead once read, so the mixes write into them instead of fresh memory.
    w_new = group.mix(z, weights, tag="next_weights", out=state.w)
    # y_i rides in the same message as z_i: bytes are added, messages are not.
    y_mixed = group.mix(state.y, weights, tag="next_tracker", new_messages=False, out=z)
    grad_new, losses = grad_fn(w_new)
    state.y = y_mixed.add_(grad_new).sub_(state.grad)  # mix returns a new tensor: update it in place
    state.w, state.grad = w_new, grad_new
    state.alpha = next_alpha(state.alpha, epsilon)
    return losses


def dgd_iteration(
    w: Tensor,
    alpha: float,
    grad_fn: GradFn | GradBlocksFn,
    weights: Tensor,
    group: WorkerGroup,
    *,
    lam: float,
    reg: str,
    out: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One DGD iteration of every local agent: ``(w_new, losses)``; the gradient is taken at the old w_i.

    ``grad_fn`` may give the gradient whole or in column blocks (``GraphStrategy.gradient_blocks``),
    which are added where they lie: joining them would be one more pass over ``[n_local, P]``.
    ``out``: a dead buffer shaped like ``w`` for ``w_new`` (not ``w`` itself).
    """
    grad, losses = grad_fn(w)
    mixed = group.mix(w, weights, tag="dgd_weights", out=out)  # ours, so it is updated in place
    blocks = [grad] if isinstance(grad, Tensor) else grad  # a whole gradient is one block of all P columns
    for columns, block in zip(mixed.split([b.shape[1] for b in blocks], dim=1), blocks, strict=True):
        columns.add_(block, alpha=-alpha * group.n_workers)
    if reg == "l2":
        return mixed.add_(w, alpha=-2.0 * alpha * lam), losses
    return soft_threshold(mixed, alpha * lam), losses


# -- the strategies ---------------------------------------------------------------------------------


class GraphStrategy(Strategy):
    """Agents on a graph, each with a full copy of the model as one flat vector; subclasses iterate."""

    def unused_settings(self) -> list[tuple[tuple[str, ...], str]]:
        why = f"{self.name}'s update is its own (--lr sets its step; regularise with {self.name}.reg and lam)"
        return [(("optimizer", "momentum", "weight_decay"), why)]

    def __init__(self, ctx: StrategyContext, options: Any) -> None:
        super().__init__(ctx, options)
        config, group = ctx.config, ctx.group
        spec = parse_model_spec(config.model)
        if spec.option("bn", "none") == "running":
            msg = "consensus mixes parameters only, so running batch-norm statistics would drift; use bn=none or batch"
            raise UsageError("model", msg)
        self.device = ctx.device
        n, local = group.n_workers, group.local_workers
        if options.init == "identical":
            model = build_model(spec, group.n_local, ctx.data.input_shape, ctx.data.n_classes, seed=config.seed)
        else:
            every = build_model(spec, n, ctx.data.input_shape, ctx.data.n_classes, seed=config.seed, identical=False)
            model = rebuild(every, group.n_local)
            model.load_state_dict({k: t[local.start : local.stop] for k, t in every.state_dict().items()})
        self.template = model.to(self.device)
        self.names = [name for name, _ in self.template.named_parameters()]
        self.shapes = [p.shape[1:] for _, p in self.template.named_parameters()]
        self.numels = [math.prod(shape) for shape in self.shapes]
        self.n_params = sum(self.numels)
        self.single = rebuild(self.template, 1).to(self.device)  # the averaged model handed to evaluation

        sizes = torch.tensor([len(s) for s in ctx.shards], dtype=torch.float64)
        # g_i is agent i's share of the mean loss: its mean gradient scaled by m_i / M.
        self.share = (sizes / sizes.sum())[local.start : local.stop].to(self.device, torch.float32)
        self.full_batch = options.batch == "full"
        self.sampler = ShardSampler(ctx.x_train, ctx.y_train, ctx.shards, local, config.batch_size, config.seed)
        self.samples_per_iteration = int(sizes.sum()) if self.full_batch else n * config.batch_size
        if self.full_batch:
            self.full_index, self.full_mask = self._pad_shards()
        self.iterations_per_round = options.iterations_per_round or ctx.default_round_steps(self.samples_per_iteration)

        topology = parse_topology(options.topology, f"{self.name}.topology")
        base = parse_topology(options.base_topology, f"{self.name}.base_topology")
        self.graphs = GraphSequence(topology, n, options.graph_seed, options.window, base)
        self.iteration = 0
        self._x_test: Tensor | None = None
        self.last_index: Tensor | None = None

    # -- parameters as one flat vector per agent ----------------------------------------------

    def flat_parameters(self) -> Tensor:
        return torch.cat([p.detach().reshape(p.shape[0], -1) for p in self.template.parameters()], dim=1)

    def unflatten(self, w: Tensor) -> dict[str, Tensor]:
        pieces = w.split(self.numels, dim=1)
        return {name: piece.reshape(w.shape[0], *shape) for name, piece, shape in zip(
            self.names, pieces, self.shapes, strict=True)}

    def forward(self, w: Tensor, x: Tensor) -> Tensor:
        """Outputs ``[n, B, K]`` of n stacked agents with flat weights ``w [n, P]`` on ``x [n, B, ...]``."""
        return self.forward_with(self.unflatten(w), x)

    def forward_with(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        """``forward`` with the parameters given by name (``unflatten``'s pieces, or leaves cut from them)."""
        return functional_call(self.template, params, (x,))

    def agent_losses(self, outputs: Tensor, y: Tensor, mask: Tensor | None = None) -> Tensor:
        """Mean loss of each agent over its batch, ``[n]`` (over the samples where ``mask`` is 1)."""
        n, b = y.shape
        if self.options.loss == "squared":
            target = F.one_hot(y, outputs.shape[-1]).to(outputs.dtype)
            per_sample = 0.5 * ((outputs - target) ** 2).sum(dim=-1)
        else:
            per_sample = F.cross_entropy(outputs.reshape(n * b, -1), y.reshape(-1), reduction="none").reshape(n, b)
        if mask is None:
            return per_sample.mean(dim=1)
        return (per_sample * mask).sum(dim=1) / mask.sum(dim=1)

    def next_batch(self) -> tuple[Tensor, Tensor, Tensor | None]:
        """The next gradient's samples ``x [n_local, B, ...]``, ``y [n_local, B]`` and a mask of real samples."""
        if self.full_batch:
            return self.ctx.x_train[self.full_index], self.ctx.y_train[self.full_index], self.full_mask
        index = self.sampler.next_indices()
        self.last_index = index
        return self.ctx.x_train[index], self.ctx.y_train[index], None

    def _pad_shards(self) -> tuple[Tensor, Tensor | None]:
        """Every local shard padded to the longest of all N shards (same shapes on every rank), and its mask."""
        length = max(len(s) for s in self.ctx.shards)
        local = self.sampler.shards
        index = torch.stack([torch.cat([s, s[:1].expand(length - len(s))]) for s in local])
        if all(len(s) == length for s in self.ctx.shards):
            return index, None
        mask = torch.stack([torch.arange(length, device=index.device) < len(s) for s in local]).float()
        return index, mask

    def gradient(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """grad g_i(w_i) ``[n_local, P]`` on a fresh batch, and each agent's mean batch loss."""
        blocks, losses = self.gradient_blocks(w)
        return torch.cat(blocks, dim=1), losses

    def gradient_blocks(self, w: Tensor) -> tuple[list[Tensor], Tensor]:
        """``gradient``'s ``[n_local, P]`` as one ``[n_local, P_k]`` block per parameter, in order, not joined.

        The parameters are leaves cut from ``w``, so autograd hands back each one's gradient; differentiating
        by ``w`` itself would join them (the backward of the cut), a pass over all P that DGD does not need.
        """
        x, y, mask = self.next_batch()
        params = {name: piece.detach().requires_grad_(True) for name, piece in self.unflatten(w).items()}
        with torch.enable_grad():
            losses = self.agent_losses(self.forward_with(params, x), y, mask)
            grads = torch.autograd.grad((losses * self.share).sum(), list(params.values()), materialize_grads=True)
        return [g.reshape(g.shape[0], -1) for g in grads], losses.detach()

    def weights(self) -> Tensor:
        # On the CPU (a static graph's one tensor every time): mix plans from a host copy and moves
        # only its own rows to the device.
        return self.graphs.weights_at(self.iteration)

    # -- the round ---------------------------------------------------------------------------------

    def iterate(self) -> Tensor:
        """One iteration of every local agent; returns their losses ``[n_local]``."""
        raise NotImplementedError

    def agent_weights(self) -> Tensor:
        raise NotImplementedError

    def run_round(self, samples_left: float = math.inf) -> RoundResult:
        iterations = steps_this_round(self.iterations_per_round, self.samples_per_iteration, samples_left)
        losses = []
        time_varying = self.graphs.time_varying
        for _ in range(iterations):
            losses.append(self.iterate())
            self.iteration += 1
            if time_varying:  # each iteration's graph has its own busiest agent
                self.ctx.group.ledger.end_exchange()
        mean_losses = torch.stack(losses).mean(dim=0)
        group = self.ctx.group
        if group.comm.world_size > 1:
            mean_losses = group.all_gather(mean_losses.reshape(-1, 1))
        return RoundResult(loss=float(mean_losses.mean()), samples=iterations * self.samples_per_iteration)

    # -- evaluation --------------------------------------------------------------------------------

    def all_agents(self) -> Tensor:
        """Every agent's flat weights ``[N, P]`` (gathered without ledger traffic: metrics only)."""
        w = self.agent_weights()
        return w if self.ctx.group.comm.world_size == 1 else self.ctx.group.all_gather(w)

    def eval_model(self) -> StackedNet:
        mean = self.all_agents().mean(dim=0, keepdim=True)
        with torch.no_grad():
            for param, value in zip(self.single.parameters(), self.unflatten(mean).values(), strict=True):
                param.copy_(value)
        return self.single

    @torch.no_grad()
    def agent_accuracies(self) -> Tensor:
        """Test accuracy of each of the N agents' own models, all local agents in one batched pass."""
        if self._x_test is None:
            self._x_test = self.ctx.data.x_test.to(self.device)
            self._y_test = self.ctx.data.y_test.to(self.device)
        w = self.agent_weights()
        n = w.shape[0]
        self.template.eval()
        correct = torch.zeros(n, device=self.device)
        chunk = max(1, 4_000_000 // (n * self.ctx.data.input_dim))
        for start in range(0, len(self._y_test), chunk):
            x = self._x_test[start : start + chunk]
            y = self._y_test[start : start + chunk]
            outputs = self.forward(w, x.unsqueeze(0).expand(n, *x.shape))
            correct += (outputs.argmax(dim=-1) == y.unsqueeze(0)).sum(dim=1)
        self.template.train()
        accuracy = (correct / len(self._y_test)).reshape(-1, 1)
        group = self.ctx.group
        return (accuracy if group.comm.world_size == 1 else group.all_gather(accuracy)).flatten()

    def eval_extras(self) -> dict[str, Any]:
        everyone = self.all_agents()
        mean = everyone.mean(dim=0, keepdim=True)
        accuracy = self.agent_accuracies().double()
        extras: dict[str, Any] = {
            "consensus_error": float(((everyone - mean) ** 2).sum(dim=1).mean()),
            "agent_acc_min": float(accuracy.min()),
            "agent_acc_mean": float(accuracy.mean()),
            "agent_acc_max": float(accuracy.max()),
            "agent_acc_std": float(accuracy.std(unbiased=False)),
            "spectral_gap": self.spectral_gap,
            "iteration": float(self.iteration),
            "alpha": float(self.alpha),
        }
        if self.options.reg == "l1":
            extras["zero_fraction"] = float((mean == 0).double().mean())
        if self.iteration == 0:
            degree = self._first_graph().sum(dim=1)
            extras["graph_degree_min"] = float(degree.min())
            extras["graph_degree_max"] = float(degree.max())
        return extras

    def _first_graph(self) -> Tensor:
        return self.graphs.base if self.graphs.topology.family != "random-er" else self.graphs.at(0)

    def artifacts(self) -> dict[str, str]:
        """``graph.json``: the (base) graph's edges and Metropolis-Hastings weights, and its spectral gap."""
        graph = self._first_graph()
        weights = metropolis_hastings(graph)
        record = {
            "topology": self.graphs.topology.text,
            "agents": self.graphs.n,
            "graph_seed": self.options.graph_seed,
            "time_varying": self.graphs.time_varying,
            "note": "time-varying families: the base graph (random-er: the first iteration's graph)",
            "edges": [list(e) for e in edge_list(graph)],
            "weights": [[round(float(w), 12) for w in row] for row in weights],
            "spectral_gap": self.spectral_gap,
        }
        return {"graph.json": json.dumps(record, indent=1) + "\n"}

    @property
    def spectral_gap(self) -> float:
        cached = getattr(self, "_spectral_gap", None)
        if cached is None:
            cached = self._spectral_gap = self.graphs.spectral_gap()
        return cached

    # -- footprint and state -------------------------------------------------------------------------

    #: flat vectors of P numbers one agent keeps besides activations
    state_vectors: ClassVar[int] = 2

    def footprint(self) -> Footprint:
        batch = max(len(s) for s in self.ctx.shards) if self.full_batch else self.ctx.config.batch_size
        activations = activation_elements(self.template, batch)
        return Footprint(self.n_params, 4 * (self.state_vectors * self.n_params + activations + self.extra_memory()))

    def extra_memory(self) -> int:
        return 0

    def base_state(self) -> dict[str, Any]:
        return {
            "iteration": self.iteration,
            "sampler": self.sampler.state_dict(),
            "graph": {"topology": self.graphs.topology.text, "base_adjacency": self.graphs.base.clone()},
            "last_index": self.last_index,
        }

    def load_base_state(self, state: dict[str, Any]) -> None:
        self.iteration = int(state["iteration"])
        self.sampler.load_state_dict(state["sampler"])
        if not torch.equal(state["graph"]["base_adjacency"], self.graphs.base):
            raise UsageError("resume", "the checkpoint was trained on another graph; resume with the same topology")
        index = state["last_index"]
        self.last_index = None if index is None else index.to(self.device)


@register
class DGD(GraphStrategy):
    name = "dgd"
    summary = "decentralised gradient descent: average neighbours' weights over a graph, then a local gradient step"
    Options = DGDOptions

    def __init__(self, ctx: StrategyContext, options: DGDOptions) -> None:
        super().__init__(ctx, options)
        self.w = self.flat_parameters()
        self.spare: Tensor | None = None
        self.alpha = ctx.config.lr
        check_step_decay(options.epsilon, self.alpha, "dgd.epsilon", "--lr")

    def agent_weights(self) -> Tensor:
        return self.w

    def iterate(self) -> Tensor:
        options = self.options
        # w_new goes into the buffer of the w before last, which nothing reads any more.
        w_new, losses = dgd_iteration(
            self.w, self.alpha, self.gradient_blocks, self.weights(), self.ctx.group, lam=options.lam, reg=options.reg,
            out=self.spare,
        )
        self.spare, self.w = self.w, w_new
        self.alpha = next_alpha(self.alpha, options.epsilon)
        return losses

    def state_dict(self) -> dict[str, Any]:
        return {**self.base_state(), "w": self.w.clone(), "alpha": self.alpha}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.load_base_state(state)
        self.w = state["w"].to(self.device)
        self.alpha = float(state["alpha"])


@register
class Consensus(GraphStrategy):
    name = "consensus"
    summary = "NEXT: agents on a sparse or time-varying graph mix weights and gradient trackers with neighbours"
    Options = NextOptions
    published: ClassVar[str] = (
        "NEXT (Scardapane & Di Lorenzo 2017): numbers not published in a form we could read (papers.md §4); "
        "the paper's figure shows 10 agents, with DGD and centralized training as baselines"
    )
    state_vectors = 4  # weights, gradient, tracker, previous gradient

    def __init__(self, ctx: StrategyContext, options: NextOptions) -> None:
        super().__init__(ctx, options)
        self.tau = options.tau or 1.0 / ctx.config.lr
        self.step_fn = None
        if options.surrogate == "gauss-newton":
            self.step_fn = self.gauss_newton_step
            check_single_hidden_layer(self.template, f"{self.name}.surrogate")
            if self.full_batch and self.full_mask is not None:
                msg = "gauss-newton with batch=full needs equal shards (iid, training set divisible by --workers)"
                raise UsageError(f"{self.name}.batch", msg)
        w = self.flat_parameters()
        grad, _ = self.gradient(w)
        self.state = TrackingState(w=w, y=grad.clone(), grad=grad, alpha=options.alpha0)

    @property
    def alpha(self) -> float:
        return self.state.alpha

    def agent_weights(self) -> Tensor:
        return self.state.w

    def iterate(self) -> Tensor:
        options = self.options
        return next_iteration(
            self.state,
            self.gradient,
            self.weights(),
            self.ctx.group,
            tau=self.tau,
            lam=options.lam,
            reg=options.reg,
            epsilon=options.epsilon,
            step_fn=self.step_fn,
        )

    def gauss_newton_step(self, w: Tensor, d: Tensor) -> Tensor:
        """w^ of the Gauss–Newton surrogate on the batch of the last gradient (see the module docstring)."""
        if self.full_batch:
            x = self.ctx.x_train[self.full_index]
            batch = x.shape[1]
        else:
            x = self.ctx.x_train[self.last_index]
            batch = self.last_index.shape[1]
        lam = self.options.lam
        c = self.tau + 2.0 * lam
        v = d + 2.0 * lam * w
        scale = self.share / batch  # s_i = m_i / (M B)
        flat_x = x.reshape(*x.shape[:2], -1)
        # The Gram system stays in fp32 under --precision bf16: a bf16 Gram matrix is a poor system to
        # solve, and CUDA's autocast (unlike the CPU's) leaves linalg.solve alone, so a bf16 right-hand
        # side (models without biases) met an fp32 matrix there and raised.
        with torch.autocast(self.ctx.device.type, enabled=False):
            gram, jv = single_hidden_layer_products(self.template, self.unflatten(w), self.unflatten(v), flat_x)
            n, rows = gram.shape[0], gram.shape[1]
            jv = jv.reshape(n, rows)
            system = gram + torch.diag_embed((c / scale).unsqueeze(1).expand(n, rows))
            u = torch.linalg.solve(system, jv.unsqueeze(-1)).reshape(n, batch, -1)
        w_req = w.detach().requires_grad_(True)
        with torch.enable_grad():
            (jtu,) = torch.autograd.grad(self.forward(w_req, x), w_req, grad_outputs=u)
        return w - (v - jtu) / c

    def extra_memory(self) -> int:
        if self.options.surrogate != "gauss-newton":
            return 0
        rows = self.ctx.config.batch_size * self.ctx.data.n_classes
        return rows * rows

    def eval_extras(self) -> dict[str, Any]:
        extras = super().eval_extras()
        group = self.ctx.group
        y, grad = self.state.y, self.state.grad
        if group.comm.world_size > 1:
            y, grad = group.all_gather(y), group.all_gather(grad)
        total = grad.sum(dim=0, keepdim=True)
        extras["tracking_error"] = float(((group.n_workers * y - total) ** 2).sum(dim=1).mean())
        return extras

    def state_dict(self) -> dict[str, Any]:
        s = self.state
        return {**self.base_state(), "w": s.w.clone(), "y": s.y.clone(), "grad": s.grad.clone(), "alpha": s.alpha}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.load_base_state(state)
        self.state = TrackingState(
            w=state["w"].to(self.device),
            y=state["y"].to(self.device),
            grad=state["grad"].to(self.device),
            alpha=float(state["alpha"]),
        )


# -- Gauss–Newton: the Gram matrix J J^T of a single-hidden-layer MLP ---------------------------------


def check_single_hidden_layer(model: StackedNet, field: str) -> None:
    spec = model.spec
    if (
        spec.family != "mlp"
        or len(spec.widths) != 3
        or spec.option("bn", "none") != "none"
        or spec.option("out_bn", "false") != "false"
    ):
        msg = f"gauss-newton needs a single-hidden-layer mlp without batch norm (mlp:784-64-10), not {spec.text!r}"
        raise UsageError(field, msg)


def single_hidden_layer_products(
    model: StackedNet, params: dict[str, Tensor], tangent: dict[str, Tensor], x: Tensor
) -> tuple[Tensor, Tensor]:
    """J J^T ``[n, B*K, B*K]`` and J v ``[n, B, K]`` of f(x) = W2^T act(W1^T x + b1) + b2 per agent.

    J = d f / d params, rows (sample, output); v = ``tangent`` in the shapes of ``params``. With
    a = act(z), s = act'(z), G[b,h,k] = s[b,h] W2[h,k] and beta = 1 with biases (0 without):
        J J^T[(b,k),(c,l)] = delta_kl (a_b . a_c + beta) + (x_b . x_c + beta) sum_h G[b,h,k] G[c,h,l]
        J v = a dW2 + db2 + (s * (x dW1 + db1)) W2
    """
    _flatten, first, act, second = model
    w1_name, w2_name = _name(model, first, "weight"), _name(model, second, "weight")
    b1_name, b2_name = _name(model, first, "bias"), _name(model, second, "bias")
    w1, w2 = params[w1_name], params[w2_name]
    has_bias = first.bias is not None
    z = torch.bmm(x, w1) if not has_bias else torch.baddbmm(params[b1_name], x, w1)
    z = z.detach().requires_grad_(True)
    with torch.enable_grad():
        a = act(z)
        (slope,) = torch.autograd.grad(a.sum(), z)  # an elementwise activation: d a / d z
    a = a.detach()
    beta = 1.0 if has_bias else 0.0
    n, batch, k = x.shape[0], x.shape[1], w2.shape[-1]
    g = slope.unsqueeze(-1) * w2.unsqueeze(1)  # [n, B, H, K]
    hidden = torch.einsum("nbhk,nchl->nbkcl", g, g)
    xx = torch.bmm(x, x.transpose(1, 2)) + beta
    aa = torch.bmm(a, a.transpose(1, 2)) + beta
    eye = torch.eye(k, dtype=x.dtype, device=x.device)
    gram = hidden * xx[:, :, None, :, None] + aa[:, :, None, :, None] * eye[None, None, :, None, :]
    dz = torch.bmm(x, tangent[w1_name])
    jv = torch.bmm(a, tangent[w2_name])
    if has_bias:
        dz = dz + tangent[b1_name]
        jv = jv + tangent[b2_name]
    jv = jv + torch.bmm(slope * dz, w2)
    return gram.reshape(n, batch * k, batch * k), jv


def _name(model: StackedNet, layer: torch.nn.Module, attribute: str) -> str:
    for name, module in model.named_children():
        if module is layer:
            return f"{name}.{attribute}"
    raise KeyError(attribute)
