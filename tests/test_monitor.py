"""mlops_monitor: windows of recorded traffic judged against the Production version, and retraining started when the
rules say so. Decisions as plain functions; the DAG through real ``dag.test()`` runs on a store where the pipeline
trained Production v1, with records and labels written by ml/records.py's writers."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from conftest import retraining_home

from ml.airflow_runner import run_dag
from ml.monitor import Observation, Rules, Window, aligned_window, judge, retraining_run_id, window_of_run
from ml.settings import ConfigurationError, Settings

RULES = Rules(drift_threshold=0.2, drift_share=0.3, accuracy_drop=0.05, min_requests=100, min_labelled=30)


def test_the_window_is_the_aligned_one_just_before_the_run():
    at = datetime(2026, 12, 4, 13, 0, tzinfo=UTC)
    assert aligned_window(at, 60) == Window(at - timedelta(hours=1), at)
    assert aligned_window(at + timedelta(minutes=20), 60) == Window(at, at + timedelta(hours=1))
    midnight = datetime(2026, 12, 5, tzinfo=UTC)
    # 7 h windows: a day's last one is cut at midnight, and a run at midnight judges it.
    assert aligned_window(midnight, 420) == Window(datetime(2026, 12, 4, 21, tzinfo=UTC), midnight)


def test_a_window_end_param_names_the_window_exactly_and_a_bad_one_is_refused():
    settings = Settings.from_env_or_embedded()
    window = window_of_run(settings, "2026-12-04T12:30:00", datetime(2030, 1, 1, tzinfo=UTC))
    assert window == Window(datetime(2026, 12, 4, 11, 30, tzinfo=UTC), datetime(2026, 12, 4, 12, 30, tzinfo=UTC))
    with pytest.raises(ConfigurationError, match="window_end 'yesterday' is not an ISO 8601 time"):
        window_of_run(settings, "yesterday", datetime.now(UTC))


@pytest.mark.parametrize("schedule", ["nonsense", "61 * *", "@often"])
def test_a_schedule_that_is_no_cron_expression_is_refused_and_the_default_stays(monkeypatch, schedule):
    monkeypatch.setenv("MLOPS_MONITOR_SCHEDULE", schedule)
    with pytest.raises(ConfigurationError, match="is neither five cron fields nor one of @hourly"):
        Settings.from_env()
    assert Settings.from_env_or_embedded().monitor_schedule == "@hourly"


def observed(**values: Any) -> Observation:
    return Observation(**{"version": 1, "requests": 400, "rows": 400, "features": 30, **values})


def test_too_little_traffic_is_not_judged_whatever_it_holds():
    verdict = judge(observed(requests=99, drifted=tuple(f"f{i}" for i in range(30))), RULES)
    assert not verdict.judged and not verdict.retrain
    assert verdict.findings == ("too little traffic: 99 requests answered by v1 (fewer than 100); not judged",)


def test_drift_retrains_only_above_the_share_of_features_the_rule_allows():
    within = judge(observed(drifted=tuple(f"f{i}" for i in range(9))), RULES)
    assert within.judged and not within.retrain
    assert within.findings[0] == "drift in 9 of 30 features, within the rule (30%)"
    above = judge(observed(drifted=tuple(f"f{i}" for i in range(10))), RULES)
    assert above.retrain and above.reasons[0].startswith("drift in 10 of 30 features of v1's live inputs")
    assert judge(observed(), RULES).findings[0] == "no drift (0 of 30 features above PSI 0.2)"


def test_live_accuracy_retrains_when_it_drops_beyond_the_rule_on_enough_labels():
    dropped = judge(observed(labelled=412, live_accuracy=0.91, validation_accuracy=0.97), RULES)
    assert dropped.retrain
    assert dropped.reasons == (
        "live accuracy 0.91 on 412 labelled predictions, 0.06 below v1's validation accuracy 0.97 "
        "(the rule allows 0.05)",
    )
    assert not judge(observed(labelled=412, live_accuracy=0.93, validation_accuracy=0.97), RULES).retrain
    few = judge(observed(labelled=29, live_accuracy=0.1, validation_accuracy=0.97), RULES)
    assert not few.retrain
    assert few.findings[1] == "live accuracy not judged: 29 labelled predictions (fewer than 30)"


def test_drift_not_measured_says_why():
    verdict = judge(observed(features=0, drift_problem="v1 has no training snapshot"), RULES)
    assert verdict.findings[0] == "drift not measured: v1 has no training snapshot" and not verdict.retrain


# The DAG on a trained store.


@pytest.fixture(scope="module")
def production(airflow_db, tmp_path_factory):
    """A home where the pipeline promoted v1; the bundled data set with its labels, to send as traffic."""
    from ml import data

    with retraining_home(tmp_path_factory, "monitor"):
        run = run_dag("mlops_pipeline")
        assert run.state == "success", run
        settings = Settings.from_env()
        frame = data.load_source(settings.data_source)
        yield settings, frame


def record_traffic(
    settings: Settings, frame: Any, window_end: datetime, *, predictions: Any = None, prefix: str = "r"
) -> list[str]:
    """One recorded request per row of ``frame``, answered by v1 half an hour before ``window_end``; their ids."""
    from ml import records

    label = settings.label_column
    features = frame.drop(columns=[label])
    answers = frame[label] if predictions is None else predictions
    at = (window_end - timedelta(minutes=30)).timestamp()
    answered = [
        records.Answered(f"{prefix}{i}", at, settings.model_name, 1, [int(answers.iloc[i])], features.iloc[[i]])
        for i in range(len(frame))
    ]
    records.write_records(settings.data_store, answered)
    return [item.request_id for item in answered]


def label_traffic(settings: Settings, request_ids: list[str], labels: Any) -> None:
    from ml import records

    rows = [(request_id, 0, int(label), 1) for request_id, label in zip(request_ids, labels, strict=True)]
    records.write_feedback(settings.data_store, records.labels_frame(rows, settings.model_name))


def monitor(window_end: datetime) -> Any:
    return run_dag("mlops_monitor", conf={"window_end": window_end.isoformat()})


def pipeline_runs(run_id: str) -> list[dict[str, Any]]:
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        found = session.scalars(select(DagRun).where(DagRun.dag_id == "mlops_pipeline", DagRun.run_id == run_id))
        return [{"conf": run.conf, "run_type": str(run.run_type)} for run in found]


def window_ending(hours_ago: int) -> datetime:
    return datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=hours_ago)


@pytest.mark.slow
def test_unshifted_traffic_starts_nothing_and_the_note_says_so(production):
    settings, frame = production
    end = window_ending(1)
    record_traffic(settings, frame.sample(300, random_state=1), end)
    run = monitor(end)
    assert run.state == "success"
    judged = run.result("judge_window")
    assert judged["judged"] and judged["trigger_run_id"] is None and judged["production_version"] == 1
    assert judged["observation"]["requests"] == 300
    assert run.state_of("retraining_due") == "success" and run.state_of("start_retraining") == "skipped"
    assert "**v1: " in run.note and "no retraining" in run.note and "of 30 features" in run.note
    assert pipeline_runs(retraining_run_id(1, Window(end - timedelta(hours=1), end))) == []
    logged = mlflow_run(settings, judged["mlflow_run_id"])
    assert logged.data.tags["mlops.monitor.version"] == "1"
    assert logged.data.metrics["requests"] == 300 and "live_accuracy" not in logged.data.metrics


def mlflow_run(settings: Settings, run_id: str) -> Any:
    from ml import registry

    return registry.client_for(settings).get_run(run_id)


@pytest.mark.slow
def test_shifted_traffic_starts_one_retraining_per_window(production):
    from ml import ingest

    settings, frame = production
    end = window_ending(2)
    features = [column for column in frame.columns if column != settings.label_column]
    shifted = ingest.apply_shift(frame.sample(300, random_state=2), ingest.parse_shift({"*": 1.6}, features))
    record_traffic(settings, shifted, end, prefix="s")
    first = monitor(end)
    judged = first.result("judge_window")
    run_id = retraining_run_id(1, Window(end - timedelta(hours=1), end))
    assert judged["trigger_run_id"] == run_id
    assert first.state_of("start_retraining") == "success"
    assert "retraining started: mlops_pipeline run" in first.note and "drift in" in first.note
    (started,) = pipeline_runs(run_id)
    assert (
        started["conf"]["reason"].startswith("mlops_monitor, ")
        and "features of v1's live inputs" in started["conf"]["reason"]
    )
    logged = mlflow_run(settings, judged["mlflow_run_id"])
    assert logged.data.metrics["drift_share"] > 0.3 and logged.data.tags["mlops.monitor.retraining_run_id"] == run_id

    again = monitor(end)
    assert again.result("judge_window")["already_started"] is True
    assert again.state_of("start_retraining") == "skipped"
    assert "already started" in again.note
    assert len(pipeline_runs(run_id)) == 1


@pytest.mark.slow
def test_too_little_traffic_starts_nothing(production):
    settings, frame = production
    end = window_ending(3)
    features = [column for column in frame.columns if column != settings.label_column]
    from ml import ingest

    record_traffic(settings, ingest.apply_shift(frame.head(20), ingest.parse_shift({"*": 3}, features)), end)
    run = monitor(end)
    assert run.result("judge_window")["judged"] is False
    assert run.state_of("start_retraining") == "skipped"
    assert run.note.startswith("**too little traffic: 20 requests answered by v1 (fewer than 100); not judged**")


@pytest.mark.slow
def test_labels_that_show_accuracy_dropping_start_a_retraining(production):
    settings, frame = production
    end = window_ending(4)
    traffic = frame.sample(200, random_state=4).reset_index(drop=True)
    truth = traffic[settings.label_column]
    # The model's answers, as the records hold them, are right for one request in two.
    answers = truth.where(traffic.index % 2 == 0, 1 - truth)
    ids = record_traffic(settings, traffic, end, predictions=answers, prefix="a")
    label_traffic(settings, ids, truth)
    run = monitor(end)
    judged = run.result("judge_window")
    assert judged["observation"]["labelled"] == 200 and judged["observation"]["live_accuracy"] == 0.5
    assert "live accuracy 0.50 on 200 labelled predictions" in judged["reason"]
    (started,) = pipeline_runs(judged["trigger_run_id"])
    assert "below v1's validation accuracy" in started["conf"]["reason"]


@pytest.mark.slow
def test_an_event_of_the_recorded_traffic_asset_starts_the_monitor_on_the_current_window(production):
    """What an event of the records asset does (posted from the asset's page or the REST API): Airflow records it the
    way the API does (AssetManager), and the scheduler's own query creates a monitor run for it."""
    from airflow.assets.manager import AssetManager
    from airflow.models.asset import AssetModel
    from airflow.utils.session import create_session
    from airflow_harness import create_asset_triggered_runs, run_existing
    from sqlalchemy import select
    from test_data_aware import set_paused

    from ml.assets import recorded_traffic_asset

    uri = recorded_traffic_asset().uri
    set_paused("mlops_monitor", False)
    try:
        with create_session() as session:
            asset = session.scalar(select(AssetModel).where(AssetModel.uri == uri))
            assert asset is not None, f"no asset {uri}: mlops_monitor is not scheduled on it"
            AssetManager.register_asset_change(asset=asset, extra={"by": "a test"}, source_is_api=True, session=session)
        (created,) = create_asset_triggered_runs("mlops_monitor")
        run = run_existing("mlops_monitor", created)
    finally:
        set_paused("mlops_monitor", True)
    assert run.state == "success"
    window = run.result("judge_window")
    assert (
        datetime.fromisoformat(window["window_start"])
        <= datetime.now(UTC)
        < datetime.fromisoformat(window["window_end"])
    )
    assert run.note.startswith("**too little traffic: 0 requests answered by v1")


@pytest.fixture(scope="module")
def airflow_api(production, tmp_path_factory):
    """``airflow api-server`` on the session's Airflow database, and the settings that post events to it as its
    generated admin user."""
    import dataclasses
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from conftest import free_port, wait_for_http

    settings, _ = production
    port, log = free_port(), tmp_path_factory.mktemp("api-server") / "api-server.log"
    command = [
        str(Path(sys.executable).parent / "airflow"),
        "api-server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    with log.open("wb") as output:
        server = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_http(f"{url}/api/v2/version", 120, server, log)
        passwords = Path(os.environ["AIRFLOW_HOME"]) / "simple_auth_manager_passwords.json.generated"
        user, password = next(iter(json.loads(passwords.read_text()).items()))
        yield dataclasses.replace(
            settings, airflow_api_url=url, airflow_api_username=user, airflow_api_password=password
        )
    finally:
        os.killpg(server.pid, 15)
        server.wait(30)


@pytest.mark.slow
def test_the_server_announces_a_completed_window_and_the_monitor_judges_that_window(airflow_api, caplog):
    """The model server's window events (ml/serving/window_events.py) posted to a real API server: one event for the
    window that closed when a request of the next one was written, with that window's end, which the run it starts
    judges; and a refused login is counted and logged once, without the password."""
    import dataclasses

    from airflow_harness import create_asset_triggered_runs, run_existing
    from conftest import asset_events, set_paused

    from ml.assets import recorded_traffic_uri
    from ml.serving.window_events import WindowEvents

    settings = airflow_api
    closed = aligned_window(datetime.now(UTC) - timedelta(hours=2), 60)
    events = WindowEvents(settings)
    events.start()
    set_paused("mlops_monitor", False)
    try:
        events.written(
            [(closed.start + timedelta(minutes=5)).timestamp(), (closed.end - timedelta(seconds=1)).timestamp()]
        )
        events.written([(closed.end + timedelta(minutes=1)).timestamp()])  # the first request of the next window
        events.written([(closed.end + timedelta(minutes=2)).timestamp()])
        events.stop(timeout=60)
        assert (events.sent, events.failed) == (1, 0), events.last_error
        announced = [event for event in asset_events(recorded_traffic_uri(settings)) if "window_end" in event]
        assert announced[-1] == {
            "source_dag_id": None,
            "window_end": closed.end.isoformat(),
            "window_minutes": 60,
            "by": "model server",
            "from_rest_api": True,
        }
        (created,) = create_asset_triggered_runs("mlops_monitor")
        run = run_existing("mlops_monitor", created)
    finally:
        set_paused("mlops_monitor", True)
    judged = run.result("judge_window")
    assert (judged["window_start"], judged["window_end"]) == (closed.start.isoformat(), closed.end.isoformat())

    refused = WindowEvents(dataclasses.replace(settings, airflow_api_password="not-the-password"))
    refused.start()
    for minutes in (0, 60, 120, 180):
        refused.written([(closed.end + timedelta(minutes=minutes)).timestamp()])
    refused.stop(timeout=60)
    assert (refused.sent, refused.failed) == (0, 3)
    warnings = [r.getMessage() for r in caplog.records if "window of recorded traffic" in r.getMessage()]
    assert (
        len(warnings) == 1 and "logging in to Airflow at http://127.0.0.1" in warnings[0] and "HTTP 401" in warnings[0]
    )
    assert "not-the-password" not in caplog.text


@pytest.mark.slow
def test_the_recorder_announces_the_window_that_a_written_request_closed(airflow_api, production):
    """The model server's recorder on settings that name the API server: once a request of the next window is written,
    the event of the window before it is posted, with that window's end."""
    import dataclasses
    import time
    from types import SimpleNamespace

    from conftest import asset_events

    from ml.assets import recorded_traffic_uri
    from ml.serving.recorder import Recorder

    settings = airflow_api
    features = production[1].drop(columns=[settings.label_column])
    closed_end = window_ending(6)
    model = SimpleNamespace(name=settings.model_name, version=1)
    recorder = Recorder(dataclasses.replace(settings, recording_flush_seconds=0.1))
    recorder.start()
    try:
        for written, at in enumerate((closed_end - timedelta(minutes=10), closed_end + timedelta(minutes=10)), 1):
            recorder.offer(f"window-{written}", at.timestamp(), model, features.iloc[[0]], [1])
            deadline = time.monotonic() + 30
            while recorder.flushed < written and time.monotonic() < deadline:
                time.sleep(0.1)
            assert recorder.flushed == written, recorder.last_error
    finally:
        recorder.stop()
    events = recorder.window_events
    deadline = time.monotonic() + 60
    while events.sent + events.failed == 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert (events.sent, events.failed) == (1, 0), events.last_error
    announced = [event["window_end"] for event in asset_events(recorded_traffic_uri(settings)) if "window_end" in event]
    assert closed_end.isoformat() in announced


@pytest.mark.slow
def test_ingest_from_the_command_line_posts_the_data_asset_event(airflow_api, tmp_path, monkeypatch, capsys):
    """``mlops ingest`` outside Airflow, with the API configured: the landed batch is an event of the data asset, as the
    mlops_ingest DAG's outlet makes it; an API server that does not answer leaves the batch landed and says so."""
    import json

    from conftest import asset_events, free_port

    from ml import ingest
    from ml.assets import data_asset_uri

    settings = airflow_api
    asset = data_asset_uri("sklearn:breast_cancer")  # the asset this home's mlops_pipeline is scheduled on
    monkeypatch.setenv("MLOPS_DATA_SOURCE", f"{tmp_path}/incoming/")
    monkeypatch.setenv("MLOPS_DATA_ASSET_URI", asset)
    monkeypatch.setenv("MLOPS_AIRFLOW_API_URL", settings.airflow_api_url)
    monkeypatch.setenv("MLOPS_AIRFLOW_API_USERNAME", settings.airflow_api_username)
    monkeypatch.setenv("MLOPS_AIRFLOW_API_PASSWORD", settings.airflow_api_password)
    assert ingest.main(["--initial"]) == 0
    landed = json.loads(capsys.readouterr().out)
    assert isinstance(landed["asset_event"], int) and "asset_event_error" not in landed
    assert asset_events(asset)[-1] == {
        "source_dag_id": None,
        **ingest.event_extra(landed),
        "from_rest_api": True,
    }

    monkeypatch.setenv("MLOPS_AIRFLOW_API_URL", f"http://127.0.0.1:{free_port()}")
    assert ingest.main([]) == 0
    second = json.loads(capsys.readouterr().out)
    assert second["landed"] and second["batch"] == 1 and "asset_event" not in second
    assert "did not answer: ConnectError" in second["asset_event_error"]
    assert settings.airflow_api_password not in second["asset_event_error"]


def test_compaction_merges_a_closed_hour_once_and_readers_see_each_record_once(tmp_path, monkeypatch):
    """Many small record files of a closed hour become one; a compaction stopped after writing the merged file and
    before deleting the small ones loses and duplicates nothing, for readers and for the next compaction; the open
    hour is left alone; a second run changes nothing."""
    import pandas as pd

    from ml import records

    store = str(tmp_path / "datastore")
    now = datetime.now(UTC)
    closed = aligned_window(now - timedelta(hours=3), 60)
    features = pd.DataFrame({"x": [1.0]})

    def write(at: datetime, count: int, prefix: str) -> None:
        for index in range(count):
            item = records.Answered(f"{prefix}{index}", at.timestamp() + index, "m", 1, [index % 2], features)
            records.write_records(store, [item])

    write(closed.start + timedelta(minutes=1), 12, "a")
    write(now, 3, "open")
    everything = (closed.start, now + timedelta(minutes=1))
    before = records.read_records(store, *everything)
    partition = tmp_path / "datastore" / "records" / "version=1" / records.hour_partition(closed.start)

    # Stopped between the merged file and the deletes: readers already skip what it holds.
    deleted: list[str] = []
    monkeypatch.setattr("fsspec.implementations.local.LocalFileSystem.rm", lambda self, path, **_: deleted.append(path))
    assert records.compact_records(store, now) == {"partitions": 1, "files": 12}
    monkeypatch.undo()
    assert len(list(partition.iterdir())) == 13 and len(deleted) == 12
    pd.testing.assert_frame_equal(records.read_records(store, *everything), before)

    # The next run deletes what the merged file holds and merges nothing again; a late file is merged with it.
    assert records.compact_records(store, now) == {"partitions": 0, "files": 0}
    (merged,) = partition.iterdir()
    assert merged.name.startswith(records.COMPACTED_PREFIX)
    write(closed.start + timedelta(minutes=30), 1, "late")
    assert records.compact_records(store, now) == {"partitions": 1, "files": 2}
    assert records.compact_records(store, now) == {"partitions": 0, "files": 0}
    (remerged,) = partition.iterdir()
    assert remerged.name != merged.name
    after = records.read_records(store, *everything)
    assert sorted(after["request_id"]) == sorted([*before["request_id"], "late0"])
    assert after["request_id"].is_unique
    open_hour = partition.parent.parent / records.hour_partition(now)
    assert len(list(open_hour.iterdir())) == 3, "the hour under way is not compacted"

    # Two compactions at once: each writes a merged file of the same files (here, a copy under a later name). Readers
    # read the rows once, and the next compaction keeps one file of them.
    racing = remerged.with_name(remerged.name.replace(records.COMPACTED_PREFIX, records.COMPACTED_PREFIX + "z"))
    shutil.copyfile(remerged, racing)
    pd.testing.assert_frame_equal(records.read_records(store, *everything), after)
    assert records.compact_records(store, now) == {"partitions": 0, "files": 0}
    assert list(partition.iterdir()) == [racing]
    pd.testing.assert_frame_equal(records.read_records(store, *everything), after)

    # An hour older than the lookback is not looked at again (its files are read all the same).
    old = now - records.COMPACTION_LOOKBACK - timedelta(days=1)
    write(old, 2, "old")
    assert records.compact_records(store, now) == {"partitions": 0, "files": 0}
    assert len(records.read_records(store, old - timedelta(minutes=1), old + timedelta(minutes=1))) == 2
