"""Figures and report of a small but realistic compare folder."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import matplotlib.image as mpimg
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from pnnctl.errors import UsageError
from pnnctl.network import NETWORK_PRESETS
from pnnctl.plots import mean_curve, pareto_front, plot_folder, strategy_colors
from pnnctl.report import render_table, write_report, write_summary_csv
from pnnctl.schema import METRIC_COLUMNS
from pnnctl.stats import cell_summary, fastest_to_target, load_metrics, run_summaries

STRATEGIES = ("allreduce", "gossip")
FIGURES = ("acc_vs_epoch", "acc_vs_bytes", "acc_vs_time", "pareto", "memory", "scaling")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(folder: Path, strategy: str, workers: int, seed: int) -> None:
    """Five evaluations with accuracies, traffic and timings that differ by strategy, workers and seed."""
    rng = np.random.default_rng([STRATEGIES.index(strategy) if strategy in STRATEGIES else 9, workers, seed])
    run_id = f"{strategy}-w{workers}-s{seed}"
    gossip = strategy == "gossip"
    per_round_bytes = (2e6 if gossip else 8e6) * (1 + 0.1 * seed) * (workers / 2)
    per_round_messages = 2 if gossip else 2 * (workers - 1)
    params = 50_000 if gossip else 100_000 / workers * 2
    rows = []
    for r in range(5):
        epoch = r + 0.5 * (r > 0)  # uneven spacing: seeds still share it, bytes and time do not
        acc = min(0.99, 0.3 + 0.13 * r * (0.8 if gossip else 1.0) + rng.uniform(-0.03, 0.03))
        compute = r * (3.0 if gossip else 2.0) * (1 + 0.05 * seed)
        comm = r * per_round_messages * 1e-4 + r * per_round_bytes / 125e6
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
                "round": r * 20,
                "epoch": epoch,
                "samples_seen": r * 60_000,
                "phase": "train",
                "wall_s": compute * 1.1,
                "compute_s": compute,
                "train_loss": 2.0 / (r + 1),
                "test_loss": 2.1 / (r + 1),
                "test_acc": acc,
                "bytes_sent_total": r * per_round_bytes * workers,
                "bytes_recv_total": r * per_round_bytes * workers,
                "bytes_sent_max_worker": r * per_round_bytes,
                "bytes_recv_max_worker": r * per_round_bytes,
                "messages_total": r * per_round_messages * workers,
                "messages_max_worker": r * per_round_messages,
                "params_max_worker": params,
                "memory_max_worker_bytes": params * 16 + 1e6 * (1 + seed * 0.01),
                "comm_s": comm,
                "projected_s": compute + comm,
                "network": "lan-1g",
                "peak_rss_bytes": 2e8,
                "status": "finished" if r == 4 else "running",
                "extras": "{}",
            }
        )
    path = folder / "runs" / run_id / "metrics.csv"
    path.parent.mkdir(parents=True)
    pd.DataFrame(rows, columns=list(METRIC_COLUMNS)).to_csv(path, index=False, lineterminator="\n")


@pytest.fixture(scope="module")
def compare(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """One compare folder plotted once for the whole module: plotting is the slow part."""
    folder = tmp_path_factory.mktemp("cmp")
    for strategy in STRATEGIES:
        for workers in (2, 4):
            for seed in (0, 1):
                write_run(folder, strategy, workers, seed)
    return folder, plot_folder(folder)


def test_every_figure_in_both_formats(compare: tuple[Path, list[Path]]) -> None:
    folder, written = compare
    expected = {folder / "figures" / f"{name}.{fmt}" for name in FIGURES for fmt in ("png", "svg")}
    assert set(written) == expected
    for name in FIGURES:
        png = folder / "figures" / f"{name}.png"
        data = png.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1024, name
        pixels = mpimg.imread(png)
        assert pixels.ndim == 3 and float(pixels.std()) > 0, name
        svg = (folder / "figures" / f"{name}.svg").read_text(encoding="utf-8")
        assert "<svg" in svg
        ET.fromstring(svg)  # well-formed XML
    # Atomic writes leave no temporary files behind.
    assert not [p for p in (folder / "figures").iterdir() if p.name.startswith(".")]


def test_report_links_table_and_command(compare: tuple[Path, list[Path]]) -> None:
    folder, written = compare
    metrics = load_metrics(folder)
    cells = cell_summary(run_summaries(metrics, 0.7))
    fastest = fastest_to_target(metrics, 0.7, [NETWORK_PRESETS["wan"], NETWORK_PRESETS["dc-100g"]])
    command = "pnnctl compare --strategies allreduce,gossip --workers 2,4 --seeds 2 --target-acc 0.7"
    summary_csv = write_summary_csv(folder, cells)
    assert pd.read_csv(summary_csv)["n_seeds"].tolist() == [2, 2, 2, 2]
    report = write_report(
        folder,
        command=command,
        env={"python": "3.11", "torch": "2.5", "cpu": {"cores": 2}},
        cells=cells,
        figures=written,
        target_acc=0.7,
        fastest=fastest,
        published={"gossip": "98.1% on MNIST (paper, Table 2)"},
    )
    text = report.read_text(encoding="utf-8")
    assert command in text
    assert "mean ± std" in text
    # Cells go by their legend names (what differs between them); the line above says what they share.
    assert "\nEvery cell: dataset mnist, model mlp.\n" in text
    for strategy in STRATEGIES:
        for workers in (2, 4):
            final = cells.set_index("cell").loc[f"{strategy}/mnist/mlp/w{workers}", "final_acc_mean"]
            assert f"\n| {strategy} · {workers} workers | {100 * final:.2f} ± " in text
    assert "## Fastest to target per network" in text and "| cell | reached (runs) | wan | dc-100g |" in text
    # A row per cell, how many of its runs reached the target (a cell where 1 of 2 did could win without a word),
    # seconds under each network; the winner row names a cell per network.
    reached = cells.set_index("cell").loc["gossip/mnist/mlp/w2", "n_reached"]
    assert re.search(rf"^\| gossip · 2 workers \| {reached}/2 \| [0-9.e+-]+ \| [0-9.e+-]+ \|$", text, re.M)
    assert re.search(r"^\| \*\*fastest\*\* \|  \| [a-z]+ · \d workers \| [a-z]+ · \d workers \|$", text, re.M)
    assert "## Published numbers" in text and "98.1% on MNIST" in text
    links = re.findall(r"\]\((figures/[^)]+)\)", text)
    assert "figures/acc_vs_epoch.png" in links and "figures/scaling.svg" in links
    for link in links:
        assert (folder / link).is_file(), link


def test_render_table_headers_name_the_aggregate(compare: tuple[Path, list[Path]]) -> None:
    folder, _ = compare
    rows = render_table(cell_summary(run_summaries(load_metrics(folder), None)))
    assert len(rows) == 4
    assert "final acc % (mean ± std, n)" in rows[0]
    assert not any("target" in header for header in rows[0])
    assert re.fullmatch(r"\d+\.\d\d ± \d+\.\d\d \(n=2\)", rows[0]["final acc % (mean ± std, n)"])


def test_strategy_colors_do_not_depend_on_order() -> None:
    first = strategy_colors(["gossip", "allreduce", "sil"])
    second = strategy_colors(["sil", "allreduce", "gossip", "allreduce"])
    assert first == second
    assert len(set(first.values())) == 3
    assert first["allreduce"] == "#1f77b4"  # tab10's first colour goes to the first name in sorted order


def test_single_worker_count_skips_scaling(tmp_path: Path) -> None:
    for strategy in STRATEGIES:
        write_run(tmp_path, strategy, 4, 0)
    write_run(tmp_path, "centralized", 1, 0)  # a baseline at 1 worker does not make the others' points a scaling
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "scaling.png").write_bytes(b"stale")
    written = plot_folder(tmp_path, formats=("png",), network=NETWORK_PRESETS["wan"])
    names = sorted(path.name for path in written)
    assert names == sorted(f"{name}.png" for name in FIGURES if name != "scaling")
    assert not (tmp_path / "figures" / "scaling.png").exists()
    assert not plt.get_fignums()  # every figure was closed


def test_plot_folder_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not a pnnctl results folder"):
        plot_folder(tmp_path)
    write_run(tmp_path, "allreduce", 2, 0)
    with pytest.raises(UsageError, match="formats"):
        plot_folder(tmp_path, formats=("bmpx",))


def test_mean_curve_interpolates_onto_the_common_range() -> None:
    x, mean, std = mean_curve(
        [(np.array([0.0, 2.0, 4.0]), np.array([0.0, 2.0, 4.0])), (np.array([1.0, 3.0]), np.array([3.0, 5.0]))]
    )
    # Common range is [1, 3]; the first seed is y = x, the second y = x + 2.
    assert list(x) == [1.0, 2.0, 3.0]
    assert list(mean) == pytest.approx([2.0, 3.0, 4.0])
    assert list(std) == pytest.approx([np.sqrt(2.0)] * 3)
    x, mean, std = mean_curve([(np.array([1.0, 2.0]), np.array([0.5, 0.6]))])
    assert list(mean) == [0.5, 0.6] and np.isnan(std).all()


def test_pareto_front() -> None:
    # (bytes, acc): the second point is dominated by the first (more bytes, lower accuracy).
    assert pareto_front([1.0, 2.0, 3.0, 0.5], [0.8, 0.7, 0.9, 0.6]) == [3, 0, 2]


def _two_dataset_cells() -> pd.DataFrame:
    # On "easy" data both strategies score far above either on "hard" data.
    return pd.DataFrame({
        "cell": ["a/easy/mlp/w2", "b/easy/mlp/w2", "a/hard/mlp/w2", "b/hard/mlp/w2"],
        "strategy": ["a", "b", "a", "b"],
        "dataset": ["easy", "easy", "hard", "hard"],
        "model": "mlp",
        "workers": 2,
        "bytes_sent_max_worker_mean": [1e6, 4e6, 2e6, 8e6],
        "bytes_sent_max_worker_std": np.nan,
        "final_acc_mean": [0.90, 0.95, 0.50, 0.60],
        "final_acc_std": np.nan,
        "n_seeds": 1,
    })


def test_each_dataset_of_a_grid_gets_its_own_pareto_front() -> None:
    from pnnctl.plots import _cell_styles, _fig_pareto

    cells = _two_dataset_cells()
    fig = _fig_pareto(cells, {cell: cell for cell in cells["cell"]}, _cell_styles(cells))
    fronts = {line.get_label(): list(line.get_xdata()) for line in fig.axes[0].lines
              if line.get_label().startswith("Pareto front")}
    plt.close(fig)
    # One front over both datasets would be the easy cells alone: every hard cell is dominated by them.
    assert fronts == {"Pareto front · easy": [1.0, 4.0], "Pareto front · hard": [2.0, 8.0]}


def test_memory_bars_get_error_bars_only_where_seeds_differ() -> None:
    from matplotlib.container import BarContainer

    from pnnctl.plots import _cell_styles, _fig_memory

    cells = _two_dataset_cells().assign(
        params_max_worker_mean=[1e6, 2e6, 3e6, 4e6], params_max_worker_std=[np.nan, 0.0, 0.0, 0.0],
        memory_max_worker_bytes_mean=[4e6, 8e6, 12e6, 16e6], memory_max_worker_bytes_std=[np.nan, 0.0, 2e6, 0.0],
    )
    fig = _fig_memory(cells, {cell: cell for cell in cells["cell"]}, _cell_styles(cells))
    bars = [next(c for c in ax.containers if isinstance(c, BarContainer)) for ax in fig.axes]
    plt.close(fig)
    # One seed (NaN) and no spread (0) draw nothing: a zero-height cap on every bar read as an exact spread.
    assert bars[0].errorbar is None
    lower_caps = np.asarray(bars[1].errorbar.lines[1][0].get_ydata(), float)
    assert np.isnan(lower_caps[[0, 1, 3]]).all() and lower_caps[2] == pytest.approx(10.0)  # 12 MB - 2 MB


def _drawn_caps(container: object) -> int:
    """How many error-bar caps of a matplotlib ErrorbarContainer have a place on the axes (NaN: none)."""
    caps = container.lines[1]  # type: ignore[attr-defined]
    return sum(int((np.isfinite(np.asarray(cap.get_xdata(), float)) & np.isfinite(np.asarray(cap.get_ydata(), float)))
                   .sum()) for cap in caps)  # fmt: skip


def test_pareto_points_get_error_bars_only_where_seeds_differ() -> None:
    from pnnctl.plots import _cell_styles, _fig_pareto

    cells = _two_dataset_cells().assign(
        bytes_sent_max_worker_std=[np.nan, 0.0, 0.0, 1e5], final_acc_std=[np.nan, 0.0, 0.01, 0.02], n_seeds=2
    )
    fig = _fig_pareto(cells, {cell: cell for cell in cells["cell"]}, _cell_styles(cells))
    caps = {container.get_label().split(" (")[0]: _drawn_caps(container) for container in fig.axes[0].containers}
    plt.close(fig)
    # Two caps per drawn bar: one seed (NaN) and agreeing seeds (0) draw none; bytes and accuracy apart.
    assert caps == {"a/easy/mlp/w2": 0, "b/easy/mlp/w2": 0, "a/hard/mlp/w2": 2, "b/hard/mlp/w2": 4}


def test_scaling_lines_get_error_bars_only_where_seeds_differ() -> None:
    from pnnctl.plots import _fig_scaling

    runs = pd.DataFrame({
        "strategy": "a", "dataset": "d", "model": "mlp", "workers": [2, 4, 4, 8, 8],
        "final_acc": [0.5, 0.6, 0.7, 0.8, 0.8], "bytes_sent_max_worker": [1e6, 2e6, 2e6, 4e6, 5e6],
    })
    fig = _fig_scaling(runs, strategy_colors(["a"]))
    caps = [_drawn_caps(next(iter(ax.containers))) for ax in fig.axes]
    plt.close(fig)
    # Accuracy spreads at 4 workers only, bytes at 8 only; 2 workers has one seed: two caps a panel.
    assert caps == [2, 2]


def test_scaling_lines_of_one_strategy_on_two_datasets_differ_in_style() -> None:
    from pnnctl.plots import _fig_scaling

    runs = pd.concat([_two_dataset_cells().assign(workers=w) for w in (2, 4)], ignore_index=True)
    runs = runs.rename(columns={"final_acc_mean": "final_acc", "bytes_sent_max_worker_mean": "bytes_sent_max_worker"})
    fig = _fig_scaling(runs, strategy_colors(["a", "b"]))
    data_lines = {bars.get_label(): bars.lines[0] for bars in fig.axes[0].containers}  # errorbar containers
    styles = {label: (line.get_color(), line.get_linestyle(), line.get_marker()) for label, line in data_lines.items()}
    plt.close(fig)
    assert styles["a · easy"][0] == styles["a · hard"][0]  # the strategy's colour
    assert styles["a · easy"][1:] != styles["a · hard"][1:]
    assert styles["a · easy"][1:] == styles["b · easy"][1:]


def test_a_long_legend_sits_beside_the_axes_and_one_worker_is_singular() -> None:
    from pnnctl.plots import _cell_styles, _fig_pareto
    from pnnctl.stats import cell_labels

    def cells(n: int) -> pd.DataFrame:
        workers = list(range(1, n + 1))
        return pd.DataFrame({
            "cell": [f"s/d/mlp/w{w}" for w in workers], "strategy": "s", "dataset": "d", "model": "mlp",
            "workers": workers, "bytes_sent_max_worker_mean": [1e6 * w for w in workers],
            "bytes_sent_max_worker_std": np.nan, "final_acc_mean": 0.5, "final_acc_std": np.nan, "n_seeds": 1,
        })

    placed = {}
    for n in (4, 12):
        frame = cells(n)
        labels = cell_labels(frame)
        assert labels["s/d/mlp/w1"] == "s · 1 worker" and labels["s/d/mlp/w2"] == "s · 2 workers"
        fig = _fig_pareto(frame, labels, _cell_styles(frame))
        fig.canvas.draw()
        ax = fig.axes[0]
        placed[n] = ax.get_legend().get_window_extent().x0 >= ax.get_window_extent().x1
        plt.close(fig)
    assert placed == {4: False, 12: True}  # 12 entries inside would cover the points


def test_scaling_draws_a_line_per_vary_value_and_counts_to_the_target() -> None:
    from pnnctl.plots import _fig_scaling

    # local_steps=2 sends ten times the bytes of local_steps=40: one line over both averaged them.
    runs = pd.DataFrame({
        "strategy": "local-sgd", "dataset": "d", "model": "mlp", "workers": [2, 4, 2, 4],
        "cell": [f"local-sgd/d/mlp/w{w}/local_steps={k}" for w, k in ((2, 2), (4, 2), (2, 40), (4, 40))],
        "final_acc": [0.8, 0.8, 0.7, 0.7], "bytes_sent_max_worker": [8e6, 9e6, 0.7e6, 0.8e6],
    })
    fig = _fig_scaling(runs, strategy_colors(["local-sgd"]))
    lines = {c.get_label(): list(c.lines[0].get_ydata()) for c in fig.axes[1].containers}
    plt.close(fig)
    assert lines == {"local-sgd · local_steps=2": pytest.approx([8.0, 9.0]),
                     "local-sgd · local_steps=40": pytest.approx([0.7, 0.8])}


def test_a_to_target_scaling_metric_is_drawn_from_the_folders_target(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for workers in (2, 4):
        write_run(tmp_path, "allreduce", workers, 0)
    drawn = _scaling_values(monkeypatch)
    plot_folder(tmp_path, formats=("png",), scaling_metric="epochs_to_target", target_acc=0.5)
    # Both runs pass 50% at their third evaluation (epoch 2.5); without the target the panel was empty.
    assert drawn["y"] == [[2.5, 2.5]]


def test_a_target_of_zero_is_no_target_as_in_a_runs_config(tmp_path: Path) -> None:
    from pnnctl.grid import report_folder

    for workers in (2, 4):
        write_run(tmp_path, "allreduce", workers, 0)
    report_folder(tmp_path, target_acc=0.5, draw=False)
    assert "Target accuracy: 50.00%" in (tmp_path / "report.md").read_text()
    # `plot --target-acc 0` reported "Target accuracy: 0.00%", every run reaching it before training.
    report_folder(tmp_path, target_acc=0.0, draw=False)
    assert "Target accuracy" not in (tmp_path / "report.md").read_text()
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert summary["target_acc"].isna().all() and summary["epochs_to_target_mean"].isna().all()


def test_the_environment_table_covers_every_run_of_a_grid(tmp_path: Path) -> None:
    from pnnctl.grid import report_folder

    for workers, seed, world_size, started in ((2, 0, 1, "2026-01-02T10:00:00"), (4, 1, 2, "2026-01-02T09:00:00"),
                                                (4, 2, 2, "2026-01-02T11:00:00")):  # fmt: skip
        write_run(tmp_path, "allreduce", workers, seed)
        env = {"torch": "2.13.0", "seed": seed, "world_size": world_size, "started": started, "shards": [1]}
        (tmp_path / "runs" / f"allreduce-w{workers}-s{seed}" / "env.json").write_text(json.dumps(env))
    report_folder(tmp_path, draw=False)
    # It showed the first run's env.json alone: seed 0 and world size 1 for every run.
    rows = [line for line in (tmp_path / "report.md").read_text().splitlines() if line.startswith("| ")]
    assert rows[2:6] == [
        "| torch | 2.13.0 |",
        "| seed | 0 (1 run); 1 (1 run); 2 (1 run) |",
        "| world_size | 1 (1 run); 2 (2 runs) |",
        "| started | 2026-01-02T09:00:00 to 2026-01-02T11:00:00 |",
    ]
    # A damaged env.json was a JSONDecodeError traceback (after the figures were redrawn): it is named instead.
    (tmp_path / "runs" / "allreduce-w2-s0" / "env.json").write_text('{"torch": "2.1')
    report_folder(tmp_path, draw=False)
    rows = [line for line in (tmp_path / "report.md").read_text().splitlines() if line.startswith("| ")]
    assert rows[2:4] == ["| unreadable env.json | runs/allreduce-w2-s0/env.json |", "| torch | 2.13.0 |"]


def _scaling_values(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[list[float]]]:
    """What plot_folder's scaling figure draws in its metric panel, filled in when it draws it."""
    import pnnctl.plots

    drawn: dict[str, list[list[float]]] = {}
    real = pnnctl.plots._fig_scaling

    def keep(runs: pd.DataFrame, colors: dict, metric: str) -> object:
        fig = real(runs, colors, metric)
        drawn["y"] = [list(c.lines[0].get_ydata()) for c in fig.axes[1].containers]
        return fig

    monkeypatch.setattr(pnnctl.plots, "_fig_scaling", keep)
    return drawn


def test_plot_on_another_network_draws_the_scaling_figure_on_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The tables were re-projected on --network, the scaling figure kept the runs' own network's seconds.
    from pnnctl.stats import load_metrics, reproject

    for workers in (2, 4):
        write_run(tmp_path, "allreduce", workers, 0)
    drawn = _scaling_values(monkeypatch)
    wan = NETWORK_PRESETS["wan"]
    plot_folder(tmp_path, formats=("png",), network=wan, scaling_metric="projected_s")
    metrics = load_metrics(tmp_path)
    on_wan = reproject(metrics, wan).groupby("run_id")["projected_s"].last()
    own = metrics.groupby("run_id")["projected_s"].last()
    assert drawn["y"] == [pytest.approx([on_wan["allreduce-w2-s0"], on_wan["allreduce-w4-s0"]])]
    assert on_wan["allreduce-w2-s0"] > own["allreduce-w2-s0"] + 1.0  # wan is far from the runs' own network


def test_each_synthetic_task_of_a_grid_gets_its_own_pareto_front(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # --vary synthetic.classes=2,10: the 2-class points dominated every 10-class point on one front.
    import pnnctl.plots
    from pnnctl.grid import report_folder

    for classes, seed in ((2, 0), (10, 1)):
        for strategy in ("allreduce", "gossip"):
            write_run(tmp_path, strategy, 2, seed)
            run = tmp_path / "runs" / f"{strategy}-w2-s{seed}"
            metrics = pd.read_csv(run / "metrics.csv")
            metrics["dataset"] = "synthetic"
            metrics["run_id"] = f"{strategy}-c{classes}"
            metrics["cell"] = f"{strategy}/synthetic/mlp/w2/synthetic.classes={classes}"  # as --vary names it
            metrics["test_acc"] *= 1.0 if classes == 2 else 0.5
            run.rename(run.with_name(f"{strategy}-c{classes}"))
            run = run.with_name(f"{strategy}-c{classes}")
            metrics.to_csv(run / "metrics.csv", index=False, lineterminator="\n")
            (run / "config.toml").write_text(f'dataset = "synthetic"\n\n[synthetic]\nclasses = {classes}\n')
    fronts: dict[str, list[float]] = {}
    real = pnnctl.plots._fig_pareto

    def keep(*args: object) -> object:
        fig = real(*args)
        fronts.update({line.get_label(): list(line.get_xdata()) for line in fig.axes[0].lines
                       if line.get_label().startswith("Pareto front")})
        return fig

    monkeypatch.setattr(pnnctl.plots, "_fig_pareto", keep)
    report_folder(tmp_path)
    assert sorted(fronts) == ["Pareto front · synthetic (classes=10)", "Pareto front · synthetic (classes=2)"]
