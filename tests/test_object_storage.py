"""The data store, folder sources and MLflow's artifacts on a real S3 server (SeaweedFS, tests/s3.py).

Snapshots, splits and landed batches are written and read through S3 with the keys and endpoint of the environment or
of an Airflow connection (MLOPS_S3_CONN_ID); storage that cannot work fails at once with a message naming it (an
unknown bucket, keys the server refuses, a connection that does not exist), storage that does not answer is left to
the task's retry, and a snapshot missing or damaged in the bucket meets the digest check. The slow test runs the
pipeline with everything but its databases on S3, its keys in an Airflow connection alone.
"""

from __future__ import annotations

import contextvars
import json
import os
import subprocess
import sys

import pandas as pd
import pytest
from conftest import (
    PROMOTED_RUN_STATES,
    MlflowServer,
    asset_events,
    forget_s3_clients,
    free_port,
    production_markers,
)

from ml import data, ingest, tasks
from ml.redaction import mask_credentials, register_secrets
from ml.settings import Settings


@pytest.fixture(scope="module")
def cancer() -> pd.DataFrame:
    return data.load_source("sklearn:breast_cancer")


def test_snapshots_splits_and_batches_live_in_the_bucket(s3_bucket, s3_server, cancer):
    store = f"s3://{s3_bucket}/store"
    snapshot = data.write_snapshot(cancer, store)
    assert snapshot.uri == f"{store}/snapshots/{snapshot.digest}.parquet"
    pd.testing.assert_frame_equal(data.read_frame(snapshot.uri), cancer)
    split = data.split_frame(
        cancer,
        label="target",
        features=list(cancer.columns[:-1]),
        test_size=0.2,
        seed=42,
        data_store=store,
        run_folder="run-1",
    )
    assert len(data.read_frame(split.train_uri)) == split.train_rows
    admin = s3_server.filesystem(s3_server.admin)
    assert sorted(admin.find(f"{s3_bucket}/store")) == sorted(
        [
            f"{s3_bucket}/store/snapshots/{snapshot.digest}.parquet",
            f"{s3_bucket}/store/runs/run-1/train.parquet",
            f"{s3_bucket}/store/runs/run-1/test.parquet",
        ]
    ), "nothing but the objects themselves: no half-written file is left behind"

    incoming = f"s3://{s3_bucket}/incoming/"
    settings = Settings.from_env({"MLOPS_DATA_SOURCE": incoming})
    assert ingest.land(settings, run_key="mlops_ingest/run-1")["batch"] == 0
    assert ingest.land(settings, file_format="parquet", run_key="mlops_ingest/run-2")["batch"] == 1
    assert [path.rsplit("/", 1)[-1] for path in data.folder_files(incoming)] == ["batch-0000.csv", "batch-0001.parquet"]
    assert len(data.load_source(incoming)) == 319


def test_a_write_that_fails_midway_leaves_nothing_in_the_bucket(s3_bucket, s3_server):
    # Written straight to its key, the object appears only once the upload is committed: a write that fails after
    # bytes went up leaves neither an object nor an unfinished upload.
    def fail_midway(handle):
        handle.write(b"PAR1" + bytes(1_000_000))
        raise OSError("the writer failed midway")

    with pytest.raises(data.DataSourceUnavailableError, match="the writer failed midway"):
        data._write_atomically(f"s3://{s3_bucket}/store/runs/run-1/train.parquet", fail_midway)
    admin = s3_server.filesystem(s3_server.admin)
    assert admin.find(s3_bucket) == []
    assert admin.list_multipart_uploads(s3_bucket) == []


def test_a_batch_lands_straight_at_its_key_or_not_at_all(s3_bucket, s3_server, monkeypatch):
    # mlops ingest writes a batch as the data store writes a snapshot: straight to its key, shown once complete. When
    # the manifest records it, nothing of it is visible yet (no temporary object to rename); a write that fails
    # midway leaves neither a batch, nor a manifest entry, nor an unfinished upload, and the next try lands it.
    incoming = f"s3://{s3_bucket}/incoming/"
    settings = Settings.from_env({"MLOPS_DATA_SOURCE": incoming})
    admin = s3_server.filesystem(s3_server.admin)
    seen_when_recorded = []
    save = ingest.FolderTarget._save

    def save_and_look(target, document):
        seen_when_recorded.append(admin.find(f"{s3_bucket}/incoming"))
        save(target, document)

    monkeypatch.setattr(ingest.FolderTarget, "_save", save_and_look)
    assert ingest.land(settings, run_key="mlops_ingest/run-1")["batch"] == 0
    assert seen_when_recorded == [[]]
    assert admin.find(f"{s3_bucket}/incoming") == [
        f"{s3_bucket}/incoming/{n}" for n in ("_manifest.json", "batch-0000.csv")
    ]

    def fail_midway(frame, handle):
        handle.write(b"PAR1" + bytes(100_000))
        raise OSError("the writer failed midway")

    to_parquet = data.to_parquet
    monkeypatch.setattr(data, "to_parquet", fail_midway)
    with pytest.raises(data.DataSourceUnavailableError, match="the writer failed midway"):
        ingest.land(settings, file_format="parquet", run_key="mlops_ingest/run-2")
    assert admin.find(f"{s3_bucket}/incoming") == [
        f"{s3_bucket}/incoming/{n}" for n in ("_manifest.json", "batch-0000.csv")
    ]
    assert admin.list_multipart_uploads(s3_bucket) == []
    assert [int(r["batch"]) for r in ingest.FolderTarget(incoming).records()] == [0]
    monkeypatch.setattr(data, "to_parquet", to_parquet)
    assert ingest.land(settings, file_format="parquet", run_key="mlops_ingest/run-2")["batch"] == 1
    assert len(data.load_source(incoming)) == 319


def test_unknown_bucket_fails_at_once_naming_it(s3_bucket, cancer):
    missing = f"{s3_bucket}-gone"
    with pytest.raises(data.DataSourceError) as writing:
        data.write_snapshot(cancer, f"s3://{missing}/store")
    assert not isinstance(writing.value, data.DataSourceUnavailableError)
    assert f"bucket {missing!r} does not exist" in str(writing.value)
    assert f"s3://{missing}/store/snapshots/" in str(writing.value)
    with pytest.raises(data.DataSourceError, match=f"bucket {missing!r} does not exist") as listing:
        data.load_source(f"s3://{missing}/incoming/")
    assert not isinstance(listing.value, data.DataSourceUnavailableError)
    with pytest.raises(data.DataSourceError, match=f"batch folder s3://{missing}/incoming: bucket") as landing:
        ingest.land(Settings.from_env({"MLOPS_DATA_SOURCE": f"s3://{missing}/incoming/"}))
    assert not isinstance(landing.value, data.DataSourceUnavailableError)


def test_refused_keys_fail_at_once_without_showing_them(s3_bucket, s3_server, cancer, monkeypatch):
    store = f"s3://{s3_bucket}/store"
    snapshot = data.write_snapshot(cancer, store)
    wrong = "wrong-secret-" + s3_server.service.secret_key[:8]
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
    forget_s3_clients()
    register_secrets([wrong])
    for attempt in (
        lambda: data.read_frame(snapshot.uri),
        lambda: data.write_snapshot(cancer.head(100), store),
        lambda: data.load_source(f"s3://{s3_bucket}/incoming/"),
        lambda: ingest.land(Settings.from_env({"MLOPS_DATA_SOURCE": f"s3://{s3_bucket}/incoming/"})),
    ):
        with pytest.raises(data.DataSourceError, match="the object store refuses these credentials") as refused:
            attempt()
        assert not isinstance(refused.value, data.DataSourceUnavailableError)
        assert s3_bucket in str(refused.value)
        assert wrong not in mask_credentials(str(refused.value)) and wrong not in str(refused.value)


S3_CONN_ID = "mlops_s3"


def use_s3_connection(monkeypatch: pytest.MonkeyPatch, login: str, password: str, endpoint: str) -> None:
    """An Airflow connection of type aws, given as Airflow reads one from the environment, named by MLOPS_S3_CONN_ID."""
    connection = {"conn_type": "aws", "login": login, "password": password, "extra": {"endpoint_url": endpoint}}
    monkeypatch.setenv(f"AIRFLOW_CONN_{S3_CONN_ID.upper()}", json.dumps(connection))
    monkeypatch.setenv("MLOPS_S3_CONN_ID", S3_CONN_ID)


def land_batch_task() -> str:
    """mlops_ingest's task body, run as a worker runs it (its own context): the message it fails with."""
    from airflow.sdk.exceptions import AirflowFailException

    with pytest.raises(AirflowFailException) as failed:
        contextvars.copy_context().run(tasks.land_batch, {"params": {}})
    return str(failed.value)


def test_a_missing_or_refused_s3_connection_fails_the_task_naming_it(s3_bucket, s3_server, tmp_path, monkeypatch):
    from conftest import use_fresh_home

    use_fresh_home(monkeypatch, tmp_path / "mlops")
    monkeypatch.setenv("MLOPS_DATA_SOURCE", f"s3://{s3_bucket}/incoming/")
    monkeypatch.setenv("MLOPS_S3_CONN_ID", "mlops_s3_typo")
    refusal = land_batch_task()
    assert "MLOPS_S3_CONN_ID='mlops_s3_typo' names no Airflow connection" in refusal, refusal

    wrong = "wrong-secret-" + s3_server.service.secret_key[:8]
    use_s3_connection(monkeypatch, s3_server.service.access_key, wrong, s3_server.endpoint)
    refused = land_batch_task()
    assert "the object store refuses these credentials" in refused, refused
    assert f"check the login and password of the Airflow connection {S3_CONN_ID!r} (MLOPS_S3_CONN_ID)" in refused
    assert wrong not in refused

    # The environment's keys are right: the connection's, and nothing else, were refused. A task without the setting
    # in the same process uses the environment's again.
    monkeypatch.delenv("MLOPS_S3_CONN_ID")
    assert contextvars.copy_context().run(tasks.land_batch, {"params": {}})["batch"] == 0


def test_store_that_does_not_answer_is_left_to_a_retry(s3_bucket, monkeypatch, cancer):
    silent = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", silent)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's own retries: the task's retry is the one that counts
    forget_s3_clients()
    with pytest.raises(data.DataSourceUnavailableError, match=f"s3://{s3_bucket}/store/snapshots/.*Could not connect"):
        data.write_snapshot(cancer, f"s3://{s3_bucket}/store")
    with pytest.raises(data.DataSourceUnavailableError, match="Could not connect"):
        data.read_frame(f"s3://{s3_bucket}/store/runs/run-1/train.parquet")


def test_snapshot_damaged_or_missing_in_the_bucket(s3_bucket, s3_server, cancer):
    snapshot = data.write_snapshot(cancer, f"s3://{s3_bucket}/store")
    admin = s3_server.filesystem(s3_server.admin)
    key = snapshot.uri.removeprefix("s3://")
    other = cancer.head(100)
    with admin.open(key, "wb") as handle:
        data.to_parquet(other, handle)
    with pytest.raises(data.SnapshotDigestError, match="does not hold the content its name promises"):
        data.read_frame(snapshot.uri)
    admin.pipe(key, b"PAR1 not parquet")
    with pytest.raises(data.SnapshotDigestError, match="is damaged"):
        data.read_frame(snapshot.uri)
    # The next extract writes it again, and it holds its content once more.
    assert data.write_snapshot(cancer, f"s3://{s3_bucket}/store") == snapshot
    pd.testing.assert_frame_equal(data.read_frame(snapshot.uri), cancer)
    admin.rm(key)
    with pytest.raises(data.DataSourceError, match="does not exist; was it written by an earlier task") as missing:
        data.read_frame(snapshot.uri)
    assert not isinstance(missing.value, data.DataSourceUnavailableError)


@pytest.mark.slow
def test_a_run_on_object_storage_promotes_a_version_kept_in_the_bucket(
    airflow_db, s3_bucket, s3_server, tmp_path, monkeypatch
):
    """mlops_ingest lands the initial bulk in an S3 folder source and emits the asset event; the pipeline snapshots
    and splits it in an S3 data store, logs the model through an MLflow server that keeps its artifacts in the same
    bucket, promotes it, and the post-deploy check loads it back from there.

    The tasks reach the bucket with the keys and endpoint of an Airflow connection alone: the environment's keys are
    wrong and it names no endpoint. The keys appear in neither database (XCom, the runs' conf and params, MLflow's
    params and tags) nor in any task log."""
    from conftest import use_fresh_home

    from ml import registry
    from ml.airflow_runner import run_dag

    server = MlflowServer(
        tmp_path / "mlflow", artifacts_destination=f"s3://{s3_bucket}/mlartifacts", environment=s3_server.environment()
    )
    server.start()
    try:
        use_fresh_home(monkeypatch, tmp_path / "mlops")
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
        monkeypatch.setenv("MLOPS_DATA_STORE", f"s3://{s3_bucket}/store")
        monkeypatch.setenv("MLOPS_DATA_SOURCE", f"s3://{s3_bucket}/incoming/")
        keys = s3_server.service
        use_s3_connection(monkeypatch, keys.access_key, keys.secret_key, s3_server.endpoint)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "wrong-key-id")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-access-key")
        monkeypatch.delenv("AWS_ENDPOINT_URL")
        forget_s3_clients()
        settings = Settings.from_env()

        landed = run_dag("mlops_ingest")
        assert landed.state == "success", landed.tasks
        assert landed.result("land_batch")["location"] == f"s3://{s3_bucket}/incoming/batch-0000.csv"
        events = asset_events(f"s3://{s3_bucket}/incoming")  # Airflow drops the trailing / of an asset's URI
        assert [(e["source_dag_id"], e["batch"], e["rows"]) for e in events] == [("mlops_ingest", 0, 269)]

        run = run_dag("mlops_pipeline")
        assert {task: outcome.state for task, outcome in run.tasks.items()} == PROMOTED_RUN_STATES, run.tasks
        assert production_markers(settings) == (1, [1])
        assert run.result("deploy_model")["health_check"] == "passed"
        extracted = run.result("extract_data")
        assert extracted["records"] == 269
        assert extracted["snapshot_uri"] == f"s3://{s3_bucket}/store/snapshots/{extracted['digest']}.parquet"
        version = registry.get_version(registry.client_for(settings), settings.model_name, 1)
        assert version.tags["mlops.data.snapshot_uri"] == extracted["snapshot_uri"]
    finally:
        server.stop()

    bucket = s3_server.filesystem(s3_server.admin)
    stored = bucket.find(s3_bucket)
    assert f"{s3_bucket}/store/snapshots/{extracted['digest']}.parquet" in stored
    assert any(path.startswith(f"{s3_bucket}/store/runs/") and path.endswith("/train.parquet") for path in stored)
    # The model MLflow logged, and the post-deploy check loaded, through the server: its files are in the bucket.
    models = [path for path in stored if path.startswith(f"{s3_bucket}/mlartifacts/") and path.endswith("/MLmodel")]
    assert models, stored
    assert not (tmp_path / "mlflow" / "artifacts").exists()
    secret = s3_server.service.secret_key.encode()
    task_logs = [path for path in (airflow_db / "logs").rglob("*") if path.is_file()]
    assert any(f"run_id={run.run_id}" in str(path) for path in task_logs), "the run's task logs are where they are read"
    for stored_file in [*airflow_db.glob("airflow.db*"), *(tmp_path / "mlflow").glob("mlflow.db*"), *task_logs]:
        assert secret not in stored_file.read_bytes(), stored_file


def test_the_command_line_and_the_model_server_read_the_s3_connection(
    airflow_db, s3_bucket, s3_server, monkeypatch, capsys
):
    """Outside tasks too, MLOPS_S3_CONN_ID's connection is what reaches the bucket (the environment's keys are wrong),
    read through Airflow's own lookup; a missing one or refused keys end with the message a task gives, naming it,
    and the keys are shown nowhere."""
    from ml import object_store

    monkeypatch.setattr(object_store, "_for_process", None)  # what the commands below set for their process
    # As in a process that never ran a task: a test before this one may have run task code in this thread's context.
    monkeypatch.setattr(object_store, "_current", contextvars.ContextVar("mlops_s3_connection"))
    incoming = f"s3://{s3_bucket}/incoming/"
    monkeypatch.setenv("MLOPS_DATA_SOURCE", incoming)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "wrong-key-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-access-key")
    keys = s3_server.service
    use_s3_connection(monkeypatch, keys.access_key, keys.secret_key, s3_server.endpoint)
    forget_s3_clients()
    assert ingest.main(["--initial"], prog="mlops ingest") == 0
    landed = capsys.readouterr()
    assert json.loads(landed.out)["location"] == f"{incoming}batch-0000.csv"
    assert keys.secret_key not in landed.out + landed.err

    # A connection kept in Airflow's metadata database, as `airflow connections add` keeps one, is found too.
    from airflow.models.connection import Connection
    from airflow.utils.session import create_session

    stored = Connection(
        conn_id="mlops_s3_stored",
        conn_type="aws",
        login=keys.access_key,
        password=keys.secret_key,
        extra=json.dumps({"endpoint_url": s3_server.endpoint}),
    )
    with create_session() as session:
        session.add(stored)
    try:
        monkeypatch.setenv("MLOPS_S3_CONN_ID", "mlops_s3_stored")
        forget_s3_clients()
        assert ingest.main(["--list"], prog="mlops ingest") == 0
        assert json.loads(capsys.readouterr().out.splitlines()[0])["batch"] == 0
    finally:
        with create_session() as session:
            session.query(Connection).filter(Connection.conn_id == "mlops_s3_stored").delete()

    wrong = "wrong-secret-" + keys.secret_key[:8]
    use_s3_connection(monkeypatch, keys.access_key, wrong, s3_server.endpoint)
    forget_s3_clients()
    assert ingest.main(["--list"], prog="mlops ingest") == 2
    refused = capsys.readouterr().err
    assert "the object store refuses these credentials" in refused, refused
    assert f"check the login and password of the Airflow connection {S3_CONN_ID!r} (MLOPS_S3_CONN_ID)" in refused
    assert wrong not in refused

    monkeypatch.setenv("MLOPS_S3_CONN_ID", "mlops_s3_typo")
    assert ingest.main(["--list"], prog="mlops ingest") == 2
    assert "ingest refused: MLOPS_S3_CONN_ID='mlops_s3_typo' names no Airflow connection" in capsys.readouterr().err

    # The model server refuses to start on the same grounds, before it serves anything (its own process: the lookup
    # sets Airflow's logging up, as it would in the server).
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("MLOPS_DATA_STORE", f"s3://{s3_bucket}/store")
    server = subprocess.run(
        [sys.executable, "-m", "ml.serving", "--host", "127.0.0.1", "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert server.returncode == 2
    assert "MLOPS_S3_CONN_ID='mlops_s3_typo' names no Airflow connection" in server.stdout + server.stderr


def test_the_mlflow_server_launcher_puts_the_connection_in_its_environment_alone(s3_bucket, s3_server, tmp_path):
    """``python -m ml.object_store COMMAND`` runs the command (the MLflow server) with the connection's keys and
    endpoint as AWS's clients read them, over wrong ones in the environment; neither its output nor its arguments
    show the secret."""
    keys = s3_server.service
    connection = {
        "conn_type": "aws",
        "login": keys.access_key,
        "password": keys.secret_key,
        "extra": {"endpoint_url": s3_server.endpoint},
    }
    environment = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": "wrong-key-id",
        "AWS_SECRET_ACCESS_KEY": "wrong-secret-access-key",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",
        "MLFLOW_S3_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",
        f"AIRFLOW_CONN_{S3_CONN_ID.upper()}": json.dumps(connection),
        "MLOPS_S3_CONN_ID": S3_CONN_ID,
    }
    # What MLflow's S3 artifact store does: a boto3 client from the environment, at MLFLOW_S3_ENDPOINT_URL.
    probe = (
        "import os, sys, boto3; print(sys.argv[1:]); "
        "client = boto3.client('s3', endpoint_url=os.environ['MLFLOW_S3_ENDPOINT_URL']); "
        f"client.put_object(Bucket={s3_bucket!r}, Key='mlartifacts/probe', Body=b'ok'); print('stored')"
    )
    launched = subprocess.run(
        [sys.executable, "-m", "ml.object_store", sys.executable, "-c", probe, "--the-server-s-own-arguments"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert launched.returncode == 0, launched.stderr
    assert launched.stdout.splitlines()[-2:] == ["['--the-server-s-own-arguments']", "stored"]
    assert f"with the S3 keys of the Airflow connection {S3_CONN_ID!r}" in launched.stdout + launched.stderr
    assert keys.secret_key not in launched.stdout + launched.stderr
    assert s3_server.filesystem(s3_server.admin).cat(f"{s3_bucket}/mlartifacts/probe") == b"ok"

    missing = subprocess.run(
        [sys.executable, "-m", "ml.object_store", "true"],
        env={**environment, "MLOPS_S3_CONN_ID": "mlops_s3_typo"},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert missing.returncode == 2
    assert "MLOPS_S3_CONN_ID='mlops_s3_typo' names no Airflow connection" in missing.stdout + missing.stderr


def test_record_compaction_on_the_bucket(s3_bucket):
    """The records' compaction (ml/records.py) on S3: a closed hour's files become one, each record read once."""
    from datetime import UTC, datetime, timedelta

    from ml import records
    from ml.data import store_filesystem

    store = f"s3://{s3_bucket}/store"
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=3)
    features = pd.DataFrame({"x": [1.0]})
    for index in range(5):
        records.write_records(store, [records.Answered(f"r{index}", hour.timestamp() + index, "m", 1, [0], features)])
    window = (hour, hour + timedelta(hours=1))
    before = records.read_records(store, *window)
    assert records.compact_records(store, datetime.now(UTC)) == {"partitions": 1, "files": 5}
    assert records.compact_records(store, datetime.now(UTC)) == {"partitions": 0, "files": 0}
    fs, root = store_filesystem(records.records_uri(store))
    (merged,) = fs.ls(f"{root}/version=1/{records.hour_partition(hour)}", detail=False, refresh=True)
    assert merged.rsplit("/", 1)[-1].startswith(records.COMPACTED_PREFIX)
    pd.testing.assert_frame_equal(records.read_records(store, *window), before)
