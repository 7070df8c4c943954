"""The baselines against each other: allreduce = centralized with N times the batch, local-sgd H=1 =
allreduce, and the bytes an allreduce run is charged."""

from __future__ import annotations

import math

import pytest
import torch

from pnnctl.data import load_dataset
from pnnctl.trainer import train

pytestmark = pytest.mark.usefixtures("one_thread")

MLP = "mlp:64-32-10"
MLP_PARAMS = 64 * 32 + 32 + 32 * 10 + 10


def sample_batches(x_train: torch.Tensor, y_train: torch.Tensor, steps: int, n_workers: int, batch: int):
    index = torch.randint(0, len(y_train), (steps, n_workers, batch), generator=torch.Generator().manual_seed(123))
    return [(x_train[i], y_train[i]) for i in index]


def max_difference(a: torch.nn.Module, b: torch.nn.Module) -> float:
    """Largest |a - b| over all parameters, comparing every worker of ``a`` with worker 0 of ``b``."""
    worst = 0.0
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert pa.shape[1:] == pb.shape[1:], name
        worst = max(worst, float((pa.detach() - pb.detach()[:1]).abs().max()))
    return worst


def max_change(model: torch.nn.Module, initial: dict[str, torch.Tensor]) -> float:
    return max(float((p.detach() - initial[name]).abs().max()) for name, p in model.named_parameters())


@pytest.mark.parametrize("n_workers", [2, 4])
def test_allreduce_with_n_workers_equals_centralized_with_n_times_the_batch(
    n_workers: int, small_config, build_strategy
) -> None:
    batch, steps = 8, 5
    allreduce = build_strategy(small_config(strategy="allreduce", workers=n_workers, batch_size=batch))
    centralized = build_strategy(small_config(strategy="centralized", workers=n_workers, batch_size=n_workers * batch))
    assert allreduce.ctx.group.n_workers == n_workers
    assert centralized.ctx.group.n_workers == 1
    assert max_difference(allreduce.model, centralized.model) == 0.0  # same seed, same initial weights
    initial = {name: p.detach().clone() for name, p in centralized.model.named_parameters()}

    for x, y in sample_batches(allreduce.ctx.x_train, allreduce.ctx.y_train, steps, n_workers, batch):
        assert x.shape == (n_workers, batch, 1, 8, 8)
        loss_ar = allreduce.train_step(x, y)
        loss_c = centralized.train_step(x.reshape(1, n_workers * batch, *x.shape[2:]), y.reshape(1, -1))
        assert loss_ar == pytest.approx(loss_c, rel=1e-5)

    assert max_change(centralized.model, initial) > 1e-2  # training moved the weights
    assert max_difference(allreduce.model, centralized.model) <= 1e-5


@pytest.mark.parametrize("model", [MLP, MLP + ",bn=batch"])
@pytest.mark.parametrize("n_workers", [2, 4])
def test_local_sgd_with_one_local_step_equals_allreduce(
    n_workers: int, model: str, small_config, build_strategy
) -> None:
    # local-sgd keeps one replica per worker; allreduce shares one replica unless batch norm makes
    # each worker's statistics its own, so this also checks the shared replica against N copies.
    rounds = 6
    local = build_strategy(
        small_config(strategy="local-sgd", model=model, workers=n_workers, batch_size=8, options={"local_steps": 1})
    )
    allreduce = build_strategy(
        small_config(strategy="allreduce", model=model, workers=n_workers, batch_size=8,
                     options={"steps_per_round": 1})
    )
    replicas = {p.shape[0] for p in allreduce.model.parameters()}
    assert replicas == ({n_workers} if "bn=" in model else {1})
    assert {p.shape[0] for p in local.model.parameters()} == {n_workers}
    initial = {name: p.detach().clone() for name, p in allreduce.model.named_parameters()}
    for _ in range(rounds):
        result_local = local.run_round()
        result_ar = allreduce.run_round()
        assert result_local.samples == result_ar.samples == n_workers * 8
        assert result_local.loss == pytest.approx(result_ar.loss, rel=1e-5)
    assert max_change(allreduce.model, initial) > 1e-2
    pairs = zip(local.model.named_parameters(), allreduce.model.named_parameters(), strict=True)
    for (name, p_local), (_, p_ar) in pairs:
        assert float((p_local.detach() - p_ar.detach()).abs().max()) <= 1e-5, name


@pytest.mark.parametrize("n_workers", [2, 3])
def test_local_sgd_with_several_local_steps_differs_from_allreduce_but_ends_each_round_in_agreement(
    n_workers: int, small_config, build_strategy
) -> None:
    local_steps = 4
    local = build_strategy(
        small_config(strategy="local-sgd", workers=n_workers, batch_size=8, options={"local_steps": local_steps})
    )
    allreduce = build_strategy(
        small_config(strategy="allreduce", workers=n_workers, batch_size=8, options={"steps_per_round": local_steps})
    )
    local.run_round()
    allreduce.run_round()
    differences = [
        float((p_local.detach() - p_ar.detach()).abs().max())
        for p_local, p_ar in zip(local.model.parameters(), allreduce.model.parameters(), strict=True)
    ]
    assert max(differences) > 1e-4
    for name, tensor in local.model.state_dict().items():
        for i in range(1, n_workers):
            assert torch.equal(tensor[i], tensor[0]), name


@pytest.mark.parametrize("n_workers", [2, 3, 4])
def test_allreduce_ledger_charges_one_ring_all_reduce_of_the_gradients_per_step(
    n_workers: int, small_config, build_strategy
) -> None:
    steps = 3
    strategy = build_strategy(small_config(strategy="allreduce", workers=n_workers, batch_size=4))
    for x, y in sample_batches(strategy.ctx.x_train, strategy.ctx.y_train, steps, n_workers, 4):
        strategy.train_step(x, y)
    ledger = strategy.ctx.group.ledger
    ledger.end_round()
    per_worker = steps * 2 * (n_workers - 1) / n_workers * 4 * MLP_PARAMS
    assert ledger.sent[:n_workers].tolist() == pytest.approx([per_worker] * n_workers, rel=1e-12)
    assert ledger.recv[:n_workers].tolist() == pytest.approx([per_worker] * n_workers, rel=1e-12)
    assert ledger.messages[:n_workers].tolist() == [steps * 2 * (n_workers - 1)] * n_workers
    assert ledger.sent[n_workers] == ledger.recv[n_workers] == 0  # no master


def test_allreduce_run_metrics_report_steps_times_ring_bytes_of_the_parameters(small_config, tmp_path) -> None:
    n_workers, steps_per_round = 3, 7
    config = small_config(
        strategy="allreduce",
        workers=n_workers,
        batch_size=16,
        epochs=0.5,
        eval_every=0.25,
        options={"steps_per_round": steps_per_round},
        out=str(tmp_path),
    )
    result = train(config)
    assert result.status == "finished"
    n_train = len(load_dataset("digits").y_train)
    for row in result.rows:
        steps = int(row["samples_seen"]) // (n_workers * 16)  # the last round is cut to the budget
        assert steps == min(int(row["round"]) * steps_per_round, math.ceil(0.5 * n_train / (n_workers * 16)))
        per_worker = steps * 2 * (n_workers - 1) / n_workers * 4 * MLP_PARAMS
        assert float(row["bytes_sent_max_worker"]) == pytest.approx(per_worker, rel=1e-12)
        assert float(row["bytes_recv_max_worker"]) == pytest.approx(per_worker, rel=1e-12)
        assert float(row["bytes_sent_total"]) == pytest.approx(n_workers * per_worker, rel=1e-12)
        assert float(row["messages_max_worker"]) == steps * 2 * (n_workers - 1)
        assert int(row["params_max_worker"]) == MLP_PARAMS
    assert int(result.rows[-1]["round"]) > 1


def test_local_sgd_is_charged_one_parameter_all_reduce_per_round_whatever_the_local_steps(
    small_config, build_strategy
) -> None:
    n_workers = 4
    for local_steps in (1, 5):
        strategy = build_strategy(
            small_config(strategy="local-sgd", workers=n_workers, batch_size=4, options={"local_steps": local_steps})
        )
        strategy.run_round()
        strategy.run_round()
        ledger = strategy.ctx.group.ledger
        ledger.end_round()
        expected = 2 * 2 * (n_workers - 1) / n_workers * 4 * MLP_PARAMS
        assert ledger.sent[:n_workers].tolist() == pytest.approx([expected] * n_workers, rel=1e-12)


def test_centralized_communicates_nothing(small_config, build_strategy) -> None:
    config = small_config(strategy="centralized", workers=4, batch_size=16, options={"steps_per_round": 3})
    strategy = build_strategy(config)
    result = strategy.run_round()
    assert result.samples == 3 * 16
    strategy.ctx.group.ledger.end_round()
    assert strategy.ctx.group.ledger.totals()["bytes_sent_total"] == 0
