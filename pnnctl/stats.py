"""Per-run and per-cell figures computed from ``metrics.csv`` tables.

A *run* is one ``run_id`` (one seed of one configuration); a *cell* is every run that shares the
configuration except the seed. Everything here reads only the tables, so results folders can be
re-analysed long after the runs finished (and under other network models).
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from pnnctl.errors import UsageError
from pnnctl.network import NetworkModel
from pnnctl.schema import METRIC_COLUMNS

#: Columns that together name a cell when the table has no explicit ``cell`` column.
CELL_KEY: tuple[str, ...] = ("strategy", "dataset", "model", "workers")

#: Columns read as text; every other metrics column is numeric.
TEXT_COLUMNS: frozenset[str] = frozenset(
    {"run_id", "strategy", "dataset", "model", "backend", "phase", "network", "status", "extras", "cell"}
)

#: Without these a table cannot be summarised at all; other missing columns are filled with NaN so
#: that tables written by older versions still load.
REQUIRED_COLUMNS: tuple[str, ...] = (
    "run_id",
    "strategy",
    "dataset",
    "model",
    "seed",
    "workers",
    "epoch",
    "test_acc",
)

#: Integer-valued columns kept as int64 when they have no gaps (nicer labels and group keys).
_INTEGER_COLUMNS: tuple[str, ...] = ("seed", "workers", "world_size", "round", "samples_seen")

#: Per-run figures averaged per cell by :func:`cell_summary`.
RUN_FIGURES: tuple[str, ...] = (
    "final_acc",
    "best_acc",
    "rounds",
    "epochs",
    "wall_s",
    "compute_s",
    "projected_s",
    "bytes_sent_max_worker",
    "messages_max_worker",
    "params_max_worker",
    "memory_max_worker_bytes",
    "peak_rss_bytes",
    "epochs_to_target",
    "wall_s_to_target",
    "projected_s_to_target",
    "bytes_to_target",
    "messages_to_target",
)

#: Figures only defined for runs that reached the target accuracy.
TO_TARGET_FIGURES: tuple[str, ...] = tuple(name for name in RUN_FIGURES if name.endswith("_to_target"))

_RUN_COLUMNS: tuple[str, ...] = (
    "run_id",
    "strategy",
    "dataset",
    "model",
    "workers",
    "seed",
    "cell",
    "status",
    "target_acc",
    "reached_target",
    *RUN_FIGURES,
)


# --------------------------------------------------------------------------------------------------
# Loading


def _read_metrics_file(path: Path) -> pd.DataFrame:
    data = path.read_bytes()
    # A line without its newline was cut by a crash mid-append; everything before it is whole.
    if data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
    text = data.decode("utf-8", errors="replace")
    if not text.strip():
        return pd.DataFrame(columns=list(METRIC_COLUMNS))
    try:
        # Everything as text first: type inference per file would give the same column different
        # dtypes in different runs (e.g. an all-empty column), which breaks concatenation.
        frame = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, na_values=[""])
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise UsageError("folder", f"{path} is not a readable CSV table: {exc}".replace("\n", " ")) from None
    missing = [column for column in REQUIRED_COLUMNS if column not in frame.columns]
    if missing:
        raise UsageError("folder", f"{path} lacks the metrics columns {', '.join(missing)}")
    if frame["run_id"].isna().any():
        # The run folder is named after its run_id, so a blank id can still be recovered.
        frame["run_id"] = frame["run_id"].fillna(path.parent.name)
    return frame


def _coerce_types(frame: pd.DataFrame) -> pd.DataFrame:
    for column in METRIC_COLUMNS:
        if column not in frame.columns:
            frame[column] = np.nan
    for column in frame.columns:
        if column in TEXT_COLUMNS:
            frame[column] = frame[column].astype("str")
            continue
        if column in METRIC_COLUMNS:
            frame[column] = pd.to_numeric(frame[column], errors="coerce").astype(float)
    for column in _INTEGER_COLUMNS:
        values = frame[column]
        if len(values) and values.notna().all() and (values == values.round()).all():
            frame[column] = values.astype("int64")
    return frame


def load_metrics(folder: Path) -> pd.DataFrame:
    """All evaluation rows of a run folder (``metrics.csv``) or a compare folder (``runs/*/metrics.csv``).

    A torn last line (no trailing newline, left by a crash mid-write) is skipped. Rows keep their
    file order, which is the order they were recorded in.
    """
    folder = Path(folder)
    own = folder / "metrics.csv"
    runs = sorted(path for path in folder.glob("runs/*/metrics.csv") if path.is_file())
    paths = [own] if own.is_file() else runs
    if not paths:
        raise UsageError(
            "folder",
            f"{folder} is not a pnnctl results folder (no metrics.csv); "
            "give a run folder or a compare folder with runs/<run_id>/metrics.csv",
        )
    frames = [_read_metrics_file(path) for path in paths]
    frames = [frame for frame in frames if not frame.empty]
    if not frames:
        return _coerce_types(pd.DataFrame(columns=list(METRIC_COLUMNS)))
    metrics = pd.concat(frames, ignore_index=True)
    return _coerce_types(metrics)


# --------------------------------------------------------------------------------------------------
# Cells


def default_cell_name(strategy: object, dataset: object, model: object, workers: object) -> str:
    """The cell name used when the table has no ``cell`` column, e.g. ``allreduce/mnist/mlp/w4``."""
    if isinstance(workers, float) and math.isfinite(workers) and workers == int(workers):
        workers = int(workers)
    return f"{strategy}/{dataset}/{model}/w{workers}"


def cell_variant(cell: object, strategy: object, dataset: object, model: object, workers: object) -> str:
    """The ``--vary`` values of a cell name built from its columns (``local_steps=5``); "" for none."""
    built = default_cell_name(strategy, dataset, model, workers)
    return str(cell)[len(built) + 1:] if str(cell).startswith(built + "/") else ""


#: The parts of a built cell name that a grid may vary, in the order labels show them.
_LABEL_PARTS: tuple[str, ...] = ("dataset", "model", "workers")


def _workers_text(workers: object) -> str:
    return f"{workers} worker{'' if workers == 1 else 's'}"


def cell_labels(cells: pd.DataFrame) -> dict[str, str]:
    """Readable names for one grid's cells, for figure legends and report tables: the strategy, then
    the dataset, model and worker count only where cells differ in them, then any ``--vary`` values
    (``ist · synthetic · 4 workers``); :func:`shared_cell_parts` says what every cell has in common.

    ``cells`` has a row per cell with :data:`CELL_KEY` and ``cell``. A name not built from its columns
    (a table written by hand) is kept as it is.
    """
    variants = cell_variants(cells)
    varying = varying_label_parts(cells, variants)
    labels: dict[str, str] = {}
    for row, variant in zip(cells.itertuples(index=False), variants, strict=True):
        cell = str(row.cell)
        if cell != default_cell_name(row.strategy, row.dataset, row.model, row.workers) and not variant:
            labels[cell] = cell  # not built from its columns
            continue
        parts = [str(row.strategy)]
        parts += [str(row.dataset)] if "dataset" in varying else []
        parts += [str(row.model)] if "model" in varying else []
        parts += [_workers_text(row.workers)] if "workers" in varying else []
        parts += [variant] if variant else []
        labels[cell] = " · ".join(parts)
    return labels


def cell_variants(cells: pd.DataFrame) -> list[str]:
    """:func:`cell_variant` of every row of a table with :data:`CELL_KEY` (and ``cell`` where named)."""
    names = cell_names(cells)
    return [cell_variant(*values) for values in zip(names, *(cells[c] for c in CELL_KEY), strict=True)]


def varying_label_parts(cells: pd.DataFrame, variants: list[str]) -> list[str]:
    """The parts of :data:`_LABEL_PARTS` in which ``cells`` differ, less the model where a ``--vary`` value
    (one of ``variants``) already names it."""
    varying = [column for column in _LABEL_PARTS if cells[column].nunique(dropna=False) > 1]
    if any(variant_names_model(variant) for variant in variants):
        varying = [column for column in varying if column != "model"]
    return varying


def variant_names_model(variant: str) -> bool:
    """Whether a cell's ``--vary`` values (``sharding=iid,model=mlp:64-16-10``) include the model."""
    return re.search(r"(^|,)model=", variant) is not None


def shared_cell_parts(cells: pd.DataFrame) -> list[str]:
    """What :func:`cell_labels` leaves out because every cell has it (``dataset digits``, ``2 workers``)."""
    shared = []
    for column in _LABEL_PARTS:
        values = cells[column].unique()
        if len(values) == 1:
            shared.append(_workers_text(values[0]) if column == "workers" else f"{column} {values[0]}")
    return shared


def cell_names(metrics: pd.DataFrame) -> pd.Series:
    """The cell of every row: the ``cell`` column where filled, otherwise built from :data:`CELL_KEY`."""
    built = pd.Series(
        [
            default_cell_name(*values)
            for values in zip(*(metrics[column] for column in CELL_KEY), strict=True)
        ],
        index=metrics.index,
        dtype="str",
    )
    if "cell" in metrics.columns:
        given = metrics["cell"].astype("str")
        return given.where(given.notna() & (given.str.strip() != ""), built).rename("cell")
    return built.rename("cell")


def _check_target(target_acc: float | None) -> float | None:
    """The target as a fraction, None for none: 0 means none, as in a run's config (``plot --target-acc 0``
    reported "Target accuracy: 0.00%", every run reaching it before training)."""
    if target_acc is None:
        return None
    target = float(target_acc)
    if not 0.0 <= target <= 1.0:
        raise UsageError("target_acc", f"{target_acc} is not a fraction in [0, 1] (write 0.9 for 90%; 0 for none)")
    return target or None


def _first_reaching(metrics: pd.DataFrame, target: float) -> pd.DataFrame:
    """The first row of each run with ``test_acc >= target``, indexed by run_id."""
    hits = metrics[metrics["test_acc"] >= target]
    return hits.groupby("run_id", sort=False).head(1).set_index("run_id")


# --------------------------------------------------------------------------------------------------
# Per run and per cell


def run_summaries(metrics: pd.DataFrame, target_acc: float | None) -> pd.DataFrame:
    """One row per run_id with its final, best and to-target figures.

    ``final_*`` and cumulative figures come from the run's last row (so an unfinished run shows
    where it stopped); ``best_acc``, ``params_max_worker``, ``memory_max_worker_bytes`` and
    ``peak_rss_bytes`` are maxima over rows. The ``*_to_target`` figures come from the first row
    with ``test_acc >= target_acc`` and are NaN when the run never got there or no target is given.
    """
    target = _check_target(target_acc)
    if metrics.empty:
        return pd.DataFrame(columns=list(_RUN_COLUMNS))
    frame = metrics.copy()
    frame["cell"] = cell_names(frame)
    grouped = frame.groupby("run_id", sort=False)
    last = grouped.tail(1).set_index("run_id")

    out = pd.DataFrame(index=last.index)
    for column in ("strategy", "dataset", "model", "workers", "seed", "cell", "status"):
        out[column] = last[column]
    out["target_acc"] = np.nan if target is None else target
    out["final_acc"] = last["test_acc"]
    out["best_acc"] = grouped["test_acc"].max()
    out["rounds"] = last["round"]
    out["epochs"] = last["epoch"]
    for column in ("wall_s", "compute_s", "projected_s", "bytes_sent_max_worker", "messages_max_worker"):
        out[column] = last[column]
    out["params_max_worker"] = grouped["params_max_worker"].max()
    out["memory_max_worker_bytes"] = grouped["memory_max_worker_bytes"].max()
    # Measured (the largest rank's process, or its GPU allocations), beside the analytic footprint above.
    out["peak_rss_bytes"] = grouped["peak_rss_bytes"].max() if "peak_rss_bytes" in frame else np.nan

    # With no target no run reaches it: an empty table keeps the code below one path.
    first = frame.iloc[0:0].set_index("run_id") if target is None else _first_reaching(frame, target)
    out["reached_target"] = out.index.isin(first.index)
    sources = {
        "epochs_to_target": "epoch",
        "wall_s_to_target": "wall_s",
        "projected_s_to_target": "projected_s",
        "bytes_to_target": "bytes_sent_max_worker",
        "messages_to_target": "messages_max_worker",
    }
    for name, column in sources.items():
        out[name] = first[column].reindex(out.index).astype(float)

    out = out.reset_index()
    out = out.sort_values(["cell", "seed", "run_id"], kind="stable", ignore_index=True)
    return out[list(_RUN_COLUMNS)]


def _status_counts(statuses: pd.Series) -> str:
    counts = statuses.fillna("unknown").value_counts()
    return ", ".join(f"{status}:{counts[status]}" for status in sorted(counts.index))


def cell_summary(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per cell: ``n_seeds`` and, for each per-run figure, ``<name>_mean`` and ``<name>_std``.

    The std is the sample standard deviation over seeds (ddof=1), so it is NaN for a cell with one
    seed. The ``*_to_target`` means and stds are over the seeds that reached the target only
    (``n_reached`` of ``n_seeds``); ``reached_target_frac`` is ``n_reached / n_seeds`` and NaN when
    no target was set. ``statuses`` counts the runs' final statuses, e.g. ``finished:2, diverged:1``.
    A diverged run has no final accuracy (its last evaluation is NaN): ``final_acc_mean`` is over the
    ``n_final_acc`` runs that have one, which the report shows as its n.
    """
    keys = [*CELL_KEY, "cell"]
    figure_columns = [f"{name}_{stat}" for name in RUN_FIGURES for stat in ("mean", "std")]
    head = [*keys, "n_seeds", "n_final_acc", "n_reached", "reached_target_frac", "target_acc", "statuses"]
    if runs.empty:
        return pd.DataFrame(columns=head + figure_columns)
    grouped = runs.groupby(keys, sort=True, dropna=False)
    out = pd.DataFrame({"n_seeds": grouped.size()})
    out["n_reached"] = grouped["reached_target"].sum().astype("int64")
    out["target_acc"] = grouped["target_acc"].first()
    frac = out["n_reached"] / out["n_seeds"]
    out["reached_target_frac"] = frac.where(out["target_acc"].notna())
    out["statuses"] = grouped["status"].agg(_status_counts)
    numeric = runs[keys + list(RUN_FIGURES)].copy()
    numeric[list(RUN_FIGURES)] = numeric[list(RUN_FIGURES)].astype(float)
    grouped_numeric = numeric.groupby(keys, sort=True, dropna=False)[list(RUN_FIGURES)]
    means = grouped_numeric.mean()
    stds = grouped_numeric.std(ddof=1)
    out["n_final_acc"] = grouped_numeric.count()["final_acc"].astype("int64")
    for name in RUN_FIGURES:
        out[f"{name}_mean"] = means[name]
        out[f"{name}_std"] = stds[name]
    out = out.reset_index()
    # Within a (strategy, dataset, model, workers) group the cells differ by --vary values: order them
    # as numbers where they are numbers (local_steps=5, 20, 80; not 20, 5, 80).
    ranks = {cell: rank for rank, cell in enumerate(sorted(out["cell"].astype(str).unique(), key=_natural_key))}
    out["_rank"] = out["cell"].astype(str).map(ranks)
    out = out.sort_values([*CELL_KEY, "_rank"], kind="stable", ignore_index=True)
    return out[head + figure_columns]


def _natural_key(text: str) -> list[float | str]:
    """Reads each run of digits as a number: ``w8`` before ``w16``, ``lr=0.05`` before ``lr=0.1``."""
    # re.split with a group alternates text and numbers, so keys compare str with str, float with float.
    parts = re.split(r"(\d+(?:\.\d+)?)", text)
    return [float(part) if index % 2 else part for index, part in enumerate(parts)]


# --------------------------------------------------------------------------------------------------
# Other networks


def project_time(metrics: pd.DataFrame, network: NetworkModel) -> pd.Series:
    """Projected seconds of every row as if the run had used ``network``.

    ``worker_compute_s`` plus the busiest node's time from the cumulative totals, a node being the
    busiest worker (``messages_max_worker``, the larger of ``bytes_sent_max_worker`` and
    ``bytes_recv_max_worker``) or the master (``messages_master``, ``bytes_*_master``), with the
    ledger's formula (:mod:`pnnctl.network`). This approximates the run's own ``comm_s``, which sums
    each round's (on a time-varying graph, each iteration's) busiest node: where the busiest node changes
    between them that sum is larger (the sum of maxima is at least the maximum of sums); where one node is
    the busiest every time (a master, or workers with symmetric traffic) the two agree. Tables from before
    ``messages_master`` count no master messages.
    """

    def column(name: str) -> pd.Series:
        values = metrics[name] if name in metrics else pd.Series(np.nan, index=metrics.index)
        return values.astype(float).fillna(0.0)

    busiest_worker = network.seconds(
        column("messages_max_worker"), np.maximum(column("bytes_sent_max_worker"), column("bytes_recv_max_worker"))
    )
    master = network.seconds(
        column("messages_master"), np.maximum(column("bytes_sent_master"), column("bytes_recv_master"))
    )
    compute = metrics["compute_s"].astype(float)
    if "worker_compute_s" in metrics:  # tables from before that column: the whole simulation's compute
        compute = metrics["worker_compute_s"].astype(float).fillna(compute)
    return (compute + np.maximum(busiest_worker, master)).rename("projected_s")


def reproject(metrics: pd.DataFrame, network: NetworkModel | None) -> pd.DataFrame:
    """``metrics`` with ``projected_s`` and ``network`` as if every run had used ``network`` (None: as run)."""
    if network is None:
        return metrics
    return metrics.assign(projected_s=project_time(metrics, network), network=network.name)


def projection_text(metrics: pd.DataFrame, network: NetworkModel | None) -> str:
    """Which network the projected times of ``metrics`` are on, for titles and reports."""
    if network is not None:
        return f"re-projected on {network.name}"
    names = sorted(str(name) for name in metrics["network"].dropna().unique())
    return f"on {names[0]}" if len(names) == 1 else "on each run's own network"


def fastest_to_target(
    runs_metrics: pd.DataFrame,
    target_acc: float,
    networks: list[NetworkModel],
    tasks: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """For each network, each cell's mean projected seconds to reach ``target_acc`` and the fastest cell.

    ``runs_metrics`` is the per-row metrics table (as from :func:`load_metrics`). A cell's mean is
    over the seeds that reached the target (a cell counts if any seed did); NaN when none did.
    Rows are indexed by network name; ``fastest`` is NaN where no cell reached the target, and a tuple of
    cells where several tie. A grid over several tasks gets a ``fastest on TASK`` column for each instead:
    a target accuracy is a different bar on other data, so the winner is chosen among cells of one task.
    A run's task is its dataset unless ``tasks`` (run_id -> name) says more, as for synthetic data of
    other shapes.
    """
    target = _check_target(target_acc)
    if target is None:
        raise UsageError("target_acc", "fastest-to-target needs a target accuracy, a fraction in [0, 1]")
    frame = runs_metrics.copy()
    frame["cell"] = cell_names(frame)
    cells = sorted(frame["cell"].unique(), key=_natural_key)
    first = _first_reaching(frame, target)
    run_cells = frame.groupby("run_id", sort=False)["cell"].first()
    frame["task"] = frame["dataset"].astype(str)
    if tasks:
        frame["task"] = frame["run_id"].map(tasks).fillna(frame["task"])
    cell_tasks = frame.groupby("cell")["task"].first()
    task_names = sorted(cell_tasks.unique(), key=_natural_key)
    winners = {"fastest": cells} if len(task_names) == 1 else {
        f"fastest on {task}": [cell for cell in cells if cell_tasks[cell] == task] for task in task_names
    }
    rows: dict[str, dict[str, object]] = {}
    for network in networks:
        seconds = project_time(first, network)
        per_cell = seconds.groupby(run_cells.reindex(seconds.index)).mean().reindex(cells)
        row: dict[str, object] = {cell: float(per_cell[cell]) for cell in cells}
        for column, candidates in winners.items():
            among = per_cell[candidates].dropna()
            # Cells that reach the target in the same time (all at 0 s where the untrained model meets it)
            # tie: the first in sort order is no winner.
            tied = tuple(among.index[among <= among.min() * (1 + 1e-9)]) if len(among) else ()
            row[column] = np.nan if not tied else tied[0] if len(tied) == 1 else tied
        rows[network.name] = row
    out = pd.DataFrame.from_dict(rows, orient="index", columns=[*cells, *winners])
    out.index.name = "network"
    return out
