"""Validation by data (issue 16, item 7): `data.val_tokens` fixes the validation text per source,
so batch size, gradient accumulation and the number of processes no longer change what is scored."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from step0 import validate_at_step0

from moeplat.compile.data import build_data
from moeplat.data import python_stdlib_documents, split_documents, unigram_cross_entropy
from moeplat.errors import SpecError
from moeplat.spec import load_spec

HERE = Path(__file__).resolve().parent
TINY = HERE.parent / "fixtures" / "tiny.yaml"
# the issue's setting: the quick-start model (tiny), balance losses off
NO_BALANCE = ["model.moe.losses.load_balancing.coef=0", "model.moe.losses.z_loss.coef=0"]


def _validate(*overrides: str) -> tuple[dict, object]:
    return validate_at_step0(load_spec(TINY, [*NO_BALANCE, *overrides]))


def test_batch_16x1_and_8x2_score_the_same_text_the_same():
    a, dm_a = _validate("train.batch_size=16", "train.grad_accum=1", "data.val_tokens=2048")
    b, dm_b = _validate("train.batch_size=8", "train.grad_accum=2", "data.val_tokens=2048")
    assert len(dm_a.val_set) == len(dm_b.val_set) == 64  # 2048 tokens / seq_len 32
    assert all(torch.equal(dm_a.val_set[i][0], dm_b.val_set[i][0]) for i in range(64))
    assert a["val/loss"] == pytest.approx(b["val/loss"], rel=1e-6)
    assert a["val/bpb"] == pytest.approx(b["val/bpb"], rel=1e-6)


def test_val_tokens_chooses_the_text():
    small = "data.source.max_bytes=150000"  # a smaller split, so `all` is quick to score
    few, dm_few = _validate("data.val_tokens=320", small)
    every, dm_all = _validate("data.val_tokens=all", small)
    assert len(dm_few.val_set) == 10 and len(dm_all.val_set) == dm_all.val_sets[0].num_blocks > 10
    assert torch.equal(dm_few.val_set[9][0], dm_all.val_set[9][0])  # a prefix of the split
    assert few["val/loss"] != pytest.approx(every["val/loss"], rel=1e-6)
    # rounded down to whole sequences: 330 tokens score the same 10 sequences as 320
    assert _validate("data.val_tokens=330", small)[0]["val/loss"] == pytest.approx(few["val/loss"], rel=1e-9)


def test_the_unigram_baseline_is_scored_on_the_validation_text_the_model_is():
    """Baseline and val/loss on the same targets: the first val_tokens // seq_len sequences' tokens
    but each one's first, under the training split's unigram model (the full split otherwise)."""
    small = "data.source.max_bytes=150000"
    info = {}
    for amount in ("320", "all"):
        loaded = load_spec(TINY, [f"data.val_tokens={amount}", small])
        dm, info[amount] = build_data(loaded.spec, loaded.base_dir)
        targets = torch.cat([dm.val_set[i][1] for i in range(len(dm.val_set))])
        d = loaded.spec.data
        train_docs, _ = split_documents(
            python_stdlib_documents(max_bytes=150000), val_fraction=d.val_fraction, seed=d.split_seed
        )
        want = unigram_cross_entropy(dm.tokenizer.encode_documents(train_docs), targets, 256)
        assert info[amount].unigram_baseline == pytest.approx(want, rel=1e-12)
        assert info[amount].unigram_baseline_bpb == pytest.approx(want / math.log(2), rel=1e-12)  # bytes
    assert info["320"].unigram_baseline != pytest.approx(info["all"].unigram_baseline, rel=1e-6)
    assert info["320"].val_tokens == info["all"].val_tokens  # the split's size, whatever is scored


def test_val_tokens_below_one_sequence_is_refused():
    with pytest.raises(SpecError) as info:
        load_spec(TINY, ["data.val_tokens=31"])
    assert info.value.issues[0].path == "data.val_tokens"


def test_an_old_spec_with_val_batches_says_what_replaced_it():
    with pytest.raises(SpecError) as info:
        load_spec(TINY, ["train.val_batches=4"])
    (issue,) = info.value.issues
    assert issue.path == "train.val_batches"
    assert "replaced by data.val_tokens" in issue.format()


def _torchrun(out: Path, world: int, *overrides: str) -> list[dict]:
    out.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    with socket.socket() as sock:  # a free port: torchrun's --master-port 0 hangs with 2 processes
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(world),
        "--master-port",
        str(port),
        str(HERE / "val_by_data_ddp.py"),
        str(out),
        *NO_BALANCE,
        *overrides,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.mark.slow
def test_two_ddp_ranks_score_what_one_process_scores(tmp_path):
    """7 sequences over 2 ranks: 4 + 3, the short rank padded with an ignored sequence (never a
    duplicate), loss and tokens summed over ranks: the one-process number."""
    overrides = ["data.val_tokens=224", "train.batch_size=2"]  # 7 sequences of 32, batches of 2
    (one,) = _torchrun(tmp_path / "one", 1, *overrides)
    two = _torchrun(tmp_path / "two", 2, *overrides)
    assert [r["world"] for r in two] == [2, 2]
    assert sorted(r["local_tokens"] for r in two) == [3 * 32, 4 * 32]
    assert one["local_tokens"] == 7 * 32
    for r in two:
        assert r["metrics"]["val/loss"] == pytest.approx(one["metrics"]["val/loss"], rel=1e-6)
        assert r["metrics"]["val/bpb"] == pytest.approx(one["metrics"]["val/bpb"], rel=1e-6)
