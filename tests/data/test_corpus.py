"""The built-in stdlib corpus and corpora read from files, on real files only."""

from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path

import pytest

from moeplat.data import Document, corpus_fingerprint, python_stdlib_documents, text_file_documents

TEST_DIR_NAMES = {"test", "tests", "idle_test"}


@pytest.fixture(scope="module")
def stdlib_docs() -> list[Document]:
    return python_stdlib_documents()


def _total(docs: list[Document]) -> int:
    return sum(len(d.data) for d in docs)


def test_stdlib_corpus_is_real_sorted_and_deterministic(stdlib_docs):
    names = [d.name for d in stdlib_docs]
    assert len(stdlib_docs) > 100
    assert names == sorted(names)
    assert len(set(names)) == len(names)
    assert {"os.py", "json/decoder.py", "collections/__init__.py"} <= set(names)
    root = Path(sysconfig.get_paths()["stdlib"])
    assert next(d for d in stdlib_docs if d.name == "os.py").data == (root / "os.py").read_bytes()
    assert python_stdlib_documents() == stdlib_docs


def test_stdlib_corpus_excludes_tests_and_third_party_by_default(stdlib_docs):
    for doc in stdlib_docs:
        parts = doc.name.split("/")
        assert doc.name.endswith(".py")
        assert not TEST_DIR_NAMES & set(parts[:-1]), doc.name
        assert "site-packages" not in parts and "__pycache__" not in parts, doc.name


def test_stdlib_corpus_with_tests_adds_only_test_files(stdlib_docs):
    with_tests = python_stdlib_documents(include_tests=True)
    extra = {d.name for d in with_tests} - {d.name for d in stdlib_docs}
    if not extra:
        pytest.skip("this Python was installed without its test suites")
    assert {d.name for d in stdlib_docs} < {d.name for d in with_tests}
    assert all(TEST_DIR_NAMES & set(name.split("/")[:-1]) for name in extra)
    assert all("site-packages" not in name.split("/") for name in extra)
    if (Path(sysconfig.get_paths()["stdlib"]) / "test" / "test_os.py").exists():
        assert "test/test_os.py" in extra


def test_stdlib_max_bytes_caps_and_grows_monotonically(stdlib_docs):
    small = python_stdlib_documents(max_bytes=200_000)
    large = python_stdlib_documents(max_bytes=2_000_000)
    assert 0 < _total(small) <= 200_000
    assert 200_000 < _total(large) <= 2_000_000
    assert set(small) < set(large) < set(stdlib_docs)
    assert [d.name for d in small] == sorted(d.name for d in small)
    # Drawn in sha1-of-name order, so a small cap still reaches across the whole alphabet of
    # modules instead of filling up with the first packages by name.
    drawn = sorted(stdlib_docs, key=lambda d: hashlib.sha1(d.name.encode()).hexdigest())
    assert set(small) == set(drawn[: len(small)])
    assert len(small) < len(drawn) and _total(small) + len(drawn[len(small)].data) > 200_000
    assert min(d.name for d in large) < "c" and max(d.name for d in large) > "t"


def test_stdlib_max_bytes_too_small_is_an_error():
    with pytest.raises(ValueError, match="max_bytes=1 keeps no documents"):
        python_stdlib_documents(max_bytes=1)


@pytest.fixture
def text_tree(tmp_path: Path) -> Path:
    (tmp_path / "notes" / "sub").mkdir(parents=True)
    (tmp_path / "a.txt").write_text("alpha\n")
    (tmp_path / "notes" / "b.md").write_text("# beta\n")
    (tmp_path / "notes" / "sub" / "c.txt").write_text("gamma ünïcode\n")
    (tmp_path / "notes" / "skip.py").write_text("print('delta')\n")
    return tmp_path


def test_text_files_and_folders_with_patterns(text_tree):
    docs = text_file_documents(["notes", "a.txt"], base_dir=str(text_tree))
    assert [d.name for d in docs] == ["a.txt", "notes/b.md", "notes/sub/c.txt"]
    assert docs[2].data == "gamma ünïcode\n".encode()

    only_py = text_file_documents(["notes"], patterns=["*.py"], base_dir=str(text_tree))
    assert [d.name for d in only_py] == ["notes/skip.py"]
    # A file named directly is kept whatever the patterns say.
    named = text_file_documents(["notes/skip.py"], base_dir=str(text_tree))
    assert [d.data for d in named] == [b"print('delta')\n"]


def test_text_file_names_do_not_depend_on_location(text_tree, tmp_path_factory):
    other = tmp_path_factory.mktemp("elsewhere")
    for doc in text_file_documents(["notes", "a.txt"], base_dir=str(text_tree)):
        (other / doc.name).parent.mkdir(parents=True, exist_ok=True)
        (other / doc.name).write_bytes(doc.data)
    here = text_file_documents(["notes", "a.txt"], base_dir=str(text_tree))
    there = text_file_documents(["notes", "a.txt"], base_dir=str(other))
    assert here == there


def test_text_files_absolute_paths_and_overlap(text_tree):
    docs = text_file_documents([str(text_tree / "a.txt")])
    assert [d.data for d in docs] == [b"alpha\n"]
    # A file reached through a folder and by name is read once.
    overlapping = text_file_documents(["notes", "notes/b.md"], base_dir=str(text_tree))
    assert [d.name for d in overlapping] == ["notes/b.md", "notes/sub/c.txt"]


def test_text_files_max_bytes(text_tree):
    full = text_file_documents(["notes", "a.txt"], base_dir=str(text_tree))
    capped = text_file_documents(["notes", "a.txt"], base_dir=str(text_tree), max_bytes=15)
    assert 0 < _total(capped) <= 15
    assert set(capped) < set(full)


def test_text_files_missing_path_names_it(text_tree):
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        text_file_documents(["notes", "no_such_dir"], base_dir=str(text_tree))


def test_text_files_nothing_matched_names_paths_and_patterns(text_tree):
    with pytest.raises(ValueError, match=r"\['notes'\].*\['\*\.rst'\]"):
        text_file_documents(["notes"], patterns=["*.rst"], base_dir=str(text_tree))


def test_fingerprint_tracks_names_bytes_and_boundaries():
    docs = [Document("a", b"xy"), Document("b", b"z")]
    fp = corpus_fingerprint(docs)
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert corpus_fingerprint(list(docs)) == fp
    assert corpus_fingerprint([Document("a", b"xY"), Document("b", b"z")]) != fp
    assert corpus_fingerprint([Document("A", b"xy"), Document("b", b"z")]) != fp
    # Same concatenated bytes, different document boundary.
    assert corpus_fingerprint([Document("a", b"x"), Document("b", b"yz")]) != fp
    assert corpus_fingerprint(docs[::-1]) != fp
