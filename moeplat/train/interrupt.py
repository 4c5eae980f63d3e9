"""A Ctrl-C (or the job server's cancel, which is a SIGINT) must never be lost.

Python raises KeyboardInterrupt from its SIGINT handler wherever the main thread happens to be.
When that is inside a garbage-collection callback -- SQLAlchemy cleans its class registry up in
weakref callbacks, which runs often while MLflow opens its store -- Python reports "Exception
ignored in ..." and the interrupt is gone: the run trained on until the job server's SIGKILL
(seen in tests/server). So while a run trains, the handler also records the signal, and
InterruptGuard raises KeyboardInterrupt at the next training or validation batch when one was
recorded: an interrupt that did arrive ended training before that batch, one that was swallowed
arrives there.

SIGUSR1 is SLURM's warning before a time limit or a preemption (the SLURM bridge submits with
`--signal=B:USR1@N`; the batch script forwards it to every rank). It is recorded, not raised. At
the next optimizer-step boundary (the end of a training batch that stepped) every rank agrees to
stop -- under SLURM with several ranks, one tiny all-reduce per step, so all stop at the same step
and none is left waiting in a collective -- and last.ckpt is written there, as ModelCheckpoint
writes it (so the metric logger counts those steps as covered). The run then stops at the next
training batch, once that step's metrics are logged (a KeyboardInterrupt raised between an
optimizer step and its logging would leave that step's rows to nobody). From there it is a
Ctrl-C: the held rows are sent, the MLflow run is closed, resumable from its run directory, and
`moeplat run` exits with PREEMPTED_EXIT instead of 130, so the batch script requeues it. The
requeued job resumes from that checkpoint into the same MLflow run
(moeplat.parallel.launch.sbatch_script).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import lightning as L

_received = threading.Event()
_preempted = threading.Event()
PREEMPTED_EXIT = 75  # EX_TEMPFAIL: stopped for a time limit or preemption; resume it


def _record_and_raise(signum, frame):
    _received.set()
    raise KeyboardInterrupt


def _record_preemption(signum, frame):
    _preempted.set()  # InterruptGuard stops the run at the next training batch


def preempted() -> bool:
    """The last interrupt of this process was SLURM's warning signal (SIGUSR1), not a Ctrl-C."""
    return _preempted.is_set()


@contextmanager
def interrupts_recorded() -> Iterator[None]:
    """Record SIGINTs for InterruptGuard while the block runs (main thread, default handler only:
    a handler someone else installed is left alone); SIGUSR1 too, where nobody handles it (then
    Lightning's own SLURM handler, which requeues by itself, stays out: it installs only where
    no handler is set)."""
    _received.clear()
    _preempted.clear()
    main = threading.current_thread() is threading.main_thread()
    if not main or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    signal.signal(signal.SIGINT, _record_and_raise)
    usr1 = signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, None)
    if usr1:
        signal.signal(signal.SIGUSR1, _record_preemption)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGINT) is _record_and_raise:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        if usr1 and signal.getsignal(signal.SIGUSR1) is _record_preemption:
            signal.signal(signal.SIGUSR1, signal.SIG_DFL)


class InterruptGuard(L.Callback):
    def __init__(self) -> None:
        self._stop_next = False  # preempted: checkpointed, stop at the next training batch

    def _check(self) -> None:
        if _received.is_set():
            raise KeyboardInterrupt

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._check()
        if self._stop_next:
            raise KeyboardInterrupt

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._check()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._stop_next or (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # mid accumulation: no optimizer step here (batch_idx is the same on every rank)
        stop = _preempted.is_set()
        if trainer.world_size > 1 and "SLURM_JOB_ID" in os.environ:  # srun signals every rank
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop:
            _preempted.set()
            save_last_checkpoint(trainer)
            self._stop_next = True


def save_last_checkpoint(trainer) -> None:
    """last.ckpt now, by the ModelCheckpoint that writes it (every rank calls it: a collective)."""
    for cb in trainer.checkpoint_callbacks:
        if getattr(cb, "save_last", False):
            cb._save_last_checkpoint(trainer, cb._monitor_candidates(trainer))
            return
