"""Independent Subnet Training (IST): every worker trains a disjoint narrow slice of every hidden layer.

Yuan, Wolfe, Dun, Tang, Kyrillidis, Jermaine, "Distributed learning of fully connected neural
networks using independent subnet training", VLDB 2022 (algorithm notes: ``shared/papers.md`` §2).

Algorithm (one round; P = ``--workers``, H = ``ist.local_steps``)
---------------------------------------------------------------------
The master model is the full network (one stacked slot). Each round, for every hidden layer l of
width n_l independently, a fresh random permutation of its units is cut into P disjoint groups
``idx_l[p]`` (sizes differ by at most one). Worker p gets the narrow full-depth subnet of its groups,
with all inputs and all outputs::

    W_1^p = W_1[:, idx_1[p]]            (stacked layout [in, out])
    W_l^p = W_l[idx_{l-1}[p], idx_l[p]] for hidden-to-hidden weights
    W_L^p = W_L[idx_{L-1}[p], :]        into the output layer
    b_l^p, gamma_l^p, beta_l^p = the bias and batch-norm parameters of the units idx_l[p]

trains it for H iterations of ``--optimizer`` on its own data shard (``ShardSampler``; batch
``--batch-size``), and the blocks are written back into the master (index_copy, no averaging)::

    W_l[idx_{l-1}[p], idx_l[p]] <- W_l^p     for every p

Weights between different groups (``W_l[idx_{l-1}[p], idx_l[q]]``, p != q) are untouched that round.
Tensors that every subnet holds whole (only the output-layer bias) are averaged over workers::

    b_L <- (1/P) sum_p b_L^p

With ``ist.rescale`` (``auto``: on for models without batch norm), a weight whose inputs are a
partitioned layer is multiplied by ``f = n_{l-1} / |idx_{l-1}[p]|`` in the subnet (inverted
dropout: a subnet's pre-activations keep the full model's scale) and its change is divided by f at
write-back: ``W <- W + (W^p_trained - W^p_sent) / f``. Batch norm makes this unnecessary, and the
authors' model (with BN) does not rescale.

Then a new partition is drawn. Evaluation runs the reassembled master; ``subnet_test_acc`` in the
extras is the mean test accuracy of the P subnets as they left their last round.

CNNs (``lenet``): the output channels of every hidden convolution and the neurons of every hidden
dense layer are the units. A convolution's input channels follow the previous layer's groups, and
the flatten between the last convolution and the first dense layer maps channel c to its spatial
block of inputs ``c*h*w .. (c+1)*h*w - 1``. The models' layers are walked once
(:class:`SubnetLayout`), so any stack of ``StackedLinear``/``StackedConv2d``/``StackedBatchNorm``/
pooling/activations/flatten is partitioned; any other layer is a clear error.

The authors' model
------------------
``mlp:IN-H-H-C,bias=false,bn=batch,out_bn=true``: no-bias linear layers, batch norm with batch
statistics only (also at evaluation, no running statistics), a final affine-free batch norm on the
logits, cross-entropy (= NLL of log-softmax). Their defaults: H = 4096, SGD, lr 0.01, batch 128,
20-30 local iterations::

    pnnctl train --strategy ist --workers 4 --model mlp:784-2048-2048-10,bias=false,bn=batch,out_bn=true \\
        --lr 0.01 --batch-size 128 --set ist.local_steps=20

Plain MLPs with biases work too (output bias averaged, as the GIST follow-up does), and so do
``bn=running`` models: running statistics of a unit belong to that unit's worker, like its gamma/beta.

Bytes (S_p = bytes of worker p's subnet, everything it trains, buffers included)
--------------------------------------------------------------------------------
``central`` (``ist.variant=central``): the master scatters each subnet and gathers it back::

    per worker and round: received S_p (down), sent S_p (up); 1 message each way
    master per round:     sent sum_p S_p, received sum_p S_p; P messages out

With n_0 inputs, hidden widths n_1..n_{L-1} split evenly and C classes (no biases, no BN),
S_p = 4 (n_0 n_1/P + sum_l n_{l-1} n_l / P^2 + n_{L-1} C / P): the hidden-to-hidden matrices cost 1/P^2.

``sharded`` (``ist.variant=sharded``): every worker stores a 1/P shard of the model and all draw the
same partition from the shared seed without talking. Ownership is fixed: the units of every hidden
layer are cut into P contiguous blocks (``own_l[q]``, sizes differ by at most one); a weight between
two hidden layers, or from the input, belongs to the owner of its *output* unit, a weight into the
output layer to the owner of its *input* unit, biases and batch-norm parameters to the owner of their
unit, and the output bias is cut into P contiguous blocks of classes. The piece of subnet p held by
shard q has ``piece[p, q] = |S_p ∩ shard_q|`` elements (times 4 bytes); for an MLP::

    piece[p, q] = |idx_1[p] ∩ own_1[q]| * (n_0 + e_1)
                + sum_{l=2}^{L-1} |idx_l[p] ∩ own_l[q]| * (|idx_{l-1}[p]| + e_l)
                + |idx_{L-1}[p] ∩ own_{L-1}[q]| * C  +  |classes_q|   (the last term with an output bias)

with e_l = 1 per unit bias + 2 per unit with BN (gamma, beta) + 2 with running statistics.

Down, shard q sends ``piece[p, q]`` to every p != q; up, p sends the trained pieces back::

    per worker and round: received sum_{q!=p} piece[p,q] + sum_{r!=p} piece[r,p]
                          sent     sum_{r!=p} piece[r,p] + sum_{q!=p} piece[p,q]
                          one message per non-empty piece in each direction (usually 2(P-1))

Each of the four sums is about (P-1)/P * S_p, and there is no master. The ledger records it with
``group.record_p2p`` (tags ``ist_pieces_down`` / ``ist_pieces_up``).

Per-worker parameters and memory (``footprint``) are the largest subnet's (``central``) plus, for
``sharded``, the parameters of the largest stored shard (stored only: no gradient or optimizer state).

What is published and what is interpreted
------------------------------------------
Published (authors' code): the per-layer random partition into P equal chunks redrawn every round,
the subnet slicing (all inputs, all outputs), plain SGD for 20-30 local iterations, write-back with no
averaging, the model above, the two system variants. Interpretations (papers.md is silent):

- optimizer state (momentum, Adam moments) is reset every round: a subnet's units change every
  round and the authors' plain SGD keeps no state. (``centralized`` keeps its state; they agree for
  one round.)
- a run's last round trains only the local steps its epochs or samples budget still allow (to a
  whole step), then returns its subnets as every round does: runs of every worker count train the
  same epochs. (The authors count whole rounds.)
- uneven widths (``ist.uneven=true``): groups differ by at most one unit; they are stacked padded to
  the largest group, the padded units' weights, biases and BN parameters are zero and their gradients
  are zeroed before every step, so they stay zero and contribute nothing. ``ist.uneven=false``
  requires every hidden width to be divisible by P (the authors' equal chunks).
- ``ist.rescale``: without it a BN-free model's subnet sees pre-activations ~|group|/n of the full
  model's at every partitioned layer, and LeNet or a plain MLP barely learns (mnist-small, P = 4,
  2.6 epochs: plain mlp 784-256-256-10 26% without, 84% with; lenet at P = 2, lr 0.1: ~11% vs 85%
  after 3 epochs); with batch norm it changes little (authors' model: 90.0% off, 88.6% on). ``auto``
  keeps the published behaviour for the authors' model and makes BN-free models train.
- the output bias of models with biases is averaged (GIST); CNN channels as units (our reading);
  the sharded variant's ownership rule above (the authors' layout is not published).
- ``central`` under ``--nproc`` keeps the whole master on every process (replicated, updated
  identically from all-gathered subnets), so its wire bytes are not the ledger's. ``sharded`` keeps a
  whole-size master per process too, but a process's copy is current only on its own workers' shards:
  down, each process cuts its subnets from its copy and receives the other shards' pieces from their
  owners; up, it sends every trained piece back to the process that stores it (one batched
  point-to-point exchange each way). With one worker per process the bytes on the wire are exactly
  the ledger's (tested). Evaluation and checkpoints first take every element from its owner
  (bookkeeping, like the evaluation gathers).

Commands::

    pnnctl train --strategy ist --workers 4                                  # mnist-small, mlp, central
    pnnctl train --strategy ist --workers 4 --set ist.variant=sharded --set ist.local_steps=20
    pnnctl train --strategy ist --workers 2 --model lenet --lr 0.1               # rescale auto: on
    pnnctl train --strategy ist --workers 4 --nproc 2                        # two gloo processes
    pnnctl compare --config pnnctl/experiments/ist.toml --out results/reference
"""

from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from pnnctl.errors import UsageError
from pnnctl.models import (
    ACTIVATIONS,
    StackedBatchNorm,
    StackedConv2d,
    StackedFlatten,
    StackedLinear,
    StackedNet,
    StackedPool2d,
    build_model,
    worker_memory_bytes,
)
from pnnctl.training import ShardSampler, make_optimizer, stacked_cross_entropy, stream_seed
from strategies import register
from strategies.base import Footprint, RoundResult, Strategy, StrategyContext, steps_this_round

VARIANTS = ("central", "sharded")
RESCALE = ("auto", "on", "off")


@dataclass(frozen=True, kw_only=True)
class ISTOptions:
    local_steps: int = 20
    """local iterations H each worker trains its subnet per round (the authors use 20-30)"""
    variant: str = "central"
    """how subnets travel: central (a master sends each and gets it back) | sharded (workers store 1/P each)"""
    uneven: bool = True
    """allow hidden widths not divisible by the workers (groups differ by one unit, padded and masked)"""
    rescale: str = "auto"
    """weights from partitioned inputs x n/|group| in the subnet (inverted dropout): on | off | auto (on without BN)"""
    subnet_eval: bool = True
    """at evaluation, also test every worker's subnet (extras: subnet_test_acc)"""

    def validate(self) -> None:
        if self.local_steps < 1:
            raise UsageError("ist.local_steps", f"must be >= 1, not {self.local_steps}")
        if self.rescale not in RESCALE:
            raise UsageError("ist.rescale", f"must be one of {', '.join(RESCALE)}, not {self.rescale!r}")
        if self.variant not in VARIANTS:
            raise UsageError("ist.variant", f"must be one of {', '.join(VARIANTS)}, not {self.variant!r}")


# --------------------------------------------------------------------------------------------------
# Which dimension of which tensor is indexed by which hidden layer's units


@dataclass(frozen=True)
class Axis:
    """A tensor dimension indexed by the units of hidden layer ``layer``; each unit spans ``span``
    consecutive entries (a channel's spatial block after a flatten, else 1)."""

    layer: int
    span: int = 1


@dataclass(frozen=True)
class TensorRule:
    """How one master tensor (``name`` in its state dict, per-worker ``shape``) is sliced for a subnet."""

    name: str
    shape: tuple[int, ...]
    axes: tuple[Axis | None, ...]  # one per dim; None: the subnet keeps the whole dim
    input_dim: int | None = None  # a weight's dim over the layer's input features

    @property
    def shared(self) -> bool:
        """Held whole by every subnet (the output bias): averaged at write-back."""
        return all(a is None for a in self.axes)

    @property
    def owner_dim(self) -> int | None:
        """The dim whose unit owns an element in the sharded variant: the latest hidden layer's."""
        dims = [d for d, a in enumerate(self.axes) if a is not None]
        return max(dims, key=lambda d: (self.axes[d].layer, -d)) if dims else None


class SubnetLayout:
    """The hidden layers of a stacked model and, for each of its tensors, which dims they index.

    Walks the layers once: every ``StackedLinear``/``StackedConv2d`` but the last produces a hidden
    layer whose units (neurons, output channels) are partitioned; batch norm follows the units of the
    features it normalises; a flatten turns a channel into its block of ``h*w`` features.
    """

    def __init__(self, model: StackedNet) -> None:
        shapes = _layer_input_shapes(model)
        producers = [i for i, layer in enumerate(model) if isinstance(layer, StackedLinear | StackedConv2d)]
        if len(producers) < 2:
            raise UsageError("model", f"ist partitions hidden layers, and {model.spec.text!r} has none")
        self.widths: list[int] = []
        self.rules: list[TensorRule] = []
        #: per layer: (axis of its input features, axis of its output features)
        self.layer_axes: list[tuple[Axis | None, Axis | None]] = []
        current: Axis | None = None
        for i, layer in enumerate(model):
            in_axis = current
            if isinstance(layer, StackedFlatten):
                if current is not None and len(shapes[i]) > 3:
                    current = Axis(current.layer, current.span * math.prod(shapes[i][3:]))
            elif isinstance(layer, StackedLinear | StackedConv2d):
                if i == producers[-1]:
                    current = None
                else:
                    width = layer.out_features if isinstance(layer, StackedLinear) else layer.out_channels
                    self.widths.append(width)
                    current = Axis(len(self.widths) - 1)
                conv = isinstance(layer, StackedConv2d)
                if conv and in_axis is not None and in_axis.span != 1:
                    raise UsageError("model", "ist cannot partition a convolution that follows a flatten")
                weight_axes = (current, in_axis, None, None) if conv else (in_axis, current)
                bias_axes = (current,) if conv else (None, current)
                self._add(i, layer, {"weight": weight_axes, "bias": bias_axes}, input_dim=1 if conv else 0)
            elif isinstance(layer, StackedBatchNorm):
                axes = (current,)
                self._add(i, layer, {"weight": axes, "bias": axes, "running_mean": axes, "running_var": axes})
            elif not isinstance(layer, (StackedPool2d, *ACTIVATIONS.values())):
                raise UsageError("model", f"ist cannot partition a {type(layer).__name__} layer")
            self.layer_axes.append((in_axis, current))

    def _add(
        self, index: int, layer: nn.Module, axes_by_name: dict[str, tuple[Axis | None, ...]], input_dim: int = 0
    ) -> None:
        for name, tensor in layer.state_dict().items():
            if name not in axes_by_name:
                raise UsageError("model", f"ist does not know how to slice {type(layer).__name__}.{name}")
            shape = tuple(tensor.shape[1:])
            axes = axes_by_name[name][: len(shape)]
            self.rules.append(TensorRule(f"{index}.{name}", shape, axes, input_dim if name == "weight" else None))


def _layer_input_shapes(model: StackedNet) -> list[tuple[int, ...]]:
    """The activation shape entering each layer, from one probe sample (the model is left as it was)."""
    shapes: list[tuple[int, ...]] = []
    hooks = [layer.register_forward_pre_hook(lambda _m, args: shapes.append(tuple(args[0].shape))) for layer in model]
    was_training = model.training
    model.eval()  # no running-statistics update
    try:
        with torch.no_grad():
            device = next(model.parameters()).device
            model(torch.zeros(model.n_workers, 1, *model.input_shape, device=device))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return shapes


# --------------------------------------------------------------------------------------------------
# The partition of one round


@dataclass
class Partition:
    """Every hidden layer's units cut into P groups: ``index[l]`` is ``[P, g_l]`` (g_l = the largest
    group), rows of smaller groups padded with unit 0 where ``mask[l]`` is False."""

    index: list[Tensor]
    mask: list[Tensor]

    def groups(self, layer: int) -> list[Tensor]:
        """The real units of each worker's group in hidden layer ``layer``."""
        return [row[keep] for row, keep in zip(self.index[layer], self.mask[layer], strict=True)]


def group_sizes(width: int, n_groups: int) -> list[int]:
    """Sizes of ``n_groups`` near-equal contiguous blocks of ``width`` units (first ones larger)."""
    base, extra = divmod(width, n_groups)
    return [base + (1 if p < extra else 0) for p in range(n_groups)]


def _expand(index: Tensor, span: int) -> Tensor:
    """Unit indices ``[P, g]`` -> the ``[P, g*span]`` entries they cover (unit u: u*span .. u*span+span-1)."""
    if span == 1:
        return index
    return (index.unsqueeze(-1) * span + torch.arange(span, device=index.device)).reshape(index.shape[0], -1)


# --------------------------------------------------------------------------------------------------
# The strategy


@register
class IndependentSubnetTraining(Strategy):
    name = "ist"
    summary = "independent subnet training: each worker trains a disjoint slice of every hidden layer, no averaging"
    Options = ISTOptions
    published: ClassVar[str] = (
        "IST (VLDB 2022): numbers not published in a readable form; claim: much lower training time than "
        "data-parallel / local-SGD at similar accuracy (Speech Commands, CIFAR-10, Amazon-670k). "
        "ResIST follow-up: 3.58-3.81x speed-up over local SGD, <=1% accuracy gap on CIFAR-10/100."
    )
    traffic_grows_with_steps = False  # a round sends every subnet down and back once, whatever its local steps

    def __init__(self, ctx: StrategyContext, options: ISTOptions) -> None:
        super().__init__(ctx, options)
        config, group = ctx.config, ctx.group
        self.n_workers = group.n_workers
        self.master = build_model(config.model, 1, ctx.data.input_shape, ctx.data.n_classes, seed=config.seed).to(
            ctx.device
        )
        self.layout = SubnetLayout(self.master)
        for layer, width in enumerate(self.layout.widths):
            if self.n_workers > width:
                msg = (f"ist gives every worker at least one unit of each hidden layer, and hidden layer {layer + 1} "
                       f"of {config.model!r} has {width}; use --workers <= {width}")
                raise UsageError("workers", msg)
            if not options.uneven and width % self.n_workers:
                msg = (f"hidden layer {layer + 1} has {width} units, not divisible by {self.n_workers} workers "
                       "(ist.uneven=false); change --workers or set ist.uneven=true")
                raise UsageError("workers", msg)
        self.sizes = [torch.tensor(group_sizes(w, self.n_workers)) for w in self.layout.widths]
        self.group_width = [int(s.max()) for s in self.sizes]
        self.uneven = any(w % self.n_workers for w in self.layout.widths)
        has_bn = any(isinstance(layer, StackedBatchNorm) for layer in self.master)
        self.rescale = options.rescale == "on" or (options.rescale == "auto" and not has_bn)
        # Real entries per worker and dim of every rule: sizes of the subnets and of the padded stack.
        self._real_counts = np.array([self._subnet_elements(p) for p in range(self.n_workers)], dtype=np.int64)
        self.element_size = next(self.master.parameters()).element_size()
        self.subnet_bytes = self._real_counts.sum(axis=1).astype(float) * self.element_size

        self.local = group.local_workers
        self.subnet = self.build_subnet(group.n_local)
        self.subnet.to(ctx.device)
        self._grad_masks = self._padding_masks() if self.uneven else []
        # Built once, not each round (rounds start from empty state): a torch.optim optimizer, where the
        # fused kernels do not run, imports torch._dynamo when first built (1.5 s), which must not land
        # in the first round's compute time.
        self.optimizer = make_optimizer(
            config.optimizer, self.subnet.parameters(), config.lr, config.momentum, config.weight_decay
        )
        self.sampler = ShardSampler(
            ctx.x_train, ctx.y_train, ctx.shards, group.local_workers, config.batch_size, config.seed
        )
        # One stream shared by every rank: identical partitions without talking (-1: no logical worker).
        self.generator = torch.Generator().manual_seed(stream_seed(config.seed, -1))
        self.partition: Partition | None = None
        self.trained = False
        self._owners = self._unit_owners()
        # sharded over several ranks: a rank's master is current only on its own workers' shards
        self._ranks_of_workers = torch.tensor([group.rank_of(w) for w in range(self.n_workers)], device=ctx.device)
        self._master_stale = False

    # -- shapes ------------------------------------------------------------------------------------

    def _dim_sizes(self, rule: TensorRule, worker: int | None) -> list[int]:
        """Per dim: real entries of ``worker``'s slice, or of the padded stack with ``worker=None``."""
        out = []
        for size, axis in zip(rule.shape, rule.axes, strict=True):
            if axis is None:
                out.append(size)
            else:
                units = self.group_width[axis.layer] if worker is None else int(self.sizes[axis.layer][worker])
                out.append(units * axis.span)
        return out

    def _subnet_elements(self, worker: int) -> list[int]:
        return [math.prod(self._dim_sizes(rule, worker)) for rule in self.layout.rules]

    def build_subnet(self, n: int) -> StackedNet:
        """An uninitialised stack of ``n`` subnets, every hidden layer at its largest group's width."""
        def width(axis: Axis | None, full: int) -> int:
            return full if axis is None else self.group_width[axis.layer] * axis.span

        layers: list[nn.Module] = []
        for layer, (in_axis, out_axis) in zip(self.master, self.layout.layer_axes, strict=True):
            if isinstance(layer, StackedLinear):
                layers.append(StackedLinear(n, width(in_axis, layer.in_features), width(out_axis, layer.out_features),
                                            bias=layer.bias is not None))
            elif isinstance(layer, StackedConv2d):
                layers.append(StackedConv2d(n, width(in_axis, layer.in_channels), width(out_axis, layer.out_channels),
                                            layer.kernel_size))
            elif isinstance(layer, StackedBatchNorm):
                layers.append(StackedBatchNorm(n, width(out_axis, layer.num_features), affine=layer.weight is not None,
                                               track_running_stats=layer.track_running_stats,
                                               momentum=layer.momentum, eps=layer.eps))
            else:
                layers.append(copy.deepcopy(layer))
        return StackedNet(
            self.master.spec, n, *layers, input_shape=self.master.input_shape, n_classes=self.master.n_classes
        )

    def _padding_masks(self) -> list[tuple[Tensor, Tensor]]:
        """(subnet parameter, 0/1 mask of its real entries) for the local workers, where padding exists."""
        params = dict(self.subnet.named_parameters())
        local = torch.tensor(list(self.local))
        out = []
        for rule in self.layout.rules:
            if rule.name not in params or rule.shared:
                continue
            mask = self._real_mask(rule, [self._unit_mask(a.layer)[local] if a else None for a in rule.axes])
            if mask is not None and not bool(mask.all()):
                param = params[rule.name]
                out.append((param, mask.to(param.device, param.dtype)))
        return out

    def _unit_mask(self, layer: int) -> Tensor:
        """``[P, g_l]`` True where a group row holds a real unit (groups are filled from the left)."""
        return torch.arange(self.group_width[layer]).unsqueeze(0) < self.sizes[layer].unsqueeze(1)

    def _real_mask(self, rule: TensorRule, unit_masks: list[Tensor | None]) -> Tensor | None:
        """Broadcastable ``[P, L_0, L_1, ...]`` bool mask of real entries, from per-dim unit masks."""
        mask = None
        dims = len(rule.shape)
        for d, (axis, unit_mask) in enumerate(zip(rule.axes, unit_masks, strict=True)):
            if axis is None:
                continue
            entries = unit_mask.repeat_interleave(axis.span, dim=1)
            view = [entries.shape[0]] + [1] * dims
            view[d + 1] = entries.shape[1]
            entries = entries.reshape(view)
            mask = entries if mask is None else mask & entries
        return mask

    # -- partition, extraction, write-back -------------------------------------------------------------

    def draw_partition(self) -> Partition:
        """A fresh random permutation of every hidden layer's units cut into P groups (shared seed)."""
        index, mask = [], []
        for layer, width in enumerate(self.layout.widths):
            perm = torch.randperm(width, generator=self.generator)
            rows = torch.zeros(self.n_workers, self.group_width[layer], dtype=torch.long)
            keep = self._unit_mask(layer)
            rows[keep] = perm  # row-major fill of the real slots: contiguous chunks of the permutation
            index.append(rows.to(self.ctx.device))
            mask.append(keep.to(self.ctx.device))
        return Partition(index, mask)

    def _indices(self, rule: TensorRule, partition: Partition) -> tuple[Tensor, ...]:
        """Advanced-index tensors, one per dim, broadcasting to the ``[P, L_0, L_1, ...]`` slices."""
        dims = len(rule.shape)
        out = []
        for d, (size, axis) in enumerate(zip(rule.shape, rule.axes, strict=True)):
            if axis is None:
                entries = torch.arange(size, device=self.ctx.device).unsqueeze(0)
            else:
                entries = _expand(partition.index[axis.layer], axis.span)
            view = [entries.shape[0]] + [1] * dims
            view[d + 1] = entries.shape[1]
            out.append(entries.reshape(view))
        return tuple(out)

    @torch.no_grad()
    def extract(self, partition: Partition) -> list[Tensor]:
        """Every worker's subnet cut from the master: one ``[P, *padded shape]`` tensor per rule."""
        state = self.master.state_dict()
        out = []
        for rule in self.layout.rules:
            full = state[rule.name][0]
            if rule.shared:
                out.append(full.unsqueeze(0).expand(self.n_workers, *full.shape).clone())
                continue
            piece = full[self._indices(rule, partition)]
            if self.uneven:
                mask = self._real_mask(rule, [partition.mask[a.layer] if a else None for a in rule.axes])
                piece = piece * mask
            scale = self._input_scale(rule)
            out.append(piece if scale is None else piece * scale)
        return out

    @torch.no_grad()
    def write_back(self, partition: Partition, pieces: list[Tensor], sent: list[Tensor]) -> None:
        """Copy every worker's trained blocks into the master (disjoint, no averaging); average shared ones.

        ``sent`` is what :meth:`extract` gave out: a rescaled block is written back as its old value
        plus the unscaled change, so an untrained round leaves the master bit for bit as it was.
        """
        state = self.master.state_dict()
        for rule, piece, before in zip(self.layout.rules, pieces, sent, strict=True):
            full = state[rule.name][0]
            if rule.shared:
                # first + mean of differences: exactly the first when all agree (write-back of an
                # untouched extraction is the identity, bit for bit).
                full.copy_(piece[0] + (piece - piece[0]).mean(dim=0))
                continue
            index = self._indices(rule, partition)
            scale = self._input_scale(rule)
            if scale is not None:
                piece = full[index] + (piece - before) / scale
            if self.uneven:
                mask = self._real_mask(rule, [partition.mask[a.layer] if a else None for a in rule.axes])
                mask = mask.expand(piece.shape)
                full[tuple(i.expand(piece.shape)[mask] for i in index)] = piece[mask]
            else:
                full[index] = piece

    def _input_scale(self, rule: TensorRule) -> Tensor | None:
        """``ist.rescale``: ``[P, 1, ...]`` factors n_l / |idx_l[p]| for a weight whose inputs are partitioned."""
        if not self.rescale or rule.input_dim is None or self.n_workers == 1:
            return None
        axis = rule.axes[rule.input_dim]
        if axis is None:
            return None
        factor = self.layout.widths[axis.layer] / self.sizes[axis.layer].to(torch.float64)
        return factor.to(self.ctx.device, torch.float32).reshape(-1, *([1] * len(rule.shape)))

    def _pack(self, pieces: list[Tensor]) -> Tensor:
        return torch.cat([p.reshape(p.shape[0], -1) for p in pieces], dim=1)

    def _unpack(self, flat: Tensor) -> list[Tensor]:
        out, offset = [], 0
        for rule in self.layout.rules:
            shape = self._dim_sizes(rule, None)
            size = math.prod(shape)
            out.append(flat[:, offset : offset + size].reshape(flat.shape[0], *shape))
            offset += size
        return out

    # -- traffic ------------------------------------------------------------------------------------

    def _unit_owners(self) -> list[Tensor]:
        """Sharded variant: the owner of each unit of every hidden layer (P contiguous blocks)."""
        arange = torch.arange(self.n_workers)
        return [arange.repeat_interleave(sizes).to(self.ctx.device) for sizes in self.sizes]

    @functools.cached_property
    def master_owners(self) -> list[Tensor]:
        """Per rule, the worker whose shard stores each element of the master tensor (sharded variant):
        the owner of its unit along ``owner_dim``, or of its block of classes for the output bias."""
        out = []
        for rule in self.layout.rules:
            owner = rule.owner_dim
            if owner is None:
                sizes = torch.tensor(group_sizes(math.prod(rule.shape), self.n_workers), device=self.ctx.device)
                owners = torch.arange(self.n_workers, device=self.ctx.device).repeat_interleave(sizes)
                out.append(owners.reshape(rule.shape))
                continue
            axis = rule.axes[owner]
            along = self._owners[axis.layer].repeat_interleave(axis.span)
            view = [1] * len(rule.shape)
            view[owner] = rule.shape[owner]
            out.append(along.reshape(view).expand(rule.shape))
        return out

    def piece_owners(self, partition: Partition) -> Tensor:
        """``[P, S]``: for each element of every worker's packed subnet, the worker whose shard stores it
        (-1 for the padding of uneven groups). Row p counts ``piece_elements(partition)[p]``."""
        pieces = []
        for rule, owners in zip(self.layout.rules, self.master_owners, strict=True):
            if rule.shared:
                pieces.append(owners.unsqueeze(0).expand(self.n_workers, *owners.shape))
                continue
            piece = owners[self._indices(rule, partition)]
            if self.uneven:
                mask = self._real_mask(rule, [partition.mask[a.layer] if a else None for a in rule.axes])
                if mask is not None:
                    piece = torch.where(mask.to(piece.device), piece, -1)
            pieces.append(piece)
        return self._pack(pieces)

    def piece_elements(self, partition: Partition) -> np.ndarray:
        """``[P, P]``: elements of worker p's subnet stored in worker q's shard (sharded variant)."""
        n = self.n_workers
        overlap = []  # per hidden layer: [P, P] units of group p owned by q
        for layer, owners in enumerate(self._owners):
            one_hot = torch.nn.functional.one_hot(owners[partition.index[layer]], n)
            overlap.append((one_hot * partition.mask[layer].unsqueeze(-1)).sum(dim=1).cpu().numpy().astype(np.int64))
        pieces = np.zeros((n, n), dtype=np.int64)
        for rule in self.layout.rules:
            owner = rule.owner_dim
            if owner is None:
                pieces += np.array(group_sizes(math.prod(rule.shape), n), dtype=np.int64)[None, :]
                continue
            axis = rule.axes[owner]
            rest = np.ones(n, dtype=np.int64)
            for p in range(n):
                sizes = self._dim_sizes(rule, p)
                rest[p] = math.prod(s for d, s in enumerate(sizes) if d != owner)
            pieces += overlap[axis.layer] * axis.span * rest[:, None]
        return pieces

    def _record_pieces(self, pieces: np.ndarray, direction: str) -> None:
        ledger = self.ctx.group.ledger
        n = self.n_workers
        off_diagonal = pieces * (1 - np.eye(n, dtype=np.int64)) * self.element_size
        to_subnet = off_diagonal.sum(axis=1)  # what worker p's subnet takes from (or gives back to) others
        from_shard = off_diagonal.sum(axis=0)  # what shard q gives to (or takes back from) others
        nonempty = (off_diagonal > 0).astype(float)
        sent, recv, msgs = ledger.zeros(), ledger.zeros(), ledger.zeros()
        if direction == "down":  # shard owners send pieces to the subnets
            sent[:n], recv[:n], msgs[:n] = from_shard, to_subnet, nonempty.sum(axis=0)
        else:  # subnets send trained pieces back to their owners
            sent[:n], recv[:n], msgs[:n] = to_subnet, from_shard, nonempty.sum(axis=1)
        self.ctx.group.record_p2p(f"ist_pieces_{direction}", sent, recv, msgs)

    # -- one round ----------------------------------------------------------------------------------

    def _peers(self, partition: Partition) -> list[tuple[int, slice, Tensor, Tensor]] | None:
        """Sharded over several processes, per other rank r: its workers, which elements of this rank's
        packed subnets r stores, and which elements of r's subnets this rank stores (None: one process,
        where who stores what does not matter). Both directions of a round use them."""
        group = self.ctx.group
        if group.comm.world_size == 1:
            return None
        owners = self.piece_owners(partition)
        ranks = torch.where(owners >= 0, self._ranks_of_workers[owners.clamp(min=0)], -1)
        me, mine = group.comm.rank, slice(self.local.start, self.local.stop)
        peers = []
        for other in range(group.comm.world_size):
            if other != me:
                workers = group.workers_of(other)
                theirs = slice(workers.start, workers.stop)
                peers.append((other, theirs, ranks[mine] == other, ranks[theirs] == me))
        return peers

    def _fetch_pieces(self, everything: Tensor, peers: list[tuple[int, slice, Tensor, Tensor]] | None) -> Tensor:
        """Sharded, down: this rank's subnets, their pieces from the ranks that store them.

        Each rank cuts every subnet from its own master, which is current only on its shards: it
        keeps its own elements and receives the others from their owners (``piece[p, q]`` elements
        from shard q to subnet p, as the ledger counts). With one rank nothing moves.
        """
        block = everything[self.local.start : self.local.stop]
        if peers is None:
            return block
        outgoing = {other: everything[theirs][stored_here] for other, theirs, _, stored_here in peers}
        incoming = {other: int(stored_there.sum()) for other, _, stored_there, _ in peers}
        received = self.ctx.group.exchange_pieces(outgoing, incoming, everything.dtype)
        block = block.clone()
        for other, _, stored_there, _ in peers:
            if other in received:
                block[stored_there] = received[other]
        return block

    def _return_pieces(
        self, everything: Tensor, trained: Tensor, peers: list[tuple[int, slice, Tensor, Tensor]] | None
    ) -> Tensor:
        """Sharded, up: every subnet's trained pieces back to the ranks that store them; returns all
        ``[P, S]`` subnets as this rank's write-back needs them (current on its own shards only)."""
        if peers is None:
            return trained
        outgoing = {other: trained[stored_there] for other, _, stored_there, _ in peers}
        incoming = {other: int(stored_here.sum()) for other, _, _, stored_here in peers}
        received = self.ctx.group.exchange_pieces(outgoing, incoming, trained.dtype)
        everyone = everything.clone()
        everyone[self.local.start : self.local.stop] = trained
        for other, theirs, _, stored_here in peers:
            if other in received:
                everyone[theirs][stored_here] = received[other]  # a view of everyone: written in place
        # Elements of other ranks' shards were written back stale; evaluation and checkpoints
        # first take them from their owners.
        self._master_stale = True
        return everyone

    def _sync_master(self) -> None:
        """Every rank's master made whole from the owners of each element (sharded over ranks)."""
        if not self._master_stale:
            return
        state = self.master.state_dict()
        with torch.no_grad():
            for rule, owners in zip(self.layout.rules, self.master_owners, strict=True):
                full = state[rule.name][0]
                full.copy_(self.ctx.group.take_from_owners(full, self._ranks_of_workers[owners]))
        self._master_stale = False

    def _load_subnets(self, block: Tensor) -> None:
        state = self.subnet.state_dict()
        with torch.no_grad():
            for rule, piece in zip(self.layout.rules, self._unpack(block), strict=True):
                state[rule.name].copy_(piece)

    def _subnet_state(self) -> Tensor:
        state = self.subnet.state_dict()
        return self._pack([state[rule.name] for rule in self.layout.rules])

    def run_round(self, samples_left: float = math.inf) -> RoundResult:
        group, config = self.ctx.group, self.ctx.config
        steps = steps_this_round(self.options.local_steps, config.batch_size * self.n_workers, samples_left)
        partition = self.draw_partition()
        self.partition = partition
        sent = self.extract(partition)
        everything = self._pack(sent)
        if self.options.variant == "central":
            block = group.scatter(everything, tag="ist_subnet_down", sizes=self.subnet_bytes)
        else:
            pieces = self.piece_elements(partition)
            self._record_pieces(pieces, "down")
            peers = self._peers(partition)
            block = self._fetch_pieces(everything, peers)
        self._load_subnets(block)

        # A subnet's units change every round, so optimizer state cannot carry over (interpretation).
        optimizer = self.optimizer
        optimizer.state.clear()
        self.subnet.train()
        loss_sum = torch.zeros(group.n_local, device=self.ctx.device)
        for _ in range(steps):
            x, y = self.sampler.next_batch()
            optimizer.zero_grad(set_to_none=True)
            total, per_worker = stacked_cross_entropy(self.subnet(x), y)
            total.backward()
            for param, mask in self._grad_masks:
                param.grad.mul_(mask)
            optimizer.step()
            loss_sum += per_worker
        self.trained = True

        trained = self._subnet_state()
        if self.options.variant == "central":
            everyone = group.gather(trained, tag="ist_subnet_up", sizes=self.subnet_bytes)
        else:
            self._record_pieces(pieces, "up")
            everyone = self._return_pieces(everything, trained, peers)
        self.write_back(partition, self._unpack(everyone), sent)

        losses = group.all_gather((loss_sum / steps).unsqueeze(1)).reshape(-1)
        samples = steps * config.batch_size * self.n_workers
        extras = {"subnet_loss_min": float(losses.min()), "subnet_loss_max": float(losses.max())}
        return RoundResult(loss=float(losses.mean()), samples=samples, extras=extras)

    # -- evaluation, footprint, state ----------------------------------------------------------------

    def eval_model(self) -> StackedNet:
        self._sync_master()
        return self.master

    @torch.no_grad()
    def eval_extras(self) -> dict[str, float]:
        if not (self.options.subnet_eval and self.trained):
            return {}
        x_test = self.ctx.data.x_test.to(self.ctx.device)
        y_test = self.ctx.data.y_test.to(self.ctx.device)
        was_training = self.subnet.training
        self.subnet.eval()
        correct = torch.zeros(self.ctx.group.n_local, device=self.ctx.device)
        for start in range(0, len(x_test), 1000):
            xb, yb = x_test[start : start + 1000], y_test[start : start + 1000]
            logits = self.subnet(xb.unsqueeze(0).expand(self.ctx.group.n_local, *xb.shape))
            correct += (logits.argmax(dim=2) == yb.unsqueeze(0)).sum(dim=1).float()
        self.subnet.train(was_training)
        accuracy = self.ctx.group.all_gather(correct.unsqueeze(1)).reshape(-1) / len(y_test)
        return {"subnet_test_acc": float(accuracy.mean()), "subnet_test_acc_min": float(accuracy.min())}

    def shard_elements(self, parameters_only: bool = False) -> np.ndarray:
        """``[P]``: elements each worker stores in the sharded variant (its owned units' tensors)."""
        n = self.n_workers
        names = {name for name, _ in self.master.named_parameters()} if parameters_only else None
        out = np.zeros(n, dtype=np.int64)
        for rule in self.layout.rules:
            if names is not None and rule.name not in names:
                continue
            owner = rule.owner_dim
            total = math.prod(rule.shape)
            if owner is None:
                out += np.array(group_sizes(total, n), dtype=np.int64)
            else:
                per_unit = total // (rule.shape[owner] // rule.axes[owner].span)
                out += self.sizes[rule.axes[owner].layer].numpy().astype(np.int64) * per_unit
        return out

    def footprint(self) -> Footprint:
        config = self.ctx.config
        names = {name for name, _ in self.master.named_parameters()}
        is_param = np.array([rule.name in names for rule in self.layout.rules])
        params = self._real_counts[:, is_param].sum(axis=1)  # largest subnet: worker 0 (first groups larger)
        activations = _activation_elements(self.build_subnet(1), config.batch_size)
        memory = np.array([worker_memory_bytes(int(p), activations, config.optimizer, config.momentum)
                           for p in params])
        if self.options.variant == "sharded":
            params = params + self.shard_elements(parameters_only=True)
            memory = memory + self.shard_elements() * self.element_size
        return Footprint(int(params.max()), int(memory.max()))

    def state_dict(self) -> dict[str, Any]:
        self._sync_master()
        return {
            "master": self.master.state_dict(),
            "subnet": self.subnet.state_dict(),
            "trained": self.trained,
            "sampler": self.sampler.state_dict(),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.master.load_state_dict(state["master"])
        self.subnet.load_state_dict(state["subnet"])
        self.trained = bool(state["trained"])
        self.sampler.load_state_dict(state["sampler"])
        self.generator.set_state(state["generator"])


def _activation_elements(net: StackedNet, batch_size: int) -> int:
    """Activation elements one subnet keeps for backward (outputs of every layer) at this batch size."""
    total = 0

    def count(_module: nn.Module, _inputs: tuple, output: Tensor) -> None:
        nonlocal total
        total += output[0].numel()

    hooks = [layer.register_forward_hook(count) for layer in net]
    try:
        with torch.no_grad():
            net.reset_parameters(torch.Generator().manual_seed(0))
            net.eval()
            net(torch.zeros(1, 1, *net.input_shape))
    finally:
        for hook in hooks:
            hook.remove()
    return total * batch_size
