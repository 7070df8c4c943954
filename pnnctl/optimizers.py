"""SGD, Adam and AdamW on torch's fused kernels, without torch.optim's import of the compiler.

torch.optim wraps an optimizer's entry points (``add_param_group``, ``step``, ``state_dict``...) in a
lazy ``import torch._dynamo``, so the first optimizer a process builds imports torch's compiler
stack: 1.4-2.0 s on a 2-core VM, as long again as ``import torch``. pnnctl compiles nothing, yet
every run, every ``--nproc`` rank and every CLI call in the tests paid it. :class:`FusedOptimizer`
calls the same fused kernels (``torch._fused_sgd_``, ``torch._fused_adam_``, ``torch._fused_adamw_``)
with the arguments ``torch.optim.SGD/Adam/AdamW(fused=True)`` hands them, in the same order, so its
updates are bit-identical to theirs, and its ``state_dict`` has their layout: a checkpoint written
through either loads into the other.

It covers what the strategies use of ``torch.optim.Optimizer``: ``param_groups`` (whose ``lr`` may
be set), ``state``, ``zero_grad``, ``step``, ``state_dict`` and ``load_state_dict``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

#: torch.optim's hyperparameters for each kind, in their order (state_dict's ``param_groups`` keys).
_SGD_DEFAULTS = {"momentum": 0.0, "dampening": 0, "weight_decay": 0.0, "nesterov": False, "maximize": False,
                 "foreach": None, "differentiable": False, "fused": True}  # fmt: skip
_ADAM_DEFAULTS = {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "amsgrad": False, "maximize": False,
                  "foreach": None, "capturable": False, "differentiable": False, "fused": True}  # fmt: skip
FUSED_KINDS = ("sgd", "adam", "adamw")


def fused_kernels_take(params: list[Tensor]) -> bool:
    """Whether the fused kernels run on these parameters (floating point, on the CPU or CUDA)."""
    return bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)


class FusedOptimizer:
    """One parameter group updated by torch's fused SGD, Adam or AdamW kernel (see the module docstring)."""

    def __init__(self, kind: str, params: Iterable[Tensor], lr: float, momentum: float = 0.0,
                 weight_decay: float = 0.0) -> None:  # fmt: skip
        params = list(params)
        if kind not in FUSED_KINDS:
            raise ValueError(f"unknown optimizer {kind!r}")
        if not fused_kernels_take(params):
            raise ValueError("the fused kernels take floating-point parameters on the CPU or CUDA")
        self.kind = kind
        if kind == "sgd":
            hyper = {**_SGD_DEFAULTS, "momentum": momentum, "weight_decay": weight_decay}
        else:
            hyper = {**_ADAM_DEFAULTS, "weight_decay": weight_decay, "decoupled_weight_decay": kind == "adamw"}
        self.param_groups: list[dict[str, Any]] = [{"params": params, "lr": lr, **hyper}]
        self.state: defaultdict[Tensor, dict[str, Any]] = defaultdict(dict)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.detach_()
                    p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError("the fused optimizers take dense gradients only")
            update = self._sgd if self.kind == "sgd" else self._adam
            for members in _by_device_and_dtype(params).values():
                update(group, members)

    def _sgd(self, group: dict[str, Any], params: list[Tensor]) -> None:
        momentum = group["momentum"]
        buffers: list[Tensor] = []
        first_step = False
        if momentum != 0:
            stored = [self.state[p].get("momentum_buffer") for p in params]
            # As torch.optim: the first step (no buffer yet) has the kernel fill fresh buffers with the gradient.
            first_step = all(b is None for b in stored)
            buffers = [torch.empty_like(p.grad) for p in params] if first_step else stored
            if any(b is None for b in buffers):
                raise RuntimeError("SGD momentum buffers exist for some parameters only")
        torch._fused_sgd_(
            params, [p.grad for p in params], buffers, weight_decay=group["weight_decay"], momentum=momentum,
            lr=group["lr"], dampening=group["dampening"], nesterov=group["nesterov"], maximize=group["maximize"],
            is_first_step=first_step, grad_scale=None, found_inf=None,
        )  # fmt: skip
        if momentum != 0:
            for p, buffer in zip(params, buffers, strict=True):
                self.state[p]["momentum_buffer"] = buffer

    def _adam(self, group: dict[str, Any], params: list[Tensor]) -> None:
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        states = [self.state[p] for p in params]
        steps = [s["step"] for s in states]
        torch._foreach_add_(steps, 1)
        kernel = torch._fused_adamw_ if group["decoupled_weight_decay"] else torch._fused_adam_
        beta1, beta2 = group["betas"]
        kernel(
            params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [],
            steps, amsgrad=False, lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
            eps=group["eps"], maximize=group["maximize"], grad_scale=None, found_inf=None,
        )  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's layout: state by parameter index, hyperparameters with the indices of their params."""
        index = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [index[id(p)] for p in g["params"]]}
                  for g in self.param_groups]  # fmt: skip
        return {"state": {index[id(p)]: s for p, s in self.state.items()}, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """A state from :meth:`state_dict` or from torch.optim's optimizer of the same kind; tensors are
        moved to their parameter's device (and floating dtype) as torch.optim does, the step stays fp32."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups) or any(
            len(s["params"]) != len(g["params"]) for s, g in zip(saved_groups, self.param_groups, strict=True)
        ):
            raise ValueError("the saved optimizer state holds other parameters than this optimizer")
        by_index = {
            i: p
            for s, g in zip(saved_groups, self.param_groups, strict=True)
            for i, p in zip(s["params"], g["params"], strict=True)
        }
        self.state = defaultdict(dict)
        for i, saved in state_dict["state"].items():
            if i in by_index:
                p = by_index[i]
                self.state[p] = {key: _placed(key, value, p) for key, value in saved.items()}
        self.param_groups = [
            {**{k: v for k, v in s.items() if k != "params"}, "params": g["params"]}
            for s, g in zip(saved_groups, self.param_groups, strict=True)
        ]


def _placed(key: str, value: Any, param: Tensor) -> Any:
    if not isinstance(value, Tensor):
        return value
    if key == "step":
        return value.to(dtype=torch.float32, device=param.device)
    return value.to(dtype=param.dtype, device=param.device)


def _by_device_and_dtype(params: list[Tensor]) -> dict[tuple[torch.device, torch.dtype], list[Tensor]]:
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for p in params:
        groups.setdefault((p.device, p.dtype), []).append(p)
    return groups


#: What make_optimizer returns: the fused kernels where they run, torch.optim elsewhere (e.g. MPS).
Optimizer = FusedOptimizer | torch.optim.Optimizer
