"""Pieces every strategy trains with: per-worker batch streams, optimizers, the stacked loss."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor
from torch.nn import functional as F

from pnnctl.models import StackedNet
from pnnctl.optimizers import FUSED_KINDS, FusedOptimizer, Optimizer, fused_kernels_take

_MIX_A = 1_000_003
_MIX_B = 1_000_033
_MASK = (1 << 62) - 1


def stream_seed(seed: int, worker: int, salt: int = 0) -> int:
    """A seed keyed by the run seed and the *logical* worker index, never by rank or start order."""
    return ((seed * _MIX_A + worker) * _MIX_B + salt) & _MASK


class ShardSampler:
    """Endless shuffled batches from each worker's shard; the state is one position per worker.

    Worker w reads its shard in passes; pass k is ordered by a permutation seeded by
    ``(seed, w, k)`` alone, so a batch depends only on (seed, worker, position): resuming or
    re-partitioning workers over processes gives the same batches.
    """

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        shards: list[Tensor],
        workers: Iterable[int],
        batch_size: int,
        seed: int,
    ) -> None:
        self.x, self.y = x, y
        self.workers = list(workers)
        self.shards = [shards[w].to(x.device) for w in self.workers]
        self.batch_size = batch_size
        self.seed = seed
        self.positions = [0] * len(self.workers)
        self._perm_cache: dict[int, tuple[int, Tensor]] = {}

    def _pass_order(self, slot: int, pass_index: int) -> Tensor:
        cached = self._perm_cache.get(slot)
        if cached is not None and cached[0] == pass_index:
            return cached[1]
        shard = self.shards[slot]
        generator = torch.Generator().manual_seed(stream_seed(self.seed, self.workers[slot], pass_index))
        order = shard[torch.randperm(len(shard), generator=generator).to(shard.device)]
        self._perm_cache[slot] = (pass_index, order)
        return order

    def _indices(self, slot: int, count: int) -> Tensor:
        length = len(self.shards[slot])
        pieces = []
        position = self.positions[slot]
        while count > 0:
            pass_index, offset = divmod(position, length)
            take = min(count, length - offset)
            pieces.append(self._pass_order(slot, pass_index)[offset : offset + take])
            position += take
            count -= take
        self.positions[slot] = position
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def next_indices(self) -> Tensor:
        """``[n_local, batch]`` training-set indices of the next step, advancing every worker."""
        return torch.stack([self._indices(slot, self.batch_size) for slot in range(len(self.workers))])

    def next_batch(self) -> tuple[Tensor, Tensor]:
        """``x [n_local, B, ...]`` and ``y [n_local, B]`` for the next step."""
        index = self.next_indices()
        return self.x[index], self.y[index]

    def state_dict(self) -> dict:
        return {"positions": list(self.positions)}

    def load_state_dict(self, state: dict) -> None:
        self.positions = [int(p) for p in state["positions"]]
        self._perm_cache.clear()


class GradientBuffer:
    """Gradients of stacked parameters kept as views into one flat buffer, so a gradient all-reduce
    runs in place on it (no concatenation before, no copy back after), as DDP's bucket views do.

    The buffer holds, parameter after parameter, each one's ``[n_local, size]`` block.
    """

    def __init__(self, params: list[Tensor]) -> None:
        self.params = params
        self.sizes = [p[0].numel() for p in params]
        self.flat = torch.zeros(sum(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device)
        self.attach()

    def attach(self) -> None:
        offset = 0
        for p in self.params:
            p.grad = self.flat[offset : offset + p.numel()].view_as(p)
            offset += p.numel()

    def zero_(self) -> None:
        self.flat.zero_()


def make_optimizer(
    name: str, params: Iterable[Tensor], lr: float, momentum: float = 0.0, weight_decay: float = 0.0
) -> Optimizer:
    """SGD, Adam or AdamW. All are elementwise, so on stacked parameters each worker's slice
    evolves exactly as with its own optimizer."""
    params = list(params)
    # The fused kernels update a tensor in one pass where the default makes one per term: Adam's
    # step on the 1.5M-parameter overhead-benchmark MLP took 4.4 ms of a 12.8 ms step, fused 1.5 ms.
    # FusedOptimizer runs them without torch.optim, whose first use imports torch._dynamo (1.4-2 s).
    if name not in FUSED_KINDS:
        raise ValueError(f"unknown optimizer {name!r}")
    if fused_kernels_take(params):
        return FusedOptimizer(name, params, lr, momentum, weight_decay)
    if name == "sgd":  # elsewhere (MPS, ...) torch.optim's default implementation
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    adam = torch.optim.Adam if name == "adam" else torch.optim.AdamW
    return adam(params, lr=lr, weight_decay=weight_decay)


@contextlib.contextmanager
def precision_context(device: torch.device, precision: str) -> Iterator[None]:
    """What a round (or an evaluation) runs under; a new one each time, restoring what it changed.

    ``fp32`` and ``bf16`` set CUDA's fp32 matmuls and convolutions to IEEE fp32 (cuDNN's default
    lets convolutions use TF32 on Ampere and later, so "fp32" conv runs were TF32), ``tf32`` to TF32;
    a tf32 run used to switch TF32 on for the rest of the process, every later run of a compare too.
    ``bf16`` adds autocast with its cast cache off: a round holds many optimizer steps, and autocast
    keeps the bf16 copy of a leaf parameter until its region ends, so every step after the first
    computed with the first step's weights (local-sgd on digits fell to 17% where fp32 reaches 86%).
    The models use each weight once per forward, so the cache saved no casts here.
    """
    with _tf32(precision == "tf32"):
        if precision == "bf16":
            with torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False):
                yield
        else:
            yield


@contextlib.contextmanager
def _tf32(allowed: bool) -> Iterator[None]:
    """CUDA's fp32 matmuls and cuDNN's convolutions in TF32 or in IEEE fp32, restored after.

    torch keeps two sets of flags, the legacy ``allow_tf32`` ones and the ``fp32_precision`` ones, and
    checks that they agree where it reads them (``allowTF32CuBLAS``: "you have used mix of the legacy
    and new APIs"). Setting only the new ones, as pnnctl did, left tf32 runs in that mixed state, which
    the legacy getters refuse and which cuBLAS's TF32 check, where a torch build makes it, would refuse
    on every matmul. The legacy setters keep both sets in step; then the precisions are set to
    ``ieee`` by name, as cuDNN's legacy "off" leaves them to a process-wide default.
    """
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    legacy_before = matmul.allow_tf32, cudnn.allow_tf32
    precisions_before = matmul.fp32_precision, cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision
    matmul.allow_tf32 = cudnn.allow_tf32 = allowed
    if not allowed:
        cudnn.conv.fp32_precision = cudnn.rnn.fp32_precision = "ieee"
    try:
        yield
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = legacy_before
        matmul.fp32_precision, cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision = precisions_before


def stacked_cross_entropy(logits: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Sum over workers of each worker's mean cross-entropy, and the per-worker means.

    Backpropagating the sum gives each worker's slice the gradient of its own mean loss.
    """
    n, b = y.shape
    per_sample = F.cross_entropy(logits.reshape(n * b, -1), y.reshape(-1), reduction="none")
    per_worker = per_sample.reshape(n, b).mean(dim=1)
    return per_worker.sum(), per_worker.detach()


def model_is_finite(model: StackedNet) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


@torch.no_grad()
def evaluate(model: StackedNet, x: Tensor, y: Tensor, chunk: int = 1000) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of worker 0 of ``model`` on (x, y)."""
    was_training = model.training
    model.eval()
    total_loss, correct = 0.0, 0
    for start in range(0, len(x), chunk):
        xb, yb = x[start : start + chunk].unsqueeze(0), y[start : start + chunk]
        logits = model(xb)[0].float()
        total_loss += float(F.cross_entropy(logits, yb, reduction="sum"))
        correct += int((logits.argmax(dim=1) == yb).sum())
    model.train(was_training)
    return total_loss / len(x), correct / len(x)
