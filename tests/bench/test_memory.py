"""`moeplat plan`'s memory estimate against what a training step really holds (issue 20, part 3).

Two measurements, both of the built model on the CPU: the bytes autograd saves for backward
(saved_tensors_hooks; what plan's activation count describes), and the peak of a whole training
step (torch.profiler's allocation events; the method itself is checked on known allocations)."""

from __future__ import annotations

import glob
import json
from pathlib import Path

import pytest
import torch

from moeplat.bench.memory import compare, profiled_peak_delta, saved_for_backward_bytes
from moeplat.cli.main import main
from moeplat.spec import load_spec
from moeplat.spec.plan import plan
from moeplat.spec.plan_memory import activation_bytes, attention_kernel
from moeplat.spec.preflight import preflight

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "tests" / "fixtures" / "tiny.yaml"
QUICKSTART = ROOT / "specs" / "quickstart.yaml"
MINIS = sorted(glob.glob(str(ROOT / "specs" / "reference" / "*-mini.yaml")))
TRAINABLE = [str(TINY), *sorted(glob.glob(str(ROOT / "specs" / "quickstart*.yaml"))), *MINIS]
CPU = torch.device("cpu")


def test_profiled_peak_counts_known_allocations():
    def allocate():
        a = torch.empty(1000, 1000)  # 4 MB
        b = torch.empty(500, 1000, dtype=torch.float64)  # + 4 MB
        del a
        c = torch.empty(3000, 1000)  # + 12 MB, with b live: the peak, 16 MB
        del b, c
        torch.empty(100, 1000)  # 0.4 MB, freed at once

    assert profiled_peak_delta(allocate) == 16_000_000


def _cpu(spec_file: str, *overrides: str):
    return load_spec(spec_file, ["parallel.accelerator=cpu", *overrides]).spec


def _planned_saved(spec) -> int:
    """Plan's activations less the head's two backward gradients (float32 [tokens, vocab] each),
    which exist only once backward starts: what the forward saves, logits included."""
    blocks, head = activation_bytes(spec)
    tokens = spec.train.batch_size * spec.data.seq_len
    return sum(blocks) + head - 2 * 4 * tokens * spec.model.vocab_size


# Top-p and MoE++ null experts leave some of the top_k slots unused, how many depending on the
# router's state: plan counts all of them, an upper bound (plan_memory's module doc)
DYNAMIC = ("quickstart-top-p", "quickstart-null-experts")
ACTIVATION_CASES = [f for f in TRAINABLE if Path(f).stem not in DYNAMIC]


@pytest.mark.parametrize(
    "spec_file", [f for f in TRAINABLE if Path(f).stem in DYNAMIC], ids=lambda f: Path(f).stem
)
def test_planned_activations_bound_what_dynamic_routing_saves(spec_file):
    spec = _cpu(spec_file)
    planned, saved = _planned_saved(spec), saved_for_backward_bytes(spec, CPU)
    assert saved < planned <= saved * 1.4, (planned, saved)  # 1.31x at initialisation
    # with every slot used (top-p's p = 1: all top_k), the bound is the exact count
    if Path(spec_file).stem == "quickstart-top-p":
        full = _cpu(spec_file, "model.moe.router.p=1.0")
        assert _planned_saved(full) == pytest.approx(saved_for_backward_bytes(full, CPU), rel=0.04)


@pytest.mark.parametrize("spec_file", ACTIVATION_CASES, ids=lambda f: Path(f).stem)
def test_planned_activations_equal_what_autograd_saves(spec_file):
    spec = _cpu(spec_file)
    planned, saved = _planned_saved(spec), saved_for_backward_bytes(spec, CPU)
    moe = spec.model.moe
    if moe is not None and moe.capacity.kind == "factor":
        # sorted dispatch computes only the slots the capacity keeps; plan counts every slot
        assert saved * 0.97 <= planned <= saved * 1.15, (planned, saved)
    else:
        assert planned == pytest.approx(saved, rel=0.04), (planned, saved)


@pytest.mark.parametrize(
    "overrides",
    [
        ("model.dropout=0.1",),  # attention dropout on the CPU: the math kernel, S x S kept
        ("model.moe.experts.dropout=0.2",),
        ("model.moe.dispatch={kind: loop}",),
        ("model.moe.experts.d_ff=64",),  # F <= D: the combine weight scales the hidden
        ("model.attention={kind: gqa, qk_norm: true}",),  # a float32 rstd per token
        ("model.attention={kind: gqa, qk_norm: head}",),  # a float32 rstd per token and head
    ],
    ids=lambda o: o[0].split("=")[0],
)
def test_planned_activations_follow_the_options(overrides):
    spec = _cpu(str(TINY), *overrides)
    assert _planned_saved(spec) == pytest.approx(saved_for_backward_bytes(spec, CPU), rel=0.04)


def test_attention_kernel_is_the_one_sdpa_runs():
    """No S x S scores with a fused kernel: GPU always, CPU unless dropout or MLA's unequal dims."""
    mla = str(ROOT / "specs" / "reference" / "deepseek-v3-mini.yaml")
    assert attention_kernel(_cpu(str(QUICKSTART))) == "fused"
    assert attention_kernel(_cpu(str(QUICKSTART), "model.dropout=0.1")) == "math"
    assert attention_kernel(_cpu(mla)) == "math"
    assert attention_kernel(load_spec(mla, ["parallel.accelerator=gpu"]).spec) == "fused"
    big = load_spec(str(ROOT / "specs" / "reference" / "deepseek-v3.yaml")).spec  # accelerator auto
    kept = plan(big).memory_bytes["activations"]
    s, h, layers = big.data.seq_len, big.model.n_heads, big.model.n_layers
    scores = s * h * s * 4 * layers  # what a kernel keeping softmax(QK^T) would add, float32
    assert kept < scores  # the old 684 GiB held these


@pytest.mark.parametrize(
    ("spec_file", "overrides"),
    [
        (str(QUICKSTART), ()),
        (str(QUICKSTART), ("parallel.activation_checkpointing=true",)),
        (str(ROOT / "specs" / "reference" / "deepseek-v3-mini.yaml"), ()),  # MLA, math kernel
        (str(ROOT / "specs" / "reference" / "switch-mini.yaml"), ("model.moe.dispatch={kind: capacity}",)),
    ],
    ids=["quickstart", "checkpointing", "deepseek-v3-mini", "switch-capacity"],
)
def test_plan_within_25_percent_of_the_measured_step_peak(spec_file, overrides):
    row = compare(spec_file, CPU, list(overrides))
    spec = _cpu(spec_file, *overrides)
    assert row.estimate_bytes == preflight(spec, plan(spec)).memory_bytes["total"]
    assert 0.75 <= row.ratio <= 1.25, row.to_dict()


def test_bench_memory_section(capsys):
    argv = [
        "bench",
        "--no-layers",
        "--no-step",
        "--no-data",
        "--no-generate",
        "--no-e2e",
        "--memory-spec",
        str(TINY),
    ]
    assert main([*argv, "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)["memory"]
    assert row["spec"] == "tiny" and row["ratio"] == pytest.approx(
        row["estimate_bytes"] / row["measured_bytes"]
    )
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "plan vs measured memory" in out and "plan/meas" in out and "tiny" in out
