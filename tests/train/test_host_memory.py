"""keep_heap_memory: a training process serves its few-MiB tensors from glibc's heap instead of a
fresh mmap each (moeplat.train.host_memory). Checked in a fresh interpreter, through glibc's own
count of mmapped blocks (mallinfo2), with the setting on and with MOEPLAT_MALLOPT=0."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc only"
)

PROBE = """
import ctypes, json, torch
from moeplat.train.host_memory import keep_heap_memory
ok = keep_heap_memory()
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
before = libc.mallinfo2().hblks
t = torch.empty(4 * 2**20)  # 16 MiB: above glibc's starting mmap threshold, below 32 MiB
mapped = libc.mallinfo2().hblks - before
print(json.dumps({"ok": ok, "mapped": mapped}))
"""


def _probe(**env) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env={**os.environ, **env}, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_training_process_allocates_tensors_from_the_heap():
    assert _probe() == {"ok": True, "mapped": 0}


def test_moeplat_mallopt_0_keeps_the_c_librarys_defaults():
    assert _probe(MOEPLAT_MALLOPT="0") == {"ok": False, "mapped": 1}


def test_every_training_run_keeps_its_heap(workdir, tiny_spec_path, monkeypatch):
    """moeplat.train.run.run asks for it first thing (every rank, sweep trial and repro run)."""
    import moeplat.train.host_memory as host_memory
    from moeplat.spec import load_spec
    from moeplat.train.run import run

    calls = []
    monkeypatch.setattr(host_memory, "keep_heap_memory", lambda: calls.append(1) or True)
    loaded = load_spec(tiny_spec_path, ["train.max_steps=3", "train.val_every=3"])
    run(loaded, tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}", progress=False)
    assert calls == [1]
