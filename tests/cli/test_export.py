"""`moeplat export` / `moeplat import` on a tiny trained run: transformers reads the export and
computes moeplat's logits, moeplat's own safetensors file reads back, the imported spec starts a
run from the checkpoint with transformers' logits, and bad input is refused without leftovers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moeplat.cli.main import main
from moeplat.evaluate import export as export_mod
from moeplat.evaluate.load import load_trained
from moeplat.spec import load_spec
from moeplat.train.run import run

pytestmark = pytest.mark.slow

TINY = Path(__file__).resolve().parents[1] / "fixtures" / "tiny.yaml"


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    loaded = load_spec(TINY, ["tracking.system_metrics=false", "train.max_steps=4", "train.val_every=4"])
    result = run(loaded, runs_root=tmp / "runs", tracking_uri=uri, progress=False)
    return result, uri


def _cli(capsys, *args) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def _logits(model, idx_BS):
    with torch.no_grad():
        return model(idx_BS).logits_BSV


IDX = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))


def test_safetensors_export_reads_back_as_the_same_model(finished, tmp_path, capsys):
    result, uri = finished
    out = tmp_path / "st"
    code, stdout, err = _cli(
        capsys, "export", result.run_id, "--tracking-uri", uri, "--format", "safetensors", "-o", str(out)
    )
    assert code == 0, err
    assert "moeplat safetensors" in stdout and (out / "model.safetensors").is_file()
    original = load_trained(result.run_id, uri)
    again = load_trained(str(out))
    assert again.spec == original.spec and again.run_id == result.run_id
    torch.testing.assert_close(_logits(again.model, IDX), _logits(original.model, IDX), rtol=0, atol=0)
    also = load_trained(str(out / "model.safetensors"))  # the file alone carries its spec
    assert also.meta["step"] == original.meta["step"] == 4


def test_export_refuses_an_existing_target_and_replaces_it_with_force(finished, tmp_path, capsys):
    result, uri = finished
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    code, _, err = _cli(
        capsys, "export", result.run_id, "--tracking-uri", uri, "--format", "safetensors", "-o", str(out)
    )
    assert code == 2 and "exists" in err and "--force" in err and (out / "keep.txt").exists()
    code, _, err = _cli(
        capsys,
        "export",
        result.run_id,
        "--tracking-uri",
        uri,
        "--format",
        "safetensors",
        "-o",
        str(out),
        "--force",
    )
    assert code == 0, err
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]  # no partial or old directory left


def test_an_interrupted_export_leaves_nothing_behind(finished, tmp_path, monkeypatch):
    result, uri = finished
    loaded = load_trained(result.run_id, uri)

    def boom(*_args, **_kw):
        raise KeyboardInterrupt

    monkeypatch.setattr("safetensors.torch.save_model", boom)
    with pytest.raises(KeyboardInterrupt):
        export_mod.export_safetensors(loaded, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_export_of_an_unknown_run_or_path_is_a_usage_error(finished, tmp_path, capsys):
    _, uri = finished
    code, _, err = _cli(
        capsys, "export", "0123456789abcdef", "--tracking-uri", uri, "-o", str(tmp_path / "x")
    )
    assert code == 2 and "no run '0123456789abcdef'" in err
    code, _, err = _cli(capsys, "export", str(tmp_path / "nothing" / "here.ckpt"), "-o", str(tmp_path / "x"))
    assert code == 2 and "no such file" in err
    assert not (tmp_path / "x").exists()


def test_a_run_directory_and_its_checkpoint_load_the_run_s_final_weights(finished):
    result, uri = finished
    by_id = load_trained(result.run_id, uri)
    for ref in (result.run_dir, str(Path(result.run_dir) / "checkpoints" / "last.ckpt")):
        by_path = load_trained(ref)
        assert by_path.run_id == result.run_id and by_path.meta["step"] == 4
        torch.testing.assert_close(_logits(by_path.model, IDX), _logits(by_id.model, IDX), rtol=0, atol=0)


def test_hf_export_reads_back_in_transformers_and_imports_into_a_run(finished, tmp_path, capsys):
    import transformers

    from moeplat.compile.hf_init import init_from_hf
    from moeplat.compile.model import build_model
    from moeplat.interop.hf_model import hf_logits

    result, uri = finished
    out = tmp_path / "hf"
    code, stdout, err = _cli(capsys, "export", result.run_id, "--tracking-uri", uri, "-o", str(out), "--json")
    assert code == 0, err
    info = json.loads(stdout)
    assert info["family"] == "mixtral" and info["max_abs_logit_diff"] < 1e-5 and info["step"] == 4
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 0
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert hf_tok("déf f():", add_special_tokens=False)["input_ids"] == list("déf f():".encode())
    original = load_trained(result.run_id, uri)
    torch.testing.assert_close(hf_logits(out, IDX), _logits(original.model, IDX), rtol=0, atol=1e-5)

    spec_file = tmp_path / "imported.yaml"
    code, _, err = _cli(capsys, "import", str(out), "-o", str(spec_file))
    assert code == 0, err
    spec = load_spec(spec_file).spec
    assert spec.train.init.kind == "hf" and spec.data.tokenizer.kind == "byte"
    model = build_model(spec)
    assert init_from_hf(spec, model)
    torch.testing.assert_close(_logits(model.eval(), IDX), _logits(original.model, IDX), rtol=0, atol=0)
    short = [
        "train.max_steps=2",
        "train.val_every=2",
        "train.schedule.warmup_steps=1",
        "data.source.max_bytes=400000",
        "data.val_tokens=1024",
    ]
    loaded = load_spec(spec_file, [*short, "tracking.system_metrics=false"])
    again = run(loaded, runs_root=tmp_path / "runs", tracking_uri=uri, progress=False)
    # it continued the checkpoint (val loss 5.2 after 4 steps), not a fresh start (ln 256 = 5.55)
    assert again.steps == 2 and again.val_loss == pytest.approx(result.val_loss, abs=0.05)

    code, _, err = _cli(capsys, "import", str(out), "-o", str(spec_file))
    assert code == 2 and "exists" in err
    code, _, err = _cli(capsys, "import", str(tmp_path), "-o", str(tmp_path / "x.yaml"))
    assert code == 2 and "no config.json" in err


def test_train_init_hf_refuses_a_spec_whose_model_differs(finished, tmp_path, capsys):
    from moeplat.errors import SpecError

    result, uri = finished
    out = tmp_path / "hf"
    assert _cli(capsys, "export", result.run_id, "--tracking-uri", uri, "-o", str(out))[0] == 0
    spec_file = tmp_path / "imported.yaml"
    assert _cli(capsys, "import", str(out), "-o", str(spec_file))[0] == 0
    from moeplat.compile.hf_init import init_from_hf
    from moeplat.compile.model import build_model

    spec = load_spec(spec_file, ["model.moe.top_k=1", "model.rope_theta=500000.0"]).spec
    with pytest.raises(SpecError) as e:
        init_from_hf(spec, build_model(spec))
    text = str(e.value)
    assert "train.init.path" in text and "model.moe.top_k: spec has 1, checkpoint has 2" in text
    assert "model.rope_theta" in text
    same = ["model.moe.layers={kind: list, layers: [0, 1]}", "model.moe.router.logits_precision=float32"]
    spec = load_spec(spec_file, same).spec  # the same model written another way is accepted
    assert init_from_hf(spec, build_model(spec))
    with pytest.raises(SpecError, match=r"no config\.json"):
        load_spec(spec_file, [f"train.init.path={tmp_path}"])


def test_a_dense_transformers_checkpoint_upcycles_into_an_moe_model_with_its_function(tmp_path, capsys):
    """Sparse upcycling from a dense Llama export: top-1 experts that copy the dense FFN compute
    the dense model's logits at step 0."""
    from moeplat.compile.hf_init import init_from_hf
    from moeplat.compile.model import build_model
    from moeplat.data.tokenizers import ByteTok
    from moeplat.evaluate.load import LoadedModel

    dense = load_spec(TINY, ["model.moe=null", "model.dense_ffn={kind: swiglu, d_ff: 64}"])
    model = build_model(dense.spec).eval()
    loaded = LoadedModel(dense.spec, model, ByteTok(), {"step": 0}, source="dense", resolved=dense.resolved)
    assert export_mod.export_hf(loaded, tmp_path / "llama")["family"] == "llama"
    spec_file = tmp_path / "moe.yaml"
    code, _, err = _cli(
        capsys,
        "import",
        str(tmp_path / "llama"),
        "-o",
        str(spec_file),
        "--upcycle",
        "--num-experts",
        "4",
        "--top-k",
        "1",
    )
    assert code == 0, err
    spec = load_spec(spec_file).spec
    assert spec.model.moe.num_experts == 4 and spec.train.init.upcycle
    moe = build_model(spec)
    assert init_from_hf(spec, moe)
    torch.testing.assert_close(_logits(moe.eval(), IDX), _logits(model, IDX), rtol=1e-5, atol=1e-5)
    code, _, err = _cli(
        capsys, "import", str(tmp_path / "llama"), "-o", str(tmp_path / "y.yaml"), "--upcycle"
    )
    assert code == 2 and "--num-experts" in err


def test_a_spec_no_family_expresses_is_refused_naming_each_feature(tmp_path):
    from moeplat.compile.model import build_model
    from moeplat.data.tokenizers import ByteTok
    from moeplat.evaluate.load import LoadedModel

    odd = load_spec(
        TINY,
        [
            "model.moe.router={kind: hash}",
            "model.moe.top_k=1",
            "model.moe.losses={}",
            "model.moe.capacity={kind: factor}",
        ],
    )
    loaded = LoadedModel(odd.spec, build_model(odd.spec), ByteTok(), {"step": 0}, resolved=odd.resolved)
    with pytest.raises(export_mod.ExportError) as e:
        export_mod.export_hf(loaded, tmp_path / "out")
    assert "model.moe.router.kind: hash" in str(e.value) and "model.moe.capacity" in str(e.value)
    assert list(tmp_path.iterdir()) == []
