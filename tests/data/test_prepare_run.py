"""End to end: `moeplat run` of a two-source mixture with data.prepared_dir prepares the shards,
trains from them and logs per-source validation and bits per byte; a second run reuses them and
ends with the same validation loss."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient

from moeplat.cli.main import main

pytestmark = pytest.mark.slow

TINY = Path(__file__).resolve().parents[1] / "fixtures" / "tiny.yaml"
SPEC = f"""extends: {TINY}
name: prepared-mixture
data:
  source:
    kind: mixture
    sources:
      - {{name: lib, weight: 3, source: {{kind: python_stdlib, max_bytes: 300000}}}}
      - {{name: tests, weight: 1, source: {{kind: python_stdlib, max_bytes: 200000, include_tests: true}}}}
  prepared_dir: shards
train: {{max_steps: 6, val_every: 6}}
parallel: {{accelerator: cpu}}
tracking: {{experiment: prepared-run}}
"""


def test_run_from_a_prepared_mixture_then_reuse(workdir, capsys):
    spec = workdir / "spec.yaml"
    spec.write_text(SPEC)
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    argv = ["run", str(spec), "--no-progress", "--tracking-uri", uri]
    assert main(argv) == 0
    assert "data: prepared" in capsys.readouterr().err
    assert main(argv) == 0
    assert "reusing the prepared corpus" in capsys.readouterr().err
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("prepared-run").experiment_id])
    assert len(runs) == 2
    first, second = (r.data.metrics for r in runs)
    for key in (
        "val/loss",
        "val/bpb",
        "val/lib/loss",
        "val/tests/loss",
        "val/lib/bpb",
        "data/unigram_baseline",
    ):
        assert key in first, key
    assert first["val/loss"] == pytest.approx(second["val/loss"], rel=1e-6)  # same data, same seed
    assert runs[0].data.params["data.corpus.lib.weight"] == "3.0"
