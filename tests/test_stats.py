"""pnnctl.stats on hand-built metrics tables whose answers are worked out by hand."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pnnctl.errors import UsageError
from pnnctl.network import NETWORK_PRESETS, NetworkModel
from pnnctl.schema import METRIC_COLUMNS
from pnnctl.stats import cell_summary, fastest_to_target, load_metrics, project_time, run_summaries


def run_rows(
    strategy: str,
    seed: int,
    accs: list[float],
    *,
    workers: int = 4,
    bytes_per_round: float = 1000.0,
    messages_per_round: float = 2.0,
    compute_per_round: float = 1.0,
    params: float = 100.0,
    memory: list[float] | None = None,
    status: str = "finished",
) -> list[dict[str, object]]:
    """One run's rows: round r (1-based) has cumulative figures r * per-round figure."""
    run_id = f"{strategy}-w{workers}-s{seed}"
    rows = []
    for i, acc in enumerate(accs):
        r = i + 1
        compute = r * compute_per_round
        rows.append(
            {
                "run_id": run_id,
                "strategy": strategy,
                "dataset": "mnist",
                "model": "mlp",
                "seed": seed,
                "workers": workers,
                "world_size": 1,
                "backend": "sim",
                "round": r * 10,
                "epoch": r,
                "samples_seen": r * 600,
                "phase": "train",
                "wall_s": compute + 0.5,
                "compute_s": compute,
                "train_loss": 1.0 / r,
                "test_loss": 1.0 / r,
                "test_acc": acc,
                "bytes_sent_total": r * bytes_per_round * workers,
                "bytes_recv_total": r * bytes_per_round * workers,
                "bytes_sent_max_worker": r * bytes_per_round,
                "bytes_recv_max_worker": r * bytes_per_round,
                "messages_total": r * messages_per_round * workers,
                "messages_max_worker": r * messages_per_round,
                "params_max_worker": params,
                "memory_max_worker_bytes": memory[i] if memory else 4 * params,
                "comm_s": 0.0,
                "projected_s": compute + r * 0.1,
                "network": "lan-1g",
                "peak_rss_bytes": 1e8 * (1 + i % 2),  # up and down: its figure is the maximum
                "status": "running" if r < len(accs) else status,
                "extras": '{"consensus_error": 0.5, "note": "a,b"}',
            }
        )
    return rows


def table(*runs: list[dict[str, object]]) -> pd.DataFrame:
    return pd.DataFrame([row for rows in runs for row in rows], columns=list(METRIC_COLUMNS))


@pytest.fixture
def metrics() -> pd.DataFrame:
    return table(
        # "fast": seed 0 reaches 0.8 at epoch 3 (exactly, so >= matters), seed 1 at epoch 2.
        run_rows("fast", 0, [0.5, 0.7, 0.8, 0.85, 0.82]),
        run_rows("fast", 1, [0.6, 0.9, 0.88, 0.92, 0.95], memory=[400, 500, 450, 300, 300]),
        # "slow" never reaches 0.8.
        run_rows("slow", 0, [0.3, 0.4, 0.5, 0.6, 0.7], status="diverged"),
        run_rows("slow", 1, [0.2, 0.4, 0.6, 0.7, 0.75]),
    )


def test_run_summaries_final_best_and_to_target(metrics: pd.DataFrame) -> None:
    runs = run_summaries(metrics, 0.8).set_index("run_id")
    assert list(runs.index) == ["fast-w4-s0", "fast-w4-s1", "slow-w4-s0", "slow-w4-s1"]
    fast0 = runs.loc["fast-w4-s0"]
    assert fast0["final_acc"] == 0.82
    assert fast0["best_acc"] == 0.85
    assert fast0["epochs"] == 5 and fast0["rounds"] == 50
    assert fast0["status"] == "finished"
    assert fast0["cell"] == "fast/mnist/mlp/w4"
    # First crossing with >=: 0.8 exactly at epoch 3.
    assert fast0["reached_target"]
    assert fast0["epochs_to_target"] == 3
    assert fast0["wall_s_to_target"] == 3.5
    assert fast0["projected_s_to_target"] == pytest.approx(3.3)
    assert fast0["bytes_to_target"] == 3000
    assert fast0["messages_to_target"] == 6
    fast1 = runs.loc["fast-w4-s1"]
    assert fast1["epochs_to_target"] == 2  # first crossing, not the later dip back to 0.88
    assert fast1["memory_max_worker_bytes"] == 500  # maximum, not final
    assert fast1["peak_rss_bytes"] == 2e8 and runs.loc["fast-w4-s0"]["peak_rss_bytes"] == 2e8
    assert fast1["bytes_sent_max_worker"] == 5000  # final cumulative
    slow0 = runs.loc["slow-w4-s0"]
    assert slow0["status"] == "diverged"
    assert not slow0["reached_target"]
    assert math.isnan(slow0["epochs_to_target"]) and math.isnan(slow0["bytes_to_target"])


def test_run_summaries_without_target(metrics: pd.DataFrame) -> None:
    runs = run_summaries(metrics, None)
    assert not runs["reached_target"].any()
    assert runs["epochs_to_target"].isna().all()
    assert runs["target_acc"].isna().all()


def test_target_must_be_a_fraction(metrics: pd.DataFrame) -> None:
    with pytest.raises(UsageError, match="target_acc"):
        run_summaries(metrics, 80.0)


def test_cell_summary_means_and_sample_std(metrics: pd.DataFrame) -> None:
    cells = cell_summary(run_summaries(metrics, 0.8)).set_index("strategy")
    assert list(cells.index) == ["fast", "slow"]
    fast = cells.loc["fast"]
    assert fast["n_seeds"] == 2
    assert fast["final_acc_mean"] == pytest.approx((0.82 + 0.95) / 2)
    # Sample std of two values a, b is |a - b| / sqrt(2).
    assert fast["final_acc_std"] == pytest.approx(abs(0.82 - 0.95) / math.sqrt(2))
    assert fast["best_acc_mean"] == pytest.approx((0.85 + 0.95) / 2)
    assert fast["n_reached"] == 2 and fast["reached_target_frac"] == 1.0
    assert fast["epochs_to_target_mean"] == 2.5
    assert fast["epochs_to_target_std"] == pytest.approx(math.sqrt(0.5))
    assert fast["bytes_to_target_mean"] == 2500
    assert fast["memory_max_worker_bytes_mean"] == pytest.approx((400 + 500) / 2)

    slow = cells.loc["slow"]
    assert slow["n_reached"] == 0 and slow["reached_target_frac"] == 0.0
    assert math.isnan(slow["epochs_to_target_mean"]) and math.isnan(slow["projected_s_to_target_mean"])
    assert slow["statuses"] == "diverged:1, finished:1"


def test_cell_summary_three_seeds_and_partial_reach() -> None:
    metrics = table(
        run_rows("a", 0, [0.1, 0.9]),
        run_rows("a", 1, [0.2, 0.6]),
        run_rows("a", 2, [0.9, 0.9]),
    )
    cell = cell_summary(run_summaries(metrics, 0.9)).iloc[0]
    assert cell["n_seeds"] == 3
    assert cell["final_acc_mean"] == pytest.approx(0.8)
    assert cell["final_acc_std"] == pytest.approx(np.std([0.9, 0.6, 0.9], ddof=1))
    # Means over reached seeds only: epochs 2 and 1.
    assert cell["n_reached"] == 2
    assert cell["reached_target_frac"] == pytest.approx(2 / 3)
    assert cell["epochs_to_target_mean"] == 1.5


def test_a_diverged_seed_is_not_counted_behind_the_final_accuracy() -> None:
    # Two of three seeds ended on NaN: the mean is the survivor's, and it read "9.86 (n=3)".
    from pnnctl.report import render_table

    metrics = table(
        run_rows("a", 0, [0.5, math.nan], status="diverged"),
        run_rows("a", 1, [0.6, 0.7]),
        run_rows("a", 2, [0.4, math.nan], status="diverged"),
    )
    cells = cell_summary(run_summaries(metrics, None))
    assert cells.iloc[0]["n_seeds"] == 3 and cells.iloc[0]["n_final_acc"] == 1
    assert cells.iloc[0]["final_acc_mean"] == pytest.approx(0.7)
    row = render_table(cells)[0]
    assert row["final acc % (mean ± std, n)"] == "70.00 (n=1)"
    assert row["best acc % (mean ± std, n)"] == "53.33 ± 15.28 (n=3)"
    assert row["run statuses"] == "diverged:2, finished:1"


def test_one_seed_has_nan_std() -> None:
    cell = cell_summary(run_summaries(table(run_rows("a", 0, [0.5, 0.6])), 0.5)).iloc[0]
    assert cell["n_seeds"] == 1
    assert cell["final_acc_mean"] == 0.6
    assert math.isnan(cell["final_acc_std"])
    assert math.isnan(cell["epochs_to_target_std"])


def test_cell_column_overrides_the_built_key() -> None:
    metrics = table(run_rows("a", 0, [0.5]), run_rows("a", 1, [0.7]), run_rows("a", 2, [0.9]))
    metrics["cell"] = ["lr-0.1", "lr-0.1", "lr-0.3"]
    cells = cell_summary(run_summaries(metrics, None)).set_index("cell")
    assert cells.loc["lr-0.1", "n_seeds"] == 2
    assert cells.loc["lr-0.3", "n_seeds"] == 1


def test_project_time_by_hand() -> None:
    metrics = table(
        run_rows("a", 0, [0.5, 0.6], bytes_per_round=1e6, messages_per_round=10, compute_per_round=2)
    )
    network = NetworkModel("test", 0.01, 1e6)
    # Second row: compute 4 s + 20 messages * 10 ms + 2e6 B / 1e6 B/s = 4 + 0.2 + 2.
    projected = project_time(metrics, network)
    assert list(projected) == pytest.approx([2 + 0.1 + 1, 6.2])
    assert projected.index.equals(metrics.index)


def test_fastest_to_target_depends_on_the_network() -> None:
    # "chatty" computes fast but sends 1 GB per round; "frugal" computes 5x slower but sends 10 MB.
    chatty = dict(bytes_per_round=1e9, messages_per_round=100, compute_per_round=10)
    frugal = dict(bytes_per_round=1e7, messages_per_round=10, compute_per_round=50)
    metrics = table(
        run_rows("chatty", 0, [0.5, 0.9], **chatty),
        run_rows("chatty", 1, [0.95, 0.95], **chatty),
        run_rows("frugal", 0, [0.9, 0.9], **frugal),
        run_rows("frugal", 1, [0.5, 0.92], **frugal),
        run_rows("never", 0, [0.1, 0.2]),
    )
    networks = [NETWORK_PRESETS["wan"], NETWORK_PRESETS["dc-100g"]]
    result = fastest_to_target(metrics, 0.9, networks)
    assert list(result.index) == ["wan", "dc-100g"]
    chatty_cell, frugal_cell, never_cell = "chatty/mnist/mlp/w4", "frugal/mnist/mlp/w4", "never/mnist/mlp/w4"
    assert list(result.columns) == [chatty_cell, frugal_cell, never_cell, "fastest"]

    wan, dc = NETWORK_PRESETS["wan"], NETWORK_PRESETS["dc-100g"]
    # chatty reaches at round 2 (seed 0) and round 1 (seed 1); frugal at round 1 and round 2.
    chatty_wan = np.mean([20 + wan.seconds(200, 2e9), 10 + wan.seconds(100, 1e9)])
    frugal_wan = np.mean([50 + wan.seconds(10, 1e7), 100 + wan.seconds(20, 2e7)])
    assert result.loc["wan", chatty_cell] == pytest.approx(chatty_wan)
    assert result.loc["wan", frugal_cell] == pytest.approx(frugal_wan)
    assert result.loc["wan", "fastest"] == frugal_cell
    assert result.loc["dc-100g", chatty_cell] == pytest.approx(
        np.mean([20 + dc.seconds(200, 2e9), 10 + dc.seconds(100, 1e9)])
    )
    assert result.loc["dc-100g", "fastest"] == chatty_cell
    assert result[never_cell].isna().all()


def test_fastest_is_chosen_within_each_dataset_of_a_grid() -> None:
    # A target is a different bar on other data: "a" wins on easy data in 5 s, "b" on hard data in 20 s;
    # one winner over both would always name the easy dataset's cell.
    def on(dataset: str, rows: list[dict[str, object]]) -> list[dict[str, object]]:
        return [{**row, "dataset": dataset, "run_id": f"{row['run_id']}-{dataset}"} for row in rows]

    metrics = table(
        on("easy", run_rows("a", 0, [0.95], compute_per_round=5)),
        on("easy", run_rows("b", 0, [0.95], compute_per_round=8)),
        on("hard", run_rows("a", 0, [0.5, 0.5, 0.95], compute_per_round=10)),
        on("hard", run_rows("b", 0, [0.5, 0.95], compute_per_round=10)),
    )
    result = fastest_to_target(metrics, 0.9, [NETWORK_PRESETS["dc-100g"]])
    assert list(result.columns) == ["a/easy/mlp/w4", "a/hard/mlp/w4", "b/easy/mlp/w4", "b/hard/mlp/w4",
                                    "fastest on easy", "fastest on hard"]
    assert result.loc["dc-100g", "fastest on easy"] == "a/easy/mlp/w4"
    assert result.loc["dc-100g", "fastest on hard"] == "b/hard/mlp/w4"
    assert result.loc["dc-100g", "b/hard/mlp/w4"] == pytest.approx(20 + NETWORK_PRESETS["dc-100g"].seconds(4, 2000))
    from pnnctl.report import _fastest_rows

    assert _fastest_rows(result)[-2:] == [
        {"cell": "**fastest on easy**", "dc-100g": "a/easy/mlp/w4"},
        {"cell": "**fastest on hard**", "dc-100g": "b/hard/mlp/w4"},
    ]


def test_cells_read_worker_counts_as_numbers_in_the_tables() -> None:
    metrics = table(*(run_rows("a", 0, [0.5, 0.95], workers=w) for w in (16, 8, 2)))
    order = ["a/mnist/mlp/w2", "a/mnist/mlp/w8", "a/mnist/mlp/w16"]  # as strings: w16, w2, w8
    assert list(cell_summary(run_summaries(metrics, 0.9))["cell"]) == order
    assert list(fastest_to_target(metrics, 0.9, [NETWORK_PRESETS["wan"]]).columns) == [*order, "fastest"]


def test_cell_labels_keep_only_what_differs_between_cells() -> None:
    from pnnctl.stats import cell_labels, shared_cell_parts

    def cells(*rows: tuple[str, str, str, int, str]) -> pd.DataFrame:
        return pd.DataFrame(rows, columns=["strategy", "dataset", "model", "workers", "cell"])

    varied = cells(
        ("local-sgd", "digits", "mlp:64-32-10", 2, "local-sgd/digits/mlp:64-32-10/w2/local_steps=5"),
        ("local-sgd", "digits", "mlp:64-32-10", 4, "local-sgd/digits/mlp:64-32-10/w4/local_steps=40"),
        ("allreduce", "digits", "mlp:64-32-10", 1, "allreduce/digits/mlp:64-32-10/w1"),
        ("psl", "digits", "mlp:64-32-10", 2, "my psl run"),  # not built from its columns: kept whole
    )
    assert list(cell_labels(varied).values()) == [
        "local-sgd · 2 workers · local_steps=5", "local-sgd · 4 workers · local_steps=40", "allreduce · 1 worker",
        "my psl run",
    ]
    assert shared_cell_parts(varied) == ["dataset digits", "model mlp:64-32-10"]
    two_tasks = cells(
        ("ist", "digits", "mlp", 4, "ist/digits/mlp/w4"), ("ist", "synthetic", "mlp", 4, "ist/synthetic/mlp/w4")
    )
    assert list(cell_labels(two_tasks).values()) == ["ist · digits", "ist · synthetic"]
    assert shared_cell_parts(two_tasks) == ["model mlp", "4 workers"]
    # A grid over --vary model: the variant names each cell's model, so the label does not again.
    spec = "mlp:64-32-10,bias=false"
    two_models = cells(
        ("local-sgd", "digits", "mlp:64-16-10", 2, "local-sgd/digits/mlp:64-16-10/w2/model=mlp:64-16-10"),
        ("local-sgd", "digits", spec, 2, f"local-sgd/digits/{spec}/w2/model={spec},lr=0.1"),
    )
    assert list(cell_labels(two_models).values()) == [
        "local-sgd · model=mlp:64-16-10", f"local-sgd · model={spec},lr=0.1"
    ]


def test_fastest_is_nan_when_nobody_reaches() -> None:
    result = fastest_to_target(table(run_rows("a", 0, [0.1])), 0.9, [NETWORK_PRESETS["wan"]])
    assert pd.isna(result.loc["wan", "fastest"])
    with pytest.raises(UsageError, match="target_acc"):
        fastest_to_target(table(run_rows("a", 0, [0.1])), None, [NETWORK_PRESETS["wan"]])  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# Loading from folders


def write_csv(path: Path, rows: list[dict[str, object]], *, torn: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = table(rows).to_csv(index=False, lineterminator="\n")
    path.write_text(text + torn, encoding="utf-8")


def test_load_run_folder(tmp_path: Path) -> None:
    write_csv(tmp_path / "metrics.csv", run_rows("a", 0, [0.5, 0.6, 0.7]))
    loaded = load_metrics(tmp_path)
    assert len(loaded) == 3
    assert list(loaded["test_acc"]) == [0.5, 0.6, 0.7]
    assert loaded["seed"].dtype == "int64" and loaded["workers"].dtype == "int64"
    assert loaded["extras"].iloc[0] == '{"consensus_error": 0.5, "note": "a,b"}'
    assert set(METRIC_COLUMNS) <= set(loaded.columns)


def test_load_compare_folder(tmp_path: Path) -> None:
    write_csv(tmp_path / "runs" / "a-w4-s0" / "metrics.csv", run_rows("a", 0, [0.5, 0.6]))
    write_csv(tmp_path / "runs" / "b-w4-s0" / "metrics.csv", run_rows("b", 0, [0.4, 0.5, 0.9]))
    (tmp_path / "runs" / "c-w4-s0").mkdir()  # a run that has not evaluated yet
    loaded = load_metrics(tmp_path)
    assert len(loaded) == 5
    assert sorted(loaded["run_id"].unique()) == ["a-w4-s0", "b-w4-s0"]
    cells = cell_summary(run_summaries(loaded, 0.9))
    assert list(cells["n_reached"]) == [0, 1]


def test_torn_final_line_is_skipped(tmp_path: Path) -> None:
    write_csv(tmp_path / "metrics.csv", run_rows("a", 0, [0.5, 0.6]), torn="a-w4-s0,a,mnist,mlp,0,4,1,si")
    loaded = load_metrics(tmp_path)
    assert len(loaded) == 2
    assert loaded["test_acc"].iloc[-1] == 0.6


def test_not_a_results_folder(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello", encoding="utf-8")
    with pytest.raises(UsageError, match="not a pnnctl results folder") as info:
        load_metrics(tmp_path)
    assert info.value.field == "folder"
    assert "\n" not in str(info.value)
    with pytest.raises(UsageError, match="not a pnnctl results folder"):
        load_metrics(tmp_path / "missing")


def test_csv_without_metrics_columns(tmp_path: Path) -> None:
    (tmp_path / "metrics.csv").write_text("a,b\n1,2\n", encoding="utf-8")
    with pytest.raises(UsageError, match="lacks the metrics columns"):
        load_metrics(tmp_path)


@pytest.mark.parametrize(
    ("strategy", "fields"),
    [
        ("psl", dict(model="psnet", workers=3, batch_size=20, optimizer="adam", lr=1e-3)),  # a master
        ("ist", dict(model="mlp:64-32-10", workers=2)),  # a master
        ("allreduce", dict(model="mlp:64-32-10", workers=4)),  # symmetric workers
    ],
)
@pytest.mark.parametrize("network", ["lan-1g", "wan"])
def test_reprojecting_a_run_on_its_own_network_gives_its_projected_time(
    strategy: str, fields: dict, network: str, tmp_path: Path
) -> None:
    # The master sends and receives most of psl's and ist's bytes: a projection from the busiest
    # worker alone put psl at a third of its own projected time on the same network.
    import pnnctl
    from pnnctl.config import RunConfig

    config = RunConfig(strategy=strategy, dataset="digits", epochs=0.3, eval_every=0.1, device="cpu",
                       network=network, out=str(tmp_path), **fields)  # fmt: skip
    metrics, _ = pnnctl.run(config)
    assert float(metrics["bytes_recv_master"].iloc[-1]) > 0 or strategy == "allreduce"
    reprojected = project_time(metrics, NETWORK_PRESETS[network])
    assert list(reprojected) == pytest.approx(list(metrics["projected_s"].astype(float)), rel=1e-6, abs=1e-5)


def test_cells_that_reach_the_target_in_the_same_time_tie() -> None:
    # a and b meet an easy target at their first evaluation, in the same time: a tie, not a winner
    # that is merely first in sort order (with a target the untrained models meet, every cell ties at 0 s).
    metrics = table(
        run_rows("a", 0, [0.5, 0.9], compute_per_round=2),
        run_rows("b", 0, [0.5, 0.85], compute_per_round=2),
        run_rows("c", 0, [0.05, 0.9], compute_per_round=3),
    )
    result = fastest_to_target(metrics, 0.1, [NETWORK_PRESETS["wan"]])
    assert result.loc["wan", "fastest"] == ("a/mnist/mlp/w4", "b/mnist/mlp/w4")
    from pnnctl.report import _fastest_rows

    assert _fastest_rows(result)[-1] == {"cell": "**fastest**", "wan": "tie: a/mnist/mlp/w4 = b/mnist/mlp/w4"}
    assert fastest_to_target(metrics, 0.9, [NETWORK_PRESETS["wan"]]).loc["wan", "fastest"] == "a/mnist/mlp/w4"
