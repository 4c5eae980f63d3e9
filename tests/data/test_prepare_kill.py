"""A prepare killed with SIGKILL mid-way (a real subprocess with its worker pool) resumes where it
stopped: the shards its manifest lists are kept, the rest written, and the result is the same
corpus an uninterrupted prepare makes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np

from moeplat.data.corpus import python_stdlib_documents, split_documents
from moeplat.data.prepare import SourceSplits, prepare
from moeplat.data.shards import open_prepared, read_manifest
from moeplat.data.tokenizers import ByteTok

MAX_BYTES, SHARD = 1_500_000, 64 * 1024

# The child prepares with 2 workers and pauses after recording each shard, so that the kill
# lands between shards, mid-shard or mid-manifest-write at random but never after the end.
CHILD = textwrap.dedent(
    f"""
    import sys, time
    from moeplat.data.corpus import python_stdlib_documents, split_documents
    from moeplat.data.prepare import SourceSplits, prepare
    from moeplat.data.tokenizers import ByteTok

    if __name__ == "__main__":
        docs = python_stdlib_documents(max_bytes={MAX_BYTES})
        train, val = split_documents(docs, val_fraction=0.1, seed=0)
        prepare([SourceSplits("main", train, val)], ByteTok(), 256, sys.argv[1], workers=2,
                shard_bytes={SHARD}, progress=False, on_shard=lambda s: time.sleep(0.3))
    """
)


def _listed(root) -> int:
    try:
        m = read_manifest(root)
    except (json.JSONDecodeError, OSError):
        return 0
    if m is None:
        return 0
    return sum(len(v) for e in m["sources"].values() for v in e["shards"].values())


def test_kill_9_mid_prepare_then_resume(tmp_path):
    out = tmp_path / "prepared"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    proc = subprocess.Popen([sys.executable, str(script), str(out)], start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while _listed(out) < 3:
            assert proc.poll() is None, "the prepare ended before it could be killed"
            assert time.monotonic() < deadline, "no shard recorded in 120 s"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the parent and its pool workers, no goodbye
        proc.wait(timeout=30)
    killed = read_manifest(out)
    assert not killed["complete"]
    listed = _listed(out)

    docs = python_stdlib_documents(max_bytes=MAX_BYTES)
    train, val = split_documents(docs, val_fraction=0.1, seed=0)
    sources = [SourceSplits("main", train, val)]
    resumed = prepare(sources, ByteTok(), 256, out, workers=2, shard_bytes=SHARD, progress=False)
    assert resumed.action == "resumed"
    assert resumed.shards_written == _listed(out) - listed  # only what the manifest did not list
    assert not list(out.rglob("*.tmp"))

    fresh = prepare(sources, ByteTok(), 256, tmp_path / "fresh", shard_bytes=SHARD, progress=False)
    _, a = open_prepared(out)
    _, b = open_prepared(fresh.path)
    for split in ("train", "val"):
        assert np.array_equal(a["main"][split].stream(), b["main"][split].stream())
        assert np.array_equal(
            a["main"][split].stream(), ByteTok().encode_documents(train if split == "train" else val)
        )
