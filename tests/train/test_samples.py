"""train.samples: a tiny run continues its prompts at every checkpoint and at the end, and logs
each time an MLflow table samples/step_<N>.json (prompt, completion, step, settings)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from moeplat.errors import SpecError
from moeplat.evaluate.load import load_trained
from moeplat.nn.generate import generate
from moeplat.spec import load_spec
from moeplat.train.run import run

TINY = Path(__file__).resolve().parents[1] / "fixtures" / "tiny.yaml"
SAMPLES = 'train.samples={prompts: ["def ", "import os\\n"], max_new_tokens: 6}'
BASE = ["tracking.system_metrics=false", "train.max_steps=6", "train.val_every=3"]


def _table(client: MlflowClient, run_id: str, path: str, tmp: Path) -> dict:
    local = client.download_artifacts(run_id, path, str(tmp))
    split = json.loads(Path(local).read_text())  # log_table's pandas "split" orientation
    return {c: [row[i] for row in split["data"]] for i, c in enumerate(split["columns"])}


@pytest.mark.slow  # trains for ~30 s on a shared 2-core CPU
def test_a_run_logs_its_samples_at_each_checkpoint_and_the_end(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    loaded = load_spec(TINY, [*BASE, SAMPLES])
    result = run(loaded, runs_root=tmp_path / "runs", tracking_uri=uri, progress=False)
    client = MlflowClient(uri)
    logged = sorted(a.path for a in client.list_artifacts(result.run_id, "samples"))
    assert logged == ["samples/step_3.json", "samples/step_6.json"]
    tags = json.loads(client.get_run(result.run_id).data.tags["mlflow.loggedArtifacts"])
    assert {"path": "samples/step_6.json", "type": "table"} in tags  # the UI shows it as a table
    last = _table(client, result.run_id, "samples/step_6.json", tmp_path / "dl")
    assert last["prompt"] == ["def ", "import os\n"] and last["step"] == [6, 6]
    assert json.loads(last["settings"][0])["max_new_tokens"] == 6
    # the completions are the final model's greedy continuation, stopped at eos
    final = load_trained(result.run_dir)
    ids = [a.tolist() for a in final.tok.encode_texts(last["prompt"])]
    gen = generate(final.model, ids, max_new_tokens=6, eos_id=final.tok.eos_id)
    assert last["completion"] == [final.tok.decode(t) for t in gen.tokens]
    on_disk = json.loads((Path(result.run_dir) / "samples" / "step_3.json").read_text())
    assert on_disk["step"] == [3, 3] and len(on_disk["completion"]) == 2


def test_too_long_a_prompt_is_a_spec_error_before_the_run_starts(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    loaded = load_spec(TINY, [*BASE, "train.samples={prompts: [abc], max_new_tokens: 30}"])
    with pytest.raises(SpecError) as e:
        run(loaded, runs_root=tmp_path / "runs", tracking_uri=uri, progress=False)
    (issue,) = e.value.issues
    assert issue.path == "train.samples.max_new_tokens"
    assert "prompt (3 tokens) + max_new_tokens (30) = 33 > the model's max_seq_len 32" in issue.message
    assert not (tmp_path / "mlflow.db").exists() or not MlflowClient(uri).search_experiments(
        filter_string="name = 'tiny-tests'"
    )


def test_empty_prompts_are_refused_by_validation():
    with pytest.raises(SpecError, match=r"train.samples.prompts.1: is empty"):
        load_spec(TINY, ['train.samples={prompts: ["a", ""]}'])
    with pytest.raises(SpecError, match=r"train.samples.prompts"):
        load_spec(TINY, ["train.samples={prompts: []}"])


@pytest.mark.parametrize(
    ("field", "inside", "outside"),
    [
        ("max_new_tokens", 1, 0),
        ("temperature", 0.0, -1e-6),
        ("top_k", 1, 0),
        ("top_p", 1e-6, 0.0),
        ("seed", 0, -1),
    ],
)
def test_the_numbers_of_train_samples_are_bounded(field, inside, outside):
    """The bound probe of tests/spec/test_spec_bounds.py cannot place train.samples (prompts are
    text): its numbers are probed here, at and just past each bound."""
    ok = load_spec(TINY, [f"train.samples={{prompts: [a], {field}: {inside}}}"])
    assert getattr(ok.spec.train.samples, field) == inside
    with pytest.raises(SpecError, match=rf"train\.samples\.{field}"):
        load_spec(TINY, [f"train.samples={{prompts: [a], {field}: {outside}}}"])
    if field == "top_p":
        assert load_spec(TINY, ["train.samples={prompts: [a], top_p: 1.0}"]).spec.train.samples.top_p == 1.0
        with pytest.raises(SpecError, match=r"train\.samples\.top_p"):
            load_spec(TINY, ["train.samples={prompts: [a], top_p: 1.000001}"])
