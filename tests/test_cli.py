"""The command line: every user mistake is exit 2 and one ``error:`` line; list and --format json."""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from pnnctl.data import DATASETS
from strategies import STRATEGIES

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--dataset", "digits", "--model", "mlp:64-16-10", "--epochs", "0.1", "--device", "cpu"]
GRID = ["--strategies", "local-sgd", "--datasets", "digits", "--model", "mlp:64-16-10", "--epochs", "0.1"]


def idx_file(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def corrupt_mnist(root: Path) -> Path:
    """A complete MNIST folder whose training images file is garbage."""
    raw = root / "MNIST" / "raw"
    idx_file(raw / "train-labels-idx1-ubyte", np.arange(20) % 10)
    idx_file(raw / "t10k-images-idx3-ubyte", np.zeros((10, 28, 28)))
    idx_file(raw / "t10k-labels-idx1-ubyte", np.arange(10))
    (raw / "train-images-idx3-ubyte").write_bytes(b"this is not an IDX file, just some garbage bytes" * 3)
    return root


def mnist_without_test_images(root: Path) -> Path:
    """A readable MNIST folder whose test files hold zero images."""
    raw = root / "MNIST" / "raw"
    idx_file(raw / "train-images-idx3-ubyte", np.zeros((20, 28, 28)))
    idx_file(raw / "train-labels-idx1-ubyte", np.arange(20) % 10)
    idx_file(raw / "t10k-images-idx3-ubyte", np.zeros((0, 28, 28)))
    idx_file(raw / "t10k-labels-idx1-ubyte", np.zeros(0))
    return root


# Each case: (id, argv built from tmp_path and monkeypatch, what the error line starts with or contains).
Case = tuple[str, Callable[[Path, pytest.MonkeyPatch], list[str]], str]

BAD_INPUTS: list[Case] = [
    ("unknown strategy", lambda t, m: ["train", "--strategy", "gossip-magic", *TINY], "error: strategy:"),
    ("unknown dataset", lambda t, m: ["train", *TINY, "--dataset", "imagenet"], "error: dataset:"),
    ("unknown emnist split", lambda t, m: ["train", *TINY, "--dataset", "emnist-shapes"], "error: dataset:"),
    ("unknown model family", lambda t, m: ["train", *TINY, "--model", "transformer:3"], "error: model:"),
    ("model does not fit the data", lambda t, m: ["train", *TINY, "--model", "mlp:784-32-10"], "error: model:"),
    ("lenet on 8x8 digits", lambda t, m: ["train", *TINY, "--model", "lenet"], "error: model:"),
    ("zero workers", lambda t, m: ["train", *TINY, "--strategy", "allreduce", "--workers", "0"], "error: workers:"),
    ("negative lr", lambda t, m: ["train", *TINY, "--lr", "-0.1"], "error: lr:"),
    ("zero epochs", lambda t, m: ["train", *TINY, "--epochs", "0"], "error: epochs:"),
    ("non-numeric workers", lambda t, m: ["train", *TINY, "--workers", "four"], "error: "),
    ("unknown flag", lambda t, m: ["train", *TINY, "--turbo"], "error: "),
    (
        "bad TOML file",
        lambda t, m: ["train", *TINY, "--config", str(_write(t / "bad.toml", "lr = = 0.1\n[unclosed"))],
        "error: config:",
    ),
    ("missing TOML file", lambda t, m: ["train", *TINY, "--config", str(t / "nope.toml")], "error: "),
    ("unknown --set key", lambda t, m: ["train", *TINY, "--set", "learning_rate=0.1"], "error: learning_rate:"),
    (
        "unknown strategy option",
        lambda t, m: ["train", *TINY, "--strategy", "local-sgd", "--set", "local-sgd.bogus=1"],
        "error: local-sgd.bogus:",
    ),
    ("malformed --set", lambda t, m: ["train", *TINY, "--set", "lr"], "error: set:"),
    ("missing data dir for mnist", lambda t, m: _mnist_with_data_env(t / "empty", m), "MNIST"),
    ("no data dir at all for mnist", lambda t, m: _mnist_with_data_env(None, m), "error: data_dir:"),
    (
        "corrupt IDX file",
        lambda t, m: ["train", *TINY, "--dataset", "mnist", "--model", "mlp", "--data-dir", str(corrupt_mnist(t))],
        "train-images-idx3-ubyte",
    ),
    (
        "an IDX test file without images",  # it ended the first evaluation in a ZeroDivisionError
        lambda t, m: ["train", *TINY, "--dataset", "mnist", "--model", "mlp", "--data-dir",
                      str(mnist_without_test_images(t))],
        "t10k-images-idx3-ubyte: holds no images",
    ),
    ("negative dirichlet alpha", lambda t, m: ["train", *TINY, "--sharding", "dirichlet:-1"], "error: sharding:"),
    ("unknown sharding", lambda t, m: ["train", *TINY, "--sharding", "round-robin"], "error: sharding:"),
    ("unknown network", lambda t, m: ["train", *TINY, "--network", "moon"], "error: network:"),
    ("negative byte budget", lambda t, m: ["train", *TINY, "--budget", "bytes=-5"], "error: budget:"),
    ("unknown budget kind", lambda t, m: ["train", *TINY, "--budget", "joules=5"], "error: budget:"),
    ("unknown optimizer", lambda t, m: ["train", *TINY, "--optimizer", "lbfgs"], "error: optimizer:"),
    ("target accuracy above 1", lambda t, m: ["train", *TINY, "--target-acc", "1.5"], "error: target_acc:"),
    ("unknown output format", lambda t, m: ["train", *TINY, "--format", "xml"], "error: format:"),
    ("unknown device", lambda t, m: ["train", *TINY, "--device", "tpu"], "error: device:"),
    (
        "plot on a folder that holds no results",
        lambda t, m: ["plot", str(_write(t / "notes" / "readme.txt", "hello").parent)],
        "error: ",
    ),
    ("list of an unknown section", lambda t, m: ["list", "gpus"], "error: list:"),
    # A value listed twice in a grid used to make two cells of one run folder (the second then failed).
    ("a strategy twice in a grid", lambda t, m: ["compare", *GRID, "--strategies", "allreduce,allreduce"],
     "error: strategies: lists allreduce more than once"),
    ("a worker count twice in a grid", lambda t, m: ["compare", *GRID, "--workers", "2,4,2"],
     "error: workers: lists 2 more than once"),
    ("a --vary value twice", lambda t, m: ["compare", *GRID, "--vary", "local-sgd.local_steps=5,5"],
     "error: vary: lists local-sgd.local_steps=5 more than once"),
    ("a --vary key twice",  # the second replaced the first silently
     lambda t, m: ["compare", *GRID, "--vary", "local-sgd.local_steps=5", "--vary", "local-sgd.local_steps=10"],
     "error: vary: local-sgd.local_steps is given twice"),
    ("--vary values equal as numbers", lambda t, m: ["compare", *GRID, "--vary", "lr=1,1.0"],  # two cells, one run
     "error: vary: lists lr=1 and lr=1.0, the same value"),
    ("a [compare] seeds = true",  # read as 1 seed
     lambda t, m: ["compare", *GRID, "--config", str(_write(t / "grid.toml", "[compare]\nseeds = true\n"))],
     "error: seeds: must be an integer from 1 to 10000, not True"),
    ("a billion seeds", lambda t, m: ["compare", *GRID, "--seeds", "1000000000"],  # hung listing the runs
     "error: seeds: must be an integer from 1 to 10000, not 1000000000"),
    ("train --dry-run of a run its strategy refuses",  # it printed the config as if the run would start
     lambda t, m: ["train", *TINY, "--strategy", "psl", "--workers", "1000", "--dry-run"], "error: workers: psl"),
    # --vary over a field every cell sets itself labelled identical runs differently.
    ("a --vary over the worker count", lambda t, m: ["compare", *GRID, "--vary", "workers=2,4"],
     "error: vary: workers is an axis of the grid itself: list them with --workers"),
    ("a --vary over seeds", lambda t, m: ["compare", *GRID, "--vary", "seed=3,4"], "error: vary: seed is an axis"),
    ("synthetic.* on a grid without synthetic data", lambda t, m: ["compare", *GRID, "--vary", "synthetic.dim=4,8"],
     "error: vary: synthetic.dim: no dataset of the grid is synthetic (digits)"),
    ("a --vary of a strategy not in the grid", lambda t, m: ["compare", *GRID, "--vary", "dgd.topolgy=ring,star"],
     "error: vary: dgd.topolgy: dgd is not among the grid's strategies (local-sgd)"),
    ("a grid name that leaves --out", lambda t, m: ["compare", *GRID, "--name", ".."], "error: name: "),
    ("a [compare] table with a wrong type",
     lambda t, m: ["compare", *GRID, "--config", str(_write(t / "grid.toml", '[compare]\nworkers = [2, "four"]\n'))],
     "error: workers: must be integers such as [2, 4, 8], not [2, 'four']"),
    ("a config file that is not UTF-8",
     lambda t, m: ["train", *TINY, "--config", str(_write_bytes(t / "latin1.toml", b"lr = 0.1\n# caf\xe9\n"))],
     "error: config: "),
    ("a run name too long for a folder", lambda t, m: ["train", *TINY, "--run-name", "x" * 300],
     "error: run_name: must be a folder name of at most 255 bytes"),
    ("a single-worker strategy on two processes",  # it said "use --workers >= --nproc", which cannot help
     lambda t, m: ["train", *TINY, "--strategy", "centralized", "--workers", "2", "--nproc", "2"],
     "error: nproc: centralized trains one worker in one process, so it cannot use 2 processes; run it with --nproc 1"),
    ("more processes than a grid cell's workers", lambda t, m: ["compare", *GRID, "--workers", "2,4", "--nproc", "4"],
     "error: workers: 2 workers cannot fill 4 processes; use --workers >= --nproc (cell"),
]


def _mnist_with_data_env(folder: Path | None, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """``--dataset mnist`` with $PNNCTL_DATA an empty folder, or unset."""
    if folder is None:
        monkeypatch.delenv("PNNCTL_DATA", raising=False)
    else:
        folder.mkdir(parents=True, exist_ok=True)
        monkeypatch.setenv("PNNCTL_DATA", str(folder))
    return ["train", *TINY, "--dataset", "mnist", "--model", "mlp"]


def _write_bytes(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(("argv", "expected"), [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_exits_2_with_one_error_line(
    argv: Callable[[Path, pytest.MonkeyPatch], list[str]], expected: str, cli, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    args = argv(tmp_path, monkeypatch)
    if args[0] in ("train", "compare"):
        args += ["--out", str(tmp_path / "out")]
    result = cli(*args)
    assert result.code == 2, result.err
    assert len(result.err_lines) == 1, result.err
    line = result.err_lines[0]
    assert line.startswith("error: "), line
    assert line.startswith(expected) or expected in line, line
    assert "Traceback" not in result.err + result.out
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("metrics.csv"))


def test_cuda_device_without_cuda_exits_2(cli, tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    result = cli("train", *TINY, "--device", "cuda", "--out", str(tmp_path))
    assert result.code == 2
    assert len(result.err_lines) == 1
    assert result.err_lines[0].startswith("error: device:")


def test_bad_input_tables_have_at_least_twelve_cases() -> None:
    assert len(BAD_INPUTS) >= 12
    assert len({c[0] for c in BAD_INPUTS}) == len(BAD_INPUTS)


def test_list_prints_every_registered_strategy(cli) -> None:
    everything = cli("list")
    assert everything.code == 0
    strategies = cli("list", "strategies")
    assert strategies.code == 0
    assert STRATEGIES
    for name in STRATEGIES:
        assert name in everything.out
        assert name in strategies.out
    datasets = cli("list", "datasets")
    for name in DATASETS:
        assert name in datasets.out


def test_train_format_json_prints_the_summary_with_a_numeric_final_accuracy(cli, tmp_path: Path) -> None:
    # 0.1 epochs of digits at 2 x 32 train 3 steps, a third over: the run has a warning to report.
    result = cli("train", "--strategy", "allreduce", "--workers", "2", *TINY, "--epochs", "0.1",
                 "--out", str(tmp_path), "--format", "json")  # fmt: skip
    assert result.code == 0, result.err
    summary = json.loads(result.out)
    final_acc = summary["final"]["test_acc"]
    assert isinstance(final_acc, int | float) and not isinstance(final_acc, bool)
    assert 0.0 <= final_acc <= 1.0
    assert summary["status"] == "finished"
    # What summary.json holds, its warnings and per-rank measurements included (both used to be left out).
    on_disk = json.loads((tmp_path / "allreduce-w2-s0" / "summary.json").read_text())
    assert summary == on_disk
    assert summary["warnings"][0].startswith("trained 0.133 epochs (192 samples)") and summary["ranks"][0]["rank"] == 0


DIVERGING = ["train", "--strategy", "allreduce", "--workers", "2", "--dataset", "digits", "--model", "mlp:64-32-10",
             "--epochs", "1", "--lr", "1e8", "--set", "allreduce.steps_per_round=1", "--device", "cpu"]  # fmt: skip


def _strict_json(text: str):
    def refuse(constant: str):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_train_format_json_of_a_diverged_run_is_standard_json(cli, tmp_path: Path) -> None:
    result = cli(*DIVERGING, "--out", str(tmp_path), "--format", "json")
    assert json.loads(result.out)["status"] == "diverged"  # the lenient parser reads it
    summary = _strict_json(result.out)
    assert summary["final"]["test_acc"] is None or math.isnan(float(summary["final"]["test_acc"]))
    # summary.json too: a bare NaN in it stopped every standard JSON reader (JavaScript's, jq's).
    (written,) = tmp_path.glob("*/summary.json")
    assert _strict_json(written.read_text()) == summary
    again = cli(*DIVERGING, "--out", str(tmp_path), "--resume")  # prints the run from its summary.json
    assert again.code == result.code and "(diverged)" in again.out, again.err


def test_run_names_are_printed_as_typed(cli, tmp_path: Path) -> None:
    result = cli("train", *TINY, "--out", tmp_path, "--run-name", "run:x:2")
    assert result.code == 0
    assert "run:x:2: finished" in result.err and "❌" not in result.err + result.out  # rich's :x: emoji code


@pytest.mark.parametrize(
    ("optimizer", "lr"), [("sgd", "1e39"), ("adam", "1e38")], ids=["sgd-lr-beyond-float32", "adam-step-beyond-float32"]
)
def test_an_lr_beyond_float32_range_is_refused_or_diverges(optimizer: str, lr: str, cli, tmp_path: Path) -> None:
    result = cli("train", "--strategy", "allreduce", "--workers", "2", *TINY, "--optimizer", optimizer,
                 "--lr", lr, "--out", str(tmp_path))  # fmt: skip
    assert result.code in (2, 3)
    assert "error:" in result.err or "diverged" in result.err


def test_a_seed_beyond_64_bits_is_a_usage_error(cli, tmp_path: Path) -> None:
    result = cli("train", *TINY, "--seed", str(2**64), "--out", str(tmp_path))
    assert result.code == 2
    assert result.err_lines[-1].startswith("error: seed:")


def test_loss_flag_sets_the_loss_option_of_strategies_that_have_one(cli, tmp_path: Path) -> None:
    result = cli("train", "--strategy", "psl", *TINY, "--loss", "ce", "--dry-run")
    assert result.code == 0, result.err
    assert '[psl]\nloss = "ce"' in result.out
    refused = cli("train", "--strategy", "allreduce", *TINY, "--loss", "ce", "--dry-run")
    assert refused.code == 2 and refused.err_lines[-1].startswith("error: loss:")
    grid = cli("compare", "--strategies", "psl,allreduce", "--datasets", "digits", "--model", "mlp:64-16-10",
               "--loss", "ce", "--out", str(tmp_path), "--dry-run")
    assert grid.code == 0, grid.err
    # The loss is set before the config is checked: train refused what it makes valid (compare took it).
    squared = cli("train", "--strategy", "consensus", *TINY, "--loss", "squared", "--set",
                  "consensus.surrogate=gauss-newton", "--dry-run")  # fmt: skip
    assert squared.code == 0, squared.err
    assert 'loss = "squared"' in squared.out and 'surrogate = "gauss-newton"' in squared.out
    # One name for cross-entropy in a grid of strategies that spell it differently (psl: ce).
    for name in ("ce", "cross-entropy"):
        both = cli("compare", "--strategies", "psl,dgd", "--datasets", "digits", "--model", "mlp:64-16-10",
                   "--loss", name, "--out", str(tmp_path), "--dry-run")  # fmt: skip
        assert both.code == 0, both.err


def test_precision_flag_reaches_the_run_config_and_refuses_what_it_does_not_know(cli, tmp_path: Path) -> None:
    result = cli("train", *TINY, "--precision", "bf16", "--dry-run")
    assert result.code == 0, result.err
    assert 'precision = "bf16"' in result.out
    refused = cli("train", *TINY, "--precision", "fp8", "--dry-run")
    assert refused.code == 2
    assert refused.err_lines == ["error: precision: must be one of fp32, tf32, bf16, not 'fp8'"]
    run = cli("compare", "--strategies", "centralized", "--datasets", "digits", "--model", "mlp:64-16-10",
              "--epochs", "0.1", "--precision", "bf16", "--no-plots", "--out", str(tmp_path))  # fmt: skip
    assert run.code == 0, run.err
    config = tmp_path / "compare" / "runs" / "centralized-digits-w1-s0" / "config.toml"
    assert 'precision = "bf16"' in config.read_text()


def test_a_grids_warnings_are_printed_once_per_cell_with_the_seeds_that_gave_them() -> None:
    from pnnctl.cli import _seeds_together

    warnings = [("local-sgd-digits-w2-s0", "long rounds"), ("local-sgd-digits-w2-s1", "long rounds"),
                ("local-sgd-digits-w2-s2", "over budget"), ("local-sgd-digits-w4-s0", "long rounds"),
                ("local-sgd-digits-w2-local_steps=5-s3", "long rounds"), ("notebook-run", "long rounds")]  # fmt: skip
    assert _seeds_together(warnings) == [
        ("local-sgd-digits-w2-s0,1", "long rounds"), ("local-sgd-digits-w2-s2", "over budget"),
        ("local-sgd-digits-w4-s0", "long rounds"), ("local-sgd-digits-w2-local_steps=5-s3", "long rounds"),
        ("notebook-run", "long rounds"),
    ]


def test_help_shows_every_bracketed_word_of_the_options(cli) -> None:
    """Rich reads ``[word]`` in a help text as markup and drops it unless escaped."""

    import typer

    from pnnctl.cli import app

    checked = 0
    for name, command in typer.main.get_command(app).commands.items():  # type: ignore[attr-defined]
        texts = [command.help or "", *(getattr(param, "help", None) or "" for param in command.params)]
        bracketed = {word for text in texts for word in re.findall(r"\[[a-z][^\]]*\]", text.replace("\\[", "["))}
        shown = cli(name, "--help")
        assert shown.code == 0
        for word in bracketed:
            assert word in shown.out, f"{word} is missing from `pnnctl {name} --help`"
        checked += len(bracketed)
    assert checked  # --config's "[strategy] tables" at least


def test_list_shows_every_bracketed_word_of_the_descriptions(cli) -> None:
    """``alpha[n+1] = alpha[n]`` in consensus's option docs must not be read as rich markup."""
    import dataclasses

    from pnnctl.config import field_docs
    from pnnctl.models import MODEL_FAMILIES

    texts = [*DATASETS.values(), *(family.description for family in MODEL_FAMILIES.values())]
    for cls in STRATEGIES.values():
        docs = field_docs(cls.Options)
        texts += [cls.summary, *(docs.get(f.name, "") for f in dataclasses.fields(cls.Options))]
    bracketed = {word for text in texts for word in re.findall(r"\[[a-z][^\]]*\]", text)}
    assert "[n+1]" in bracketed
    shown = cli("list")
    assert shown.code == 0
    missing = [word for word in bracketed if word not in shown.out]
    assert not missing, f"`pnnctl list` dropped {missing}"


def test_progress_lines_print_no_training_loss_before_training(cli, tmp_path: Path) -> None:
    # The evaluation before any step has no training loss (NaN in metrics.csv); "loss nan" read as divergence.
    result = cli("train", *TINY, "--epochs", "1", "--eval-every", "0.5", "--out", tmp_path)
    assert result.code == 0, result.err
    lines = [line for line in result.err.splitlines() if ": epoch " in line]
    assert len(lines) == 3, result.err
    assert re.search(r": epoch 0\.00  acc \d+\.\d\d%$", lines[0]), lines[0]
    assert all(re.search(r"  loss \d+\.\d{4}  acc \d+\.\d\d%$", line) for line in lines[1:]), lines
    assert "nan" not in result.err


def test_the_progress_line_names_what_a_samples_budget_allows(cli, tmp_path: Path) -> None:
    from pnnctl.data import load_dataset

    n_train = len(load_dataset("digits").y_train)
    result = cli("train", *TINY, "--epochs", "5", "--budget", "samples=700", "--out", tmp_path)
    assert result.code == 0, result.err
    assert f"training for {700 / n_train:g} epochs" in result.err  # it said "training for 5 epochs"
