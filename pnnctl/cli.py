"""The ``pnnctl`` command line: train, compare, plot, list. A thin layer over the Python API.

Every user-fixable problem ends as one line on stderr and exit code 2; an interrupted run exits
130 (SIGINT) or 143 (SIGTERM) after writing a checkpoint and printing the resume command.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import shlex
import signal
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from pnnctl.errors import RankFailed, UsageError
from pnnctl.io import json_text

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Compare ways of cutting neural-network training across workers.",
)
# Without markup or emoji codes: run names, option docs (``alpha[n]``), warnings and the printed resume
# command (``--run-name run:x:2``) come out as they are written.
console = Console(stderr=True, markup=False, emoji=False)
out_console = Console(markup=False, emoji=False)


def _interactive() -> bool:
    return console.is_terminal


def _progress_text(epoch: float, loss: float, acc: float | None) -> str:
    """A progress line's figures. The evaluation before training has no training loss yet (NaN in
    metrics.csv): printed as "loss nan" it read like a diverged run."""
    parts = [] if epoch == 0 and math.isnan(loss) else [f"loss {loss:.4f}"]
    if acc is not None:
        parts.append(f"acc {acc * 100:.2f}%")
    return "  ".join(parts)


class CliProgress:
    """A rich progress bar on a terminal, plain lines otherwise (CI logs, pipes)."""

    def __init__(self, label: str = "") -> None:
        self.label = label
        self._progress: Any = None
        self._task: Any = None
        self._run_id = ""

    def start(self, run_id: str, total_epochs: float, epoch: float) -> None:
        self._run_id = run_id
        if _interactive():
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("{task.description}", markup=False),
                BarColumn(),
                TextColumn("epoch {task.completed:.2f}/{task.total:g}"),
                TextColumn("{task.fields[status]}", markup=False),
                TimeRemainingColumn(),
                console=console,
                transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task(
                f"{self.label}{run_id}", total=total_epochs, completed=epoch, status=""
            )
        else:
            console.print(f"{self.label}{run_id}: training for {total_epochs:g} epochs", highlight=False)

    def update(self, epoch: float, loss: float, acc: float | None) -> None:
        text = _progress_text(epoch, loss, acc)
        if self._progress is not None:
            self._progress.update(self._task, completed=epoch, status=text)
        else:
            console.print(f"{self.label}{self._run_id}: epoch {epoch:.2f}  {text}", highlight=False)

    def finish(self, status: str) -> None:
        if self._progress is not None:
            self._progress.stop()
        console.print(f"{self.label}{self._run_id}: {status}", highlight=False)


class GridProgress:
    """One progress display for a whole grid: cells done with an ETA, and the current cell's epochs.

    Called with a label it hands out the Progress object of one cell (what the trainer reports to);
    ``on_cell`` is told about every cell, skipped ones included. Plain lines when not on a terminal.
    """

    def __init__(self) -> None:
        self._progress: Any = None
        self._grid_task: Any = None
        self._cell_task: Any = None

    def on_cell(self, index: int, total: int, run_id: str, state: str) -> None:
        if not _interactive():
            return
        if self._progress is None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("{task.description}", markup=False),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[status]}", markup=False),
                TimeRemainingColumn(),
                console=console,
            )
            self._progress.start()
            self._grid_task = self._progress.add_task("grid", total=total, status="")
            self._cell_task = self._progress.add_task("cell", total=1, status="")
        self._progress.update(self._grid_task, completed=index, status=f"{run_id} ({state})")
        if index == total - 1 and state == "done":
            self.close(total)

    def close(self, total: int | None = None) -> None:
        if self._progress is not None:
            if total is not None:
                self._progress.update(self._grid_task, completed=total)
            self._progress.stop()
            self._progress = None

    def __call__(self, label: str) -> Any:
        if self._progress is None:
            return CliProgress(label)
        return _GridCellProgress(self, label)


class _GridCellProgress:
    def __init__(self, grid: GridProgress, label: str) -> None:
        self.grid, self.label = grid, label

    def start(self, run_id: str, total_epochs: float, epoch: float) -> None:
        progress = self.grid._progress
        progress.update(self.grid._cell_task, description=f"{self.label}{run_id}", total=total_epochs,
                        completed=epoch, status="")

    def update(self, epoch: float, loss: float, acc: float | None) -> None:
        text = _progress_text(epoch, loss, acc)
        self.grid._progress.update(self.grid._cell_task, completed=epoch, status=text)

    def finish(self, status: str) -> None:
        progress = self.grid._progress
        progress.advance(self.grid._grid_task)
        task = progress.tasks[self.grid._grid_task]
        if task.completed >= (task.total or 0):
            self.grid.close()


def _flags(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


# Options shared by train and compare (Typer reads them from the signatures).
StrategyOpt = Annotated[str | None, typer.Option("--strategy", "-s", help="strategy (pnnctl list strategies)")]
DatasetOpt = Annotated[str | None, typer.Option(help="dataset (pnnctl list datasets); default mnist-small")]
ModelOpt = Annotated[str | None, typer.Option(help="model spec, e.g. mlp:784-512-512-10 or lenet")]
EpochsOpt = Annotated[float | None, typer.Option(help="passes over the training set (default 5)")]
BatchOpt = Annotated[int | None, typer.Option("--batch-size", help="samples per worker per step (default 32)")]
LrOpt = Annotated[float | None, typer.Option(help="learning rate (default 0.05)")]
OptimizerOpt = Annotated[str | None, typer.Option(help="sgd | adam | adamw")]
DeviceOpt = Annotated[str | None, typer.Option(help="auto | cpu | cuda | cuda:K")]
PrecisionOpt = Annotated[str | None, typer.Option(help="fp32 | tf32 (CUDA) | bf16 (autocast; default fp32)")]
OutOpt = Annotated[str | None, typer.Option(help="results folder (default results/)")]
ConfigOpt = Annotated[Path | None, typer.Option("--config", help="TOML file of run fields and \\[strategy] tables")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="KEY=VALUE override, e.g. ist.local_steps=20")]
TargetOpt = Annotated[float | None, typer.Option("--target-acc", help="accuracy (0-1) to report time-to")]
ShardOpt = Annotated[str | None, typer.Option(help="iid | dirichlet:ALPHA | by-class")]
DataDirOpt = Annotated[str | None, typer.Option("--data-dir", help="folder of file-backed datasets")]
DownloadOpt = Annotated[bool | None, typer.Option("--download/--no-download", help="fetch via torchvision")]
NetworkOpt = Annotated[str | None, typer.Option(help="network model: lan-1g | dc-10g | dc-100g | wan | edge | LAT,BW")]
NprocOpt = Annotated[int | None, typer.Option(help="local processes (torch.distributed, gloo/nccl)")]
BackendOpt = Annotated[str | None, typer.Option(help="auto | gloo | nccl")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="continue an interrupted run from its checkpoint")]
BudgetOpt = Annotated[str | None, typer.Option(help="epochs | samples=N | bytes=N | seconds=N")]
EvalOpt = Annotated[float | None, typer.Option("--eval-every", help="evaluate every this many epochs")]
LossOpt = Annotated[
    str | None, typer.Option("--loss", help="the loss option of strategies that have one (psl: psl|ce; consensus, dgd)")
]




@app.command()
def train(
    strategy: StrategyOpt = None,
    dataset: DatasetOpt = None,
    model: ModelOpt = None,
    workers: Annotated[int | None, typer.Option(help="logical workers N (default 4)")] = None,
    epochs: EpochsOpt = None,
    batch_size: BatchOpt = None,
    lr: LrOpt = None,
    optimizer: OptimizerOpt = None,
    seed: Annotated[int | None, typer.Option(help="run seed (default 0)")] = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    out: OutOpt = None,
    run_name: Annotated[str | None, typer.Option("--run-name", help="run folder name")] = None,
    resume: ResumeOpt = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    target_acc: TargetOpt = None,
    sharding: ShardOpt = None,
    data_dir: DataDirOpt = None,
    download: DownloadOpt = None,
    network: NetworkOpt = None,
    budget: BudgetOpt = None,
    eval_every: EvalOpt = None,
    nproc: NprocOpt = None,
    backend: BackendOpt = None,
    loss: LossOpt = None,
    fmt: Annotated[str, typer.Option("--format", help="table | json")] = "table",
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="check that the run would start, print its resolved config and stop")
    ] = False,
) -> None:
    """Train one run into OUT/RUN_NAME/ (metrics.csv, summary.json, config.toml, env.json)."""
    from pnnctl.config import resolve_config, resumed_limits

    if not dry_run:
        _start_local_ranks_server(nproc)

    flags = _flags(
        strategy=strategy, dataset=dataset, model=model, workers=workers, epochs=epochs,
        batch_size=batch_size, lr=lr, optimizer=optimizer, seed=seed, device=device, precision=precision,
        out=out, run_name=run_name, target_acc=target_acc, sharding=sharding, data_dir=data_dir,
        download=download, network=network, budget=budget, eval_every=eval_every, nproc=nproc,
        backend=backend,
    )
    cfg = resolve_config(config, flags, set_ or [], loss=loss)
    if resume:  # what the command does not say of how far to train, the run folder's config.toml does
        cfg = resolve_config(config, flags, set_ or [], resumed_limits(Path(cfg.out) / cfg.run_id), loss)
    if fmt not in ("table", "json"):
        raise UsageError("format", f"must be table or json, not {fmt!r}")
    if dry_run:
        from pnnctl.config import config_to_dict, to_toml
        from pnnctl.trainer import check_run

        # A config the run would refuse is no plan (compare --dry-run checks its cells too); but a dry run
        # must not fetch data, so with --download the data-dependent checks are left to the run.
        if not cfg.download:
            check_run(cfg)
        out_console.print(to_toml(config_to_dict(cfg)), highlight=False, end="")
        return
    from pnnctl.launch import run_training

    result = run_training(cfg, resume=resume, progress=CliProgress())
    if result is None:  # a non-zero rank of a distributed run: rank 0 reports
        return
    for note in result.notes:
        console.print(f"warning: {note}", highlight=False, soft_wrap=True)
    if fmt == "json":
        out_console.print_json(json_text(result.summary))
    else:
        _print_run(result.summary)
    _exit_for_status(result.status, result.summary)


def _start_local_ranks_server(nproc: int | None) -> None:
    """With ``--nproc P > 1``, start the server the local ranks fork from now, before this process
    imports torch (resolving the config or the grid does), so that the two imports overlap
    (pnnctl.rankserver).
    An nproc set in a config file or by --set starts it only when the ranks start: merging those
    layers already imports torch (the strategies' names tell a --set section from a field)."""
    if nproc is not None and nproc > 1 and "RANK" not in os.environ:
        from pnnctl.rankserver import start_rank_server

        start_rank_server()


def _print_run(summary: dict[str, Any]) -> None:
    final = summary.get("final", {})

    def number(values: dict[str, Any], key: str, default: float = 0.0) -> float:
        value = values.get(key, default)
        return float("nan") if value is None else float(value)  # summary.json writes NaN as null

    table = Table(title=f"{summary.get('run_id')} ({summary.get('status')})")
    for col in ("test acc", "best acc", "epochs", "bytes sent / worker", "compute s", "projected s"):
        table.add_column(col, justify="right")
    table.add_row(
        f"{number(final, 'test_acc', math.nan) * 100:.2f}%",
        f"{number(summary, 'best_test_acc', math.nan) * 100:.2f}%",
        f"{number(final, 'epoch'):.2f}",
        _human_bytes(number(final, "bytes_sent_max_worker")),
        f"{number(final, 'compute_s'):.2f}",
        f"{number(final, 'projected_s'):.2f}",
    )
    out_console.print(table)


def _print_whole(table: Table) -> None:
    """``table`` at the console's width, or wider where its columns need more: cropped at 80 columns, a
    wide grid's last columns lost digits ("0.07" for 0.077) and its run statuses entirely."""
    from rich.measure import Measurement

    needed = Measurement.get(out_console, out_console.options, table).minimum
    out_console.print(table, width=max(out_console.width, needed), crop=False)


def _human_bytes(value: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(value) < 1000 or unit == "TB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{value:.0f} B"
        value /= 1000
    return f"{value:.1f} TB"


def _command_line() -> str:
    """This process's command, quoted so that it can be pasted back into a shell."""
    return " ".join(shlex.quote(a) for a in ["pnnctl", *sys.argv[1:]])


def _seeds_together(warnings: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """One line per warning text and cell: the seeds of a cell that warned alike as ``NAME-s0,1,2``."""
    seeds: dict[tuple[str, str], list[str]] = {}
    for run_id, warning in warnings:
        cell, _, seed = run_id.rpartition("-s")
        if not cell or not seed.isdigit():
            cell, seed = run_id, ""
        seeds.setdefault((cell, warning), []).append(seed)
    return [(f"{cell}-s{','.join(found)}" if found != [""] else cell, warning)
            for (cell, warning), found in seeds.items()]


def _exit_for_status(status: str, summary: dict[str, Any]) -> None:
    if status == "interrupted":
        command = _command_line()
        if "--resume" not in sys.argv:
            command += " --resume"
        console.print(f"interrupted; resume with: {command}", highlight=False, soft_wrap=True)
        signame = summary.get("signal", "SIGINT")
        raise typer.Exit(128 + int(getattr(signal, signame, signal.SIGINT)))
    if status == "diverged":
        console.print(
            "run diverged (NaN or inf); the last good checkpoint is kept. A smaller --lr usually helps "
            "(psl's exponential loss: --optimizer adam --lr 0.001, or --set psl.optimizer=lbfgs)",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(3)


@app.command()
def compare(
    strategies: Annotated[str | None, typer.Option(help="comma-separated strategies")] = None,
    workers: Annotated[str | None, typer.Option(help="comma-separated worker counts, e.g. 2,4,8")] = None,
    seeds: Annotated[int | None, typer.Option(help="seeds per cell: 0..K-1 (default 1)")] = None,
    datasets: Annotated[str | None, typer.Option(help="comma-separated datasets")] = None,
    name: Annotated[str | None, typer.Option(help="grid folder name under --out (default: compare)")] = None,
    vary: Annotated[
        list[str] | None,
        typer.Option("--vary", help="grid axis over an option: KEY=V1,V2 (e.g. consensus.topology=ring,star)"),
    ] = None,
    model: ModelOpt = None,
    epochs: EpochsOpt = None,
    batch_size: BatchOpt = None,
    lr: LrOpt = None,
    optimizer: OptimizerOpt = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    out: OutOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    target_acc: TargetOpt = None,
    sharding: ShardOpt = None,
    data_dir: DataDirOpt = None,
    network: NetworkOpt = None,
    budget: BudgetOpt = None,
    eval_every: EvalOpt = None,
    nproc: NprocOpt = None,
    loss: LossOpt = None,
    no_plots: Annotated[
        bool, typer.Option("--no-plots", help="skip figures (report.md and summary.csv are still written)")
    ] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="list the grid's runs and stop")] = False,
    fmt: Annotated[str, typer.Option("--format", help="table | json")] = "table",
) -> None:
    """Run a grid of strategies x workers x seeds x datasets into OUT/NAME/ with a report and plots.

    A grid folder resumes: finished cells are skipped, a half-done cell continues from its checkpoint.
    """
    if not dry_run:  # a grid's --nproc cells share one server; a grid of one-worker cells leaves it idle
        _start_local_ranks_server(nproc)
    from pnnctl.grid import GridSpec, compare_from_cli

    if fmt not in ("table", "json"):
        raise UsageError("format", f"must be table or json, not {fmt!r}")
    flags = _flags(
        model=model, epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer, device=device,
        precision=precision, out=out, target_acc=target_acc, sharding=sharding, data_dir=data_dir, network=network,
        budget=budget, eval_every=eval_every, nproc=nproc,
    )
    grid_flags = GridSpec.from_flags(
        strategies=strategies, workers=workers, seeds=seeds, datasets=datasets, name=name, vary=vary
    )

    grid_progress = GridProgress()
    try:
        outcome = compare_from_cli(config, flags, set_ or [], grid_flags, plots=not no_plots, command=_command_line(),
                                   progress_factory=grid_progress, console=console, dry_run=dry_run, loss=loss)
    except KeyboardInterrupt as exc:  # a cell stopped for a signal (it checkpointed), or Ctrl-C between cells
        grid_progress.close()
        signame = getattr(exc, "signal_name", "SIGINT")
        console.print(f"interrupted; rerun the same command to continue (finished cells are skipped, a stopped "
                      f"one resumes): {_command_line()}", highlight=False, soft_wrap=True)
        raise typer.Exit(128 + int(getattr(signal, signame, signal.SIGINT))) from None
    finally:
        grid_progress.close()
    if outcome is None:
        return
    if fmt == "json":
        out_console.print_json(json_text(outcome.cells.to_dict(orient="records")))
    else:
        from pnnctl.report import render_table
        from pnnctl.stats import variant_names_model

        # The terminal gets the headline columns; summary.csv and report.md hold all of them.
        headline = ("strategy", "workers", "final acc", "best acc", "MB sent/worker", "projected s", "reached")
        rows = []
        table_rows = render_table(outcome.cells)
        # A cell is strategy/dataset/model/wN[/VALUES]: the dataset and model get a column where the grid
        # has several (rows would otherwise look alike), the --vary values where any cell has them (cells of
        # strategies the axis does not touch have none, and still need the column).
        parts = [row.get("cell", "").split("/") for row in table_rows]
        shown = [(name, index) for name, index in (("dataset", 1), ("model", 2))
                 if len({cell[index] for cell in parts if len(cell) > index}) > 1]
        variants = ["/".join(cell[4:]) for cell in parts]
        varied = any(variants)
        if any(variant_names_model(variant) for variant in variants):
            shown = [(name, index) for name, index in shown if name != "model"]  # the variant names it
        # A diverged or failed run shows as "—": the statuses say why, where any run did not finish.
        unfinished = any(row.get("run statuses", "").partition(":")[0] not in ("", "finished")
                         or "," in row.get("run statuses", "") for row in table_rows)  # fmt: skip
        for row, cell, variant in zip(table_rows, parts, variants, strict=True):
            short = {k: v for k, v in row.items() if k.startswith(headline)}
            described = {name: cell[index] if len(cell) > index else "-" for name, index in shown}
            if varied:  # a value per line, so that several varied keys do not crowd out the figures
                described["variant"] = re.sub(r",(?=[A-Za-z_][\w.]*=)", "\n", variant) or "-"
            if unfinished:
                short["runs"] = row.get("run statuses", "")
            rows.append({"strategy": short.pop("strategy"), **described, **short})
        if rows:
            table = Table(title=f"{outcome.folder} ({outcome.aggregate_note})")
            for col in rows[0]:
                # Names are what tells rows apart: the figures' columns wrap first, but never inside a number.
                name = col in ("strategy", "dataset", "model", "variant", "runs")
                widest_number = max(len(str(row[col]).split(" ")[0]) for row in rows)
                table.add_column(col, no_wrap=name, min_width=None if name else max(5, widest_number))
            for row in rows:
                table.add_row(*row.values())
            _print_whole(table)
    # On stderr in either format: --format json keeps stdout for the JSON alone.
    for runs, warning in _seeds_together(outcome.warnings):
        console.print(f"warning: {runs}: {warning}", highlight=False, soft_wrap=True)
    console.print(f"report: {outcome.folder / 'report.md'}", highlight=False)
    for failure in outcome.failures:
        console.print(f"cell failed: {failure['run_id']}: {failure['error']}", highlight=False, soft_wrap=True)
    if outcome.failures:  # the other cells ran and are reported; a script must still learn of it
        console.print(f"{len(outcome.failures)} cell(s) failed (listed in {outcome.folder / 'failures.json'}); "
                      "rerun the same command once fixed", highlight=False, soft_wrap=True)
        raise typer.Exit(1)


@app.command()
def plot(
    folder: Annotated[Path, typer.Argument(help="a run or compare folder")],
    network: NetworkOpt = None,
    target_acc: TargetOpt = None,
    scaling_metric: Annotated[
        str, typer.Option("--scaling-metric", help="per-run figure the scaling plot shows against workers")
    ] = "bytes_sent_max_worker",
) -> None:
    """Draw figures (PNG and SVG), report.md and a grid's summary.csv from a results folder's tables alone."""
    from pnnctl.grid import report_folder
    from pnnctl.network import parse_network

    written = report_folder(folder, network=parse_network(network) if network else None,
                            target_acc=target_acc, command=_command_line(),
                            scaling_metric=scaling_metric)
    for path in written:
        out_console.print(str(path), highlight=False)


@app.command(name="list")
def list_(
    what: Annotated[str, typer.Argument(help="strategies | datasets | models | networks | all")] = "all",
) -> None:
    """Show strategies (with their options), datasets, models and network presets, one line each."""
    from pnnctl.config import field_docs
    from pnnctl.data import DATASETS
    from pnnctl.models import MODEL_FAMILIES
    from pnnctl.network import NETWORK_PRESETS
    from strategies import STRATEGIES

    sections = {"strategies", "datasets", "models", "networks"}
    if what != "all" and what not in sections:
        raise UsageError("list", f"must be one of {', '.join(sorted(sections))} or all, not {what!r}")
    if what in ("all", "strategies"):
        table = Table(title="strategies")
        table.add_column("name")
        table.add_column("what it does / options (--set NAME.OPTION=V)")
        for name, cls in STRATEGIES.items():
            docs = field_docs(cls.Options)
            opts = [f"  {f.name}={f.default!r}: {docs.get(f.name, '')}" for f in dataclasses.fields(cls.Options)]
            table.add_row(name, "\n".join([cls.summary, *opts]))
        out_console.print(table)
    if what in ("all", "datasets"):
        table = Table(title="datasets")
        table.add_column("name")
        table.add_column("description")
        for name, text in DATASETS.items():
            table.add_row(name, text)
        out_console.print(table)
    if what in ("all", "models"):
        table = Table(title="models")
        table.add_column("family")
        table.add_column("spec")
        for name, family in MODEL_FAMILIES.items():
            table.add_row(name, family.description)
        out_console.print(table)
    if what in ("all", "networks"):
        table = Table(title="network presets")
        for col in ("name", "latency", "bandwidth"):
            table.add_column(col)
        for name, net in NETWORK_PRESETS.items():
            table.add_row(name, f"{net.latency_s * 1e3:g} ms", f"{net.bandwidth_bytes_per_s * 8 / 1e9:g} Gbit/s")
        out_console.print(table)


def _click_exceptions() -> Any:
    # Typer >= 0.29 vendors click as typer._click; older versions use click itself.
    try:
        from typer._click import exceptions
    except ImportError:
        from click import exceptions
    return exceptions


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app; turn usage errors into one line and exit code 2."""
    click_errors = _click_exceptions()
    try:
        # standalone_mode=False hands back the exit code of typer.Exit instead of raising it.
        code = app(args=argv, standalone_mode=False)
    except UsageError as exc:
        console.print(f"error: {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except RankFailed as exc:  # the ranks' own tracebacks are in the message; the launcher's adds nothing
        console.print(f"error: {exc}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    except getattr(click_errors, "NoArgsIsHelpError", ()) as exc:
        exc.show()
        sys.exit(0)
    except click_errors.ClickException as exc:
        console.print(f"error: {exc.format_message()}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    sys.exit(code if isinstance(code, int) else 0)
