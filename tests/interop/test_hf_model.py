"""moeplat.interop.hf_model: whole models to and from transformers' causal-LM families (no downloads).

Each family: a tiny moeplat model built from a spec, every tensor random (norms and biases too, so
a swapped tensor shows), exported: transformers' logits equal moeplat's to 1e-5 in float32; the
round trip to_hf -> model_section -> build_model -> from_hf gives back every tensor; read_hf_dir
reads what save_pretrained wrote (one file or shards). And the other way: a random transformers
model of each family, imported, computes its logits.
"""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moeplat.compile.model import build_model  # noqa: E402
from moeplat.interop.hf_model import (  # noqa: E402
    FAMILIES,
    Unsupported,
    choose_family,
    hf_logits,
    read_hf_dir,
    to_hf_model,
)
from moeplat.spec import validate  # noqa: E402

V, D, S = 256, 32, 16  # the byte tokenizer of the spec needs 256 ids
BASE = {"vocab_size": V, "d_model": D, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 32}
BASE |= {"rope_theta": 500.0, "norm_eps": 1e-6, "tie_embeddings": False}
MOE = {"num_experts": 4, "top_k": 2, "experts": {"kind": "swiglu", "d_ff": 24}}
GQA = {"kind": "gqa"}
# float32 logits of magnitude ~5-10 agree to ~1e-5: moeplat's RoPE tables come from float64 angles,
# transformers' from float32 ones (the largest part of the difference, more with rope_theta 1e6)
TOL = {"rtol": 1e-5, "atol": 1e-5}

# family -> the model section of a spec it must compute exactly
SECTIONS = {
    "llama": BASE | {"dense_ffn": {"kind": "swiglu", "d_ff": 40}, "tie_embeddings": True},
    "qwen2": BASE | {"attention": GQA | {"qkv_bias": True}, "dense_ffn": {"kind": "geglu", "d_ff": 40}},
    "mixtral": BASE | {"moe": MOE | {"losses": {"load_balancing": {"coef": 0.02}, "z_loss": {"coef": 1e-3}}}},
    "olmoe": BASE
    | {"attention": GQA | {"qk_norm": True}, "moe": MOE | {"router": {"kind": "topk", "normalize": False}}},
    "qwen2_moe": BASE
    | {
        "attention": GQA | {"qkv_bias": True},
        "dense_ffn": {"kind": "swiglu", "d_ff": 40},
        "moe": MOE
        | {
            "layers": {"kind": "list", "layers": [1]},
            "shared_experts": {"count": 2, "d_ff": 12, "gate": True},
            "router": {"kind": "topk", "normalize": False},
        },
    },
    "qwen3_moe": BASE
    | {
        "attention": GQA | {"qk_norm": "head", "head_dim": 12},
        "moe": MOE | {"layers": {"kind": "first_dense", "k": 1}},
    }
    | {"dense_ffn": {"kind": "swiglu", "d_ff": 40}},
}


def _spec(model: dict):
    return validate(
        {
            "name": "interop",
            "model": model,
            "data": {"source": {"kind": "python_stdlib"}, "tokenizer": {"kind": "byte"}, "seq_len": S},
            "train": {"max_steps": 1, "batch_size": 2, "optimizer": {"kind": "adamw", "lr": 1e-3}},
        }
    )


def _randomised(model_section: dict, seed: int = 0):
    model = build_model(_spec(model_section))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if p.dim() == 1 else 0.0))
    return model.eval()


def _idx(seed: int = 1):
    return torch.randint(0, V, (2, S), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", SECTIONS)
def test_export_computes_the_same_logits(family):
    model = _randomised(SECTIONS[family])
    assert choose_family(model).name == family
    config, hf = to_hf_model(model)
    assert config.model_type == family and not hf.training
    idx = _idx()
    with torch.no_grad():
        ours, theirs = model(idx).logits_BSV, hf(idx).logits
    assert ours.abs().max() > 1.0  # random weights give logits far from 0
    torch.testing.assert_close(theirs, ours, **TOL)


@pytest.mark.parametrize("family", SECTIONS)
def test_round_trip_gives_back_every_tensor(family, tmp_path):
    model = _randomised(SECTIONS[family])
    fam = FAMILIES[family]
    config, hf = to_hf_model(model)
    section = fam.model_section(config.to_dict())
    fresh = build_model(_spec(section))
    fam.from_hf(fresh, fam.to_hf(model))
    _assert_same_tensors(fresh, model)
    # save_pretrained writes the hub layout (one tensor per expert); read_hf_dir fuses it back
    for shard in (None, "20KB"):
        out = tmp_path / f"{family}-{shard}"
        hf.save_pretrained(out, **({"max_shard_size": shard} if shard else {}))
        assert (out / "model.safetensors.index.json").is_file() == (shard is not None)
        read_family, read_config, weights = read_hf_dir(out)
        assert read_family is fam and read_config["model_type"] == family
        again = build_model(_spec(fam.model_section(read_config)))
        fam.from_hf(again, weights)
        _assert_same_tensors(again, model)


def _assert_same_tensors(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("family", SECTIONS)
def test_import_computes_transformers_logits(family):
    """A transformers model of the family with random weights, imported into moeplat."""
    source = _randomised(SECTIONS[family], seed=3)
    config, _ = to_hf_model(source)
    hf = getattr(transformers, FAMILIES[family].model_class)(config).eval()  # its own random init
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    section = FAMILIES[family].model_section(config.to_dict())
    model = build_model(_spec(section)).eval()
    FAMILIES[family].from_hf(model, hf.state_dict())
    idx = _idx(2)
    with torch.no_grad():
        torch.testing.assert_close(model(idx).logits_BSV, hf(idx).logits, **TOL)


def test_mixtral_balancing_coefficient_is_converted():
    model = _randomised(SECTIONS["mixtral"])
    config, _ = to_hf_model(model)
    assert config.router_aux_loss_coef == pytest.approx(0.02 / 2)  # transformers' loss is top_k x moeplat's
    section = FAMILIES["mixtral"].model_section(config.to_dict())
    assert section["moe"]["losses"] == {"load_balancing": {"coef": pytest.approx(0.02)}}
    assert section["moe"]["router"]["logits_precision"] == "input"


def test_unsupported_lists_every_feature_in_spec_terms():
    section = copy.deepcopy(SECTIONS["mixtral"])
    section["moe"] |= {
        "router": {"kind": "hash"},
        "top_k": 1,
        "losses": {},
        "capacity": {"kind": "factor", "train": 1.0, "eval": 1.0},
        "experts": {"kind": "relu", "d_ff": 24},
    }
    model = build_model(_spec(section))
    with pytest.raises(Unsupported) as err:
        choose_family(model)
    features = err.value.features
    assert err.value.family == "mixtral"
    assert any(f.startswith("model.moe.router.kind: hash") for f in features)
    assert any(f.startswith("model.moe.capacity.kind: factor") for f in features)
    assert any(f.startswith("model.moe.experts.kind: relu") for f in features)
    assert str(err.value).count("\n") == len(features)  # one feature a line
    with pytest.raises(Unsupported, match=r"router\.kind: hash"):
        to_hf_model(model, "mixtral")


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"dropout": 0.1}, "model.dropout: 0.1"),
        ({"attention": GQA | {"qk_norm": "head"}}, "model.attention.qk_norm: head"),
        ({"moe": MOE | {"num_experts": [4, 8], "top_k": 2}}, "model.moe.num_experts: [4, 8]"),
        ({"moe": MOE | {"router": {"kind": "topk", "jitter_eps": 0.1}}}, "model.moe.router.jitter_eps: 0.1"),
        ({"moe": MOE | {"shared_experts": {"count": 1}}}, "model.moe.shared_experts.count"),
        (
            {"moe": MOE | {"router": {"kind": "topk", "normalize": False}}},
            "model.moe.router.normalize: false",
        ),
        (
            {"moe": MOE | {"router": {"kind": "topk", "null_experts": 2}}},
            "model.moe.router.null_experts: 2",
        ),
        ({"moe": MOE | {"router": {"kind": "top_p", "p": 0.5}}}, "model.moe.router.kind: top_p"),
    ],
)
def test_mixtral_names_what_it_cannot_compute(change, expected):
    model = build_model(_spec(SECTIONS["mixtral"] | change))
    problems = FAMILIES["mixtral"].problems(model)
    assert any(p.startswith(expected) for p in problems), problems


def test_mla_and_sinkhorn_name_their_spec_keys():
    mla = {"kind": "mla", "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8}
    section = SECTIONS["mixtral"] | {"attention": mla, "n_kv_heads": None}
    section["moe"] = MOE | {"router": {"kind": "sinkhorn"}}
    problems = FAMILIES["olmoe"].problems(build_model(_spec(section)))
    assert problems[0].startswith("model.attention.kind: mla")
    assert any(p.startswith("model.moe.router.kind: sinkhorn") for p in problems)


def test_import_refuses_what_moeplat_cannot_compute():
    config = transformers.OlmoeConfig(hidden_size=D, num_attention_heads=4, clip_qkv=8.0).to_dict()
    config["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}
    with pytest.raises(Unsupported) as err:
        FAMILIES["olmoe"].model_section(config)
    assert [f.split(":")[0] for f in err.value.features] == ["rope_parameters.rope_type", "clip_qkv"]
    mixtral = transformers.MixtralConfig(hidden_size=D, num_attention_heads=4, sliding_window=64).to_dict()
    with pytest.raises(Unsupported, match=r"sliding_window: 64"):
        FAMILIES["mixtral"].model_section(mixtral)


def test_from_hf_names_missing_and_misshapen_tensors():
    model = _randomised(SECTIONS["qwen2_moe"])
    weights = FAMILIES["qwen2_moe"].to_hf(model)
    del weights["model.layers.1.mlp.shared_expert_gate.weight"]
    weights["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(7)
    weights["model.layers.0.mlp.extra"] = torch.zeros(1)
    with pytest.raises(ValueError) as err:
        FAMILIES["qwen2_moe"].from_hf(build_model(_spec(SECTIONS["qwen2_moe"])), weights)
    msg = str(err.value)
    assert "missing tensor model.layers.1.mlp.shared_expert_gate.weight" in msg
    assert "model.layers.0.self_attn.q_proj.bias: the checkpoint's shape is (7,)" in msg
    assert "unexpected tensor model.layers.0.mlp.extra" in msg


def test_read_hf_dir_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        read_hf_dir(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(ValueError, match=r"model_type .gpt2.*supported: llama"):
        read_hf_dir(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(FileNotFoundError, match=r"no model\.safetensors"):
        read_hf_dir(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": {"a": "shard-1.safetensors"}}')
    with pytest.raises(FileNotFoundError, match=r"shard-1\.safetensors"):
        read_hf_dir(tmp_path)


def test_hf_logits_reads_a_saved_directory(tmp_path):
    model = _randomised(SECTIONS["qwen3_moe"])
    _, hf = to_hf_model(model)
    hf.save_pretrained(tmp_path)
    idx = _idx()
    with torch.no_grad():
        torch.testing.assert_close(hf_logits(tmp_path, idx), model(idx).logits_BSV, **TOL)


def test_multi_head_import_leaves_n_kv_heads_null():
    config = transformers.LlamaConfig(hidden_size=D, num_attention_heads=4, num_key_value_heads=4)
    section = FAMILIES["llama"].model_section(config.to_dict())
    assert section["n_kv_heads"] is None and "head_dim" not in section["attention"]
    assert _spec(section | {"vocab_size": V, "max_seq_len": 32}).model.kv_heads == 4


# transformers configs written directly (their defaults for everything else): the import direction
COMMON = {"vocab_size": V, "hidden_size": D, "num_hidden_layers": 3, "num_attention_heads": 4}
COMMON |= {
    "num_key_value_heads": 2,
    "max_position_embeddings": 32,
    "pad_token_id": None,
    "eos_token_id": None,
}
CONFIGS = {
    "llama": ("LlamaConfig", {"intermediate_size": 40, "tie_word_embeddings": True}),
    "qwen2": ("Qwen2Config", {"intermediate_size": 40, "hidden_act": "gelu"}),
    "mixtral": ("MixtralConfig", {"intermediate_size": 24, "num_local_experts": 4}),
    "olmoe": ("OlmoeConfig", {"intermediate_size": 24, "num_experts": 4, "num_experts_per_tok": 2}),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        {"intermediate_size": 40, "moe_intermediate_size": 16, "shared_expert_intermediate_size": 20}
        | {"num_experts": 4, "num_experts_per_tok": 2, "decoder_sparse_step": 2, "norm_topk_prob": True},
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        {"intermediate_size": 40, "moe_intermediate_size": 16, "num_experts": 4, "num_experts_per_tok": 3}
        | {"mlp_only_layers": [0], "head_dim": 12, "qkv_bias": False},
    ),
}


@pytest.mark.parametrize("family", CONFIGS)
def test_a_transformers_model_imports_with_its_logits(family):
    cls, kw = CONFIGS[family]
    config = getattr(transformers, cls)(**COMMON, **kw)
    torch.manual_seed(4)
    hf = getattr(transformers, FAMILIES[family].model_class)(config).eval()
    with torch.no_grad():  # transformers' init leaves norms at 1 and biases at 0: move them too
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    section = FAMILIES[family].model_section(config.to_dict())
    model = build_model(_spec(section)).eval()
    FAMILIES[family].from_hf(model, hf.state_dict())
    idx = _idx(5)
    with torch.no_grad():
        torch.testing.assert_close(model(idx).logits_BSV, hf(idx).logits, **TOL)
    assert choose_family(model).name == family
    if family == "qwen2_moe":  # decoder_sparse_step 2: layers 1 and 3 of 0..2 are MoE
        assert section["moe"]["layers"] == {"kind": "list", "layers": [1]}


def test_head_dim_rules_of_olmoe_and_llama():
    olmoe = SECTIONS["olmoe"] | {"attention": GQA | {"qk_norm": True, "head_dim": 12}}
    problems = FAMILIES["olmoe"].problems(build_model(_spec(olmoe)))
    assert problems == ["model.attention.head_dim: 12 (this family's head_dim is d_model / n_heads)"]
    llama = SECTIONS["llama"] | {"n_heads": 3, "n_kv_heads": 1, "attention": GQA | {"head_dim": 8}}
    problems = FAMILIES["llama"].problems(build_model(_spec(llama)))
    assert problems == ["model.n_heads: 3 (transformers needs d_model 32 divisible by it)"]


def test_a_dense_model_with_relu_is_closest_to_llama():
    model = build_model(_spec(SECTIONS["llama"] | {"dense_ffn": {"kind": "relu", "d_ff": 40}}))
    with pytest.raises(Unsupported) as err:
        choose_family(model)
    assert err.value.family == "llama"
    assert err.value.features == [
        "model.dense_ffn.kind: relu (transformers' families have gated MLPs: swiglu or geglu)"
    ]


def test_dense_and_expert_kinds_must_agree():
    section = SECTIONS["qwen3_moe"] | {"dense_ffn": {"kind": "geglu", "d_ff": 40}}
    problems = FAMILIES["qwen3_moe"].problems(build_model(_spec(section)))
    assert problems == [
        "model.dense_ffn.kind: geglu and model.moe.experts.kind: swiglu differ "
        "(transformers has one hidden_act for every MLP)"
    ]


def test_import_fills_in_what_a_config_json_leaves_out():
    """An older, minimal config.json: transformers' defaults and the legacy rope_theta key."""
    config = {"model_type": "mixtral", "vocab_size": V, "hidden_size": D, "num_attention_heads": 4}
    config |= {"num_hidden_layers": 2, "num_local_experts": 4, "intermediate_size": 24, "rope_theta": 1e6}
    config |= {"num_key_value_heads": 2}
    section = FAMILIES["mixtral"].model_section(config)
    assert section["rope_theta"] == 1e6 and section["norm_eps"] == 1e-5  # MixtralConfig's default
    assert section["moe"]["top_k"] == 2 and section["max_seq_len"] == 131072  # defaults too
    _spec(section | {"max_seq_len": 32})


@pytest.mark.parametrize(
    ("layers", "n", "selection"),
    [
        ([0, 1, 2, 3], 4, {"kind": "all"}),
        ([1, 2, 3], 4, {"kind": "first_dense", "k": 1}),
        ([1, 3, 5], 6, {"kind": "every", "n": 2, "offset": 1}),
        ([0, 3], 5, {"kind": "every", "n": 3, "offset": 0}),
        ([0, 3], 7, {"kind": "list", "layers": [0, 3]}),  # every 3rd would add layer 6
        ([0, 2], 4, {"kind": "every", "n": 2, "offset": 0}),
        ([1, 2], 4, {"kind": "list", "layers": [1, 2]}),
    ],
)
def test_layer_selection_is_the_plainest_that_says_it(layers, n, selection):
    from pydantic import TypeAdapter

    from moeplat.interop.hf_model_families import layer_selection
    from moeplat.spec.moe import LayerSelection, moe_layer_indices

    assert layer_selection(layers, n) == selection
    assert moe_layer_indices(TypeAdapter(LayerSelection).validate_python(selection), n) == layers


def test_a_bf16_model_exports_in_float32():
    model = _randomised(SECTIONS["qwen2_moe"]).to(torch.bfloat16)
    _, hf = to_hf_model(model)
    assert {p.dtype for p in hf.parameters()} == {torch.float32}
    weights = FAMILIES["qwen2_moe"].to_hf(model)
    for key, value in hf.state_dict().items():
        assert torch.equal(value, weights[key].float()), key
