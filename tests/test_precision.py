"""--precision bf16: autocast over a round of many steps, on the CPU (the same path CUDA takes)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import every_strategy_config

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


def tf32_flags() -> tuple[object, ...]:
    """Both sets of torch's TF32 flags. The legacy getters raise where the two sets disagree, as
    cuBLAS's TF32 check does ("you have used mix of the legacy and new APIs")."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    return (matmul.allow_tf32, cudnn.allow_tf32, torch.get_float32_matmul_precision(), matmul.fp32_precision,
            cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision)


def test_tf32_is_on_exactly_inside_a_tf32_context_and_restored_after() -> None:
    # cuDNN's default allows TF32 convolutions, so fp32 must say ieee; a tf32 run once left TF32 on
    # for every later run in the process (compare runs its cells in one), and set the new flags alone,
    # which left the legacy ones saying fp32 (torch refuses that mix where it reads them).
    before = tf32_flags()
    for precision in ("fp32", "bf16", "tf32"):
        with precision_context(torch.device("cpu"), precision):  # the modes are process-wide either way
            tf32 = precision == "tf32"
            mode = "tf32" if tf32 else "ieee"
            assert tf32_flags() == (tf32, tf32, "high" if tf32 else "highest", mode, mode, mode)
        assert tf32_flags() == before
    with pytest.raises(ZeroDivisionError), precision_context(torch.device("cpu"), "tf32"):
        _ = 1 / 0
    assert tf32_flags() == before


def test_batch_norm_keeps_fp32_running_statistics_under_bf16() -> None:
    model = build_model("mlp:64-32-10,bn=running", 2, (1, 8, 8), 10, seed=0)
    reference = build_model("mlp:64-32-10,bn=running", 2, (1, 8, 8), 10, seed=0)
    x = torch.rand(2, 16, 1, 8, 8)
    with precision_context(torch.device("cpu"), "bf16"):
        model(x)  # lerp_ of a bf16 batch mean into the fp32 running mean raised here
    reference(x)
    means = [b for name, b in model.named_buffers() if name.endswith("running_mean")]
    expected = [b for name, b in reference.named_buffers() if name.endswith("running_mean")]
    assert means and all(m.dtype == torch.float32 for m in means)
    for got, want in zip(means, expected, strict=True):
        assert torch.allclose(got, want, atol=2e-3)  # statistics of bf16-rounded inputs, taken in fp32


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_every_strategy_trains_in_bf16_as_well_as_in_fp32(strategy: str, tmp_path: Path) -> None:
    results = {}
    for precision in ("fp32", "bf16"):
        results[precision] = train(every_strategy_config(strategy, tmp_path / precision, precision=precision))
    fp32, bf16 = (results[p].rows[-1] for p in ("fp32", "bf16"))
    assert results["bf16"].status == "finished"
    # bf16 really ran (its rounding moves the training loss) and learned as much as fp32 did; with a
    # stale bf16 copy of the weights over each round, local-sgd ended at 17% against fp32's 86%.
    assert float(bf16["train_loss"]) != float(fp32["train_loss"])
    assert float(bf16["test_acc"]) >= float(fp32["test_acc"]) - 0.03
    assert float(bf16["test_acc"]) > 0.75
