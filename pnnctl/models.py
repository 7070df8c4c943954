"""Models whose parameters carry a leading worker dimension.

Every layer here takes activations shaped ``[N, B, ...]`` (N workers, B samples each) and holds its
parameters as ``[N, ...]``, so N same-shaped workers train in one batched kernel instead of a Python
loop over N modules. Linear weights are laid out ``[N, in, out]``: ``bmm(x[N,B,in], W[N,in,out])``
needs no transpose, which measured about 3x faster on CPU than ``[N, out, in]``. Convolutions of N
workers run as one grouped convolution (``groups=N``). A single model is the case N = 1.

Spec strings (``pnnctl list`` shows them)::

    mlp:784-512-512-10                     full widths: input, hidden..., classes
    mlp:*-512-512-*                        '*' first/last: input size and classes from the data
    mlp:784-512-512-10,act=tanh,bn=batch   options: act=relu|tanh|sigmoid|gelu,
                                           bn=none|batch|running (batch: batch statistics only),
                                           bias=true|false, out_bn=true|false (affine-free BN on logits)
    mlp                                    input and classes from the dataset, hidden 256-256
    lenet[,act=relu|sigmoid,pool=max|avg]  conv(5x5, 6) - pool - conv(5x5, 16) - pool - 120 - 84 - classes
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from pnnctl.errors import UsageError

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
}


def _uniform(shape: tuple[int, ...], bound: float, generator: torch.Generator) -> Tensor:
    return (torch.rand(shape, generator=generator) * 2 - 1) * bound


class StackedLinear(nn.Module):
    """N independent dense layers: ``y[n] = x[n] @ W[n] + b[n]`` for x ``[N, B, in]``."""

    def __init__(self, n_workers: int, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(n_workers, in_features, out_features))
        self.bias = nn.Parameter(torch.empty(n_workers, 1, out_features)) if bias else None

    def reset_parameters(self, generator: torch.Generator) -> None:
        # PyTorch's default for nn.Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias.
        bound = 1 / math.sqrt(self.in_features)
        with torch.no_grad():
            self.weight.copy_(_uniform(self.weight.shape, bound, generator))
            if self.bias is not None:
                self.bias.copy_(_uniform(self.bias.shape, bound, generator))

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[0] == 1:
            # One worker: a plain GEMM (CPU bmm with a batch of one measured about 2x slower than addmm).
            # squeeze/view rather than [0]: select's backward allocates and fills a zero tensor.
            weight = self.weight.view(self.in_features, self.out_features)
            if self.bias is None:
                return torch.mm(x.squeeze(0), weight).unsqueeze(0)
            return torch.addmm(self.bias.view(self.out_features), x.squeeze(0), weight).unsqueeze(0)
        if self.bias is None:
            return torch.bmm(x, self.weight)
        return torch.baddbmm(self.bias, x, self.weight)


class StackedConv2d(nn.Module):
    """N independent 2-D convolutions run as one grouped convolution; x is ``[N, B, C, H, W]``."""

    def __init__(self, n_workers: int, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.weight = nn.Parameter(torch.empty(n_workers, out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(n_workers, out_channels))

    def reset_parameters(self, generator: torch.Generator) -> None:
        bound = 1 / math.sqrt(self.in_channels * self.kernel_size**2)
        with torch.no_grad():
            self.weight.copy_(_uniform(self.weight.shape, bound, generator))
            self.bias.copy_(_uniform(self.bias.shape, bound, generator))

    def forward(self, x: Tensor) -> Tensor:
        n, b, c, h, w = x.shape
        grouped = x.transpose(0, 1).reshape(b, n * c, h, w)
        y = F.conv2d(
            grouped,
            self.weight.reshape(n * self.out_channels, c, self.kernel_size, self.kernel_size),
            self.bias.reshape(-1),
            groups=n,
        )
        return y.reshape(b, n, self.out_channels, *y.shape[-2:]).transpose(0, 1)


class StackedBatchNorm(nn.Module):
    """Batch norm per worker over its own batch (and spatial positions), features on dim 2.

    ``track_running_stats=False`` normalises with batch statistics in evaluation too, as in the
    IST authors' model; ``affine=False`` is their last layer on the logits.
    """

    def __init__(
        self,
        n_workers: int,
        num_features: int,
        affine: bool = True,
        track_running_stats: bool = True,
        momentum: float = 0.1,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.num_features, self.momentum, self.eps = num_features, momentum, eps
        self.weight = nn.Parameter(torch.ones(n_workers, num_features)) if affine else None
        self.bias = nn.Parameter(torch.zeros(n_workers, num_features)) if affine else None
        self.track_running_stats = track_running_stats
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(n_workers, num_features))
            self.register_buffer("running_var", torch.ones(n_workers, num_features))

    def reset_parameters(self, generator: torch.Generator) -> None:
        with torch.no_grad():
            if self.weight is not None:
                self.weight.fill_(1.0)
                self.bias.zero_()
            if self.track_running_stats:
                self.running_mean.zero_()
                self.running_var.fill_(1.0)

    def forward(self, x: Tensor) -> Tensor:
        # Under bf16 autocast x arrives in bf16: statistics over a batch in bf16 keep 2-3 digits, and
        # lerp_ into the fp32 running buffers refuses a bf16 end. Normalise in fp32 (a no-op in fp32).
        x = x.float()
        # Reduce over batch and spatial dims, keep worker (0) and feature (2) dims.
        reduce_dims = [1, *range(3, x.dim())]
        view = (x.shape[0], 1, x.shape[2]) + (1,) * (x.dim() - 3)
        if self.training or not self.track_running_stats:
            mean = x.mean(dim=reduce_dims, keepdim=True)
            var = x.var(dim=reduce_dims, keepdim=True, unbiased=False)
            if self.training and self.track_running_stats:
                count = x.numel() / (x.shape[0] * x.shape[2])
                with torch.no_grad():
                    unbiased = var.reshape(x.shape[0], -1) * count / max(count - 1, 1)
                    self.running_mean.lerp_(mean.reshape(x.shape[0], -1), self.momentum)
                    self.running_var.lerp_(unbiased, self.momentum)
        else:
            mean = self.running_mean.reshape(view)
            var = self.running_var.reshape(view)
        y = (x - mean) * torch.rsqrt(var + self.eps)
        if self.weight is not None:
            y = y * self.weight.reshape(view) + self.bias.reshape(view)
        return y


class StackedPool2d(nn.Module):
    def __init__(self, kind: str, size: int = 2) -> None:
        super().__init__()
        self.kind, self.size = kind, size

    def forward(self, x: Tensor) -> Tensor:
        n, b = x.shape[:2]
        pool = F.avg_pool2d if self.kind == "avg" else F.max_pool2d
        y = pool(x.reshape(n * b, *x.shape[2:]), self.size)
        return y.reshape(n, b, *y.shape[1:])


class StackedFlatten(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], x.shape[1], -1)


class StackedNet(nn.Sequential):
    """A sequence of stacked layers; knows its worker count, the spec it was built from and the data
    shape it fits (None for a slice of a network, such as one of SIL's partitions)."""

    def __init__(
        self,
        spec: ModelSpec,
        n_workers: int,
        *layers: nn.Module,
        input_shape: tuple[int, ...] | None = None,
        n_classes: int | None = None,
    ) -> None:
        super().__init__(*layers)
        self.spec = spec
        self.n_workers = n_workers
        self.input_shape = input_shape
        self.n_classes = n_classes

    def reset_parameters(self, generator: torch.Generator) -> None:
        for module in self.modules():
            if module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters(generator)

    def worker_parameter_count(self) -> int:
        """Parameters of one worker's copy."""
        return sum(p[0].numel() for p in self.parameters())


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model spec. ``widths`` include input and output for MLPs; empty means 'from the data'."""

    family: str
    widths: tuple[int, ...] = ()
    options: dict[str, str] = field(default_factory=dict)
    text: str = ""

    def option(self, key: str, default: str) -> str:
        return self.options.get(key, default)


@dataclass(frozen=True)
class ModelFamily:
    description: str
    options: dict[str, tuple[str, ...]]  # option -> allowed values (empty tuple: free text)
    build: Callable[[ModelSpec, int, tuple[int, ...], int], StackedNet]


MODEL_FAMILIES: dict[str, ModelFamily] = {}

#: A width written '*' in a spec: the data's input size (first) or class count (last).
AUTO_WIDTH = -1


def register_model_family(name: str, family: ModelFamily) -> None:
    if name in MODEL_FAMILIES:
        raise ValueError(f"model family {name!r} is already registered")
    MODEL_FAMILIES[name] = family


def parse_model_spec(text: str) -> ModelSpec:
    """``family[:w1-w2-...][,key=value...]`` -> ModelSpec, with one-line errors naming ``model``."""
    text = text.strip()
    head, *option_parts = text.split(",")
    family, _, width_text = head.partition(":")
    if family not in MODEL_FAMILIES:
        raise UsageError("model", f"unknown model family {family!r}; choose one of: {', '.join(MODEL_FAMILIES)}")
    widths: tuple[int, ...] = ()
    if width_text:
        parts = width_text.split("-")
        # '*' as the first or last width means "from the data", so one spec fits several datasets.
        try:
            widths = tuple(
                AUTO_WIDTH if part == "*" and index in (0, len(parts) - 1) else int(part)
                for index, part in enumerate(parts)
            )
        except ValueError:
            msg = f"widths in {text!r} must be integers joined by '-' ('*' first or last)"
            raise UsageError("model", msg) from None
        if any(w <= 0 and w != AUTO_WIDTH for w in widths):
            raise UsageError("model", f"widths in {text!r} must be positive")
    options: dict[str, str] = {}
    allowed = MODEL_FAMILIES[family].options
    for part in option_parts:
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or key not in allowed:
            raise UsageError("model", f"unknown option {part!r} for {family}; allowed: {', '.join(allowed) or 'none'}")
        if allowed[key] and value not in allowed[key]:
            raise UsageError("model", f"{family} option {key} must be one of {', '.join(allowed[key])}, not {value!r}")
        options[key] = value
    return ModelSpec(family, widths, options, text)


def build_model(
    spec: ModelSpec | str,
    n_workers: int,
    input_shape: tuple[int, ...],
    n_classes: int,
    seed: int,
    identical: bool = True,
) -> StackedNet:
    """Build N workers' copies of a model. ``identical`` gives every worker the same initial weights."""
    if isinstance(spec, str):
        spec = parse_model_spec(spec)
    model = MODEL_FAMILIES[spec.family].build(spec, n_workers if not identical else 1, input_shape, n_classes)
    model.reset_parameters(torch.Generator().manual_seed(seed))
    if identical and n_workers != 1:
        model = replicate(model, n_workers)
    return model


def rebuild(model: StackedNet, n_workers: int) -> StackedNet:
    """An uninitialised model of the same spec and shapes with another worker count."""
    family = MODEL_FAMILIES[model.spec.family]
    return family.build(model.spec, n_workers, model.input_shape, model.n_classes)


def replicate(model: StackedNet, n_workers: int) -> StackedNet:
    """Copy worker 0 of ``model`` into every worker of a new model with ``n_workers`` workers."""
    return select_workers(model, torch.zeros(n_workers, dtype=torch.long))


def select_workers(model: StackedNet, index: Tensor) -> StackedNet:
    """A new model holding the listed workers' copies (parameters and buffers) of ``model``."""
    out = rebuild(model, len(index)).to(next(model.parameters()).device)
    source = model.state_dict()
    index = index.to(next(model.parameters()).device)
    out.load_state_dict({name: t.index_select(0, index) for name, t in source.items()})
    return out


def _mlp_build(spec: ModelSpec, n: int, input_shape: tuple[int, ...], n_classes: int) -> StackedNet:
    input_dim = math.prod(input_shape)
    widths = spec.widths or (input_dim, 256, 256, n_classes)
    if len(widths) >= 2:
        first = input_dim if widths[0] == AUTO_WIDTH else widths[0]
        last = n_classes if widths[-1] == AUTO_WIDTH else widths[-1]
        widths = (first, *widths[1:-1], last)
    if len(widths) < 2:
        msg = f"{spec.text!r} needs at least input and output widths, such as mlp:{input_dim}-{n_classes}"
        raise UsageError("model", msg)
    if widths[0] != input_dim or widths[-1] != n_classes:
        expected = f"mlp:{input_dim}-...-{n_classes}"
        msg = f"{spec.text!r} does not fit the data ({input_dim} inputs, {n_classes} classes); use {expected}"
        raise UsageError("model", msg)
    act = spec.option("act", "relu")
    bn = spec.option("bn", "none")
    bias = spec.option("bias", "true") == "true"
    layers: list[nn.Module] = [StackedFlatten()]
    for i, (w_in, w_out) in enumerate(itertools.pairwise(widths)):
        layers.append(StackedLinear(n, w_in, w_out, bias=bias))
        if i < len(widths) - 2:
            if bn != "none":
                layers.append(StackedBatchNorm(n, w_out, track_running_stats=bn == "running"))
            layers.append(ACTIVATIONS[act]())
    if spec.option("out_bn", "false") == "true":
        layers.append(StackedBatchNorm(n, n_classes, affine=False, track_running_stats=False))
    return StackedNet(spec, n, *layers, input_shape=input_shape, n_classes=n_classes)


def _lenet_build(spec: ModelSpec, n: int, input_shape: tuple[int, ...], n_classes: int) -> StackedNet:
    if len(input_shape) != 3 or min(input_shape[1:]) < 16:
        raise UsageError("model", f"lenet needs images of at least 16x16 pixels, the data is {input_shape}; use an mlp")
    if spec.widths:
        raise UsageError("model", "lenet takes no widths; use options act= and pool=")
    channels, height, width = input_shape
    act = ACTIVATIONS[spec.option("act", "relu")]
    pool = spec.option("pool", "max")
    # Two valid 5x5 convolutions, each followed by 2x2 pooling.
    out_h = ((height - 4) // 2 - 4) // 2
    out_w = ((width - 4) // 2 - 4) // 2
    return StackedNet(
        spec,
        n,
        StackedConv2d(n, channels, 6, 5),
        act(),
        StackedPool2d(pool),
        StackedConv2d(n, 6, 16, 5),
        act(),
        StackedPool2d(pool),
        StackedFlatten(),
        StackedLinear(n, 16 * out_h * out_w, 120),
        act(),
        StackedLinear(n, 120, 84),
        act(),
        StackedLinear(n, 84, n_classes),
        input_shape=input_shape,
        n_classes=n_classes,
    )


register_model_family(
    "mlp",
    ModelFamily(
        "fully connected: mlp:IN-H1-...-CLASSES ('*' for IN or CLASSES: from the data; plain mlp: hidden 256-256),"
        " act=, bn=none|batch|running, bias=, out_bn=",
        {
            "act": tuple(ACTIVATIONS),
            "bn": ("none", "batch", "running"),
            "bias": ("true", "false"),
            "out_bn": ("true", "false"),
        },
        _mlp_build,
    ),
)
register_model_family(
    "lenet",
    ModelFamily(
        "LeNet-5 style: two 5x5 convs with pooling, then 120-84-classes (images >= 16x16)",
        {"act": tuple(ACTIVATIONS), "pool": ("max", "avg")},
        _lenet_build,
    ),
)


def activation_elements(model: StackedNet, batch_size: int) -> int:
    """Activation elements one worker keeps for backward at this batch size (outputs of every layer)."""
    probe = rebuild(model, 1)
    total = 0

    def count(_module: nn.Module, _inputs: tuple, output: Tensor) -> None:
        nonlocal total
        total += output[0].numel()

    hooks = [layer.register_forward_hook(count) for layer in probe]
    with torch.no_grad():
        probe.reset_parameters(torch.Generator().manual_seed(0))
        probe.eval()
        probe(torch.zeros(1, 1, *model.input_shape))
    for hook in hooks:
        hook.remove()
    return total * batch_size


def optimizer_slots(optimizer: str, momentum: float) -> int:
    """Tensors of optimizer state per parameter: Adam keeps two moments, SGD with momentum one."""
    if optimizer in ("adam", "adamw"):
        return 2
    return 1 if momentum > 0 else 0


def worker_memory_bytes(
    params: int, activations: int, optimizer: str, momentum: float, bytes_per_element: int = 4
) -> int:
    """Analytic training memory of one worker: parameters + gradients + optimizer state + activations."""
    slots = optimizer_slots(optimizer, momentum)
    return bytes_per_element * (params * (2 + slots) + activations)
