"""compare and plot on a real small grid: tables, figures and report from one command."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import matplotlib.image
import pandas as pd
import pytest

import pnnctl
from distributed_utils import run_cli

GRID = ["compare", "--strategies", "centralized,allreduce,local-sgd", "--workers", "2,3", "--seeds", "2",
        "--datasets", "digits", "--model", "mlp:64-32-10", "--epochs", "1", "--eval-every", "0.5",
        "--target-acc", "0.5", "--lr", "0.1", "--name", "grid", "--set", "local-sgd.local_steps=4"]


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("compare")
    result = run_cli([*GRID, "--out", str(out)])
    assert result.returncode == 0, result.stderr
    return out / "grid"


def test_grid_runs_every_cell_and_summarises_over_seeds(grid: Path) -> None:
    runs = sorted(p.name for p in (grid / "runs").iterdir())
    # centralized has one worker whatever --workers says: 2 seeds; the others 2 worker counts x 2 seeds.
    assert len(runs) == 2 + 2 * 2 * 2
    summary = pd.read_csv(grid / "summary.csv")
    assert len(summary) == 5
    assert (summary["n_seeds"] == 2).all()
    for _, cell in summary.iterrows():
        finals = [pd.read_csv(grid / "runs" / f"{cell['strategy']}-digits-w{cell['workers']}-s{s}" / "metrics.csv")
                  ["test_acc"].iloc[-1] for s in (0, 1)]
        assert cell["final_acc_mean"] == pytest.approx(sum(finals) / 2)
    options = pd.read_csv(grid / "runs" / "local-sgd-digits-w2-s0" / "metrics.csv")
    assert options["messages_max_worker"].iloc[-1] > 0
    toml = (grid / "runs" / "local-sgd-digits-w2-s0" / "config.toml").read_text()
    assert "local_steps = 4" in toml


def _valid_png(path: Path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 2000
    image = matplotlib.image.imread(path)
    assert image.std() > 0


def test_every_figure_is_a_valid_png_and_svg(grid: Path) -> None:
    names = {"acc_vs_epoch", "acc_vs_bytes", "acc_vs_time", "pareto", "memory", "scaling"}
    for name in names:
        _valid_png(grid / "figures" / f"{name}.png")
        assert ET.parse(grid / "figures" / f"{name}.svg").getroot().tag.endswith("svg")
    report = (grid / "report.md").read_text()
    assert "pnnctl compare" in report and "local-sgd" in report and "figures/acc_vs_bytes.png" in report
    assert "measured peak MB, largest process" in report


def test_plot_redraws_from_tables_alone_under_another_network(grid: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    (copy / "runs").mkdir(parents=True)
    for run in (grid / "runs").iterdir():  # only the tables: no checkpoints, no models
        (copy / "runs" / run.name).mkdir()
        (copy / "runs" / run.name / "metrics.csv").write_bytes((run / "metrics.csv").read_bytes())
    result = run_cli(["plot", str(copy), "--network", "wan", "--target-acc", "0.5"])
    assert result.returncode == 0, result.stderr
    _valid_png(copy / "figures" / "acc_vs_time.png")
    report = (copy / "report.md").read_text()
    assert "Projected time (compute per worker + communication) is re-projected on wan." in report
    # The table's projected time is wan's too (it used to stay the runs' lan-1g figure beside wan figures),
    # and summary.csv says what the report says.
    from pnnctl.network import NETWORK_PRESETS
    from pnnctl.stats import project_time

    last = pd.read_csv(copy / "runs" / "local-sgd-digits-w2-s0" / "metrics.csv").iloc[[-1]]
    on_wan = float(project_time(last, NETWORK_PRESETS["wan"]).iloc[0])
    # At least the latency wan adds to every message of the busiest worker (not a multiple of the measured
    # compute time, which a loaded machine stretches).
    wan, lan = NETWORK_PRESETS["wan"], NETWORK_PRESETS["lan-1g"]
    added_latency = float(last["messages_max_worker"].iloc[0]) * (wan.latency_s - lan.latency_s)
    assert added_latency > 0.1 and on_wan >= float(last["projected_s"].iloc[0]) + 0.99 * added_latency
    cells = pd.read_csv(copy / "summary.csv").set_index("cell")
    seeds = [float(project_time(pd.read_csv(copy / "runs" / f"local-sgd-digits-w2-s{seed}" / "metrics.csv").iloc[[-1]],
                                NETWORK_PRESETS["wan"]).iloc[0]) for seed in (0, 1)]  # fmt: skip
    assert cells.loc["local-sgd/digits/mlp:64-32-10/w2", "projected_s_mean"] == pytest.approx(sum(seeds) / 2)
    row = next(line for line in report.splitlines() if line.startswith("| local-sgd · 2 workers |"))
    assert f"{sum(seeds) / 2:.3g}" in row


def test_a_redrawn_report_keeps_the_command_that_produced_the_grid(grid: Path, tmp_path: Path) -> None:
    import shutil

    from pnnctl.config import load_toml

    copy = tmp_path / "grid"
    shutil.copytree(grid, copy, ignore=shutil.ignore_patterns("*.pt"))
    def code_blocks(report: Path) -> list[str]:
        return [block.removeprefix("sh").strip() for block in report.read_text().split("```")[1::2]]

    produced = code_blocks(grid / "report.md")[0]
    assert produced.startswith("pnnctl compare --strategies centralized,allreduce,local-sgd")
    result = run_cli(["plot", str(copy), "--network", "wan"])
    assert result.returncode == 0, result.stderr
    # The compare command stays first (it used to be replaced by the plot command), the redraw follows.
    assert code_blocks(copy / "report.md")[:2] == [produced, f"pnnctl plot {copy} --network wan"]
    assert load_toml(copy / "grid.toml")["compare"]["seeds"] == 2  # the command is a comment there


def test_plot_on_a_single_run_folder(grid: Path) -> None:
    result = run_cli(["plot", str(grid / "runs" / "allreduce-digits-w2-s0")])
    assert result.returncode == 0, result.stderr
    _valid_png(grid / "runs" / "allreduce-digits-w2-s0" / "figures" / "acc_vs_epoch.png")


def test_format_json_and_python_api_agree_with_the_table(grid: Path, tmp_path: Path) -> None:
    result = run_cli([*GRID, "--out", str(grid.parent), "--format", "json", "--no-plots"])
    assert result.returncode == 0, result.stderr
    cells = json.loads(result.stdout)
    summary = pd.read_csv(grid / "summary.csv")
    assert sorted(c["final_acc_mean"] for c in cells) == pytest.approx(sorted(summary["final_acc_mean"]))
    metrics, api_cells = pnnctl.compare(
        ["allreduce"], workers=[2], dataset="digits", model="mlp:64-32-10", epochs=1.0, eval_every=0.5, lr=0.1,
        target_acc=0.5, out=str(tmp_path), name="api", plots=False,
    )
    assert set(metrics["run_id"]) == {"allreduce-digits-w2-s0"}
    expected = summary.set_index("cell").loc["allreduce/digits/mlp:64-32-10/w2"]
    # Same config and seed 0 as the CLI grid's first seed: identical final accuracy.
    first_seed = pd.read_csv(grid / "runs" / "allreduce-digits-w2-s0" / "metrics.csv")["test_acc"].iloc[-1]
    assert api_cells["final_acc_mean"].iloc[0] == pytest.approx(first_seed)
    assert expected["n_seeds"] == 2


def test_a_single_worker_baseline_runs_in_one_process_in_an_nproc_grid(tmp_path: Path) -> None:
    from pnnctl.grid import GridSpec, cell_configs

    # centralized is one worker, which cannot fill 2 processes: the whole grid was refused, so an --nproc
    # comparison could not include the centralized baseline.
    grid = GridSpec.build({"strategies": ["centralized", "allreduce"], "workers": [2, 4], "datasets": ["digits"]})
    configs = cell_configs({"nproc": 2, "epochs": 1.0}, grid, tmp_path)
    assert {(c.strategy, c.workers, c.nproc) for c in configs} == {("centralized", 1, 1), ("allreduce", 2, 2),
                                                                    ("allreduce", 4, 2)}  # fmt: skip


def test_vary_repeats_each_strategys_cells_over_its_own_option_values(tmp_path: Path) -> None:
    result = run_cli(["compare", "--strategies", "local-sgd,allreduce", "--workers", "2", "--datasets", "digits",
                      "--model", "mlp:64-32-10", "--epochs", "0.5", "--vary", "local-sgd.local_steps=2,8",
                      "--vary", "lr=[0.05, 0.1]", "--no-plots", "--out", str(tmp_path)])
    assert result.returncode == 0, result.stderr
    summary = pd.read_csv(tmp_path / "compare" / "summary.csv")
    cells = set(summary["cell"])
    # local-sgd varies local_steps x lr (4 cells); allreduce only lr (2 cells).
    assert len(cells) == 6
    assert "local-sgd/digits/mlp:64-32-10/w2/local_steps=8,lr=0.1" in cells
    assert "allreduce/digits/mlp:64-32-10/w2/lr=0.05" in cells
    config = (tmp_path / "compare" / "runs" / "local-sgd-digits-w2-local_steps=8,lr=0.1-s0" / "config.toml").read_text()
    assert "local_steps = 8" in config and "lr = 0.1" in config
    bytes_by_steps = {
        steps: pd.read_csv(tmp_path / "compare" / "runs" / f"local-sgd-digits-w2-local_steps={steps},lr=0.05-s0"
                           / "metrics.csv")["bytes_sent_max_worker"].iloc[-1]
        for steps in (2, 8)
    }
    assert bytes_by_steps[2] >= 2.5 * bytes_by_steps[8]  # far fewer averages with 4x more local steps


def test_a_vary_grid_lists_option_values_in_number_order_and_marks_untouched_cells(
    cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pnnctl.cli

    monkeypatch.setattr(pnnctl.cli.out_console, "_width", 250)  # one line per row, nothing cut
    result = cli("compare", "--strategies", "centralized,local-sgd", "--workers", "2", "--datasets", "digits",
                 "--model", "mlp:64-16-10", "--epochs", "0.2", "--vary", "local-sgd.local_steps=10,2",
                 "--no-plots", "--out", tmp_path)  # fmt: skip
    assert result.code == 0, result.err
    cells = list(pd.read_csv(tmp_path / "compare" / "summary.csv")["cell"])
    assert [cell.rsplit("/", 1)[-1] for cell in cells] == ["w1", "local_steps=2", "local_steps=10"]  # not 10, 2
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in result.out.splitlines() if line.startswith("│")]
    # centralized has no local_steps: "-" in the variant column keeps its workers and accuracy in theirs
    # (the console table used to shift them one column left).
    assert [row[:3] for row in rows] == [
        ["centralized", "-", "1"], ["local-sgd", "local_steps=2", "2"], ["local-sgd", "local_steps=10", "2"]
    ]
    assert all(row[3].endswith("(n=1)") for row in rows)


def test_an_80_column_console_keeps_every_figure_of_a_grid_varied_over_two_keys(
    cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pnnctl.cli

    monkeypatch.setattr(pnnctl.cli.out_console, "_width", 80)
    result = cli("compare", "--strategies", "local-sgd", "--workers", "2", "--datasets", "digits", "--epochs", "0.2",
                 "--vary", "sharding=iid,dirichlet:0.3", "--vary", "model=mlp:64-16-10,mlp:64-24-10",
                 "--no-plots", "--out", tmp_path)  # fmt: skip
    assert result.code == 0, result.err
    # The variant and model columns (which also repeated the model) used to take the whole width, and the
    # figure columns were squeezed to nothing. Now a varied value per line, the model once, and every
    # number whole (the table grows past 80 columns rather than cut "4.84e-03" to "4.84…").
    lines = [line for line in result.out.splitlines() if line.startswith(("┃", "│"))]
    assert all(line.endswith(("┃", "│")) for line in lines)
    assert "model" not in " ".join(line for line in lines if line.startswith("┃"))
    summary = pd.read_csv(tmp_path / "compare" / "summary.csv")
    first_lines = [[c.strip() for c in line.split("│")[1:-1]] for line in lines if line.startswith("│ local-sgd")]
    assert [row[1] for row in first_lines] == ["sharding=dirichlet:0.3", "sharding=iid"] * 2
    assert [row[3] for row in first_lines] == [f"{100 * acc:.2f}" for acc in summary["final_acc_mean"]]
    from pnnctl.report import _number

    assert [row[5] for row in first_lines] == [_number(b / 1e6) for b in summary["bytes_sent_max_worker_mean"]]


def test_a_table_wider_than_the_console_is_printed_whole(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pnnctl.cli

    monkeypatch.setattr(pnnctl.cli.out_console, "_width", 80)
    result = cli("compare", "--strategies", "local-sgd", "--workers", "2", "--datasets", "digits", "--epochs", "0.3",
                 "--vary", "local-sgd.local_steps=2,40", "--target-acc", "0.2", "--no-plots",
                 "--out", tmp_path)  # fmt: skip
    assert result.code == 0, result.err
    # With the to-target columns the table needs more than 80 columns: cropped, "0.057" read "0" and
    # the last column's values were cut off mid-number.
    rows = [line for line in result.out.splitlines() if line.startswith("│ local-sgd")]
    assert len(rows) == 2 and all(line.endswith("│") for line in rows), result.out
    summary = pd.read_csv(tmp_path / "compare" / "summary.csv")
    shown = [[c.strip() for c in line.split("│")[1:-1]][-1] for line in rows]
    from pnnctl.report import _number

    assert shown == [_number(value) for value in summary["projected_s_to_target_mean"]]


def test_a_grid_over_two_datasets_names_each_rows_dataset(
    cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pnnctl.cli

    monkeypatch.setattr(pnnctl.cli.out_console, "_width", 250)
    result = cli("compare", "--strategies", "allreduce", "--workers", "2", "--datasets", "digits,synthetic",
                 "--set", "synthetic.samples=600", "--epochs", "0.2", "--no-plots", "--out", tmp_path)  # fmt: skip
    assert result.code == 0, result.err
    summary = pd.read_csv(tmp_path / "compare" / "summary.csv").set_index("dataset")
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in result.out.splitlines() if line.startswith("│")]
    # Without the dataset column the two rows read "allreduce | 2 | ..." alike.
    assert [row[:3] for row in rows] == [["allreduce", "digits", "2"], ["allreduce", "synthetic", "2"]]
    for row in rows:
        assert row[3] == f"{100 * summary.loc[row[1], 'final_acc_mean']:.2f} (n=1)"
    # --no-plots skips the figures, not the report the console points to (it used to name a missing file).
    report = tmp_path / "compare" / "report.md"
    assert f"report: {report}" in " ".join(result.err.split())
    assert "| allreduce · synthetic |" in report.read_text() and "## Figures" not in report.read_text()
    assert not (tmp_path / "compare" / "figures").exists()


def test_the_console_table_says_which_cells_diverged(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pnnctl.cli

    monkeypatch.setattr(pnnctl.cli.out_console, "_width", 250)
    result = cli("compare", "--strategies", "allreduce", "--workers", "2", "--datasets", "digits", "--epochs", "0.5",
                 "--model", "mlp:64-16-10", "--vary", "lr=[0.1, 1e8]", "--no-plots", "--out", tmp_path)  # fmt: skip
    assert result.code == 0, result.err
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in result.out.splitlines() if line.startswith("│")]
    # The diverged cell has no final accuracy (no run behind it: n=0); without the statuses nothing said why.
    assert [(row[1], row[3], row[-1]) for row in rows] == [
        ("lr=0.1", rows[0][3], "finished:1"), ("lr=100000000.0", "— (n=0)", "diverged:1")
    ]
    assert rows[0][3].endswith("(n=1)") and not rows[0][3].startswith("—")


def test_the_python_api_compare_is_not_shadowed_by_a_module() -> None:
    import importlib

    for name in ("pnnctl.grid", "pnnctl.stats", "pnnctl.report", "pnnctl.plots", "pnnctl.cli"):
        importlib.import_module(name)
    assert callable(pnnctl.compare) and callable(pnnctl.run)


def test_scaling_plot_shows_a_chosen_metric_and_refuses_an_unknown_one(grid: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    (copy / "runs").mkdir(parents=True)
    for run in (grid / "runs").iterdir():
        (copy / "runs" / run.name).mkdir()
        (copy / "runs" / run.name / "metrics.csv").write_bytes((run / "metrics.csv").read_bytes())
    result = run_cli(["plot", str(copy), "--scaling-metric", "projected_s"])
    assert result.returncode == 0, result.stderr
    svg = (copy / "figures" / "scaling.svg").read_text()
    assert "projected_s vs workers" in svg or "projected" in svg
    _valid_png(copy / "figures" / "scaling.png")
    bad = run_cli(["plot", str(copy), "--scaling-metric", "happiness"])
    assert bad.returncode == 2 and bad.stderr.startswith("error: scaling_metric:")


def test_compare_prints_the_warnings_of_the_cells_it_ran(cli, tmp_path: Path) -> None:
    # A round stops on a whole step (2 workers x 32 = 64 samples): 0.1 epochs of digits (144) train 192.
    result = cli("compare", "--strategies", "local-sgd,allreduce", "--workers", "2", "--datasets", "digits",
                 "--model", "mlp:64-16-10", "--epochs", "0.1", "--no-plots", "--out", tmp_path)  # fmt: skip
    assert result.code == 0, result.err
    (warning,) = [line for line in result.err_lines if line.startswith("warning: local-sgd-digits-w2-s0: ")]
    assert "epochs (192 samples) where the budget allowed 0.1: the last round of local-sgd held 192" in warning
    # --format json printed no warnings at all; they go to stderr, leaving stdout to the JSON.
    as_json = cli("compare", "--strategies", "local-sgd", "--workers", "2", "--datasets", "digits", "--model",
                  "mlp:64-16-10", "--epochs", "0.1", "--no-plots", "--out", tmp_path / "json", "--format", "json")
    assert as_json.code == 0, as_json.err
    assert [line for line in as_json.err_lines if line.startswith("warning: ")] == [warning]
    assert [cell["strategy"] for cell in json.loads(as_json.out)] == ["local-sgd"]


def test_a_grid_over_synthetic_options_chooses_the_fastest_within_each_task(cli, tmp_path: Path) -> None:
    # Two classes and ten are different tasks under one dataset name: 50% is chance for one and a
    # good result for the other, so one winner over both would compare unlike things.
    result = cli("compare", "--strategies", "local-sgd,allreduce", "--workers", "2", "--datasets", "synthetic",
                 "--vary", "synthetic.classes=2,10", "--set", "synthetic.samples=400", "--epochs", "0.5",
                 "--target-acc", "0.1", "--no-plots", "--out", tmp_path)  # fmt: skip
    assert result.code == 0, result.err
    text = (tmp_path / "compare" / "report.md").read_text()
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| **fastest")]
    fastest = {row[0].removeprefix("| "): row[2] for row in rows}  # row[1]: the cells' "reached (runs)" column
    assert list(fastest) == ["**fastest on synthetic (classes=2)**", "**fastest on synthetic (classes=10)**"]
    assert fastest["**fastest on synthetic (classes=2)**"].endswith("classes=2")
    assert fastest["**fastest on synthetic (classes=10)**"].endswith("classes=10")


def test_a_grid_table_takes_one_value_for_a_list_and_varies_synthetic_data_only(
    cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pnnctl.cli

    monkeypatch.setattr(pnnctl.cli.console, "_width", 250)
    config = tmp_path / "grid.toml"
    config.write_text('[compare]\nstrategies = "allreduce,local-sgd"\nworkers = 4\ndatasets = ["digits", "synthetic"]\n'
                      '[compare.vary]\n"synthetic.dim" = [8, 16]\n')  # fmt: skip
    listed = cli("compare", "--config", config, "--out", tmp_path, "--dry-run")
    assert listed.code == 0, listed.err
    runs = [Path(line.split()[0]).name for line in listed.err.splitlines()]
    # digits has no dim to vary: one cell per strategy there, not two identical ones labelled dim=8 and dim=16.
    assert runs == ["allreduce-digits-w4-s0", "local-sgd-digits-w4-s0",
                    "allreduce-synthetic-w4-dim=8-s0", "allreduce-synthetic-w4-dim=16-s0",
                    "local-sgd-synthetic-w4-dim=8-s0", "local-sgd-synthetic-w4-dim=16-s0"]  # fmt: skip


def test_a_plain_plot_keeps_the_target_of_the_grids_latest_command(cli, tmp_path: Path) -> None:
    grid = ["compare", "--strategies", "local-sgd", "--workers", "2", "--datasets", "digits", "--model", "mlp:64-16-10",
            "--epochs", "0.3", "--out", tmp_path, "--no-plots"]  # fmt: skip
    assert cli(*grid, "--target-acc", "0.3").code == 0
    assert cli(*grid, "--target-acc", "0.4").code == 0  # a new target re-reports the finished runs
    report = tmp_path / "compare" / "report.md"
    assert "to reach 40.00%" in report.read_text()
    assert cli("plot", tmp_path / "compare").code == 0
    assert "to reach 40.00%" in report.read_text()  # it went back to the runs' own 30%


def test_a_run_folder_and_a_grid_folder_are_not_written_into_each_other(cli, tmp_path: Path) -> None:
    # A train into a grid's folder, or a compare into a run's, went through (exit 0): the grid's cells then
    # vanished from its report, or the new grid's report showed the old run alone.
    tiny = ["--model", "mlp:64-16-10", "--epochs", "0.1", "--out", tmp_path]
    grid = ["compare", "--datasets", "digits", "--workers", "2", "--no-plots"]
    assert cli(*grid, "--strategies", "allreduce", "--name", "g", *tiny).code == 0
    grid_files = {path: path.read_bytes() for path in (tmp_path / "g").rglob("*") if path.is_file()}
    into_grid = cli("train", "--dataset", "digits", "--strategy", "ist", "--workers", "2", "--run-name", "g", *tiny)
    assert into_grid.code == 2 and into_grid.err_lines == [
        f"error: run_name: {tmp_path / 'g'} holds a compare grid, not a run; choose another --run-name or --out"]
    assert {path: path.read_bytes() for path in (tmp_path / "g").rglob("*") if path.is_file()} == grid_files

    assert cli("train", "--dataset", "digits", "--strategy", "allreduce", "--workers", "2", "--run-name", "r",
               *tiny).code == 0
    into_run = cli(*grid, "--strategies", "local-sgd", "--name", "r", *tiny)
    assert into_run.code == 2 and into_run.err_lines == [
        f"error: name: {tmp_path / 'r'} holds a single run (train's metrics.csv), not a grid; choose another --name "
        "or --out"]
    assert not (tmp_path / "r" / "runs").exists()


def test_a_compare_key_that_is_not_a_table_is_a_usage_error(cli, tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("compare = 3\n")
    result = cli("compare", "--config", config, "--dry-run")
    assert result.code == 2 and result.err_lines == [
        "error: compare: must be a table ([compare] with strategies = [...], workers = [...], ...), not 3"]
