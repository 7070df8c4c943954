"""The CUDA path: every registered strategy trains on a GPU, in fp32, bf16 and tf32. Skipped without CUDA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import every_strategy_config

from pnnctl.config import RunConfig, validate
from pnnctl.errors import UsageError
from pnnctl.trainer import train
from strategies import STRATEGIES

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
@pytest.mark.parametrize("precision", ["fp32", "bf16", "tf32"])
def test_every_strategy_trains_on_cuda(strategy: str, precision: str, tmp_path: Path) -> None:
    result = train(every_strategy_config(strategy, tmp_path, device="cuda", precision=precision))
    assert result.status == "finished"
    assert float(result.rows[-1]["test_acc"]) > 0.5


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on machines without CUDA")
def test_cuda_or_tf32_without_a_gpu_is_a_clear_error(tmp_path: Path) -> None:
    for changes in ({"device": "cuda"}, {"precision": "tf32"}):
        config = validate(RunConfig(dataset="digits", model="mlp:64-16-10", out=str(tmp_path), **changes))
        with pytest.raises(UsageError) as error:
            train(config)
        assert error.value.field in ("device", "precision")
