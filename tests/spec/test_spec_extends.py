"""`extends:` semantics: deep merge, variant replacement, list replacement, relative paths, origins."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from moeplat.spec import load_spec
from moeplat.spec.data_section import TextFilesSource
from moeplat.spec.moe import FirstDense, LayerList
from moeplat.spec.sections import Constant, WarmupCosine

QUICKSTART = Path(__file__).resolve().parents[2] / "specs" / "quickstart.yaml"


@pytest.fixture
def chain(write):
    """base (a copy of quickstart) <- family/mid <- experiments/child, each extends by a relative path."""
    base = write("specs/base.yaml", QUICKSTART.read_text())
    mid = write(
        "specs/family/mid.yaml",
        """\
extends: ../base.yaml
name: mid
model:
  moe:
    experts: {d_ff: 96}
    layers: {kind: first_dense, k: 1}
  dense_ffn: {kind: swiglu, d_ff: 256}
train:
  schedule: {kind: warmup_cosine, warmup_steps: 30, min_lr_ratio: 0.3}
""",
    )
    child = write(
        "experiments/child.yaml",
        """\
extends: ../specs/family/mid.yaml
name: child
model:
  moe:
    losses:
      z_loss: {coef: 0.0}
train:
  schedule: {kind: warmup_cosine, warmup_steps: 10}
""",
    )
    return base, mid, child


def test_three_file_chain_merges_deep_keys(chain):
    base, mid, child = chain
    loaded = load_spec(child)
    assert [Path(f).resolve() for f in loaded.files] == [child.resolve(), mid.resolve(), base.resolve()]
    moe = loaded.spec.model.moe
    assert loaded.spec.name == "child"
    assert moe.losses.z_loss.coef == 0.0  # child
    assert moe.losses.load_balancing.coef == 0.01  # base, a sibling of the key the child set
    assert (moe.experts.kind, moe.experts.d_ff) == ("swiglu", 96)  # kind from base, d_ff from mid
    assert moe.num_experts == 16 and moe.top_k == 4  # base
    assert loaded.spec.model.moe_layers == [1, 2, 3]  # mid's first_dense
    assert "extends" not in loaded.resolved


def test_restating_the_same_kind_merges_into_the_base_variant(chain):
    *_, child = chain
    schedule = load_spec(child).spec.train.schedule
    assert schedule == WarmupCosine(kind="warmup_cosine", warmup_steps=10, min_lr_ratio=0.3)


def test_changing_kind_replaces_the_mapping(chain, write):
    *_, child = chain
    # mid's first_dense has `k`, its warmup_cosine has `min_lr_ratio`: neither exists in the new variants,
    # so a merge would fail validation with unknown keys.
    leaf = write(
        "experiments/leaf.yaml",
        """\
extends: child.yaml
model:
  moe:
    layers: {kind: list, layers: [1, 3]}
train:
  schedule: {kind: constant}
""",
    )
    loaded = load_spec(leaf)
    assert loaded.resolved["model"]["moe"]["layers"] == {"kind": "list", "layers": [1, 3]}
    assert loaded.resolved["train"]["schedule"] == {"kind": "constant"}
    assert loaded.spec.model.moe.layers == LayerList(kind="list", layers=[1, 3])
    assert loaded.spec.train.schedule == Constant(kind="constant", warmup_steps=0)
    assert isinstance(load_spec(child).spec.model.moe.layers, FirstDense)


def test_lists_are_replaced_not_merged(write):
    base = write(
        "base.yaml",
        f"extends: {QUICKSTART}\ndata:\n  source: {{kind: text_files, paths: [a, b, c], patterns: ['*.py']}}\n",
    )
    child = write("child.yaml", f"extends: {base.name}\ndata:\n  source: {{paths: [d]}}\n")
    source = load_spec(child).spec.data.source
    assert source == TextFilesSource(kind="text_files", paths=["d"], patterns=["*.py"])


def test_relative_extends_resolves_against_the_extending_files_directory(chain, monkeypatch, tmp_path):
    *_, child = chain
    # mid says `extends: ../base.yaml`. Read from the child's directory or from the working
    # directory, that names no file; only mid's own directory (specs/family) makes the chain load.
    elsewhere = tmp_path / "elsewhere" / "deeper"
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    assert not (child.parent / "../base.yaml").exists()
    assert not Path("../base.yaml").exists()
    assert load_spec(child).spec.name == "child"
    assert load_spec(os.path.relpath(child)).spec.name == "child"  # ../../experiments/child.yaml


def test_interpolation_is_resolved_after_the_merge(write):
    child = write("child.yaml", f"extends: {QUICKSTART}\nmodel:\n  max_seq_len: 64\n")
    # quickstart says data.seq_len: ${model.max_seq_len}; the child's value wins.
    assert load_spec(child).spec.data.seq_len == 64


def test_a_child_that_changes_nothing_has_the_bases_hash(write):
    child = write("child.yaml", f"extends: {QUICKSTART}\n")
    assert load_spec(child).spec_hash == load_spec(QUICKSTART).spec_hash
    assert load_spec(child).resolved == load_spec(QUICKSTART).resolved


# --- where errors point ------------------------------------------------------------------------


def test_bad_value_in_the_base_points_at_the_base(write, issues_of):
    base = write("base.yaml", f"extends: {QUICKSTART}\nmodel:\n  dropout: 1.0\n")
    child = write("child.yaml", "extends: base.yaml\nname: child\n")
    (issue,) = issues_of(child)
    assert (issue.path, issue.file, issue.line) == ("model.dropout", str(base), 3)


def test_bad_value_set_by_the_child_points_at_the_child(write, issues_of):
    base = write("base.yaml", f"extends: {QUICKSTART}\nmodel:\n  dropout: 0.1\n")
    child = write("child.yaml", f"extends: {base.name}\n\nmodel:\n  dropout: 1.5\n")
    (issue,) = issues_of(child)
    assert (issue.path, issue.file, issue.line) == ("model.dropout", str(child), 4)


def test_errors_point_at_the_file_of_each_generation(write, issues_of):
    child = write("child.yaml", f"extends: {QUICKSTART}\nmodel:\n  moe:\n    num_experts: 1\n")
    (issue,) = issues_of(child)
    assert (issue.path, issue.file, issue.line) == ("model.moe.num_experts", str(child), 4)
    grandchild = write(
        "grandchild.yaml", "extends: child.yaml\nmodel:\n  moe:\n    num_experts: 2\n    top_k: 3\n"
    )
    (issue,) = issues_of(grandchild)
    assert (issue.path, issue.file, issue.line) == ("model.moe.top_k", str(grandchild), 5)


def test_replaced_variant_forgets_the_bases_lines(write, issues_of):
    base = write(
        "base.yaml",
        f"extends: {QUICKSTART}\nmodel:\n  moe:\n    capacity: {{kind: factor, train: 1.5}}\n",
    )
    child = write(
        "child.yaml",
        f"extends: {base.name}\nmodel:\n  moe:\n    capacity:\n      kind: dropless\n      eval: 2.0\n",
    )
    (issue,) = issues_of(child)
    # `eval` belongs to the base's factor variant; the child restated it under dropless, on its line 6.
    assert (issue.path, issue.file, issue.line) == ("model.moe.capacity.eval", str(child), 6)


def test_child_removing_moe_is_told_to_add_dense_ffn_at_its_model_line(write, issues_of):
    child = write("child.yaml", f"extends: {QUICKSTART}\nname: dense\nmodel:\n  moe: null\n")
    (issue,) = issues_of(child)
    assert (issue.path, issue.file, issue.line) == ("model.dense_ffn", str(child), 3)


def test_data_paths_resolve_against_the_file_that_set_them(write, tmp_path, monkeypatch):
    quickstart = Path(__file__).resolve().parents[2] / "specs" / "quickstart.yaml"
    base = write(
        "shared/base.yaml",
        f"extends: {os.path.relpath(quickstart, tmp_path / 'shared')}\n"
        "data:\n  source: {kind: text_files, paths: [corpus]}\n",
    )
    child = write("exp/child.yaml", "extends: ../shared/base.yaml\nname: child\n")
    assert load_spec(child).base_dir == str(base.parent.resolve())  # the base named the paths

    moved = write("exp/moved.yaml", "extends: ../shared/base.yaml\ndata:\n  source: {paths: [mine]}\n")
    assert load_spec(moved).base_dir == str(moved.parent.resolve())

    monkeypatch.chdir(tmp_path)
    assert load_spec(child, ["data.source.paths=[x]"]).base_dir == str(tmp_path.resolve())
