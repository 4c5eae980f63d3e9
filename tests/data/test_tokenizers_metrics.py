"""Bits per byte wherever runs are compared: the tokenizer figures, the end-of-run summary, sweep
objectives (and the pruner's monitor), `moeplat compare` and the web UI's metric lists."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from moeplat.compile.tokenizer import stream_bytes, tokenizer_figures
from moeplat.data.corpus import python_stdlib_documents
from moeplat.data.tokenizers import ByteTok, train_bpe

REPO = Path(__file__).resolve().parents[2]


def test_tokenizer_figures_by_hand(tmp_path):
    docs = python_stdlib_documents(max_bytes=100_000)
    tok = train_bpe(docs[1:], vocab_size=400, cache_dir=tmp_path)
    train_ids, val_ids = tok.encode_documents(docs[1:]), tok.encode_documents(docs[:1])
    text_bytes = sum(len(d.data) for d in docs[1:])  # EOS between documents counts 0
    assert stream_bytes(tok, train_ids) == text_bytes
    counts = [np.bincount(ids.astype(np.int64), minlength=tok.vocab_size) for ids in (train_ids, val_ids)]
    figs = tokenizer_figures(tok, *counts, 5.0)
    assert figs["bytes_per_token"] == pytest.approx(text_bytes / len(train_ids))
    assert figs["unigram_baseline_bpb"] == pytest.approx(
        5.0 * len(val_ids) / (math.log(2) * len(docs[0].data))
    )
    byte = ByteTok()
    counts = np.bincount(np.arange(10), minlength=256)
    assert tokenizer_figures(byte, counts, counts, 2.0) == {
        "bytes_per_token": 1.0,
        "unigram_baseline_bpb": 2.0 / math.log(2),
    }


def test_summary_reports_bpb():
    from moeplat.cli.report import format_summary

    r = SimpleNamespace(
        steps=3, wall_s=1.0, val_loss=2.0, unigram_baseline=3.0, val_bpb=0.75, unigram_baseline_bpb=1.1,
        tokens_per_s=None, run_dir="d", run_id=None, tracking_uri=None,
    )  # fmt: skip
    text = format_summary(SimpleNamespace(name="s"), r)
    assert "val bpb  0.7500 bits/byte (unigram baseline 1.1000)" in text


def test_val_bpb_is_a_sweep_objective():
    from moeplat.spec.sweep import Objective, load_sweep
    from moeplat.sweep.study import objective_values

    sweep = load_sweep(REPO / "specs" / "sweeps" / "quickstart-k-capacity.yaml").sweep
    sweep = sweep.model_copy(update={"objectives": [Objective(metric="val/bpb")]})
    result = SimpleNamespace(val_loss=2.0, val_bpb=0.8, tokens_per_s=1.0)
    assert objective_values(sweep, result, None) == [0.8]
    with pytest.raises(RuntimeError, match="val/bpb"):
        objective_values(sweep, SimpleNamespace(val_loss=2.0, val_bpb=None), None)


def test_pruner_watches_the_objectives_scale():
    from moeplat.spec.sweep import Objective, load_sweep
    from moeplat.sweep.worker import pruning_monitor

    sweep = load_sweep(REPO / "specs" / "sweeps" / "quickstart-k-capacity.yaml").sweep
    assert pruning_monitor(sweep) == "val/loss"
    assert (
        pruning_monitor(sweep.model_copy(update={"objectives": [Objective(metric="val/bpb")]})) == "val/bpb"
    )


def test_compare_and_web_ui_list_val_bpb():
    from moeplat.track.compare import KEY_METRICS

    assert {"val/bpb", "data/unigram_baseline_bpb", "data/bytes_per_token"} <= {k for _, k, _ in KEY_METRICS}
    assert (
        'const CURVE_KEYS = ["train/loss", "val/loss", "val/bpb"];'
        in (REPO / "web/src/compare.ts").read_text()
    )
    assert 'const keys = ["train/loss", "val/loss", "val/bpb"];' in (REPO / "web/src/jobs.ts").read_text()
