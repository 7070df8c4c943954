"""Where ``--nproc`` ranks start from: a forkserver that has imported torch once.

Spawning a rank starts a fresh interpreter that imports torch (about 3 s of CPU on a 2-core VM,
where a 2-process run of a small model takes ~7 s in all); fork would be instant but would copy
this process's thread pools and, on a GPU machine, its CUDA state. A forkserver is a fresh
interpreter that imports torch once, then forks each rank from itself. This module stays free of
torch so that the CLI can start the server before it imports torch itself, and the two imports
overlap. The server lives as long as this process, so a compare grid of ``--nproc`` cells pays
for it once.

Only torch is preloaded: the server does not take this process's ``sys.path`` (Python 3.11's
forkserver ignores it), so a preloaded pnnctl could be another copy than the one running here
(a source checkout beside an installed one). Each rank imports pnnctl after the fork, with this
process's path (0.1 s).
"""

from __future__ import annotations

import multiprocessing
import signal
import threading
from multiprocessing import forkserver

PRELOAD = ["torch"]


def start_rank_server() -> str:
    """Start the forkserver (if not running) and return the start method for the ranks:
    ``forkserver``, or ``spawn`` where the platform has none (Windows)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return "spawn"
    forkserver.set_forkserver_preload(PRELOAD)
    # The server reports each rank's exit code; a SIGTERM sent to the run's process group (a scheduler
    # stopping the job) must reach the ranks, not end the server first and lose those codes (every
    # rank would read as failed with 255). It starts ignoring SIGTERM; each rank restores the default.
    # (Only the main thread may change a handler; started from another, the server keeps the default.)
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN) if on_main_thread else None
    try:
        forkserver.ensure_running()
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
    return "forkserver"


def reset_rank_signals() -> None:
    """In a rank forked from the server: take SIGTERM again (the server ignores it)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
