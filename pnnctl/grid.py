"""Grids of runs: strategies x workers x seeds x datasets into one folder, then tables and figures.

::

    pnnctl compare --strategies centralized,allreduce,local-sgd --workers 2,4 --seeds 3
    pnnctl compare --config experiment.toml         # a [compare] table plus run fields

A grid folder resumes: finished cells are skipped, a half-done one continues from its checkpoint,
a failed or diverged one is recorded and the rest go on. A lock file refuses a second writer.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from pnnctl.config import (
    RunConfig,
    config_from_dict,
    load_toml,
    loss_assignments,
    merge_layers,
    parse_set_value,
    resolve_layers,
    split_sections,
    stored_form,
    to_toml,
)
from pnnctl.errors import GridInterrupted, UsageError
from pnnctl.io import atomic_write_text, folder_lock
from pnnctl.network import NETWORK_PRESETS, NetworkModel

GRID_KEYS = ("strategies", "workers", "seeds", "datasets", "name", "vary")
#: seeds per cell a grid takes
MAX_SEEDS = 10_000


@dataclass(frozen=True)
class GridSpec:
    strategies: tuple[str, ...] = ("centralized", "allreduce", "local-sgd")
    workers: tuple[int, ...] = (4,)
    seeds: int = 1
    datasets: tuple[str, ...] = ()
    name: str = "compare"
    #: option -> values: each strategy's cells are repeated for every combination of the values of
    #: the keys that apply to it (run fields, or its own STRATEGY.OPTION keys).
    vary: tuple[tuple[str, tuple[Any, ...]], ...] = ()

    @staticmethod
    def from_flags(**values: Any) -> dict[str, Any]:
        """Comma-separated CLI strings to lists; None where the flag was not given."""
        out: dict[str, Any] = {}
        for key, value in values.items():
            if value is None:
                continue
            if key in ("strategies", "datasets"):
                out[key] = [v.strip() for v in str(value).split(",") if v.strip()]
            elif key == "vary":
                out[key] = {}
                for item in value:
                    vary_key, values = parse_vary(item)
                    if vary_key in out[key]:  # the later one would replace the earlier silently
                        raise UsageError("vary", f"{vary_key} is given twice; list its values once "
                                                 f"({vary_key}=V1,V2,...)")
                    out[key][vary_key] = values
            elif key == "workers":
                try:
                    out[key] = [int(v) for v in str(value).split(",") if v.strip()]
                except ValueError:
                    raise UsageError(
                        "workers", f"must be comma-separated integers such as 2,4,8, not {value!r}"
                    ) from None
            else:
                out[key] = value
        return out

    @staticmethod
    def build(values: dict[str, Any]) -> GridSpec:
        unknown = set(values) - set(GRID_KEYS)
        if unknown:
            raise UsageError(f"compare.{sorted(unknown)[0]}", f"unknown key; allowed: {', '.join(GRID_KEYS)}")
        spec = GridSpec(
            strategies=_listed(values, "strategies", str, GridSpec.strategies),
            workers=_listed(values, "workers", int, GridSpec.workers),
            seeds=values.get("seeds", GridSpec.seeds),
            datasets=_listed(values, "datasets", str, ()),
            name=values.get("name", GridSpec.name),
            vary=_vary_items(values.get("vary", {})),
        )
        if not spec.strategies:
            raise UsageError("strategies", "name at least one strategy")
        # A value listed twice would make two cells of one run folder.
        for key, listed in (("strategies", spec.strategies), ("workers", spec.workers), ("datasets", spec.datasets)):
            repeated = next((value for index, value in enumerate(listed) if value in listed[:index]), None)
            if repeated is not None:
                raise UsageError(key, f"lists {repeated} more than once")
        if not spec.workers or any(not isinstance(w, int) or w < 1 for w in spec.workers):
            raise UsageError("workers", f"must be integers >= 1, not {list(spec.workers)}")
        if not isinstance(spec.seeds, int) or isinstance(spec.seeds, bool) or not 1 <= spec.seeds <= MAX_SEEDS:
            # (a grid lists its runs before running any: 10**9 seeds hung building the list)
            raise UsageError("seeds", f"must be an integer from 1 to {MAX_SEEDS}, not {spec.seeds!r}")
        if not isinstance(spec.name, str) or not spec.name or "/" in spec.name or spec.name in (".", ".."):
            raise UsageError("name", f"must be a plain folder name, not {spec.name!r}")
        return spec


def _listed(values: dict[str, Any], key: str, kind: type, default: tuple[Any, ...]) -> tuple[Any, ...]:
    """A grid axis as a tuple: a TOML list, or one value (``workers = 4``) or comma-separated text
    (``strategies = "allreduce,local-sgd"``) as on the command line."""
    value = values.get(key, default)
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    elif not isinstance(value, list | tuple):
        value = [value]
    if kind is int and all(isinstance(item, str) for item in value):
        with contextlib.suppress(ValueError):  # refused below, naming the values
            value = [int(item) for item in value]
    if any(not isinstance(item, kind) or isinstance(item, bool) for item in value):
        examples = {"workers": "integers such as [2, 4, 8]", "strategies": 'names such as ["allreduce", "ist"]',
                    "datasets": 'names such as ["digits", "synthetic"]'}  # fmt: skip
        raise UsageError(key, f"must be {examples[key]}, not {values.get(key)!r}")
    return tuple(value)


@dataclass
class CompareOutcome:
    folder: Path
    metrics: pd.DataFrame
    runs: pd.DataFrame
    cells: pd.DataFrame
    failures: list[dict[str, Any]] = field(default_factory=list)
    aggregate_note: str = "mean ± std over seeds"
    #: (run_id, warning) of the cells run by this call, such as a budget overshot by a whole round
    warnings: list[tuple[str, str]] = field(default_factory=list)


def parse_vary(text: str) -> tuple[str, list[Any]]:
    """``consensus.topology=ring,erdos-renyi:0.3`` or ``lr=[0.05, 0.1]`` -> (key, values)."""
    key, sep, value = str(text).partition("=")
    if not sep or not key.strip() or not value.strip():
        raise UsageError("vary", f"expected KEY=V1,V2,... or KEY=[V1, V2], not {text!r}")
    parsed = parse_set_value(value.strip())
    values = parsed if isinstance(parsed, list) else [parse_set_value(v.strip()) for v in value.split(",")]
    return key.strip(), values


def _vary_items(vary: Any) -> tuple[tuple[str, tuple[Any, ...]], ...]:
    if not isinstance(vary, dict):
        raise UsageError("vary", "must be a table of KEY = [values]")
    items = []
    for key, values in vary.items():
        values = values if isinstance(values, list) else [values]
        if not values:
            raise UsageError("vary", f"{key} needs at least one value")
        # 1 and 1.0 (or 2 and 2.00) spell two run folders of one training: two cells of the same runs.
        repeated = next(((earlier, value) for index, value in enumerate(values) for earlier in values[:index]
                         if earlier == value and isinstance(earlier, bool) == isinstance(value, bool)), None)
        if repeated is not None:
            first, second = (f"{key}={value}" for value in repeated)
            raise UsageError("vary", f"lists {first} more than once" if first == second
                             else f"lists {first} and {second}, the same value")
        items.append((str(key), tuple(values)))
    return tuple(items)


#: Run fields every cell sets itself: a --vary over one would label identical runs differently.
_CELL_FIELDS: dict[str, str] = {
    "strategy": "list them with --strategies", "dataset": "list them with --datasets",
    "workers": "list them with --workers", "seed": "ask for more with --seeds",
    "run_name": "the grid names each run", "out": "the grid's runs go into its folder",
    "variant": "the grid names each variant",
}  # fmt: skip


def _check_vary(grid: GridSpec, datasets: tuple[str, ...]) -> None:
    """Each --vary key applies to some cell of the grid and is not one the cells set themselves."""
    from strategies import STRATEGIES

    for key, _ in grid.vary:
        section = key.split(".")[0] if "." in key else ""
        if key in _CELL_FIELDS:
            raise UsageError("vary", f"{key} is an axis of the grid itself: {_CELL_FIELDS[key]}")
        if section and section not in (*STRATEGIES, "synthetic"):
            raise UsageError("vary", f"{key}: the section must be a strategy or synthetic")
        if section == "synthetic" and "synthetic" not in datasets:
            raise UsageError("vary", f"{key}: no dataset of the grid is synthetic ({', '.join(datasets)})")
        if section in STRATEGIES and section not in grid.strategies:
            raise UsageError("vary", f"{key}: {section} is not among the grid's strategies "
                                     f"({', '.join(grid.strategies)})")


def _variants(strategy: str, dataset: str, vary: tuple[tuple[str, tuple[Any, ...]], ...]) -> list[dict[str, Any]]:
    """The option combinations that apply to one strategy on one dataset (keys of other strategies, and
    synthetic.* on other data, are skipped)."""
    applicable = [(k, v) for k, v in vary if "." not in k or k.split(".")[0] == strategy
                  or (k.split(".")[0] == "synthetic" and dataset == "synthetic")]  # fmt: skip
    return [dict(zip([k for k, _ in applicable], combo, strict=True))
            for combo in itertools.product(*(values for _, values in applicable))]


def _slug(variant: dict[str, Any]) -> str:
    text = ",".join(f"{key.split('.')[-1]}={value}" for key, value in variant.items())
    return "".join(ch if ch.isalnum() or ch in "=.,:+-_" else "_" for ch in text)


def cell_configs(layers: dict[str, Any], grid: GridSpec, folder: Path) -> list[RunConfig]:
    """Every run of the grid, validated before any of them starts."""
    from strategies import get_strategy

    if (folder / "metrics.csv").exists():  # its cells went in, but every table and report showed the one run
        raise UsageError("name", f"{folder} holds a single run (train's metrics.csv), not a grid; choose another "
                                 "--name or --out")
    configs = []
    datasets = grid.datasets or (layers.get("dataset", "mnist-small"),)
    _check_vary(grid, datasets)
    for dataset in datasets:
        labels: dict[str, dict[str, dict[str, Any]]] = {}  # strategy -> variant folder label -> its values
        for strategy in grid.strategies:
            single = get_strategy(strategy).single_worker
            worker_counts = (1,) if single else grid.workers
            for variant in _variants(strategy, dataset, grid.vary):
                label = _slug(variant)
                for workers in worker_counts:
                    for seed in range(grid.seeds):
                        values = merge_layers(dict(layers), split_sections(_nest(variant), "--vary"))
                        run_name = "-".join([strategy, dataset, f"w{workers}", *([label] if label else []), f"s{seed}"])
                        values.update(strategy=strategy, dataset=dataset, workers=workers, seed=seed,
                                      out=str(folder / "runs"), variant=label, run_name=run_name)
                        if single:  # one worker is one process: the grid's --nproc is for the others
                            values["nproc"] = 1
                        try:
                            configs.append(config_from_dict(values))
                        except UsageError as exc:  # --nproc 4 beside --workers 2,8: say which cell
                            raise _in_cell(exc, run_name) from None
                earlier = labels.setdefault(strategy, {}).get(label)
                if earlier is not None:  # other --vary values that spell one folder name (equal ones: _vary_items)
                    spelled = [",".join(f"{key}={value}" for key, value in v.items()) for v in (earlier, variant)]
                    raise UsageError("vary", f"{spelled[0]} and {spelled[1]} would share the run folder "
                                             f"{configs[-1].run_name}")
                labels[strategy][label] = variant
    return configs


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in flat.items():
        section, _, name = key.rpartition(".")
        if section:
            out.setdefault(section, {})[name] = value
        else:
            out[key] = value
    return out


def _cell_state(config: RunConfig) -> str:
    """new, partial (resume it), extend (finished, but asked for more epochs or another budget) or done.

    A cell folder trained with other settings is a usage error: skipping it would report its results
    under this grid's command, and resuming it would mix two configurations in one run.
    """
    from pnnctl.trainer import changed_fields

    run_dir = Path(config.out) / config.run_id
    stored_file = run_dir / "config.toml"
    stored = load_toml(stored_file) if stored_file.exists() else None
    if stored is not None:
        asked = stored_form(config)
        changed = changed_fields(stored, asked)
        if changed:
            key = changed[0]
            remedy = ""
            if key == "network":  # it changes only the projected times, which plot recomputes from the tables
                remedy = f"pnnctl plot {Path(config.out).parent} --network {asked.get(key)} re-projects them, or "
            raise UsageError(
                key,
                f"{run_dir} was trained with {key}={stored.get(key)!r}, this grid asks {asked.get(key)!r}; "
                f"{remedy}give the grid another --name (or --out), or delete that run folder",
            )
    summary_file = run_dir / "summary.json"
    if summary_file.exists():
        try:
            summary = json.loads(summary_file.read_text())
        except (OSError, json.JSONDecodeError):
            summary = {}
        if summary.get("status") in ("finished", "diverged"):
            if stored is None or all(stored.get(k) == asked.get(k) for k in ("epochs", "budget")):
                return "done"
            return _finished_state(stored, config, summary.get("final", {}), run_dir)
    if (run_dir / "checkpoint.pt").exists() or (run_dir / "metrics.csv").exists():
        return "partial"
    return "new"


def _finished_state(stored: dict[str, Any], config: RunConfig, final: dict[str, Any], run_dir: Path) -> str:
    """done or extend for a finished run (``final``: its summary's last row) asked for other epochs or budget
    (an error if it would be cut back)."""
    from pnnctl.trainer import budget_reached_on_resume

    samples, epoch = float(final.get("samples_seen", 0)), float(final.get("epoch", 0))
    if not samples or not epoch:
        return "extend"
    spent = {"samples": samples, "bytes": float(final.get("bytes_sent_max_worker", 0)),
             "seconds": float(final.get("compute_s", 0))}  # fmt: skip
    return "done" if budget_reached_on_resume(stored, config, spent, round(samples / epoch), run_dir) else "extend"


def _in_cell(exc: UsageError, run_name: str) -> UsageError:
    """``exc`` naming the grid cell (the run name without its seed) it was raised for."""
    return UsageError(exc.field, f"{exc.problem} (cell {run_name.rsplit('-s', 1)[0]})")


def _checked_states(configs: list[RunConfig]) -> list[str]:
    """Each cell's state (:func:`_cell_state`), once every cell still to run has passed the checks its run
    would start with (psl's worker bound from the class count, ist's units per worker, sil's cuts, the
    data's files): the grid would otherwise train the other cells first and only then record that one as
    failed."""
    from pnnctl.trainer import check_run

    states = [_cell_state(config) for config in configs]
    checked: set[tuple[str, str, int, str]] = set()
    for config, state in zip(configs, states, strict=True):
        cell = (config.strategy, config.dataset, config.workers, config.variant)  # seeds share their checks
        if state == "done" or cell in checked:
            continue
        checked.add(cell)
        try:
            check_run(config)
        except UsageError as exc:
            raise _in_cell(exc, config.run_id) from None
    return states


def compare(
    layers: dict[str, Any],
    grid: GridSpec,
    *,
    out: str | Path | None = None,
    plots: bool = True,
    command: str = "pnnctl.compare(...)",
    progress_factory: Callable[[str], Any] | None = None,
    on_cell: Callable[[int, int, RunConfig, str], None] | None = None,
) -> CompareOutcome:
    """Run (or resume) a grid and write summary.csv, report.md and figures into ``<out>/<name>/``."""
    from pnnctl.launch import run_training

    folder = Path(out or layers.get("out", "results")) / grid.name
    configs = cell_configs(layers, grid, folder)
    failures: list[dict[str, Any]] = []
    warnings: list[tuple[str, str]] = []
    with folder_lock(folder, "compare"):
        # Every cell is checked against what its folder holds before anything is written or run.
        states = _checked_states(configs)
        atomic_write_text(folder / "grid.toml", _grid_toml(layers, grid, command))
        for index, (config, state) in enumerate(zip(configs, states, strict=True)):
            if on_cell is not None:
                on_cell(index, len(configs), config, state)
            if state == "done":
                continue
            progress = progress_factory(f"[{index + 1}/{len(configs)}] ") if progress_factory else None
            try:
                result = run_training(config, resume=state in ("partial", "extend"), progress=progress)
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # one failing cell must not stop the grid
                failures.append({"run_id": config.run_id, "error": f"{type(exc).__name__}: {exc}"})
                continue
            if result is not None and result.status == "interrupted":
                raise GridInterrupted(str(result.summary.get("signal", "SIGINT")))
            if result is not None:
                warnings.extend((config.run_id, note) for note in result.notes)
        atomic_write_text(folder / "failures.json", json.dumps(failures, indent=2) + "\n")
        target = layers.get("target_acc") or None
        metrics, runs, cells = _tables(folder, target)
        if metrics.empty:  # every cell failed: the failures are the outcome, and there is nothing to report
            return CompareOutcome(folder, metrics, runs, cells, failures, warnings=warnings)
        report_folder(folder, target_acc=target, command=command, failures=failures, draw=plots, metrics=metrics)
    return CompareOutcome(folder, metrics, runs, cells, failures, warnings=warnings)


def _tables(folder: Path, target_acc: float | None) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The grid's metrics rows, run summaries and cell summaries (report_folder writes summary.csv); empty where
    no cell has written a row (reading them raised "not a pnnctl results folder" in place of the failures)."""
    from pnnctl.schema import METRIC_COLUMNS
    from pnnctl.stats import cell_summary, load_metrics, run_summaries

    has_rows = any((folder / "runs").glob("*/metrics.csv"))
    metrics = load_metrics(folder) if has_rows else pd.DataFrame(columns=list(METRIC_COLUMNS))
    runs = run_summaries(metrics, target_acc)
    return metrics, runs, cell_summary(runs)


def report_folder(
    folder: Path,
    *,
    network: NetworkModel | None = None,
    target_acc: float | None = None,
    command: str = "",
    failures: list[dict[str, Any]] | None = None,
    scaling_metric: str = "bytes_sent_max_worker",
    draw: bool = True,
    metrics: pd.DataFrame | None = None,
) -> list[Path]:
    """Figures (unless not ``draw``), report.md and (for a compare folder) summary.csv from a run or compare
    folder's tables alone.

    ``network`` re-projects every projected time (table, figures) as if the runs had used it, and
    ``target_acc`` recomputes the to-target figures; summary.csv is rewritten to agree with the report.
    ``metrics``: the folder's rows where the caller has read them already (compare), so they are read once.
    """
    from pnnctl.plots import plot_folder
    from pnnctl.report import write_report, write_summary_csv
    from pnnctl.stats import cell_summary, fastest_to_target, load_metrics, projection_text, reproject, run_summaries

    folder = Path(folder)
    as_run = load_metrics(folder) if metrics is None else metrics
    reprojected = reproject(as_run, network)
    if target_acc is None:
        target_acc = _target_from_folder(folder)
    target_acc = target_acc or None  # 0 is none, as in a run's config
    cells = cell_summary(run_summaries(reprojected, target_acc))
    if (folder / "runs").is_dir():
        write_summary_csv(folder, cells)
    tasks = _synthetic_tasks(folder, as_run)
    figures = plot_folder(folder, network=network, scaling_metric=scaling_metric, metrics=as_run,
                          target_acc=target_acc, tasks=tasks) if draw else []  # fmt: skip
    fastest = None
    if target_acc:
        fastest = fastest_to_target(as_run, target_acc, list(NETWORK_PRESETS.values()), tasks)
    produced_by, redrawn_by = command, None
    grid_command = _grid_command(folder)
    if grid_command and grid_command != command:  # a report redrawn by `pnnctl plot`
        produced_by, redrawn_by = grid_command, command
    env = _environment(folder)
    if failures:
        env["failed cells"] = "; ".join(f"{f['run_id']} ({f['error']})" for f in failures)
    report = write_report(
        folder,
        command=produced_by,
        redrawn_by=redrawn_by,
        env=env,
        cells=cells,
        figures=figures,
        target_acc=target_acc,
        fastest=fastest,
        published=_published_numbers(set(as_run["strategy"])),
        projection=projection_text(as_run, network),
    )
    return [*figures, report]


def _synthetic_tasks(folder: Path, metrics: pd.DataFrame) -> dict[str, str]:
    """``synthetic (classes=2)`` for each synthetic run, naming the options in which the folder's synthetic
    runs differ (none where they share one task): each set of options draws another task."""
    run_ids = sorted(set(metrics.loc[metrics["dataset"] == "synthetic", "run_id"]))
    options: dict[str, dict[str, Any]] = {}
    single_run = (folder / "metrics.csv").is_file()
    for run_id in run_ids:
        config_file = (folder if single_run else folder / "runs" / run_id) / "config.toml"
        if config_file.is_file():
            options[run_id] = load_toml(config_file).get("synthetic", {})
    differing = [key for key in dict.fromkeys(k for values in options.values() for k in values)
                 if len({repr(values.get(key)) for values in options.values()}) > 1]  # fmt: skip
    if not differing:
        return {}
    return {run_id: "synthetic ({})".format(",".join(f"{key}={values.get(key)}" for key in differing))
            for run_id, values in options.items()}  # fmt: skip


def _target_from_folder(folder: Path) -> float | None:
    """The target of a run folder, or of the grid's latest command (grid.toml: a rerun may set another
    target without touching its finished runs' configs)."""
    for config_file in [folder / "config.toml", folder / "grid.toml", *sorted(folder.glob("runs/*/config.toml"))[:1]]:
        if config_file.exists():
            value = load_toml(config_file).get("target_acc", 0.0)
            return float(value) or None
    return None


def _environment(folder: Path) -> dict[str, Any]:
    """A run's env.json, or for a grid every run's together: a value the runs share as it is, one they do
    not as each value with its number of runs (start times as the first and last). The report showed the
    first run's alone: its seed, world size and commit for every run of the grid."""
    paths = [folder / "env.json"] if (folder / "env.json").exists() else sorted(folder.glob("runs/*/env.json"))
    envs, unreadable = [], []
    for path in paths:
        try:
            env = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # a damaged env.json was a traceback after the figures were redrawn
            env = None
        if isinstance(env, dict):
            envs.append(env)
        else:
            unreadable.append(str(path.relative_to(folder)))
    merged: dict[str, Any] = {"unreadable env.json": ", ".join(unreadable)} if unreadable else {}
    if not envs:
        return merged
    for key in dict.fromkeys(key for env in envs for key in env if key != "shards"):
        values = [env.get(key, "") for env in envs]
        counts = Counter(str(value) for value in values)
        if len(counts) == 1:
            merged[key] = values[0]
        elif key == "started":
            merged[key] = f"{min(counts)} to {max(counts)}"
        else:
            merged[key] = "; ".join(f"{value} ({n} run{'s' * (n > 1)})" for value, n in counts.items())
    merged["report written"] = time.strftime("%Y-%m-%d %H:%M:%S")
    return merged


def _published_numbers(strategies: set[str]) -> dict[str, str]:
    """What each strategy's paper reports (shared/papers.md), to print beside our numbers."""
    from strategies import STRATEGIES

    out = {}
    for name in sorted(strategies):
        cls = STRATEGIES.get(name)
        text = getattr(cls, "published", "") if cls else ""
        if text:
            out[name] = text
    return out


#: grid.toml's first line: the command that wrote the grid, for a report redrawn later by ``pnnctl plot``.
_PRODUCED_BY = "# produced by: "


def _grid_command(folder: Path) -> str | None:
    path = folder / "grid.toml"
    first = path.read_text().partition("\n")[0] if path.exists() else ""
    return first.removeprefix(_PRODUCED_BY) if first.startswith(_PRODUCED_BY) else None


def _grid_toml(layers: dict[str, Any], grid: GridSpec, command: str = "") -> str:
    values = {k: v for k, v in layers.items() if k not in ("options",) and not isinstance(v, dict)}
    if layers.get("synthetic"):
        values["synthetic"] = dict(layers["synthetic"])
    values["compare"] = {
        "strategies": list(grid.strategies),
        "workers": list(grid.workers),
        "seeds": grid.seeds,
        "datasets": list(grid.datasets),
        "name": grid.name,
    }
    if grid.vary:
        values["compare"]["vary"] = {key: list(vals) for key, vals in grid.vary}
    for strategy, table in layers.get("options", {}).items():
        values[strategy] = table
    # A comment keeps the file loadable as a config; a command spanning lines would not stay one.
    header = f"{_PRODUCED_BY}{command}\n" if command and "\n" not in command else ""
    return header + to_toml(values)


def compare_from_cli(
    config_file: Path | None,
    flags: dict[str, Any],
    assignments: list[str],
    grid_flags: dict[str, Any],
    *,
    plots: bool,
    command: str,
    progress_factory: Callable[[str], Any],
    console: Any,
    dry_run: bool = False,
    loss: str | None = None,
) -> CompareOutcome | None:
    file_values = load_toml(config_file) if config_file else {}
    table = file_values.pop("compare", {}) or {}
    if not isinstance(table, dict):
        raise UsageError("compare", f"must be a table ([compare] with strategies = [...], workers = [...], ...), "
                                    f"not {table!r}")
    grid_values = dict(table)
    grid_values.update(grid_flags)
    grid = GridSpec.build(grid_values)
    assignments = [*assignments, *loss_assignments(loss, list(grid.strategies))]
    layers = resolve_layers(file_values, flags, assignments, str(config_file))
    if dry_run:
        folder = Path(layers.get("out", "results")) / grid.name
        configs = cell_configs(layers, grid, folder)
        for config, state in zip(configs, _checked_states(configs), strict=True):
            console.print(f"{Path(config.out) / config.run_id}  [{state}]", highlight=False, markup=False)
        return None

    def announce(index: int, total: int, config: RunConfig, state: str) -> None:
        on_cell = getattr(progress_factory, "on_cell", None)
        if on_cell is not None:
            on_cell(index, total, config.run_id, state)
        if state == "done":
            console.print(f"[{index + 1}/{total}] {config.run_id}: already finished, skipped", highlight=False)

    return compare(
        layers,
        grid,
        plots=plots,
        command=command,
        progress_factory=progress_factory,
        on_cell=announce,
    )
