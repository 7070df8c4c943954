"""Figures of a results folder, drawn from its ``metrics.csv`` tables alone.

Each strategy keeps one colour in every figure; cells of the same strategy (e.g. other worker
counts) differ by line style and marker. Every figure is written in each requested format with an
atomic write, so a reader never sees half a PNG.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import matplotlib

# Figures are written to files only; a display backend would fail on headless machines and CI.
matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib import ticker
from matplotlib.axes import Axes
from matplotlib.axis import Axis
from matplotlib.backend_bases import FigureCanvasBase
from matplotlib.figure import Figure

from pnnctl.errors import UsageError
from pnnctl.io import atomic_write_bytes
from pnnctl.network import NetworkModel
from pnnctl.stats import (
    CELL_KEY,
    cell_labels,
    cell_names,
    cell_summary,
    cell_variants,
    load_metrics,
    projection_text,
    reproject,
    run_summaries,
    varying_label_parts,
)

#: Every figure name plot_folder may write, in the order a report shows them.
FIGURE_NAMES: tuple[str, ...] = ("acc_vs_epoch", "acc_vs_bytes", "acc_vs_time", "pareto", "memory", "scaling")

_LINESTYLES: tuple[str, ...] = ("-", "--", ":", "-.")
_MARKERS: tuple[str, ...] = ("o", "s", "^", "D", "v", "P", "X", "*")
_MB = 1e6

# Fixed ids and no timestamps keep SVGs byte-identical across re-plots of the same data.
_RC = {"svg.hashsalt": "pnnctl", "figure.dpi": 100, "axes.grid": True, "grid.alpha": 0.3}
_METADATA: dict[str, dict[str, None]] = {"svg": {"Date": None}, "pdf": {"CreationDate": None}}


def strategy_colors(names: Iterable[str]) -> dict[str, str]:
    """A colour (hex) per strategy from tab10, assigned in sorted name order.

    The mapping depends only on the set of names, never on their order, so every figure of one
    folder agrees. Past ten strategies the palette repeats.
    """
    palette = plt.get_cmap("tab10").colors
    unique = sorted({str(name) for name in names})
    return {name: matplotlib.colors.to_hex(palette[i % len(palette)]) for i, name in enumerate(unique)}


# --------------------------------------------------------------------------------------------------
# Styles and labels


def _cell_styles(cells: pd.DataFrame) -> dict[str, dict[str, str]]:
    colors = strategy_colors(cells["strategy"].astype(str))
    styles: dict[str, dict[str, str]] = {}
    rank: dict[str, int] = {}
    for row in cells.itertuples(index=False):
        strategy = str(row.strategy)
        i = rank.get(strategy, 0)
        rank[strategy] = i + 1
        styles[row.cell] = {
            "color": colors[strategy],
            "linestyle": _LINESTYLES[i % len(_LINESTYLES)],
            "marker": _MARKERS[i % len(_MARKERS)],
        }
    return styles


# --------------------------------------------------------------------------------------------------
# Curves over seeds


def _clean_curve(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    order = np.argsort(x, kind="stable")
    x, y = x[order], y[order]
    if len(x) == 0:
        return x, y
    # Where x stalls (no traffic during local phases) keep the latest accuracy at that x, so the
    # curve shows what that much traffic eventually bought.
    keep = np.append(x[1:] != x[:-1], True)
    return x[keep], y[keep]


def mean_curve(curves: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and sample std (ddof=1) of several seeds' curves on a common x grid.

    Seeds rarely share x values (bytes, seconds), so each is linearly interpolated onto the union
    of all x values. The grid is cut to the range every seed covers, so the mean never mixes in
    extrapolated values; only when those ranges barely overlap is the whole union kept, with each
    point averaged over the seeds that cover it. The std is NaN where fewer than two seeds do.
    """
    cleaned = [_clean_curve(np.asarray(x, float), np.asarray(y, float)) for x, y in curves]
    cleaned = [(x, y) for x, y in cleaned if len(x)]
    if not cleaned:
        empty = np.array([], dtype=float)
        return empty, empty, empty
    grid = np.unique(np.concatenate([x for x, _ in cleaned]))
    lo = max(x[0] for x, _ in cleaned)
    hi = min(x[-1] for x, _ in cleaned)
    common = grid[(grid >= lo) & (grid <= hi)]
    if len(common) >= 2:
        grid = common
    stack = np.full((len(cleaned), len(grid)), np.nan)
    for i, (x, y) in enumerate(cleaned):
        inside = (grid >= x[0]) & (grid <= x[-1])
        stack[i, inside] = np.interp(grid[inside], x, y)
    count = np.sum(~np.isnan(stack), axis=0)
    total = np.nansum(stack, axis=0)
    mean = total / np.maximum(count, 1)
    squares = np.nansum((stack - mean) ** 2, axis=0)
    std = np.full(len(grid), np.nan)
    several = count >= 2
    std[several] = np.sqrt(squares[several] / (count[several] - 1))
    return grid, mean, std


def _set_log_x(ax: Axes, values: Iterable[float]) -> str:
    """Log x axis, or symlog when some values are zero (a run's first evaluation, or a strategy that
    sends nothing) so those still show; returns the scale's wording for the axis label."""
    array = np.asarray([v for v in values if np.isfinite(v)], dtype=float)
    positive = array[array > 0]
    if len(array) and len(positive) == len(array):
        ax.set_xscale("log")
        _plain_log_ticks(ax.xaxis)
        return "log scale"
    # The linear part ends on a power of ten below the smallest value, so it ends on a tick.
    linthresh = 10.0 ** np.floor(np.log10(positive.min())) if len(positive) else 1.0
    ax.set_xscale("symlog", linthresh=linthresh)
    ax.xaxis.set_major_locator(ticker.SymmetricalLogLocator(base=10, linthresh=linthresh, subs=(1, 2, 5)))
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    return f"log scale, linear below {linthresh:g}"


def _plain_log_ticks(axis: Axis) -> None:
    # Plain numbers (20, 30) read better than 2×10¹ on axes that span a decade or two.
    axis.set_major_formatter(ticker.LogFormatter(labelOnlyBase=False))
    axis.set_minor_formatter(ticker.LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))


def _draw_curves(
    ax: Axes,
    metrics: pd.DataFrame,
    x_column: str,
    cells: pd.DataFrame,
    labels: dict[str, str],
    styles: dict[str, dict[str, str]],
    y_column: str = "test_acc",
    y_scale: float = 100.0,
) -> list[float]:
    """Mean of ``y_column`` (accuracy in % by default) with a ±std band per cell; returns every x drawn."""
    drawn: list[float] = []
    for cell in cells["cell"]:
        rows = metrics[(metrics["cell"] == cell) & metrics[y_column].notna()]
        if rows.empty:
            continue
        curves = [
            (group[x_column].to_numpy(float), group[y_column].to_numpy(float) * y_scale)
            for _, group in rows.groupby("run_id", sort=True)
        ]
        x, mean, std = mean_curve(curves)
        if not len(x):
            continue
        style = styles[cell]
        n = len(curves)
        # Markers would suggest evaluations at interpolated x values, so only draw them where every
        # seed was evaluated at exactly those x values.
        shared = all(np.array_equal(np.unique(cx[np.isfinite(cx)]), x) for cx, _ in curves)
        ax.plot(
            x,
            mean,
            color=style["color"],
            linestyle=style["linestyle"],
            marker=style["marker"] if shared else None,
            markersize=3,
            label=f"{labels[cell]} (n={n})",
        )
        band = np.isfinite(std)
        if band.any():
            ax.fill_between(
                x, mean - std, mean + std, where=band, color=style["color"], alpha=0.18, linewidth=0
            )
        drawn.extend(x.tolist())
    return drawn


# --------------------------------------------------------------------------------------------------
# Figures


#: Legend entries that still fit inside the axes; more cover the data wherever "best" puts them.
_LEGEND_INSIDE_MAX = 8


def _legend_inside(ax: Axes) -> bool:
    return len(ax.get_legend_handles_labels()[0]) <= _LEGEND_INSIDE_MAX


def _finish(ax: Axes, title: str, xlabel: str, ylabel: str, legend: bool = True) -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if not legend or not ax.get_legend_handles_labels()[0]:
        return
    if _legend_inside(ax):
        ax.legend(fontsize="small", loc="best")
    else:  # beside the axes; savefig's tight bounding box widens the figure to hold it
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)


def _fig_acc_vs_epoch(metrics: pd.DataFrame, cells: pd.DataFrame, labels: dict, styles: dict) -> Figure:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    _draw_curves(ax, metrics, "epoch", cells, labels, styles)
    _finish(ax, "Test accuracy vs epoch (mean ± std over seeds)", "epoch", "test accuracy (%)")
    return fig


def _fig_acc_vs_bytes(metrics: pd.DataFrame, cells: pd.DataFrame, labels: dict, styles: dict) -> Figure:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = _draw_curves(ax, metrics, "mb_sent_max_worker", cells, labels, styles)
    scale = _set_log_x(ax, drawn)
    _finish(
        ax,
        "Test accuracy vs data sent (mean ± std over seeds)",
        f"data sent by the busiest worker (MB, {scale})",
        "test accuracy (%)",
    )
    return fig


def _fig_acc_vs_time(
    metrics: pd.DataFrame, cells: pd.DataFrame, labels: dict, styles: dict, network: NetworkModel | None
) -> Figure:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    _draw_curves(ax, metrics, "time_s", cells, labels, styles)
    _finish(
        ax,
        f"Test accuracy vs projected time {projection_text(metrics, network)}",
        "projected time: compute + communication (s)",
        "test accuracy (%)",
    )
    return fig


#: Strategy extras that get a figure of their own (log scale) when a folder's runs report them.
EXTRA_FIGURES: dict[str, str] = {
    "consensus_error": "consensus error (mean squared distance of agents to their average)",
}


def _extras_column(metrics: pd.DataFrame, key: str) -> pd.Series:
    def pick(text: object) -> float:
        try:
            value = json.loads(str(text)).get(key)
        except (json.JSONDecodeError, AttributeError):
            return float("nan")
        return float(value) if isinstance(value, int | float) else float("nan")

    return metrics["extras"].map(pick) if "extras" in metrics else pd.Series(np.nan, index=metrics.index)


def _fig_extra(metrics: pd.DataFrame, cells: pd.DataFrame, labels: dict, styles: dict, key: str) -> Figure:
    fig, (by_epoch, by_bytes) = plt.subplots(1, 2, figsize=(11, 4.5))
    _draw_curves(by_epoch, metrics, "epoch", cells, labels, styles, y_column=key, y_scale=1.0)
    drawn = _draw_curves(by_bytes, metrics, "mb_sent_max_worker", cells, labels, styles, y_column=key, y_scale=1.0)
    scale = _set_log_x(by_bytes, drawn)
    for ax in (by_epoch, by_bytes):
        ax.set_yscale("log")
    _finish(by_epoch, f"{key} vs epoch", "epoch", EXTRA_FIGURES[key])
    _finish(by_bytes, f"{key} vs data sent", f"data sent by the busiest worker (MB, {scale})", key)
    return fig


def _error_bars(std: float | np.ndarray) -> float | np.ndarray | None:
    """Where the seeds spread, the std; NaN (no bar) elsewhere, and None where nothing spreads, so that
    the legend shows a plain marker. One seed has no spread to show, and a zero-height cap drawn where
    every seed agrees (analytic sizes, a single seed) reads as a measured spread."""
    std = np.asarray(std, dtype=float)
    spread = std > 0
    if not spread.any():
        return None
    return np.where(spread, std, np.nan) if std.ndim else float(std)


def pareto_front(x: Sequence[float], y: Sequence[float]) -> list[int]:
    """Indices of the points not dominated by another (less or equal x and higher y), by ascending x."""
    points = [(float(xi), float(yi), i) for i, (xi, yi) in enumerate(zip(x, y, strict=True))]
    points = [p for p in points if np.isfinite(p[0]) and np.isfinite(p[1])]
    points.sort(key=lambda p: (p[0], -p[1]))
    front: list[int] = []
    best = -np.inf
    for _, yi, i in points:
        if yi > best:
            front.append(i)
            best = yi
    return front


def _fig_pareto(summary: pd.DataFrame, labels: dict, styles: dict, tasks: pd.Series | None = None) -> Figure:
    """``tasks``: each summary row's task (default: its dataset), one front each."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    x = summary["bytes_sent_max_worker_mean"].to_numpy(float) / _MB
    xerr = summary["bytes_sent_max_worker_std"].to_numpy(float) / _MB
    y = summary["final_acc_mean"].to_numpy(float) * 100.0
    yerr = summary["final_acc_std"].to_numpy(float) * 100.0
    for i, cell in enumerate(summary["cell"]):
        style = styles[cell]
        ax.errorbar(
            x[i],
            y[i],
            xerr=_error_bars(xerr[i]),
            yerr=_error_bars(yerr[i]),
            color=style["color"],
            marker=style["marker"],
            markersize=7,
            linestyle="none",
            capsize=3,
            label=f"{labels[cell]} (n={summary['n_seeds'].iloc[i]})",
        )
    # One front per task (dataset, or synthetic options): a point on easier data would otherwise dominate
    # every point on harder data.
    tasks = (summary["dataset"] if tasks is None else tasks).astype(str).reset_index(drop=True)
    several = tasks.nunique(dropna=False) > 1
    by_task = tasks.groupby(tasks, sort=True, dropna=False).indices if several else {"": range(len(x))}
    for i, (task, rows) in enumerate(by_task.items()):
        rows = np.asarray(rows)
        front = rows[pareto_front(x[rows], y[rows])]
        if len(front) >= 2:
            label = f"Pareto front · {task}" if several else "Pareto front"
            linestyle = _LINESTYLES[(i + 1) % len(_LINESTYLES)]  # dashed first, as with one front
            ax.plot(x[front], y[front], color="0.35", linestyle=linestyle, linewidth=1, zorder=0, label=label)
    scale = _set_log_x(ax, x)
    _finish(
        ax,
        "Final accuracy vs data sent per worker (mean ± std over seeds)",
        f"data sent by the busiest worker (MB, {scale})",
        "final test accuracy (%)",
    )
    return fig


def _fig_memory(summary: pd.DataFrame, labels: dict, styles: dict) -> Figure:
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.5))
    positions = np.arange(len(summary))
    colors = [styles[cell]["color"] for cell in summary["cell"]]
    names = [labels[cell] for cell in summary["cell"]]
    panels = (
        (
            left,
            "params_max_worker",
            1e6,
            "parameters on the largest worker (millions)",
            "Parameters per worker",
        ),
        (right, "memory_max_worker_bytes", _MB, "memory of the largest worker (MB)", "Memory per worker"),
    )
    for ax, column, scale, ylabel, title in panels:
        means = summary[f"{column}_mean"].to_numpy(float) / scale
        stds = summary[f"{column}_std"].to_numpy(float) / scale
        ax.bar(positions, np.nan_to_num(means), yerr=_error_bars(stds), color=colors, capsize=3)
        ax.set_xticks(positions, names, rotation=30, ha="right", fontsize="small")
        ax.set_title(f"{title} (mean ± std over seeds)")
        ax.set_ylabel(ylabel)
        ax.grid(axis="x", visible=False)
    fig.tight_layout()
    return fig


#: Per-run figures the scaling plot can show against worker count: (label, scale applied, log axis).
SCALING_METRICS: dict[str, tuple[str, float, bool]] = {
    "bytes_sent_max_worker": ("data sent by the busiest worker (MB)", 1 / _MB, True),
    "messages_max_worker": ("messages sent by the busiest worker", 1.0, True),
    "projected_s": ("projected time (s)", 1.0, True),
    "wall_s": ("wall time of the simulation (s)", 1.0, False),
    "compute_s": ("compute time of the simulation (s)", 1.0, False),
    "best_acc": ("best test accuracy (%)", 100.0, False),
    "params_max_worker": ("parameters of the largest worker", 1.0, True),
    "memory_max_worker_bytes": ("memory of the largest worker (MB)", 1 / _MB, True),
    "epochs_to_target": ("epochs to the target accuracy", 1.0, False),
    "projected_s_to_target": ("projected time to the target (s)", 1.0, True),
    "bytes_to_target": ("MB sent by the busiest worker to the target", 1 / _MB, True),
}


def _fig_scaling(
    runs: pd.DataFrame, styles_by_strategy: dict[str, str], metric: str = "bytes_sent_max_worker"
) -> Figure:
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.5))
    # A line per strategy, split further by dataset, model and --vary values where those differ, so one
    # line never averages different tasks or settings (local_steps=2 and 40 made one line's error bar).
    variants = cell_variants(runs)
    frame = runs.assign(variant=variants)
    line_keys = ["strategy", *(part for part in varying_label_parts(runs, variants) if part != "workers")]
    line_keys += ["variant"] if frame["variant"].nunique() > 1 else []
    metric_label, metric_scale, metric_log = SCALING_METRICS[metric]
    frame = frame.assign(final_pct=runs["final_acc"] * 100.0, mb=runs[metric].astype(float) * metric_scale)
    workers = sorted(frame["workers"].dropna().unique())
    # The colour is the strategy's; line and marker tell its datasets/models apart, as in the curves.
    tasks: dict[tuple, int] = {}
    for key, group in frame.groupby(line_keys, sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        strategy = str(key[0])
        label = " · ".join(str(part) for part in key)
        task = tasks.setdefault(key[1:], len(tasks))
        stats = group.groupby("workers", sort=True)[["final_pct", "mb"]].agg(["mean", "std"])
        xs = stats.index.to_numpy(float)
        color = styles_by_strategy[strategy]
        for ax, column in ((left, "final_pct"), (right, "mb")):
            ax.errorbar(
                xs,
                stats[(column, "mean")].to_numpy(float),
                yerr=_error_bars(stats[(column, "std")].to_numpy(float)),
                color=color,
                linestyle=_LINESTYLES[task % len(_LINESTYLES)],
                marker=_MARKERS[task % len(_MARKERS)],
                capsize=3,
                label=label,
            )
    for ax in (left, right):
        ax.set_xticks(workers, [str(int(w)) if float(w).is_integer() else str(w) for w in workers])
    positive = frame["mb"][frame["mb"] > 0]
    # Traffic grows with workers by orders of magnitude for some strategies; zeros rule out log.
    if metric_log and len(positive) == frame["mb"].notna().sum() and len(positive):
        right.set_yscale("log")
        _plain_log_ticks(right.yaxis)
        metric_label = f"{metric_label}, log scale"
    # Both panels hold the same lines: a legend too long to sit inside goes once, beside the right one.
    _finish(left, "Final accuracy vs workers (mean ± std)", "workers", "final test accuracy (%)",
            legend=_legend_inside(left))
    _finish(right, f"{metric} vs workers (mean ± std)", "workers", metric_label)
    fig.tight_layout()
    return fig


def _save(fig: Figure, figures: Path, stem: str, formats: tuple[str, ...]) -> list[Path]:
    written: list[Path] = []
    try:
        for fmt in formats:
            buffer = io.BytesIO()
            fig.savefig(buffer, format=fmt, dpi=120, bbox_inches="tight", metadata=_METADATA.get(fmt))
            path = figures / f"{stem}.{fmt}"
            atomic_write_bytes(path, buffer.getvalue(), fault="plot")
            written.append(path)
    finally:
        plt.close(fig)
    return written


def _check_formats(formats: tuple[str, ...]) -> tuple[str, ...]:
    supported = set(FigureCanvasBase.get_supported_filetypes())
    cleaned = tuple(dict.fromkeys(fmt.lower().lstrip(".") for fmt in formats))
    unknown = [fmt for fmt in cleaned if fmt not in supported]
    if not cleaned or unknown:
        raise UsageError(
            "formats", f"cannot write {', '.join(unknown) or 'no format'}; use {', '.join(sorted(supported))}"
        )
    return cleaned


def plot_folder(
    folder: Path,
    *,
    formats: tuple[str, ...] = ("png", "svg"),
    network: NetworkModel | None = None,
    scaling_metric: str = "bytes_sent_max_worker",
    metrics: pd.DataFrame | None = None,
    target_acc: float | None = None,
    tasks: Mapping[str, str] | None = None,
) -> list[Path]:
    """Draw every figure of a run or compare folder into ``<folder>/figures/``; returns the written paths.

    ``target_acc`` is the accuracy the ``*_to_target`` scaling metrics count to (None: those are empty).
    ``tasks`` names the task of a run whose dataset alone does not (run_id -> e.g. ``synthetic
    (classes=2)``); the Pareto figure draws one front per task.

    ``metrics``: the folder's rows as :func:`pnnctl.stats.load_metrics` reads them, where the caller
    has them already (read from the folder otherwise). The time axis uses the runs' own
    ``projected_s`` unless ``network`` is given, in which case time is re-projected with
    :func:`pnnctl.stats.reproject`. ``scaling`` is drawn only when a strategy ran at more than one
    worker count (a stale one from an earlier call is removed so the folder never shows figures of
    other data).
    """
    folder = Path(folder)
    formats = _check_formats(formats)
    if scaling_metric not in SCALING_METRICS:
        raise UsageError("scaling_metric", f"must be one of {', '.join(SCALING_METRICS)}, not {scaling_metric!r}")
    if metrics is None:
        metrics = load_metrics(folder)
    if metrics.empty:
        raise UsageError(
            "folder", f"{folder} has no evaluation rows yet; plot again once a run has evaluated"
        )
    metrics = metrics.copy()
    metrics["cell"] = cell_names(metrics)
    metrics["mb_sent_max_worker"] = metrics["bytes_sent_max_worker"] / _MB
    # Every projected time on the one network: the scaling figure's projected_s too, not only the time axis.
    metrics["projected_s"] = metrics["time_s"] = reproject(metrics, network)["projected_s"]

    runs = run_summaries(metrics, target_acc)
    summary = cell_summary(runs)
    # cell_summary sorts by strategy then workers, which is also the legend order.
    cells = summary[[*CELL_KEY, "cell"]].drop_duplicates("cell", ignore_index=True)
    labels = cell_labels(cells)
    styles = _cell_styles(cells)
    figures = folder / "figures"

    written: list[Path] = []
    # A figure whose drawing fails never reaches _save; close it here so long-lived callers (a
    # notebook, a watch loop) do not pile up open figures.
    open_before = set(plt.get_fignums())
    try:
        with plt.rc_context(_RC):
            written += _save(
                _fig_acc_vs_epoch(metrics, cells, labels, styles), figures, "acc_vs_epoch", formats
            )
            written += _save(
                _fig_acc_vs_bytes(metrics, cells, labels, styles), figures, "acc_vs_bytes", formats
            )
            time_fig = _fig_acc_vs_time(metrics, cells, labels, styles, network)
            written += _save(time_fig, figures, "acc_vs_time", formats)
            named = tasks or {}
            task_of_run = pd.Series([named.get(run, str(dataset)) for run, dataset in zip(runs["run_id"],
                                     runs["dataset"], strict=True)], index=runs.index)  # fmt: skip
            task_of_cell = task_of_run.groupby(runs["cell"]).first()
            written += _save(
                _fig_pareto(summary, labels, styles, summary["cell"].map(task_of_cell)), figures, "pareto", formats
            )
            written += _save(_fig_memory(summary, labels, styles), figures, "memory", formats)
            for key in EXTRA_FIGURES:
                metrics[key] = _extras_column(metrics, key)
                # Evaluations before any training (epoch 0) sit at float noise on a log axis; skip them.
                positive = (metrics[key] > 0) & (metrics["epoch"] > 0)
                if positive.any():
                    shown = metrics[positive]
                    written += _save(_fig_extra(shown, cells, labels, styles, key), figures, key, formats)
            # Lone points (every strategy at one worker count, centralized at 1 beside them) show no scaling.
            if runs.groupby("strategy")["workers"].nunique().max() > 1:
                colors = strategy_colors(cells["strategy"].astype(str))
                written += _save(_fig_scaling(runs, colors, scaling_metric), figures, "scaling", formats)
            else:
                for fmt in formats:
                    (figures / f"scaling.{fmt}").unlink(missing_ok=True)
    finally:
        for number in set(plt.get_fignums()) - open_before:
            plt.close(number)
    return written
