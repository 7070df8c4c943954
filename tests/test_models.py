"""Stacked models: worker i of a stacked model is exactly a one-worker model with worker i's weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from pnnctl.errors import UsageError
from pnnctl.models import (
    StackedBatchNorm,
    build_model,
    parse_model_spec,
    select_workers,
)
from pnnctl.training import stacked_cross_entropy

pytestmark = pytest.mark.usefixtures("one_thread")

# (spec, input shape): MLPs on digits-sized inputs, LeNet on MNIST-sized and on the smallest allowed images.
STACKED_MODELS = [
    ("mlp:64-32-16-10", (1, 8, 8)),
    ("mlp:64-24-10,act=tanh,bias=false", (1, 8, 8)),
    ("mlp:64-24-10,bn=batch,act=gelu", (1, 8, 8)),
    ("mlp:64-24-10,bn=running,out_bn=true", (1, 8, 8)),
    ("lenet", (1, 28, 28)),
    ("lenet,act=sigmoid,pool=avg", (3, 16, 16)),
]


def _inputs(n_workers: int, batch: int, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.randn(n_workers, batch, *shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("spec", "shape"), STACKED_MODELS)
def test_each_worker_of_a_stacked_model_computes_what_a_one_worker_model_with_its_weights_computes(
    spec: str, shape: tuple[int, ...]
) -> None:
    n_workers, batch = 3, 5
    model = build_model(spec, n_workers, shape, 10, seed=1, identical=False)
    x = _inputs(n_workers, batch, shape)
    out = model(x)
    assert out.shape == (n_workers, batch, 10)
    for i in range(n_workers):
        single = select_workers(model, torch.tensor([i]))
        assert single.n_workers == 1
        # select_workers really copied worker i (not worker 0, not a fresh init).
        for (name, p_single), (_, p_stacked) in zip(
            single.state_dict().items(), model.state_dict().items(), strict=True
        ):
            assert torch.equal(p_single[0], p_stacked[i]), name
        torch.testing.assert_close(single(x[i : i + 1])[0], out[i], rtol=1e-5, atol=1e-6)
    # Workers were initialised differently, so the comparison above is not between identical copies.
    assert not torch.allclose(out[0], out[1])


@pytest.mark.parametrize(("spec", "shape"), STACKED_MODELS)
def test_a_workers_output_does_not_depend_on_other_workers_inputs(spec: str, shape: tuple[int, ...]) -> None:
    model = build_model(spec, 3, shape, 10, seed=2, identical=False)
    x = _inputs(3, 6, shape, seed=3)
    changed = x.clone()
    changed[1:] = _inputs(2, 6, shape, seed=4) * 5 + 1
    torch.testing.assert_close(model(changed)[0], model(x)[0], rtol=0, atol=0)


def test_identical_build_gives_every_worker_the_same_initial_weights() -> None:
    model = build_model("mlp:64-16-10", 4, (1, 8, 8), 10, seed=7)
    for name, p in model.state_dict().items():
        for i in range(1, 4):
            assert torch.equal(p[i], p[0]), name
    other_seed = build_model("mlp:64-16-10", 1, (1, 8, 8), 10, seed=8)
    assert not torch.equal(next(other_seed.parameters())[0], next(model.parameters())[0])


@pytest.mark.parametrize(("spec", "shape"), STACKED_MODELS)
def test_loss_on_worker_zero_leaves_every_other_workers_gradient_zero(spec: str, shape: tuple[int, ...]) -> None:
    model = build_model(spec, 3, shape, 10, seed=5, identical=False)
    out = model(_inputs(3, 4, shape, seed=6))
    out[0].square().sum().backward()
    touched = False
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.count_nonzero(p.grad[1:]) == 0, name
        touched = touched or bool(torch.count_nonzero(p.grad[0]))
    assert touched


@pytest.mark.parametrize(("spec", "shape"), [STACKED_MODELS[0], STACKED_MODELS[2], STACKED_MODELS[4]])
def test_stacked_loss_gives_each_worker_the_gradient_of_its_own_mean_loss(spec: str, shape: tuple[int, ...]) -> None:
    n_workers, batch = 3, 7
    model = build_model(spec, n_workers, shape, 10, seed=9, identical=False)
    x = _inputs(n_workers, batch, shape, seed=10)
    y = torch.randint(0, 10, (n_workers, batch), generator=torch.Generator().manual_seed(11))
    loss_sum, per_worker = stacked_cross_entropy(model(x), y)
    loss_sum.backward()
    for i in range(n_workers):
        single = select_workers(model, torch.tensor([i]))
        loss = F.cross_entropy(single(x[i : i + 1])[0], y[i])
        torch.testing.assert_close(per_worker[i], loss.detach())
        loss.backward()
        for (name, p_single), (_, p_stacked) in zip(
            single.named_parameters(), model.named_parameters(), strict=True
        ):
            torch.testing.assert_close(p_single.grad[0], p_stacked.grad[i], rtol=1e-4, atol=1e-6, msg=name)


def _per_worker_batches(n_workers: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Workers with very different means and scales, so pooled statistics would be wrong for each."""
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(n_workers, *shape, generator=gen)
    scale = torch.tensor([0.5, 3.0, 10.0])[:n_workers].reshape(n_workers, *([1] * len(shape)))
    shift = torch.tensor([-4.0, 0.0, 25.0])[:n_workers].reshape(n_workers, *([1] * len(shape)))
    return x * scale + shift


@pytest.mark.parametrize("shape", [(16, 4), (8, 4, 3, 3)], ids=["features", "images"])
def test_stacked_batchnorm_normalises_each_worker_with_its_own_batch(shape: tuple[int, ...]) -> None:
    n_workers = 3
    x = _per_worker_batches(n_workers, shape)
    layer = StackedBatchNorm(n_workers, shape[1])
    layer.train()
    y = layer(x)
    reduce = [1, *range(3, y.dim())]
    torch.testing.assert_close(y.mean(dim=reduce), torch.zeros(n_workers, shape[1]), rtol=0, atol=1e-5)
    torch.testing.assert_close(y.var(dim=reduce, unbiased=False), torch.ones(n_workers, shape[1]), rtol=1e-3, atol=0)


@pytest.mark.parametrize("shape", [(16, 4), (8, 4, 3, 3)], ids=["features", "images"])
def test_stacked_batchnorm_matches_torch_batchnorm_per_worker_in_training_and_evaluation(
    shape: tuple[int, ...],
) -> None:
    n_workers, channels = 3, shape[1]
    layer = StackedBatchNorm(n_workers, channels)
    reference_cls = nn.BatchNorm1d if len(shape) == 2 else nn.BatchNorm2d
    references = [reference_cls(channels) for _ in range(n_workers)]
    with torch.no_grad():  # distinct affine parameters per worker
        layer.weight.copy_(torch.linspace(0.5, 2.0, n_workers * channels).reshape(n_workers, channels))
        layer.bias.copy_(torch.linspace(-1.0, 1.0, n_workers * channels).reshape(n_workers, channels))
        for i, ref in enumerate(references):
            ref.weight.copy_(layer.weight[i])
            ref.bias.copy_(layer.bias[i])
    for step in range(3):  # several steps, so running statistics accumulate with the momentum
        x = _per_worker_batches(n_workers, shape) * (step + 1)
        y = layer(x)
        for i, ref in enumerate(references):
            torch.testing.assert_close(y[i], ref(x[i]), rtol=1e-4, atol=1e-5)
    for i, ref in enumerate(references):
        torch.testing.assert_close(layer.running_mean[i], ref.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.running_var[i], ref.running_var, rtol=1e-5, atol=1e-6)
    layer.eval()
    x = _per_worker_batches(n_workers, shape)
    y = layer(x)
    for i, ref in enumerate(references):
        ref.eval()
        torch.testing.assert_close(y[i], ref(x[i]), rtol=1e-4, atol=1e-5)


def test_batchnorm_without_running_stats_uses_batch_statistics_in_evaluation() -> None:
    x = _per_worker_batches(3, (16, 4))
    layer = StackedBatchNorm(3, 4, affine=False, track_running_stats=False)
    layer.eval()
    y = layer(x)
    torch.testing.assert_close(y.mean(dim=1), torch.zeros(3, 4), rtol=0, atol=1e-5)
    assert not list(layer.parameters())


@pytest.mark.parametrize(
    "spec",
    [
        "resnet",
        "MLP",
        "",
        "mlp:64-x-10",
        "mlp:64--10",
        "mlp:64-0-10",
        "mlp:64--32-10",
        "mlp:64-32-10,act=swish",
        "mlp:64-32-10,depth=3",
        "mlp:64-32-10,act",
        "mlp:64-32-10,",
        "mlp,bn=sometimes",
        "lenet,pool=median",
        "lenet,width=3",
    ],
)
def test_bad_model_specs_are_usage_errors_naming_model(spec: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_model_spec(spec)
    assert info.value.field == "model"
    assert str(info.value).startswith("model: ")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("spec", "shape", "classes"),
    [
        ("mlp:784-32-10", (1, 8, 8), 10),  # input width is not the data's
        ("mlp:64-32-26", (1, 8, 8), 10),  # classes are not the data's
        ("mlp:64", (1, 8, 8), 10),  # one width only
        ("lenet", (1, 8, 8), 10),  # too small for two 5x5 convolutions with pooling
        ("lenet", (1, 28, 12), 10),
        ("lenet:6-16", (1, 28, 28), 10),  # lenet takes no widths
    ],
)
def test_models_that_do_not_fit_the_data_are_usage_errors_naming_model(
    spec: str, shape: tuple[int, ...], classes: int
) -> None:
    with pytest.raises(UsageError) as info:
        build_model(spec, 2, shape, classes, seed=0)
    assert info.value.field == "model"


def test_good_specs_parse_into_family_widths_and_options() -> None:
    spec = parse_model_spec(" mlp:784-512-512-10,act=tanh,bn=batch ")
    assert spec.family == "mlp"
    assert spec.widths == (784, 512, 512, 10)
    assert spec.options == {"act": "tanh", "bn": "batch"}
    assert parse_model_spec("lenet,pool=avg").options == {"pool": "avg"}
    assert parse_model_spec("mlp").widths == ()


def test_worker_parameter_count_is_that_of_one_worker() -> None:
    expected = 784 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10
    model = build_model("mlp:784-256-256-10", 3, (1, 28, 28), 10, seed=0)
    assert model.worker_parameter_count() == expected
    assert sum(p.numel() for p in model.parameters()) == 3 * expected
    no_bias = build_model("mlp:784-256-256-10,bias=false", 2, (1, 28, 28), 10, seed=0)
    assert no_bias.worker_parameter_count() == 784 * 256 + 256 * 256 + 256 * 10


def test_default_mlp_takes_its_input_and_classes_from_the_data() -> None:
    model = build_model("mlp", 2, (1, 8, 8), 10, seed=0)
    assert model.worker_parameter_count() == 64 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10
    assert model(torch.zeros(2, 3, 1, 8, 8)).shape == (2, 3, 10)
