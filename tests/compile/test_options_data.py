"""Every `data` option (and train.batch_size / train.seed on the data side) changes what
`moeplat.compile.data` builds: which documents are read, how they split, and the batches served."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from moeplat.compile.data import build_data, load_documents
from moeplat.data.tokenizer import DEFAULT_SEPARATOR
from moeplat.errors import SpecError
from moeplat.spec import load_spec

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "tests" / "fixtures" / "tiny.yaml"
TEST_DIRS = {"test", "tests", "idle_test"}


def _loaded(*overrides: str, path: Path = TINY):
    return load_spec(path, list(overrides))


def _data(*overrides: str, path: Path = TINY):
    loaded = _loaded(*overrides, path=path)
    return build_data(loaded.spec, loaded.base_dir)


def _docs(*overrides: str, path: Path = TINY):
    loaded = _loaded(*overrides, path=path)
    return load_documents(loaded.spec.data, loaded.base_dir)


def _first_train_batch(dm) -> tuple[torch.Tensor, torch.Tensor]:
    return next(iter(dm.train_dataloader()))


def _is_test_file(name: str) -> bool:
    return bool(TEST_DIRS & set(name.split("/")[:-1]))


# --- batch shape: data.seq_len, train.batch_size, train.seed -------------------------------------


@pytest.mark.parametrize(("seq_len", "batch_size"), [(32, 4), (16, 3), (8, 7)])
def test_seq_len_and_batch_size_set_the_batch_shape(seq_len, batch_size):
    dm, _ = _data(f"data.seq_len={seq_len}", f"train.batch_size={batch_size}")
    x, y = _first_train_batch(dm)
    assert x.shape == y.shape == (batch_size, seq_len)
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
    vx, _ = next(iter(dm.val_dataloader()))
    assert vx.shape == (batch_size, seq_len)


def test_train_seed_sets_the_training_batch_order():
    first = _first_train_batch(_data("train.seed=0")[0])[0]
    again = _first_train_batch(_data("train.seed=0")[0])[0]
    other = _first_train_batch(_data("train.seed=1")[0])[0]
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_num_workers_reaches_the_data_loaders():
    dm0, _ = _data("data.num_workers=0")
    assert dm0.train_dataloader().num_workers == 0
    dm1, _ = _data("data.num_workers=1")
    loader = dm1.train_dataloader()
    assert loader.num_workers == 1 and loader.persistent_workers
    assert dm1.val_dataloader().num_workers == 1
    many, _ = _data("data.num_workers=1000")
    assert many.num_workers == os.cpu_count()  # capped at the machine's cores


# --- the split: val_fraction, split_seed -----------------------------------------------------------


def test_val_fraction_sets_how_many_documents_validate():
    _, small = _data("data.val_fraction=0.05")
    _, large = _data("data.val_fraction=0.5")
    assert small.documents == large.documents and small.fingerprint == large.fingerprint
    assert large.val_documents > small.val_documents >= 1
    assert large.val_tokens > small.val_tokens
    for info in (small, large):
        assert info.train_documents + info.val_documents == info.documents


def test_split_seed_changes_which_documents_validate():
    dm0, info0 = _data("data.val_fraction=0.3", "data.split_seed=0")
    dm0b, info0b = _data("data.val_fraction=0.3", "data.split_seed=0")
    dm1, info1 = _data("data.val_fraction=0.3", "data.split_seed=1")
    assert info0 == info0b and torch.equal(dm0.val_set[0][0], dm0b.val_set[0][0])
    assert info0.documents == info1.documents and info0.fingerprint == info1.fingerprint
    assert (info0.val_documents, info0.val_tokens) != (info1.val_documents, info1.val_tokens)
    assert not torch.equal(dm0.val_set[0][0], dm1.val_set[0][0])


# --- source: python_stdlib -------------------------------------------------------------------------


def test_python_stdlib_include_tests_adds_the_test_suites():
    without = _docs("data.source.include_tests=false", "data.source.max_bytes=null")
    with_tests = _docs("data.source.include_tests=true", "data.source.max_bytes=null")
    assert not any(_is_test_file(d.name) for d in without)
    assert any(_is_test_file(d.name) for d in with_tests)
    assert {d.name for d in without} < {d.name for d in with_tests}


@pytest.mark.parametrize("cap", [100_000, 400_000])
def test_python_stdlib_max_bytes_caps_the_corpus(cap):
    docs = _docs(f"data.source.max_bytes={cap}")
    assert 0 < sum(len(d.data) for d in docs) <= cap
    assert all(d.name.endswith(".py") for d in docs)
    bigger = _docs(f"data.source.max_bytes={2 * cap}")
    assert {d.name for d in docs} < {d.name for d in bigger}  # a larger cap keeps a superset


def test_python_stdlib_max_bytes_too_small_is_a_spec_error():
    with pytest.raises(SpecError) as err:
        _docs("data.source.max_bytes=10")
    assert [i.path for i in err.value.issues] == ["data.source.max_bytes"]


# --- source: text_files ----------------------------------------------------------------------------


def _write_corpus(root: Path) -> None:
    """Real prose-like text: each file distinct, large enough for the tiny spec's batches."""
    files = {
        "corpus/alpha.txt": "alpha",
        "corpus/beta.md": "beta",
        "corpus/gamma.py": "gamma",
        "corpus/sub/delta.txt": "delta",
        "corpus/sub/epsilon.txt": "epsilon",
        "extra/zeta.txt": "zeta",
    }
    for rel, word in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = [f"{word} line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(60)]
        path.write_text("".join(lines))


def _text_spec(tmp_path: Path, source: str) -> Path:
    """A spec in tmp_path extending the tiny spec (by a relative path) with a text_files source."""
    _write_corpus(tmp_path)
    spec = tmp_path / "specs" / "text.yaml"
    spec.parent.mkdir(parents=True, exist_ok=True)
    base = os.path.relpath(TINY, spec.parent)
    spec.write_text(f"extends: {base}\nname: text\ndata:\n  source: {source}\n  val_fraction: 0.3\n")
    return spec


def test_text_files_paths_resolve_against_the_spec_file_directory(tmp_path, monkeypatch):
    spec = _text_spec(tmp_path, "{kind: text_files, paths: [../corpus]}")
    monkeypatch.chdir(REPO)  # not where the corpus is: resolution must not depend on the cwd
    loaded = _loaded(path=spec)
    names = [d.name for d in load_documents(loaded.spec.data, loaded.base_dir)]
    assert names == [
        "../corpus/alpha.txt",
        "../corpus/beta.md",
        "../corpus/sub/delta.txt",
        "../corpus/sub/epsilon.txt",
    ]  # default patterns *.txt, *.md
    dm, info = build_data(loaded.spec, loaded.base_dir)
    text_bytes = sum((tmp_path / "corpus" / n.removeprefix("../corpus/")).stat().st_size for n in names)
    separators = len(DEFAULT_SEPARATOR) * (info.train_documents - 1 + info.val_documents - 1)
    assert info.documents == 4 and info.train_tokens + info.val_tokens == text_bytes + separators
    assert _first_train_batch(dm)[0].shape == (4, 32)


def test_text_files_paths_given_by_set_resolve_against_the_working_directory(tmp_path, monkeypatch):
    spec = _text_spec(tmp_path, "{kind: text_files, paths: [../corpus]}")
    monkeypatch.chdir(tmp_path)
    two_paths = _docs("data.source.paths=[corpus/sub, extra/zeta.txt]", path=spec)
    assert [d.name for d in two_paths] == ["corpus/sub/delta.txt", "corpus/sub/epsilon.txt", "extra/zeta.txt"]


def test_text_files_paths_of_a_base_spec_resolve_against_the_base_file(tmp_path, monkeypatch):
    base = _text_spec(tmp_path, "{kind: text_files, paths: [../corpus/sub]}")
    child = tmp_path / "elsewhere" / "deeper" / "child.yaml"
    child.parent.mkdir(parents=True)
    child.write_text(f"extends: {os.path.relpath(base, child.parent)}\nname: child\n")
    monkeypatch.chdir(REPO)
    assert [d.name for d in _docs(path=child)] == ["../corpus/sub/delta.txt", "../corpus/sub/epsilon.txt"]


def test_text_files_patterns_and_max_bytes(tmp_path):
    spec = _text_spec(tmp_path, "{kind: text_files, paths: [../corpus]}")
    md_py = _docs("data.source.patterns=['*.md', '*.py']", path=spec)
    assert [d.name for d in md_py] == ["../corpus/beta.md", "../corpus/gamma.py"]

    every = _docs(path=spec)
    cap = sum(len(d.data) for d in every) - 1
    capped = _docs(f"data.source.max_bytes={cap}", path=spec)
    assert len(every) == 4 and 1 <= len(capped) < 4
    assert sum(len(d.data) for d in capped) <= cap
    assert {d.name for d in capped} < {d.name for d in every}


def test_text_files_max_bytes_too_small_is_a_spec_error_naming_max_bytes(tmp_path):
    spec = _text_spec(tmp_path, "{kind: text_files, paths: [../corpus], max_bytes: 10}")
    with pytest.raises(SpecError) as err:
        _docs(path=spec)
    assert [i.path for i in err.value.issues] == ["data.source.max_bytes"]


def test_text_files_missing_path_is_a_spec_error_naming_the_paths(tmp_path):
    spec = _text_spec(tmp_path, "{kind: text_files, paths: [../corpus, ../nowhere]}")
    loaded = _loaded(path=spec)
    with pytest.raises(SpecError) as err:
        load_documents(loaded.spec.data, loaded.base_dir)
    (issue,) = err.value.issues
    assert issue.path == "data.source.paths" and "nowhere" in issue.message


def test_data_source_kind_switches_the_corpus(tmp_path):
    spec = _text_spec(tmp_path, "{kind: text_files, paths: [../corpus]}")
    text = _docs(path=spec)
    stdlib = _docs("data.source={kind: python_stdlib, max_bytes: 100000}", path=spec)
    assert all(d.name.startswith("../corpus/") for d in text)
    assert all(d.name.endswith(".py") and not d.name.startswith("..") for d in stdlib)
