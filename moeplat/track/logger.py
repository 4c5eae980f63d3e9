"""A Lightning logger that writes to our TrackedRun in batches.

Metrics are buffered and sent with one `log_batch` call every `flush_every` rows (and at every
checkpoint and at the end), so tracking costs a few requests per hundred steps rather than one per metric.
Those periodic batches are sent by one background thread, in order, so the training thread never waits
on the tracking server; an explicit flush (checkpoints, the end of the run) waits until everything
buffered has been written. While the tracking server is unreachable the TrackedRun spools the rows to
disk (moeplat.track.spool).
"""

from __future__ import annotations

import os
import time
from concurrent.futures import Future, ThreadPoolExecutor

from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only

from moeplat.track.mlflow_run import TrackedRun


class BatchedMLflowLogger(Logger):
    def __init__(self, run: TrackedRun, flush_every: int | None = None):
        super().__init__()
        self.run = run
        # $MOEPLAT_LOG_FLUSH_EVERY: an undocumented knob for tests that need many small flushes
        self.flush_every = flush_every or int(os.environ.get("MOEPLAT_LOG_FLUSH_EVERY", "200"))
        self._buffer: list[tuple[str, float, int, int]] = []
        self._sender: ThreadPoolExecutor | None = None  # one thread: batches stay in order
        self._pending: list[Future] = []

    @property
    def name(self) -> str:
        return "mlflow"

    @property
    def version(self) -> str:
        return self.run.run_id

    @property
    def buffered(self) -> int:
        """Rows not yet handed to the sender thread."""
        return len(self._buffer)

    @rank_zero_only
    def log_hyperparams(self, params, *args, **kwargs) -> None:
        """Params are the resolved spec, logged once by the run orchestration; nothing to add here."""

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        now = int(time.time() * 1000)
        self._buffer.extend((k, float(v), step or 0, now) for k, v in metrics.items() if k != "epoch")
        if len(self._buffer) >= self.flush_every:
            self.flush(wait=False)

    @rank_zero_only
    def flush(self, wait: bool = True) -> None:
        """Hand the buffered rows to the sender thread; with `wait`, return once every batch handed
        over so far is written (or spooled), re-raising a write's error here, on the caller's thread."""
        if self._buffer:
            rows, self._buffer = self._buffer, []
            if self._sender is None:
                self._sender = ThreadPoolExecutor(1, thread_name_prefix="moeplat-mlflow")
            self._pending.append(self._sender.submit(self.run.log_metrics, rows))
        self._pending = [f for f in self._pending if not f.done() or f.exception() is not None]
        if wait:
            pending, self._pending = self._pending, []
            for f in pending:
                f.result()

    @rank_zero_only
    def save(self) -> None:
        self.flush()

    @rank_zero_only
    def finalize(self, status: str) -> None:
        try:
            self.flush()
        finally:
            if self._sender is not None:
                self._sender.shutdown(wait=True)
                self._sender = None
