"""Tests for pnnctl.data: bundled sets, the IDX and CIFAR readers, and sharding."""

from __future__ import annotations

import gzip
import json
import math
import os
import pickle
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pnnctl.data import (
    DATASETS,
    EMNIST_SPLITS,
    Dataset,
    SyntheticSpec,
    data_folder,
    load_dataset,
    parse_sharding,
    shard_indices,
    shard_stats,
)
from pnnctl.errors import UsageError

# ---------------------------------------------------------------------------------------------
# Helpers


def standardised(train_raw: np.ndarray, raw: np.ndarray, scale: float = 255.0) -> np.ndarray:
    """The normalisation documented in pnnctl.data, recomputed independently in float64.

    Arrays are [N, C, H, W] raw pixel values; stats are per channel over the train split, ddof=0.
    """
    train = train_raw.astype(np.float64) / scale
    mean = train.mean(axis=(0, 2, 3), keepdims=True)
    std = train.std(axis=(0, 2, 3), keepdims=True)
    return (raw.astype(np.float64) / scale - mean) / std


def idx_bytes(array: np.ndarray) -> bytes:
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as handle:
            handle.write(idx_bytes(array))
    else:
        path.write_bytes(idx_bytes(array))
    return path


def make_mnist_raw(
    root: Path, folder: str = "MNIST", gz: bool = False, n_train: int = 20, n_test: int = 10
) -> dict[str, np.ndarray]:
    """Write a tiny MNIST-layout set; returns the raw arrays as [N, 1, 28, 28] plus labels."""
    rng = np.random.default_rng(123)
    arrays = {
        "x_train": rng.integers(0, 256, size=(n_train, 28, 28), dtype=np.uint8),
        "y_train": (np.arange(n_train) * 7 % 10).astype(np.uint8),
        "x_test": rng.integers(0, 256, size=(n_test, 28, 28), dtype=np.uint8),
        "y_test": (np.arange(n_test) * 3 % 10).astype(np.uint8),
    }
    raw = root / folder / "raw"
    write_idx(raw / "train-images-idx3-ubyte", arrays["x_train"], gz)
    write_idx(raw / "train-labels-idx1-ubyte", arrays["y_train"], gz)
    write_idx(raw / "t10k-images-idx3-ubyte", arrays["x_test"], gz)
    write_idx(raw / "t10k-labels-idx1-ubyte", arrays["y_test"], gz)
    arrays["x_train"] = arrays["x_train"][:, None]
    arrays["x_test"] = arrays["x_test"][:, None]
    return arrays


def assert_matches_raw(ds: Dataset, arrays: dict[str, np.ndarray], scale: float = 255.0) -> None:
    x_train, x_test = arrays["x_train"], arrays["x_test"]
    np.testing.assert_allclose(ds.x_train.numpy(), standardised(x_train, x_train, scale), atol=1e-5)
    np.testing.assert_allclose(ds.x_test.numpy(), standardised(x_train, x_test, scale), atol=1e-5)
    assert ds.y_train.tolist() == arrays["y_train"].astype(int).tolist()
    assert ds.y_test.tolist() == arrays["y_test"].astype(int).tolist()
    assert ds.x_train.dtype == torch.float32 and ds.x_train.is_contiguous()
    assert ds.y_train.dtype == torch.int64


def py2_cifar_pickle(data: np.ndarray, labels: list[int]) -> bytes:
    """A batch laid out like the real CIFAR files: a protocol-2 pickle written by Python 2's numpy.

    Python 3 cannot write one (it pickles bytes through ``_codecs.encode``), so it is assembled
    opcode by opcode: py2 ``str`` values are SHORT_BINSTRING / BINSTRING and numpy is named by its
    old module path ``numpy.core.multiarray``.
    """

    def py2_str(raw: bytes) -> bytes:
        if len(raw) < 256:
            return b"U" + bytes([len(raw)]) + raw
        return b"T" + struct.pack("<I", len(raw)) + raw

    n, width = data.shape
    dtype = [
        b"cnumpy\ndtype\n", py2_str(b"u1"), b"K\x00K\x01\x87R",  # dtype("u1", 0, 1)
        b"(K\x03", py2_str(b"|"), b"NNN", b"J\xff\xff\xff\xff" * 2, b"K\x00tb",  # its state tuple
    ]  # fmt: skip
    array = [
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n",
        b"K\x00\x85", py2_str(b"b"), b"\x87R",  # _reconstruct(ndarray, (0,), "b")
        b"(K\x01", b"M", struct.pack("<H", n), b"M", struct.pack("<H", width), b"\x86",  # version, shape
        *dtype,
        b"\x89", py2_str(data.tobytes()), b"tb",  # not fortran-ordered, raw bytes; BUILD
    ]  # fmt: skip
    labels_list = [b"](", *(b"K" + bytes([v]) for v in labels), b"e"]
    return b"".join([
        b"\x80\x02}(",  # protocol 2, empty dict, mark
        py2_str(b"data"), *array,
        py2_str(b"labels"), *labels_list,
        py2_str(b"batch_label"), py2_str(b"training batch 1 of 5"),
        b"u.",  # setitems, stop
    ])  # fmt: skip


def make_cifar(root: Path, sizes: tuple[int, ...] = (4, 3, 2, 3, 4, 5), py2: bool = False) -> dict:
    """Write five train batches and a test batch (last size); returns raw [N, 3, 32, 32] arrays."""
    rng = np.random.default_rng(7)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    xs, ys = [], []
    for i, n in enumerate(sizes):
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        # Channels get different brightness so per-channel standardisation is actually exercised.
        data[:, :1024] //= 4
        labels = [int(v) for v in rng.integers(0, 10, size=n)]
        name = f"data_batch_{i + 1}" if i < 5 else "test_batch"
        if py2:
            blob = py2_cifar_pickle(data, labels)
        else:
            blob = pickle.dumps({b"batch_label": b"x", b"data": data, b"labels": labels}, protocol=4)
        (folder / name).write_bytes(blob)
        xs.append(data.reshape(n, 3, 32, 32))
        ys.append(np.array(labels))
    return {
        "x_train": np.concatenate(xs[:5]),
        "y_train": np.concatenate(ys[:5]),
        "x_test": xs[5],
        "y_test": ys[5],
    }


# ---------------------------------------------------------------------------------------------
# Bundled sets


@pytest.fixture(scope="module")
def mnist_small() -> Dataset:
    return load_dataset("mnist-small")


def test_mnist_small_shapes_and_stratified_split(mnist_small: Dataset) -> None:
    ds = mnist_small
    assert ds.x_train.shape == (4000, 1, 28, 28)
    assert ds.x_test.shape == (1000, 1, 28, 28)
    assert ds.input_shape == (1, 28, 28) and ds.input_dim == 784 and ds.n_classes == 10
    assert torch.bincount(ds.y_train, minlength=10).tolist() == [400] * 10
    assert torch.bincount(ds.y_test, minlength=10).tolist() == [100] * 10
    assert ds.x_train.dtype == torch.float32 and ds.x_train.is_contiguous()


def test_mnist_small_train_and_test_share_no_image(mnist_small: Dataset) -> None:
    train_rows = {row.tobytes() for row in mnist_small.x_train.reshape(4000, -1).numpy()}
    test_rows = {row.tobytes() for row in mnist_small.x_test.reshape(1000, -1).numpy()}
    assert len(train_rows) > 3900  # the rows really are images, not all alike
    assert not train_rows & test_rows


def test_mnist_small_split_ignores_run_seed_and_is_standardised(mnist_small: Dataset) -> None:
    other = load_dataset("mnist-small", seed=12345)
    assert torch.equal(other.x_train, mnist_small.x_train)
    assert torch.equal(other.y_test, mnist_small.y_test)
    assert abs(float(mnist_small.x_train.mean())) < 1e-4
    assert abs(float(mnist_small.x_train.std()) - 1.0) < 1e-3
    # A fresh tensor per call: changing one must not corrupt the cached data.
    other.x_train.zero_()
    assert float(load_dataset("mnist-small").x_train.abs().sum()) > 0


def test_digits() -> None:
    ds = load_dataset("digits")
    assert len(ds.y_train) + len(ds.y_test) == 1797
    assert ds.n_classes == 10 and ds.input_shape == (1, 8, 8) and ds.input_dim == 64
    assert ds.x_train.shape[1:] == (1, 8, 8)
    assert set(ds.y_test.tolist()) == set(range(10))
    counts = torch.bincount(ds.y_test, minlength=10) / torch.bincount(
        torch.cat([ds.y_train, ds.y_test]), minlength=10
    )
    assert torch.all((counts > 0.18) & (counts <= 0.2))  # stratified, about 20% of every class
    assert torch.equal(load_dataset("digits", seed=9).y_train, ds.y_train)


def test_synthetic_is_fixed_by_spec_and_balanced() -> None:
    spec = SyntheticSpec(samples=2000, dim=16, classes=5, teacher_width=32)
    a = load_dataset("synthetic", synthetic=spec, seed=1)
    b = load_dataset("synthetic", synthetic=spec, seed=2)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_train, b.y_train)
    assert a.x_train.shape == (1600, 16) and a.x_test.shape == (400, 16)
    assert a.input_shape == (16,) and a.n_classes == 5
    counts = torch.bincount(torch.cat([a.y_train, a.y_test]), minlength=5)
    assert counts.min() > 0.5 * 2000 / 5  # no class is starved
    c = load_dataset("synthetic", synthetic=SyntheticSpec(samples=2000, dim=16, classes=5, teacher_width=33))
    assert not torch.equal(a.y_train, c.y_train)


def test_synthetic_default_has_every_class() -> None:
    ds = load_dataset("synthetic")
    assert ds.x_train.shape == (8000, 64) and ds.n_classes == 10
    assert set(ds.y_train.tolist()) == set(range(10)) and set(ds.y_test.tolist()) == set(range(10))


def test_synthetic_many_classes_in_few_dims_are_not_starved() -> None:
    # A raw random teacher in 8 dimensions leaves several of 20 classes (almost) empty.
    ds = load_dataset(
        "synthetic", synthetic=SyntheticSpec(samples=10000, dim=8, classes=20, teacher_width=16)
    )
    counts = torch.bincount(torch.cat([ds.y_train, ds.y_test]), minlength=20)
    assert counts.min() > 0.2 * 10000 / 20


def test_synthetic_noise_flips_that_fraction_of_labels() -> None:
    clean = load_dataset("synthetic", synthetic=SyntheticSpec(samples=5000, noise=0.0))
    noisy = load_dataset("synthetic", synthetic=SyntheticSpec(samples=5000, noise=0.3))
    assert torch.equal(clean.x_train, noisy.x_train)
    flipped = float((clean.y_train != noisy.y_train).float().mean())
    assert 0.27 < flipped < 0.33


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("samples", 0),
        ("samples", 3),
        ("dim", 0),
        ("classes", 1),
        ("teacher_width", -4),
        ("dim", 2.5),
        ("noise", 1.0),
        ("noise", -0.1),
        ("noise", float("nan")),
    ],
)
def test_synthetic_bad_spec_names_field(field: str, value: object) -> None:
    with pytest.raises(UsageError) as info:
        load_dataset("synthetic", synthetic=SyntheticSpec(**{field: value}))
    assert info.value.field == f"synthetic.{field}"


def test_unknown_dataset_lists_choices() -> None:
    with pytest.raises(UsageError) as info:
        load_dataset("imagenet")
    assert info.value.field == "dataset"
    assert "imagenet" in str(info.value) and "mnist-small" in str(info.value)
    assert "\n" not in str(info.value)
    assert {"mnist-small", "digits", "synthetic", "mnist", "fashion-mnist", "cifar10"} <= set(DATASETS)
    assert all(split in DATASETS["emnist-<split>"] for split in EMNIST_SPLITS)


# ---------------------------------------------------------------------------------------------
# IDX files


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_reads_exact_pixels(tmp_path: Path, gz: bool) -> None:
    arrays = make_mnist_raw(tmp_path, gz=gz)
    ds = load_dataset("mnist", data_dir=tmp_path)
    assert ds.x_train.shape == (20, 1, 28, 28) and ds.x_test.shape == (10, 1, 28, 28)
    assert ds.input_shape == (1, 28, 28) and ds.n_classes == 10
    assert_matches_raw(ds, arrays)


def test_fashion_mnist_layout_and_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    arrays = make_mnist_raw(tmp_path, folder="FashionMNIST")
    monkeypatch.setenv("PNNCTL_DATA", str(tmp_path))
    assert_matches_raw(load_dataset("fashion-mnist"), arrays)
    # The MNIST folder is a different one, so asking for mnist here must name its missing file.
    with pytest.raises(UsageError, match=r"MNIST/raw/train-images-idx3-ubyte.*--download"):
        load_dataset("mnist")


def test_missing_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PNNCTL_DATA", raising=False)
    with pytest.raises(UsageError, match="PNNCTL_DATA") as info:
        load_dataset("mnist")
    assert info.value.field == "data_dir" and "--data-dir" in str(info.value)
    with pytest.raises(UsageError, match="nowhere") as info:
        load_dataset("mnist", data_dir=tmp_path / "nowhere")
    assert info.value.field == "data_dir"


def test_missing_file_names_path(tmp_path: Path) -> None:
    make_mnist_raw(tmp_path)
    (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(UsageError, match="t10k-labels-idx1-ubyte") as info:
        load_dataset("mnist", data_dir=tmp_path)
    assert str(tmp_path) in str(info.value) and "--download" in str(info.value)


def test_bad_magic_names_file(tmp_path: Path) -> None:
    make_mnist_raw(tmp_path)
    path = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    data = bytearray(path.read_bytes())
    data[3] = 0x01  # a label file's magic in an images file
    path.write_bytes(bytes(data))
    with pytest.raises(UsageError, match=r"train-images-idx3-ubyte.*magic"):
        load_dataset("mnist", data_dir=tmp_path)


def test_truncated_file_names_file(tmp_path: Path) -> None:
    make_mnist_raw(tmp_path)
    path = tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(UsageError, match=r"t10k-images-idx3-ubyte.*truncated"):
        load_dataset("mnist", data_dir=tmp_path)


def test_truncated_gzip_names_file(tmp_path: Path) -> None:
    make_mnist_raw(tmp_path, gz=True)
    path = tmp_path / "MNIST" / "raw" / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-12])
    with pytest.raises(UsageError, match=r"train-labels-idx1-ubyte\.gz.*(truncated|corrupt)"):
        load_dataset("mnist", data_dir=tmp_path)


def test_label_count_mismatch(tmp_path: Path) -> None:
    make_mnist_raw(tmp_path)
    write_idx(tmp_path / "MNIST" / "raw" / "train-labels-idx1-ubyte", np.zeros(19, np.uint8))
    with pytest.raises(UsageError, match=r"19 labels.*20 images"):
        load_dataset("mnist", data_dir=tmp_path)


def test_emnist_letters_transposed_and_shifted(tmp_path: Path) -> None:
    upright = np.zeros((2, 28, 28), np.uint8)
    upright[:, 2, 5:20] = 255  # a horizontal bar near the top, left-heavy: no symmetry to hide behind
    upright[:, 2:10, 5] = 128
    upright[1] = upright[1][::-1]
    raw = tmp_path / "EMNIST" / "raw"
    # EMNIST stores each image transposed.
    write_idx(raw / "emnist-letters-train-images-idx3-ubyte", upright.transpose(0, 2, 1).copy())
    write_idx(raw / "emnist-letters-train-labels-idx1-ubyte", np.array([1, 26], np.uint8), gz=True)
    write_idx(raw / "emnist-letters-test-images-idx3-ubyte", upright[:1].transpose(0, 2, 1).copy())
    write_idx(raw / "emnist-letters-test-labels-idx1-ubyte", np.array([3], np.uint8))
    ds = load_dataset("emnist-letters", data_dir=tmp_path)
    assert ds.n_classes == 26
    assert ds.y_train.tolist() == [0, 25] and ds.y_test.tolist() == [2]
    expected = {"x_train": upright[:, None], "y_train": np.array([0, 25]), "x_test": upright[:1, None]}
    expected["y_test"] = np.array([2])
    assert_matches_raw(ds, expected)


def test_emnist_bad_split_and_label_range(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="byclass") as info:
        load_dataset("emnist-foo", data_dir=tmp_path)
    assert info.value.field == "dataset"
    raw = tmp_path / "EMNIST" / "raw"
    for part in ("train", "test"):
        write_idx(raw / f"emnist-digits-{part}-images-idx3-ubyte", np.zeros((1, 28, 28), np.uint8))
        write_idx(raw / f"emnist-digits-{part}-labels-idx1-ubyte", np.array([12], np.uint8))
    with pytest.raises(UsageError, match=r"emnist-digits-train-labels-idx1-ubyte.*0..9"):
        load_dataset("emnist-digits", data_dir=tmp_path)


def test_download_without_torchvision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules makes the import fail whether or not torchvision is installed.
    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", None)
    with pytest.raises(UsageError, match="torchvision") as info:
        load_dataset("mnist", data_dir=tmp_path, download=True)
    assert info.value.field == "download" and "pip install" in str(info.value)


def test_download_reads_files_already_there_without_torchvision(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run started with --download resumes where the files are but torchvision is not."""
    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", None)
    arrays = make_mnist_raw(tmp_path)
    assert_matches_raw(load_dataset("mnist", data_dir=tmp_path, download=True), arrays)
    monkeypatch.setenv("PNNCTL_DATA", str(tmp_path / "." / "."))
    assert data_folder("mnist", "") == str(tmp_path.resolve()) and data_folder("digits", "") == ""
    assert data_folder("cifar10", tmp_path / "elsewhere") == str((tmp_path / "elsewhere").resolve())


# ---------------------------------------------------------------------------------------------
# CIFAR-10 batches


@pytest.mark.parametrize("py2", [False, True])
def test_cifar10_reads_batches(tmp_path: Path, py2: bool) -> None:
    arrays = make_cifar(tmp_path, py2=py2)
    ds = load_dataset("cifar10", data_dir=tmp_path)
    assert ds.x_train.shape == (16, 3, 32, 32) and ds.x_test.shape == (5, 3, 32, 32)
    assert ds.input_shape == (3, 32, 32) and ds.n_classes == 10
    assert_matches_raw(ds, arrays)


def test_cifar10_refuses_foreign_globals(tmp_path: Path) -> None:
    make_cifar(tmp_path)
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self) -> tuple:
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(pickle.dumps({b"data": Exploit(), b"labels": [0]}))
    with pytest.raises(UsageError, match=r"data_batch_3.*refused") as info:
        load_dataset("cifar10", data_dir=tmp_path)
    assert "system" in str(info.value)
    assert not marker.exists()


def test_cifar10_reads_a_python3_pickle_of_protocol_2(tmp_path: Path) -> None:
    # Such a pickle stores the arrays' bytes as text and calls _codecs.encode, which the loader refused.
    arrays = make_cifar(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    images, labels = arrays["x_test"].reshape(len(arrays["x_test"]), -1), [int(v) for v in arrays["y_test"]]
    test_batch = {b"data": images, b"labels": labels}
    (folder / "test_batch").write_bytes(pickle.dumps(test_batch, protocol=2))
    assert_matches_raw(load_dataset("cifar10", data_dir=tmp_path), arrays)


@pytest.mark.parametrize("protocol", [2, 4])
def test_cifar10_reads_labels_written_as_numpy_integers(tmp_path: Path, protocol: int) -> None:
    # A batch re-saved from numpy code holds np.int64 labels: "refused to load global numpy._core.multiarray.scalar".
    arrays = make_cifar(tmp_path)
    images = arrays["x_test"].reshape(len(arrays["x_test"]), -1)
    test_batch = {b"data": images, b"labels": [np.int64(v) for v in arrays["y_test"]]}
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps(test_batch, protocol=protocol))
    assert_matches_raw(load_dataset("cifar10", data_dir=tmp_path), arrays)


@pytest.mark.parametrize("labels", [[1.5] * 5, [2**70] * 5, ["3"] * 5, [np.float64(1.5)] * 5])
def test_cifar10_labels_that_are_not_integers_are_refused(tmp_path: Path, labels: list) -> None:
    # 1.5 was read as 1, 2**70 was an OverflowError traceback.
    make_cifar(tmp_path)
    data = np.zeros((5, 3072), dtype=np.uint8)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps({b"data": data, b"labels": labels}))
    with pytest.raises(UsageError) as info:
        load_dataset("cifar10", data_dir=tmp_path)
    assert str(info.value).endswith("test_batch: 'labels' must be a list of integers from 0 to 9")


def test_idx_files_of_two_image_sizes_are_refused(tmp_path: Path) -> None:
    # The run's first evaluation was a shape-mismatch traceback, after its folder was made.
    make_mnist_raw(tmp_path)
    write_idx(tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte", np.zeros((10, 8, 8), dtype=np.uint8))
    with pytest.raises(UsageError) as info:
        load_dataset("mnist", data_dir=tmp_path)
    assert str(info.value) == ("dataset: mnist's training images are 1x28x28 but its test images 1x8x8; are its "
                               "files from one dataset?")


def test_cifar10_missing_and_corrupt_batch(tmp_path: Path) -> None:
    make_cifar(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    (folder / "test_batch").write_bytes(b"\x80\x04\x95garbage")
    with pytest.raises(UsageError, match="test_batch"):
        load_dataset("cifar10", data_dir=tmp_path)
    (folder / "test_batch").unlink()
    with pytest.raises(UsageError, match=r"test_batch.*--download"):
        load_dataset("cifar10", data_dir=tmp_path)


# ---------------------------------------------------------------------------------------------
# Sharding


LABELS = torch.arange(1000) % 10


def assert_partition(shards: list[torch.Tensor], n: int, n_workers: int) -> None:
    assert len(shards) == n_workers
    assert all(s.dtype == torch.int64 and s.numel() > 0 for s in shards)
    assert sorted(torch.cat(shards).tolist()) == list(range(n))


@pytest.mark.parametrize("spec", ["iid", "dirichlet:0.5", "dirichlet:0.01", "by-class"])
@pytest.mark.parametrize("n_workers", [1, 3, 10, 25, 200])
def test_every_scheme_is_a_partition(spec: str, n_workers: int) -> None:
    shards = shard_indices(LABELS, n_workers, spec, seed=0)
    assert_partition(shards, 1000, n_workers)
    assert all(torch.equal(s, s.sort().values) for s in shards)


@settings(max_examples=40, deadline=None)
@given(
    labels=st.lists(st.integers(0, 6), min_size=1, max_size=60),
    data=st.data(),
    spec=st.sampled_from(["iid", "dirichlet:0.05", "dirichlet:3", "by-class"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_partition_property(labels: list[int], data: st.DataObject, spec: str, seed: int) -> None:
    n_workers = data.draw(st.integers(1, len(labels)))
    shards = shard_indices(torch.tensor(labels), n_workers, spec, seed)
    assert_partition(shards, len(labels), n_workers)


def test_iid_sizes_and_seeds() -> None:
    shards = shard_indices(LABELS, 7, "iid", seed=3)
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1
    again = shard_indices(LABELS, 7, "iid", seed=3)
    other = shard_indices(LABELS, 7, "iid", seed=4)
    assert all(torch.equal(a, b) for a, b in zip(shards, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(shards, other, strict=True))
    # Random, not contiguous blocks of the index range.
    assert shards[0].max() - shards[0].min() > 500


def mean_entropy(shards: list[torch.Tensor], labels: torch.Tensor) -> float:
    total = 0.0
    for row in shard_stats(labels, shards, 10):
        p = np.array(row["class_counts"], dtype=float) / row["samples"]
        total -= float(np.sum(p[p > 0] * np.log(p[p > 0])))
    return total / len(shards)


def test_dirichlet_alpha_controls_skew() -> None:
    skewed = mean_entropy(shard_indices(LABELS, 10, "dirichlet:0.1", seed=0), LABELS)
    even = mean_entropy(shard_indices(LABELS, 10, "dirichlet:1000", seed=0), LABELS)
    assert even > 0.97 * math.log(10)
    assert skewed < 0.7 * math.log(10)
    a = shard_indices(LABELS, 10, "dirichlet:0.5", seed=1)
    b = shard_indices(LABELS, 10, "dirichlet:0.5", seed=1)
    c = shard_indices(LABELS, 10, "dirichlet:0.5", seed=2)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))


def test_dirichlet_never_leaves_a_worker_empty() -> None:
    labels = torch.arange(60) % 3
    for seed in range(5):
        assert_partition(shard_indices(labels, 60, "dirichlet:0.001", seed), 60, 60)


def test_by_class_round_robin() -> None:
    shards = shard_indices(LABELS, 10, "by-class", seed=0)
    assert [set(LABELS[s].tolist()) for s in shards] == [{c} for c in range(10)]
    shards = shard_indices(LABELS, 3, "by-class", seed=5)
    assert [set(LABELS[s].tolist()) for s in shards] == [{0, 3, 6, 9}, {1, 4, 7}, {2, 5, 8}]


def test_by_class_more_workers_than_classes() -> None:
    shards = shard_indices(LABELS, 25, "by-class", seed=0)
    for w, shard in enumerate(shards):
        assert set(LABELS[shard].tolist()) == {w % 10}
    # Class 0 (100 samples) is shared by workers 0, 10 and 20: an even split.
    assert sorted(len(shards[w]) for w in (0, 10, 20)) == [33, 33, 34]
    other = shard_indices(LABELS, 25, "by-class", seed=1)
    assert not torch.equal(shards[0], other[0])


def test_shard_stats_counts() -> None:
    shards = shard_indices(LABELS, 4, "dirichlet:0.3", seed=0)
    stats = shard_stats(LABELS, shards, 10)
    assert [row["worker"] for row in stats] == [0, 1, 2, 3]
    assert sum(row["samples"] for row in stats) == 1000
    per_class = np.sum([row["class_counts"] for row in stats], axis=0)
    assert per_class.tolist() == [100] * 10
    for row, shard in zip(stats, shards, strict=True):
        assert row["class_counts"] == torch.bincount(LABELS[shard], minlength=10).tolist()


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("iid", ("iid", None)),
        ("by-class", ("by-class", None)),
        ("dirichlet:0.5", ("dirichlet", 0.5)),
        ("dirichlet:10", ("dirichlet", 10.0)),
    ],
)
def test_parse_sharding(spec: str, expected: tuple[str, float | None]) -> None:
    assert parse_sharding(spec) == expected


@pytest.mark.parametrize(
    "spec", ["dirichlet:-1", "dirichlet:0", "dirichlet:x", "dirichlet:", "dirichlet:nan", "foo", "IID:", ""]
)
def test_bad_sharding(spec: str) -> None:
    with pytest.raises(UsageError) as info:
        shard_indices(LABELS, 4, spec, seed=0)
    assert info.value.field == "sharding"
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("n_workers", [0, -2, 1001])
def test_bad_worker_count(n_workers: int) -> None:
    with pytest.raises(UsageError) as info:
        shard_indices(LABELS, n_workers, "iid", seed=0)
    assert info.value.field == "workers"


def test_a_run_records_the_data_folder_it_read_and_resumes_without_torchvision(
    cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # config.toml keeps data_dir = "" under PNNCTL_DATA (a resume elsewhere follows that machine's folder),
    # so nothing said where the data came from; and a --download run could not resume without torchvision.
    data = tmp_path / "data"
    make_mnist_raw(data)
    monkeypatch.setenv("PNNCTL_DATA", str(data))
    args = ["train", "--strategy", "centralized", "--dataset", "mnist", "--model", "mlp:784-16-10", "--epochs", "1",
            "--batch-size", "10", "--out", str(tmp_path / "out"), "--run-name", "r", "--download"]
    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", None)
    assert cli(*args).code == 0
    run = tmp_path / "out" / "r"
    assert json.loads((run / "env.json").read_text())["data_dir"] == str(data.resolve())
    assert cli(*args, "--epochs", "2", "--resume").code == 0
    assert json.loads((run / "summary.json").read_text())["final"]["epoch"] == 2
