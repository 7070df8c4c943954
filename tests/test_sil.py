"""``sil``: synthetic labels, independent partitions, the joined model, the pipeline and its bytes.

Expected traffic is written out from the formulas in the strategy's docstring (4-byte floats,
every sample crosses every cut once forward and once backward per recovery epoch).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from pnnctl.config import RunConfig
from pnnctl.errors import UsageError
from pnnctl.models import activation_elements, build_model, worker_memory_bytes
from pnnctl.trainer import train
from strategies.sil import label_stats, resolve_cuts, synthetic_labels

pytestmark = pytest.mark.usefixtures("one_thread")

# digits: 64 inputs, 10 classes. Three linear layers of different shapes, so K = 3 cuts at 1 and 2.
MLP3 = "mlp:64-32-24-10"


def sil_config(small_config, workers: int = 3, model: str = MLP3, **fields):
    options = {"recovery_epochs": 1, **fields.pop("options", {})}
    values = dict(strategy="sil", workers=workers, model=model, batch_size=50, epochs=3.0, options=options)
    values.update(fields)
    return small_config(**values)


def params_of(strategy) -> list[torch.Tensor]:
    return [p.detach().clone() for p in strategy.full.parameters()]


def part_params(strategy, k: int) -> list[torch.Tensor]:
    return [p.detach().clone() for p in strategy.parts[k].parameters()]


# -- synthetic labels ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["separated", "orthogonal", "hadamard", "gaussian"])
def test_label_generators_are_deterministic_per_seed(kind: str) -> None:
    a = synthetic_labels(kind, 10, 32, seed=7, scale=0.5)
    assert a.shape == (10, 32) and a.dtype == torch.float32
    assert torch.equal(a, synthetic_labels(kind, 10, 32, seed=7, scale=0.5))
    assert not torch.equal(a, synthetic_labels(kind, 10, 32, seed=8, scale=0.5))


@pytest.mark.parametrize(("classes", "width", "min_distance"), [(10, 32, 1.0), (10, 32, 1.05), (47, 24, 0.9)])
def test_separated_labels_keep_the_minimum_distance(classes: int, width: int, min_distance: float) -> None:
    scale = 0.7
    table = synthetic_labels("separated", classes, width, seed=3, scale=scale, min_distance=min_distance)
    radius = scale * math.sqrt(width)
    dist = torch.cdist(table.double(), table.double()).fill_diagonal_(math.inf)
    assert float(dist.min()) >= min_distance * radius * math.sqrt(2) * (1 - 1e-6)
    assert torch.allclose(table.norm(dim=1), torch.full((classes,), radius), rtol=1e-5)
    # Plain Gaussian vectors of this width do not have the property: the generator did the work.
    gaussian = synthetic_labels("gaussian", classes, width, seed=3, scale=scale)
    assert float(torch.cdist(gaussian, gaussian).fill_diagonal_(math.inf).min()) < min_distance * radius * math.sqrt(2)


def test_separated_labels_refuse_a_distance_no_simplex_reaches() -> None:
    with pytest.raises(UsageError, match=r"sil.min_distance"):
        synthetic_labels("separated", 10, 32, seed=0, min_distance=math.sqrt(10 / 9) + 0.01)


@pytest.mark.parametrize("kind", ["orthogonal", "hadamard"])
def test_orthogonal_and_hadamard_codes_are_orthogonal_with_the_stated_norm(kind: str) -> None:
    scale, width = 0.5, 64
    table = synthetic_labels(kind, 10, width, seed=1, scale=scale).double()
    gram = table @ table.T
    assert torch.allclose(gram, torch.eye(10, dtype=torch.float64) * scale**2 * width, atol=1e-5)
    if kind == "hadamard":
        assert set(table.abs().unique().tolist()) == {scale}
        assert torch.all(table.sum(dim=1).abs() < 1e-9)  # balanced codes: the constant row is never drawn
    stats = label_stats(table)
    assert stats["max_abs_cos"] < 1e-6
    assert stats["min_dist"] == pytest.approx(scale * math.sqrt(width) * math.sqrt(2), rel=1e-6)


def test_codes_that_cannot_exist_are_usage_errors() -> None:
    with pytest.raises(UsageError, match="power of two"):
        synthetic_labels("hadamard", 10, 48, seed=0)
    with pytest.raises(UsageError, match="classes <= cut width"):
        synthetic_labels("orthogonal", 47, 32, seed=0)


# -- cuts and options ----------------------------------------------------------------------------


def test_cuts_default_to_near_equal_depth_and_must_match_the_workers() -> None:
    assert resolve_cuts((), 6, 2) == (3,)  # the paper's net cut in the middle
    assert resolve_cuts((), 6, 4) == (2, 4, 5)
    assert resolve_cuts((2, 4), 6, 3) == (2, 4)
    with pytest.raises(UsageError, match="--workers 3, not 2"):
        resolve_cuts((2, 4), 6, 2)
    with pytest.raises(UsageError, match=r"sil.cuts"):
        resolve_cuts((6,), 6, 2)
    with pytest.raises(UsageError, match="at most 3 partitions"):
        resolve_cuts((), 3, 4)


def test_bad_options_and_models_are_usage_errors(small_config, build_strategy) -> None:
    with pytest.raises(UsageError, match=r"sil.cuts"):
        sil_config(small_config, options={"cuts": [2, 1]})
    with pytest.raises(UsageError, match=r"sil.labels"):
        sil_config(small_config, options={"labels": "random"})
    with pytest.raises(UsageError, match=r"^epochs"):
        build_strategy(sil_config(small_config, epochs=1.0))  # 1 recovery epoch leaves no apart epoch
    with pytest.raises(UsageError, match=r"^epochs"):
        build_strategy(sil_config(small_config, epochs=3.0, options={"apart_epochs": 3}))
    with pytest.raises(UsageError, match=r"^epochs: must be sil.apart_epochs \+ sil.recovery_epochs = 3 .* not 5;"):
        build_strategy(sil_config(small_config, epochs=5.0, options={"apart_epochs": 2}))  # trained 3 silently
    with pytest.raises(UsageError, match=r"^epochs: sil trains whole epochs .* not 2.7$"):
        build_strategy(sil_config(small_config, epochs=2.7))  # it trained 2 and said nothing
    with pytest.raises(UsageError, match=r"^model"):
        build_strategy(small_config(strategy="sil", workers=2, dataset="mnist-small", model="lenet"))


def test_bare_mlp_is_the_papers_six_layer_network(small_config, build_strategy) -> None:
    strategy = build_strategy(small_config(strategy="sil", workers=2, model="mlp"))
    assert strategy.spec.widths == (64, 512, 512, 512, 512, 512, 10)
    assert strategy.cuts == (3,)
    assert strategy.cut_widths == [512]


# -- the apart phase -----------------------------------------------------------------------------


def test_apart_phase_sends_no_gradient_across_a_cut(small_config, build_strategy) -> None:
    strategy = build_strategy(sil_config(small_config))
    before = [part_params(strategy, k) for k in range(3)]
    strategy.train_partition_epoch(1)
    for k in (0, 2):
        assert all(p.grad is None for p in strategy.parts[k].parameters()), k
        assert all(torch.equal(a, b) for a, b in zip(before[k], part_params(strategy, k), strict=True)), k
    assert max(float((a - b).abs().max()) for a, b in zip(before[1], part_params(strategy, 1), strict=True)) > 1e-3


def test_partition_updates_do_not_depend_on_their_order(small_config, build_strategy) -> None:
    config = sil_config(small_config, optimizer="adam", lr=0.01)
    forward, backward = build_strategy(config), build_strategy(config)
    for k in (0, 1, 2):
        forward.train_partition_epoch(k)
    for k in (2, 1, 0):
        backward.train_partition_epoch(k)
    for a, b in zip(params_of(forward), params_of(backward), strict=True):
        assert torch.equal(a, b)


def test_apart_round_ledger_holds_only_the_label_table(small_config, build_strategy) -> None:
    strategy = build_strategy(sil_config(small_config))
    result = strategy.run_round()
    assert result.phase == "apart"
    assert result.samples == len(strategy.ctx.y_train)
    ledger = strategy.ctx.group.ledger
    ledger.end_round()
    table_0, table_1 = 4 * 10 * 32, 4 * 10 * 24  # C x width x 4 bytes per cut
    assert ledger.recv.tolist() == [table_0, table_0 + table_1, table_1, 0]
    assert ledger.sent.tolist() == [0, 0, 0, 2 * (table_0 + table_1)]
    assert ledger.messages.tolist() == [0, 0, 0, 3]
    strategy.run_round()  # the second apart round sends nothing
    ledger.end_round()
    assert ledger.sent.tolist() == [0, 0, 0, 2 * (table_0 + table_1)]


# -- join, pipeline, memory ----------------------------------------------------------------------


def test_joined_model_is_the_composition_of_the_trained_partitions(small_config, build_strategy) -> None:
    strategy = build_strategy(sil_config(small_config))
    for _ in range(2):
        strategy.run_round()
    assert strategy.joined
    x = strategy.ctx.x_train[:40].unsqueeze(0)
    chained = x
    for part in strategy.parts:
        chained = part(chained)
    joined = strategy.eval_model()
    assert joined.n_workers == 1
    assert torch.equal(joined(x), chained)
    # A freshly built network of the spec, loaded with the joined weights, computes the same.
    fresh = build_model(strategy.spec, 1, strategy.ctx.data.input_shape, 10, seed=123)
    fresh.load_state_dict(joined.state_dict())
    assert torch.allclose(fresh(x), chained, atol=1e-6)
    extras = strategy.eval_extras()
    assert extras["joined_test_acc"] == strategy.joined_acc > 0.3


def test_pipeline_step_equals_one_end_to_end_step(small_config, build_strategy) -> None:
    strategy = build_strategy(sil_config(small_config, momentum=0.5))
    reference = copy.deepcopy(strategy.full)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.5)
    x, y = strategy.ctx.x_train[:30], strategy.ctx.y_train[:30]
    for _ in range(3):
        loss = strategy.pipeline_step(x, y)
        optimizer.zero_grad()
        expected = F.cross_entropy(reference(x.unsqueeze(0))[0], y)
        expected.backward()
        optimizer.step()
        assert loss == pytest.approx(float(expected.detach()), rel=1e-6)
    for a, b in zip(strategy.full.parameters(), reference.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_memory_per_partition_against_the_full_network(small_config, build_strategy) -> None:
    strategy = build_strategy(sil_config(small_config, optimizer="adam", lr=0.01, batch_size=8))
    extras = strategy.eval_extras()
    params = [64 * 32 + 32, 32 * 24 + 24, 24 * 10 + 10]
    # Outputs kept for backward: flatten (64) + linear (32) | own input (32) + relu + linear (24) | ...
    activations = [8 * (64 + 32), 8 * (32 + 32 + 24), 8 * (24 + 24 + 10)]
    for k in range(3):
        assert extras[f"params_p{k}"] == params[k]
        assert extras[f"memory_p{k}_bytes"] == 4 * (params[k] * 4 + activations[k])  # Adam: 2 slots
    assert extras["params_full"] == sum(params) == strategy.full.worker_parameter_count()
    assert extras["memory_full_bytes"] == worker_memory_bytes(
        sum(params), activation_elements(strategy.full, 8), "adam", 0.0
    )
    footprint = strategy.footprint()
    assert footprint.params == max(params)
    assert footprint.memory_bytes == max(extras[f"memory_p{k}_bytes"] for k in range(3))


def test_resume_from_a_state_dict_is_bit_exact(small_config, build_strategy) -> None:
    config = sil_config(small_config, optimizer="adam", lr=0.01, epochs=4.0, options={"recovery_epochs": 2})
    straight, resumed = build_strategy(config), build_strategy(config)
    for _ in range(3):
        straight.run_round()
    state = straight.state_dict()
    resumed.load_state_dict(copy.deepcopy(state))
    assert resumed.epoch == 3 and resumed.joined
    straight.run_round()
    resumed.run_round()
    for a, b in zip(params_of(straight), params_of(resumed), strict=True):
        assert torch.equal(a, b)
    assert straight.is_done() and resumed.is_done()


def test_three_partitions_end_to_end_with_recovery_bytes_from_the_formula(small_config, tmp_path: Path) -> None:
    # batch 50 does not divide the training set: the last step of an epoch is short.
    config = sil_config(small_config, epochs=4.0, out=str(tmp_path), options={"recovery_epochs": 2})
    result = train(config)
    assert result.status == "finished"
    rows = result.rows
    assert [r["phase"] for r in rows] == ["train", "apart", "joined", "recovery", "recovery"]
    n = int(rows[1]["samples_seen"])  # one epoch of the whole training set per round
    steps = math.ceil(n / 50)
    assert [float(r["epoch"]) for r in rows] == [0, 1, 2, 3, 4] and rows[-1]["samples_seen"] == 4 * n
    tables = 4 * 10 * (32 + 24)
    for row in rows:
        epochs_back = max(0, int(row["round"]) - 2)
        # worker 1 touches both cuts (widths 32 and 24): it sends activations over cut 1 and gradients over cut 0.
        busiest = epochs_back * 4 * n * (32 + 24)
        assert float(row["bytes_sent_max_worker"]) == busiest
        assert float(row["bytes_recv_max_worker"]) == busiest + (tables if int(row["round"]) else 0)
        master = 2 * tables if int(row["round"]) else 0  # the label tables, once
        assert float(row["bytes_sent_total"]) == epochs_back * 2 * 4 * n * (32 + 24) + master
        assert float(row["messages_max_worker"]) == epochs_back * 2 * steps
    # The label tables: in the checkpoint and, as drawn, in the run folder.
    saved = torch.load(result.run_dir / "checkpoint.pt", weights_only=True)["strategy"]["labels"]
    written = json.loads((result.run_dir / "sil_labels.json").read_text())
    assert [c["after_hidden_layer"] for c in written["cuts"]] == [1, 2]
    for cut, table in zip(written["cuts"], saved, strict=True):
        assert torch.equal(torch.tensor(cut["targets"], dtype=torch.float32), table)
        assert cut["min_dist"] >= math.sqrt(2 * cut["width"]) * (1 - 1e-6)  # separated, min_distance 1
    extras = json.loads(rows[-1]["extras"])
    assert extras["partitions"] == 3 and extras["apart_epochs"] == 2 and extras["recovery_epochs"] == 2
    assert 0.3 < extras["joined_test_acc"] <= 1
    assert float(rows[-1]["test_acc"]) > 0.8


def test_a_budget_overshot_by_a_whole_epoch_says_sils_rounds_are_epochs(small_config, tmp_path: Path) -> None:
    # Its rounds are not cut to a step: the note said "rounds stop on a whole step" all the same.
    config = sil_config(small_config, epochs=2.0, budget="bytes=1000", out=str(tmp_path))
    result = train(config)
    assert [r["phase"] for r in result.rows] == ["train", "joined", "recovery"]
    n = int(result.rows[1]["samples_seen"])
    sent = 4 * n * (32 + 24)  # one recovery epoch of the busiest worker's activations and gradients
    assert result.notes == [
        f"the busiest worker sent {sent / 1e6:.3g} MB where the budget allowed 0.001 MB: the last round of sil took "
        f"{sent / 1e6:.3g} MB (a round is an epoch of sil's schedule, which a budget does not cut)"
    ]


@pytest.mark.distributed
def test_two_process_run_equals_simulation(tmp_path: Path) -> None:
    from distributed_utils import assert_simulated_equals_distributed

    # Three partitions on two ranks (blocks of 2 and 1): cut 0 stays inside rank 0, cut 1 crosses.
    config = RunConfig(strategy="sil", dataset="digits", model=MLP3, workers=3, epochs=3.0, batch_size=32,
                       optimizer="adam", lr=0.01, device="cpu", options={"recovery_epochs": 1})
    rows = assert_simulated_equals_distributed(config, tmp_path, nproc=2)
    assert list(rows["phase"]) == ["train", "apart", "joined", "recovery"]
    assert rows["bytes_sent_max_worker"].iloc[-1] > 0
