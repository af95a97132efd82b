"""validate_model compares the candidate with Production only on held-out rows Production did not train on.

With a growing source (a folder that gains batches) the seeded split of the larger data set does not keep the old
split's test rows apart: part of the new held-out set was in Production's training set, which flatters Production.
These tests grow a real folder source, train and promote through the pipeline's own steps against a real MLflow
store, and check what the comparison was made on.
"""

from __future__ import annotations

import pandas as pd
import pytest
from conftest import use_fresh_home

from ml import data, evaluation, ingest, registry, steps, tags, tracking
from ml.context import RunContext
from ml.settings import Settings


def _run(settings: Settings, name: str, *, promote: bool):
    run = RunContext("mlops_pipeline", name, 1, {})
    transformed = steps.transform(settings, run, steps.extract(settings, run))
    trained = steps.train(settings, run, transformed)
    validated = steps.validate(settings, run, trained, transformed)
    if promote:
        assert steps.deploy(settings, run, validated, transformed).deployed
    return transformed, trained, validated


@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    """Version 1 promoted on batches 0 and 1 of a folder source, then version 2 trained and validated once batch 5
    landed."""
    home = tmp_path_factory.mktemp("fair") / "mlops"
    with pytest.MonkeyPatch.context() as patch:
        use_fresh_home(patch, home)
        patch.setenv("MLOPS_DATA_SOURCE", f"{home / 'incoming'}/")
        settings = Settings.from_env()
        for batch in (0, 1):
            ingest.land(settings, batch=batch)
        first, _, _ = _run(settings, "first", promote=True)
        ingest.land(settings, batch=5)
        yield settings, first, *_run(settings, "second", promote=False)


def _rows_in(frame: pd.DataFrame, other: pd.DataFrame) -> pd.Series:
    """Which rows of ``frame`` are rows of ``other`` too, by a join on every column (not by hashing)."""
    joined = frame.merge(other[frame.columns].drop_duplicates(), how="left", indicator=True)
    return pd.Series((joined["_merge"] == "both").to_numpy(), index=frame.index)


def _accuracy_of(settings: Settings, version: int, frame: pd.DataFrame, features: list[str], label: str) -> float:
    client = registry.client_for(settings)
    info = registry.get_version(client, settings.model_name, version)
    model = tracking.load_model(tracking.connect(settings), registry.load_uri(settings.model_name, info))
    return evaluation.score(model.predict(frame[features]), frame[label])["accuracy"]


def test_the_comparison_leaves_out_the_held_out_rows_production_trained_on(grown):
    settings, first, second, _, validated = grown
    client = registry.client_for(settings)
    champion = registry.get_version(client, settings.model_name, 1)
    assert champion.tags[tags.DATA_TRAIN_SPLIT_URI] == first.train_uri

    held_out = data.read_frame(second.test_uri)
    seen = _rows_in(held_out, data.read_frame(first.train_uri))
    assert len(held_out) == 74 and seen.sum() == 17, "batches 0+1 against 0+1+5: the reproduction's overlap"

    features, label = second.feature_names, second.label_column
    unseen = held_out[~seen]
    assert (validated.comparison_rows, validated.comparison_excluded_rows) == (57, 17)
    assert validated.champion_accuracy == _accuracy_of(settings, 1, unseen, features, label)
    # The rows it trained on flatter Production: that is what the comparison must not count.
    assert _accuracy_of(settings, 1, held_out, features, label) > validated.champion_accuracy
    assert validated.comparison_accuracy == _accuracy_of(settings, 2, unseen, features, label)
    assert validated.accuracy == _accuracy_of(settings, 2, held_out, features, label), "the threshold sees every row"

    registry.refresh_descriptions(settings)
    candidate = registry.get_version(client, settings.model_name, 2)
    assert candidate.tags[tags.VALIDATION_COMPARISON_ROWS] == "57"
    assert candidate.tags[tags.VALIDATION_COMPARISON_EXCLUDED_ROWS] == "17"
    assert float(candidate.tags[tags.VALIDATION_CHAMPION_ACCURACY]) == pytest.approx(validated.champion_accuracy)
    note = "57 of the 74 held-out rows, leaving out the 17 Production version 1 trained on"
    assert candidate.tags[tags.VALIDATION_COMPARISON_NOTE] == note
    assert f"| compared on | {note} |" in candidate.description


def test_a_production_version_without_a_recorded_split_is_compared_on_the_whole_held_out_set(grown, caplog):
    """A version registered before training splits were recorded: today's comparison, and a warning that says so."""
    settings, first, second, trained, _ = grown
    client = registry.client_for(settings)
    client.delete_model_version_tag(settings.model_name, "1", tags.DATA_TRAIN_SPLIT_URI)
    try:
        validated = steps.validate(settings, RunContext("mlops_pipeline", "second", 1, {}), trained, second)
    finally:
        client.set_model_version_tag(settings.model_name, "1", tags.DATA_TRAIN_SPLIT_URI, first.train_uri)

    held_out = data.read_frame(second.test_uri)
    assert (validated.comparison_rows, validated.comparison_excluded_rows) == (74, 0)
    assert validated.champion_accuracy == _accuracy_of(settings, 1, held_out, second.feature_names, second.label_column)
    assert validated.comparison_accuracy == validated.accuracy
    assert "Production version 1 has no record of its training split" in validated.comparison_note
    assert any(
        record.levelname == "WARNING" and "no record of its training split" in record.getMessage()
        for record in caplog.records
    )


def test_a_candidate_split_as_production_was_is_compared_on_every_held_out_row_without_reading_its_split(
    grown, monkeypatch
):
    """Production trained on this very split (a forced retrain on unchanged data): none of the held-out rows is one it
    saw, and its training split, a full read on large data, is not read to learn that."""
    settings, first, _, trained, _ = grown
    read = []
    monkeypatch.setattr(data, "read_frame", lambda uri, reader=data.read_frame: read.append(uri) or reader(uri))
    validated = steps.validate(settings, RunContext("mlops_pipeline", "again", 1, {}), trained, first)
    assert first.train_uri not in read and read == [first.test_uri]
    held_out = len(data.read_frame(first.test_uri))
    assert (validated.comparison_rows, validated.comparison_excluded_rows) == (held_out, 0)
    assert validated.comparison_note.endswith("Production version 1 trained on this same split")


def _frame(rows: list[tuple[float, int]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["x", "target"]).astype({"x": "float64"})


def test_rows_are_matched_by_value_whatever_their_index_or_integer_or_float_reading():
    held_out = _frame([(float(i), i % 2) for i in range(20)]).set_axis(range(100, 120))
    # Read from another file, the same values came out as integers.
    trained_on = pd.DataFrame({"target": [0, 1, 0], "x": [0, 3, 5]})
    rows = evaluation.rows_unseen_by_champion(
        held_out, trained_on, columns=["x", "target"], label="target", min_rows_per_class=5, champion_version=1
    )
    # x=0 (class 0) and x=3 (class 1) are rows of both; x=5 has class 0 in training but 1 held out: another row.
    assert (rows.rows, rows.excluded, rows.independent) == (18, 2, True)
    assert not rows.used[0] and not rows.used[3] and rows.used[5]
    assert rows.note == "18 of the 20 held-out rows, leaving out the 2 Production version 1 trained on"
    untouched = evaluation.rows_unseen_by_champion(
        held_out, trained_on.iloc[2:], columns=["x", "target"], label="target", min_rows_per_class=5, champion_version=1
    )
    assert untouched.note == "all 20 held-out rows: Production version 1 trained on none of them"


def test_too_few_unseen_rows_of_a_class_fall_back_to_the_whole_held_out_set():
    held_out = _frame([(float(i), int(i < 6)) for i in range(20)])
    trained_on = held_out.iloc[:2]
    rows = evaluation.rows_unseen_by_champion(
        held_out, trained_on, columns=["x", "target"], label="target", min_rows_per_class=5, champion_version=3
    )
    assert (rows.rows, rows.excluded, rows.independent) == (20, 0, False)
    assert rows.note == (
        "the whole held-out set (20 rows): 2 of them were in Production version 3's training set and the 18 others "
        "hold too few rows of a class to compare on (class 1: 4; at least 5 per class are needed)"
    )


def test_the_champion_comparison_uses_the_candidates_accuracy_on_the_same_rows():
    common = {"threshold": 0.8, "champion_version": 1, "tolerance": 0.01, "compare_with_champion": True}
    # On every held-out row the candidate looks worse; on the rows Production never saw it is as good.
    fair = evaluation.judge(0.90, champion_accuracy=0.95, compared_accuracy=0.95, compared_rows=57, **common)
    assert fair.passed
    worse = evaluation.judge(0.96, champion_accuracy=0.95, compared_accuracy=0.92, compared_rows=57, **common)
    # Under high drift the candidate must beat Production: on the same rows it does, though not on every row.
    drifted = {"drift": 0.5, "drift_threshold": 0.2, "drift_margin": 0.0, **common}
    assert evaluation.judge(0.95, champion_accuracy=0.96, compared_accuracy=0.97, compared_rows=57, **drifted).passed
    assert worse.reasons == [
        "accuracy 0.9200 on 57 held-out rows is worse than Production version 1 (0.9500) by more than the tolerance "
        "0.0100"
    ]
