"""Column names of the tables pnnctl writes. Plots and reports read only these tables."""

from __future__ import annotations

#: One row per evaluation in ``<run>/metrics.csv``. Byte and message columns are cumulative
#: since the start of the run; ``*_max_worker`` is the busiest logical worker.
METRIC_COLUMNS: tuple[str, ...] = (
    "run_id",
    "cell",  # the comparison cell: strategy/dataset/model/wN, plus /VARIANT when a grid varies options
    "strategy",
    "dataset",
    "model",
    "seed",
    "workers",
    "world_size",
    "backend",
    "round",
    "epoch",
    "samples_seen",
    "phase",  # strategy phase: "train" for most; SIL uses apart / joined / recovery
    "wall_s",  # wall-clock seconds since the run started (excluding evaluation)
    "compute_s",  # seconds spent in strategy rounds (training compute + simulated collectives)
    "collective_s",  # the part of compute_s spent in the worker group's collectives and ledger
    "worker_compute_s",  # compute_s as if each worker ran on its own machine: compute / workers in parallel
    "train_loss",  # mean training loss over the rounds since the previous row
    "test_loss",
    "test_acc",  # fraction in [0, 1]
    "bytes_sent_total",  # all logical workers together
    "bytes_recv_total",
    "bytes_sent_max_worker",
    "bytes_recv_max_worker",
    "messages_total",
    "messages_max_worker",
    "params_max_worker",  # parameters held by the largest worker
    "memory_max_worker_bytes",  # analytic: params + grads + optimizer state + activations
    "comm_s",  # projected communication seconds under the run's network model
    "projected_s",  # worker_compute_s + comm_s: projected wall time with one machine per worker
    "network",  # the network preset (or "custom:<latency>,<bandwidth>") behind comm_s
    "peak_rss_bytes",  # this run's measured peak memory: RSS on CPU, max_memory_allocated on CUDA; largest over ranks
    "wire_bytes_sent_max_rank",  # bytes handed to torch.distributed by the busiest rank (0 when simulated)
    "bytes_sent_master",  # a parameter-server master (ledger slot N); 0 for strategies without one
    "bytes_recv_master",
    "messages_master",
    "status",  # running | finished | diverged | interrupted
    "extras",  # JSON object of strategy-specific figures (consensus_error, ...)
)

#: Statuses a run can end in.
FINAL_STATUSES: tuple[str, ...] = ("finished", "diverged", "interrupted", "failed")
