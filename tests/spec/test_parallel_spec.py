"""The `parallel` section: strategies, cross-checks against the model (naming the fields to change),
and the preflight estimate (moeplat.spec.preflight) checked against hand-computed figures."""

from __future__ import annotations

from pathlib import Path

import pytest

from moeplat.spec import load_spec
from moeplat.spec.plan import plan
from moeplat.spec.preflight import GiB, preflight
from moeplat.spec.sections import DDP, FSDP, ExpertParallel, SingleDevice

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "tests" / "fixtures" / "tiny.yaml"  # 4 experts per layer, 2 MoE layers
EP = "parallel.strategy={kind: expert_parallel, ep_size: 2}"


def _spec(*overrides: str):
    return load_spec(TINY, list(overrides)).spec


def test_default_is_single_and_every_kind_parses():
    par = _spec().parallel
    assert par.strategy == SingleDevice(kind="single") and par.world_size == 1
    assert not par.activation_checkpointing
    assert _spec("parallel.devices=2", "parallel.strategy.kind=ddp").parallel.strategy == DDP(kind="ddp")
    fsdp = _spec("parallel.devices=4", "parallel.strategy={kind: fsdp, sharding: grad_op}").parallel
    assert fsdp.strategy == FSDP(kind="fsdp", sharding="grad_op") and fsdp.world_size == 4
    ep = _spec("parallel.devices=2", "parallel.num_nodes=2", EP).parallel
    assert ep.strategy == ExpertParallel(
        kind="expert_parallel", ep_size=2, dense="ddp", dispatcher="all_to_all", capacity_scope="rank"
    )
    assert ep.world_size == 4


def test_single_on_several_devices_names_the_strategy(issues_of):
    issues = issues_of(TINY, ["parallel.devices=2"])
    assert [i.path for i in issues] == ["parallel.strategy"]
    assert "ddp, fsdp or expert_parallel" in issues[0].message
    assert [i.path for i in issues_of(TINY, ["parallel.num_nodes=3"])] == ["parallel.strategy"]


def test_ep_size_must_divide_world_size_and_experts(issues_of):
    issues = issues_of(TINY, ["parallel.devices=3", "parallel.strategy={kind: expert_parallel, ep_size: 2}"])
    assert [i.path for i in issues] == ["parallel.strategy.ep_size"]
    assert "world size" in issues[0].message
    # 8 devices, ep_size 8 divides the world but not the 4 experts of each layer
    issues = issues_of(TINY, ["parallel.devices=8", "parallel.strategy={kind: expert_parallel, ep_size: 8}"])
    assert [i.path for i in issues] == ["parallel.strategy.ep_size"]
    assert "4 routed experts" in issues[0].message and "model.moe.num_experts" in issues[0].message


def test_pyramid_layers_are_each_checked(issues_of):
    # layer 0 has 4 experts, layer 1 has 6: ep_size 4 splits the first, not the second
    pyramid = ["model.moe.num_experts=[4, 6]", "model.moe.top_k=2", "parallel.devices=4"]
    issues = issues_of(TINY, [*pyramid, "parallel.strategy={kind: expert_parallel, ep_size: 4}"])
    assert "MoE layer 1 has 6 routed experts" in issues[0].message
    assert _spec(*pyramid, "parallel.strategy={kind: expert_parallel, ep_size: 2}")


def test_expert_parallel_needs_moe_and_global_scope_needs_capacity(issues_of):
    dense = ["model.moe=null", "model.dense_ffn={kind: swiglu, d_ff: 64}", "parallel.devices=2", EP]
    assert [i.path for i in issues_of(TINY, dense)] == ["parallel.strategy"]
    scope = [
        "parallel.devices=2",
        "parallel.strategy={kind: expert_parallel, ep_size: 2, capacity_scope: global}",
    ]
    issues = issues_of(TINY, scope)
    assert [i.path for i in issues] == ["parallel.strategy.capacity_scope"]


def test_unknown_strategy_and_sharding_are_rejected(issues_of):
    assert issues_of(TINY, ["parallel.strategy.kind=zero9"])[0].path.startswith("parallel.strategy")
    issues = issues_of(TINY, ["parallel.devices=2", "parallel.strategy={kind: fsdp, sharding: half}"])
    assert issues[0].path == "parallel.strategy.sharding"


# --- preflight -------------------------------------------------------------------------------------


def _preflight(*overrides: str, memory=None):
    spec = _spec(*overrides)
    p = plan(spec)
    return spec, p, preflight(spec, p, memory)


def test_single_device_preflight_is_the_plan_estimate():
    _, p, pf = _preflight()
    assert pf.world_size == 1 and pf.comm_bytes_per_step["total"] == 0
    for key in ("weights", "grads", "optimizer", "activations"):
        assert pf.memory_bytes[key] == p.memory_bytes[key]
    assert pf.memory_bytes["all_to_all_buffers"] == 0


def test_ddp_replicates_and_fsdp_shards_state():
    _, p, ddp = _preflight("parallel.devices=4", "parallel.strategy.kind=ddp")
    P = p.total_params
    assert ddp.memory_bytes["optimizer"] == 8 * P
    assert ddp.comm_bytes_per_step["dp_gradients"] == int(2 * 3 / 4 * 4 * P)  # ring all-reduce
    assert ddp.global_batch == 4 * 4
    _, _, full = _preflight("parallel.devices=4", "parallel.strategy.kind=fsdp")
    assert full.memory_bytes["weights"] == 4 * P // 4 and full.memory_bytes["optimizer"] == 8 * P // 4
    _, _, zero2 = _preflight("parallel.devices=4", "parallel.strategy={kind: fsdp, sharding: grad_op}")
    assert zero2.memory_bytes["weights"] == 4 * P and zero2.memory_bytes["grads"] == 4 * P // 4


def test_expert_parallel_shards_experts_and_counts_all_to_all():
    spec, p, pf = _preflight("parallel.devices=4", "parallel.strategy={kind: expert_parallel, ep_size: 4}")
    dense = p.total_params - p.expert_params
    assert pf.memory_bytes["weights"] == int(4 * (dense + p.expert_params / 4))
    tokens, d, k = spec.data.seq_len * spec.train.batch_size, spec.model.d_model, 2
    assert pf.memory_bytes["all_to_all_buffers"] == 2 * tokens * k * d * 4
    # 2 MoE layers x (dispatch + combine) x (forward + backward), 3/4 of the tokens leave the rank
    assert pf.comm_bytes_per_step["all_to_all"] == int(2 * 4 * 3 / 4 * tokens * k * d * 4)
    _, _, gathered = _preflight(
        "parallel.devices=4", "parallel.strategy={kind: expert_parallel, ep_size: 4, dispatcher: all_gather}"
    )
    assert gathered.comm_bytes_per_step["all_to_all"] == 2 * 4 * 3 * tokens * d * 4


def test_activation_checkpointing_lowers_the_activation_estimate():
    _, _, plain = _preflight()
    _, _, ckpt = _preflight("parallel.activation_checkpointing=true")
    assert ckpt.memory_bytes["activations"] < plain.memory_bytes["activations"]


def test_memory_over_the_device_names_the_fields():
    _, _, pf = _preflight(memory=1.0)
    assert pf.problems == []
    _, _, pf = _preflight(memory=1e-6)
    assert [path for path, _ in pf.problems] == ["parallel"]
    assert (
        "parallel.activation_checkpointing" in pf.problems[0][1] and "train.batch_size" in pf.problems[0][1]
    )
    assert pf.memory_bytes["total"] > 1e-6 * GiB


@pytest.mark.parametrize("name", ["deepseek-v3", "mixtral"])
def test_published_specs_plan_on_64_gpus(name):
    """The docs/parallel.md worked estimate: expert parallel over all 64 GPUs, FSDP for the rest."""
    spec = load_spec(
        REPO / "specs" / "reference" / f"{name}.yaml",
        [
            "parallel.devices=8",
            "parallel.num_nodes=8",
            "parallel.strategy={kind: expert_parallel, ep_size: 8, dense: fsdp}",
        ],
    ).spec
    p = plan(spec)
    pf = preflight(spec, p)
    assert pf.world_size == 64
    dense = p.total_params - p.expert_params
    assert pf.memory_bytes["weights"] == int(4 * (p.expert_params / 8 + dense / 64))
    assert pf.comm_bytes_per_step["all_to_all"] > 0 and pf.memory_bytes["all_to_all_buffers"] > 0
