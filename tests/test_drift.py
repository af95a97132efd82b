"""The drift measures (PSI, KS test, label balance), the report, and the stricter champion rule under high drift."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from ml import drift, evaluation


@pytest.fixture(scope="module")
def rng() -> np.random.Generator:
    return np.random.default_rng(7)


def test_psi_of_identical_samples_is_zero(rng):
    sample = rng.normal(size=2000)
    assert drift.psi(sample, sample) == pytest.approx(0.0, abs=1e-12)


def test_psi_of_two_samples_of_one_distribution_is_small(rng):
    assert drift.psi(rng.normal(size=5000), rng.normal(size=5000)) < 0.02


def test_psi_of_shifted_samples_is_large_and_grows_with_the_shift(rng):
    reference = rng.normal(size=3000)
    small = drift.psi(reference, rng.normal(loc=0.25, size=3000))
    large = drift.psi(reference, rng.normal(loc=1.5, size=3000))
    assert 0.02 < small < 0.2
    assert large > 1.0
    assert drift.psi(reference, reference * 3.0) > 0.5


def test_psi_is_finite_when_a_side_leaves_bins_empty_and_ignores_missing_values():
    reference = np.arange(100, dtype=float)
    far_away = np.full(50, 1e6)
    value = drift.psi(reference, far_away)
    assert np.isfinite(value) and value > 5
    with_gaps = np.concatenate([reference, [np.nan, np.inf]])
    assert drift.psi(with_gaps, reference) == pytest.approx(0.0, abs=1e-12)
    assert drift.psi([], reference) == 0.0
    assert drift.psi(np.ones(20), np.ones(30)) == pytest.approx(0.0, abs=1e-12)


def test_bin_edges_are_the_reference_deciles():
    edges = drift.bin_edges(np.arange(1, 101, dtype=float), bins=10)
    assert len(edges) == 9
    assert edges[0] == pytest.approx(10.9) and edges[-1] == pytest.approx(90.1)


def test_ks_p_values_tell_same_from_different(rng):
    same_statistic, same_p = drift.ks_test(rng.normal(size=800), rng.normal(size=800))
    shifted_statistic, shifted_p = drift.ks_test(rng.normal(size=800), rng.normal(loc=0.8, size=800))
    assert same_p > 0.01 and same_statistic < 0.1
    assert shifted_p < 1e-10 and shifted_statistic > 0.2
    assert drift.ks_test([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) == (0.0, 1.0)
    assert drift.ks_test([], [1.0]) == (0.0, 1.0)


def test_label_balance_is_each_class_share():
    assert drift.label_balance(pd.Series([0, 1, 1, 1, None])) == {"0": 0.25, "1": 0.75}
    assert drift.label_balance(pd.Series([], dtype=float)) == {}


def _frames(rng, shift: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    reference = pd.DataFrame({"a": rng.normal(size=600), "b": rng.uniform(size=600), "target": rng.integers(0, 2, 600)})
    current = pd.DataFrame(
        {
            "a": rng.normal(size=400) * (1 + shift),
            "b": rng.uniform(size=400),
            "target": np.r_[np.zeros(300), np.ones(100)],
        }
    )
    return reference, current


def test_report_ranks_features_and_summarises(rng):
    reference, current = _frames(rng, shift=2.0)
    report = drift.compare(reference, current.assign(extra=1.0).drop(columns="b"), label="target")
    assert [f.feature for f in report.ranked()] == ["a"]
    assert report.missing_features == ["b"] and report.new_features == ["extra"]
    assert report.max_psi_feature == "a" and report.max_psi > 0.2
    assert report.current_label_balance == {"0": 0.75, "1": 0.25}
    summary = report.summary(threshold=0.2)
    assert summary["high_drift"] is True and summary["drifted_features"] == ["a"]
    assert summary["label_shift"] == pytest.approx(abs(0.75 - report.reference_label_balance["0"]))
    json.dumps(summary)
    table = report.table()
    assert set(table) == {"feature", "psi", "ks_statistic", "ks_pvalue", "reference_mean", "current_mean"}


def test_report_of_unchanged_data_shows_no_drift(rng):
    reference, _ = _frames(rng, shift=0.0)
    report = drift.compare(reference, reference.copy(), label="target")
    assert report.max_psi == pytest.approx(0.0, abs=1e-12)
    assert report.min_ks_pvalue == pytest.approx(1.0)
    assert report.label_shift() == 0.0
    assert drift.version_tags(report, 0.2, 3)["mlops.drift.high"] == "false"


def test_tags_and_result_fields_round_trip(rng):
    reference, current = _frames(rng, shift=2.0)
    report = drift.compare(reference, current, label="target")
    tags = drift.version_tags(report, 0.2, 4)
    assert tags["mlops.drift.max_psi_feature"] == "a"
    assert float(tags["mlops.drift.max_psi"]) == pytest.approx(report.max_psi, abs=1e-6)
    fields = drift.result_fields(report, 0.2, 4)
    back = drift.fields_from_tags(tags, 0.2)
    assert back["drift_max_psi"] == pytest.approx(fields["drift_max_psi"], abs=1e-6)
    assert (back["drift_max_psi_feature"], back["drift_high"], back["drift_reference_version"]) == ("a", True, 4)
    none = drift.version_tags(None, 0.2, None)
    assert none["mlops.drift.max_psi"] == "none"
    assert drift.fields_from_tags(none, 0.2) == drift.result_fields(None, 0.2, None)


def test_psi_figure_draws_the_top_features(rng):
    import matplotlib.pyplot as plt

    reference, current = _frames(rng, shift=1.0)
    figure = drift.psi_figure(drift.compare(reference, current, label="target"), threshold=0.2, top=5)
    try:
        labels = [tick.get_text() for tick in figure.axes[0].get_yticklabels()]
        assert "a" in labels
    finally:
        plt.close(figure)


JUDGE = {"threshold": 0.8, "champion_version": 3, "tolerance": 0.01, "compare_with_champion": True}


def test_judge_keeps_the_tolerance_when_drift_is_low_or_unknown():
    assert evaluation.judge(0.945, champion_accuracy=0.95, drift=0.05, drift_threshold=0.2, **JUDGE).passed
    assert evaluation.judge(0.945, champion_accuracy=0.95, drift=None, drift_threshold=0.2, **JUDGE).passed
    assert evaluation.judge(0.945, champion_accuracy=0.95, **JUDGE).passed


def test_judge_demands_the_margin_under_high_drift():
    within_tolerance = evaluation.judge(
        0.945, champion_accuracy=0.95, drift=0.5, drift_threshold=0.2, drift_margin=0.0, **JUDGE
    )
    assert not within_tolerance.passed
    assert "under high drift (PSI 0.500 > 0.200)" in within_tolerance.reasons[0]
    assert evaluation.judge(0.95, champion_accuracy=0.95, drift=0.5, drift_threshold=0.2, **JUDGE).passed
    short = evaluation.judge(0.96, champion_accuracy=0.95, drift=0.5, drift_threshold=0.2, drift_margin=0.02, **JUDGE)
    enough = evaluation.judge(0.97, champion_accuracy=0.95, drift=0.5, drift_threshold=0.2, drift_margin=0.02, **JUDGE)
    assert not short.passed and "by at least 0.0200" in short.reasons[0]
    assert enough.passed


def test_judge_ignores_drift_without_a_champion_or_comparison():
    alone = evaluation.judge(0.9, champion_accuracy=None, drift=0.9, drift_threshold=0.2, drift_margin=0.1, **JUDGE)
    assert alone.passed
    off = {**JUDGE, "compare_with_champion": False}
    assert evaluation.judge(0.9, champion_accuracy=0.95, drift=0.9, drift_threshold=0.2, drift_margin=0.1, **off).passed


def test_large_sides_are_measured_on_a_bounded_sample_within_the_stated_error():
    rng = np.random.default_rng(3)
    rows = 300_000
    reference = pd.DataFrame({"x": rng.normal(0, 1, rows), "target": rng.integers(0, 2, rows)})
    current = pd.DataFrame({"x": rng.normal(0.3, 1, rows), "target": rng.integers(0, 2, rows)})
    full = drift.compare(reference, current, label="target", sample_rows=rows)
    sampled = drift.compare(reference, current, label="target")
    assert full.sampled_rows is None and sampled.sampled_rows == drift.SAMPLE_ROWS
    assert (sampled.reference_rows, sampled.current_rows) == (rows, rows)
    assert abs(sampled.features[0].ks_statistic - full.features[0].ks_statistic) < 0.01
    assert abs(sampled.features[0].psi - full.features[0].psi) < 0.01
    assert sampled.summary(0.2)["sampling"] == drift.SAMPLING_ERROR
    # The same data gives the same report: the sample is seeded.
    assert drift.compare(reference, current, label="target").features == sampled.features


def test_a_side_sampled_beforehand_reports_its_full_size():
    frame = pd.DataFrame({"x": np.arange(1000.0), "target": [0, 1] * 500})
    report = drift.compare(frame, frame.head(100), label="target", current_rows=5000)
    assert report.current_rows == 5000 and report.sampled_rows == drift.SAMPLE_ROWS


def test_no_psi_chart_when_nothing_moved(rng, mlops_env):
    import mlflow

    reference, current = _frames(rng, shift=1.0)
    mlflow.set_tracking_uri(mlops_env.tracking_uri)
    # An experiment id made active by an earlier test names nothing in this test's new store.
    mlflow.set_experiment("drift_reports")
    for name, report in (
        ("same", drift.compare(reference, reference, label="target")),
        ("moved", drift.compare(reference, current, label="target")),
    ):
        with mlflow.start_run(run_name=name) as run:
            drift.log_report(mlflow, report, threshold=0.2, reference_version=1)
        client = mlflow.MlflowClient()
        logged = {a.path for a in client.list_artifacts(run.info.run_id, "drift")}
        assert drift.REPORT_TABLE in logged and drift.REPORT_SUMMARY in logged
        assert (drift.REPORT_FIGURE in logged) is (name == "moved"), (name, logged)


def test_confusion_matrix_names_the_classes_of_a_bundled_data_set():
    import matplotlib.pyplot as plt

    from ml import data

    names = data.class_names("sklearn:breast_cancer")
    assert names == {"0": "malignant", "1": "benign"}
    assert data.class_names("/data/file.csv") == {}
    figure = evaluation.confusion_matrix_figure([0, 1, 1], pd.Series([0, 1, 0]), "held-out", names)
    try:
        axes = figure.axes[0]
        assert [t.get_text() for t in axes.get_xticklabels()] == ["malignant (0)", "benign (1)"]
        assert [t.get_text() for t in axes.get_yticklabels()] == ["malignant (0)", "benign (1)"]
    finally:
        plt.close(figure)
