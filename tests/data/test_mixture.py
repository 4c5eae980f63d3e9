"""`data.source.kind: mixture`: Megatron's blended sampling (tested against the line-by-line
reference), whole sequences of one source, each source's own shuffled passes, max_tokens, the
resumable and data-parallel loader over a blend, per-source validation metrics; and the python_docs
corpus that is the examples' second domain."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from python_docs import require_python_docs
from step0 import validate_at_step0

from moeplat.compile.data import build_data
from moeplat.data.blend import BlendedSequences, BlendIndex, blending_indices, blending_indices_reference
from moeplat.data.dataset import PackedSequences
from moeplat.data.resumable import ResumableLoader
from moeplat.errors import SpecError
from moeplat.spec import load_spec

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "tests" / "fixtures" / "tiny.yaml"
MIX = (
    "data.source={kind: mixture, sources: ["
    "{name: code, weight: 0.7, source: {kind: python_stdlib, max_bytes: 300000}}, "
    "{name: prose, weight: 0.3, source: {kind: python_docs, max_bytes: 300000}}]}"
)


@pytest.mark.parametrize("seed", range(6))
def test_fast_blending_index_equals_megatrons_loop(seed):
    rng = np.random.default_rng(seed)
    weights = (rng.random(int(rng.integers(1, 7))) + 0.01).tolist()
    want = blending_indices_reference(weights, 3000)
    got = blending_indices(weights, 3000)
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
    grown = BlendIndex(weights)
    for size in (1, 2, 17, 1000, 3000):  # extended in pieces, as a long run does
        grown.extend(size)
    assert np.array_equal(grown.source, want[0]) and np.array_equal(grown.within, want[1])


def test_reference_matches_a_hand_computed_start():
    # w = (0.5, 0.3, 0.2); n=0 and n=1 both use max(n, 1) = 1: errors (.5, .3, .2) -> 0,
    # then (-.5, .3, .2) -> 1; n=2: (0, -.4, .4) -> 2; n=3: (.5, -.1, -.4) -> 0; n=4: (0, .2, -.2) -> 1
    source, within = blending_indices_reference([5, 3, 2], 5)
    assert source.tolist() == [0, 1, 2, 0, 1] and within.tolist() == [0, 0, 0, 1, 1]


def test_every_global_batch_holds_each_sources_share():
    weights = [0.6, 0.25, 0.15]
    source, _ = blending_indices(weights, 64 * 50)
    for batch in source.reshape(50, 64):
        counts = np.bincount(batch, minlength=3)
        assert np.all(np.abs(counts - 64 * np.asarray(weights)) <= 2), counts


def _streams(n_tokens=(3000, 1700), seed=0):
    # real text: two slices of the stdlib's bytes
    from moeplat.data import python_stdlib_documents

    data = np.frombuffer(b"".join(d.data for d in python_stdlib_documents(max_bytes=100_000)), np.uint8)
    return [data[: n_tokens[0]], data[n_tokens[0] : n_tokens[0] + n_tokens[1]]]


def test_samples_are_whole_sequences_of_one_source_in_shuffled_passes():
    a, b = (PackedSequences(s, 15) for s in _streams())
    blend = BlendedSequences([a, b], [0.5, 0.5], seed=3)
    seen = {0: [], 1: []}
    for g in range(4 * (len(a) + len(b))):
        s, i = blend.locate(g)
        seen[s].append(i)
        x, y = blend[g]
        assert torch.equal(x, (a, b)[s][i][0]) and torch.equal(y, (a, b)[s][i][1])
    for s, n in ((0, len(a)), (1, len(b))):
        passes = [seen[s][k : k + n] for k in range(0, len(seen[s]) - n + 1, n)]
        assert len(passes) >= 2
        assert all(sorted(p) == list(range(n)) for p in passes)  # each pass: every sequence once
        assert passes[0] != passes[1] and passes[0] != list(range(n))  # reshuffled, not in order
    other = BlendedSequences([a, b], [0.5, 0.5], seed=4)
    assert [blend.locate(g) for g in range(50)] != [other.locate(g) for g in range(50)]
    again = BlendedSequences([a, b], [0.5, 0.5], seed=3)
    assert [blend.locate(g) for g in range(50)] == [again.locate(g) for g in range(50)]


def test_max_tokens_caps_the_sequences_a_source_uses():
    a, b = (PackedSequences(s, 15) for s in _streams())
    blend = BlendedSequences([a, b], [0.5, 0.5], seed=0, limits=[None, 10])
    used = {blend.locate(g)[1] for g in range(2000) if blend.locate(g)[0] == 1}
    assert len(used) == 10 and max(used) >= 10  # ten sequences, drawn from the whole source


def _loader_batches(loader, n):
    out = []
    while len(out) < n:  # one iter() is one pass; the next continues the blend
        out += [x.clone() for x, _ in itertools.islice(iter(loader), n - len(out))]
    return out


def test_resumed_and_data_parallel_loaders_continue_the_blend():
    a, b = (PackedSequences(s, 15) for s in _streams())
    blend = BlendedSequences([a, b], [0.7, 0.3], seed=1)
    n_batches = 2 * len(blend) // 8 + 3  # past one pass over the data: the blend continues
    whole = _loader_batches(ResumableLoader(blend, batch_size=8, seed=1, shuffle=False), n_batches)
    # pass e over the blend is positions e * len(blend) + ...; like a shuffled epoch, its last
    # samples that do not fill a batch are skipped
    per_pass = len(blend) // 8
    starts = [(k // per_pass) * len(blend) + (k % per_pass) * 8 for k in range(n_batches)]
    want = torch.stack([torch.stack([blend[g][0] for g in range(s, s + 8)]) for s in starts])
    assert starts[-1] > len(blend)
    assert torch.equal(torch.stack(whole), want)

    cut = ResumableLoader(blend, batch_size=8, seed=1, shuffle=False)
    it = iter(cut)
    head = [next(it)[0] for _ in range(5)]
    resumed = ResumableLoader(blend, batch_size=8, seed=1, shuffle=False)
    resumed.load_state_dict(cut.state_dict())
    assert all(torch.equal(x, y) for x, y in zip(head + _loader_batches(resumed, 4), whole[:9]))

    ranks = [
        _loader_batches(ResumableLoader(blend, batch_size=4, seed=1, shuffle=False, rank=r, world_size=2), 6)
        for r in range(2)
    ]
    for k in range(6):  # rank r takes positions r, r + 2, ...: together the single process's batch
        merged = torch.stack([ranks[j % 2][k][j // 2] for j in range(8)])
        assert torch.equal(merged, whole[k])


def test_global_batch_look_ahead_works_over_a_blend():
    a, b = (PackedSequences(s, 15) for s in _streams())
    loader = ResumableLoader(
        BlendedSequences([a, b], [1, 1], seed=0), batch_size=4, seed=0, shuffle=False, step_group=2
    )
    first, second = itertools.islice(iter(loader), 2)
    assert len(first) == 3 and len(second) == 2
    assert torch.equal(first[2][1], second[0])  # the step's second micro-batch, seen ahead


@pytest.mark.parametrize(
    ("override", "path", "says"),
    [
        ("data.source.sources.1.name=code", "data.source.sources.1.name", "used twice"),
        ("data.source.sources.0.weight=0", "data.source.sources.0.weight", "greater than 0"),
        ("data.source.sources.1.weight=-1", "data.source.sources.1.weight", "greater than 0"),
        ("data.source.sources.0.name='a b'", "data.source.sources.0.name", "pattern"),
        ("data.source.sources=[]", "data.source.sources", "at least 1"),
    ],
)
def test_bad_mixtures_are_refused_at_validate(override, path, says):
    with pytest.raises(SpecError) as info:
        load_spec(TINY, [MIX, override])
    assert any(i.path == path and says in i.message for i in info.value.issues), info.value.format()


def test_max_tokens_below_one_sequence_is_a_spec_error():
    require_python_docs()
    loaded = load_spec(TINY, [MIX, "data.source.sources.1.max_tokens=20"])
    with pytest.raises(SpecError) as info:
        build_data(loaded.spec, loaded.base_dir)
    assert info.value.issues[0].path == "data.source.sources.1.max_tokens"


def test_a_mixture_keeps_each_sources_own_split_and_validation_set():
    require_python_docs()
    loaded = load_spec(TINY, [MIX, "data.val_tokens=320"])
    dm, info = build_data(loaded.spec, loaded.base_dir)
    assert dm.val_names == ["code", "prose"]
    assert [len(v) for v in dm.val_sets] == [10, 10]  # 320 tokens / seq_len 32, per source
    per = dict(info.per_source)
    assert per["code"]["weight"] == 0.7 and per["prose"]["val_sequences"] == 10
    alone = load_spec(TINY, ["data.source={kind: python_stdlib, max_bytes: 300000}", "data.val_tokens=320"])
    dm_alone, _ = build_data(alone.spec, alone.base_dir)
    # the code source's validation set is the one it has alone: splits are per source
    assert torch.equal(dm.val_sets[0][3][0], dm_alone.val_sets[0][3][0])
    params = info.as_params()
    assert params["data.corpus.prose.weight"] == 0.3 and "data.corpus.code.train_tokens" in params
    counts = np.bincount([dm.train_set.locate(g)[0] for g in range(1000)])
    assert counts.tolist() == [700, 300]


def test_per_source_validation_metrics_pool_tokens(tmp_path):
    """val/loss is token-weighted over both sources' sequences; each source's bpb is its loss in
    bits (byte tokenizer: one byte per token)."""
    require_python_docs()
    loaded = load_spec(TINY, [MIX, "data.source.sources.1.source.max_bytes=100000", "data.val_tokens=224"])
    got, dm = validate_at_step0(loaded)
    tokens = [len(v) * 32 for v in dm.val_sets]
    pooled = (got["val/code/loss"] * tokens[0] + got["val/prose/loss"] * tokens[1]) / sum(tokens)
    assert got["val/loss"] == pytest.approx(pooled, rel=1e-9)
    for name in ("code", "prose"):
        assert got[f"val/{name}/bpb"] == pytest.approx(got[f"val/{name}/loss"] / math.log(2), rel=1e-9)
    assert got["val/code/loss"] != pytest.approx(got["val/prose/loss"], rel=1e-4)


def test_python_docs_are_the_documentations_prose():
    require_python_docs()
    from moeplat.data.sources import python_docs_documents

    docs = python_docs_documents()
    names = {d.name for d in docs}
    assert "tutorial/introduction.rst.txt" in names and len(docs) > 300
    intro = next(d for d in docs if d.name == "tutorial/introduction.rst.txt")
    assert b"Python" in intro.data and b"def " not in intro.data[:200]
    capped = python_docs_documents(max_bytes=500_000)
    assert 0 < sum(len(d.data) for d in capped) <= 500_000


def test_python_docs_missing_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("MOEPLAT_PYTHON_DOCS", str(tmp_path / "absent"))
    loaded = load_spec(TINY, ["data.source={kind: python_docs}"])
    with pytest.raises(SpecError) as info:
        build_data(loaded.spec, loaded.base_dir)
    (issue,) = info.value.issues
    assert issue.path == "data.source.kind"
    assert "scripts/system-deps.sh" in issue.message and "apt-get install python3.11-doc" in issue.message


def test_the_mixture_example_builds_its_two_domains():
    require_python_docs()
    loaded = load_spec(
        REPO / "specs" / "data" / "mixture-code-prose.yaml",
        [
            "data.source.sources.0.source.max_bytes=300000",
            "data.source.sources.1.source={kind: python_docs, max_bytes: 3000000}",
        ],
    )
    dm, _ = build_data(loaded.spec, loaded.base_dir)
    assert dm.val_names == ["code", "prose"] and [len(v) for v in dm.val_sets] == [128, 128]
    counts = np.bincount([dm.train_set.locate(g)[0] for g in range(16 * 10)])
    assert counts.tolist() == [96, 64]  # 60 / 40 of ten global batches of 16


@pytest.mark.slow
def test_a_mixture_run_resumed_from_a_mid_run_checkpoint_ends_where_an_uninterrupted_one_does(tmp_path):
    """The loader's position over the blend is in the checkpoint: a copy of a finished 6-step run
    whose last checkpoint is put back to step 3 trains steps 4-6 on the same blended batches."""
    import json
    import shutil

    from moeplat.train.run import run

    require_python_docs()
    overrides = [
        MIX,
        "data.source.sources.1.source.max_bytes=150000",
        "data.val_tokens=128",
        "train.max_steps=6",
        "train.val_every=3",
        "train.checkpoint_every=3",
        "train.schedule={kind: constant}",
        "tracking.system_metrics=false",
        "tracking.log_model=false",
    ]
    loaded = load_spec(TINY, overrides)
    whole = run(
        loaded, runs_root=tmp_path / "a", tracking_uri=f"sqlite:///{tmp_path / 'a.db'}", progress=False
    )
    copy = tmp_path / "b" / "tiny" / Path(whole.run_dir).name
    shutil.copytree(whole.run_dir, copy)
    shutil.copy(tmp_path / "a.db", tmp_path / "b.db")
    state = json.loads((copy / "run.json").read_text())
    state["tracking_uri"] = f"sqlite:///{tmp_path / 'b.db'}"
    (copy / "run.json").write_text(json.dumps(state))
    shutil.copy(copy / "checkpoints" / "step000003.ckpt", copy / "checkpoints" / "last.ckpt")
    resumed = run(
        loaded, runs_root=tmp_path / "b", resume=str(copy), tracking_uri=state["tracking_uri"], progress=False
    )
    assert resumed.steps == whole.steps == 6
    assert resumed.val_loss == pytest.approx(whole.val_loss, rel=1e-6)
