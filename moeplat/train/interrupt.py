"""A Ctrl-C (or the job server's cancel, which is a SIGINT) must never be lost.

Python raises KeyboardInterrupt from its SIGINT handler wherever the main thread happens to be.
When that is inside a garbage-collection callback -- SQLAlchemy cleans its class registry up in
weakref callbacks, which runs often while MLflow opens its store -- Python reports "Exception
ignored in ..." and the interrupt is gone: the run trained on until the job server's SIGKILL
(seen in tests/server). So while a run trains, the handler also records the signal, and
InterruptGuard raises KeyboardInterrupt at the next training or validation batch when one was
recorded: an interrupt that did arrive ended training before that batch, one that was swallowed
arrives there.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import lightning as L

_received = threading.Event()


def _record_and_raise(signum, frame):
    _received.set()
    raise KeyboardInterrupt


@contextmanager
def interrupts_recorded() -> Iterator[None]:
    """Record SIGINTs for InterruptGuard while the block runs (main thread, default handler only:
    a handler someone else installed is left alone)."""
    _received.clear()
    main = threading.current_thread() is threading.main_thread()
    if not main or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    signal.signal(signal.SIGINT, _record_and_raise)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGINT) is _record_and_raise:
            signal.signal(signal.SIGINT, signal.default_int_handler)


class InterruptGuard(L.Callback):
    def _check(self) -> None:
        if _received.is_set():
            raise KeyboardInterrupt

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._check()

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._check()
