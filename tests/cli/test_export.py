"""`moeplat export` / `moeplat import` on a tiny trained run: transformers reads the export and
computes moeplat's logits, moeplat's own safetensors file reads back, the imported spec starts a
run from the checkpoint with transformers' logits, and bad input is refused without leftovers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moeplat.cli.main import main
from moeplat.evaluate import export as export_mod
from moeplat.evaluate.load import load_trained
from moeplat.spec import load_spec
from moeplat.train.run import run

pytestmark = pytest.mark.slow

TINY = Path(__file__).resolve().parents[1] / "fixtures" / "tiny.yaml"


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    loaded = load_spec(TINY, ["tracking.system_metrics=false", "train.max_steps=4", "train.val_every=4"])
    result = run(loaded, runs_root=tmp / "runs", tracking_uri=uri, progress=False)
    return result, uri


def _cli(capsys, *args) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def _logits(model, idx_BS):
    with torch.no_grad():
        return model(idx_BS).logits_BSV


IDX = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))


def test_safetensors_export_reads_back_as_the_same_model(finished, tmp_path, capsys):
    result, uri = finished
    out = tmp_path / "st"
    code, stdout, err = _cli(
        capsys, "export", result.run_id, "--tracking-uri", uri, "--format", "safetensors", "-o", str(out)
    )
    assert code == 0, err
    assert "moeplat safetensors" in stdout and (out / "model.safetensors").is_file()
    original = load_trained(result.run_id, uri)
    again = load_trained(str(out))
    assert again.spec == original.spec and again.run_id == result.run_id
    torch.testing.assert_close(_logits(again.model, IDX), _logits(original.model, IDX), rtol=0, atol=0)
    also = load_trained(str(out / "model.safetensors"))  # the file alone carries its spec
    assert also.meta["step"] == original.meta["step"] == 4


def test_export_refuses_an_existing_target_and_replaces_it_with_force(finished, tmp_path, capsys):
    result, uri = finished
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    code, _, err = _cli(
        capsys, "export", result.run_id, "--tracking-uri", uri, "--format", "safetensors", "-o", str(out)
    )
    assert code == 2 and "exists" in err and "--force" in err and (out / "keep.txt").exists()
    code, _, err = _cli(
        capsys,
        "export",
        result.run_id,
        "--tracking-uri",
        uri,
        "--format",
        "safetensors",
        "-o",
        str(out),
        "--force",
    )
    assert code == 0, err
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]  # no partial or old directory left


def test_an_interrupted_export_leaves_nothing_behind(finished, tmp_path, monkeypatch):
    result, uri = finished
    loaded = load_trained(result.run_id, uri)

    def boom(*_args, **_kw):
        raise KeyboardInterrupt

    monkeypatch.setattr("safetensors.torch.save_model", boom)
    with pytest.raises(KeyboardInterrupt):
        export_mod.export_safetensors(loaded, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_export_of_an_unknown_run_or_path_is_a_usage_error(finished, tmp_path, capsys):
    _, uri = finished
    code, _, err = _cli(
        capsys, "export", "0123456789abcdef", "--tracking-uri", uri, "-o", str(tmp_path / "x")
    )
    assert code == 2 and "no run '0123456789abcdef'" in err
    code, _, err = _cli(capsys, "export", str(tmp_path / "nothing" / "here.ckpt"), "-o", str(tmp_path / "x"))
    assert code == 2 and "no such file" in err
    assert not (tmp_path / "x").exists()


def test_a_run_directory_and_its_checkpoint_load_the_run_s_final_weights(finished):
    result, uri = finished
    by_id = load_trained(result.run_id, uri)
    for ref in (result.run_dir, str(Path(result.run_dir) / "checkpoints" / "last.ckpt")):
        by_path = load_trained(ref)
        assert by_path.run_id == result.run_id and by_path.meta["step"] == 4
        torch.testing.assert_close(_logits(by_path.model, IDX), _logits(by_id.model, IDX), rtol=0, atol=0)
