"""A Lightning logger that writes to our TrackedRun in batches.

Metrics are buffered and sent with one `log_batch` call every `flush_every` rows (and at every
checkpoint and at the end), so tracking costs a few requests per hundred steps rather than one per metric.
Those periodic batches are sent by one background thread, in order, so the training thread never waits
on the tracking server; an explicit flush (checkpoints, the end of the run) waits until everything
buffered has been written. While the tracking server is unreachable the TrackedRun spools the rows to
disk (moeplat.track.spool).

With a `Resumable` (every `moeplat run`), the MLflow history of a run that is killed and resumed
stays exact: each step once, with the values of the attempt whose weights went on. MLflow cannot
delete a metric row, so a row is sent only once a checkpoint covers its step: a checkpoint at global
step N holds the training of logged steps 0..N-1, and a run resumed from it trains and logs steps
N.. again (Lightning logs a step's loss and validation after that step's checkpoint hook, still with
step N-1: they are covered too). Rows not yet covered are held; `kill -9` drops them, the resumed run
logs them again. Every row is also appended to a journal file before anything depends on it, so a
covered row killed before it reached MLflow is sent by the resumed run (MLflow's SQL stores ignore
a row they already have). An attempt that ends by itself (finished, failed, Ctrl-C) sends what it
held and records, per metric, the last step it sent (`on_uncovered`): its resumption does not
log those steps of that metric again (a summary logged at the last step, perf/tokens_seen, must not
hide the loss a resumed run logs at that step).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only

from moeplat.track.mlflow_run import TrackedRun

Row = tuple[str, float, int, int]  # key, value, step, timestamp_ms


@dataclass(frozen=True)
class Resumable:
    """How a resumable run's logger keeps its history exact across attempts.

    `journal`: the file every row is appended to (in the run directory). `checkpoint`: the
    checkpoint file --resume reads; only its writes cover steps. `skip_through`: per metric, the
    last step an earlier attempt sent beyond its checkpoint (rows up to it are not logged again).
    `on_uncovered(through)`: called, before rows beyond the last checkpoint are sent, with their
    highest step per metric, so the run directory can record it for the next `skip_through`."""

    journal: Path
    checkpoint: Path
    skip_through: dict[str, int] = field(default_factory=dict)
    on_uncovered: Callable[[dict[str, int]], None] | None = None


class Journal:
    """Rows as JSON lines, each batch appended with one write(2): a SIGKILL cannot cut one in half."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def append(self, rows: list[Row]) -> None:
        data = "".join(json.dumps(r) + "\n" for r in rows).encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)

    def read(self) -> list[Row]:
        if not self.path.is_file():
            return []
        return [tuple(json.loads(line)) for line in self.path.read_text().splitlines() if line.strip()]

    def rewrite(self, rows: list[Row]) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(tmp, self.path)


class BatchedMLflowLogger(Logger):
    def __init__(self, run: TrackedRun, flush_every: int | None = None, resumable: Resumable | None = None):
        super().__init__()
        self.run = run
        # $MOEPLAT_LOG_FLUSH_EVERY: an undocumented knob for tests that need many small flushes
        self.flush_every = flush_every or int(os.environ.get("MOEPLAT_LOG_FLUSH_EVERY", "200"))
        self._buffer: list[Row] = []
        self._sender: ThreadPoolExecutor | None = None  # one thread: batches stay in order
        self._pending: list[Future] = []
        self.resumable = resumable
        self._journal = Journal(resumable.journal) if resumable else None
        # earlier attempts' rows, until start() knows which of them the checkpoint covers
        self._earlier: list[Row] = self._journal.read() if self._journal else []
        self._held: list[Row] = []  # rows of steps no checkpoint covers yet
        self._covered = 0  # rows of steps below this are final
        self._final = resumable is None  # everything goes straight through

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
        step = step or 0
        skip = self.resumable.skip_through if self.resumable else {}
        now = int(time.time() * 1000)
        # a step an earlier attempt already sent is not logged again
        rows = [
            (k, float(v), step, now) for k, v in metrics.items() if k != "epoch" and step > skip.get(k, -1)
        ]
        if not rows:
            return
        if self._journal:
            self._journal.append(rows)
        if self._final or step < self._covered:
            self._release(rows)
        else:
            self._held.extend(rows)

    @rank_zero_only
    def start(self, step: int) -> None:
        """Training (re)starts at global step `step` (from a checkpoint at `step`): of the rows the
        earlier attempts journalled, those it covers are sent again, the rest will be trained again."""
        keep = self.resumable.skip_through if self.resumable else {}
        earlier, self._earlier = self._earlier, []
        self._buffer.extend(r for r in earlier if r[2] < step or r[2] <= keep.get(r[0], -1))
        self._sync_journal()

    @rank_zero_only
    def after_save_checkpoint(self, checkpoint_callback) -> None:
        """ModelCheckpoint writes a step file, then last.ckpt: only the file --resume reads covers steps.
        (Private attributes of Lightning's ModelCheckpoint: were they renamed, nothing would be
        covered before the end of the run, and the history would still be exact.)"""
        cb = checkpoint_callback
        saved = getattr(cb, "_last_checkpoint_saved", None)
        if self.resumable and saved and Path(saved).resolve() == self.resumable.checkpoint.resolve():
            self.cover(cb._last_global_step_saved)

    def cover(self, step: int) -> None:
        """A checkpoint at global step `step` was written: rows of earlier steps are final."""
        self._covered = max(self._covered, step)
        ready = [r for r in self._held if r[2] < self._covered]
        self._held = [r for r in self._held if r[2] >= self._covered]
        self._release(ready)
        self._sync_journal()

    def _sync_journal(self) -> None:
        """Send what is buffered and wait; then the journal needs only the rows not yet decided:
        an unstarted attempt's earlier rows and the rows held now."""
        self.flush()
        if self._journal:
            self._journal.rewrite(self._earlier + self._held)

    def _release(self, rows: list[Row]) -> None:
        if not rows:
            return
        if self.resumable and self.resumable.on_uncovered:
            through: dict[str, int] = {}
            for k, _, step, _ in rows:
                if step >= self._covered:
                    through[k] = max(step, through.get(k, step))
            if through:
                self.resumable.on_uncovered(through)  # before they can reach MLflow
        self._buffer.extend(rows)
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
    def release(self) -> None:
        """This attempt is ending by itself: what it holds is sent, and so is everything it logs
        from now on (a validation after fit, the run's summary). Rows of earlier attempts stay in the
        journal when this one never started training: the next attempt decides on them."""
        self._final = True
        rows, self._held = self._held, []
        self._release(rows)

    @rank_zero_only
    def finalize(self, status: str) -> None:
        try:
            self.release()
            self._sync_journal()
        finally:
            if self._sender is not None:
                self._sender.shutdown(wait=True)
                self._sender = None
