"""`data.source.kind: hf_dataset`: what `datasets.load_dataset` reads, over jsonl and parquet files
the tests write from real text (the stdlib's sources and the Python documentation's prose)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from python_docs import require_python_docs

from moeplat.compile.data import build_data, load_documents
from moeplat.data import python_stdlib_documents, split_documents
from moeplat.data.sources import SourceError, hf_dataset_documents
from moeplat.errors import SpecError
from moeplat.spec import load_spec

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "tests" / "fixtures" / "tiny.yaml"


@pytest.fixture(scope="module")
def code_docs():
    return python_stdlib_documents(max_bytes=600_000)


@pytest.fixture(scope="module")
def files(tmp_path_factory, code_docs):
    """corpus/part-0.jsonl, corpus/part-1.jsonl (text, path) and corpus/rows.parquet (content, id)."""
    root = tmp_path_factory.mktemp("hf")
    corpus = root / "corpus"
    corpus.mkdir()
    half = len(code_docs) // 2
    for part, docs in enumerate((code_docs[:half:2], code_docs[1:half:2])):
        with open(corpus / f"part-{part}.jsonl", "w") as f:
            for d in docs:
                f.write(json.dumps({"text": d.data.decode("utf-8", "replace"), "path": d.name}) + "\n")
    rest = code_docs[half:]
    table = pa.table(
        {
            "title": [d.name for d in rest],
            "content": [d.data.decode("utf-8", "replace") for d in rest],
            "id": list(range(len(rest))),
        }
    )
    pq.write_table(table, corpus / "rows.parquet")
    return root


def _spec(root: Path, source: dict, *overrides: str):
    """A spec file in `root` (relative data_files resolve against it) extending the tiny fixture."""
    path = root / f"spec-{abs(hash(json.dumps(source, sort_keys=True)))}.yaml"
    path.write_text(yaml.safe_dump({"extends": str(TINY), "data": {"source": source}}))
    return load_spec(path, ["tracking.system_metrics=false", *overrides])


def test_jsonl_rows_are_documents_named_by_file_and_row(files, code_docs):
    docs = hf_dataset_documents(path="json", data_files=["corpus/*.jsonl"], base_dir=str(files))
    half = len(code_docs) // 2
    want = code_docs[:half:2] + code_docs[1:half:2]  # part-0 then part-1: sorted glob order
    assert [d.data for d in docs] == [d.data for d in want]
    n0 = len(code_docs[:half:2])
    assert docs[0].name == "corpus/part-0.jsonl:0" and docs[n0].name == "corpus/part-1.jsonl:0"
    assert docs[n0 - 1].name == f"corpus/part-0.jsonl:{n0 - 1}"


def test_parquet_with_joined_fields(files, code_docs):
    half = len(code_docs) // 2
    docs = hf_dataset_documents(
        path="parquet",
        data_files=["corpus/rows.parquet"],
        text_fields=["title", "content"],
        separator="\n---\n",
        base_dir=str(files),
    )
    first = code_docs[half]
    assert docs[0].data == (first.name + "\n---\n").encode() + first.data
    assert len(docs) == len(code_docs) - half and docs[0].name == "corpus/rows.parquet:0"


def test_streaming_reads_the_same_documents(files):
    kw = {"path": "json", "data_files": ["corpus/*.jsonl"], "base_dir": str(files)}
    assert hf_dataset_documents(streaming=True, **kw) == hf_dataset_documents(streaming=False, **kw)


def test_max_bytes_keeps_a_prefix_of_the_rows(files):
    kw = {"path": "json", "data_files": ["corpus/part-0.jsonl"], "base_dir": str(files)}
    every = hf_dataset_documents(**kw)
    cap = len(every[0].data) + len(every[1].data) + len(every[2].data) // 2
    assert hf_dataset_documents(max_bytes=cap, **kw) == every[:2]
    assert hf_dataset_documents(max_bytes=cap, streaming=True, **kw) == every[:2]


def test_a_local_dataset_directory_goes_through_the_hub_path(files):
    """A `path` that is no builder is what load_dataset resolves itself (a Hub name, or here a local
    dataset folder, the offline stand-in): rows named <path>/<split>:<row>."""
    folder = str(files / "corpus")
    docs = hf_dataset_documents(path=folder, data_files=["corpus/part-0.jsonl"], base_dir=str(files))
    assert docs[0].name == f"{folder}/train:0"
    assert [d.data for d in docs] == [
        d.data
        for d in hf_dataset_documents(path="json", data_files=["corpus/part-0.jsonl"], base_dir=str(files))
    ]


def test_relative_data_files_resolve_against_the_spec_file_and_split_stably(files):
    loaded = _spec(files, {"kind": "hf_dataset", "path": "json", "data_files": ["corpus/*.jsonl"]})
    docs = load_documents(loaded.spec.data, loaded.base_dir)
    train, val = split_documents(docs, val_fraction=0.1, seed=0)
    assert val and train and not {d.name for d in train} & {d.name for d in val}
    # the split is a function of the names: reading again, or from another directory, gives it again
    again = load_documents(loaded.spec.data, loaded.base_dir)
    assert split_documents(again, val_fraction=0.1, seed=0) == (train, val)


def test_a_tiny_run_trains_on_jsonl_and_parquet(files, tmp_path):
    from mlflow import MlflowClient

    from moeplat.train.run import run

    source = {
        "kind": "mixture",
        "sources": [
            {
                "name": "jsonl",
                "weight": 1,
                "source": {"kind": "hf_dataset", "path": "json", "data_files": ["corpus/*.jsonl"]},
            },
            {
                "name": "parquet",
                "weight": 1,
                "source": {
                    "kind": "hf_dataset",
                    "path": "parquet",
                    "data_files": ["corpus/rows.parquet"],
                    "text_field": "content",
                },
            },
        ],
    }
    loaded = _spec(
        files,
        source,
        "train.max_steps=3",
        "train.val_every=3",
        "train.schedule.warmup_steps=1",
        "data.val_tokens=128",
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run(loaded, runs_root=tmp_path / "runs", tracking_uri=uri, progress=False)
    metrics = MlflowClient(uri).get_run(result.run_id).data.metrics
    assert {"val/loss", "val/jsonl/loss", "val/parquet/loss", "val/parquet/bpb"} <= set(metrics)


@pytest.mark.parametrize(
    ("source", "field", "says"),
    [
        ({"data_files": ["corpus/nope-*.jsonl"]}, "data_files", "matched no files"),
        ({"data_files": ["missing.jsonl"]}, "data_files", "missing.jsonl"),
        ({"data_files": ["corpus/part-0.jsonl"], "text_field": "body"}, "text_field", "['path', 'text']"),
        ({"data_files": ["corpus/part-0.jsonl"], "text_fields": ["text", "body"]}, "text_fields", "'body'"),
        ({"data_files": ["corpus/part-0.jsonl"], "split": "validation"}, "split", "validation"),
        ({"data_files": ["empty.jsonl"]}, "", ""),
        ({"data_files": None}, "data_files", "list them in data_files"),
    ],
)
def test_bad_input_is_a_spec_error_naming_the_field(files, source, field, says):
    (files / "empty.jsonl").write_text("")
    loaded = _spec(files, {"kind": "hf_dataset", "path": "json", **source})
    with pytest.raises(SpecError) as info:
        build_data(loaded.spec, loaded.base_dir)
    (issue,) = info.value.issues
    assert issue.path.startswith("data.source.") and issue.path.endswith(field), issue
    assert says in issue.message


def test_an_uncached_hub_dataset_offline_says_where_it_looked(monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SourceError) as info:
        hf_dataset_documents(path="moeplat-tests/no-such-dataset")
    assert info.value.field == "path"
    assert "Hugging Face cache" in str(info.value) and "no-such-dataset" in str(info.value)


def test_prose_rows_are_documents_too(tmp_path):
    """The second domain through the same path: the Python docs' prose as a jsonl dump."""
    from moeplat.data.sources import python_docs_documents

    require_python_docs()
    prose = python_docs_documents(max_bytes=200_000)
    with open(tmp_path / "prose.jsonl", "w") as f:
        for d in prose:
            f.write(json.dumps({"text": d.data.decode("utf-8")}) + "\n")
    docs = hf_dataset_documents(path="json", data_files=["prose.jsonl"], base_dir=str(tmp_path))
    assert [d.data for d in docs] == [d.data for d in prose]


def test_the_example_spec_trains_on_jsonl_made_as_the_docs_say(tmp_path):
    """specs/data/hf-jsonl.yaml over jsonl files written as docs/data.md writes them (here in
    tmp_path, named through --set instead of in specs/data/hf-jsonl/)."""
    from mlflow import MlflowClient

    from moeplat.train.run import run

    docs = python_stdlib_documents(max_bytes=400_000)
    for part in range(2):
        with open(tmp_path / f"part-{part}.jsonl", "w") as f:
            for d in docs[part::2]:
                f.write(json.dumps({"text": d.data.decode("utf-8", "replace"), "path": d.name}) + "\n")
    small = [
        "model.d_model=32",
        "model.n_layers=1",
        "model.n_heads=2",
        "model.n_kv_heads=1",
        "model.moe.num_experts=2",
        "model.moe.top_k=1",
        "model.moe.experts.d_ff=32",
        "model.max_seq_len=32",
        "train.batch_size=4",
        "train.max_steps=2",
        "train.val_every=2",
        "train.schedule.warmup_steps=1",
        "data.val_tokens=64",
        "tracking.system_metrics=false",
    ]
    loaded = load_spec(
        REPO / "specs" / "data" / "hf-jsonl.yaml", [f"data.source.data_files=[{tmp_path}/*.jsonl]", *small]
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run(loaded, runs_root=tmp_path / "runs", tracking_uri=uri, progress=False)
    params = MlflowClient(uri).get_run(result.run_id).data.params
    assert int(params["data.corpus.documents"]) == len(docs)


def test_name_picks_a_configuration_of_a_dataset_folder(files, code_docs):
    """`name` is load_dataset's configuration (FineWeb-Edu's sample-10BT, say): here a local dataset
    folder, relative to the spec file, whose README declares two configurations as the Hub's do."""
    folder = files / "two-configs"
    (folder / "code").mkdir(parents=True)
    (folder / "prose").mkdir()
    (folder / "code" / "a.jsonl").write_text((files / "corpus" / "part-0.jsonl").read_text())
    prose_rows = (files / "corpus" / "part-1.jsonl").read_text().splitlines()[:3]
    (folder / "prose" / "b.jsonl").write_text("\n".join(prose_rows) + "\n")
    (folder / "README.md").write_text(
        "---\nconfigs:\n- config_name: code\n  data_files: code/*.jsonl\n"
        "- config_name: prose\n  data_files: prose/*.jsonl\n---\n"
    )
    loaded = _spec(files, {"kind": "hf_dataset", "path": "two-configs", "name": "prose"})
    docs = load_documents(loaded.spec.data, loaded.base_dir)
    assert [d.name for d in docs] == [f"two-configs/prose/train:{i}" for i in range(3)]
    assert docs[0].data.decode() == json.loads(prose_rows[0])["text"]
    code = load_documents(
        _spec(files, {"kind": "hf_dataset", "path": "two-configs", "name": "code"}).spec.data, str(files)
    )
    assert len(code) == len((files / "corpus" / "part-0.jsonl").read_text().splitlines())
