"""The end-to-end section of `moeplat bench`: every candidate and phase is there with positive
times, the ratios are those of the medians, the phases add up to the profiled step, and the
transformers model it times computes moeplat's logits. No timing assertions (house rule)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moeplat.bench.e2e import BASELINE, LOGGING, build_candidates, dense_counterpart, e2e_bench, format_e2e
from moeplat.bench.e2e_phases import OTHER, PHASES, attribute
from moeplat.cli.main import main
from moeplat.compile.model import build_model
from moeplat.nn import profiling
from moeplat.spec import load_spec

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "tests" / "fixtures" / "tiny.yaml"
HF_RUNS_ON_CPU = {"eager", "batched_mm", "grouped_mm"}


@pytest.fixture(scope="module")
def tiny_result() -> dict:
    return e2e_bench(str(TINY), rounds=1, steps=2, warmup=1, profile_steps=2)


def test_every_row_has_a_time_and_its_ratio(tiny_result):
    rows = {r["candidate"]: r for r in tiny_result["rows"]}
    timed = {name for name, r in rows.items() if r["median_ms"] is not None}
    hf_timed = {name.split(":")[2] for name in timed if name.startswith("hf:mixtral:")}
    assert {
        BASELINE,
        LOGGING,
        f"{BASELINE}, no ranges",
        "moeplat:dense",
    } <= timed and hf_timed >= HF_RUNS_ON_CPU
    base = rows[BASELINE]["median_ms"]
    for name in timed:
        r = rows[name]
        assert r["median_ms"] > 0 and len(r["times_ms"]) == 1 and r["params"] > 0
        assert r["vs_moe"] == pytest.approx(r["median_ms"] / base)
    for name in set(rows) - timed:  # CUDA- or bf16-only kernels say why they were skipped
        assert rows[name]["note"].startswith("skipped: ")
    # the dense counterpart of a spec other than the quick-start is derived: fewer parameters
    assert "derived" in rows["moeplat:dense"]["note"]
    assert rows["moeplat:dense"]["params"] < rows[BASELINE]["params"] == rows["hf:mixtral:eager"]["params"]


def test_phases_are_positive_and_add_up_to_the_profiled_step(tiny_result):
    prof = tiny_result["profile"]
    phases = {p["phase"]: p for p in prof["phases"]}
    assert list(phases) == [name for name, _ in PHASES] + [OTHER]
    for name, _ in PHASES:
        assert phases[name]["ms"] > 0, name
    total = sum(p["ms"] for p in phases.values())
    assert sum(p["ms"] for n, p in phases.items() if n != OTHER) <= prof["step_ms"] * 1.001
    assert total == pytest.approx(prof["step_ms"], rel=1e-6)
    assert sum(p["share"] for p in phases.values()) == pytest.approx(1.0)
    # tiny: 2 MoE layers x (attention, router, dispatch, experts, combine, aux losses, stats) + optimizer
    assert prof["ranges_per_step"] == 2 * 7 + 1 and prof["range_us"] > 0
    text = format_e2e(tiny_result)
    assert "== end to end:" in text and "expert GEMMs" in text and "hf:mixtral:grouped_mm" in text


def test_the_transformers_model_computes_moeplats_logits(tiny_result):
    diffs = tiny_result["logits_max_abs_diff"]
    assert set(diffs) >= HF_RUNS_ON_CPU
    assert all(d < 1e-4 for d in diffs.values()), diffs


def test_backward_ops_go_to_their_forward_ops_phase():
    """A backward op runs outside every range: it is attributed through its autograd node."""
    w = torch.randn(64, 64, requires_grad=True)
    x = torch.randn(256, 64)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with profiling.phase(profiling.EXPERTS):
            h = x @ w
        with profiling.phase(profiling.COMBINE):
            y = h.relu().sum()
        y.backward()
    totals = attribute(prof.events())
    mm_backward = [e for e in prof.events() if e.name == "autograd::engine::evaluate_function: MmBackward0"]
    assert mm_backward and totals["expert GEMMs"] >= sum(e.self_cpu_time_total for e in mm_backward)
    assert totals["combine (weight, scatter-add)"] > 0 and totals["attention"] == 0


def test_derived_dense_counterpart_of_the_quickstart_is_quickstart_dense():
    """The derivation used for other specs gives the quick-start the dense spec's model."""
    torch.manual_seed(0)
    moe = build_model(load_spec(ROOT / "specs" / "quickstart.yaml").spec)
    dense_file = build_model(load_spec(ROOT / "specs" / "quickstart-dense.yaml").spec)
    derived = dense_counterpart(moe)
    assert [n for n, _ in derived.named_parameters()] == [n for n, _ in dense_file.named_parameters()]
    assert [p.shape for p in derived.parameters()] == [p.shape for p in dense_file.parameters()]


def test_hf_rows_are_skipped_not_fatal_for_a_model_no_family_computes(tmp_path):
    spec = tmp_path / "expert-choice.yaml"
    spec.write_text(f"extends: {TINY}\nmodel:\n  moe:\n    router: {{kind: expert_choice}}\n")
    cands, info = build_candidates(str(spec), None, "cpu")
    hf = [c for c in cands if c.name.startswith("hf")]
    assert len(hf) == 1 and hf[0].step is None and hf[0].note.startswith("skipped: ")
    assert info["logits_max_abs_diff"] == {}


def test_bench_cli_e2e_section_and_no_e2e(capsys):
    base = ["bench", "--no-layers", "--no-step", "--no-memory", "--no-data", "--no-generate", "--json"]
    assert main([*base, "--no-e2e"]) == 0
    assert "e2e" not in json.loads(capsys.readouterr().out)
    argv = [*base, "--e2e-spec", str(TINY), "--e2e-rounds", "1", "--e2e-steps", "1"]
    assert main(argv) == 0
    e2e = json.loads(capsys.readouterr().out)["e2e"]
    assert e2e["spec"] == str(TINY) and e2e["rounds"] == 1 and e2e["batch"] == [4, 32]
    assert {r["candidate"] for r in e2e["rows"]} >= {BASELINE, "moeplat:dense", "hf:mixtral:grouped_mm"}


def test_bench_e2e_rounds_and_steps_must_be_positive(capsys):
    assert main(["bench", "--no-layers", "--e2e-rounds", "0"]) == 2
    assert "--e2e-rounds must be >= 1, got 0" in capsys.readouterr().err
    assert main(["bench", "--no-layers", "--e2e-steps", "-1"]) == 2
    assert "--e2e-steps must be >= 1, got -1" in capsys.readouterr().err


def test_routing_statistics_only_in_the_logging_step(tiny_result, monkeypatch):
    """moeplat:moe is the step training runs 9 times in 10 (no statistics); the logging step
    computes them in every MoE layer, and the telemetry share is its excess over stats_every."""
    import moeplat.nn.moe as moe_module

    calls = []
    real = moe_module.routing_stats
    monkeypatch.setattr(moe_module, "routing_stats", lambda *a, **k: calls.append(1) or real(*a, **k))
    cands, info = build_candidates(str(TINY), None, "cpu", hf=False)
    steps = {c.name: c.step for c in cands}
    steps[BASELINE]()
    assert calls == []
    steps[LOGGING]()
    assert len(calls) == 2  # tiny: 2 MoE layers
    assert info["stats_every"] == load_spec(TINY).spec.train.log_every
    rows = {r["candidate"]: r for r in tiny_result["rows"]}
    share = (rows[LOGGING]["vs_moe"] - 1) / tiny_result["stats_every"]
    assert tiny_result["telemetry_share"] == pytest.approx(share)
    assert "routing statistics: the logging step" in format_e2e(tiny_result)
