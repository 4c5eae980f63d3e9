"""moeplat.interop.hf_deepseek against transformers' DeepseekV3ForCausalLM (tiny random models).

Export: a moeplat model with every tensor randomised (norms and the routing bias too, so a swapped
tensor shows) loads strictly into DeepseekV3ForCausalLM(DeepseekV3Config(**config(model))) and
gives the same logits in float32. Import: a random DeepseekV3ForCausalLM -> model_section ->
build_model -> from_hf gives the same logits. The round trip gives back identical tensors.
problems() and model_section() name what is in the way.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moeplat.compile.model import build_model  # noqa: E402
from moeplat.interop import hf_deepseek as ds  # noqa: E402
from moeplat.interop.hf_model import Unsupported, choose_family, read_hf_dir, to_hf_model  # noqa: E402
from moeplat.spec import load_spec, validate  # noqa: E402

TOL = 1e-5  # float32 (transformers computes the RoPE angles in float32 even for float64 models)
IDX = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))


def _model_section(q_lora_rank: int | None, tie: bool, normalize: bool, first_dense: int = 1) -> dict:
    return {
        "vocab_size": 256,
        "d_model": 32,
        "n_layers": 3,
        "n_heads": 4,
        "attention": {
            "kind": "mla",
            "kv_lora_rank": 16,
            "q_lora_rank": q_lora_rank,
            "qk_nope_head_dim": 8,
            "qk_rope_head_dim": 8,
            "v_head_dim": 12,
        },
        "max_seq_len": 32,
        "rope_theta": 5000.0,
        "norm_eps": 1e-6,
        "tie_embeddings": tie,
        "dense_ffn": {"kind": "swiglu", "d_ff": 48},
        "moe": {
            "num_experts": 8,
            "top_k": 2,
            "layers": {"kind": "first_dense", "k": first_dense},
            "router": {
                "kind": "sigmoid_bias",
                "n_groups": 4,
                "topk_groups": 2,
                "normalize": normalize,
                "scaling_factor": 2.5,
            },
            "experts": {"kind": "swiglu", "d_ff": 16},
            "shared_experts": {"count": 1},
        },
    }


def _build(model_section: dict):
    spec = validate(
        {
            "name": "deepseek-interop",
            "model": model_section,
            "data": {
                "source": {"kind": "python_stdlib", "max_bytes": 1000},
                "tokenizer": {"kind": "byte"},
                "seq_len": 16,
            },
            "train": {"max_steps": 1, "batch_size": 1, "optimizer": {"kind": "adamw", "lr": 1e-3}},
        }
    )
    return build_model(spec).eval()


@torch.no_grad()
def _randomise(module: torch.nn.Module, seed: int) -> None:
    """Every tensor of the state dict: norms around 1, the routing bias on the scale of the
    sigmoid scores (so it changes which experts are chosen), weights N(0, 0.1)."""
    g = torch.Generator().manual_seed(seed)
    for name, t in module.state_dict().items():
        noise = torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype)
        if name.endswith("norm.weight"):
            t.copy_(1 + 0.2 * noise)
        else:
            t.copy_(0.1 * noise)


def _hf_model(config: dict):
    hf = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**config))
    return hf.eval()


CASES = [(12, False, True), (None, True, False)]  # q_lora_rank, tied embeddings, norm_topk_prob


@pytest.mark.parametrize(("q_lora_rank", "tie", "normalize"), CASES)
def test_export_computes_the_same_logits(q_lora_rank, tie, normalize):
    model = _build(_model_section(q_lora_rank, tie, normalize))
    _randomise(model, seed=0)
    assert ds.problems(model) == []
    hf = _hf_model(ds.config(model))
    hf.load_state_dict(ds.to_hf(model), strict=True)
    assert (hf.lm_head.weight is hf.model.embed_tokens.weight) == tie
    with torch.no_grad():
        ours, theirs = model(IDX).logits_BSV, hf(IDX).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=TOL)


def test_the_rope_rows_are_permuted_for_the_interleaved_layout():
    """Export writes rope_interleave=True with permuted RoPE rows: read as rotate-half
    (rope_interleave=False) the same tensors compute something else."""
    model = _build(_model_section(12, False, True))
    _randomise(model, seed=1)
    config = ds.config(model)
    assert config["rope_interleave"] is True
    hf = _hf_model({**config, "rope_interleave": False})
    hf.load_state_dict(ds.to_hf(model), strict=True)
    with torch.no_grad():
        assert (hf(IDX).logits - model(IDX).logits_BSV).abs().max() > 1e-3


@pytest.mark.parametrize(("q_lora_rank", "tie", "normalize"), CASES)
def test_round_trip_gives_identical_tensors(q_lora_rank, tie, normalize):
    model = _build(_model_section(q_lora_rank, tie, normalize))
    _randomise(model, seed=2)
    config = transformers.DeepseekV3Config(**ds.config(model)).to_dict()
    back = _build(ds.model_section(config))
    ds.from_hf(back, ds.to_hf(model))
    ours, theirs = model.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    assert (
        back.blocks[2].ffn.router.scaling_factor == 2.5 and back.blocks[2].ffn.router.normalize == normalize
    )


@pytest.mark.parametrize("q_lora_rank", [None, 12])
def test_import_computes_the_same_logits(q_lora_rank):
    config = transformers.DeepseekV3Config(
        vocab_size=256,
        hidden_size=32,
        intermediate_size=40,
        moe_intermediate_size=12,
        num_hidden_layers=3,
        num_attention_heads=4,  # num_key_value_heads left at its default (128): MLA ignores it
        n_shared_experts=2,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        first_k_dense_replace=2,
        routed_scaling_factor=1.5,
        kv_lora_rank=16,
        q_lora_rank=q_lora_rank,
        qk_rope_head_dim=8,
        qk_nope_head_dim=4,
        v_head_dim=8,
        max_position_embeddings=32,
        rope_parameters={"rope_type": "default", "rope_theta": 20000.0},
    )
    hf = transformers.DeepseekV3ForCausalLM(config).eval()
    _randomise(hf, seed=4)
    model = _build(ds.model_section(config.to_dict()))
    ds.from_hf(model, hf.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(IDX).logits_BSV, hf(IDX).logits, rtol=0, atol=TOL)


def test_from_hf_names_every_missing_and_stray_tensor_but_skips_mtp_layers():
    model = _build(_model_section(None, False, True))
    state = ds.to_hf(model)
    ds.from_hf(model, {**state, "model.layers.3.eh_proj.weight": torch.zeros(1)})  # MTP: skipped
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = {
        k: torch.zeros_like(v)
        for k, v in state.items()
        if k != "model.layers.2.mlp.gate.e_score_correction_bias"
    }
    bad["model.layers.0.mlp.extra.weight"] = torch.zeros(1)
    bad["model.layers.1.self_attn.kv_b_proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError) as err:
        ds.from_hf(model, bad)
    for name in (
        "missing tensor model.layers.2.mlp.gate.e_score_correction_bias",
        "unexpected tensor model.layers.0.mlp.extra.weight",
        "model.layers.1.self_attn.kv_b_proj.weight: the checkpoint's shape is (3, 3)",
    ):
        assert name in str(err.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing copied


def test_a_dense_mla_model_exports_and_comes_back():
    section = _model_section(12, False, True)
    del section["moe"]
    model = _build(section)
    _randomise(model, seed=5)
    config = ds.config(model)
    assert config["first_k_dense_replace"] == 3
    hf = _hf_model(config)
    hf.load_state_dict(ds.to_hf(model), strict=True)
    back = _build(ds.model_section(hf.config.to_dict()))
    ds.from_hf(back, hf.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(hf(IDX).logits, model(IDX).logits_BSV, rtol=0, atol=TOL)
        assert torch.equal(back(IDX).logits_BSV, model(IDX).logits_BSV)


def test_hf_model_chooses_deepseek_v3_and_reads_back_what_save_pretrained_wrote(tmp_path):
    """The registry end to end: choose_family, to_hf_model, save_pretrained (experts one tensor
    each on disk), read_hf_dir, model_section, from_hf."""
    model = _build(_model_section(12, True, True))
    _randomise(model, seed=6)
    assert choose_family(model).name == "deepseek_v3"
    _, hf = to_hf_model(model)
    hf.save_pretrained(tmp_path)
    family, config_json, weights = read_hf_dir(tmp_path)
    back = _build(family.model_section(config_json))
    family.from_hf(back, weights)
    with torch.no_grad():
        torch.testing.assert_close(hf(IDX).logits, model(IDX).logits_BSV, rtol=0, atol=TOL)
        assert torch.equal(back(IDX).logits_BSV, model(IDX).logits_BSV)


def test_problems_name_each_feature_in_the_way():
    """A softmax top-k router with GQA attention, MoE on every other layer, plain GELU experts."""
    section = _model_section(None, False, True) | {"n_kv_heads": 2, "attention": {"kind": "gqa"}}
    section["moe"] = {
        "num_experts": 8,
        "top_k": 2,
        "layers": {"kind": "every", "n": 2, "offset": 0},
        "router": {"kind": "topk"},
        "experts": {"kind": "gelu", "d_ff": 16},
    }
    found = ds.problems(_build(section))
    for expected in (
        "model.attention.kind: gqa",
        "model.moe.layers: MoE layers [0, 2]",
        "MLP kind gelu",
        "model.moe.router.kind: topk",
    ):
        assert any(line.startswith(expected) for line in found), (expected, found)
    assert len(found) == 4, found
    with pytest.raises(Unsupported, match="router kind sigmoid_bias"):
        ds.config(_build(section))


def test_problems_of_a_sigmoid_bias_model():
    section = _model_section(None, False, True) | {"norm_eps": 1e-5, "dropout": 0.1}
    section["moe"] |= {
        "capacity": {"kind": "factor"},
        "shared_experts": {"count": 1, "d_ff": 24, "gate": True},
    }
    section["moe"]["router"]["jitter_eps"] = 0.01
    section["moe"]["experts"]["dropout"] = 0.1
    found = ds.problems(_build(section))
    for expected in (
        "model.norm_eps: 1e-05",
        "model.dropout: 0.1",
        "model.moe.router.jitter_eps: 0.01",
        "model.moe.experts.dropout: 0.1",
        "model.moe.capacity.kind: factor",
        "model.moe.shared_experts.d_ff",
        "model.moe.shared_experts.gate: true",
    ):
        assert any(line.startswith(expected) for line in found), (expected, found)
    assert len(found) == 7, found


def test_model_section_refuses_what_moeplat_cannot_compute():
    config = transformers.DeepseekV3Config(
        num_attention_heads=4,
        num_key_value_heads=4,
        rope_interleave=False,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0},
        attention_bias=True,
    ).to_dict()
    config["quantization_config"] = {"quant_method": "fp8"}
    with pytest.raises(Unsupported) as err:
        ds.model_section(config)
    features = " ".join(err.value.features)
    for name in ("rope_type: yarn", "rope_interleave: false", "attention_bias", "quantization_config: fp8"):
        assert name in features


def test_the_reference_deepseek_v3_spec_shrunk_is_exactly_deepseek_v3():
    """specs/reference/deepseek-v3.yaml at toy sizes (structure untouched) exports with no problem."""
    shrink = [
        "model.vocab_size=256",
        "model.d_model=32",
        "model.n_layers=3",
        "model.n_heads=4",
        "model.max_seq_len=32",
        "model.attention={kind: mla, kv_lora_rank: 16, q_lora_rank: 12, qk_nope_head_dim: 8,"
        " qk_rope_head_dim: 8, v_head_dim: 8}",
        "model.dense_ffn.d_ff=48",
        "model.moe.num_experts=8",
        "model.moe.top_k=2",
        "model.moe.layers.k=1",
        "model.moe.router.n_groups=4",
        "model.moe.router.topk_groups=2",
        "model.moe.experts.d_ff=16",
        "data.seq_len=16",
    ]
    path = Path(__file__).resolve().parents[2] / "specs" / "reference" / "deepseek-v3.yaml"
    model = build_model(load_spec(path, shrink).spec).eval()
    assert ds.problems(model) == []
    config = ds.config(model)
    assert (config["first_k_dense_replace"], config["n_group"], config["n_shared_experts"]) == (1, 4, 1)
