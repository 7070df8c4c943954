"""``summary.csv`` and ``report.md`` of a compare folder, written from the per-cell summary table."""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from pnnctl.io import atomic_write_text
from pnnctl.stats import cell_labels, shared_cell_parts

_NONE = "—"

#: Captions of the figures plot_folder writes; unknown stems fall back to their name.
_CAPTIONS: dict[str, str] = {
    "acc_vs_epoch": "Test accuracy against epoch (mean ± std over seeds)",
    "acc_vs_bytes": "Test accuracy against data sent by the busiest worker",
    "acc_vs_time": "Test accuracy against projected time",
    "pareto": "Final accuracy against data sent per worker, with the Pareto front",
    "memory": "Parameters and memory of the largest worker",
    "scaling": "Final accuracy and data sent per worker against the number of workers",
}

#: Formats a markdown viewer shows inline, best first.
_INLINE_FORMATS: tuple[str, ...] = ("png", "svg", "jpg", "jpeg", "gif", "webp")


def write_summary_csv(folder: Path, cells: pd.DataFrame) -> Path:
    """Write the per-cell table to ``<folder>/summary.csv`` (atomically) and return its path."""
    path = Path(folder) / "summary.csv"
    buffer = io.StringIO()
    cells.to_csv(buffer, index=False, lineterminator="\n")
    atomic_write_text(path, buffer.getvalue())
    return path


# --------------------------------------------------------------------------------------------------
# Number formatting


def _decimals(value: float) -> int | None:
    """Decimals that show a value to about three significant figures; None means scientific notation."""
    magnitude = abs(value)
    if magnitude == 0 or magnitude >= 1000:
        return 0
    if magnitude >= 100:
        return 1
    if magnitude >= 1:
        return 2
    if magnitude >= 0.01:
        return 3
    return None


def _number(value: float | None, decimals: int | str | None = "auto") -> str:
    """A short, human-scale rendering: thousands separators for large values, 3 figures for small."""
    if value is None or not math.isfinite(value):
        return _NONE if value is None or math.isnan(value) else str(value)
    if decimals == "auto":
        decimals = _decimals(value)
    if decimals is None:
        return f"{value:.2e}"
    return f"{value:,.{decimals}f}"


def _mean_std(mean: float, std: float, n: int, *, scale: float = 1.0, percent: bool = False) -> str:
    """``mean ± std (n=N)`` with both at the mean's precision; the std is left out where undefined."""
    if pd.isna(mean):
        return f"{_NONE} (n={n})"
    factor = 100.0 if percent else 1.0 / scale
    # A zero mean (e.g. no traffic) says nothing about the precision the std needs.
    reference = mean if mean != 0 or pd.isna(std) else std
    decimals: int | None = 2 if percent else _decimals(reference * factor)
    text = _number(mean * factor, decimals)
    if not pd.isna(std):
        text += f" ± {_number(std * factor, decimals)}"
    return f"{text} (n={n})"


def _count(value: object) -> str:
    if pd.isna(value):
        return _NONE
    number = float(value)
    return str(int(number)) if number.is_integer() else str(number)


def _aggregate(cell: pd.Series, name: str, count: int, *, scale: float = 1.0, percent: bool = False) -> str:
    return _mean_std(cell[f"{name}_mean"], cell[f"{name}_std"], count, scale=scale, percent=percent)


# --------------------------------------------------------------------------------------------------
# Tables


def _has_target(cells: pd.DataFrame) -> bool:
    return "target_acc" in cells.columns and bool(cells["target_acc"].notna().any())


def render_table(cells: pd.DataFrame) -> list[dict[str, str]]:
    """One dict of display strings per cell, keyed by column headers that name the aggregate shown.

    Figures are ``mean ± std (n=N)`` over seeds (sample std); to-target columns are over the seeds
    that reached the target only, with N the number that did, and final accuracy over the runs that have
    one (a diverged run ends on NaN). To-target columns appear only when
    the table was summarised with a target.
    """
    with_target = _has_target(cells)
    rows: list[dict[str, str]] = []
    for _, cell in cells.iterrows():
        n = int(cell["n_seeds"])

        row = {
            "cell": str(cell["cell"]),
            "strategy": str(cell["strategy"]),
            "workers": _count(cell["workers"]),
            # A diverged run has no final accuracy: n counts the runs behind the mean, not the seeds.
            "final acc % (mean ± std, n)": _aggregate(cell, "final_acc", int(cell["n_final_acc"]), percent=True),
            "best acc % (mean ± std, n)": _aggregate(cell, "best_acc", n, percent=True),
            "MB sent/worker (mean ± std, n)": _aggregate(cell, "bytes_sent_max_worker", n, scale=1e6),
            "projected s (mean ± std, n)": _aggregate(cell, "projected_s", n),
            "wall s (mean ± std, n)": _aggregate(cell, "wall_s", n),
            "memory/worker MB (mean ± std, n)": _aggregate(cell, "memory_max_worker_bytes", n, scale=1e6),
            "measured peak MB, largest process (mean ± std, n)": _aggregate(cell, "peak_rss_bytes", n, scale=1e6),
        }
        if with_target:
            reached = int(cell["n_reached"])
            row["reached target (runs)"] = f"{reached}/{n}"
            row["epochs to target (mean ± std over reached, n)"] = _aggregate(
                cell, "epochs_to_target", reached
            )
            row["projected s to target (mean ± std over reached, n)"] = _aggregate(
                cell, "projected_s_to_target", reached
            )
            row["MB to target (mean ± std over reached, n)"] = _aggregate(
                cell, "bytes_to_target", reached, scale=1e6
            )
        if "statuses" in cells.columns:
            row["run statuses"] = str(cell["statuses"])
        rows.append(row)
    return rows


def _escape(text: object) -> str:
    # A pipe would end a markdown table cell and a newline the row.
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def _markdown_table(rows: list[dict[str, str]]) -> list[str]:
    if not rows:
        return ["_(no rows)_"]
    headers = list(rows[0])
    lines = [
        "| " + " | ".join(_escape(h) for h in headers) + " |",
        "| " + " | ".join("---" for _ in headers) + " |",
    ]
    lines += ["| " + " | ".join(_escape(row.get(h, "")) for h in headers) + " |" for row in rows]
    return lines


def _code_block(text: str) -> list[str]:
    # A fence longer than any backtick run inside keeps the command verbatim.
    longest = 0
    run = 0
    for char in text:
        run = run + 1 if char == "`" else 0
        longest = max(longest, run)
    fence = "`" * max(3, longest + 1)
    return [fence + "sh", text, fence]


def _env_value(value: object) -> str:
    if isinstance(value, Mapping | list | tuple):
        return json.dumps(value, sort_keys=True, default=str)
    return str(value)


def _fastest_rows(
    fastest: pd.DataFrame, labels: Mapping[str, str] | None = None, reached: Mapping[str, str] | None = None
) -> list[dict[str, str]]:
    """One row per cell with its seconds under each network, then the winner rows; cells are shown
    by their ``labels`` where given, with how many of their runs reached the target where ``reached`` says.

    Cells are rows, networks columns: a grid has a handful of networks and any number of cells, whose
    names are long (the other way round, the table ran off every screen)."""
    labels = labels or {}

    def named(value: object) -> str:
        if isinstance(value, tuple):  # cells that tie
            return "tie: " + " = ".join(labels.get(cell, str(cell)) for cell in value)
        return _NONE if pd.isna(value) else labels.get(value, str(value))

    # The winner columns: "fastest", or "fastest on DATASET" for each dataset of the grid.
    winners = [column for column in fastest.columns if str(column).startswith("fastest")]
    cells = [column for column in fastest.columns if column not in winners]
    rows: list[dict[str, str]] = []
    for cell in cells:
        seconds = {str(net): _number(float(value)) for net, value in fastest[cell].items()}
        counts = {"reached (runs)": reached.get(cell, "")} if reached else {}
        rows.append({"cell": labels.get(cell, str(cell)), **counts, **seconds})
    for column in winners:
        winner = {str(net): named(value) for net, value in fastest[column].items()}
        rows.append({"cell": f"**{column}**", **({"reached (runs)": ""} if reached else {}), **winner})
    return rows


def _figure_lines(folder: Path, figures: list[Path]) -> list[str]:
    by_stem: dict[str, dict[str, str]] = {}
    for path in figures:
        path = Path(path)
        try:
            relative = path.relative_to(folder)
        except ValueError:
            relative = Path(os.path.relpath(path, folder))
        by_stem.setdefault(path.stem, {})[path.suffix.lstrip(".").lower()] = relative.as_posix()
    lines: list[str] = []
    for stem, links in by_stem.items():
        caption = _CAPTIONS.get(stem, stem)
        inline = next((fmt for fmt in _INLINE_FORMATS if fmt in links), None)
        lines.append(f"### {caption}")
        lines.append("")
        if inline is not None:
            lines.append(f"![{caption}]({links[inline]})")
            lines.append("")
        others = [f"[{fmt}]({link})" for fmt, link in links.items() if fmt != inline]
        if others:
            lines.append("Also as " + ", ".join(others) + ".")
            lines.append("")
    return lines


def write_report(
    folder: Path,
    *,
    command: str,
    env: dict,
    cells: pd.DataFrame,
    figures: list[Path],
    target_acc: float | None,
    fastest: pd.DataFrame | None,
    published: dict[str, str] | None = None,
    redrawn_by: str | None = None,
    projection: str = "",
) -> Path:
    """Write ``<folder>/report.md`` (atomically) and return its path.

    ``command`` produced the runs; ``redrawn_by``, where given, redrew figures and report from the
    tables since. Figure links are relative to ``folder`` so the report still renders after the folder moves.
    """
    folder = Path(folder)
    n_runs = int(cells["n_seeds"].sum()) if len(cells) else 0
    lines: list[str] = ["# pnnctl comparison report", "", "Produced by:", "", *_code_block(command), ""]
    if redrawn_by:
        lines += ["Figures and report redrawn from its tables by:", "", *_code_block(redrawn_by), ""]

    lines += ["## Environment", ""]
    if env:
        lines += _markdown_table(
            [{"key": str(key), "value": _env_value(value)} for key, value in env.items()]
        )
    else:
        lines.append("_(not recorded)_")
    lines.append("")

    lines += ["## Summary (mean ± std over n seeds)", ""]
    lines.append(
        f"{len(cells)} cells, {n_runs} runs. Each figure is the mean ± sample std (ddof=1) over the cell's "
        "seeds; n is the number of seeds behind it. Accuracy is the test accuracy of the last (final) or "
        "best evaluation (a diverged run has no final accuracy, so it is not among the final figure's n); "
        "data sent is that of the busiest worker."
        + (f" Projected time (compute per worker + communication) is {projection}." if projection else "")
    )
    lines.append("")
    if target_acc is not None:
        lines.append(
            f"Target accuracy: {target_acc * 100:.2f}%. To-target figures are over the seeds that "
            "reached it; a cell where none did shows —."
        )
        lines.append("")
    # Cells go by the names the figures' legends give them; summary.csv keeps the full names.
    labels = cell_labels(cells) if len(cells) else {}
    shared = shared_cell_parts(cells) if len(cells) else []
    if shared:
        lines += [f"Every cell: {', '.join(shared)}.", ""]
    rows = [{**row, "cell": labels.get(row["cell"], row["cell"])} for row in render_table(cells)]
    lines += _markdown_table([{k: v for k, v in row.items() if k not in ("strategy", "workers")} for row in rows])
    lines.append("")

    if fastest is not None and len(fastest):
        target_text = f"{target_acc * 100:.2f}%" if target_acc is not None else "the target accuracy"
        lines += ["## Fastest to target per network", ""]
        lines.append(
            f"Mean projected seconds to reach {target_text} under each network model (columns), re-projected from the "
            "busiest node's cumulative messages and bytes (a worker, or the master where there is one; it agrees with "
            "the run's own projection where one node is the busiest every round). "
            "Means are over the seeds that reached the target (a cell where one of several did can win: its "
            "reached column says how many); — means no seed did."
        )
        lines.append("")
        reached = {str(cell): f"{n}/{seeds}" for cell, n, seeds in zip(cells["cell"], cells["n_reached"],
                                                                          cells["n_seeds"], strict=True)}
        lines += _markdown_table(_fastest_rows(fastest, labels, reached))
        lines.append("")

    if published:
        lines += ["## Published numbers", ""]
        lines.append("Quoted for comparison; not measured by these runs.")
        lines.append("")
        lines += [f"- **{_escape(strategy)}**: {_escape(text)}" for strategy, text in published.items()]
        lines.append("")

    if figures:
        lines += ["## Figures", ""]
        lines += _figure_lines(folder, figures)

    path = folder / "report.md"
    atomic_write_text(path, "\n".join(lines).rstrip("\n") + "\n")
    return path
