"""`moeplat generate RUN`: a tiny trained run continues text (streamed, tokens/s), --json, --log to
the run's samples/generate.json table; bad input exits 2 with a message naming the option."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from moeplat.cli.main import main
from moeplat.evaluate.generate import generate
from moeplat.evaluate.load import load_trained
from moeplat.spec import load_spec
from moeplat.train.run import run

TINY = Path(__file__).resolve().parents[1] / "fixtures" / "tiny.yaml"
slow = pytest.mark.slow  # the fixture trains a tiny run (~20 s on a shared 2-core CPU)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("generate")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    loaded = load_spec(TINY, ["tracking.system_metrics=false", "train.max_steps=6"])
    return run(loaded, runs_root=tmp / "runs", tracking_uri=uri, progress=False), uri


def _gen(capsys, *args) -> tuple[int, str, str]:
    code = main(["generate", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def _greedy(run_dir: str, prompt: str, n: int) -> str:
    loaded = load_trained(run_dir)
    (ids,) = loaded.tok.encode_texts([prompt])
    gen = generate(loaded.model, [ids.tolist()], max_new_tokens=n, eos_id=loaded.tok.eos_id)
    return loaded.tok.decode(gen.tokens[0])


@slow
def test_generate_streams_text_and_prints_tokens_per_s(finished, capsys):
    result, uri = finished
    code, out, _ = _gen(
        capsys, result.run_id, "--tracking-uri", uri, "--prompt", "def ", "--max-new-tokens", "12"
    )
    assert code == 0
    expected = _greedy(result.run_dir, "def ", 12)
    assert out.startswith("def " + expected + "\n")
    assert "tokens/s (KV cache)" in out.splitlines()[-1]


@slow
def test_generate_json_with_and_without_the_cache_from_a_run_directory(finished, capsys, tmp_path):
    result, _ = finished
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("import \n\nclass A:\n")
    args = [result.run_dir, "--prompts", str(prompts), "--max-new-tokens", "10", "--json"]
    code, out, _ = _gen(capsys, *args)
    assert code == 0
    got = json.loads(out)
    assert [s["prompt"] for s in got["samples"]] == ["import ", "class A:"]
    assert got["samples"][0]["completion"] == _greedy(result.run_dir, "import ", 10)
    assert got["new_tokens"] == sum(s["new_tokens"] for s in got["samples"]) and got["tokens_per_s"] > 0
    assert got["step"] == 6 and got["settings"]["max_new_tokens"] == 10
    code, out, _ = _gen(capsys, *args, "--no-cache")
    assert [s["completion"] for s in json.loads(out)["samples"]] == [s["completion"] for s in got["samples"]]
    sampled = [*args, "--temperature", "1.0", "--top-k", "20", "--top-p", "0.9", "--seed", "1"]
    first, again = (json.loads(_gen(capsys, *sampled)[1])["samples"] for _ in range(2))
    assert first == again  # seeded


@slow
def test_generate_log_appends_to_the_runs_samples_table(finished, capsys, tmp_path):
    result, uri = finished
    for prompt in ("def ", "import "):
        code, _, err = _gen(
            capsys, result.run_id, "--tracking-uri", uri, "--prompt", prompt, "--max-new-tokens", "4", "--log"
        )
        assert code == 0 and "as samples/generate.json" in err, err
    client = MlflowClient(uri)
    local = client.download_artifacts(result.run_id, "samples/generate.json", str(tmp_path))
    table = json.loads(Path(local).read_text())
    rows = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
    assert [r["prompt"] for r in rows] == ["def ", "import "] and all(r["step"] == 6 for r in rows)
    assert rows[0]["completion"] == _greedy(result.run_dir, "def ", 4)
    assert json.loads(rows[0]["settings"])["max_new_tokens"] == 4


@slow
def test_too_long_a_prompt_names_max_new_tokens_and_the_limit(finished, capsys):
    result, _ = finished
    code, _, err = _gen(capsys, result.run_dir, "--prompt", "abcdef", "--max-new-tokens", "30")
    assert code == 2
    assert (
        "error: prompt 1: prompt (6 tokens) + --max-new-tokens (30) = 36 > the model's max_seq_len 32" in err
    )
    assert "lower --max-new-tokens to at most 26" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--prompt", "a", "--top-p", "1.5"], "--top-p must be in (0, 1]"),
        (["--prompt", "a", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
        (["--prompt", "a", "--temperature", "-1"], "--temperature must be >= 0"),
        (["--prompt", "a", "--top-k", "0"], "--top-k must be >= 1"),
        ([], "give one of --prompt TEXT or --prompts FILE"),
        (["--prompts", "no/such/file.txt"], "--prompts no/such/file.txt: no such file"),
    ],
)
def test_bad_options_exit_2_before_loading(capsys, args, message):
    code, _, err = _gen(capsys, "whatever", *args)
    assert code == 2 and message in err and "Traceback" not in err


def test_an_unknown_run_exits_2(capsys, tmp_path):
    code, _, err = _gen(capsys, "no/such/run", "--prompt", "a")
    assert code == 2 and "no/such/run: no such file or directory" in err
    code, _, err = _gen(capsys, "abc123", "--prompt", "a", "--tracking-uri", f"sqlite:///{tmp_path / 'x.db'}")
    assert code == 2 and "no MLflow store" in err


def test_an_empty_prompts_file_exits_2(capsys, tmp_path):
    empty = tmp_path / "p.txt"
    empty.write_text("\n  \n")
    code, _, err = _gen(capsys, "whatever", "--prompts", str(empty))
    assert code == 2 and "no prompt in it" in err


def test_the_stream_holds_back_a_split_utf8_character():
    import io

    from moeplat.cli.generate import _Stream
    from moeplat.data.tokenizers import ByteTok

    out = io.StringIO()
    stream = _Stream(ByteTok(), out)
    shown = []
    for byte in "aé€".encode():
        stream.token(0, byte)
        shown.append(out.getvalue())
    assert shown == ["a", "a", "aé", "aé", "aé", "aé€"]  # é is 2 bytes, € is 3
    stream.token(0, 0xE2)  # the first byte of a character that never ends
    stream.finish()
    assert out.getvalue() == "aé€\ufffd"
