"""Expert parallelism with an FSDP2 dense part (`expert_parallel`, `dense: fsdp`;
moeplat.parallel.ep_fsdp).

In-process pieces on 2 gloo processes (float64): a TransformerLM whose experts are sharded over
ep_size 2 and whose dense part is fully_shard-ed with the experts ignored gives every gradient of
the single-process model, the global clipping norm and the clipped gradients of
torch.nn.utils.clip_grad_norm_, and full (single-process layout) weights and Adam state that load
back. Then `moeplat run` on 2 CPU processes logs the per-step losses of 1 process with the doubled
batch (the Switch balance loss on: balance_scope "global", as in tests/parallel/test_ep_run.py) in
one MLflow run, and its checkpoint resumes on 1 device and on 2 EP+FSDP ranks to the
uninterrupted single-process losses.
"""

from __future__ import annotations

import copy
from pathlib import Path

import ep_helpers as h
import pytest
import torch
from cli_runs import finish, mlflow_runs, resume_copies, start_run
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from moeplat.compile.trainer import fsdp_parallelize
from moeplat.parallel.checkpoint import (
    full_optimizer_state,
    full_state_dict,
    load_full_state_dict,
    shard_optimizer_state,
)
from moeplat.parallel.clip import clip_grad_norm_, global_grad_norm
from moeplat.parallel.expert_parallel import shard_moe_layers
from moeplat.parallel.grads import expert_parameters, reduce_expert_grads

pytestmark = pytest.mark.slow
E, K = 4, 2


def _ep_fsdp_lm(rank: int, world: int):
    model = h._lm(E, K, None)
    groups = h.groups_of(2)
    shard_moe_layers(model, groups)
    mesh = init_device_mesh("cpu", (world, 1), mesh_dim_names=("data_parallel", "tensor_parallel"))
    experts = [p for _, p, _ in expert_parameters(model)]
    fsdp_parallelize(mesh, "full", ignored_params=experts)(model)
    return model, groups.local_experts(E)


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _backward(rank, world, ref, ep):
    gen = torch.Generator().manual_seed(3)
    idx = torch.randint(0, 11, (world * h.B, h.S), generator=gen)
    g = torch.randn(world * h.B, h.S, 11, generator=gen, dtype=torch.float64)
    out = ref(idx)
    ((out.logits_BSV * g).sum() + out.aux_loss).backward()
    rows = slice(rank * h.B, (rank + 1) * h.B)
    o = ep(idx[rows])
    (world * (o.logits_BSV * g[rows]).sum() + o.aux_loss).backward()  # FSDP2 averages dense grads
    reduce_expert_grads(ep)


def case_grads_clip_checkpoint(rank: int, world: int) -> None:
    ref = h._lm(E, K, None)
    ep, mine = _ep_fsdp_lm(rank, world)
    assert isinstance(ep.blocks[0].attn.wq.weight, DTensor) and isinstance(
        ep.blocks[0].ffn.router.weight, DTensor
    )
    assert not any(isinstance(p, DTensor) for _, p, _ in expert_parameters(ep))
    _backward(rank, world, ref, ep)

    def want(name, t):
        return t[mine.start : mine.stop] if ".experts." in name else t

    for name, p in ref.named_parameters():
        h._close(_full(ep.get_parameter(name).grad), want(name, p.grad), f"{name}.grad", h.TIGHT)

    # global norm and clipping: torch's single-process clip_grad_norm_ is the reference
    max_norm = 0.5
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm)
    ep_params = list(ep.parameters())
    assert float(global_grad_norm(ep_params, ep)) > max_norm  # the clip is active
    norm = clip_grad_norm_(torch.optim.SGD(ep_params, lr=0.1), max_norm, model=ep)
    h._close(norm.double(), ref_norm, "global grad norm", {"rtol": 1e-6, "atol": 0})
    for name, p in ref.named_parameters():
        h._close(
            _full(ep.get_parameter(name).grad),
            want(name, p.grad),
            f"clipped {name}.grad",
            {"rtol": 1e-6, "atol": 1e-12},
        )

    # full state dict == the single-process one; Adam state likewise, and both load back
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    opt_ep = torch.optim.AdamW(ep.parameters(), lr=1e-2)
    opt_ref.step()
    opt_ep.step()
    full = full_state_dict(ep)
    assert full.keys() == ref.state_dict().keys()
    for k, v in ref.state_dict().items():
        h._close(full[k], v, f"state {k}", {"rtol": 1e-6, "atol": 1e-9})
    ref_opt = opt_ref.state_dict()["state"]
    live = {p: dict(s) for p, s in opt_ep.state.items()}
    ep_opt = full_optimizer_state(opt_ep, ep)
    # gathering leaves the live optimizer's own tensors in place (issue 14)
    assert all(opt_ep.state[p][k] is t for p, s in live.items() for k, t in s.items())
    for i, per_param in ref_opt.items():
        for key, t in per_param.items():
            h._close(ep_opt["state"][i][key], t, f"optimizer state {i}.{key}", {"rtol": 1e-6, "atol": 1e-9})

    fresh, _ = _ep_fsdp_lm(rank, world)
    load_full_state_dict(fresh, full)
    for k, v in full_state_dict(fresh).items():
        h._close(v, full[k], f"reloaded {k}", h.TIGHT)
    opt_fresh = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    state = copy.deepcopy(ep_opt)
    shard_optimizer_state(state, opt_fresh, fresh)
    opt_fresh.load_state_dict(state)
    for i, per_param in full_optimizer_state(opt_fresh, fresh)["state"].items():
        for key, t in per_param.items():
            h._close(t, ep_opt["state"][i][key], f"reloaded optimizer {i}.{key}", h.TIGHT)
    opt_ep.step()  # and it still steps on its own shards


def test_ep_fsdp_grads_global_clip_norm_and_full_checkpoint():
    h.spawn(case_grads_clip_checkpoint, 2)


# --- moeplat run ------------------------------------------------------------------------------

COMMON = [
    "parallel.accelerator=cpu",
    "train.log_every=1",
    "train.val_every=4",
    "train.schedule={kind: constant}",
]
SINGLE = ["train.batch_size=8"]
EP_FSDP = [
    "train.batch_size=4",
    "parallel.devices=2",
    "parallel.strategy={kind: expert_parallel, ep_size: 2, dense: fsdp}",
]


def _run(tmp: Path, name: str, overrides: list[str], *extra: str):
    return start_run(tmp, name, [*COMMON, *overrides, "tracking.log_model=false"], *extra)


def _losses(tmp: Path, name: str) -> tuple[dict[int, float], int]:
    client, runs = mlflow_runs(tmp, name)
    return {m.step: m.value for m in client.get_metric_history(runs[0].info.run_id, "train/loss")}, len(runs)


def test_ep_fsdp_run_matches_one_process_and_resumes_at_other_layouts(tmp_path):
    procs = {
        "single": _run(tmp_path, "single", [*SINGLE, "train.max_steps=6"]),
        "ep": _run(tmp_path, "ep", [*EP_FSDP, "train.max_steps=4"]),
    }
    outputs = {name: finish(p, timeout=300) for name, p in procs.items()}
    (ep, n_runs), (single, _) = _losses(tmp_path, "ep"), _losses(tmp_path, "single")
    assert n_runs == 1  # both ranks, one MLflow run
    assert outputs["ep"].count("run finished") == 1
    assert sorted(ep) == [0, 1, 2, 3] and single[3] < single[0]
    torch.testing.assert_close(
        torch.tensor([ep[s] for s in range(4)]),
        torch.tensor([single[s] for s in range(4)]),
        rtol=1e-5,
        atol=0,
    )

    # The checkpoint is the single-process layout: it resumes on 1 device and on 2 EP+FSDP ranks.
    (state,) = (tmp_path / "ep").glob("tiny/*/run.json")
    src = state.parent
    # two copies of the run directory and its MLflow store, each resumed at another layout
    layouts = {"resume1": [*SINGLE, "train.max_steps=6"], "resume2": [*EP_FSDP, "train.max_steps=6"]}
    resumed = resume_copies(tmp_path, src, layouts, _run)
    for name, proc in resumed.items():
        finish(proc, timeout=300)
        losses, n_runs = _losses(tmp_path, name)
        assert n_runs == 1 and sorted(losses) == [0, 1, 2, 3, 4, 5], name
        torch.testing.assert_close(
            torch.tensor([losses[4], losses[5]]), torch.tensor([single[4], single[5]]), rtol=1e-5, atol=0
        )
