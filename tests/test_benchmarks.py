"""The benchmark scripts still run and print their tables (tiny sizes; the speed itself is never asserted)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

RATIO = re.compile(r"^\d+\.\d+x$")
RATIO_WITH_RANGE = re.compile(r"^\d+\.\d+x \(\d+\.\d+-\d+\.\d+\)$")


def run_script(name: str, *args: str) -> list[list[str]]:
    """The rows of the table the script prints (header first), as stripped cells."""
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / name), *args],
        capture_output=True, text=True, timeout=240, cwd=REPO_ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in lines]


def column(table: list[list[str]], name: str) -> list[str]:
    index = table[0].index(next(h for h in table[0] if h.startswith(name)))
    return [row[index] for row in table[1:]]


def test_stacked_workers_prints_a_speed_up_and_memory_per_worker_for_each_n() -> None:
    table = run_script("stacked_workers.py", "--workers", "2,3", "--steps", "2", "--repeats", "2")
    assert column(table, "N") == ["2", "3"]
    assert all(RATIO.match(v) for v in column(table, "speed-up"))
    assert all(RATIO.match(v) for v in column(table, "ceiling") + column(table, "step / products"))
    assert all(float(v) > 0 for v in column(table, "products alone ms"))
    assert all(float(v) > 0 for v in column(table, "MB per simulated worker"))


def test_trainer_overhead_compares_pnnctl_with_both_hand_loops() -> None:
    table = run_script("trainer_overhead.py", "--samples", "600", "--epochs", "1", "--repeats", "1")
    assert len(table) == 4  # header + Adam() loop, fused loop, pnnctl
    # Each side against itself, repeat by repeat, is exactly 1.
    assert column(table, "vs Adam() loop")[0] == "1.000x (1.000-1.000)"
    assert column(table, "vs fused loop")[1] == "1.000x (1.000-1.000)"
    assert all(RATIO_WITH_RANGE.match(v) for v in column(table, "vs Adam() loop") + column(table, "vs fused loop"))


@pytest.mark.distributed
def test_allreduce_vs_ddp_reports_a_paired_ratio_per_process_count() -> None:
    table = run_script("allreduce_vs_ddp.py", "--procs", "2", "--steps", "2", "--repeats", "2",
                       "--batch", "8", "--model", "mlp:784-16-10")  # fmt: skip
    assert column(table, "processes") == ["2"]
    assert RATIO.match(column(table, "median pair ratio")[0])


def test_strategy_scaling_times_the_neighbour_sums_of_graph_strategies_only() -> None:
    table = run_script("strategy_scaling.py", "--strategies", "allreduce,dgd,sil", "--workers", "4",
                       "--samples", "2000", "--model", "mlp:784-16-16-10")  # fmt: skip
    rows = {(row[0], row[1]): row for row in table[1:]}
    assert set(rows) == {("allreduce", "4"), ("dgd", "4"), ("sil", "2"), ("sil", "3")}
    sums = table[0].index("of which neighbour sums")
    rate = table[0].index(next(h for h in table[0] if h.startswith("sums GB/s")))
    # The wrapper around weighted_rows must see dgd's mixing (and nothing of allreduce's).
    assert float(rows["dgd", "4"][sums].rstrip("%")) > 0
    assert re.match(r"^\d+ \(\d+\.\d+x\)$", rows["dgd", "4"][rate])
    assert rows["allreduce", "4"][sums] == "0.0%" and rows["allreduce", "4"][rate] == "-"
