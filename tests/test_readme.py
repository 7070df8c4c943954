"""The README's commands stay true: the two set-up commands, and every pnnctl line parses and resolves."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from pnnctl.cli import main

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_readme_starts_with_the_main_command_and_the_test_command() -> None:
    commands = [line for line in README.splitlines() if line.startswith("pip install torch==2.13.0")]
    assert commands[0].startswith("pip install torch==2.13.0 && pip install -e . && pnnctl compare")
    assert commands[1] == 'pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest'
    config = commands[0].split("--config ")[1].split()[0]
    assert (ROOT / config).exists()
    assert "bash -c \"$TEST_COMMAND\"" in (ROOT / ".ci" / "run").read_text()


def _pnnctl_lines() -> list[str]:
    lines, pending = [], ""
    for block in re.findall(r"```sh\n(.*?)```", README, flags=re.S):
        for raw in block.splitlines():
            line = pending + raw.split("#")[0].strip()
            if line.endswith("\\"):
                pending = line[:-1] + " "
                continue
            pending = ""
            if line.startswith("pnnctl ") or " -m pnnctl " in line:
                lines.append(line[line.index("pnnctl ") + len("pnnctl ") :])
    return lines


LINES = _pnnctl_lines()


def test_the_readme_shows_every_command() -> None:
    verbs = {shlex.split(line)[0] for line in LINES}
    assert {"train", "compare", "plot", "list"} <= verbs


@pytest.mark.parametrize("line", [line for line in LINES if shlex.split(line)[0] in ("train", "compare")])
def test_every_train_and_compare_line_resolves(line: str, capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NODE_RANK", "0")
    monkeypatch.chdir(tmp_path)
    # The README's example TOML file is the run.toml its commands name.
    (tmp_path / "run.toml").write_text(re.findall(r"```toml\n(.*?)```", README, flags=re.S)[0])
    argv = [word.replace("$NODE_RANK", "0").replace("~/data", str(tmp_path)) for word in shlex.split(line)]
    argv = [w for w in argv if w != "--resume"]
    if "--config" in argv:  # README paths are relative to the repository root
        index = argv.index("--config") + 1
        argv[index] = str(ROOT / argv[index]) if (ROOT / argv[index]).exists() else argv[index]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--dry-run"])
    assert exit_info.value.code == 0, capsys.readouterr().err


def test_the_repository_top_level_holds_only_the_product_card_entries() -> None:
    """A hand-run's folder committed at the top level (r6/, session 8) is caught here, not in review."""
    import subprocess

    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    top_level = {path.split("/")[0] for path in tracked}
    card = {"pyproject.toml", "pnnctl", "strategies", "tests", "results", "README.md", ".ci", "benchmarks", "docs"}
    assert top_level - card - {".gitignore"} == set()
    assert {"pyproject.toml", "pnnctl", "strategies", "tests", "results", "README.md", ".ci"} <= top_level
