"""``psl``: a partially-separable loss on a network with separable layers, trained by a master and workers.

Raynaud, Orban, Bigeon (GERAD G-2023-36); notes in ``shared/papers.md`` §1.

Loss (published). On raw scores ``s(x)`` in R^C, labels y, a batch of B samples and exponent a in {1, 2}::

    L = (1/B) sum_b sum_{j != y_b} exp(a (s_j(x_b) - s_{y_b}(x_b)))
      = sum_{i != j} f_ij,      f_ij = (1/B) sum_{b: y_b = i} exp(a (s_j(x_b) - s_i(x_b)))

Element f_ij sees only samples of class i and depends only on what feeds scores i and j.
``psl.loss=ce`` trains the same machinery with softmax cross-entropy, which is *not* partially
separable: its "elements" are the classes' shares (1/B) sum_{b: y_b = i} CE(s(x_b), i), and each
depends on every weight.

Separable layer (published). A block-diagonal dense layer: the input (C blocks of ``in_k``) maps
block k to block k of the output with its own weights, ``y_k = x_k W_k + b_k``; weights are
``[N, C, in_k, out_k]`` and the layer is one batched matrix product over N*C blocks. Stacked
separable layers keep C independent class towers on a shared convolutional trunk; the last one
emits one score per tower. Families registered here (all stacked, parameters ``[N, ...]``)::

    psnet[,arch=auto|mnist|cifar10|small,act=sigmoid|relu|tanh|gelu,pool=avg|max]
        mnist   Conv(5,1->40) Conv(5,40->30) SL(480,10x24) SL(240,10x15) SL(150,10x1)   46,740 params
        cifar10 Conv(5,3->60) Conv(5,60->30) SL(750,10x35) SL(350,10x15) SL(150,10x1)   81,750 params
        small   Conv(3,1->16) Conv(3,16->20)+pool SL(80,10x8) SL(80,10x4) SL(40,10x1)  4,190 params (8x8 digits)
    psl-lenet[,arch=auto|mnist|cifar10,act=...,pool=...]
        the authors' LeNets: Conv(5,->6) Conv(5,6->16) Dense(256|400, 120|200) Dense(84|100) Dense(C)
        (44,426 parameters on MNIST)

Every conv is valid, followed by 2x2 pooling then the activation (the published order; sigmoid and
average pooling by default). Separable blocks are initialised like PyTorch's dense layers on the
block's own fan-in *(interpretation: the authors' initialisation is not in the notes)*.

Which coordinates an element needs is derived from the layers, not hard-coded: walking back from
score c, a dense layer or conv needs its whole input once any output is needed, a separable layer
only the input blocks of the needed output blocks, a flatten only the channels whose pixels are
needed. For the MNIST PSNet, score c needs conv1 (1,040), the 3 conv2 channels feeding tower c
(3,003) and tower c (1,567): element (i, j) needs 1,040 + 2 x 4,570 = 10,180 of the 46,740.

Workers and master *(inferred: the paper computes the 90 element gradients one after another on one
machine; distribution is not published)*. Elements are grouped onto W workers:

- ``placement=pairs`` (default): the C(C-1)/2 unordered pairs {i, j}, each bringing f_ij and f_ji,
  balanced over W <= C(C-1)/2 workers (each gets floor or ceil of the count), greedily so that a
  worker's pairs share classes (its coordinates stay few);
- ``placement=class``: classes in contiguous balanced blocks over W <= C workers; worker w owns
  every f_ij with i in its block (so it needs every tower: its coordinates are the whole net).

The greedy pair grouping is not optimal (for C = 10, W = 5 its busiest worker spans 7 classes,
where a covering design could manage 6). Each run folder gets ``placement.json``: every worker's
elements, the classes whose samples it reads, |U_w| and its bytes per step.

Worker w holds exactly U_w, the union of its elements' coordinates, and only the samples of the
classes i of its elements. One step, with a global batch of B = ``batch_size`` samples drawn by a
seeded sampler that every node runs (the IST "shared seed" idea), so no indices move::

    master -> w : x[U_w]                       scatter, 4 |U_w| bytes
    w           : g_w = grad sum_{e in w} f_e  on the batch samples of its classes
    w -> master : g_w[U_w]                     gather,  4 |U_w| bytes
    master      : g = sum_w g_w (= grad L, exactly), x <- optimizer(x, g)

The simulation computes masked but accounts bytes and memory exactly. Every worker (for plbfgs: every element) is
a masked copy of the full net, all in one stacked forward and backward shaped ``[units, P, ...]``
with P the most samples any unit has in the batch (padded with zero-weight samples); coordinates
outside U_w are zeroed before the forward and in the gradient, so a worker that read one of them
would break the gradient test. The ledger and the footprint count only U_w: exactly 4 |U_w| bytes
each way per step, and the worker's parameters are |U_w|. The optimizer state lives at the master,
so a worker's memory is 4 (|U_w| + its gradient buffers (|U_w|, or sum_e |U_e| for plbfgs) +
activations of its sub-network for its expected share of the batch) bytes. Compute time is not
exact: every unit runs the full network's forward and backward, so ``compute_s`` and the projected
time overstate a worker that runs only its sub-network (most for separable nets with many workers).
Under ``--nproc`` the masked vectors cross processes at full length, so the wire bytes exceed the
ledger's.

Master optimizers (``psl.optimizer``):

- ``config``: the run's ``--optimizer`` (sgd / adam / adamw with ``--lr``); Adam lr 1e-3 is published.
- ``plbfgs`` (published idea, constants ours): partitioned L-BFGS. One limited-memory secant history
  per element on that element's coordinates; element functions with the same coordinates are
  merged (f_ij + f_ji: the C(C-1)/2 pairs for ``placement=pairs``) *(interpretation)*. With
  ``s_e = U_e s`` and ``y_e = U_e (grad F_e(x + s) - grad F_e(x))`` on the same batch, element e keeps
  its last m pairs that satisfy s_e.y_e > 1e-8 |s_e| |y_e| and applies its BFGS matrix in unrolled form::

      B_e v = sigma_e v - sum_k (a_k.v) a_k + sum_k (b_k.v) b_k,
      a_k = B_{k-1} s_k / sqrt(s_k.B_{k-1} s_k),  b_k = y_k / sqrt(y_k.s_k),  sigma_e = y.y / s.y (newest)

  The global approximation is B = sum_e U_e^T B_e U_e (all elements in one batched gather/scatter).
  The step minimises g.s + s.B s / 2 within |s| <= Delta by truncated conjugate gradient
  (Steihaug-Toint: stop on negative curvature or at the boundary, or when |r| <= min(0.5,
  sqrt|g|) |g|). rho = (F(x) - F(x + s)) / (-(g.s + s.B s/2)) on the same batch; accept if
  rho > ``tr_accept`` (1e-4); Delta *= ``tr_shrink`` (0.25) if rho < ``tr_eta1`` (0.25);
  Delta = min(``tr_grow`` (2) Delta, ``tr_max_radius``) if rho > ``tr_eta2`` (0.75) and the step
  reached the boundary; memory m = 5. papers.md refers to constants "as in §1.6", which the notes
  do not contain: these are the textbook choices (Nocedal & Wright, Alg. 4.1) *(interpretation)*.
  The master needs each element's gradient, so a worker sends one vector per element it owns
  (4 sum_{e in w} |U_e| bytes) and the element values (4 bytes each); each step evaluates the batch
  twice (at x and at the trial point), so the trial point is scattered every step and x again only
  after a rejected step.
- ``lbfgs``: the same trust region with a single element covering every coordinate (plain L-BFGS),
  the baseline; workers send only their summed gradients.

Ledger per step (4-byte floats; E_w: elements of w; the master is node W)::

    config:  worker w sends 4|U_w|, receives 4|U_w|
    plbfgs:  sends 2 (4 sum_{e in E_w} |U_e| + 4 |E_w|), receives 4|U_w| (+ 4|U_w| after a rejection)
    lbfgs:   sends 2 (4|U_w| + 4), receives 4|U_w| (+ 4|U_w| after a rejection)

Run it::

    pnnctl train --strategy psl --model psnet --optimizer adam --lr 1e-3 --batch-size 20 --workers 45
    pnnctl train --strategy psl --model psnet --optimizer adam --lr 1e-3 --set psl.loss=ce --workers 10
    pnnctl train --strategy psl --model psl-lenet --optimizer adam --lr 1e-3 --workers 1
    pnnctl train --strategy psl --dataset digits --model psnet --set psl.optimizer=plbfgs --workers 45
    pnnctl train --strategy psl --model psnet --workers 10 --nproc 2     # two gloo processes
    pnnctl compare --config pnnctl/experiments/psl.toml --out results/reference/psl

``train_loss`` in the metrics is the training objective (PSL or CE); ``test_loss`` is cross-entropy
of the raw scores on the test set, as for every strategy. ``--sharding`` does not apply: data goes
to workers by class. Models must give per-sample losses (no batch norm: batch statistics would tie a
worker's samples to the rest of the batch). The exponential loss is steep: plain SGD diverges at
the default lr 0.05 (and at 0.01 with mlp:784-128-128-10 on mnist-small; the trainer stops the run as
``diverged``); Adam (published, lr 1e-3) or ``psl.optimizer=lbfgs`` (no lr) train it. On a dense net
every element needs nearly every coordinate, so plbfgs keeps C(C-1)/2 almost full histories: about
45 times the memory and work of lbfgs (mlp:784-128-128-10, 2 epochs: ~300 s against ~3 s); it is
meant for separable nets such as psnet.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from pnnctl.errors import UsageError
from pnnctl.models import (
    ACTIVATIONS,
    ModelFamily,
    ModelSpec,
    StackedBatchNorm,
    StackedConv2d,
    StackedFlatten,
    StackedLinear,
    StackedNet,
    StackedPool2d,
    build_model,
    parse_model_spec,
    rebuild,
    register_model_family,
)
from pnnctl.optimizers import Optimizer
from pnnctl.runtime import device_memory_bytes
from pnnctl.training import ShardSampler, make_optimizer
from strategies import register
from strategies.base import (
    Footprint,
    RoundResult,
    Strategy,
    StrategyContext,
    spell_cross_entropy,
    steps_this_round,
)

BYTES_PER_COORD = 4


# ------------------------------------------------------------------------------------------------
# The separable layer and the published networks


class SeparableLinear(nn.Module):
    """C block-diagonal dense blocks per worker: block k maps ``x[..., k*in_k:(k+1)*in_k]`` to
    ``y[..., k*out_k:(k+1)*out_k]``. Weights ``[N, C, in_k, out_k]``, bias ``[N, C, out_k]``."""

    def __init__(self, n_workers: int, blocks: int, in_per_block: int, out_per_block: int) -> None:
        super().__init__()
        self.blocks, self.in_per_block, self.out_per_block = blocks, in_per_block, out_per_block
        self.weight = nn.Parameter(torch.empty(n_workers, blocks, in_per_block, out_per_block))
        self.bias = nn.Parameter(torch.empty(n_workers, blocks, out_per_block))

    def reset_parameters(self, generator: torch.Generator) -> None:
        bound = 1 / math.sqrt(self.in_per_block)
        with torch.no_grad():
            self.weight.copy_((torch.rand(self.weight.shape, generator=generator) * 2 - 1) * bound)
            self.bias.copy_((torch.rand(self.bias.shape, generator=generator) * 2 - 1) * bound)

    def forward(self, x: Tensor) -> Tensor:
        n, b, _ = x.shape
        c, k_in, k_out = self.blocks, self.in_per_block, self.out_per_block
        # One bmm over N*C independent blocks, with the batch inside each block.
        blocks = x.reshape(n, b, c, k_in).transpose(1, 2).reshape(n * c, b, k_in)
        y = torch.baddbmm(
            self.bias.reshape(n * c, 1, k_out), blocks, self.weight.reshape(n * c, k_in, k_out)
        )
        return y.reshape(n, c, b, k_out).transpose(1, 2).reshape(n, b, c * k_out)

    def dense_weight(self) -> Tensor:
        """The equivalent block-diagonal ``[N, C*in_k, C*out_k]`` dense weight (for tests and checks)."""
        n, c, k_in, k_out = self.weight.shape
        dense = self.weight.new_zeros(n, c, k_in, c, k_out)
        index = torch.arange(c)
        dense[:, index, :, index, :] = self.weight.transpose(0, 1)
        return dense.reshape(n, c * k_in, c * k_out)


@dataclass(frozen=True)
class PSNetArch:
    """Convs as (channels, kernel, pool) and the hidden widths of each class tower (its last is 1)."""

    convs: tuple[tuple[int, int, int], ...]
    tower: tuple[int, ...]


PSNET_ARCHS: dict[str, PSNetArch] = {
    "mnist": PSNetArch(((40, 5, 2), (30, 5, 2)), (24, 15)),
    "cifar10": PSNetArch(((60, 5, 2), (30, 5, 2)), (35, 15)),
    # Ours, for 8x8 digits: 3x3 kernels, pooling only after the second conv.
    "small": PSNetArch(((16, 3, 1), (20, 3, 2)), (8, 4)),
}
LENET_ARCHS: dict[str, tuple[int, int]] = {"mnist": (120, 84), "cifar10": (200, 100)}


def _conv_trunk(
    n: int, input_shape: tuple[int, ...], convs: tuple[tuple[int, int, int], ...], act: str, pool: str, family: str
) -> tuple[list[nn.Module], int]:
    """Valid convs, each followed by pooling then the activation (the published order)."""
    channels, height, width = input_shape
    layers: list[nn.Module] = []
    for out_channels, kernel, pool_size in convs:
        height, width = height - kernel + 1, width - kernel + 1
        if pool_size > 1:
            height, width = height // pool_size, width // pool_size
        if height < 1 or width < 1:
            raise UsageError("model", f"{family} does not fit {input_shape} images; use arch=small or an mlp")
        layers.append(StackedConv2d(n, channels, out_channels, kernel))
        if pool_size > 1:
            layers.append(StackedPool2d(pool, pool_size))
        layers.append(ACTIVATIONS[act]())
        channels = out_channels
    layers.append(StackedFlatten())
    return layers, channels * height * width


def _choose_arch(spec: ModelSpec, input_shape: tuple[int, ...], choices: dict[str, Any]) -> str:
    arch = spec.option("arch", "auto")
    if arch != "auto":
        return arch
    if len(input_shape) == 3 and input_shape[0] == 3 and "cifar10" in choices:
        return "cifar10"
    if len(input_shape) == 3 and min(input_shape[1:]) < 16 and "small" in choices:
        return "small"
    return "mnist"


def _psnet_build(spec: ModelSpec, n: int, input_shape: tuple[int, ...], n_classes: int) -> StackedNet:
    if len(input_shape) != 3:
        raise UsageError("model", f"psnet needs images [C, H, W], the data is {input_shape}; use an mlp")
    if spec.widths:
        raise UsageError("model", "psnet takes no widths; use options arch=, act= and pool=")
    arch = PSNET_ARCHS[_choose_arch(spec, input_shape, PSNET_ARCHS)]
    act = spec.option("act", "sigmoid")
    layers, flat = _conv_trunk(n, input_shape, arch.convs, act, spec.option("pool", "avg"), "psnet")
    if flat % n_classes:
        raise UsageError("model", f"psnet's {flat} trunk features cannot be cut into {n_classes} class blocks")
    widths = [flat // n_classes, *arch.tower, 1]
    for index, (k_in, k_out) in enumerate(itertools.pairwise(widths)):
        layers.append(SeparableLinear(n, n_classes, k_in, k_out))
        if index < len(widths) - 2:
            layers.append(ACTIVATIONS[act]())
    return StackedNet(spec, n, *layers, input_shape=input_shape, n_classes=n_classes)


def _psl_lenet_build(spec: ModelSpec, n: int, input_shape: tuple[int, ...], n_classes: int) -> StackedNet:
    if len(input_shape) != 3 or min(input_shape[1:]) < 16:
        raise UsageError("model", f"psl-lenet needs images of at least 16x16, the data is {input_shape}; use psnet")
    if spec.widths:
        raise UsageError("model", "psl-lenet takes no widths; use options arch=, act= and pool=")
    hidden = LENET_ARCHS[_choose_arch(spec, input_shape, LENET_ARCHS)]
    act = spec.option("act", "sigmoid")
    layers, flat = _conv_trunk(n, input_shape, ((6, 5, 2), (16, 5, 2)), act, spec.option("pool", "avg"), "psl-lenet")
    for w_in, w_out in itertools.pairwise((flat, *hidden)):
        layers += [StackedLinear(n, w_in, w_out), ACTIVATIONS[act]()]
    layers.append(StackedLinear(n, hidden[-1], n_classes))
    return StackedNet(spec, n, *layers, input_shape=input_shape, n_classes=n_classes)


register_model_family(
    "psnet",
    ModelFamily(
        "PSL's separable net: conv trunk + one tower per class (arch=auto|mnist|cifar10|small, act=, pool=)",
        {"arch": ("auto", *PSNET_ARCHS), "act": tuple(ACTIVATIONS), "pool": ("avg", "max")},
        _psnet_build,
    ),
)
register_model_family(
    "psl-lenet",
    ModelFamily(
        "PSL paper's LeNet: conv-pool-act x2, dense 120-84 (mnist) or 200-100 (cifar10); sigmoid, avg pool",
        {"arch": ("auto", *LENET_ARCHS), "act": tuple(ACTIVATIONS), "pool": ("avg", "max")},
        _psl_lenet_build,
    ),
)


# ------------------------------------------------------------------------------------------------
# Which coordinates each class score depends on


@dataclass
class Dependencies:
    """``params [C, D]``: coordinates of the flat parameter vector that score c depends on.
    ``activations``: per layer output, ``(features [C, F], elements per feature)``."""

    params: Tensor
    activations: list[tuple[Tensor, int]]

    def activation_elements(self, classes: Tensor) -> int:
        """Activation elements per sample of the sub-network feeding the scores in ``classes`` (bool [C])."""
        return sum(int(feat[classes].any(0).sum()) * per for feat, per in self.activations)


def class_dependencies(model: StackedNet) -> Dependencies:
    """Walk back from each score through the layers (see the module docstring); exact, structural."""
    probe = rebuild(model, 1)
    shapes: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    hooks = [
        layer.register_forward_hook(lambda _m, i, o: shapes.append((tuple(i[0].shape[2:]), tuple(o.shape[2:]))))
        for layer in probe
    ]
    with torch.no_grad():
        probe.reset_parameters(torch.Generator().manual_seed(0))
        probe.eval()
        scores = probe(torch.zeros(1, 1, *model.input_shape))
    for hook in hooks:
        hook.remove()
    n_classes = scores.shape[-1]
    need = torch.eye(n_classes, dtype=torch.bool)  # [C, features of the current output]
    masks: dict[int, Tensor] = {}
    activations: list[tuple[Tensor, int]] = []
    for layer, (in_shape, out_shape) in zip(reversed(list(probe)), reversed(shapes), strict=True):
        activations.append((need, math.prod(out_shape[1:])))
        any_out = need.any(1, keepdim=True)
        if isinstance(layer, SeparableLinear):
            blocks = need.reshape(n_classes, layer.blocks, layer.out_per_block)
            masks[id(layer.weight)] = blocks[:, :, None, :].expand(-1, -1, layer.in_per_block, -1)
            masks[id(layer.bias)] = blocks
            need = blocks.any(2, keepdim=True).expand(-1, -1, layer.in_per_block).reshape(n_classes, -1)
        elif isinstance(layer, StackedLinear):
            masks[id(layer.weight)] = need[:, None, :].expand(-1, layer.in_features, -1)
            if layer.bias is not None:
                masks[id(layer.bias)] = need[:, None, :]
            need = any_out.expand(-1, layer.in_features)
        elif isinstance(layer, StackedConv2d):
            k = layer.kernel_size
            masks[id(layer.weight)] = need[:, :, None, None, None].expand(-1, -1, layer.in_channels, k, k)
            masks[id(layer.bias)] = need
            need = any_out.expand(-1, layer.in_channels)
        elif isinstance(layer, StackedFlatten):
            channels = in_shape[0] if in_shape else 1
            need = need.reshape(n_classes, channels, -1).any(2)
        elif isinstance(layer, StackedBatchNorm):
            # Batch statistics tie every sample of a batch to every other: the loss is then no sum
            # of per-sample terms, and a worker that sees only its classes' samples would normalise
            # differently from the full batch.
            raise UsageError("model", "psl needs per-sample losses; use a model without batch norm (bn=none)")
        elif any(True for _ in layer.parameters()) or in_shape[:1] != out_shape[:1]:
            raise UsageError("model", f"psl cannot trace class dependencies through {type(layer).__name__}")
    flat = [masks[id(p)].reshape(n_classes, -1) for p in probe.parameters()]
    activations.reverse()
    return Dependencies(torch.cat(flat, dim=1), activations)


# ------------------------------------------------------------------------------------------------
# The loss and its elements


def psl_loss(scores: Tensor, y: Tensor, exponent: float) -> Tensor:
    """L = (1/B) sum_b sum_{j != y_b} exp(a (s_j - s_{y_b})) for ``scores [B, C]``."""
    diff = exponent * (scores - scores.gather(1, y[:, None]))
    terms = torch.exp(diff).masked_fill(F.one_hot(y, scores.shape[1]).bool(), 0.0)
    return terms.sum() / len(y)


def element_losses(scores: Tensor, y: Tensor, exponent: float) -> Tensor:
    """``[C, C]``: f_ij = (1/B) sum_{b: y_b = i} exp(a (s_j - s_i)); the diagonal is zero."""
    n_classes = scores.shape[1]
    terms = torch.exp(exponent * (scores - scores.gather(1, y[:, None])))
    per_class = torch.zeros(n_classes, n_classes, dtype=scores.dtype, device=scores.device)
    per_class.index_add_(0, y, terms)
    return per_class.masked_fill(torch.eye(n_classes, dtype=torch.bool, device=scores.device), 0.0) / len(y)


def unit_losses(
    scores: Tensor, y: Tensor, weight: Tensor, elements: Tensor, batch: int, loss: str, exponent: float
) -> Tensor:
    """Each unit's share of the loss: ``scores [U, P, C]``, ``y, weight [U, P]`` (weight 0 pads),
    ``elements [U, C, C]`` (1 where the unit owns f_ij). Returns ``[U]``."""
    if loss == "ce":
        u, p, c = scores.shape
        per_sample = F.cross_entropy(scores.reshape(u * p, c), y.reshape(-1), reduction="none").reshape(u, p)
        return (per_sample * weight).sum(1) / batch
    owned = elements.gather(1, y[:, :, None].expand(-1, -1, elements.shape[2]))  # [U, P, C]: row y_b
    diff = exponent * (scores - scores.gather(2, y[:, :, None]))
    # Zero the exponent of terms the unit does not own before exp: exp of a large unused score
    # would give inf * 0 = nan in the backward pass.
    terms = torch.exp(torch.where(owned > 0, diff, torch.zeros_like(diff))) * owned
    return (terms.sum(2) * weight).sum(1) / batch


# ------------------------------------------------------------------------------------------------
# Placing elements on workers


def pair_groups(n_classes: int, n_workers: int) -> list[list[tuple[int, int]]]:
    """The unordered pairs balanced over workers (floor or ceil each), greedily keeping each
    worker's pairs within few classes: take the pair that adds the fewest new classes."""
    remaining = [(i, j) for i in range(n_classes) for j in range(i + 1, n_classes)]
    base, extra = divmod(len(remaining), n_workers)
    groups = []
    for worker in range(n_workers):
        classes: set[int] = set()
        group: list[tuple[int, int]] = []
        for _ in range(base + (worker < extra)):
            pick = min(remaining, key=lambda p: (len(set(p) - classes), p))
            remaining.remove(pick)
            group.append(pick)
            classes.update(pick)
        groups.append(group)
    return groups


def class_groups(n_classes: int, n_workers: int) -> list[list[int]]:
    """Contiguous balanced blocks of classes (first workers one larger)."""
    base, extra = divmod(n_classes, n_workers)
    out, start = [], 0
    for worker in range(n_workers):
        size = base + (worker < extra)
        out.append(list(range(start, start + size)))
        start += size
    return out


@dataclass
class Unit:
    """What produces one gradient vector: a worker's elements (or one merged element for plbfgs)."""

    worker: int
    elements: Tensor  # [C, C] 1 where f_ij is owned (unused for ce)
    sample_classes: Tensor  # [C] bool: labels of the samples it reads
    score_classes: Tensor  # [C] bool: scores it needs


def make_units(n_classes: int, n_workers: int, placement: str, loss: str, per_element: bool) -> list[Unit]:
    """Units in worker order: one per worker, or with ``per_element`` one per merged element."""
    if loss == "ce":
        # Not separable: every share needs all scores; one unit per worker holding a block of classes.
        units = []
        for worker, classes in enumerate(class_groups(n_classes, n_workers)):
            chosen = torch.zeros(n_classes, dtype=torch.bool)
            chosen[classes] = True
            every_score = torch.ones(n_classes, dtype=torch.bool)
            units.append(Unit(worker, torch.zeros(n_classes, n_classes), chosen, every_score))
        return units
    if placement == "pairs":
        groups = pair_groups(n_classes, n_workers)
        owned = [[(i, j) for a, b in group for i, j in ((a, b), (b, a))] for group in groups]
    else:
        blocks = class_groups(n_classes, n_workers)
        owned = [[(i, j) for i in block for j in range(n_classes) if j != i] for block in blocks]
    units = []
    for worker, elements in enumerate(owned):
        # Elements that need the same scores {i, j} are merged: f_ij + f_ji share their coordinates.
        parts = {}
        for i, j in elements:
            parts.setdefault((min(i, j), max(i, j)) if per_element else 0, []).append((i, j))
        for key in sorted(parts):
            matrix = torch.zeros(n_classes, n_classes)
            for i, j in parts[key]:
                matrix[i, j] = 1.0
            owned_mask = matrix.bool()
            units.append(Unit(worker, matrix, owned_mask.any(1), owned_mask.any(1) | owned_mask.any(0)))
    return units


# ------------------------------------------------------------------------------------------------
# Partitioned L-BFGS in a trust region


def _check_history_fits(memory: int, element_index: list[Tensor], device: torch.device) -> None:
    """A usage error where the secant histories of ``memory`` pairs cannot fit on ``device``: psl.memory =
    1000000 asked torch for 174 GB and failed with a traceback."""
    elements, n_max = len(element_index), max(len(ix) for ix in element_index)
    needed = PartitionedLBFGS.STORED_PER_PAIR * elements * memory * n_max * 4  # fp32
    available = device_memory_bytes(device)
    if available is not None and needed > available:
        raise UsageError("psl.memory", f"{memory} pairs of {elements} element(s) of up to {n_max} coordinates take "
                                       f"{needed / 1e9:.3g} GB, more than the {available / 1e9:.3g} GB "
                                       f"{'this machine' if device.type == 'cpu' else device} has (L-BFGS "
                                       "usually keeps 3 to 20 pairs)")


class PartitionedLBFGS:
    """B = sum_e U_e^T B_e U_e with one L-BFGS matrix per element; Steihaug-Toint trust-region steps.

    ``element_index``: for each element, the indices of its coordinates in the flat vector of size
    ``dim``. A single element covering everything is plain L-BFGS. All elements are handled in one
    padded ``[E, n_max]`` gather/scatter: no Python loop over elements.

    Each B_e is held in the compact form of Byrd, Nocedal and Schnabel (1994):
    B = sigma I - [sigma S, Y] M^-1 [sigma S, Y]^T with M = [[sigma S^T S, L], [L^T, -D]] (L the
    strictly lower part of S^T Y, D its diagonal). A new pair costs one pass over the stored pairs
    (the inner products of its row of S^T S and S^T Y) and a 2m x 2m factorisation per element; the
    unrolled form it replaces recomputed m vectors through m partial products every step, O(m^2 n):
    psl.memory = 50 took 17x as long as 5 where the products B v alone grow 10x.
    """

    #: ``[E, memory, n_max]`` tensors it holds at once: in update, S and Y before and after, and one shifted copy
    STORED_PER_PAIR: ClassVar[int] = 5

    def __init__(
        self,
        element_index: list[Tensor],
        dim: int,
        *,
        memory: int = 5,
        radius: float = 1.0,
        max_radius: float = 100.0,
        accept: float = 1e-4,
        eta1: float = 0.25,
        eta2: float = 0.75,
        shrink: float = 0.25,
        grow: float = 2.0,
        cg_max_iter: int = 50,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        self.dim, self.memory = dim, memory
        self.max_radius, self.accept_ratio = max_radius, accept
        self.eta1, self.eta2, self.shrink, self.grow, self.cg_max_iter = eta1, eta2, shrink, grow, cg_max_iter
        n_max = max(len(ix) for ix in element_index)
        self.index = torch.full((len(element_index), n_max), dim, dtype=torch.long, device=device)
        for e, ix in enumerate(element_index):
            self.index[e, : len(ix)] = ix.to(device)
        self.valid = (self.index < dim).to(dtype)
        shape = (len(element_index), memory, n_max)
        self.S = torch.zeros(shape, dtype=dtype, device=device)
        self.Y = torch.zeros(shape, dtype=dtype, device=device)
        self.count = torch.zeros(len(element_index), dtype=torch.long, device=device)
        self.radius = float(radius)
        self._products_from_pairs()

    # -- the element matrices --------------------------------------------------------------------

    def _local(self, v: Tensor) -> Tensor:
        """``[E, n_max]`` restrictions U_e v (zero in the padding)."""
        return torch.cat([v, v.new_zeros(1)])[self.index] * self.valid

    def _products_from_pairs(self) -> None:
        """S^T S and S^T Y ``[E, m, m]`` of the stored pairs (slots oldest first), then the middle matrix."""
        self.SS = torch.einsum("ein,ejn->eij", self.S, self.S)
        self.SY = torch.einsum("ein,ejn->eij", self.S, self.Y)
        singular = self._factor()
        if bool(singular.any()):  # those elements restart from sigma I, as L-BFGS does after a breakdown
            for history in (self.S, self.Y, self.SS, self.SY):
                history[singular] = 0.0
            self.count = torch.where(singular, 0, self.count)
            self._factor()

    def _factor(self) -> Tensor:
        """sigma_e and the LU factors of each element's middle matrix M from S^T S and S^T Y.

        Empty slots (zero pairs, ``count`` < m) get identity rows in M, so that they add nothing. Returns
        which elements' M is singular: exact arithmetic keeps M invertible (every kept pair has s.y > 0),
        rounding on a pair parallel to a kept one need not."""
        m = self.memory
        filled = torch.arange(m, device=self.S.device)[None, :] >= (m - self.count)[:, None]  # [E, m]
        sy = torch.diagonal(self.SY, dim1=1, dim2=2)
        newest_yy = (self.Y[:, -1] * self.Y[:, -1]).sum(1)
        self.sigma = torch.where(self.count > 0, newest_yy / sy[:, -1].clamp_min(1e-30), torch.ones_like(sy[:, -1]))
        empty = torch.diag_embed((~filled).to(sy.dtype))
        top_left = self.sigma[:, None, None] * self.SS + empty
        lower = torch.tril(self.SY, diagonal=-1)
        bottom_right = -torch.diag_embed(torch.where(filled, sy, 0.0)) + empty
        middle = torch.cat([torch.cat([top_left, lower], 2), torch.cat([lower.transpose(1, 2), bottom_right], 2)], 1)
        self.middle_lu, self.middle_pivots, singular = torch.linalg.lu_factor_ex(middle)
        return singular != 0

    def _apply(self, v: Tensor) -> Tensor:
        """B_e v_e for ``v [E, n_max]``."""
        sigma = self.sigma[:, None]
        projected = torch.cat([sigma * torch.einsum("ekn,en->ek", self.S, v), torch.einsum("ekn,en->ek", self.Y, v)], 1)
        weights = torch.linalg.lu_solve(self.middle_lu, self.middle_pivots, projected[:, :, None])[:, :, 0]
        m = self.memory
        correction = sigma * torch.einsum("ekn,ek->en", self.S, weights[:, :m]) + torch.einsum(
            "ekn,ek->en", self.Y, weights[:, m:]
        )
        return (sigma * v - correction) * self.valid

    def hessian_vector(self, v: Tensor) -> Tensor:
        """B v = sum_e U_e^T B_e U_e v."""
        local = self._apply(self._local(v))
        out = v.new_zeros(self.dim + 1)
        out.index_add_(0, self.index.reshape(-1), local.reshape(-1))
        return out[: self.dim]

    # -- the trust-region step -------------------------------------------------------------------

    def solve(self, g: Tensor) -> tuple[Tensor, float, int, bool]:
        """Steihaug-Toint CG on g.s + s.B s/2, |s| <= radius: (step, predicted decrease, iterations, boundary)."""
        z = torch.zeros_like(g)
        r = g.clone()
        d = -r
        rr = float(r @ r)
        g_norm = math.sqrt(rr)
        if g_norm == 0.0:
            return z, 0.0, 0, False
        tolerance = min(0.5, math.sqrt(g_norm)) * g_norm
        boundary, iterations = False, 0
        for iterations in range(1, self.cg_max_iter + 1):  # noqa: B007 (the count is returned)
            bd = self.hessian_vector(d)
            curvature = float(d @ bd)
            if curvature <= 0:
                z, boundary = z + self._to_boundary(z, d) * d, True
                break
            alpha = rr / curvature
            z_next = z + alpha * d
            if float(z_next.norm()) >= self.radius:
                z, boundary = z + self._to_boundary(z, d) * d, True
                break
            z = z_next
            r = r + alpha * bd
            rr_next = float(r @ r)
            if math.sqrt(rr_next) <= tolerance:
                break
            d = -r + (rr_next / rr) * d
            rr = rr_next
        predicted = -(float(g @ z) + 0.5 * float(z @ self.hessian_vector(z)))
        return z, predicted, iterations, boundary

    def _to_boundary(self, z: Tensor, d: Tensor) -> float:
        """tau >= 0 with |z + tau d| = radius."""
        a, b, c = float(d @ d), 2 * float(z @ d), float(z @ z) - self.radius**2
        return (-b + math.sqrt(max(b * b - 4 * a * c, 0.0))) / (2 * a)

    def update(self, step: Tensor, grad_change: Tensor) -> int:
        """Add the pair (U_e s, U_e y_e) to each element whose curvature s.y > 1e-8 |s||y| holds.

        ``grad_change`` is ``[E, dim]`` (each element's own gradient change) or ``[dim]`` with one
        element. Returns how many elements were updated."""
        s = self._local(step)
        before = self.S, self.Y, self.SS, self.SY, self.count
        if grad_change.dim() == 1:
            grad_change = grad_change[None]
        padded = torch.cat([grad_change, grad_change.new_zeros(grad_change.shape[0], 1)], dim=1)
        y = padded.gather(1, self.index) * self.valid
        sy = (s * y).sum(1)
        ok = sy > 1e-8 * s.norm(dim=1) * y.norm(dim=1)
        self.S = torch.where(ok[:, None, None], torch.cat([self.S[:, 1:], s[:, None]], dim=1), self.S)
        self.Y = torch.where(ok[:, None, None], torch.cat([self.Y[:, 1:], y[:, None]], dim=1), self.Y)
        self.count = torch.clamp(self.count + ok.long(), max=self.memory)
        # The products of the kept pairs move up a slot with them; only the new pair's row and column are new.
        new_ss = torch.einsum("ekn,en->ek", self.S, s)  # s_k . s_new, the last slot s_new . s_new
        new_sy = torch.einsum("ekn,en->ek", self.Y, s)  # s_new . y_k
        new_ys = torch.einsum("ekn,en->ek", self.S, y)  # s_k . y_new
        next_ss, next_sy = self.SS.roll((-1, -1), dims=(1, 2)), self.SY.roll((-1, -1), dims=(1, 2))
        next_ss[:, -1, :], next_ss[:, :, -1] = new_ss, new_ss
        next_sy[:, -1, :], next_sy[:, :, -1] = new_sy, new_ys
        keep = ok[:, None, None]
        self.SS, self.SY = torch.where(keep, next_ss, self.SS), torch.where(keep, next_sy, self.SY)
        singular = self._factor()
        if bool(singular.any()):  # the pair is not kept where it would make M singular
            ok = ok & ~singular
            keep = ok[:, None, None]
            self.S, self.Y, self.SS, self.SY = (
                torch.where(keep, new, old) for new, old in zip((self.S, self.Y, self.SS, self.SY), before, strict=True)
            )
            self.count = torch.where(ok, self.count, before[4])
            self._factor()
        return int(ok.sum())

    def judge(self, ratio: float, boundary: bool) -> bool:
        """Update the radius from rho = actual / predicted decrease; True if the step is accepted."""
        if not ratio >= self.eta1:  # also when rho is nan
            self.radius *= self.shrink
        elif ratio > self.eta2 and boundary:
            self.radius = min(self.grow * self.radius, self.max_radius)
        return ratio > self.accept_ratio

    def minimize(self, objective: Any, x: Tensor, iterations: int) -> tuple[Tensor, list[float]]:
        """Deterministic use: ``objective(x) -> (f, element gradients [E, dim] or [dim])``.
        Returns the final point and f at every iterate (for tests and small problems)."""
        f, grads = objective(x)
        history = [float(f)]
        for _ in range(iterations):
            g = grads.sum(0) if grads.dim() == 2 else grads
            step, predicted, _, boundary = self.solve(g)
            if predicted <= 0:
                break
            f_trial, grads_trial = objective(x + step)
            self.update(step, grads_trial - grads)
            if self.judge((float(f) - float(f_trial)) / predicted, boundary):
                x, f, grads = x + step, f_trial, grads_trial
            history.append(float(f))
        return x, history

    def state_dict(self) -> dict[str, Any]:
        return {"S": self.S.clone(), "Y": self.Y.clone(), "SS": self.SS.clone(), "SY": self.SY.clone(),
                "count": self.count.clone(), "radius": self.radius}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.S, self.Y = state["S"].to(self.S), state["Y"].to(self.Y)
        self.count = state["count"].to(self.count)
        self.radius = float(state["radius"])
        if "SS" in state:
            # Kept rather than recomputed: products summed in another order would end a resumed run a
            # rounding away from the uninterrupted one.
            self.SS, self.SY = state["SS"].to(self.S), state["SY"].to(self.S)
            self._factor()  # it was not singular when saved
        else:  # a checkpoint of the unrolled form, before the products were kept
            self._products_from_pairs()


# ------------------------------------------------------------------------------------------------
# The strategy


@dataclass(frozen=True, kw_only=True)
class PSLOptions:
    loss: str = "psl"
    """psl (the partially-separable loss) | ce or cross-entropy (softmax cross-entropy, not separable: workers
    <= classes)"""
    exponent: int = 2
    """a in exp(a (s_j - s_y)): 1 (authors' 2022 code) or 2 (their 2023 experiments)"""
    placement: str = "pairs"
    """pairs: unordered class pairs balanced over W <= C(C-1)/2 workers | class: worker per class block (W <= C)"""
    optimizer: str = "config"
    """master optimizer: config (--optimizer sgd|adam|adamw, --lr) | plbfgs (partitioned L-BFGS) | lbfgs"""
    steps_per_round: int = 0
    """master steps per round, the unit between checkpoints and budget checks (0: one epoch of global
    batches, or eval_every where shorter; a run's last round is cut to its budget)"""
    memory: int = 5
    """plbfgs/lbfgs: secant pairs kept per element"""
    tr_radius: float = 1.0
    """plbfgs/lbfgs: initial trust-region radius"""
    tr_max_radius: float = 100.0
    """plbfgs/lbfgs: largest trust-region radius"""
    tr_accept: float = 1e-4
    """plbfgs/lbfgs: accept the step if rho = actual/predicted decrease exceeds this"""
    tr_eta1: float = 0.25
    """plbfgs/lbfgs: shrink the radius if rho < eta1"""
    tr_eta2: float = 0.75
    """plbfgs/lbfgs: grow the radius if rho > eta2 and the step reached the boundary"""
    tr_shrink: float = 0.25
    """plbfgs/lbfgs: radius factor on a poor step"""
    tr_grow: float = 2.0
    """plbfgs/lbfgs: radius factor on a very good step at the boundary"""
    cg_max_iter: int = 50
    """plbfgs/lbfgs: most conjugate-gradient iterations per step"""

    def __post_init__(self) -> None:
        spell_cross_entropy(self, "ce")

    def validate(self) -> None:
        def check(ok: bool, name: str, allowed: str) -> None:
            if not ok:
                raise UsageError(f"psl.{name}", f"must be {allowed}, not {getattr(self, name)!r}")

        check(self.loss in ("psl", "ce"), "loss", "psl, or ce (cross-entropy)")
        check(self.exponent in (1, 2), "exponent", "1 or 2")
        check(self.placement in ("pairs", "class"), "placement", "pairs or class")
        check(self.optimizer in ("config", "plbfgs", "lbfgs"), "optimizer", "config, plbfgs or lbfgs")
        if self.optimizer == "plbfgs" and self.loss == "ce":
            raise UsageError("psl.optimizer", "plbfgs needs the partially-separable loss; use psl.loss=psl or lbfgs")
        check(self.steps_per_round >= 0, "steps_per_round", "an integer >= 0")
        check(self.memory >= 1, "memory", "an integer >= 1")
        check(self.tr_radius > 0, "tr_radius", "a number > 0")
        check(self.tr_max_radius >= self.tr_radius, "tr_max_radius", "a number >= tr_radius")
        check(0 <= self.tr_accept < self.tr_eta1, "tr_accept", "a number in [0, tr_eta1)")
        check(self.tr_eta1 < self.tr_eta2 < 1, "tr_eta2", "a number in (tr_eta1, 1)")
        check(0 < self.tr_shrink < 1, "tr_shrink", "a number in (0, 1)")
        check(self.tr_grow > 1, "tr_grow", "a number > 1")
        check(self.cg_max_iter >= 1, "cg_max_iter", "an integer >= 1")


@register
class PSL(Strategy):
    name = "psl"
    summary = "partially-separable loss on separable class towers; workers send element gradients to a master"
    Options = PSLOptions
    published: ClassVar[str] = (
        "Raynaud et al. (G-2023-36), Adam lr 1e-3, 50 epochs, mean of 10 seeds, test accuracy %: "
        "MNIST batch 20: LeNet+CE 98.27, LeNet+PSL 97.65, PSNet+CE 98.57, PSNet+PSL 98.58; "
        "MNIST batch 100: 98.04, 97.79, 98.32, 97.73; CIFAR10 batch 20: 50.15, 46.32, 59.02, 55.30; "
        "CIFAR10 batch 100: 55.57, 52.01, 57.13, 54.32. PSL starts slower (MNIST b100 epoch 1: "
        "PSNet+PSL 45.0% vs PSNet+CE 81.1%). Distribution is not published (ours is inferred)."
    )

    def unused_settings(self) -> list[tuple[tuple[str, ...], str]]:
        unused = [(("sharding",), "its workers own output classes and see every sample (psl.placement)")]
        if self.options.optimizer != "config":
            why = f"the master optimizer is psl.optimizer={self.options.optimizer}"
            unused.append((("optimizer", "momentum", "weight_decay"), why))
        return unused

    def __init__(self, ctx: StrategyContext, options: PSLOptions) -> None:
        super().__init__(ctx, options)
        config, group, device = ctx.config, ctx.group, ctx.device
        n_classes, n_workers = ctx.data.n_classes, group.n_workers
        self._check_workers(n_classes, n_workers)
        spec = parse_model_spec(config.model)
        self.master_model = build_model(spec, 1, ctx.data.input_shape, n_classes, seed=config.seed).to(device)
        self.x = nn.Parameter(torch.cat([p.detach().reshape(-1) for p in self.master_model.parameters()]).clone())
        self.dim = self.x.numel()
        deps = class_dependencies(self.master_model)

        # Units: the gradient vectors workers compute (one per worker, or one per element for plbfgs).
        per_element = options.optimizer == "plbfgs"
        self.units = make_units(n_classes, n_workers, options.placement, options.loss, per_element)
        score_classes = torch.stack([u.score_classes for u in self.units])  # [E, C]
        unit_coords = (score_classes.float() @ deps.params.float()) > 0  # [E, D]
        self.unit_worker = torch.tensor([u.worker for u in self.units])
        worker_coords = torch.zeros(n_workers, self.dim, dtype=torch.bool)
        for w in range(n_workers):
            worker_coords[w] = unit_coords[self.unit_worker == w].any(0)
        self.worker_coords = worker_coords.sum(1).numpy().astype(np.float64)  # |U_w|
        self.unit_coords = unit_coords.sum(1).numpy().astype(np.float64)  # |U_e|
        units_per_worker = np.bincount(self.unit_worker.numpy(), minlength=n_workers)
        self.grad_bytes = BYTES_PER_COORD * np.bincount(
            self.unit_worker.numpy(), weights=self.unit_coords, minlength=n_workers
        )
        self.value_bytes = BYTES_PER_COORD * units_per_worker.astype(np.float64)
        self.param_bytes = BYTES_PER_COORD * self.worker_coords
        self.slots = int(units_per_worker.max())  # units per worker, padded, in the gathered payload
        # Position of each unit among its worker's units (units are in worker order).
        first = np.concatenate([[0], np.cumsum(units_per_worker)[:-1]])
        self.unit_slot = torch.arange(len(self.units)) - torch.from_numpy(first)[self.unit_worker]

        # This rank's units, stacked: one masked copy of the net per unit.
        local = [(k, u) for k, u in enumerate(self.units) if u.worker in group.local_workers]
        self.local_units = torch.tensor([k for k, _ in local])
        self.local_slot = self.unit_slot[self.local_units]
        self.local_worker = torch.tensor([u.worker - group.local_workers.start for _, u in local])
        self.stack = rebuild(self.master_model, len(local)).to(device)
        self.stack.train()
        self.unit_mask = unit_coords[self.local_units].to(device, torch.float32)  # [U_local, D]
        # Views of the mask cut like the stacked parameters, to mask them and their gradients in place.
        self.param_sizes = [p[0].numel() for p in self.stack.parameters()]
        self.param_masks = [m.view(p.shape) for m, p in zip(self.unit_mask.split(self.param_sizes, dim=1),
                                                                self.stack.parameters(), strict=True)]  # fmt: skip
        self.unit_elements = torch.stack([u.elements for _, u in local]).to(device)
        self.sample_classes = torch.stack([u.sample_classes for u in self.units]).to(device)  # all units
        self.local_sample_classes = self.sample_classes[self.local_units.to(device)]

        # Footprint: the largest worker's coordinates, gradient buffers and sub-network activations.
        label_share = torch.bincount(ctx.y_train.cpu(), minlength=n_classes).double() / len(ctx.y_train)
        memory = []
        for w in range(n_workers):
            mine = [u for u in self.units if u.worker == w]
            reads = torch.stack([u.sample_classes for u in mine]).any(0)
            needs = torch.stack([u.score_classes for u in mine]).any(0)
            samples = math.ceil(config.batch_size * float(label_share[reads].sum()) - 1e-9)
            grads = float(self.grad_bytes[w]) / BYTES_PER_COORD
            activations = samples * deps.activation_elements(needs)
            memory.append(BYTES_PER_COORD * int(self.worker_coords[w] + grads + activations))
        self._footprint = Footprint(int(self.worker_coords.max()), max(memory))

        # The master: replicated on every rank, computed from gathered inputs only.
        all_index = torch.arange(len(ctx.y_train), device=device)
        self.sampler = ShardSampler(ctx.x_train, ctx.y_train, [all_index], [0], config.batch_size, config.seed)
        self.qn: PartitionedLBFGS | None = None
        self.optimizer: Optimizer | None = None
        if options.optimizer == "config":
            self.optimizer = make_optimizer(config.optimizer, [self.x], config.lr, config.momentum, config.weight_decay)
        else:
            index = (
                [torch.nonzero(row).reshape(-1) for row in unit_coords]
                if per_element
                else [torch.arange(self.dim)]
            )
            _check_history_fits(options.memory, index, device)
            self.qn = PartitionedLBFGS(
                index,
                self.dim,
                memory=options.memory,
                radius=options.tr_radius,
                max_radius=options.tr_max_radius,
                accept=options.tr_accept,
                eta1=options.tr_eta1,
                eta2=options.tr_eta2,
                shrink=options.tr_shrink,
                grow=options.tr_grow,
                cg_max_iter=options.cg_max_iter,
                device=device,
            )
        self.workers_hold_x = False  # after an accepted trial point the workers already hold x
        self.steps_per_round = options.steps_per_round or ctx.default_round_steps(config.batch_size)

    def _check_workers(self, n_classes: int, n_workers: int) -> None:
        options = self.options
        if options.loss == "ce" or options.placement == "class":
            why = "cross-entropy has one element per class" if options.loss == "ce" else "placement=class"
            most = n_classes
        else:
            why, most = "placement=pairs (one or more class pairs each)", n_classes * (n_classes - 1) // 2
        if n_workers > most:
            raise UsageError(
                "workers", f"psl with {why} takes at most {most} worker{'s' if most != 1 else ''}, not {n_workers}"
            )

    # -- the workers ------------------------------------------------------------------------------

    def _send(self, point: Tensor, tag: str) -> None:
        """Master -> every worker: its coordinates of ``point``, loaded as the units' masked copies."""
        group = self.ctx.group
        block = group.scatter(point.detach().expand(group.n_workers, -1), tag=tag, sizes=self.param_bytes)
        # Every worker gets its coordinates of the same point, so one received row serves all units.
        self._load_point(block[0])

    def _load_point(self, point: Tensor) -> None:
        """Each local unit's copy of the net: ``point`` masked to the unit's coordinates, written
        straight into the stacked parameters (one pass, no ``[U, D]`` intermediate)."""
        with torch.no_grad():
            for param, mask, piece in zip(self.stack.parameters(), self.param_masks,
                                          point.split(self.param_sizes), strict=True):  # fmt: skip
                torch.mul(piece.view(param.shape[1:]), mask, out=param)

    def _unit_gradients(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Each local unit's loss and masked gradient on its classes' samples of the batch."""
        config, options = self.ctx.config, self.options
        reads = self.local_sample_classes[:, y]  # [U_local, B]
        # Pad to the most samples any unit (on any rank) has, so every rank runs the same shapes.
        width = max(int(self.sample_classes[:, y].sum(1).max()), 1)
        order = torch.argsort((~reads).to(torch.int8), dim=1, stable=True)[:, :width]
        weight = reads.gather(1, order).to(x.dtype)
        for p in self.stack.parameters():
            p.grad = None
        scores = self.stack(x[order])
        values = unit_losses(scores, y[order], weight, self.unit_elements, config.batch_size, options.loss,
                             options.exponent)
        values.sum().backward()
        # Masked while flattened into one [U, D] buffer (one pass instead of a concatenation and a product).
        grads = torch.empty(len(values), self.dim, device=values.device)
        for param, mask, piece in zip(self.stack.parameters(), self.param_masks,
                                      grads.split(self.param_sizes, dim=1), strict=True):  # fmt: skip
            torch.mul(param.grad, mask, out=piece.view(param.shape))
        return values.detach(), grads

    def _evaluate(self, x: Tensor, y: Tensor, with_values: bool) -> tuple[Tensor, Tensor]:
        """Workers compute their units at the point they hold and send gradients (and values) to
        the master in one message each. Returns every unit's value ``[E]`` and gradient ``[E, D]``.

        The value rides in a last column; it is charged only ``with_values`` (the trust region
        needs it). Otherwise the master has no use for it and it is metrics bookkeeping, which the
        ledger leaves out as for every strategy."""
        group = self.ctx.group
        values, grads = self._unit_gradients(x, y)
        sizes = self.grad_bytes + self.value_bytes if with_values else self.grad_bytes
        if group.comm.world_size == 1:
            # Every unit is in this process, already in unit order: the bytes count, nothing moves
            # (packing them into the padded payload and back cost ~20% of a step at 16 workers).
            group.record_gather(sizes, tag="psl_grad")
            return values, grads
        payload = grads.new_zeros(group.n_local, self.slots, self.dim + 1)
        payload[self.local_worker, self.local_slot, : self.dim] = grads
        payload[self.local_worker, self.local_slot, self.dim] = values
        gathered = group.gather(payload, tag="psl_grad", sizes=sizes)
        units = gathered[self.unit_worker.to(gathered.device), self.unit_slot.to(gathered.device)]
        # Contiguous like the one-process path's tensors: torch sums a strided column in another order,
        # and the trust region's decisions would then drift a rounding apart from the simulation's.
        return units[:, self.dim].contiguous(), units[:, : self.dim].contiguous()

    # -- one round --------------------------------------------------------------------------------

    def run_round(self, samples_left: float = math.inf) -> RoundResult:
        steps = steps_this_round(self.steps_per_round, self.ctx.config.batch_size, samples_left)
        total = 0.0
        extras: dict[str, float] = {}
        accepted, cg_iterations = 0, 0
        for _ in range(steps):
            index = self.sampler.next_indices()[0]
            x, y = self.ctx.x_train[index], self.ctx.y_train[index]
            if self.qn is None:
                total += self._first_order_step(x, y)
            else:
                loss, ok, iterations = self._trust_region_step(x, y)
                total += loss
                accepted += ok
                cg_iterations += iterations
        if self.qn is not None:
            extras = {
                "tr_radius": self.qn.radius,
                "accepted": accepted / steps,
                "cg_iterations": cg_iterations / steps,
            }
        return RoundResult(loss=total / steps, samples=steps * self.ctx.config.batch_size, extras=extras)

    def _first_order_step(self, x: Tensor, y: Tensor) -> float:
        self._send(self.x, "psl_params")
        values, grads = self._evaluate(x, y, with_values=False)
        self.x.grad = grads.sum(0)
        self.optimizer.step()
        self.x.grad = None
        return float(values.sum())

    def _trust_region_step(self, x: Tensor, y: Tensor) -> tuple[float, int, int]:
        qn = self.qn
        if not self.workers_hold_x:
            self._send(self.x, "psl_params")
        values, grads = self._evaluate(x, y, with_values=True)
        f = float(values.sum())
        # The master's linear algebra stays in fp32 under --precision bf16 (autocast would run the
        # conjugate-gradient dot products and the element matrices in bf16).
        with torch.autocast(self.ctx.device.type, enabled=False):
            step, predicted, iterations, boundary = qn.solve(grads.sum(0))
        trial = self.x.detach() + step
        self._send(trial, "psl_trial")
        values_t, grads_t = self._evaluate(x, y, with_values=True)
        change = grads_t - grads if grads.shape[0] == len(qn.count) else (grads_t - grads).sum(0)
        with torch.autocast(self.ctx.device.type, enabled=False):
            qn.update(step, change)
        ratio = (f - float(values_t.sum())) / predicted if predicted > 0 else float("nan")
        ok = qn.judge(ratio, boundary)
        if ok:
            with torch.no_grad():
                self.x.copy_(trial)
        self.workers_hold_x = ok
        return f, int(ok), iterations

    # -- evaluation and state ---------------------------------------------------------------------

    def eval_model(self) -> StackedNet:
        offset = 0
        with torch.no_grad():
            for p in self.master_model.parameters():
                p.copy_(self.x[offset : offset + p.numel()].reshape(p.shape))
                offset += p.numel()
        return self.master_model

    def footprint(self) -> Footprint:
        return self._footprint

    def artifacts(self) -> dict[str, str]:
        """``placement.json``: each worker's elements, the classes whose samples it reads, |U_w|
        and its bytes per step each way (the first-order schedule)."""
        workers = []
        for w in range(self.ctx.group.n_workers):
            mine = [u for u in self.units if u.worker == w]
            reads = torch.stack([u.sample_classes for u in mine]).any(0)
            owned = sorted({(i, j) for u in mine for i, j in torch.nonzero(u.elements).tolist()})
            workers.append({
                "worker": w,
                "elements": [f"f_{i}{j}" if max(i, j) < 10 else f"f_{i},{j}" for i, j in owned]
                if self.options.loss == "psl" else [],
                "sample_classes": torch.nonzero(reads).reshape(-1).tolist(),
                "coordinates": int(self.worker_coords[w]),
                "bytes_per_step_each_way": int(self.param_bytes[w]),
            })
        record = {
            "loss": self.options.loss,
            "placement": self.options.placement if self.options.loss == "psl" else "class blocks (ce)",
            "parameters": self.dim,
            "workers": workers,
        }
        return {"placement.json": json.dumps(record, indent=1) + "\n"}

    def eval_extras(self) -> dict[str, float]:
        return {
            "coords_max_worker": float(self.worker_coords.max()),
            "coords_mean_worker": float(self.worker_coords.mean()),
        }

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "x": self.x.detach().clone(),
            "sampler": self.sampler.state_dict(),
            "workers_hold_x": self.workers_hold_x,
        }
        if self.optimizer is not None:
            state["optimizer"] = self.optimizer.state_dict()
        else:
            state["qn"] = self.qn.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            self.x.copy_(state["x"])
        self.sampler.load_state_dict(state["sampler"])
        self.workers_hold_x = bool(state["workers_hold_x"])
        if self.workers_hold_x:
            # The workers' copies are part of the checkpointed state (they hold x), so restoring
            # them moves no bytes: a resumed run's ledger equals an uninterrupted one's.
            self._load_point(self.x.detach())
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        else:
            self.qn.load_state_dict(state["qn"])
