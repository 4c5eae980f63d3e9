"""`moeplat repro`: verdicts from seeds' figures (hand-made records), the variants' specs, and a
reduced end-to-end run that trains, writes the page with run ids and reuses its runs."""

from __future__ import annotations

import pytest

from moeplat.cli.main import main
from moeplat.repro.findings import FINDINGS, LR_GRID, VARIANTS, lr_variant
from moeplat.repro.report import lr_sweep_table, mean_std, results_page, verdict
from moeplat.repro.runner import Record, overrides, spec_path

F = {f.key: f for f in FINDINGS}


def _records(values: dict[str, list[dict]]) -> dict:
    return {
        (v, s): Record(v, s, f"run-{v}-{s}", figs)
        for v, rows in values.items()
        for s, figs in enumerate(rows)
    }


def test_mean_and_sample_std():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_std([5.0]) == (5.0, 0.0)


def test_a_lower_loss_on_every_seed_reproduces_and_a_higher_one_does_not():
    f = F["moe-vs-dense"]
    recs = _records(
        {"dense": [{"val/loss": 1.30}, {"val/loss": 1.31}], "moe": [{"val/loss": 1.28}, {"val/loss": 1.29}]}
    )
    short, text = verdict(f, recs, [0, 1])
    assert short == "reproduces on every seed (2/2)"
    assert "moe 1.2850 vs dense 1.3050" in text and "difference -0.0200" in text
    recs = _records(
        {"dense": [{"val/loss": 1.30}, {"val/loss": 1.31}], "moe": [{"val/loss": 1.29}, {"val/loss": 1.33}]}
    )
    assert verdict(f, recs, [0, 1])[0] == "does not reproduce at this scale"  # mean 1.31 > 1.305
    recs = _records(
        {"dense": [{"val/loss": 1.30}, {"val/loss": 1.30}], "moe": [{"val/loss": 1.25}, {"val/loss": 1.31}]}
    )
    assert verdict(f, recs, [0, 1])[0] == "reproduces on the mean, on 1 of 2 seeds"


def test_a_higher_figure_when_the_claim_says_higher_and_the_val_loss_guard():
    f = F["aux-free"]  # lower MaxVio at equal or better val loss
    good = {"moe": [{"val/loss": 1.30, "moe/all/maxvio": 0.5}, {"val/loss": 1.31, "moe/all/maxvio": 0.6}],
            "aux-free-bias": [{"val/loss": 1.30, "moe/all/maxvio": 0.2}, {"val/loss": 1.315, "moe/all/maxvio": 0.3}]}  # fmt: skip
    assert verdict(f, _records(good), [0, 1])[0].startswith("reproduces on every seed")
    worse = {**good, "aux-free-bias": [{"val/loss": 1.40, "moe/all/maxvio": 0.2}, {"val/loss": 1.41, "moe/all/maxvio": 0.3}]}  # fmt: skip
    short, text = verdict(f, _records(worse), [0, 1])
    assert (
        short == "does not reproduce at this scale" and "equal or better required" in text and ": no)" in text
    )
    # "comparable" is judged against the baseline's seed spread: a variant with one diverging seed
    # (here a spread of 0.11) is not comparable to a baseline 0.1 better with a spread of 0.004
    t = F["top-p"]
    unstable = {"moe": [{"val/loss": 1.287, "moe/all/experts_per_token": 4.0}, {"val/loss": 1.282, "moe/all/experts_per_token": 4.0}],
                "top-p": [{"val/loss": 1.32, "moe/all/experts_per_token": 3.1}, {"val/loss": 1.47, "moe/all/experts_per_token": 3.2}]}  # fmt: skip
    short, text = verdict(t, _records(unstable), [0, 1])
    assert short == "does not reproduce at this scale" and "within moe's seed spread 0.0035: no)" in text
    c = F["collapse"]  # MaxVio rises without balancing
    recs = _records({"moe": [{"moe/all/maxvio": 0.4}] * 2, "no-balancing": [{"moe/all/maxvio": 2.0}] * 2})
    assert verdict(c, recs, [0, 1])[0].startswith("reproduces on every seed")


def test_a_figure_some_run_did_not_log_is_not_measured():
    f = F["top-p"]
    recs = _records({"moe": [{"val/loss": 1.3}] * 2, "top-p": [{"val/loss": 1.3}] * 2})
    assert verdict(f, recs, [0, 1])[0] == "not measured"


def test_the_page_lists_every_run_id_and_verdict():
    f = F["granularity-finer"]
    recs = _records(
        {
            "moe": [{"val/loss": 1.3}, {"val/loss": 1.32}],
            "fine-grained": [{"val/loss": 1.2}, {"val/loss": 1.22}],
        }
    )
    page = results_page([f], recs, [0, 1], "# header")
    assert page.startswith("# header")
    assert "| granularity-finer | reproduces on every seed (2/2) |" in page
    for run_id in ("run-moe-0", "run-moe-1", "run-fine-grained-0", "run-fine-grained-1"):
        assert f"`{run_id}`" in page
    assert "0: 1.2000 `run-fine-grained-0`, 1: 1.2200 `run-fine-grained-1`" in page  # each seed's val loss
    assert "| fine-grained | 1.2100 ± 0.0141 |" in page


def test_the_lr_sweep_marks_the_spec_files_rate_and_whether_it_is_the_best():
    losses = {"dense": [1.40, 1.35, 1.30, 1.33], "moe": [1.31, 1.29, 1.32, 1.36]}
    recs = {
        (lr_variant(v, lr), 0): Record(lr_variant(v, lr), 0, f"{v}-{lr:g}", {"val/loss": loss})
        for v, row in losses.items()
        for lr, loss in zip(LR_GRID, row)
    }
    recs["dense", 0] = Record("dense", 0, "dense-0.003", {"val/loss": 1.30})  # the spec's rate: 3e-3
    recs["moe", 0] = Record("moe", 0, "moe-0.003", {"val/loss": 1.32})  # 3e-3 too, not the best
    table = "\n".join(lr_sweep_table(("dense", "moe"), recs, 0))
    assert "| dense | 1.4000 | 1.3500 | **1.3000** | 1.3300 | yes |" in table
    assert "| moe | 1.3100 | 1.2900 | **1.3200** | 1.3600 | no |" in table
    assert "`moe-0.0015`" in table


@pytest.mark.parametrize("name", sorted(VARIANTS))
@pytest.mark.parametrize("quick", [False, True])
def test_every_variant_is_a_valid_spec(name, quick):
    from moeplat.spec import load_spec

    v = VARIANTS[name]
    spec = load_spec(spec_path(v.spec), overrides(v, 3, quick, "x")).spec
    assert spec.train.seed == 3 and spec.tracking.experiment == "x"
    if quick:
        assert spec.train.max_steps == 40 and spec.model.d_model == 64


def test_every_finding_compares_known_variants():
    for f in FINDINGS:
        assert len(f.variants) == 2 and set(f.variants) <= set(VARIANTS)


def test_bad_flags_are_usage_errors(capsys):
    assert main(["repro", "--seeds", "0"]) == 2
    assert "at least two different" in capsys.readouterr().err
    assert main(["repro", "--only", "nope"]) == 2
    assert "unknown finding" in capsys.readouterr().err
    assert main(["repro", "--jobs", "0"]) == 2
    assert "--jobs must be at least 1" in capsys.readouterr().err


@pytest.mark.slow
def test_quick_repro_trains_writes_the_page_and_reuses_its_runs(tmp_path, capfd, monkeypatch):
    """The whole --quick version (22 short runs, ~1 min on 2 cores): every finding measured. The
    first pass trains 2 runs at a time in child processes; the second, in-process, reuses them all."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = ["repro", "--quick", "--tracking-uri", uri, "-o", "results.md"]
    assert main([*argv, "--jobs", "2"]) == 0
    first = capfd.readouterr()
    # every variant on 2 seeds, and each learning-rate sweep's points but the spec file's own rate
    variants = {v for f in FINDINGS for v in f.variants}
    sweeps = sum(len(f.lr_sweep) for f in FINDINGS)
    assert first.err.count("repro: training") == 2 * len(variants) + sweeps * (len(LR_GRID) - 1)
    # the spawned training processes are as quiet as the CLI: no Lightning INFO, no srun hint
    assert "GPU available" not in first.out + first.err and "srun" not in first.err
    page = (tmp_path / "results.md").read_text()
    for f in FINDINGS:
        assert f"| {f.key} |" in page and f.figure in page
    assert "not measured" not in page and "n/a" not in page and "commit unknown" not in page
    assert main(argv) == 0
    again = capfd.readouterr()
    assert "repro: training" not in again.err  # every run reused from the store
    assert (tmp_path / "results.md").read_text().split("\n", 6)[6] == page.split("\n", 6)[6]
