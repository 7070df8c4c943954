"""Writes that a kill cannot tear: write a temporary file beside the target, fsync, rename."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from pnnctl.errors import UsageError
from pnnctl.faults import fault_point


def _finite(value: Any) -> Any:
    """NaN and infinities become null: they are not JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def json_text(value: Any, indent: int | None = None) -> str:
    """Standard JSON (a NaN accuracy of a diverged run is null), so that any JSON reader takes it."""
    return json.dumps(_finite(value), indent=indent, default=str, allow_nan=False)


@contextlib.contextmanager
def atomic_open(path: Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path``; on success it replaces ``path`` in one rename."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise UsageError("out", f"cannot write in {path.parent}: {exc.strerror or exc}") from None
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp creates 0600; results are meant to be shared like any file the user writes.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except OSError as exc:
        # Disk full, read-only, quota: the old file (if any) is untouched; say so in one line.
        tmp.unlink(missing_ok=True)
        raise UsageError("out", f"cannot write {path}: {exc.strerror or exc}; earlier results are intact") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str, fault: str = "") -> None:
    atomic_write_bytes(path, text.encode("utf-8"), fault=fault)


def atomic_write_bytes(path: Path, data: bytes, fault: str = "") -> None:
    """Write ``data`` atomically; ``fault`` names a kill point half-way through (see pnnctl.faults)."""
    with atomic_open(path, "wb") as handle:
        if fault:
            half = len(data) // 2
            handle.write(data[:half])
            handle.flush()
            fault_point(fault)
            handle.write(data[half:])
        else:
            handle.write(data)


def append_csv_row(path: Path, columns: Sequence[str], row: Mapping[str, Any]) -> None:
    """Append one whole row (header first if the file is new) with a single write and fsync.

    One ``write`` of a short line on a local file is not torn by SIGKILL in practice; a line that
    was torn by a power cut is dropped by :func:`repair_csv_tail` on resume.
    """
    path = Path(path)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="raise", lineterminator="\n")
    new_file = not path.exists() or path.stat().st_size == 0
    if new_file:
        writer.writeheader()
    writer.writerow({key: row.get(key, "") for key in columns})
    try:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(buffer.getvalue())
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        raise UsageError("out", f"cannot append to {path}: {exc.strerror or exc}") from None


def repair_csv_tail(path: Path) -> bool:
    """Drop a torn last line (no trailing newline) left by an older crash. Returns True if it did."""
    path = Path(path)
    if not path.exists():
        return False
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return False
    keep = data[: data.rfind(b"\n") + 1]
    atomic_write_bytes(path, keep)
    return True


@contextlib.contextmanager
def folder_lock(folder: Path, writer: str) -> Iterator[None]:
    """One ``writer`` (a compare, a train) per folder: an O_EXCL lock file holding the owner's pid.

    A lock whose process is gone (a killed run) is taken over, so a killed run can resume. Folders made
    for the lock are removed again if nothing else was written in them (a refused grid).
    """
    made = [path for path in (folder, *folder.parents) if not path.exists()]
    lock = folder / ".lock"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file where a folder goes, a read-only disk: a traceback before
        raise UsageError("out", f"cannot create {folder}: {exc.strerror or exc}") from None
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                owner = int(lock.read_text().strip() or "0")
            except (OSError, ValueError):
                owner = 0
            if owner and _alive(owner):
                msg = f"{folder} is being written by another {writer} (pid {owner}); wait for it"
                raise UsageError("out", msg) from None
            try:
                lock.unlink(missing_ok=True)
            except OSError as exc:
                raise UsageError("out", f"cannot remove the stale lock {lock}: {exc.strerror or exc}") from None
            continue
        except OSError as exc:
            raise UsageError("out", f"cannot write the lock {lock}: {exc.strerror or exc}") from None
        with os.fdopen(fd, "w") as handle:
            handle.write(str(os.getpid()))
        break
    else:
        raise UsageError("out", f"cannot lock {folder}")
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
        for path in made:  # innermost first
            if any(path.iterdir()):
                break
            path.rmdir()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
