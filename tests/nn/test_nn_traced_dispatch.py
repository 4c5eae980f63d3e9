"""torch.compile of the quick-start MoE's training forward: one graph, no graph break, no host
sync (issue 20), and the pieces that make it so (the static sorted dispatch, moeplat::grouped_mm)
against their references; compiled and eager agree on loss and gradients."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from dispatch_helpers import run_dispatch

from moeplat.compile.model import build_model
from moeplat.nn import SwiGLUExperts, capacity_keep_mask, dispatch_loop, dispatch_sorted
from moeplat.nn.dispatch import grouped_mm
from moeplat.spec import load_spec

QUICKSTART = Path(__file__).resolve().parents[2] / "specs" / "quickstart.yaml"
TINY = ["model.d_model=64", "model.n_layers=2", "model.max_seq_len=32"]  # the quick-start, smaller
FACTOR = "model.moe.capacity={kind: factor, train: 1.0, eval: 1.5}"
# what a graph must not hold: data-dependent shapes or values read on the host
HOST_SYNC_OPS = {"nonzero", "argwhere", "_local_scalar_dense", "item", "tolist", "bincount", "masked_select"}


def _quickstart(*overrides: str):
    return build_model(load_spec(QUICKSTART, [*TINY, *overrides]).spec).train()


def _batch():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (2, 32), generator=g), torch.randint(0, 256, (2, 32), generator=g)


def _segments_reference(x, w, ends):
    starts = [0, *ends[:-1]]
    return torch.cat([x[s:e] @ w[i] for i, (s, e) in enumerate(zip(starts, ends, strict=True))])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # float64: its segment loop
def test_grouped_mm_op_equals_per_segment_matmuls_forward_and_backward(dtype):
    torch.manual_seed(0)
    ends = [5, 5, 16, 23]  # an empty segment and unaligned lengths, as routing produces
    x = torch.randn(23, 8, dtype=dtype, requires_grad=True)
    w = torch.randn(4, 8, 12, dtype=dtype, requires_grad=True)
    offs = torch.tensor(ends, dtype=torch.int32)
    y = grouped_mm(x, w, offs)
    y_ref = _segments_reference(x, w, ends)
    g = torch.randn_like(y)
    dx, dw = torch.autograd.grad(y, (x, w), g)
    dx_ref, dw_ref = torch.autograd.grad(y_ref, (x, w), g)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(dx, dx_ref, **tol)
    torch.testing.assert_close(dw, dw_ref, **tol)
    assert dw[1].abs().max() == 0  # the empty segment's expert gets no gradient
    # its fake kernel, autograd registration and schema agree with the real kernel
    torch.library.opcheck(grouped_mm, (x.detach(), w.detach(), offs))


@pytest.mark.parametrize(("capacity", "policy"), [(None, None), (2, "position"), (3, "probability")])
@pytest.mark.parametrize("F", [12, 6])  # the combine weight on the output (F > D) or on the hidden
def test_static_sorted_dispatch_equals_loop_float64(capacity, policy, F):
    """The compiled path's shapes (every T*K slot, dropped ones last) run eagerly here."""
    torch.manual_seed(1)
    T, D, E, K = 24, 8, 5, 2
    experts = SwiGLUExperts(E, D, F).double()
    x_TD = torch.randn(T, D, dtype=torch.float64)
    idx = torch.rand(T, E - 1).argsort(dim=-1)[:, :K]  # expert E-1 gets nothing
    w = torch.rand(T, K, dtype=torch.float64)
    keep = torch.ones(T, K, dtype=torch.bool)
    if capacity is not None:
        keep = capacity_keep_mask(idx, E, capacity, policy=policy, topk_weight_TK=w)
        assert (~keep).any(), "the test must really drop slots"
    y_ref, gx_ref, gw_ref, gp_ref = run_dispatch(dispatch_loop, experts, x_TD, idx, w, keep)
    static = lambda *args: dispatch_sorted(*args, static=True)  # noqa: E731
    y, gx, gw, gp = run_dispatch(static, experts, x_TD, idx, w, keep)
    tol = {"rtol": 1e-12, "atol": 1e-12}
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(gx, gx_ref, **tol)
    torch.testing.assert_close(gw, gw_ref, **tol)
    for name in gp_ref:
        torch.testing.assert_close(gp[name], gp_ref[name], **tol)
        # the last expert computes the dropped rows, but they carry no gradient to it
        assert gp[name][E - 1].abs().max() == 0
    assert (gw[~keep] == 0).all()


def test_static_sorted_dispatch_is_the_eager_numbers_when_dropless():
    """Dropless, the static path computes the same rows in the same segments: bit-equal in float32."""
    torch.manual_seed(2)
    T, D, E, K = 40, 16, 6, 2
    experts = SwiGLUExperts(E, D, 32)
    x_TD = torch.randn(T, D)
    idx = torch.rand(T, E).argsort(dim=-1)[:, :K]
    w = torch.rand(T, K)
    keep = torch.ones(T, K, dtype=torch.bool)
    compact = run_dispatch(dispatch_sorted, experts, x_TD, idx, w, keep)
    static = run_dispatch(lambda *a: dispatch_sorted(*a, static=True), experts, x_TD, idx, w, keep)
    for a, b in zip(compact[:3], static[:3], strict=True):
        assert torch.equal(a, b)
    for name, g in compact[3].items():
        assert torch.equal(static[3][name], g), name


def _graph_ops(graph_module) -> set[str]:
    ops = set()
    for node in graph_module.graph.nodes:
        if node.op in ("call_function", "call_method"):
            ops.add(node.target if isinstance(node.target, str) else getattr(node.target, "__name__", ""))
    return ops


@pytest.mark.parametrize("overrides", [[], [FACTOR]], ids=["dropless", "capacity_factor"])
@pytest.mark.parametrize("stats", [False, True], ids=["step", "logging_step"])
def test_quickstart_training_forward_traces_to_one_graph(overrides, stats):
    """torch._dynamo.explain of the training forward (sorted dispatch, SwiGLU experts, top-k):
    no graph break, with and without the routing statistics, and no op in the graph that reads a
    tensor on the host or sizes its output by the data."""
    model = _quickstart(*overrides)
    assert {m.dispatch for m in model.modules() if hasattr(m, "dispatch")} == {"sorted"}
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(*_batch(), stats=stats)
    reasons = [b.reason.splitlines()[0] for b in explained.break_reasons]
    assert explained.graph_break_count == 0, reasons
    assert explained.graph_count == 1
    ops = _graph_ops(explained.graphs[0])
    assert "grouped_mm" in str(explained.graphs[0].code)  # the experts' grouped GEMM is in it
    assert not ops & HOST_SYNC_OPS, ops & HOST_SYNC_OPS


def _fwd_bwd(model, idx, targets):
    model.zero_grad(set_to_none=True)
    out = model(idx, targets)
    (out.loss + out.aux_loss).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [[], [FACTOR]], ids=["dropless", "capacity_factor"])
def test_compiled_quickstart_step_equals_eager(overrides):
    """Inductor, fullgraph=True (it raises on any graph break): loss, aux loss, statistics and every
    gradient of one float32 training forward/backward equal the eager model's."""
    eager, compiled = _quickstart(*overrides), _quickstart(*overrides)  # weights from train.seed
    compiled.load_state_dict(eager.state_dict())
    torch._dynamo.reset()
    compiled.compile(fullgraph=True)
    idx, targets = _batch()
    ref, grads_ref = _fwd_bwd(eager, idx, targets)
    out, grads = _fwd_bwd(compiled, idx, targets)
    tol = {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(out.loss, ref.loss, **tol)
    torch.testing.assert_close(out.aux_loss, ref.aux_loss, **tol)
    for layer, o in ref.moe.items():
        torch.testing.assert_close(out.moe[layer].stats.load_E, o.stats.load_E)
        torch.testing.assert_close(out.moe[layer].dropped_frac, o.dropped_frac)
    assert grads.keys() == grads_ref.keys() and grads_ref
    for name, g_ref in grads_ref.items():
        torch.testing.assert_close(grads[name], g_ref, **tol, msg=name)


def _aten_ops(graphs) -> set[str]:
    return {
        node.target.name().split("::")[-1].split(".")[0]
        for gm in graphs
        for node in gm.graph.nodes
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)
    }


@pytest.mark.slow
def test_compiled_training_step_reads_nothing_on_the_host():
    """The aten graphs AOT autograd hands the compiler, forward and backward (what runs): no op
    whose result the host reads (a sync on an accelerator) or whose output size is the data's."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    model = _quickstart(FACTOR)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=aot_autograd(fw_compiler=keep, bw_compiler=keep), fullgraph=True)
    out = compiled(*_batch())
    (out.loss + out.aux_loss).backward()
    assert len(graphs) == 2  # one forward, one backward
    ops = _aten_ops(graphs)
    assert {"grouped_mm", "grouped_mm_weight_grad", "sort", "index_add"} <= ops  # the experts' GEMMs
    assert not ops & {"_local_scalar_dense", "nonzero", "bincount", "item", "masked_select"}, ops
