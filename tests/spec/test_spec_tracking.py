"""The telemetry and tracking options: defaults, and bad values named by their field."""

from __future__ import annotations

from pathlib import Path

import pytest

from moeplat.spec import load_spec

QUICKSTART = Path(__file__).resolve().parents[2] / "specs" / "quickstart.yaml"


def test_defaults():
    spec = load_spec(QUICKSTART).spec
    assert spec.train.moe_log_every is None  # = train.log_every
    t = spec.tracking
    assert t.system_metrics and t.system_metrics_every_s == 10.0 and t.log_model and t.peak_tflops is None


@pytest.mark.parametrize(
    ("override", "path"),
    [
        ("train.moe_log_every=0", "train.moe_log_every"),
        ("tracking.system_metrics_every_s=0", "tracking.system_metrics_every_s"),
        ("tracking.peak_tflops=-1", "tracking.peak_tflops"),
        ("tracking.log_model=maybe", "tracking.log_model"),
    ],
)
def test_bad_values_name_the_field(override, path, issues_of):
    (issue,) = issues_of(QUICKSTART, [override])
    assert issue.path == path


def test_values_are_taken():
    spec = load_spec(
        QUICKSTART, ["train.moe_log_every=25", "tracking.peak_tflops=989", "tracking.system_metrics=false"]
    ).spec
    assert spec.train.moe_log_every == 25 and spec.tracking.peak_tflops == 989.0
    assert not spec.tracking.system_metrics
