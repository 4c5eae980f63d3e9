"""Tokenizers in real runs: a BPE run keeps its tokenizer.json (run directory and MLflow artifact)
and logs bits per byte, bytes per token and the unigram baseline in bpb; with bytes, bpb is the
loss in bits."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from mlflow import MlflowClient

from moeplat.spec import load_spec
from moeplat.train.run import run

pytestmark = pytest.mark.slow

TINY = Path(__file__).resolve().parents[1] / "fixtures" / "tiny.yaml"
BPE = ["data.tokenizer={kind: bpe, vocab_size: 800}", "model.vocab_size=auto"]
SHORT = ["train.max_steps=4", "train.val_every=4"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tokruns")
    mp = pytest.MonkeyPatch()
    mp.setenv("MOEPLAT_CACHE_DIR", str(tmp / "cache"))
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    out = {}
    for name, overrides in (("bpe", [*BPE, *SHORT]), ("byte", SHORT)):
        result = run(load_spec(TINY, overrides), runs_root=tmp / name, tracking_uri=uri, progress=False)
        out[name] = (result, MlflowClient(uri).get_run(result.run_id))
    yield out, MlflowClient(uri)
    mp.undo()


def test_bpe_run_keeps_its_tokenizer(runs):
    from tokenizers import Tokenizer

    (result, mlrun), client = runs[0]["bpe"], runs[1]
    local = Path(result.run_dir) / "tokenizer.json"
    assert Tokenizer.from_file(str(local)).get_vocab_size() == 800
    art = client.download_artifacts(
        mlrun.info.run_id, "tokenizer/tokenizer.json", str(Path(result.run_dir) / "dl")
    )
    assert Path(art).read_text() == local.read_text()
    assert not (Path(runs[0]["byte"][0].run_dir) / "tokenizer.json").exists()  # bytes need no file


def test_bpe_run_logs_bits_per_byte(runs):
    (result, mlrun) = runs[0]["bpe"]
    m = mlrun.data.metrics
    assert m["val/bpb"] == pytest.approx(result.val_bpb)
    assert 2.0 < m["data/bytes_per_token"] < 5.0  # BPE of 800 on Python source
    # the unigram baseline in bpb is its nats over the bytes those validation tokens cover
    val_bytes_per_token = m["data/unigram_baseline"] / (math.log(2) * m["data/unigram_baseline_bpb"])
    assert 2.0 < val_bytes_per_token < 5.0
    assert m["val/bpb"] < m["val/loss"] / math.log(2)  # each token covers more than a byte


def test_byte_run_bpb_is_the_loss_in_bits(runs):
    _, mlrun = runs[0]["byte"]
    m = mlrun.data.metrics
    assert m["val/bpb"] == pytest.approx(m["val/loss"] / math.log(2), rel=1e-6)
    assert m["data/bytes_per_token"] == 1.0
    assert m["data/unigram_baseline_bpb"] == pytest.approx(m["data/unigram_baseline"] / math.log(2))
