"""The data section of `moeplat bench`: every figure present and consistent, at small sizes. No
timing assertions (house rule): the ratios are printed, not asserted."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from moeplat.bench.data import data_wait, format_data, prepare_throughput, repeated_corpus
from moeplat.cli.main import main
from moeplat.data.shards import open_prepared
from moeplat.data.tokenizers import ByteTok

TINY = Path(__file__).resolve().parents[1] / "fixtures" / "tiny.yaml"
MiB = 2**20


def test_prepare_throughput_figures(tmp_path):
    r = prepare_throughput(tmp_path, max_bytes=MiB // 2, vocab_size=400, repeats=1)
    for key in ("limit_tokens_per_s", "prepare_1_tokens_per_s", "prepare_2_tokens_per_s"):
        assert r[key] > 0
    assert r["per_worker_vs_limit"] == pytest.approx(r["prepare_1_tokens_per_s"] / r["limit_tokens_per_s"])
    assert r["two_vs_one"] == pytest.approx(r["prepare_2_tokens_per_s"] / r["prepare_1_tokens_per_s"])


def test_repeated_corpus_is_real_text_repeated(tmp_path):
    root = repeated_corpus(tmp_path, 3 * MiB, shard_tokens=MiB)
    manifest, splits = open_prepared(root)
    train = splits["main"]["train"]
    assert train.num_tokens == 3 * MiB and len(train.shards) == 3
    stream = train.stream()
    assert b"\nimport " in bytes(stream[:MiB]) and b"\ndef " in bytes(stream[:MiB])  # stdlib source
    assert np.array_equal(stream[:MiB], stream[MiB : 2 * MiB])  # shards repeat the same text
    assert manifest["tokenizer"]["fingerprint"] == ByteTok().fingerprint


def test_data_wait_and_the_table(tmp_path):
    corpus = repeated_corpus(tmp_path / "c", 2 * MiB, shard_tokens=MiB)
    torch.manual_seed(0)
    w = data_wait(str(TINY), corpus, steps=3, warmup=1)
    assert 0 < w["wait_fraction"] < 1 and w["step_ms"] > w["wait_ms_per_step"] > 0
    table = format_data(
        {
            "prepare": prepare_throughput(tmp_path / "p", max_bytes=MiB // 4, vocab_size=300, repeats=1),
            "wait": w,
            "rss": {"small_peak_rss_mib": 500.0, "big_peak_rss_mib": 510.0, "small_tokens": 10 * MiB,
                    "big_tokens": 2**30, "rss_growth_mib": 10.0},
        }
    )  # fmt: skip
    for text in ("the limit", "1 worker", "2 workers", "(target <= 1%)", "+10.0 MiB (target within 100 MB)"):
        assert text in table


@pytest.mark.slow
def test_bench_cli_data_section_json(tmp_path, capsys, monkeypatch):
    """The CLI wiring of the section; its figures are tested at small sizes above and the RSS runs
    by the slow test below, so the prepared text and the wait corpus are small here and the RSS
    size only reaches data_bench (the defaults take minutes)."""
    import functools

    import moeplat.bench.data as bench_data

    monkeypatch.chdir(tmp_path)
    real, calls = bench_data.data_bench, []

    def small(spec, **kw):
        calls.append(kw)
        return real(spec, **{**kw, "rss": False}, max_bytes=MiB // 2, wait_tokens=2 * MiB)

    monkeypatch.setattr(bench_data, "data_bench", small)
    argv = ["bench", "--no-layers", "--no-step", "--no-memory", "--no-generate", "--no-e2e", "--json"]
    argv += ["--step-spec", str(TINY)]
    assert main([*argv, "--data-tokens", "0"]) == 0
    data = json.loads(capsys.readouterr().out)["data"]
    assert set(data) == {"prepare", "wait"} and data["prepare"]["text_mib"] > 0.3
    assert calls[-1] == {"rss": False, "big_tokens": 0}
    monkeypatch.setattr(
        bench_data, "data_bench", functools.partial(lambda spec, **kw: calls.append(kw) or {})
    )
    assert main([*argv, "--data-tokens", "0.02"]) == 0
    assert calls[-1] == {"rss": True, "big_tokens": int(0.02 * 2**30)}
