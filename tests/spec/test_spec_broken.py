"""A corpus of broken specs (tests/spec/broken/) and the exact issues each must report.

Each issue is pinned to a dotted path, a file and a line, with a message and (for unknown keys and
kinds) a did-you-mean. A file with several problems must report every one of them in one error.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from moeplat.errors import SpecError
from moeplat.spec import load_spec

BROKEN = Path(__file__).parent / "broken"
ROUTER_KINDS = (
    "'topk', 'top_p', 'switch', 'noisy_topk', 'gshard', 'hash', 'random', 'sigmoid_bias', 'group_limited', "
    "'sinkhorn', 'expert_choice', 'reinforce'"
)
QUICKSTART = Path(__file__).resolve().parents[2] / "specs" / "quickstart.yaml"


@dataclass(frozen=True)
class Want:
    path: str  # dotted path; "" for the whole file
    line: int | None
    message: str  # a substring of the issue's message
    hint: str | None = None  # the whole hint; None asserts there is none
    file: str = ""  # name of the file the issue must name; "" = the broken spec itself


def unknown(path: str, line: int, suggestion: str) -> Want:
    return Want(path, line, "unknown key", f"did you mean '{suggestion}'?")


def bad_kind(path: str, line: int, expected: str, suggestion: str | None) -> Want:
    hint = f"did you mean '{suggestion}'?" if suggestion else None
    return Want(path, line, f"unknown kind; expected one of {expected}", hint)


CORPUS: dict[str, list[Want]] = {
    "typos.yaml": [
        unknown("nmae", 3, "name"),
        unknown("model.d_modle", 5, "d_model"),
        unknown("model.moe.num_expert", 7, "num_experts"),
        unknown("model.moe.router.normalise", 8, "normalize"),
        unknown("model.moe.losses.z_loss.coeff", 10, "coef"),
        unknown("data.source.max_byte", 12, "max_bytes"),
        unknown("train.optimizer.weight_decy", 14, "weight_decay"),
        unknown("train.schedule.warmup_step", 15, "warmup_steps"),
        unknown("tracking.experimnt", 17, "experiment"),
        unknown("parallel.acelerator", 19, "accelerator"),
    ],
    "wrong_types.yaml": [
        Want("model.d_model", 4, "valid integer"),  # the string "128"
        Want("model.n_layers", 5, "valid integer"),  # the float 4.0
        Want("model.n_heads", 6, "valid integer"),  # a list
        Want("model.tie_embeddings", 7, "valid boolean"),  # the int 1
        Want("model.moe.router", 9, "should be an object"),  # a list for a mapping
        Want("model.moe.losses.z_loss.coef", 11, "valid number"),  # a bool for a float
        Want("data.source", 13, "should be an object"),
        Want("train.batch_size", 15, "valid integer"),  # a bool for an int
        Want("train.max_steps", 16, "valid integer"),  # the string "300"
    ],
    "out_of_range.yaml": [
        Want("model.dropout", 4, "less than 1"),
        Want("model.moe.top_k", 6, "greater than 0"),
        Want("data.val_fraction", 8, "less than or equal to 0.5"),
        Want("train.max_steps", 10, "greater than 0"),
        Want("train.optimizer.lr", 11, "greater than 0"),
    ],
    "unknown_kind.yaml": [
        bad_kind("model.moe.layers.kind", 5, "'all', 'every', 'first_dense', 'list'", "every"),
        bad_kind("model.moe.router.kind", 6, ROUTER_KINDS, "top_p"),  # topp is nearest to top_p
        bad_kind("model.moe.capacity.kind", 7, "'dropless', 'factor'", "factor"),
        bad_kind("model.moe.dispatch.kind", 8, "'loop', 'sorted'", None),  # "banana" is close to nothing
        bad_kind("data.source.kind", 10, "'python_stdlib', 'text_files'", "python_stdlib"),
        bad_kind("train.optimizer.kind", 12, "'adamw'", "adamw"),
        bad_kind("train.schedule.kind", 13, "'warmup_cosine', 'constant'", "warmup_cosine"),
    ],
    "list_items.yaml": [
        Want("model.moe.layers.layers.2", 10, "greater than or equal to 0"),
        Want("train.optimizer.betas.1", 13, "less than 1"),
    ],
    "missing_kind.yaml": [
        Want("model.moe.router", 18, "needs a 'kind' key", f"expected one of {ROUTER_KINDS}"),
        Want(
            "data.source",
            27,
            "needs a 'kind' key",
            "expected one of 'python_stdlib', 'text_files', 'python_docs', 'hf_dataset', 'mixture', 'prepared'",
        ),
    ],
    "kind_typo.yaml": [  # the key typed, not "needs a 'kind' key"
        Want(
            "model.moe.layers.kidn",
            17,
            "unknown key",
            "did you mean 'kind'? It chooses the variant, one of 'all', 'every', 'first_dense', 'list'",
        ),
        Want(
            "model.moe.router.Kind",
            18,
            "unknown key",
            f"did you mean 'kind'? It chooses the variant, one of {ROUTER_KINDS}",
        ),
    ],
    "cross_top_k.yaml": [Want("model.moe.top_k", 5, "top_k (6) must be <= num_experts (4)")],
    "cross_heads_divide_d_model.yaml": [
        Want("model.n_heads", 4, "d_model (130) must be divisible by n_heads (4)")
    ],
    "cross_kv_heads.yaml": [Want("model.n_kv_heads", 4, "n_heads (4) must be divisible by n_kv_heads (3)")],
    # The child sets only d_model; the problem is pinned to n_heads, which the base sets on its line 11.
    "cross_odd_head_dim.yaml": [Want("model.n_heads", 11, "must be even", file="quickstart.yaml")],
    "cross_seq_len.yaml": [Want("data.seq_len", 5, "seq_len (256) exceeds model.max_seq_len (128)")],
    "cross_moe_layer_index.yaml": [
        Want("model.moe.layers", 5, "layer indices [4, 7] do not exist (n_layers=4)")
    ],
    # dense_ffn is set nowhere: the issue points at the `model:` line of the spec.
    "cross_dense_without_ffn.yaml": [Want("model.dense_ffn", 3, "some layers are dense")],
    "cross_warmup.yaml": [Want("train.schedule.warmup_steps", 4, "warmup (100) must be < max_steps (100)")],
    "cross_router_groups.yaml": [
        Want("model.moe.router.n_groups", 5, "num_experts (8) must be divisible by n_groups (3)")
    ],
    "cross_router_topk_groups.yaml": [
        Want("model.moe.router.topk_groups", 7, "topk_groups (5) must be <= n_groups (4)")
    ],
    "cross_router_fixed_top_k.yaml": [
        Want("model.moe.top_k", 4, "router kind 'switch' routes to 1 expert(s)")
    ],
    "cross_router_unlearned_losses.yaml": [
        Want("model.moe.losses", 7, "router kind 'hash' has no learned weights, so router losses do nothing")
    ],
    "cross_expert_choice_capacity.yaml": [
        Want("model.moe.capacity", 5, "expert_choice sets each expert's capacity itself")
    ],
    "cross_load_loss_router.yaml": [
        Want("model.moe.losses.load", 7, "the load loss needs the noise of router kind 'noisy_topk'")
    ],
    "router_options.yaml": [
        Want("model.moe.router.jitter_eps", 7, "less than 1"),
        Want("model.moe.router.logit_softcap", 8, "greater than 0"),
        Want("model.moe.router.dropout", 9, "greater than or equal to 0"),
        unknown("model.moe.router.jiter", 10, "jitter_eps"),
    ],
    "bad_interpolation.yaml": [
        Want("model.moe.top_k", 4, "bad interpolation: Interpolation key 'model.nope' not found"),
        Want("tracking.experiment", 6, "bad interpolation: Interpolation key 'train.nothing' not found"),
    ],
    # A cycle is reported at the `extends:` line that closes it.
    "cycle_a.yaml": [Want("extends", 2, "extends cycle", file="cycle_b.yaml")],
    "cycle_b.yaml": [Want("extends", 1, "extends cycle", file="cycle_a.yaml")],
    "self_extends.yaml": [Want("extends", 2, "extends cycle")],
    "missing_base.yaml": [Want("extends", 1, "spec file not found")],
    "extends_not_a_path.yaml": [Want("extends", 1, "must be a relative path to a base spec")],
    "cross_unused_dense_ffn.yaml": [Want("model.dense_ffn", 4, "every layer is MoE, so dense_ffn is unused")],
    "malformed_interpolation.yaml": [Want("data.seq_len", 4, "invalid value: no viable alternative")],
    "yaml_syntax.yaml": [Want("", 6, "YAML syntax error", hint="while parsing a flow sequence at line 5")],
    "empty.yaml": [Want(key, None, "required key is missing") for key in ("name", "model", "data", "train")],
    "top_level_list.yaml": [Want("", 2, "a spec file must be a mapping of sections")],
    "many_problems.yaml": [
        unknown("descripton", 3, "description"),
        Want("model.n_heads", 11, "d_model (130) must be divisible by n_heads (4)", file="quickstart.yaml"),
        Want("model.n_kv_heads", 6, "n_heads (4) must be divisible by n_kv_heads (3)"),
        Want("model.dense_ffn", 4, "some layers are dense"),  # first_dense k=1 leaves layer 0 dense
        Want("data.val_fraction", 10, "less than or equal to 0.5"),
        Want("train.optimizer.lr", 12, "greater than 0"),
        Want("train.grad_clip", 13, "valid number"),
        unknown("tracking.experimnt", 15, "experiment"),
        Want("parallel.strategy", 16, "strategy 'single' runs on one device"),
    ],
}


def test_every_broken_file_has_declared_issues():
    assert sorted(p.name for p in BROKEN.glob("*.yaml")) == sorted(CORPUS)


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_broken_spec_reports_exactly_the_declared_issues(name, issues_of):
    spec_file = BROKEN / name
    issues = issues_of(spec_file)
    got = {issue.path: issue for issue in issues}
    assert len(got) == len(issues), f"one path reported twice: {[i.path for i in issues]}"
    want = {w.path: w for w in CORPUS[name]}
    assert sorted(got) == sorted(want)
    for path, w in want.items():
        issue = got[path]
        assert issue.file is not None, issue
        assert Path(issue.file).name == (w.file or name), issue
        assert issue.line == w.line, issue
        assert w.message in issue.message, issue
        assert issue.hint == w.hint, issue


def test_issues_of_one_file_come_in_line_order(issues_of):
    lines = [issue.line for issue in issues_of(BROKEN / "typos.yaml")]
    assert lines == sorted(lines)


def test_formatted_error_counts_and_locates_every_issue():
    with pytest.raises(SpecError) as info:
        load_spec(BROKEN / "many_problems.yaml")
    text = str(info.value)
    head, *rows = text.splitlines()
    assert head == "9 problems in spec:"
    assert len(rows) == 9
    for issue, row in zip(info.value.issues, rows):
        assert row.strip().startswith(f"{issue.file}:{issue.line}: {issue.path}: ")
    assert "Traceback" not in text


def test_formatted_issue_shows_the_bad_value_and_the_hint(issues_of):
    issues = {i.path: i for i in issues_of(BROKEN / "wrong_types.yaml") + issues_of(BROKEN / "typos.yaml")}
    wrong_type = issues["model.d_model"].format()
    typo = issues["model.moe.router.normalise"].format()
    assert wrong_type.endswith(
        "wrong_types.yaml:4: model.d_model: Input should be a valid integer (got '128')"
    )
    assert typo.endswith("typos.yaml:8: model.moe.router.normalise: unknown key; did you mean 'normalize'?")


def test_unknown_kind_shows_the_bad_tag(issues_of):
    issue = next(i for i in issues_of(BROKEN / "unknown_kind.yaml") if i.path == "model.moe.router.kind")
    assert "(got 'topp')" in issue.format()


def test_cycle_message_lists_the_whole_chain(issues_of):
    (issue,) = issues_of(BROKEN / "cycle_a.yaml")
    chain = [Path(p.strip()).name for p in issue.message.removeprefix("extends cycle: ").split("->")]
    assert chain == ["cycle_a.yaml", "cycle_b.yaml", "cycle_a.yaml"]


def test_missing_base_names_the_file_it_looked_for(issues_of):
    (issue,) = issues_of(BROKEN / "missing_base.yaml")
    assert "no_such_base.yaml" in issue.message and "extended by" in issue.message


def test_file_that_is_not_utf8_is_a_spec_error(write, issues_of):
    spec_file = write("latin1.yaml", "")
    spec_file.write_bytes("name: caf\u00e9\n".encode("latin-1"))
    (issue,) = issues_of(spec_file)
    assert issue.file == str(spec_file) and "UTF-8" in issue.message


def test_infinite_float_is_rejected(write, issues_of):
    spec_file = write("inf.yaml", f"extends: {QUICKSTART}\ntrain:\n  optimizer: {{kind: adamw, lr: .inf}}\n")
    (issue,) = issues_of(spec_file)
    assert (issue.path, issue.line) == ("train.optimizer.lr", 3)
    assert "finite" in issue.message
