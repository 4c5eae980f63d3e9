"""A spec trains from prepared shards (data.prepared_dir, data.source.kind: prepared): the same
blocks, validation text and corpus figures as the in-memory path, reused or re-prepared with the
reason said, and clear errors naming the field."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from moeplat.cli.main import main
from moeplat.compile.data import build_data
from moeplat.data.shards import MemmapSequences
from moeplat.errors import SpecError
from moeplat.spec import load_spec

TINY = Path(__file__).resolve().parents[1] / "fixtures" / "tiny.yaml"


def _spec(tmp_path, data: str, name: str = "s.yaml"):
    path = tmp_path / name
    # data.source set here, so relative data paths resolve against tmp_path (moeplat.spec.loader)
    if "  source:" not in data:
        data = "  source: {kind: python_stdlib, max_bytes: 400000}\n" + data
    path.write_text(f"extends: {TINY}\nname: prepared\ndata:\n{data}")
    return path


def _batches(dm, n: int = 3):
    it = iter(dm.train_dataloader())
    return [next(it) for _ in range(n)]


def test_prepared_dir_trains_on_the_blocks_of_the_in_memory_path(tmp_path, capsys):
    memory_dm, memory_info = build_data(load_spec(TINY).spec)
    loaded = load_spec(_spec(tmp_path, "  prepared_dir: shards\n"))
    dm, info = build_data(loaded.spec, loaded.base_dir)
    assert "prepared" in capsys.readouterr().err
    assert isinstance(dm.train_set, MemmapSequences) and (tmp_path / "shards" / "manifest.json").is_file()
    assert len(dm.train_set) == len(memory_dm.train_set)
    for i in range(0, len(dm.train_set), 97):
        assert all(torch.equal(a, b) for a, b in zip(dm.train_set[i], memory_dm.train_set[i], strict=True))
    # shuffled by the same seeded permutation: the same batches, in the same order
    for (x, y), (mx, my) in zip(_batches(dm), _batches(memory_dm), strict=True):
        assert torch.equal(x, mx) and torch.equal(y, my)
    assert not torch.equal(_batches(dm, 1)[0][0][1], dm.train_set[1][0])  # not in file order
    assert [len(v) for v in dm.val_sets] == [len(v) for v in memory_dm.val_sets]
    assert torch.equal(dm.val_set[len(dm.val_set) - 1][0], memory_dm.val_set[len(dm.val_set) - 1][0])
    for key in ("documents", "train_tokens", "val_tokens", "fingerprint", "val_sequences"):
        if key != "fingerprint":
            assert getattr(info, key) == getattr(memory_info, key), key
    # the baseline from the shards' token counts equals the one from the streams
    assert info.unigram_baseline == pytest.approx(memory_info.unigram_baseline, rel=1e-12)
    assert info.bytes_per_token == pytest.approx(memory_info.bytes_per_token)
    assert info.unigram_baseline_bpb == pytest.approx(memory_info.unigram_baseline_bpb, rel=1e-12)


def test_run_reuses_a_matching_directory_and_says_why_it_prepares_again(tmp_path, capsys):
    spec = _spec(tmp_path, "  prepared_dir: shards\n")
    loaded = load_spec(spec)
    build_data(loaded.spec, loaded.base_dir)
    capsys.readouterr()
    build_data(loaded.spec, loaded.base_dir)
    assert "reusing the prepared corpus" in capsys.readouterr().err
    changed = load_spec(spec, ["data.source.max_bytes=300000"])
    build_data(changed.spec, changed.base_dir)
    assert "again: sources changed" in capsys.readouterr().err


def test_kind_prepared_reads_a_directory_made_by_the_cli(tmp_path, capsys):
    made = _spec(tmp_path, "  prepared_dir: null\n", "made.yaml")
    assert (
        main(["data", "prepare", str(made), "-o", str(tmp_path / "out"), "--workers", "2", "--no-progress"])
        == 0
    )
    assert "prepared (new directory) with 2 worker(s)" in capsys.readouterr().out
    assert main(["data", "prepare", str(made), "-o", str(tmp_path / "out")]) == 0
    assert "already prepared" in capsys.readouterr().out
    loaded = load_spec(_spec(tmp_path, "  source: {kind: prepared, path: out}\n"))
    dm, info = build_data(loaded.spec, loaded.base_dir)
    memory_dm, memory_info = build_data(load_spec(TINY).spec)
    assert info.train_tokens == memory_info.train_tokens and len(dm.train_set) == len(memory_dm.train_set)


def test_kind_prepared_with_another_tokenizer_names_both(tmp_path):
    made = _spec(tmp_path, "", "made.yaml")
    assert main(["data", "prepare", str(made), "-o", str(tmp_path / "out"), "--no-progress"]) == 0
    bpe = "  tokenizer: {kind: bpe, vocab_size: 400}\n"
    loaded = load_spec(
        _spec(tmp_path, "  source: {kind: prepared, path: out}\n" + bpe), ["model.vocab_size=auto"]
    )
    with pytest.raises(SpecError) as e:
        build_data(loaded.spec, loaded.base_dir)
    (issue,) = e.value.issues
    assert issue.path == "data.tokenizer"
    assert "made with tokenizer byte" in issue.message and "the spec names bpe" in issue.message


def test_bpe_prepared_dir_keeps_the_tokenizer_and_its_figures(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEPLAT_CACHE_DIR", str(tmp_path / "cache"))
    bpe = "  tokenizer: {kind: bpe, vocab_size: 400}\n"
    memory = load_spec(_spec(tmp_path, bpe, "m.yaml"), ["model.vocab_size=auto"])
    memory_dm, memory_info = build_data(memory.spec, memory.base_dir)
    loaded = load_spec(_spec(tmp_path, bpe + "  prepared_dir: shards\n"), ["model.vocab_size=auto"])
    dm, info = build_data(loaded.spec, loaded.base_dir)
    assert (tmp_path / "shards" / "tokenizer.json").is_file()
    assert dm.tokenizer.fingerprint == memory_dm.tokenizer.fingerprint
    assert dm.train_set.dtype == np.uint16
    assert torch.equal(dm.train_set[5][0], memory_dm.train_set[5][0])
    assert info.bytes_per_token == pytest.approx(memory_info.bytes_per_token)
    assert info.unigram_baseline_bpb == pytest.approx(memory_info.unigram_baseline_bpb, rel=1e-12)


def test_missing_prepared_directory_names_the_field(tmp_path):
    loaded = load_spec(_spec(tmp_path, "  source: {kind: prepared, path: nowhere}\n"))
    with pytest.raises(SpecError) as e:
        build_data(loaded.spec, loaded.base_dir)
    assert (
        e.value.issues[0].path == "data.source.path" and "moeplat data prepare" in e.value.issues[0].message
    )


def test_prepare_without_a_destination_is_a_usage_error(tmp_path, capsys):
    assert main(["data", "prepare", str(_spec(tmp_path, "  seq_len: 32\n"))]) == 2
    assert "data.prepared_dir" in capsys.readouterr().err


def test_a_prepared_mixture_needs_weights_by_name(tmp_path):
    mix = (
        "  source:\n    kind: mixture\n    sources:\n"
        "      - {name: code, weight: 3, source: {kind: python_stdlib, max_bytes: 300000}}\n"
        "      - {name: more, weight: 1, source: {kind: python_stdlib, max_bytes: 200000, include_tests: true}}\n"
    )
    made = _spec(tmp_path, mix + "  prepared_dir: shards\n", "mix.yaml")
    loaded = load_spec(made)
    dm, info = build_data(loaded.spec, loaded.base_dir)
    assert sorted(p.name for p in (tmp_path / "shards").iterdir() if p.is_dir()) == ["code", "more"]
    assert [name for name, _ in info.per_source] == ["code", "more"] and len(dm.val_sets) == 2
    bad = load_spec(_spec(tmp_path, "  source: {kind: prepared, path: shards}\n"))
    with pytest.raises(SpecError) as e:
        build_data(bad.spec, bad.base_dir)
    assert e.value.issues[0].path == "data.source.weights" and "code: 1.0" in e.value.issues[0].message
    ok = load_spec(_spec(tmp_path, "  source: {kind: prepared, path: shards, weights: {code: 3, more: 1}}\n"))
    dm2, _ = build_data(ok.spec, ok.base_dir)
    for i in range(8):
        assert torch.equal(dm2.train_set[i][0], dm.train_set[i][0])


def test_dataloader_workers_open_their_own_maps(tmp_path):
    loaded = load_spec(_spec(tmp_path, "  prepared_dir: shards\n"))
    dm, _ = build_data(loaded.spec, loaded.base_dir)
    workers = load_spec(_spec(tmp_path, "  prepared_dir: shards\n  num_workers: 2\n", "w.yaml"))
    dm2, _ = build_data(workers.spec, workers.base_dir)
    assert dm2.num_workers == 2
    for (x, y), (x2, y2) in zip(_batches(dm), _batches(dm2), strict=True):
        assert torch.equal(x, x2) and torch.equal(y, y2)


def test_a_validation_split_shorter_than_a_sequence_names_the_field(tmp_path):
    made = _spec(tmp_path, "", "made.yaml")
    assert main(["data", "prepare", str(made), "-o", str(tmp_path / "out"), "--no-progress"]) == 0
    long = load_spec(
        _spec(tmp_path, "  source: {kind: prepared, path: out}\n  seq_len: 40000\n  val_tokens: all\n"),
        ["model.max_seq_len=40000"],
    )
    with pytest.raises(SpecError) as e:
        build_data(long.spec, long.base_dir)
    assert e.value.issues[0].path == "data.seq_len" and "validation split" in e.value.issues[0].message


def test_kind_prepared_accepts_the_bpe_it_was_made_with_even_when_merges_ran_out(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEPLAT_CACHE_DIR", str(tmp_path / "cache"))
    bpe = "  tokenizer: {kind: bpe, vocab_size: 60000}\n"  # more than 400 kB of text can merge into
    made = _spec(tmp_path, bpe, "made.yaml")
    assert (
        main(
            [
                "data",
                "prepare",
                str(made),
                "-o",
                str(tmp_path / "out"),
                "--no-progress",
                "--set",
                "model.vocab_size=auto",
            ]
        )
        == 0
    )
    manifest = __import__("json").loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["tokenizer"]["size"] < 60000 == manifest["tokenizer"]["vocab_size"]
    loaded = load_spec(
        _spec(tmp_path, "  source: {kind: prepared, path: out}\n" + bpe), ["model.vocab_size=auto"]
    )
    dm, _ = build_data(loaded.spec, loaded.base_dir)
    assert dm.tokenizer.vocab_size == manifest["tokenizer"]["size"]
    other = load_spec(
        _spec(
            tmp_path, "  source: {kind: prepared, path: out}\n  tokenizer: {kind: bpe, vocab_size: 50000}\n"
        ),
        ["model.vocab_size=auto"],
    )
    with pytest.raises(SpecError, match=r"vocab_size=60000.*the spec names bpe.*vocab_size=50000"):
        build_data(other.spec, other.base_dir)
