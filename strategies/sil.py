"""``sil``: partitioned training with synthetic intermediate labels, then join and recovery epochs.

After Karadağ & Topaloğlu, "Partitioned neural network training via synthetic intermediate labels"
(arXiv 2403.11204). What the paper publishes: a six-layer fully connected network is cut into
partitions; the left one learns to map inputs to *synthetic intermediate labels* (random vectors
with a defined structure, one per class), the right one is trained on the true labels, each on its
own device with no activation or gradient traffic between them; the parts are joined and optional
recovery epochs of end-to-end training close the gap. **The label generator, the cut point, the
losses and the schedule are not published**: everything below beyond that outline is this
project's interpretation (``shared/papers.md`` §3), and every free choice is an option.

The network
    An ``mlp`` with L linear layers, ``widths = (w_0, ..., w_L)``. ``--model mlp`` (no widths) means
    the paper's net ``IN-512-512-512-512-512-C`` (six linear layers), not the family's 256-256 default;
    give the same explicit spec to ``centralized`` when comparing. ``cuts = (h_1 < ... < h_{K-1})``
    are hidden-layer indices (1-based: hidden layer h is the output of linear layer h, width w_h);
    partition k holds linear layers h_k+1 .. h_{k+1} (h_0 = 0, h_K = L). *(interpretation)* A cut
    sits **before** the activation of hidden layer h: a partition ends with a linear layer, so it can
    regress real-valued targets, and the activation (and batch norm, if any) opens the next one; the
    composition of the partitions is then exactly the ``mlp``. Default cuts: K = ``--workers``
    partitions of near-equal depth (``--workers 2``: the middle, the paper's set-up). Explicit
    ``sil.cuts`` must make exactly ``--workers`` partitions: partition k is logical worker k, N = K
    (so ``pnnctl train --strategy sil`` with the default ``--workers 4`` cuts the net into 4). More
    than two partitions chain the reading below; the paper has two.

Synthetic labels (drawn once per cut c from the run seed; per-coordinate scale s = ``label_scale``)
    ``separated`` (default): C random directions on the sphere of radius r = s·sqrt(w), pushed apart
        until every pairwise distance is >= ``min_distance``·r·sqrt(2) (1.0: as far apart as
        orthogonal vectors; the most C points can reach is r·sqrt(2C/(C-1))).
    ``orthogonal``: C orthonormal rows of the Q factor of a Gaussian matrix, times r (C <= w).
    ``hadamard``: C random non-constant rows of the Sylvester Hadamard matrix H_w, columns randomly
        permuted, times s (entries ±s, half of each sign, pairwise orthogonal; w a power of two, C < w).
    ``gaussian``: i.i.d. N(0, s²) entries, no structure.
    The tables T_c ∈ R^{C×w_{h_c}} are part of the checkpoint and written to the run folder as
    ``sil_labels.json`` (``artifacts()``); ``eval_extras`` reports their smallest pairwise distance
    and largest |cosine| per cut.

Apart phase (rounds 1..A; a round = one epoch, every partition one pass over the whole training
set: SIL partitions depth, not data, so ``--sharding`` does not apply)
    partition 0:        min  ℓ(P_0(x), T_0[y])
    partition 0<k<K-1:  min  ℓ(P_k(T_{k-1}[y] + σε), T_k[y])
    partition K-1:      min  CE(P_{K-1}(T_{K-2}[y] + σε), y)
    ℓ = squared error averaged over the cut's coordinates (``apart_loss=mse``, torch's ``mse_loss``),
    summed over them (``sse``: w times the gradient; on mnist-small with the paper's net plain SGD at
    the default ``--lr`` diverged with it, while ``mse`` learned slowly under SGD; Adam does not
    care), or 1 − cos
    (``cosine``: the scale of the output is then free, which the next partition never saw), σ =
    ``noise_std``, ε ~ N(0, I) fresh per sample. No activation or gradient crosses a cut, so the
    partitions train at the same time on different workers, each with its own optimizer
    (``--optimizer``, ``--lr``). Each partition's batch order and noise are seeded by (seed,
    partition, epoch) alone, so the order in which partitions are updated does not matter and a
    checkpoint needs no generator state. ``train_loss`` of an apart row is the last partition's
    cross-entropy (on synthetic inputs); the other partitions' losses are ``apart_loss_p{k}``.

Join (end of round A)
    The full network is P_{K-1} ∘ … ∘ P_0; ``eval_model`` returns it as one 1-worker ``mlp``
    ``StackedNet`` (the partitions are slices of its layers; in a distributed run the remote
    partitions' weights are all-gathered for evaluation, which the ledger does not count). The
    joined model's test accuracy (measured inside the join round, so the figure exists whatever
    ``--eval-every`` is) is kept as ``joined_test_acc`` in the extras of every later row.
    The optimizers restart (``reset_optimizer``, default on: Adam's second moments of the last
    partition, fitted to a near-zero loss on synthetic inputs, would otherwise make the first
    end-to-end steps huge), and the rate may change (``recovery_lr``).

Recovery (rounds A+1..A+R, R = ``recovery_epochs``, 0 allowed)
    End-to-end training of CE(P_{K-1} ∘ … ∘ P_0(x), y) (each partition keeps its own optimizer), run
    as a pipeline without micro-batches: worker k computes P_k, sends its output across cut k to
    worker k+1, and later receives the gradient of the loss w.r.t. that output back. Per step with b
    samples and cut widths w_c (4-byte floats; 2 under ``--precision bf16``), counted with
    ``group.record_p2p``:

        cut c, forward:   worker c sends b·w_c·4 bytes to worker c+1 (1 message)
        cut c, backward:  worker c+1 sends b·w_c·4 bytes to worker c (1 message)

    so per recovery epoch (n training samples, S = ceil(n/B) steps) worker k sends and receives
    4n·(w_{c=k} [k<K-1] + w_{c=k-1} [k>0]) bytes in S·([k<K-1] + [k>0]) messages.
    Before the first round the master (ledger slot N) sends worker k the tables it needs
    (T_{k-1} and T_k): 4·C·(w_{k-1} + w_k) bytes, one message each. Nothing else is sent.
    On real ranks a crossing between partitions on two ranks is one point-to-point send
    (``group.send``) of exactly those bytes, so the wire carries the ledger's bytes. A crossing between
    two partitions on the same rank moves nothing but is still counted: the ledger prices workers as
    separate machines.

Schedule and budget
    A = ``apart_epochs``, or when 0 (default) A = ``--epochs`` − R, so SIL and ``centralized`` with the
    same ``--epochs`` train for the same number of epochs (a whole number: a fraction is refused). With an explicit
    A, ``--epochs`` must be A + R (the run ends by ``is_done()`` after A + R rounds, so more was never
    trained). The metrics' ``phase`` column reads ``apart`` (the composition of the partitions as trained so far is
    evaluated), ``joined`` (the row right after the join) and ``recovery``. The schedule is fixed when
    the run starts.

Memory per worker (analytic, fp32; ``pnnctl.models.worker_memory_bytes``)
    partition k: 4·(params_k·(2 + optimizer slots) + B·(sum of its layers' output widths + w_in_k)),
    w_in_k the width of the cut feeding it (k > 0: its received or synthetic input). The footprint
    is the largest partition's parameters and the largest partition's memory; every partition and
    the unpartitioned network are in the extras (``params_p{k}``, ``memory_p{k}_bytes``,
    ``params_full``, ``memory_full_bytes``). Measured memory is the trainer's ``peak_rss_bytes``
    (the largest rank in a distributed run); per-rank measurements are not put in the extras because
    the extras must read the same in simulated and distributed runs.

Run it::

    pnnctl train --strategy sil --workers 2 --epochs 13 --set sil.recovery_epochs=3
    pnnctl train --strategy sil --workers 3 --set sil.cuts=[2,4] --set sil.labels=hadamard
    pnnctl train --strategy sil --workers 2 --nproc 2          # one partition per gloo process
    pnnctl compare --config pnnctl/experiments/sil.toml --out results/reference
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from pnnctl.errors import UsageError
from pnnctl.models import (
    ModelSpec,
    StackedLinear,
    StackedNet,
    activation_elements,
    build_model,
    parse_model_spec,
    worker_memory_bytes,
)
from pnnctl.optimizers import Optimizer
from pnnctl.training import evaluate, make_optimizer, stream_seed
from strategies import register
from strategies.base import Footprint, RoundResult, Strategy, StrategyContext

LABEL_KINDS = ("separated", "orthogonal", "hadamard", "gaussian")
APART_LOSSES = ("mse", "sse", "cosine")
#: The paper's network between input and classes: five hidden layers of 512.
PAPER_HIDDEN = (512, 512, 512, 512, 512)

# Salts of the seeded streams, so that batch order, noise and labels never share a stream.
_NOISE_SALT = 1 << 20
_RECOVERY_SALT = 1 << 21
_LABEL_SALT = 1 << 22


@dataclass(frozen=True, kw_only=True)
class SILOptions:
    cuts: tuple[int, ...] = ()
    """hidden layers (1-based, increasing) to cut after; empty: --workers parts of near-equal depth (2: the middle)"""
    labels: str = "separated"
    """synthetic label generator: separated | orthogonal | hadamard | gaussian"""
    min_distance: float = 1.0
    """separated: smallest pairwise distance, in units of the distance of two orthogonal targets"""
    label_scale: float = 1.0
    """per-coordinate RMS of the targets (radius label_scale * sqrt(width))"""
    apart_loss: str = "mse"
    """loss against the cut's targets: mse (mean per coordinate) | sse (summed over coordinates) | cosine (1 - cos)"""
    noise_std: float = 0.1
    """std of the Gaussian noise added to a partition's synthetic inputs in the apart phase"""
    apart_epochs: int = 0
    """epochs of the apart phase (0: --epochs - recovery_epochs; otherwise --epochs must be apart + recovery)"""
    recovery_epochs: int = 1
    """end-to-end epochs after the join, run as a pipeline over the partitions (0 allowed)"""
    recovery_lr: float = 0.0
    """learning rate of the recovery phase (0: --lr)"""
    reset_optimizer: bool = True
    """restart every partition's optimizer state at the join (its moments belong to the apart losses)"""

    def validate(self) -> None:
        if any(c < 1 for c in self.cuts) or any(b <= a for a, b in zip(self.cuts, self.cuts[1:], strict=False)):
            raise UsageError("sil.cuts", f"must be increasing hidden-layer indices >= 1, not {list(self.cuts)}")
        if self.labels not in LABEL_KINDS:
            raise UsageError("sil.labels", f"must be one of {', '.join(LABEL_KINDS)}, not {self.labels!r}")
        if not self.min_distance > 0:
            raise UsageError("sil.min_distance", f"must be > 0, not {self.min_distance}")
        if not self.label_scale > 0:
            raise UsageError("sil.label_scale", f"must be > 0, not {self.label_scale}")
        if self.apart_loss not in APART_LOSSES:
            raise UsageError("sil.apart_loss", f"must be one of {', '.join(APART_LOSSES)}, not {self.apart_loss!r}")
        if self.noise_std < 0:
            raise UsageError("sil.noise_std", f"must be >= 0, not {self.noise_std}")
        if self.apart_epochs < 0:
            raise UsageError("sil.apart_epochs", f"must be >= 0, not {self.apart_epochs}")
        if self.recovery_epochs < 0:
            raise UsageError("sil.recovery_epochs", f"must be >= 0, not {self.recovery_epochs}")
        if self.recovery_lr < 0:
            raise UsageError("sil.recovery_lr", f"must be >= 0 (0: --lr), not {self.recovery_lr}")


# --------------------------------------------------------------------------------------------------
# Synthetic labels


def _separated(n_classes: int, width: int, scale: float, min_distance: float, generator: torch.Generator) -> Tensor:
    radius = scale * math.sqrt(width)
    target = min_distance * radius * math.sqrt(2)
    if n_classes <= width + 1:
        # C points on a sphere can be no farther apart than the vertices of a regular simplex.
        limit = radius * math.sqrt(2 * n_classes / (n_classes - 1))
        if target > limit * (1 - 1e-9):
            best = math.sqrt(n_classes / (n_classes - 1))
            msg = f"must be below {best:.4f} for {n_classes} classes (a regular simplex), not {min_distance}"
            raise UsageError("sil.min_distance", msg)
        goal = min(target * 1.01, (target + limit) / 2)
    else:
        goal = target * 1.01
    points = torch.randn(n_classes, width, generator=generator, dtype=torch.float64)
    points = F.normalize(points, dim=1) * radius
    for _ in range(5000):
        diff = points[:, None, :] - points[None, :, :]
        dist = diff.norm(dim=2).fill_diagonal_(math.inf)
        if float(dist.min()) >= target:
            return points
        # Push every pair closer than the goal apart along its difference, then back onto the sphere.
        deficit = (goal - dist).clamp(min=0)
        points = points + 0.5 * (deficit / dist).unsqueeze(2).mul(diff).sum(dim=1)
        points = F.normalize(points, dim=1) * radius
    msg = f"{n_classes} targets of width {width} could not be pushed {min_distance} apart; lower it"
    raise UsageError("sil.min_distance", msg)


def _hadamard(n: int) -> Tensor:
    matrix = torch.ones(1, 1, dtype=torch.float64)
    while matrix.shape[0] < n:
        matrix = torch.cat([torch.cat([matrix, matrix], 1), torch.cat([matrix, -matrix], 1)], 0)
    return matrix


def synthetic_labels(
    kind: str, n_classes: int, width: int, seed: int, scale: float = 1.0, min_distance: float = 1.0
) -> Tensor:
    """One target per class, ``[n_classes, width]`` float32 on the CPU, a function of ``seed`` alone."""
    generator = torch.Generator().manual_seed(seed)
    if kind == "separated":
        table = _separated(n_classes, width, scale, min_distance, generator)
    elif kind == "orthogonal":
        if n_classes > width:
            raise UsageError("sil.labels", f"orthogonal needs classes <= cut width, not {n_classes} > {width}")
        q, _ = torch.linalg.qr(torch.randn(width, n_classes, generator=generator, dtype=torch.float64))
        table = q.T * (scale * math.sqrt(width))
    elif kind == "hadamard":
        if width & (width - 1):
            raise UsageError("sil.labels", f"hadamard needs a cut width that is a power of two, not {width}")
        if n_classes >= width:
            raise UsageError("sil.labels", f"hadamard needs classes < cut width, not {n_classes} >= {width}")
        # Row 0 is constant; the others are balanced ±1 codes, and permuting columns keeps them so.
        rows = torch.randperm(width - 1, generator=generator)[:n_classes] + 1
        columns = torch.randperm(width, generator=generator)
        table = _hadamard(width)[rows][:, columns] * scale
    elif kind == "gaussian":
        table = torch.randn(n_classes, width, generator=generator, dtype=torch.float64) * scale
    else:
        raise UsageError("sil.labels", f"must be one of {', '.join(LABEL_KINDS)}, not {kind!r}")
    return table.float()


def label_stats(table: Tensor) -> dict[str, float]:
    """Smallest pairwise distance, largest |cosine| between distinct targets, mean norm."""
    t = table.double()
    dist = torch.cdist(t, t).fill_diagonal_(math.inf)
    unit = F.normalize(t, dim=1)
    cos = (unit @ unit.T).abs().fill_diagonal_(0)
    return {"min_dist": float(dist.min()), "max_abs_cos": float(cos.max()), "norm": float(t.norm(dim=1).mean())}


# --------------------------------------------------------------------------------------------------
# Cutting the network


def sil_model_spec(text: str, input_shape: tuple[int, ...], n_classes: int) -> ModelSpec:
    """The ``mlp`` spec SIL cuts; a bare ``mlp`` becomes the paper's six-layer net for this data."""
    spec = parse_model_spec(text)
    if spec.family != "mlp":
        raise UsageError("model", f"sil cuts fully connected networks: use mlp or mlp:IN-...-C, not {text!r}")
    if spec.widths:
        return spec
    widths = (math.prod(input_shape), *PAPER_HIDDEN, n_classes)
    return ModelSpec("mlp", widths, dict(spec.options), "mlp:" + "-".join(map(str, widths)))


def resolve_cuts(cuts: tuple[int, ...], n_linear: int, n_workers: int) -> tuple[int, ...]:
    """Explicit cuts checked against the depth and ``--workers``, or ``n_workers`` near-equal partitions."""
    if cuts:
        if cuts[-1] >= n_linear:
            msg = f"must be hidden layers 1..{n_linear - 1} of this {n_linear}-layer network, not {list(cuts)}"
            raise UsageError("sil.cuts", msg)
        if len(cuts) + 1 != n_workers:
            msg = (f"sil puts one partition on each worker: sil.cuts={list(cuts)} makes {len(cuts) + 1} "
                   f"partitions, so use --workers {len(cuts) + 1}, not {n_workers}")
            raise UsageError("workers", msg)
        return tuple(cuts)
    if n_workers < 2:
        raise UsageError("workers", "sil needs at least 2 partitions, one per worker: use --workers 2 or more")
    if n_workers > n_linear:
        msg = f"this network has {n_linear} linear layers, so at most {n_linear} partitions (workers), not {n_workers}"
        raise UsageError("workers", msg)
    base, extra = divmod(n_linear, n_workers)
    sizes = [base + (1 if k < extra else 0) for k in range(n_workers)]
    return tuple(int(c) for c in np.cumsum(sizes)[:-1])


def partition_ranges(model: StackedNet, cuts: tuple[int, ...]) -> list[tuple[int, int]]:
    """Module index ranges ``[start, end)`` of each partition of ``model`` (cut after a linear layer)."""
    linear = [i for i, m in enumerate(model) if isinstance(m, StackedLinear)]
    bounds = [0, *cuts, len(linear)]
    ranges = []
    for k in range(len(bounds) - 1):
        start = 0 if k == 0 else linear[bounds[k] - 1] + 1
        end = len(model) if k == len(bounds) - 2 else linear[bounds[k + 1] - 1] + 1
        ranges.append((start, end))
    return ranges


def output_widths(layers: list[torch.nn.Module], width: int) -> list[int]:
    """Width of each layer's output in an MLP slice fed ``width`` features (linear layers set it)."""
    out = []
    for layer in layers:
        if isinstance(layer, StackedLinear):
            width = layer.out_features
        out.append(width)  # flatten, batch norm and activations keep the width
    return out


# --------------------------------------------------------------------------------------------------
# Packing per-partition tensors of different shapes into one [n_local, size] block


def _pack(tensors: list[Tensor], size: int) -> Tensor:
    flat = torch.cat([t.detach().reshape(-1).float() for t in tensors]) if tensors else torch.zeros(0)
    return F.pad(flat, (0, size - flat.numel()))


def _unpack(row: Tensor, like: list[Tensor]) -> list[Tensor]:
    out, offset = [], 0
    for t in like:
        out.append(row[offset : offset + t.numel()].reshape(t.shape).to(t.dtype))
        offset += t.numel()
    return out


@register
class SIL(Strategy):
    name = "sil"
    summary = ("partitions of depth trained apart on synthetic intermediate labels (no traffic), "
               "then joined and fine-tuned end to end as a pipeline")
    Options = SILOptions
    uncut_round = "an epoch of sil's schedule"
    published: ClassVar[str] = (
        "Karadağ & Topaloğlu (arXiv 2403.11204), EMNIST, 784-512-512-512-512-512-47 cut in two: accuracy "
        "'close to conventional training' with much less memory and computation per device; no numbers, "
        "label generator, cut or schedule published"
    )

    def unused_settings(self) -> list[tuple[tuple[str, ...], str]]:
        return [(("sharding",), "sil partitions depth, not data: every partition trains on the whole training set")]

    def __init__(self, ctx: StrategyContext, options: SILOptions) -> None:
        super().__init__(ctx, options)
        config, group, data = ctx.config, ctx.group, ctx.data
        self.spec = sil_model_spec(config.model, data.input_shape, data.n_classes)
        widths = self.spec.widths
        n_linear = len(widths) - 1
        self.cuts = resolve_cuts(options.cuts, n_linear, group.n_workers)
        self.n_parts = len(self.cuts) + 1
        self.cut_widths = [widths[c] for c in self.cuts]
        self.apart_epochs, self.recovery_epochs = self._schedule(config.epochs)

        # The full network, initialised as `centralized` would be; each partition is a slice of its
        # layers, so the joined model is the composition by construction. Every rank builds all of
        # it (evaluation needs the whole net) but trains only its own partitions.
        self.full = build_model(self.spec, 1, data.input_shape, data.n_classes, seed=config.seed).to(ctx.device)
        self.ranges = partition_ranges(self.full, self.cuts)
        layers = list(self.full)
        self.parts = [StackedNet(self.spec, 1, *layers[s:e]) for s, e in self.ranges]
        self.local = list(group.local_workers)

        self.labels = [
            synthetic_labels(
                options.labels, data.n_classes, w, stream_seed(config.seed, c, _LABEL_SALT),
                options.label_scale, options.min_distance,
            ).to(ctx.device)
            for c, w in enumerate(self.cut_widths)
        ]
        self.optimizers = {k: self._make_optimizer(k, config.lr) for k in self.local}
        self.pack_size = max(sum(t.numel() for t in p.state_dict().values()) for p in self.parts)
        self.epoch = 0
        self.joined_acc = math.nan
        self.x_test = data.x_test.to(ctx.device)
        self.y_test = data.y_test.to(ctx.device)
        self._memory = self._analytic_memory()
        # Under bf16 autocast (CUDA) the cut activations and their gradients are bf16 on the wire.
        self.wire_dtype = torch.bfloat16 if config.precision == "bf16" else torch.float32

    # -- set-up ---------------------------------------------------------------------------------

    def _schedule(self, epochs: float) -> tuple[int, int]:
        if abs(epochs - round(epochs)) > 1e-9:  # --epochs 2.7 trained 2 and said nothing
            raise UsageError("epochs", f"sil trains whole epochs (apart, then recovery), so it takes a whole number "
                                       f"of them, not {epochs:g}")
        recovery = self.options.recovery_epochs
        apart = self.options.apart_epochs
        if apart == 0:
            apart = math.floor(epochs + 1e-9) - recovery
            if apart < 1:
                msg = f"must be >= sil.recovery_epochs + 1 = {recovery + 1} (sil trains apart for epochs - recovery)"
                raise UsageError("epochs", msg)
        elif abs(epochs - (apart + recovery)) > 1e-9:  # more trained A + R silently: the run ended early
            msg = (f"must be sil.apart_epochs + sil.recovery_epochs = {apart + recovery} (what sil trains), not "
                   f"{epochs:g}; or set sil.apart_epochs = 0 to train --epochs - recovery epochs apart")
            raise UsageError("epochs", msg)
        return apart, recovery

    def _make_optimizer(self, k: int, lr: float) -> Optimizer:
        config = self.ctx.config
        return make_optimizer(config.optimizer, self.parts[k].parameters(), lr, config.momentum, config.weight_decay)

    def _analytic_memory(self) -> dict[str, int]:
        config = self.ctx.config
        batch, widths = config.batch_size, self.spec.widths
        out: dict[str, int] = {}
        for k, (part, (start, end)) in enumerate(zip(self.parts, self.ranges, strict=True)):
            in_width = widths[0] if k == 0 else self.cut_widths[k - 1]
            elements = sum(output_widths(list(self.full)[start:end], in_width))
            if k > 0:
                elements += in_width  # the received (or synthetic) input it must hold for backward
            params = part.worker_parameter_count()
            out[f"params_p{k}"] = params
            out[f"memory_p{k}_bytes"] = worker_memory_bytes(params, elements * batch, config.optimizer, config.momentum)
        params = self.full.worker_parameter_count()
        out["params_full"] = params
        out["memory_full_bytes"] = worker_memory_bytes(
            params, activation_elements(self.full, batch), config.optimizer, config.momentum
        )
        return out

    # -- rounds ---------------------------------------------------------------------------------

    @property
    def joined(self) -> bool:
        return self.epoch >= self.apart_epochs

    def run_round(self, samples_left: float = math.inf) -> RoundResult:
        # A round is one epoch of SIL's schedule (apart epochs, then recovery epochs; ``--epochs`` is
        # checked to hold them whole), so there is no shorter last round: a samples budget ends it
        # after the epoch that reaches it.
        if self.epoch == 0:
            self._record_label_table()
        n_train = len(self.ctx.y_train)
        if not self.joined:
            losses = torch.zeros(len(self.local), 1, dtype=torch.float64)
            for slot, k in enumerate(self.local):
                losses[slot] = self.train_partition_epoch(k)
            everyone = self.ctx.group.all_gather(losses)[:, 0].tolist()
            self.epoch += 1
            phase = "apart"
            if self.joined:
                self._join()
                phase = "joined"
            extras = {f"apart_loss_p{k}": everyone[k] for k in range(self.n_parts - 1)}
            # The reported loss is the last partition's cross-entropy (on synthetic inputs).
            return RoundResult(loss=everyone[-1], samples=n_train, phase=phase, extras=extras)
        loss = self.recovery_epoch()
        self.epoch += 1
        # The recovery pipeline has no micro-batches: one partition computes at a time.
        return RoundResult(loss=loss, samples=n_train, phase="recovery", parallel_workers=1)

    def is_done(self) -> bool:
        return self.epoch >= self.apart_epochs + self.recovery_epochs

    def _order(self, salt: int, worker: int) -> Tensor:
        generator = torch.Generator().manual_seed(stream_seed(self.ctx.config.seed, worker, salt))
        return torch.randperm(len(self.ctx.y_train), generator=generator).to(self.ctx.device)

    def _apart_loss(self, out: Tensor, target: Tensor) -> Tensor:
        if self.options.apart_loss == "cosine":
            return 1 - F.cosine_similarity(out, target, dim=-1).mean()
        if self.options.apart_loss == "sse":
            # Summed over the cut's coordinates: a gradient that does not shrink with the cut's width.
            return (out - target).square().sum(dim=-1).mean()
        return F.mse_loss(out, target)

    def train_partition_epoch(self, k: int) -> float:
        """One apart-phase epoch of partition ``k`` alone; returns its mean loss. Touches nothing else."""
        part, optimizer = self.parts[k], self.optimizers[k]
        x_train, y_train = self.ctx.x_train, self.ctx.y_train
        batch = self.ctx.config.batch_size
        order = self._order(self.epoch, k)
        noise = torch.Generator(device=self.ctx.device)
        noise.manual_seed(stream_seed(self.ctx.config.seed, k, _NOISE_SALT + self.epoch))
        last = k == self.n_parts - 1
        # Summed on the device: float() per step would wait for the GPU at every step.
        total, steps = torch.zeros((), dtype=torch.float64, device=self.ctx.device), 0
        for start in range(0, len(order), batch):
            index = order[start : start + batch]
            y = y_train[index]
            if k == 0:
                inputs = x_train[index]
            else:
                inputs = self.labels[k - 1][y]
                if self.options.noise_std > 0:
                    eps = torch.randn(inputs.shape, generator=noise, device=inputs.device)
                    inputs = inputs + self.options.noise_std * eps
            out = part(inputs.unsqueeze(0))[0]
            loss = F.cross_entropy(out, y) if last else self._apart_loss(out, self.labels[k][y])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach()
            steps += 1
        return float(total) / steps

    def _join(self) -> None:
        if self.options.reset_optimizer:
            self.optimizers = {k: self._make_optimizer(k, self.ctx.config.lr) for k in self.local}
        self._set_lr()
        # Measured once here so that the joined accuracy is known whatever the evaluation cadence.
        _, self.joined_acc = evaluate(self.eval_model(), self.x_test, self.y_test)

    def _set_lr(self) -> None:
        lr = (self.options.recovery_lr or self.ctx.config.lr) if self.joined else self.ctx.config.lr
        for optimizer in self.optimizers.values():
            for group in optimizer.param_groups:
                group["lr"] = lr

    # -- recovery: the pipeline ------------------------------------------------------------------

    def _rank_of(self, worker: int) -> int:
        return int(np.searchsorted(np.cumsum(self.ctx.group.blocks), worker, side="right"))

    def _cross(self, value: Tensor | None, src: int, dst: int, shape: tuple[int, ...]) -> Tensor | None:
        """Hand ``value`` (held by worker ``src``'s rank) to worker ``dst``'s rank; None elsewhere.

        Simulated, or with both workers on one rank, nothing moves. Across ranks it is one
        point-to-point send (``group.send``); the ledger counts the logical message itself (see
        ``_record_pipeline``).
        """
        group = self.ctx.group
        if group.comm.world_size == 1 or self._rank_of(src) == self._rank_of(dst):
            return value
        sent = None if value is None else value.detach().to(self.wire_dtype)
        return group.send(sent, src, dst, shape, self.wire_dtype)

    def pipeline_step(self, x: Tensor, y: Tensor) -> float | None:
        """One end-to-end step on ``x [b, ...]``, partition by partition; the loss on the last one's rank."""
        b = len(y)
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        inputs: dict[int, Tensor] = {}
        outputs: dict[int, Tensor] = {}
        received: Tensor | None = x.unsqueeze(0)
        for k in range(self.n_parts):
            if k in self.local:
                if k > 0:
                    # Each partition's graph ends at its input, as it would on its own machine.
                    received = received.detach().requires_grad_(True)
                inputs[k] = received
                outputs[k] = self.parts[k](received)
            if k < self.n_parts - 1:
                received = self._cross(outputs.get(k), k, k + 1, (1, b, self.cut_widths[k]))
        loss_value = None
        last = self.n_parts - 1
        if last in self.local:
            loss = F.cross_entropy(outputs[last][0], y)
            loss.backward()
            loss_value = float(loss.detach())
        for k in range(self.n_parts - 2, -1, -1):
            grad = inputs[k + 1].grad if k + 1 in self.local else None
            grad = self._cross(grad, k + 1, k, (1, b, self.cut_widths[k]))
            if k in self.local:
                outputs[k].backward(grad)
        for optimizer in self.optimizers.values():
            optimizer.step()
        return loss_value

    def recovery_epoch(self) -> float:
        """One epoch of end-to-end training across the cuts; returns the mean cross-entropy."""
        x_train, y_train = self.ctx.x_train, self.ctx.y_train
        batch = self.ctx.config.batch_size
        order = self._order(_RECOVERY_SALT + self.epoch, 0)
        total, steps = 0.0, 0
        for start in range(0, len(order), batch):
            index = order[start : start + batch]
            loss = self.pipeline_step(x_train[index], y_train[index])
            total += loss if loss is not None else 0.0
            steps += 1
        self._record_pipeline(len(order), steps)
        holder = torch.zeros(len(self.local), 1, dtype=torch.float64)
        if self.n_parts - 1 in self.local:
            holder[self.local.index(self.n_parts - 1)] = total / steps
        return float(self.ctx.group.all_gather(holder)[-1, 0])

    # -- the ledger -----------------------------------------------------------------------------

    def _record_label_table(self) -> None:
        """The master sends worker k the tables of the cuts around it, once, before training."""
        ledger = self.ctx.group.ledger
        sent, recv, messages = ledger.zeros(), ledger.zeros(), ledger.zeros()
        for k in range(self.n_parts):
            tables = [self.labels[c] for c in (k - 1, k) if 0 <= c < self.n_parts - 1]
            recv[k] = sum(t.numel() * t.element_size() for t in tables)
        sent[self.n_parts] = recv[: self.n_parts].sum()
        messages[self.n_parts] = self.n_parts
        self.ctx.group.record_p2p("sil_label_table", sent, recv, messages)

    def _record_pipeline(self, samples: int, steps: int) -> None:
        """Activations forward and gradients backward across every cut: samples x width x 4 bytes each way."""
        ledger = self.ctx.group.ledger
        element = torch.finfo(self.wire_dtype).bits // 8
        for op, forward in (("sil_activations", True), ("sil_gradients", False)):
            sent, recv, messages = ledger.zeros(), ledger.zeros(), ledger.zeros()
            for c, width in enumerate(self.cut_widths):
                src, dst = (c, c + 1) if forward else (c + 1, c)
                size = samples * width * element
                sent[src] += size
                recv[dst] += size
                messages[src] += steps
            self.ctx.group.record_p2p(op, sent, recv, messages)

    # -- evaluation and memory ------------------------------------------------------------------

    def eval_model(self) -> StackedNet:
        group = self.ctx.group
        if group.comm.world_size > 1:
            # Bring the other ranks' partitions into this rank's copy of the full net (bookkeeping only).
            everyone = group.all_gather(self._packed_states())
            for k, part in enumerate(self.parts):
                if k not in self.local:
                    state = part.state_dict()
                    values = _unpack(everyone[k], list(state.values()))
                    part.load_state_dict(dict(zip(state, values, strict=True)))
        return self.full

    def eval_extras(self) -> dict[str, float]:
        extras: dict[str, float] = {"partitions": self.n_parts, "apart_epochs": self.apart_epochs,
                                    "recovery_epochs": self.recovery_epochs, **self._memory}
        extras["memory_max_part_over_full"] = round(
            max(self._memory[f"memory_p{k}_bytes"] for k in range(self.n_parts)) / self._memory["memory_full_bytes"], 6
        )
        for c, table in enumerate(self.labels):
            for key, value in label_stats(table.cpu()).items():
                extras[f"labels_c{c}_{key}"] = round(value, 6)
        if self.joined:
            extras["joined_test_acc"] = self.joined_acc
        return extras

    def artifacts(self) -> dict[str, str]:
        """``sil_labels.json``: the synthetic label table of every cut (one target per class), as drawn."""
        options = self.options
        record = {
            "generator": options.labels,
            "label_scale": options.label_scale,
            "min_distance": options.min_distance if options.labels == "separated" else None,
            "seed": self.ctx.config.seed,
            "cuts": [
                {
                    "after_hidden_layer": cut,
                    "width": width,
                    **{key: round(value, 9) for key, value in label_stats(table.cpu()).items()},
                    # float32 values written as doubles: reading them back as float32 is exact.
                    "targets": table.cpu().double().tolist(),
                }
                for cut, width, table in zip(self.cuts, self.cut_widths, self.labels, strict=True)
            ],
        }
        return {"sil_labels.json": json.dumps(record) + "\n"}

    def footprint(self) -> Footprint:
        params = max(self._memory[f"params_p{k}"] for k in range(self.n_parts))
        memory = max(self._memory[f"memory_p{k}_bytes"] for k in range(self.n_parts))
        return Footprint(params, memory)

    # -- checkpoints ----------------------------------------------------------------------------

    def _packed_states(self) -> Tensor:
        rows = [_pack(list(self.parts[k].state_dict().values()), self.pack_size) for k in self.local]
        return torch.stack(rows)

    def _optimizer_blocks(self) -> tuple[dict[str, Tensor], list[str]]:
        """Each optimizer state key as ``[n_local, size]``: elementwise ones packed like the
        parameters, per-parameter scalars (Adam's step) as one value per parameter."""
        per_key: dict[str, list[Tensor]] = {}
        scalar_keys: set[str] = set()
        for k in self.local:
            optimizer = self.optimizers[k]
            params = list(self.parts[k].parameters())
            columns: dict[str, list[Tensor]] = {}
            for p in params:
                for key, value in optimizer.state.get(p, {}).items():
                    if not isinstance(value, Tensor):
                        continue
                    if value.shape != p.shape:
                        scalar_keys.add(key)
                    columns.setdefault(key, []).append(value)
            for key, values in columns.items():
                per_key.setdefault(key, []).append(values)
        most_params = max(len(list(p.parameters())) for p in self.parts)
        blocks = {}
        for key, rows in per_key.items():
            size = most_params if key in scalar_keys else self.pack_size
            blocks[key] = torch.stack([_pack(values, size) for values in rows])
        return blocks, sorted(scalar_keys)

    def state_dict(self) -> dict[str, Any]:
        blocks, scalar_keys = self._optimizer_blocks()
        return {
            "epoch": self.epoch,
            "schedule": [self.apart_epochs, self.recovery_epochs],
            "joined_acc": self.joined_acc,
            "labels": [t.cpu() for t in self.labels],
            "params": self._packed_states().cpu(),
            "optimizer": {k: v.cpu() for k, v in blocks.items()},
            "optimizer_scalar_keys": scalar_keys,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.apart_epochs, self.recovery_epochs = (int(v) for v in state["schedule"])
        self.joined_acc = float(state["joined_acc"])
        self.labels = [t.to(self.ctx.device) for t in state["labels"]]
        scalar_keys = set(state["optimizer_scalar_keys"])
        for slot, k in enumerate(self.local):
            part = self.parts[k]
            current = part.state_dict()
            values = _unpack(state["params"][slot].to(self.ctx.device), list(current.values()))
            part.load_state_dict(dict(zip(current, values, strict=True)))
            optimizer = self.optimizers[k]
            params = list(part.parameters())
            per_param: dict[int, dict[str, Tensor]] = {i: {} for i in range(len(params))}
            for key, block in state["optimizer"].items():
                row = block[slot]
                if key in scalar_keys:
                    for i in range(len(params)):
                        per_param[i][key] = row[i].clone()
                else:
                    for i, value in enumerate(_unpack(row.to(self.ctx.device), params)):
                        per_param[i][key] = value.detach().clone()
            saved = {"state": {i: s for i, s in per_param.items() if s},
                     "param_groups": optimizer.state_dict()["param_groups"]}
            optimizer.load_state_dict(saved)
        self._set_lr()
