"""Independent subnet training: partitions, subnet slicing and write-back, equality with centralized
training at P = 1, the bytes of both system variants, footprints, errors, resume and 2-process runs."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from distributed_utils import assert_simulated_equals_distributed, run_cli
from pnnctl.trainer import train

pytestmark = pytest.mark.usefixtures("one_thread")

AUTHORS = "mlp:64-12-9-10,bias=false,bn=batch,out_bn=true"  # the authors' model, narrow
PLAIN = "mlp:64-7-5-10"  # biases, no BN; 7 and 5 units split unevenly over 2, 3 or 4 workers


def ist(small_config, workers: int, model: str = PLAIN, **options):
    fields = {key: options.pop(key) for key in list(options) if key in ("dataset", "optimizer", "lr", "momentum",
                                                                          "batch_size", "epochs", "eval_every")}
    options.setdefault("local_steps", 3)
    fields.setdefault("batch_size", 8)
    return small_config(strategy="ist", workers=workers, model=model, options=options, **fields)


def master_state(strategy) -> dict[str, torch.Tensor]:
    return {name: t.clone() for name, t in strategy.master.state_dict().items()}


def split_sizes(width: int, parts: int) -> list[int]:
    return [width // parts + (1 if p < width % parts else 0) for p in range(parts)]


# -- partition ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 3, 4])
def test_partition_groups_are_disjoint_cover_every_unit_and_are_redrawn_each_round(
    workers: int, small_config, build_strategy
) -> None:
    strategy = build_strategy(ist(small_config, workers, "mlp:64-13-10-10", local_steps=1))
    twin = build_strategy(ist(small_config, workers, "mlp:64-13-10-10", local_steps=1))
    seen = []
    for _ in range(3):
        strategy.run_round()
        twin.run_round()
        partition = strategy.partition
        for layer, width in enumerate((13, 10)):
            groups = partition.groups(layer)
            assert len(groups) == workers
            assert [len(g) for g in groups] == split_sizes(width, workers)  # differ by at most one unit
            units = torch.cat(groups)
            assert sorted(units.tolist()) == list(range(width))  # disjoint and covering
            # Every rank draws the same partition from the shared seed, without talking.
            assert all(torch.equal(a, b) for a, b in zip(groups, twin.partition.groups(layer), strict=True))
        seen.append(torch.cat([torch.cat(partition.groups(layer)) for layer in (0, 1)]))
    assert not torch.equal(seen[0], seen[1]) and not torch.equal(seen[1], seen[2])  # redrawn every round


# -- slicing and write-back -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "workers", "dataset"),
    [(PLAIN, 3, "digits"), (AUTHORS, 4, "digits"), ("mlp:64-9-10,bn=running", 2, "digits"),
     ("lenet", 4, "mnist-small")],
)
def test_extract_then_write_back_without_training_is_the_identity(
    model: str, workers: int, dataset: str, small_config, build_strategy
) -> None:
    strategy = build_strategy(ist(small_config, workers, model, dataset=dataset))
    with torch.no_grad():  # non-trivial running statistics, so that they are checked too
        for name, tensor in strategy.master.state_dict().items():
            if "running" in name:
                tensor.uniform_(0.5, 1.5)
    before = master_state(strategy)
    for _ in range(2):
        partition = strategy.draw_partition()
        strategy.write_back(partition, strategy.extract(partition), strategy.extract(partition))
    after = strategy.master.state_dict()
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name


def test_subnets_are_the_published_slices_of_the_authors_model(small_config, build_strategy) -> None:
    # W1[:, idx1_p], W2[idx1_p, idx2_p], W3[idx2_p, :] in the stacked [in, out] layout, and the BN
    # parameters of the worker's units; no biases, and no running statistics anywhere.
    strategy = build_strategy(ist(small_config, 3, AUTHORS))
    state = strategy.master.state_dict()
    assert [name for name in state] == ["1.weight", "2.weight", "2.bias", "4.weight", "5.weight", "5.bias", "7.weight"]
    partition = strategy.draw_partition()
    pieces = dict(zip([r.name for r in strategy.layout.rules], strategy.extract(partition), strict=True))
    w1, w2, w3 = state["1.weight"][0], state["4.weight"][0], state["7.weight"][0]
    for p in range(3):
        g1, g2 = partition.groups(0)[p], partition.groups(1)[p]
        assert torch.equal(pieces["1.weight"][p], w1[:, g1])
        assert torch.equal(pieces["4.weight"][p], w2[g1][:, g2])
        assert torch.equal(pieces["7.weight"][p], w3[g2, :])
        assert torch.equal(pieces["2.weight"][p], state["2.weight"][0, g1])
        assert torch.equal(pieces["5.bias"][p], state["5.bias"][0, g2])


def _drop_other_groups(strategy, partition, worker: int) -> list:
    """Forward hooks that zero the master's units outside ``worker``'s groups after each activation
    (and, with ``ist.rescale``, scale the kept ones by width / group size: inverted dropout)."""
    hooks = []
    for layer, (_, axis) in zip(strategy.master, strategy.layout.layer_axes, strict=True):
        if type(layer).__name__ not in ("ReLU", "Tanh", "Sigmoid", "GELU") or axis is None:
            continue
        width, group = strategy.layout.widths[axis.layer], partition.groups(axis.layer)[worker]
        keep = torch.zeros(width)
        keep[group] = width / len(group) if strategy.rescale else 1.0

        def hook(_m, _i, out, keep=keep):
            return out * keep.reshape(1, 1, -1, *([1] * (out.dim() - 3)))

        hooks.append(layer.register_forward_hook(hook))
    return hooks


@pytest.mark.parametrize(
    ("model", "dataset", "rescale"),
    [("lenet", "mnist-small", "auto"), ("lenet", "mnist-small", "off"), ("mlp:64-11-7-10,bn=batch", "digits", "auto")],
)
def test_each_subnet_computes_the_master_with_the_other_groups_dropped(
    model: str, dataset: str, rescale: str, small_config, build_strategy
) -> None:
    # Pins the index mapping: conv output channels, the next conv's input channels, and the
    # flatten that turns a channel into its spatial block (6 channels over 4 workers: uneven).
    strategy = build_strategy(ist(small_config, 4, model, dataset=dataset, rescale=rescale))
    assert strategy.rescale == (model == "lenet" and rescale == "auto")  # auto: only without batch norm
    partition = strategy.draw_partition()
    strategy._load_subnets(strategy._pack(strategy.extract(partition)))
    x = strategy.ctx.x_train[:16]
    with torch.no_grad():
        subnet_out = strategy.subnet(x.unsqueeze(0).expand(4, *x.shape))
        for worker in range(4):
            hooks = _drop_other_groups(strategy, partition, worker)
            try:
                dropped = strategy.master(x.unsqueeze(0))[0]
            finally:
                for hook in hooks:
                    hook.remove()
            assert torch.allclose(subnet_out[worker], dropped, atol=1e-5), worker
    full = strategy.master(x.unsqueeze(0))[0]
    assert not torch.allclose(subnet_out[0], full, atol=1e-3)


@pytest.mark.parametrize("rescale", ["off", "on"])
def test_a_round_writes_back_each_workers_blocks_and_leaves_cross_group_weights_alone(
    rescale: str, small_config, build_strategy
) -> None:
    # Sigmoid: a padded unit outputs sigmoid(0) = 0.5, so only the gradient mask keeps it silent.
    strategy = build_strategy(ist(small_config, 3, PLAIN + ",act=sigmoid", local_steps=4, lr=0.5, rescale=rescale))
    before = master_state(strategy)
    strategy.run_round()
    partition, after = strategy.partition, strategy.master.state_dict()
    trained = strategy.subnet.state_dict()
    g1, g2 = partition.groups(0), partition.groups(1)
    w2_before, w2_after = before["3.weight"][0], after["3.weight"][0]
    for p in range(3):
        n1, n2 = len(g1[p]), len(g2[p])
        # Blocks: the subnet's trained weights, no averaging (rescaled: divided by width / group size).
        f1, f2 = (7 / n1, 5 / n2) if rescale == "on" else (1.0, 1.0)
        assert torch.equal(after["1.weight"][0][:, g1[p]], trained["1.weight"][p][:, :n1])
        assert torch.allclose(w2_after[g1[p]][:, g2[p]], trained["3.weight"][p][:n1, :n2] / f1, atol=1e-6)
        assert torch.allclose(after["5.weight"][0][g2[p]], trained["5.weight"][p][:n2] / f2, atol=1e-6)
        if rescale == "off":
            assert torch.equal(w2_after[g1[p]][:, g2[p]], trained["3.weight"][p][:n1, :n2])
        assert not torch.equal(w2_after[g1[p]][:, g2[p]], w2_before[g1[p]][:, g2[p]])
        for q in range(3):
            if q != p:  # cross-group weights are untouched this round
                assert torch.equal(w2_after[g1[p]][:, g2[q]], w2_before[g1[p]][:, g2[q]])
    # The output bias, held whole by every subnet, is the mean of the workers' copies.
    assert torch.allclose(after["5.bias"][0], trained["5.bias"].mean(dim=0), atol=1e-7)
    # Padded units (worker 2 has 2 of 3 slots in layer 1) stayed exactly zero through training.
    assert float(trained["1.weight"][2][:, 2:].abs().max()) == 0.0
    assert float(trained["3.weight"][2][2:].abs().max()) == 0.0


# -- equality with centralized training at P = 1 -----------------------------------------------------


@pytest.mark.parametrize(("optimizer", "lr", "rounds"), [("sgd", 0.2, 3), ("adam", 0.01, 1)])
def test_one_worker_with_h_steps_equals_centralized_with_h_steps(
    optimizer: str, lr: float, rounds: int, small_config, build_strategy
) -> None:
    # With P = 1 the worker's shard is the whole training set and its sampler stream is the one
    # centralized uses; the subnet is the whole model with its units permuted. Adam: one round,
    # because IST resets optimizer state every round and centralized keeps it.
    h, batch = 5, 16
    ist_run = build_strategy(ist(small_config, 1, "mlp:64-24-16-10", local_steps=h, optimizer=optimizer, lr=lr,
                                 batch_size=batch))
    central = build_strategy(small_config(strategy="centralized", model="mlp:64-24-16-10", optimizer=optimizer, lr=lr,
                                          batch_size=batch, options={"steps_per_round": h}))
    initial = master_state(ist_run)
    for _ in range(rounds):
        r_ist, r_central = ist_run.run_round(), central.run_round()
        assert r_ist.samples == r_central.samples == h * batch
        assert r_ist.loss == pytest.approx(r_central.loss, rel=1e-5)
    moved = max(float((t - initial[n]).abs().max()) for n, t in ist_run.master.state_dict().items())
    assert moved > 1e-2
    for name, tensor in central.model.state_dict().items():
        assert torch.allclose(ist_run.master.state_dict()[name], tensor, atol=1e-5), name


# -- ledger and footprint -------------------------------------------------------------------------------


def plain_subnet_elements(p: int, workers: int) -> int:
    """Worker p's subnet of mlp:64-7-5-10 (with biases): 64*g1 + g1 + g1*g2 + g2 + g2*10 + 10."""
    g1, g2 = split_sizes(7, workers)[p], split_sizes(5, workers)[p]
    return 64 * g1 + g1 + g1 * g2 + g2 + g2 * 10 + 10


def test_central_run_charges_each_worker_its_subnet_down_and_up(small_config, tmp_path: Path) -> None:
    workers, steps = 3, 4
    config = ist(small_config, workers, PLAIN, local_steps=steps, batch_size=8, epochs=0.3, eval_every=0.1)
    result = train(config.with_updates(out=str(tmp_path)))
    assert result.status == "finished"
    sizes = [4 * plain_subnet_elements(p, workers) for p in range(workers)]  # 4 bytes per float32
    assert sizes[0] > sizes[2]  # uneven: 3, 2, 2 and 2, 2, 1 units
    for row in result.rows:
        rounds = int(row["round"])
        assert float(row["bytes_sent_max_worker"]) == rounds * max(sizes)  # up: the trained subnet
        assert float(row["bytes_recv_max_worker"]) == rounds * max(sizes)  # down: the subnet to train
        assert float(row["bytes_sent_total"]) == 2 * rounds * sum(sizes)  # workers up + master down
        assert float(row["bytes_sent_master"]) == float(row["bytes_recv_master"]) == rounds * sum(sizes)
        assert float(row["messages_max_worker"]) == rounds
        assert int(row["params_max_worker"]) == plain_subnet_elements(0, workers)
    assert int(result.rows[-1]["round"]) >= 2
    extras = json.loads(result.rows[-1]["extras"])
    assert 0 <= extras["subnet_test_acc"] <= 1 and extras["subnet_loss_min"] <= extras["subnet_loss_max"]


def brute_force_pieces(partition, widths: list[int], workers: int, bias: bool, bn: bool) -> np.ndarray:
    """piece[p, q]: elements of subnet p stored in shard q, element by element, for an MLP.

    Units of each hidden layer are owned in contiguous blocks; a weight belongs to the owner of its
    output unit (of its input unit into the output layer), biases and BN to their unit's owner,
    and the output bias is cut into contiguous blocks of classes."""
    hidden = widths[1:-1]
    owner = [np.repeat(np.arange(workers), split_sizes(w, workers)) for w in hidden]
    member = [np.zeros((workers, w), dtype=bool) for w in hidden]
    for layer in range(len(hidden)):
        for p, group in enumerate(partition.groups(layer)):
            member[layer][p, group.numpy()] = True
    pieces = np.zeros((workers, workers), dtype=np.int64)
    for p in range(workers):
        for q in range(workers):
            count = 0
            for layer in range(len(widths) - 1):
                rows = np.ones(widths[0], dtype=bool) if layer == 0 else member[layer - 1][p]
                if layer < len(hidden):  # into a hidden layer: owned by the output unit
                    cols = member[layer][p] & (owner[layer] == q)
                    count += rows.sum() * cols.sum()
                    count += (int(bias) + 2 * int(bn)) * cols.sum()  # the unit's bias, BN gamma and beta
                else:  # into the output layer: owned by the input unit
                    count += (rows & (owner[layer - 1] == q)).sum() * widths[-1]
                    if bias:
                        count += np.repeat(np.arange(workers), split_sizes(widths[-1], workers)).tolist().count(q)
            pieces[p, q] = count
    return pieces


@pytest.mark.parametrize(("model", "widths", "bias", "bn"), [(PLAIN, [64, 7, 5, 10], True, False),
                                                             (AUTHORS, [64, 12, 9, 10], False, True)])
def test_sharded_run_charges_the_pieces_each_shard_holds(
    model: str, widths: list[int], bias: bool, bn: bool, small_config, build_strategy
) -> None:
    workers = 3
    strategy = build_strategy(ist(small_config, workers, model, variant="sharded"))
    ledger = strategy.ctx.group.ledger
    bytes_expected, messages_expected = np.zeros(workers), np.zeros(workers)
    for _ in range(2):
        strategy.run_round()
        ledger.end_round()
        pieces = brute_force_pieces(strategy.partition, widths, workers, bias, bn)
        assert pieces.sum(axis=1).tolist() == (strategy.subnet_bytes / 4).tolist()  # the pieces make the subnet
        # What moves under --nproc: each packed element's owner, as counted by the formula.
        owners = strategy.piece_owners(strategy.partition)
        counted = [torch.bincount(row[row >= 0], minlength=workers).tolist() for row in owners]
        assert counted == pieces.tolist()
        foreign = pieces * (1 - np.eye(workers, dtype=np.int64))
        # Down, shard q sends piece[p, q] to p; up, p sends it back: per round every worker sends
        # (and receives) what its subnet takes from others plus what others take from its shard.
        bytes_expected += 4 * (foreign.sum(axis=1) + foreign.sum(axis=0))
        messages_expected += (foreign > 0).sum(axis=1) + (foreign > 0).sum(axis=0)
        assert ledger.sent[:workers].tolist() == bytes_expected.tolist()
        assert ledger.recv[:workers].tolist() == bytes_expected.tolist()
        assert ledger.messages[:workers].tolist() == messages_expected.tolist()
    assert ledger.sent[workers] == ledger.recv[workers] == 0  # no master
    # About (P-1)/P of the subnet each way: well below what central charges the master.
    assert ledger.sent[:workers].max() < 2 * 2 * strategy.subnet_bytes.max()


def test_footprint_is_the_largest_subnet_plus_for_sharded_its_shard(small_config, build_strategy) -> None:
    from pnnctl.models import worker_memory_bytes

    central = build_strategy(ist(small_config, 3, PLAIN))
    sharded = build_strategy(ist(small_config, 3, PLAIN, variant="sharded"))
    full = central.master.worker_parameter_count()
    subnet = plain_subnet_elements(0, 3)  # worker 0: 3 and 2 units
    # Worker 0's shard: W1 columns of its 3 layer-1 units and their biases, W2 columns of its 2
    # layer-2 units and their biases, W3 rows of those 2 units, and 4 of the 10 output biases.
    shard = 64 * 3 + 3 + 7 * 2 + 2 + 2 * 10 + 4
    activations = 8 * (64 + 3 + 3 + 2 + 2 + 10)  # flatten, linear, relu, linear, relu, linear at batch 8
    assert central.footprint().params == subnet < full
    assert central.footprint().memory_bytes == worker_memory_bytes(subnet, activations, "sgd", 0.0)
    assert sharded.footprint().params == subnet + shard
    assert sharded.footprint().memory_bytes == worker_memory_bytes(subnet, activations, "sgd", 0.0) + 4 * shard
    assert sharded.shard_elements().sum() == full  # the shards partition the model


# -- errors, the authors' model, resume -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "field", "words"),
    [
        (["--model", "mlp:64-12-3-10", "--workers", "4"], "workers", "hidden layer 2 of 'mlp:64-12-3-10' has 3"),
        (["--model", "mlp:64-10", "--workers", "2"], "model", "has none"),
        (["--model", "mlp:64-9-10", "--workers", "2", "--set", "ist.uneven=false"], "workers", "not divisible"),
        (["--workers", "2", "--set", "ist.variant=ring"], "ist.variant", "central, sharded"),
        (["--workers", "2", "--set", "ist.local_steps=0"], "ist.local_steps", ">= 1"),
    ],
)
def test_bad_settings_are_one_line_errors(args: list[str], field: str, words: str, cli, tmp_path: Path) -> None:
    result = cli("train", "--strategy", "ist", "--dataset", "digits", "--epochs", "0.1", "--out", tmp_path, *args)
    assert result.code == 2
    text = " ".join((result.err + result.out).split())
    assert text.startswith(f"error: {field}:"), text
    assert words in text


def test_the_authors_model_trains_with_batch_statistics_only(small_config, tmp_path: Path) -> None:
    config = ist(small_config, 2, AUTHORS, local_steps=10, lr=0.1, batch_size=32, epochs=2.0, eval_every=1.0)
    result = train(config.with_updates(out=str(tmp_path)))
    assert result.status == "finished"
    assert float(result.rows[-1]["test_acc"]) > 0.75
    assert json.loads(result.rows[-1]["extras"])["subnet_test_acc"] > 0.3


@pytest.mark.parametrize("variant", ["central", "sharded"])
def test_restored_state_continues_bit_for_bit(variant: str, small_config, build_strategy) -> None:
    config = ist(small_config, 3, "mlp:64-10-10,bn=running", variant=variant, optimizer="sgd", momentum=0.9)
    first = build_strategy(config)
    first.run_round()
    first.run_round()
    saved = copy.deepcopy(first.state_dict())
    first.run_round()
    second = build_strategy(config)
    second.load_state_dict(saved)
    second.run_round()
    for name, tensor in first.master.state_dict().items():
        assert torch.equal(second.master.state_dict()[name], tensor), name


# -- real processes ------------------------------------------------------------------------------------


@pytest.mark.distributed
@pytest.mark.parametrize(("variant", "model", "workers"),
                         [("central", AUTHORS, 3), ("sharded", PLAIN, 2), ("sharded", PLAIN, 3)])  # fmt: skip
def test_two_process_run_equals_simulation(variant: str, model: str, workers: int, small_config, tmp_path) -> None:
    # 3 workers over 2 ranks: blocks of 2 and 1, and hidden widths 12/9 split 4-4-4 / 3-3-3.
    config = ist(small_config, workers, model, variant=variant, local_steps=5, batch_size=16, epochs=1.0,
                 eval_every=0.5)
    assert_simulated_equals_distributed(config, tmp_path, nproc=2)


@pytest.mark.distributed
@pytest.mark.parametrize("model", [PLAIN, AUTHORS])
def test_sharded_pieces_put_exactly_the_logical_bytes_on_the_wire(model: str, tmp_path: Path) -> None:
    # One worker per process: each rank stores one shard and sends only the pieces the ledger counts
    # (none of the subnets' elements it stores itself), down and up, point to point.
    result = run_cli(["train", "--strategy", "ist", "--dataset", "digits", "--model", model, "--workers", "3",
                      "--nproc", "3", "--epochs", "0.5", "--eval-every", "0.25", "--set", "ist.variant=sharded",
                      "--set", "ist.local_steps=3", "--out", str(tmp_path)])  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    rows = pd.read_csv(tmp_path / "ist-w3-s0" / "metrics.csv")
    assert rows["bytes_sent_max_worker"].iloc[-1] > 0
    assert (rows["wire_bytes_sent_max_rank"] == rows["bytes_sent_max_worker"]).all()
