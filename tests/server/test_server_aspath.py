"""load_spec / load_sweep `as_path` and `roots`, and `moeplat run|sweep --as-path` (how a worker
runs its copy of a submitted spec at the spec's virtual place under the spec root)."""

from __future__ import annotations

import pytest
from server_helpers import spec_root  # noqa: F401  (fixture)

from moeplat.cli.main import main
from moeplat.errors import SpecError
from moeplat.spec import load_spec
from moeplat.spec.sweep import load_sweep

SWEEP = "extends: tiny.yaml\nname: s\nsearch:\n  model.moe.top_k: {kind: int, low: 1, high: 2}\ntrials: {n_trials: 1}\n"


def test_as_path_resolves_from_the_virtual_place(tmp_path, spec_root):  # noqa: F811
    copy = tmp_path / "jobs" / "7" / "tiny.yaml"
    copy.parent.mkdir(parents=True)
    copy.write_text((spec_root / "tiny.yaml").read_text())
    with pytest.raises(SpecError, match="spec file not found"):
        load_spec(copy)  # extends: quickstart.yaml is not next to the copy
    loaded = load_spec(copy, ["train.max_steps=6"], as_path=spec_root / "tiny.yaml")
    assert loaded.spec.name == "tiny" and loaded.spec.train.max_steps == 6
    assert loaded.files == [str(copy), str(spec_root / "quickstart.yaml")]  # artifacts: the real file
    assert loaded.base_dir == str(spec_root)

    (tmp_path / "s.yaml").write_text(SWEEP)
    sweep = load_sweep(tmp_path / "s.yaml", as_path=spec_root / "s.yaml")
    assert sweep.path == str(tmp_path / "s.yaml") and sweep.base.spec.name == "tiny"


def test_as_path_errors_name_the_virtual_file(tmp_path, spec_root, capsys):  # noqa: F811
    copy = tmp_path / "copy.yaml"
    copy.write_text((spec_root / "tiny.yaml").read_text().replace("top_k: 2", "top_k: 0"))
    assert main(["run", str(copy), "--as-path", str(spec_root / "tiny.yaml")]) == 2
    err = capsys.readouterr().err
    assert f"{spec_root / 'tiny.yaml'}:" in err and "model.moe.top_k" in err


def test_roots_confine_extends_without_reading(tmp_path, spec_root):  # noqa: F811
    outside = tmp_path / "outside.yaml"
    outside.write_text("{{{ not yaml")
    text = "extends: ../outside.yaml\n"
    with pytest.raises(SpecError) as e:
        load_spec(spec_root / "x.yaml", text=text, roots=(spec_root,))
    assert [i.path for i in e.value.issues] == ["extends"] and "YAML" not in str(e.value)
    with pytest.raises(SpecError, match="YAML syntax error"):  # without roots: it is read
        load_spec(spec_root / "x.yaml", text=text)
