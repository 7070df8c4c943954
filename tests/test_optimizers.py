"""pnnctl.optimizers: torch's fused SGD/Adam/AdamW kernels without torch.optim, bit for bit as torch.optim."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

from pnnctl.optimizers import FusedOptimizer
from pnnctl.training import make_optimizer

# (kind, lr, momentum, weight_decay)
SETTINGS = [("sgd", 0.1, 0.0, 0.0), ("sgd", 0.1, 0.9, 1e-3), ("adam", 0.01, 0.0, 0.0), ("adam", 0.01, 0.0, 1e-2),
            ("adamw", 0.01, 0.0, 1e-2)]  # fmt: skip


def torch_optimizer(kind: str, params: list[torch.Tensor], lr: float, momentum: float, weight_decay: float):
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, fused=True)
    cls = torch.optim.Adam if kind == "adam" else torch.optim.AdamW
    return cls(params, lr=lr, weight_decay=weight_decay, fused=True)


#: The CUDA kernels are other code than the CPU ones: compared where a GPU is present, skipped elsewhere.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


def twin_params(seed: int = 0, device: str = "cpu") -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    first = [torch.randn(shape, generator=generator).to(device).requires_grad_() for shape in ((6, 4), (9,))]
    return first, [p.detach().clone().requires_grad_() for p in first]


def step_both(optimizers: list, params: list[list[torch.Tensor]], generator: torch.Generator) -> None:
    grads = [torch.randn(p.shape, generator=generator).to(p.device) for p in params[0]]
    for optimizer, group in zip(optimizers, params, strict=True):
        optimizer.zero_grad(set_to_none=True)
        for p, g in zip(group, grads, strict=True):
            p.grad = g.clone()
        optimizer.step()


def steps_stay_equal(
    optimizers: list, params: list[list[torch.Tensor]], generator: torch.Generator, steps: int
) -> None:
    for _ in range(steps):
        step_both(optimizers, params, generator)
        for a, b in zip(*params, strict=True):
            assert torch.equal(a, b)


def assert_same_state(ours: dict, theirs: dict) -> None:
    assert ours["param_groups"] == theirs["param_groups"]
    assert ours["state"].keys() == theirs["state"].keys()
    for index, values in theirs["state"].items():
        assert ours["state"][index].keys() == values.keys()
        for key, value in values.items():
            assert torch.equal(ours["state"][index][key], value), (index, key)
            assert ours["state"][index][key].dtype == value.dtype


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("kind", "lr", "momentum", "weight_decay"), SETTINGS)
def test_steps_and_state_equal_torch_optims_fused_optimizer_bit_for_bit(
    kind, lr, momentum, weight_decay, device
) -> None:
    theirs_params, ours_params = twin_params(device=device)
    theirs = torch_optimizer(kind, theirs_params, lr, momentum, weight_decay)
    ours = FusedOptimizer(kind, ours_params, lr, momentum, weight_decay)
    steps_stay_equal([theirs, ours], [theirs_params, ours_params], torch.Generator().manual_seed(1), 5)
    assert_same_state(ours.state_dict(), theirs.state_dict())


@pytest.mark.parametrize(("kind", "lr", "momentum", "weight_decay"), SETTINGS)
def test_a_state_saved_by_either_loads_into_the_other_and_training_goes_on_identically(
    kind, lr, momentum, weight_decay
) -> None:
    # Checkpoints written before pnnctl had its own optimizers hold torch.optim's state_dict.
    theirs_params, ours_params = twin_params()
    theirs = torch_optimizer(kind, theirs_params, lr, momentum, weight_decay)
    ours = FusedOptimizer(kind, ours_params, lr, momentum, weight_decay)
    generator = torch.Generator().manual_seed(2)
    for _ in range(3):
        step_both([theirs, ours], [theirs_params, ours_params], generator)
    # Each continues from a copy of the other's state (deep copies: loading shares same-device tensors).
    from_theirs = FusedOptimizer(kind, ours_params, lr, momentum, weight_decay)
    from_theirs.load_state_dict(copy.deepcopy(theirs.state_dict()))
    from_ours = torch_optimizer(kind, theirs_params, lr, momentum, weight_decay)
    from_ours.load_state_dict(copy.deepcopy(ours.state_dict()))
    steps_stay_equal([from_ours, from_theirs], [theirs_params, ours_params], generator, 3)
    assert_same_state(from_theirs.state_dict(), from_ours.state_dict())


def test_a_learning_rate_set_on_the_param_group_is_the_one_applied() -> None:
    # sil's recovery epochs set their own lr on every group.
    (param,) = [torch.ones(3, requires_grad=True)]
    optimizer = FusedOptimizer("sgd", [param], lr=0.1)
    for group in optimizer.param_groups:
        group["lr"] = 0.5
    param.grad = torch.ones(3)
    optimizer.step()
    assert torch.equal(param.detach(), torch.full((3,), 0.5))
    assert optimizer.state_dict()["param_groups"][0]["lr"] == 0.5


def test_cleared_state_restarts_momentum_and_adam_moments() -> None:
    # ist clears its optimizer's state every round: the next step is a first step again.
    for kind in ("sgd", "adam"):
        fresh_param, used_param = torch.ones(4, requires_grad=True), torch.ones(4, requires_grad=True)
        fresh = FusedOptimizer(kind, [fresh_param], lr=0.1, momentum=0.9)
        used = FusedOptimizer(kind, [used_param], lr=0.1, momentum=0.9)
        used_param.grad = torch.full((4,), 3.0)
        used.step()
        used.state.clear()
        with torch.no_grad():
            used_param.copy_(fresh_param)
        for p in (fresh_param, used_param):
            p.grad = torch.arange(4.0)
        fresh.step()
        used.step()
        assert torch.equal(fresh_param, used_param), kind


def test_make_optimizer_builds_the_fused_optimizer_on_the_cpu_and_refuses_an_unknown_name() -> None:
    param = torch.zeros(2, requires_grad=True)
    assert isinstance(make_optimizer("adamw", [param], 0.1), FusedOptimizer)
    with pytest.raises(ValueError, match="unknown optimizer 'rmsprop'"):
        make_optimizer("rmsprop", [param], 0.1)
    with pytest.raises(ValueError, match="other parameters"):
        FusedOptimizer("sgd", [param], 0.1).load_state_dict({"state": {}, "param_groups": [{"params": [0, 1]}]})


def test_training_with_every_optimizer_imports_no_torch_dynamo() -> None:
    # torch.optim imports torch._dynamo on first use: 1.4-2 s, as long as importing torch itself.
    code = (
        "import sys, torch\n"
        "from pnnctl.training import make_optimizer\n"
        "p = torch.ones(3, requires_grad=True)\n"
        "for name in ('sgd', 'adam', 'adamw'):\n"
        "    o = make_optimizer(name, [p], 0.1, momentum=0.9 if name == 'sgd' else 0.0)\n"
        "    p.grad = torch.ones(3); o.step(); o.zero_grad(); o.load_state_dict(o.state_dict())\n"
        "print(sorted(m for m in sys.modules if m.startswith('torch._dynamo')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
