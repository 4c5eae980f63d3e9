"""`data.tokenizer.kind: hf` (a tokenizer.json, a transformers directory, a Hub name in the local
cache) and `model.vocab_size: auto` / `vocab_multiple`, checked when the spec is validated."""

from __future__ import annotations

from pathlib import Path

import pytest

from moeplat.compile.tokenizer import build_tokenizer
from moeplat.data.corpus import python_stdlib_documents
from moeplat.data.tokenizers import load_tokenizer_file, train_bpe
from moeplat.errors import SpecError
from moeplat.spec import load_spec

TINY = Path(__file__).resolve().parents[1] / "fixtures" / "tiny.yaml"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real BPE of 600 ids (specials <pad>, </s>), saved as a plain tokenizer.json."""
    tmp = tmp_path_factory.mktemp("hf")
    docs = python_stdlib_documents(max_bytes=200_000)
    tok = train_bpe(docs, vocab_size=600, special_tokens=["<pad>", "</s>"], cache_dir=tmp / "cache")
    return tok, tok.save(tmp / "plain")


def _spec(tmp_path: Path, tokenizer: str, model: str = "") -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(f"extends: {TINY}\nmodel:\n  vocab_size: auto\n{model}data:\n  tokenizer: {tokenizer}\n")
    return path


def test_relative_path_resolves_against_the_spec_file(trained, tmp_path, monkeypatch):
    _, file = trained
    (tmp_path / "tok.json").write_bytes(file.read_bytes())
    monkeypatch.chdir("/")
    loaded = load_spec(_spec(tmp_path, "{kind: hf, path: tok.json}"))
    assert loaded.spec.data.tokenizer.file == str(tmp_path / "tok.json")
    assert loaded.spec.model.vocab_size == 640  # 600 padded up to a multiple of 128


@pytest.mark.parametrize(("multiple", "size"), [(1, 600), (64, 640), (256, 768)])
def test_vocab_multiple_pads_auto(trained, tmp_path, multiple, size):
    _, file = trained
    spec = _spec(tmp_path, f"{{kind: hf, path: {file}}}", f"  vocab_multiple: {multiple}\n")
    assert load_spec(spec).spec.model.vocab_size == size


def test_bpe_auto_takes_the_spec_vocab_size():
    loaded = load_spec(TINY, ["data.tokenizer={kind: bpe, vocab_size: 1000}", "model.vocab_size=auto"])
    assert loaded.spec.model.vocab_size == 1024
    assert load_spec(TINY, ["model.vocab_size=auto"]).spec.model.vocab_size == 256  # bytes


def test_vocab_smaller_than_the_tokenizer_is_a_validate_error(trained, tmp_path):
    _, file = trained
    with pytest.raises(SpecError) as e:
        load_spec(_spec(tmp_path, f"{{kind: hf, path: {file}}}"), ["model.vocab_size=500"])
    (issue,) = e.value.issues
    assert issue.path == "model.vocab_size" and "500" in issue.message and "600" in issue.message
    with pytest.raises(SpecError, match="1000"):
        load_spec(TINY, ["data.tokenizer={kind: bpe, vocab_size: 1000}", "model.vocab_size=256"])


def test_vocab_multiple_without_auto_is_refused(tmp_path):
    with pytest.raises(SpecError) as e:
        load_spec(TINY, ["model.vocab_size=512", "model.vocab_multiple=64"])
    assert e.value.issues[0].path == "model.vocab_multiple"


def test_transformers_directory_and_its_eos(trained, tmp_path):
    from transformers import PreTrainedTokenizerFast

    tok, _ = trained
    fast = PreTrainedTokenizerFast(tokenizer_object=tok.tok, eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(tmp_path / "saved")
    loaded = load_spec(_spec(tmp_path, "{kind: hf, path: saved}"))
    built = build_tokenizer(loaded.spec.data.tokenizer, [], loaded.base_dir)
    assert built.eos_id == 1  # tokenizer_config.json's eos_token, not the first special token
    assert built.encode_texts(["x = 1\n"])[0].tolist() == fast("x = 1\n")["input_ids"]
    chosen = load_spec(_spec(tmp_path, "{kind: hf, path: saved, eos_token: <pad>}"))
    assert build_tokenizer(chosen.spec.data.tokenizer, []).eos_id == 0


def test_unknown_eos_token_names_the_field(trained, tmp_path):
    _, file = trained
    loaded = load_spec(_spec(tmp_path, f"{{kind: hf, path: {file}, eos_token: '<|nope|>'}}"))
    with pytest.raises(SpecError) as e:
        build_tokenizer(loaded.spec.data.tokenizer, [])
    assert e.value.issues[0].path == "data.tokenizer.eos_token" and "<pad>" in e.value.issues[0].message


def test_eos_found_among_special_tokens(trained):
    _, file = trained
    assert load_tokenizer_file(file).eos_id == 1  # "</s>" is one of the usual spellings


def test_hub_name_from_the_local_cache_only(trained, tmp_path, monkeypatch):
    _, file = trained
    hub = tmp_path / "hub"
    snap = hub / "models--someorg--tiny-bpe" / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    (snap / "tokenizer.json").write_bytes(file.read_bytes())
    (hub / "models--someorg--tiny-bpe" / "refs").mkdir()
    (hub / "models--someorg--tiny-bpe" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    loaded = load_spec(_spec(tmp_path, "{kind: hf, path: someorg/tiny-bpe}"))
    assert loaded.spec.data.tokenizer.file == str(snap / "tokenizer.json")
    assert loaded.spec.model.vocab_size == 640

    with pytest.raises(SpecError) as e:
        load_spec(_spec(tmp_path, "{kind: hf, path: someorg/not-cached}"))
    (issue,) = e.value.issues
    assert issue.path == "data.tokenizer.path"
    assert str(hub / "models--someorg--not-cached") in issue.message
    assert str(tmp_path / "someorg" / "not-cached") in issue.message and "downloaded" in issue.message


def test_a_directory_without_tokenizer_json_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SpecError, match=r"holds no tokenizer\.json"):
        load_spec(_spec(tmp_path, "{kind: hf, path: empty}"))
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(SpecError, match=r"not a tokenizers tokenizer\.json"):
        load_spec(_spec(tmp_path, "{kind: hf, path: bad.json}"))


def test_server_roots_confine_the_tokenizer_file(trained, tmp_path):
    """The job server validates with its spec roots: a tokenizer file elsewhere is refused unread."""
    _, file = trained
    roots = (tmp_path, TINY.parents[2])
    with pytest.raises(SpecError) as e:
        load_spec(_spec(tmp_path, f"{{kind: hf, path: {file}}}"), roots=roots)
    (issue,) = e.value.issues
    assert issue.path == "data.tokenizer.path" and "spec roots" in issue.message
    (tmp_path / "tok.json").write_bytes(file.read_bytes())
    assert load_spec(_spec(tmp_path, "{kind: hf, path: tok.json}"), roots=roots).spec.model.vocab_size == 640


def test_a_run_encodes_its_data_with_the_hf_tokenizer(trained, tmp_path):
    from moeplat.compile.data import build_data

    _, file = trained
    loaded = load_spec(_spec(tmp_path, f"{{kind: hf, path: {file}}}"))
    dm, info = build_data(loaded.spec, loaded.base_dir)
    assert dm.tokenizer.kind == "hf" and dm.tokenizer.eos_id == 1 and dm.tokenizer.vocab_size == 600
    byte_info = build_data(load_spec(TINY).spec)[1]
    # the same documents, fewer tokens: each covers bytes_per_token bytes (EOS none)
    assert info.train_documents == byte_info.train_documents and 2.0 < info.bytes_per_token < 5.0
    separators = 3 * (byte_info.train_documents - 1)
    assert info.bytes_per_token * info.train_tokens == pytest.approx(byte_info.train_tokens - separators)


def test_a_saved_model_with_a_relative_tokenizer_path_loads_from_any_directory(
    trained, tmp_path, monkeypatch
):
    """moeplat eval rebuilds a run's model from its model/ artifact: the spec's relative hf path
    resolves against the run's data directory, not where eval was started."""
    from types import SimpleNamespace

    from moeplat.compile.model import build_model
    from moeplat.train.model_artifact import load_model_artifact, save_model_artifact

    _, file = trained
    (tmp_path / "tok.json").write_bytes(file.read_bytes())
    loaded = load_spec(_spec(tmp_path, "{kind: hf, path: tok.json}"))
    weights = {f"model.{k}": v for k, v in build_model(loaded.spec).state_dict().items()}
    tracked = SimpleNamespace(log_artifacts=lambda *args: None)
    out = save_model_artifact(tracked, weights, loaded, tmp_path / "run", step=0, val_loss=None)
    monkeypatch.chdir("/")
    spec, _, _ = load_model_artifact(out)
    assert spec.data.tokenizer.file == str(tmp_path / "tok.json") and spec.model.vocab_size == 640
