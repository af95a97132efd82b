"""The DAG-run note says what a run did in one line, with links into MLflow."""

from __future__ import annotations

from ml.run_note import AIRFLOW_NOTE_LIMIT, MlflowLinks, approval_request, compose, no_new_data, with_reason

LINKS = MlflowLinks(ui_url="http://mlflow.example:5000/", model_name="clf", experiment_id="7")
HEALTHY = {
    "rollback_performed": False,
    "restored_version": None,
    "production_version": 3,
    "reason": "deployment healthy",
}


def _promotion_of_v3(**compared: float) -> str:
    """The note of a run that promoted v3 with accuracy 0.97368 over Production v2, compared as ``compared`` says."""
    return compose(
        extract={"digest": "ab" * 32},
        train={"run_id": "r123", "model_version": 3},
        validation={"validation": "passed", "accuracy": 0.97368, "threshold": 0.8, "champion_version": 2, **compared},
        deploy={"deployed": True, "version": 3},
        rollback=HEALTHY,
        links=LINKS,
    )


def test_a_promotion_names_version_accuracy_threshold_and_links():
    note = _promotion_of_v3(champion_accuracy=0.9649)
    assert note.startswith("**v3 promoted**, accuracy 0.9737 (threshold 0.80, Production v2 had 0.9649).")
    assert "[MLflow run](http://mlflow.example:5000/#/experiments/7/runs/r123?workflowType=machine_learning)" in note
    assert "[clf v3](http://mlflow.example:5000/#/models/clf/versions/3?workflowType=machine_learning)" in note


def test_an_approved_promotion_says_who_approved_it_and_when():
    note = compose(
        extract={},
        train={"run_id": "r123", "model_version": 3},
        validation={"validation": "passed", "accuracy": 0.97368, "threshold": 0.8},
        deploy={"deployed": True, "version": 3, "approval": "approved by alice at 2026-12-04T13:00:00+00:00"},
        rollback=HEALTHY,
        links=LINKS,
    )
    assert note.startswith(
        "**v3 promoted**, accuracy 0.9737 (threshold 0.80). Approved by alice at 2026-12-04T13:00:00+00:00."
    )


def test_a_promotion_compared_on_the_rows_production_never_saw_gives_both_scores_on_them():
    note = _promotion_of_v3(
        champion_accuracy=0.9123, comparison_rows=57, comparison_excluded_rows=17, comparison_accuracy=0.96491
    )
    assert note.startswith(
        "**v3 promoted**, accuracy 0.9737 (threshold 0.80; on the 57 held-out rows Production v2 did not train on, "
        "0.9649 against its 0.9123)."
    )


def test_no_new_data():
    note = no_new_data(
        {"digest": "853b528d22f0521e", "unchanged": True, "skipped_reason": "no new data", "production_version": 1},
        LINKS,
    )
    assert note.startswith("**no new data**: Production v1 was trained on this snapshot (digest `853b528d22f0`)")
    assert "MLflow run" not in note and "[clf v1](" in note


def test_a_rejection_gives_the_reasons():
    note = compose(
        extract={},
        train={"run_id": "r4", "model_version": 4},
        validation={"validation": "failed", "reasons": ["accuracy 0.6000 is below the threshold 0.8000"]},
        deploy={"deployed": False, "version": 4, "reason": "validation failed: ..."},
        rollback=HEALTHY,
        links=LINKS,
    )
    assert note.startswith("**v4 rejected**: accuracy 0.6000 is below the threshold 0.8000. Production stays v3.")


def test_a_rollback_says_why_and_what_is_back():
    note = compose(
        extract={},
        train={"run_id": "r5", "model_version": 5},
        validation={"validation": "passed", "accuracy": 0.99},
        deploy=None,
        rollback={
            "rollback_performed": True,
            "rolled_back_version": 5,
            "restored_version": 4,
            "production_version": 4,
            "reason": "post-deploy check failed: model server answered HTTP 500",
        },
        links=LINKS,
    )
    assert note.startswith(
        "**v5 rolled back**: post-deploy check failed: model server answered HTTP 500. Production is back to v4."
    )
    assert "[clf v5](" in note


def test_a_run_that_failed_early():
    note = compose(extract=None, train=None, validation=None, deploy=None, rollback=HEALTHY, links=LINKS)
    assert note == "**failed** before a version was registered. Production stays v3."


def test_the_approval_request_puts_candidate_and_production_on_one_row_of_the_same_measure():
    _, body = approval_request(
        validation={
            "model_version": 3,
            "accuracy": 0.97368,
            "threshold": 0.8,
            "champion_version": 2,
            "champion_accuracy": 0.9123,
            "comparison_rows": 57,
            "comparison_accuracy": 0.96491,
            "comparison_note": "57 of the 114 held-out rows, leaving out the 57 Production version 2 trained on",
        },
        train={"run_id": "r123", "model_family": "random_forest"},
        digest="ab" * 32,
        production_run_id="r100",
        timeout_seconds=3600,
        links=LINKS,
    )
    rows = [line for line in body.splitlines() if line.startswith("|")]
    assert rows == [
        "| | candidate v3 | Production v2 |",
        "|---|---|---|",
        "| accuracy on the same 57 held-out rows | 0.9649 | 0.9123 |",
    ]
    assert "\nRows compared: 57 of the 114 held-out rows, leaving out the 57 Production version 2 trained on.\n" in body
    assert "[MLflow run of v3](http://mlflow.example:5000/#/experiments/7/runs/r123?" in body
    assert "[MLflow run of v2](http://mlflow.example:5000/#/experiments/7/runs/r100?" in body


def test_the_reason_a_run_was_started_follows_its_outcome_on_a_line_of_its_own():
    assert with_reason(
        "**v2 promoted**, accuracy 0.97.", "mlops_monitor, 12:00-13:00 UTC: drift in 27 of 30 features"
    ) == (
        "**v2 promoted**, accuracy 0.97.\n\nStarted because: mlops_monitor, 12:00-13:00 UTC: drift in 27 of 30 features"
    )
    assert with_reason("**no new data**", None) == "**no new data**"
    longest = with_reason("**v2 promoted**, accuracy 0.97.", "drift " * 200)
    assert len(longest) == AIRFLOW_NOTE_LIMIT and longest.endswith("…") and "Started because: drift drift" in longest


def _candidate_rows(count: int) -> list[dict]:
    scores = {"accuracy": 0.95, "roc_auc": 0.99, "average_precision": 0.98, "f1": 0.96}
    return [
        {
            "name": f"#{index + 1} gradient_boosting",
            "hyperparameters": {"n_estimators": 100 + index, "learning_rate": 0.1, "max_depth": 3},
            "status": "chosen" if index == 0 else "trained",
            "scores": scores,
        }
        for index in range(count)
    ]


def test_several_candidates_are_shown_side_by_side_within_what_airflow_keeps_of_a_note():
    """Airflow keeps 1,000 characters of a run's note (PostgreSQL refuses more): a long table shrinks, never the
    headline."""
    from ml.run_note import with_candidates

    headline = _promotion_of_v3(champion_accuracy=0.9649)
    why = "#1 gradient_boosting has the highest accuracy (0.9500; next #2 gradient_boosting with 0.9500)"
    notes = {
        count: with_candidates(
            headline, {"candidates": _candidate_rows(count), "selection": why, "selection_metric": "f1"}
        )
        for count in (2, 5, 8)
    }
    assert "| candidate | hyper-parameters | accuracy | ROC AUC | average precision | **F1** | |" in notes[2]
    assert "| #1 gradient_boosting | n_estimators=100, learning_rate=0.1, max_depth=3 |" in notes[2]
    assert "| candidate | **F1** | |" in notes[5] and "| #5 gradient_boosting | 0.9600 | trained |" in notes[5]
    for note in notes.values():
        assert note.startswith(headline) and len(note) <= AIRFLOW_NOTE_LIMIT
        assert f"chosen by f1: {why}." in note or f"Chosen among 8 candidates by f1: {why}." in note
    assert with_candidates(headline, {"candidates": []}) == headline
