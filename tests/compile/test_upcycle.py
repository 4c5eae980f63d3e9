"""train.init: {kind: upcycle} (Komatsuzaki et al. 2023): a dense checkpoint becomes an MoE model.

The central check: with normalised top-k weights, noise 0 and granularity 1 every expert is the
dense FFN and the weights sum to 1, so the upcycled model computes the dense model's logits.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moeplat.compile.model import build_model
from moeplat.compile.upcycle import load_state_dict, upcycle, upcycle_from_spec
from moeplat.errors import SpecError
from moeplat.nn.experts import mlp
from moeplat.spec import load_spec

TINY = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "tiny.yaml"
DENSE = [
    "model.moe=null",
    "model.dense_ffn={kind: swiglu, d_ff: 32}",
    "train.seed=5",
]  # tiny's experts: d_ff 32


def _spec(*overrides: str):
    return load_spec(TINY, list(overrides)).spec


def _dense(*overrides: str):
    model = build_model(_spec(*DENSE, *overrides))
    with torch.no_grad():  # a "trained" checkpoint: norms away from 1 as well
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model.eval()


def _tokens() -> torch.Tensor:
    return torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(0))


def _upcycled(dense, *overrides: str, granularity: int = 1, noise: float = 0.0, seed: int = 0):
    model = build_model(_spec(*overrides))
    upcycle(model, dense.state_dict(), granularity=granularity, noise=noise, seed=seed)
    return model.eval()


def _issues(err) -> list[tuple[str, str]]:
    return [(i.path, i.message) for i in err.value.issues]


# --- the upcycled model ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        ["model.moe.top_k=1"],
        ["model.moe.top_k=2"],
        ["model.moe.top_k=1", "model.moe.router={kind: switch}"],  # top-1: weight p, not 1 -> excluded below
        ["model.moe.router={kind: sigmoid_bias}", "model.moe.losses={}"],
        ["model.moe.num_experts=6", "model.moe.top_k=3", "model.moe.dispatch={kind: loop}"],
    ],
    ids=["top1", "top2", "switch", "sigmoid_bias", "E6k3-loop"],
)
def test_upcycled_model_computes_the_dense_function_at_step_0(overrides):
    dense = _dense()
    x = _tokens()
    fresh = build_model(_spec(*overrides)).eval()
    moe = _upcycled(dense, *overrides)
    want = dense(x, x)
    got = moe(x, x)
    assert not torch.allclose(fresh(x).logits_BSV, want.logits_BSV, atol=1e-3)  # it is the copy that does it
    if "switch" in str(overrides):  # Switch scales the one expert by its probability p < 1
        assert not torch.allclose(got.logits_BSV, want.logits_BSV, atol=1e-4)
        return
    torch.testing.assert_close(got.logits_BSV, want.logits_BSV, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.loss, want.loss)


def test_what_is_copied_and_what_stays_fresh():
    over = ["model.moe.shared_experts={count: 1}"]
    dense = _dense()
    fresh = build_model(_spec(*over))
    moe = _upcycled(dense, *over)
    src, got, new = dense.state_dict(), moe.state_dict(), fresh.state_dict()
    for key in ("tok_emb.weight", "blocks.1.attn.wk.weight", "blocks.0.ffn_norm.weight", "norm.weight"):
        assert torch.equal(got[key], src[key]), key
    for i in (0, 1):
        p = f"blocks.{i}.ffn."
        for e in range(4):  # nn.Linear weights [F, D] -> input-major expert weights [D, F]
            assert torch.equal(got[p + "experts.w_gate"][e], src[p + "w_gate.weight"].t())
            assert torch.equal(got[p + "experts.w_up"][e], src[p + "w_up.weight"].t())
            assert torch.equal(got[p + "experts.w_down"][e], src[p + "w_down.weight"].t())
        for key in (p + "router.weight", p + "shared.w_up.weight", p + "shared.w_down.weight"):
            assert torch.equal(got[key], new[key]), key  # the fresh init of build_model (train.seed)


def test_layers_that_stay_dense_are_copied():
    over = ["model.moe.layers={kind: list, layers: [1]}", "model.dense_ffn={kind: swiglu, d_ff: 32}"]
    dense = _dense()
    moe = _upcycled(dense, *over)
    assert torch.equal(moe.blocks[0].ffn.w_up.weight, dense.blocks[0].ffn.w_up.weight)
    x = _tokens()
    torch.testing.assert_close(moe(x).logits_BSV, dense(x).logits_BSV, rtol=1e-5, atol=1e-5)


def test_granularity_splits_the_dense_ffn_into_slices():
    """m = 2: 8 experts of width 16; expert e holds hidden units [16 j, 16 j + 16) with j = e mod 2,
    so the two slices of one copy add up to the dense FFN."""
    dense = _dense()
    moe = _upcycled(dense, "model.moe.granularity=2", granularity=2)
    ex, ffn = moe.blocks[0].ffn.experts, dense.blocks[0].ffn
    assert (ex.num_experts, ex.d_ff) == (8, 16)
    for e in range(8):
        j = e % 2
        assert torch.equal(ex.w_up[e], ffn.w_up.weight[16 * j : 16 * j + 16].t())
        assert torch.equal(ex.w_down[e], ffn.w_down.weight[:, 16 * j : 16 * j + 16].t())
    x_ND = torch.randn(5, 32)
    halves = sum(mlp(x_ND, ex.w_gate[e], ex.w_up[e], ex.w_down[e]) for e in (2, 3))
    torch.testing.assert_close(halves, ffn(x_ND), rtol=1e-5, atol=1e-6)


def test_noise_is_multiplicative_seeded_and_per_expert():
    dense = _dense()
    w = dense.blocks[0].ffn.w_up.weight.t()
    noisy = _upcycled(dense, noise=0.05, seed=1).blocks[0].ffn.experts.w_up.detach()
    again = _upcycled(dense, noise=0.05, seed=1).blocks[0].ffn.experts.w_up.detach()
    other = _upcycled(dense, noise=0.05, seed=2).blocks[0].ffn.experts.w_up.detach()
    exact = _upcycled(dense, noise=0.0, seed=1).blocks[0].ffn.experts.w_up.detach()
    assert torch.equal(noisy, again) and not torch.equal(noisy, other)
    assert all(torch.equal(exact[e], w) for e in range(4))
    ratio = noisy / w  # 1 + 0.05 * N(0, 1), independently for every expert and element
    assert ratio.mean().item() == pytest.approx(1.0, abs=0.01)
    assert ratio.std().item() == pytest.approx(0.05, rel=0.1)
    assert not torch.equal(noisy[0], noisy[1])


# --- mistakes -------------------------------------------------------------------------------------------


def _error(source: dict, *overrides: str) -> list[tuple[str, str]]:
    with pytest.raises(SpecError) as err:
        upcycle(build_model(_spec(*overrides)), source)
    return _issues(err)


def test_dense_d_ff_must_equal_the_experts_d_ff():
    issues = _error(_dense("model.dense_ffn.d_ff=64").state_dict())
    assert {path for path, _ in issues} == {"train.init.checkpoint"}
    assert "blocks.0.ffn.w_gate.weight" in issues[0][1] and "experts.d_ff (32)" in issues[0][1]


def test_a_checkpoint_of_another_shape_names_the_key():
    issues = _error(_dense("model.d_model=64", "model.moe=null").state_dict())
    assert any("'tok_emb.weight' is (256, 64) in the checkpoint, (256, 32) here" in m for _, m in issues)
    issues = _error(_dense("model.n_layers=3").state_dict())
    assert any("keys this model lacks" in m and "blocks.2." in m for _, m in issues)
    issues = _error(_dense().state_dict(), "model.n_layers=3")
    assert any("no 'blocks.2.attn_norm.weight'" in m for _, m in issues)


def test_the_source_layer_must_be_dense():
    moe = build_model(_spec()).state_dict()
    issues = _error(moe)
    assert any("'blocks.0.ffn' is an MoE layer in the checkpoint" in m for _, m in issues)


def test_gated_and_plain_ffns_do_not_mix():
    issues = _error(_dense().state_dict(), "model.moe.experts={kind: relu, d_ff: 32}")
    assert any("gated" in m and "model.moe.experts.kind" in m for _, m in issues)
    relu = _dense("model.dense_ffn={kind: relu, d_ff: 32}").state_dict()
    issues = _error(relu)
    assert any("no 'blocks.0.ffn.w_gate.weight'" in m for _, m in issues)


def test_an_untied_head_cannot_go_into_a_tied_model():
    issues = _error(_dense("model.tie_embeddings=false").state_dict())
    assert any("tie_embeddings" in m for _, m in issues)
    # the other way round is an initialisation like any other: the tied table is copied into both
    _upcycled(_dense(), "model.tie_embeddings=false")


# --- reading checkpoints -----------------------------------------------------------------------------


def test_reads_a_state_dict_a_lightning_checkpoint_and_a_run_directory(tmp_path):
    sd = _dense().state_dict()
    torch.save(sd, tmp_path / "dense.pt")
    run_dir = tmp_path / "runs" / "dense" / "20260101"
    (run_dir / "checkpoints").mkdir(parents=True)
    lightning = {"state_dict": {f"model.{k}": v for k, v in sd.items()}, "global_step": 7, "epoch": 0}
    torch.save(lightning, run_dir / "checkpoints" / "last.ckpt")
    for path in (tmp_path / "dense.pt", run_dir / "checkpoints" / "last.ckpt", run_dir):
        got = load_state_dict(str(path))
        assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) for k in sd)


def test_unreadable_checkpoints_are_spec_errors(tmp_path):
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    torch.save({"step": 3}, tmp_path / "odd.pt")
    (tmp_path / "empty_dir").mkdir()
    for path, words in [
        (tmp_path / "missing.ckpt", "no such file"),
        (tmp_path / "notes.txt", "not a readable torch checkpoint"),
        (tmp_path / "odd.pt", "neither a moeplat checkpoint nor a state_dict"),
        (tmp_path / "empty_dir", "without checkpoints/last.ckpt"),
    ]:
        with pytest.raises(SpecError) as err:
            load_state_dict(str(path))
        ((field, message),) = _issues(err)
        assert field == "train.init.checkpoint" and words in message


def test_upcycle_from_spec(tmp_path):
    dense = _dense()
    torch.save(dense.state_dict(), tmp_path / "dense.pt")
    spec = _spec(f"train.init={{kind: upcycle, checkpoint: {tmp_path / 'dense.pt'}, noise: 0.0}}")
    model = build_model(spec)
    assert upcycle_from_spec(spec, model)
    x = _tokens()
    torch.testing.assert_close(model.eval()(x).logits_BSV, dense(x).logits_BSV, rtol=1e-5, atol=1e-5)
    scratch = build_model(_spec())
    before = [p.detach().clone() for p in scratch.parameters()]
    assert not upcycle_from_spec(_spec(), scratch)
    assert all(torch.equal(a, b) for a, b in zip(before, scratch.parameters(), strict=True))


def test_the_quickstart_spec_pair_fits_together(tmp_path, monkeypatch):
    """specs/quickstart-upcycled.yaml takes the newest run under runs/quickstart-dense: a dense
    quickstart checkpoint fits it (slices of width 128 of the d_ff-512 FFN), and it validates
    without one (the file is read when the run starts)."""
    specs = Path(__file__).resolve().parents[2] / "specs"
    upcycled = load_spec(specs / "quickstart-upcycled.yaml").spec
    dense = build_model(load_spec(specs / "quickstart-dense.yaml").spec)
    monkeypatch.chdir(tmp_path)
    for stamp in ("20260101-000000", "20260102-000000"):  # two runs: the newer one is taken
        (tmp_path / "runs" / "quickstart-dense" / stamp / "checkpoints").mkdir(parents=True)
    newest = tmp_path / "runs" / "quickstart-dense" / "20260102-000000" / "checkpoints" / "last.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in dense.state_dict().items()}}, newest)
    older = newest.parents[2] / "20260101-000000" / "checkpoints" / "last.ckpt"
    torch.save(build_model(upcycled).state_dict(), older)  # an MoE checkpoint: would be an error
    moe = build_model(upcycled)
    assert upcycle_from_spec(upcycled, moe)
    ex, ffn = moe.blocks[2].ffn.experts, dense.blocks[2].ffn
    assert (ex.num_experts, ex.d_ff) == (16, 128)
    assert torch.equal(ex.w_up[5], ffn.w_up.weight[128:256].t())  # expert 5 holds slice 5 mod 4 = 1
