"""Real processes on torch.distributed: the same strategies, the traffic between blocks on the wire.

::

    pnnctl train --strategy allreduce --workers 4 --nproc 2                       # 2 local gloo ranks
    torchrun --nproc-per-node 2 -m pnnctl train --strategy allreduce --workers 4  # same, via torchrun
    torchrun --nnodes 2 --node-rank 0 --nproc-per-node 4 \\
        --rdzv-backend c10d --rdzv-endpoint HOST:29500 -m pnnctl train --strategy ist --workers 8

Each rank holds a contiguous block of the N logical workers (blocks differ by at most one worker;
N >= P is required) and runs the same stacked code as the simulation. :class:`TorchComm` is the
:class:`pnnctl.workers.Comm` for it: the group's collectives sum or gather across ranks, and each
rank counts the bytes it hands to torch.distributed (``wire_bytes_sent``) with the cost of the
algorithm the backend runs for that call (ring all-reduce: 2(P-1)/P x S; all-gather: (P-1) x S;
graph mixing: one block to each neighbouring rank, by point-to-point isend/irecv). With one worker
per process, all-reduce and mixing put exactly the logical ledger's per-worker bytes on the wire.
A parameter-server master is replicated on every rank (computed from gathered inputs), so its
broadcasts and scatters cost no wire bytes; gathers to it are all-gathers. Metrics-only
traffic (loss and accuracy bookkeeping) is counted apart, in ``bookkeeping_bytes``.

Faults: every collective has the ``timeout_s`` deadline, so a dead or hung rank makes the others
fail within it; ``--nproc`` runs (torch.multiprocessing, forkserver) then end the remaining ranks, print
which rank failed and exit non-zero. Every rank checkpoints its own block each round (keeping the
previous one), and ``--resume`` restarts from the newest round that every rank has.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import signal
import socket
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from pnnctl.config import RunConfig
from pnnctl.errors import RankFailed, UsageError
from pnnctl.rankserver import reset_rank_signals, start_rank_server
from pnnctl.runtime import detect_runtime, resolve_device


class TorchComm:
    """Cross-rank operations of a :class:`pnnctl.workers.WorkerGroup` over torch.distributed."""

    def __init__(self, backend: str, device: torch.device) -> None:
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.backend = backend
        self.device = device
        self.wire_device = device if backend == "nccl" else torch.device("cpu")
        self.wire_bytes_sent = 0.0
        self.bookkeeping_bytes = 0.0

    def _to_wire(self, t: Tensor, copy: bool = False) -> Tensor:
        """``t`` contiguous on the wire's device (``copy``: never ``t``'s own memory), one copy at most.

        nccl needs CUDA tensors. gloo's send/recv hand the tensor's pointer to its TCP transport
        without checking where it lives, so a CUDA tensor goes through host memory.
        """
        return t.to(self.wire_device, memory_format=torch.contiguous_format, copy=copy)

    def all_reduce_sum(self, t: Tensor, inplace: bool = False) -> Tensor:
        """Sum over ranks. ``inplace``: the sum is written into ``t`` (and returned), which goes on the
        wire itself when it can (contiguous, on the wire's device), else through a copy."""
        direct = inplace and t.is_contiguous() and t.device == self.wire_device
        out = t if direct else self._to_wire(t, copy=True)
        p = self.world_size
        self.wire_bytes_sent += 2 * (p - 1) / p * out.numel() * out.element_size()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        if inplace and not direct:
            return t.copy_(out)
        return out.to(t.device)

    def all_gather_blocks(self, t: Tensor, block_sizes: list[int], bookkeeping: bool = False) -> Tensor:
        """Concatenate every rank's ``[block, ...]`` tensor along dim 0 (blocks may differ by one)."""
        largest = max(block_sizes)
        local = self._to_wire(t)
        if local.shape[0] < largest:
            pad = local.new_zeros((largest - local.shape[0], *local.shape[1:]))
            local = torch.cat([local, pad])
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        sent = (self.world_size - 1) * local.numel() * local.element_size()
        if bookkeeping:
            self.bookkeeping_bytes += sent
        else:
            self.wire_bytes_sent += sent
        dist.all_gather(parts, local)
        return torch.cat([part[:size] for part, size in zip(parts, block_sizes, strict=True)]).to(t.device)

    def send_to(self, t: Tensor, dst_rank: int) -> None:
        """Point-to-point: this rank's tensor to ``dst_rank`` (which calls :meth:`recv_from`)."""
        self.wire_bytes_sent += t.numel() * t.element_size()
        dist.send(self._to_wire(t), dst_rank)

    def recv_from(self, shape: tuple[int, ...], dtype: torch.dtype, src_rank: int) -> Tensor:
        buffer = torch.empty(shape, dtype=dtype, device=self.wire_device)
        dist.recv(buffer, src_rank)
        return buffer.to(self.device)

    def neighbor_exchange(self, t: Tensor, block_sizes: list[int], peers: list[int]) -> Tensor:
        """Send this rank's block to each rank in ``peers`` and receive theirs (the pattern must be
        symmetric); returns all N slices with the blocks of non-peers left zero. Bytes on the wire:
        one block per peer, as a graph's neighbour exchange costs."""
        largest = max(block_sizes)
        local = self._to_wire(t)
        if local.shape[0] < largest:
            local = torch.cat([local, local.new_zeros((largest - local.shape[0], *local.shape[1:]))])
        received = {peer: torch.empty_like(local) for peer in peers}
        operations = []
        for peer in peers:
            operations.append(dist.P2POp(dist.isend, local, peer))
            operations.append(dist.P2POp(dist.irecv, received[peer], peer))
        if operations:
            for request in dist.batch_isend_irecv(operations):
                request.wait()
        self.wire_bytes_sent += len(peers) * local.numel() * local.element_size()
        parts = []
        for rank, size in enumerate(block_sizes):
            block = local if rank == self.rank else received.get(rank)
            parts.append(block[:size] if block is not None else local.new_zeros((size, *local.shape[1:])))
        return torch.cat(parts).to(t.device)

    def exchange_pieces(
        self, outgoing: dict[int, Tensor], incoming: dict[int, int], dtype: torch.dtype
    ) -> dict[int, Tensor]:
        """Point to point, all pairs at once: ``outgoing[r]`` (1-D) goes to rank r, and ``incoming[r]``
        elements come from it (both sides know the sizes; empty pieces are not sent). Bytes on the
        wire: the pieces sent."""
        operations = []
        for peer, piece in outgoing.items():
            if piece.numel():
                wire = self._to_wire(piece)
                self.wire_bytes_sent += wire.numel() * wire.element_size()
                operations.append(dist.P2POp(dist.isend, wire, peer))
        received = {
            peer: torch.empty(size, dtype=dtype, device=self.wire_device) for peer, size in incoming.items() if size
        }
        operations += [dist.P2POp(dist.irecv, buffer, peer) for peer, buffer in received.items()]
        if operations:
            for request in dist.batch_isend_irecv(operations):
                request.wait()
        return {peer: buffer.to(self.device) for peer, buffer in received.items()}

    def barrier(self) -> None:
        dist.barrier()

    def any_true(self, flag: bool) -> bool:
        """True on every rank if any rank says True (a stop request, an error)."""
        value = torch.tensor([1.0 if flag else 0.0], device=self.wire_device)
        self.bookkeeping_bytes += 2 * (self.world_size - 1) / self.world_size * value.element_size()
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item() > 0)

    def min_int(self, value: int) -> int:
        tensor = torch.tensor([value], dtype=torch.long, device=self.wire_device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
        return int(tensor.item())

    def share_text(self, text: str) -> str:
        """Rank 0's text on every rank (an error message that all ranks must raise)."""
        holder = [text]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def gather_floats(self, values: list[float]) -> list[list[float]]:
        """Every rank's short list of floats (per-rank peak memory and wire bytes for metrics)."""
        local = torch.tensor(values, dtype=torch.float64, device=self.wire_device)
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(parts, local)
        return [part.cpu().tolist() for part in parts]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def choose_backend(config: RunConfig, device: torch.device) -> str:
    if config.backend != "auto":
        if config.backend == "nccl" and device.type != "cuda":
            raise UsageError("backend", "nccl needs CUDA devices; use gloo (or auto) on the CPU")
        return config.backend
    return "nccl" if device.type == "cuda" else "gloo"


def run_distributed(config: RunConfig, *, resume: bool = False, progress: Any = None) -> Any:
    """Run as one rank under torchrun, or start ``config.nproc`` local ranks and wait for them."""
    if "RANK" in os.environ:
        return _run_rank(config, resume=resume, progress=progress)
    return _spawn_local(config, resume=resume, progress=progress)


def _run_rank(config: RunConfig, *, resume: bool, progress: Any) -> Any:
    from pnnctl.trainer import train

    runtime = detect_runtime()
    device = resolve_device(config.device, runtime.local_rank, runtime.local_world_size)
    backend = choose_backend(config, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # On one machine the ranks share its cores; give each its share so they do not oversubscribe,
    # unless OMP_NUM_THREADS says how many (torchrun sets it to 1). It is applied here rather than left
    # to torch's import, which in a forkserver rank read the server's environment.
    threads = os.environ.get("OMP_NUM_THREADS", "")
    per_rank = max(1, (os.cpu_count() or 1) // max(1, runtime.local_world_size))
    torch.set_num_threads(int(threads) if threads.isdigit() and int(threads) > 0 else per_rank)
    if os.environ.get("MASTER_ADDR", "127.0.0.1") in ("127.0.0.1", "localhost"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=config.timeout_s))
    try:
        comm = TorchComm(backend, device)
        result = train(config, resume=resume, progress=progress if runtime.is_main else None, comm=comm,
                       runtime=runtime)
        # No rank tears the group down while a peer may still be in a collective or writing the
        # run folder: a rank leaving early can abort gloo's teardown in the others (seen once in
        # benchmarks/allreduce_vs_ddp.py as "terminate called without an active exception").
        comm.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return result if runtime.is_main else None


def _child(
    local_rank: int, config: RunConfig, resume: bool, port: int, report_dir: str, progress: Any, environ: dict[str, str]
) -> None:
    """One started rank: the parent's environment and torchrun's variables, then the same path as under torchrun."""
    # A forkserver child inherits the environment the server started with, which may be older than
    # the parent's (a compare grid or an embedding process can change it between runs).
    reset_rank_signals()
    os.environ.clear()
    os.environ.update(environ)
    os.environ.update(
        RANK=str(local_rank),
        LOCAL_RANK=str(local_rank),
        WORLD_SIZE=str(config.nproc),
        LOCAL_WORLD_SIZE=str(config.nproc),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    try:
        result = _run_rank(config, resume=resume, progress=progress if local_rank == 0 else None)
        if result is not None:  # rank 0's warnings, for the parent to print as a run in one process does
            Path(report_dir, "notes.json").write_text(json.dumps(result.notes))
    except UsageError as exc:
        Path(report_dir, f"rank{local_rank}.usage").write_text(str(exc))
        raise SystemExit(2) from None
    except Exception as exc:  # reported by the parent with the rank's number
        Path(report_dir, f"rank{local_rank}.error").write_text(f"{type(exc).__name__}: {exc}".splitlines()[0])
        raise SystemExit(1) from None


def _spawn_local(config: RunConfig, *, resume: bool, progress: Any) -> Any:
    import torch.multiprocessing as mp

    from pnnctl.trainer import RunResult, _read_rows

    # torch logs each rank it terminates; our own one-line error says which rank failed.
    logging.getLogger("torch.multiprocessing.spawn").setLevel(logging.ERROR)
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="pnnctl-ranks-") as report_dir:
        context = mp.start_processes(
            _child, args=(config, resume, port, report_dir, progress, dict(os.environ)), nprocs=config.nproc,
            join=False, start_method=start_rank_server(),
        )
        # The ranks stop after the round they agree on. A signal sent to this parent alone (kill -INT PID,
        # a scheduler's SIGTERM) is passed on to them; one sent to the whole process group (Ctrl-C)
        # reaches them twice, which they take as one request (trainer.SAME_STOP_REQUEST_S).
        def pass_on(signum: int, _frame: object) -> None:
            for process in context.processes:
                if process.is_alive():
                    os.kill(process.pid, signum)

        previous = {sig: signal.signal(sig, pass_on) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            # After a failure, the others get 5 s to stop on their own, then SIGTERM, then SIGKILL.
            while not context.join(grace_period=5):
                pass
        except mp.ProcessExitedException as exc:
            usage = sorted(Path(report_dir).glob("*.usage"))
            if usage:
                field, _, problem = usage[0].read_text().partition(": ")
                raise UsageError(field, problem) from None
            errors = sorted(Path(report_dir).glob("*.error"))
            detail = "; ".join(f"{p.stem}: {p.read_text()}" for p in errors)
            how = f"signal {exc.signal_name}" if exc.signal_name else f"exit code {exc.exit_code}"
            raise RankFailed(
                f"rank {exc.error_index} failed ({how}){'; ' + detail if detail else ''}; "
                "the other ranks were stopped; rerun with --resume to continue from the last checkpoint"
            ) from None
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        notes_file = Path(report_dir, "notes.json")
        notes = json.loads(notes_file.read_text()) if notes_file.exists() else []
    run_dir = Path(config.out) / config.run_id
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = _read_rows(run_dir / "metrics.csv")
    return RunResult(run_dir, summary.get("status", "finished"), rows, summary, notes)
