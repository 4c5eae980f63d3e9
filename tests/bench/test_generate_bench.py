"""The generation section of `moeplat bench`: every candidate generates the asked number of tokens,
and the ratios are those of the measured seconds. No timing assertions (house rule)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moeplat.bench.generate import format_generation, generation_bench
from moeplat.cli.main import main

TINY = Path(__file__).resolve().parents[1] / "fixtures" / "tiny.yaml"


def test_generation_bench_rows_and_ratios():
    g = generation_bench(str(TINY), new_tokens=6, prompt_tokens=4, max_seq_len=48)
    rows = {r["candidate"]: r for r in g["rows"]}
    assert set(rows) == {"moeplat:kv_cache", "moeplat:no_cache", "transformers:generate"}
    for r in rows.values():
        assert r["seconds"] > 0 and r["tokens_per_s"] == pytest.approx(6 / r["seconds"])
    assert g["cache_speedup"] == pytest.approx(
        rows["moeplat:no_cache"]["seconds"] / rows["moeplat:kv_cache"]["seconds"]
    )
    assert g["hf_over_moeplat"] == pytest.approx(
        rows["transformers:generate"]["seconds"] / rows["moeplat:kv_cache"]["seconds"]
    )
    assert g["spec_max_seq_len"] == 32 and g["max_seq_len"] == 48
    text = format_generation(g)
    assert "model.max_seq_len raised 32 -> 48 for this bench" in text and "KV cache vs recomputing" in text


def test_bench_cli_generation_section_json(capsys):
    argv = [
        "bench",
        "--no-layers",
        "--no-step",
        "--no-memory",
        "--no-data",
        "--no-e2e",
        "--gen-tokens",
        "3",
        "--json",
    ]
    assert main(argv) == 0
    short, long = json.loads(capsys.readouterr().out)["generate"]
    assert (short["prompt_tokens"], long["prompt_tokens"]) == (32, 256)
    for g in (short, long):
        assert g["new_tokens"] == 3 and g["max_seq_len"] == 512 and g["spec"] == "specs/quickstart.yaml"
        assert len(g["rows"]) == 3 and g["cache_speedup"] > 0


def test_bench_gen_tokens_must_be_positive(capsys):
    assert main(["bench", "--no-layers", "--no-step", "--no-memory", "--no-data", "--gen-tokens", "0"]) == 2
    assert "--gen-tokens must be >= 1, got 0" in capsys.readouterr().err
