"""--precision bf16: autocast over a round of many steps, on the CPU (the same path CUDA takes)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pnnctl.config import RunConfig, validate
from pnnctl.models import build_model
from pnnctl.trainer import train
from pnnctl.training import precision_context
from strategies import STRATEGIES

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_round_under_bf16_computes_with_the_weights_updated_inside_it() -> None:
    # Two stacked workers take the batched-kernel path, whose weights are leaf parameters: the ones
    # autocast's cast cache would hold for the whole region.
    model = build_model("mlp:64-32-10", 2, (1, 8, 8), 10, seed=0)
    x = torch.rand(2, 16, 1, 8, 8)
    with precision_context(torch.device("cpu"), "bf16"):
        before = model(x)
        with torch.no_grad():
            for param in model.parameters():
                param.mul_(-2.0)  # what an optimizer step does: the same tensors, new values
        after = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fresh = model(x)
    assert after.dtype == torch.bfloat16
    assert torch.equal(after, fresh)
    assert not torch.equal(after, before)


def test_fp32_runs_without_autocast() -> None:
    with precision_context(torch.device("cpu"), "fp32"):
        assert not torch.is_autocast_enabled("cpu")
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.float32


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_every_strategy_trains_in_bf16_as_well_as_in_fp32(strategy: str, tmp_path: Path) -> None:
    # psl's exponential loss diverges under plain SGD at this lr; its L-BFGS master is the quick choice.
    options = {"optimizer": "lbfgs"} if strategy == "psl" else {}
    results = {}
    for precision in ("fp32", "bf16"):
        config = validate(RunConfig(strategy=strategy, dataset="digits", model="mlp:64-64-64-10", workers=2,
                                    epochs=2.0, lr=0.1, precision=precision, out=str(tmp_path / precision),
                                    options=options))  # fmt: skip
        results[precision] = train(config)
    fp32, bf16 = (results[p].rows[-1] for p in ("fp32", "bf16"))
    assert results["bf16"].status == "finished"
    # bf16 really ran (its rounding moves the training loss) and learned as much as fp32 did; with a
    # stale bf16 copy of the weights over each round, local-sgd ended at 17% against fp32's 86%.
    assert float(bf16["train_loss"]) != float(fp32["train_loss"])
    assert float(bf16["test_acc"]) >= float(fp32["test_acc"]) - 0.03
    assert float(bf16["test_acc"]) > 0.75
