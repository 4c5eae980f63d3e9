"""`moeplat tokenizer train SPEC -o DIR`: the spec's BPE, on the documents a run trains it on."""

from __future__ import annotations

from pathlib import Path

import pytest

from moeplat.cli.main import main
from moeplat.spec import load_spec

TINY = Path(__file__).resolve().parents[1] / "fixtures" / "tiny.yaml"
BPE = ["--set", "data.tokenizer={kind: bpe, vocab_size: 700}", "--set", "model.vocab_size=auto"]


def test_trains_then_reuses_and_a_run_finds_it(tmp_path, monkeypatch, capsys):
    from tokenizers import Tokenizer

    from moeplat.compile.data import build_data

    monkeypatch.setenv("MOEPLAT_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "out"
    assert main(["tokenizer", "train", str(TINY), *BPE, "-o", str(out), "--no-progress"]) == 0
    first = capsys.readouterr().out
    assert "trained on" in first and "vocab 700" in first and str(out / "tokenizer.json") in first
    assert Tokenizer.from_file(str(out / "tokenizer.json")).get_vocab_size() == 700

    assert main(["tokenizer", "train", str(TINY), *BPE, "-o", str(tmp_path / "again")]) == 0
    assert "taken from the cache" in capsys.readouterr().out
    assert (tmp_path / "again" / "tokenizer.json").read_text() == (out / "tokenizer.json").read_text()

    capsys.readouterr()
    dm, _ = build_data(load_spec(TINY, BPE[1::2]).spec)
    assert dm.tokenizer.cached  # same training documents, same key: the run trains nothing
    assert "tokenizer: BPE of 700 ids taken from the cache" in capsys.readouterr().err  # and says so


@pytest.mark.parametrize(
    ("overrides", "says"),
    [([], "the byte tokenizer has nothing to learn"), (["data.tokenizer.kind=nope"], "nope")],
)
def test_a_spec_without_a_trainable_tokenizer_is_a_cli_error(tmp_path, capsys, overrides, says):
    sets = [a for o in overrides for a in ("--set", o)]
    assert main(["tokenizer", "train", str(TINY), *sets, "-o", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "data.tokenizer" in err and says in err
    assert not (tmp_path / "tokenizer.json").exists()


def test_hf_tokenizer_is_already_trained(tmp_path, capsys):
    from moeplat.data.corpus import python_stdlib_documents
    from moeplat.data.tokenizers import train_bpe

    file = train_bpe(python_stdlib_documents(max_bytes=100_000), vocab_size=300, cache_dir=tmp_path).save(
        tmp_path / "tok"
    )
    hf = ["--set", f"data.tokenizer={{kind: hf, path: {file}}}", "--set", "model.vocab_size=auto"]
    assert main(["tokenizer", "train", str(TINY), *hf, "-o", str(tmp_path / "out")]) == 2
    assert "already trained" in capsys.readouterr().err
