"""Hostile and careless data sources: SQL that writes, URLs that smuggle another file, damaged snapshots, secrets.

Real stores only: SQLite files, the machine's PostgreSQL (127.0.0.1:5432, trust authentication; the PostgreSQL cases
are skipped where it does not answer), a real HTTP server on loopback, a real writer process killed mid-write.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd
import pytest
from conftest import PYTHON, postgres_database

from ml import data
from ml.redaction import mask_credentials

REFUSED = (data.DataSourceError, data.DataValidationError)

WRITING_QUERIES = {
    "drop": "DROP TABLE cases",
    "delete": "DELETE FROM cases",
    "update": "UPDATE cases SET target = 0",
    "insert": "INSERT INTO cases SELECT * FROM cases",
    "query-then-drop": "SELECT * FROM cases; DROP TABLE cases",
    "query-then-delete": "SELECT 1; DELETE FROM cases;",
    "with-then-delete": "WITH doomed AS (SELECT 1) DELETE FROM cases",
    "table-name-closing-its-quotes": 'cases";DROP/**/TABLE/**/cases;--',
}


@pytest.fixture(scope="module")
def cancer() -> pd.DataFrame:
    return data.load_source("sklearn:breast_cancer")


@pytest.fixture
def sqlite_source(cancer, tmp_path) -> Iterator[tuple[str, Callable[[], int]]]:
    path = tmp_path / "cases.db"
    with sqlite3.connect(path) as connection:
        cancer.to_sql("cases", connection, index=False)

    def rows() -> int:
        with sqlite3.connect(path) as connection:
            return connection.execute("SELECT count(*) FROM cases").fetchone()[0]

    yield f"sqlite:///{path}", rows


@pytest.fixture(scope="module")
def postgres_source(cancer) -> Iterator[tuple[str, Callable[[], int]]]:
    with postgres_database("mlops_hostile") as url:
        import sqlalchemy

        engine = sqlalchemy.create_engine(url)
        cancer.to_sql("cases", engine, index=False)

        def rows() -> int:
            with engine.connect() as connection:
                return connection.execute(sqlalchemy.text("SELECT count(*) FROM cases")).scalar_one()

        try:
            yield url, rows
        finally:
            engine.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def sql_source(request):
    return request.getfixturevalue(f"{request.param}_source")


@pytest.mark.parametrize("query", WRITING_QUERIES.values(), ids=WRITING_QUERIES.keys())
def test_sql_source_refuses_statements_that_write_and_leaves_the_table_intact(sql_source, cancer, query):
    url, rows = sql_source
    with pytest.raises(REFUSED):
        data.load_source(url, query)
    assert rows() == len(cancer)
    assert len(data.load_source(url, "cases")) == len(cancer)


def test_a_query_that_writes_past_the_statement_check_is_stopped_by_the_read_only_transaction(postgres_source, cancer):
    url, rows = postgres_source
    query = "WITH gone AS (DELETE FROM cases RETURNING *) SELECT * FROM gone"
    with pytest.raises(data.DataSourceError, match="read-only transaction"):
        data.load_source(url, query)
    assert rows() == len(cancer)


def test_sql_source_still_reads_a_table_and_a_query(sql_source, cancer):
    url, _ = sql_source
    assert data.load_source(url, "cases").shape == cancer.shape
    benign = data.load_source(url, "WITH benign AS (SELECT * FROM cases WHERE target = 1) SELECT * FROM benign;")
    assert len(benign) == int((cancer["target"] == 1).sum())


def test_reading_a_sqlite_source_never_creates_or_changes_a_file(sqlite_source, tmp_path):
    missing = tmp_path / "cases-typo.db"
    with pytest.raises(data.DataSourceError, match=f"the SQLite database file {missing} does not exist"):
        data.load_source(f"sqlite:///{missing}", "cases")
    assert not missing.exists()
    with pytest.raises(data.DataSourceError, match=f"the SQLite database file {tmp_path} is a directory"):
        data.load_source(f"sqlite:///{tmp_path}", "cases")

    url, _ = sqlite_source
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    data.load_source(url, "cases")
    with pytest.raises(data.DataSourceError, match="no such table: nosuch"):
        data.load_source(url, "nosuch")
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before


def test_a_sql_column_of_arrays_is_refused_naming_the_column(postgres_source):
    url, _ = postgres_source
    with pytest.raises(data.DataValidationError, match=r"column 'readings' holds list values \(row 0: \[1, 2\]\)"):
        data.load_source(url, "SELECT ARRAY[1, 2] AS readings, target FROM cases")


def test_a_missing_table_is_a_refusal_a_retry_cannot_cure(sql_source):
    url, _ = sql_source
    with pytest.raises(data.DataSourceError, match="nosuch") as missing_table:
        data.load_source(url, "nosuch")
    assert not isinstance(missing_table.value, data.DataSourceUnavailableError)


def test_a_database_refusing_the_login_is_told_from_one_that_does_not_answer(postgres_source):
    postgres_url, _ = postgres_source
    with pytest.raises(data.DataSourceError, match='database "wtdata_nosuch" does not exist') as missing_database:
        data.load_source(postgres_url.rsplit("/", 1)[0] + "/wtdata_nosuch", "cases")
    assert not isinstance(missing_database.value, data.DataSourceUnavailableError)

    with pytest.raises(data.DataSourceUnavailableError, match="Connection refused"):
        data.load_source("postgresql+psycopg://postgres@127.0.0.1:1/cases", "cases")


# ----------------------------------------------------------------------------------------------------------------
# Snapshots: written atomically, verified on read, replaced when damaged.


def test_a_damaged_snapshot_is_detected_on_read_and_replaced_by_the_next_write(cancer, tmp_path):
    store = str(tmp_path / "store")
    snapshot = data.write_snapshot(cancer, store)
    path = Path(snapshot.uri)
    good = path.read_bytes()

    path.write_bytes(good[: len(good) // 2])  # a write cut short
    with pytest.raises(data.SnapshotDigestError, match=f"snapshot {path} is damaged"):
        data.read_frame(snapshot.uri)
    assert data.write_snapshot(cancer, store) == snapshot
    pd.testing.assert_frame_equal(data.read_frame(snapshot.uri), cancer)

    cancer.iloc[:-1].to_parquet(path, index=False)  # readable, but not the content its name promises
    with pytest.raises(data.SnapshotDigestError, match="does not hold the content its name promises"):
        data.read_frame(snapshot.uri)
    data.write_snapshot(cancer, store)
    pd.testing.assert_frame_equal(data.read_frame(snapshot.uri), cancer)


def test_an_intact_snapshot_is_kept(cancer, tmp_path):
    store = str(tmp_path / "store")
    snapshot = data.write_snapshot(cancer, store)
    written = Path(snapshot.uri).stat()
    assert data.write_snapshot(cancer.copy(), store) == snapshot
    kept = Path(snapshot.uri).stat()
    assert (kept.st_ino, kept.st_mtime_ns) == (written.st_ino, written.st_mtime_ns), "intact data was written again"


def test_a_snapshot_replaced_with_its_hash_beside_it_is_refused_on_read_and_written_again(cancer, tmp_path):
    # Whoever can replace a snapshot can replace anything stored beside it (a hash of its bytes, as snapshots once
    # had): only its content, checked against its name, vouches for it.
    store = str(tmp_path / "store")
    snapshot = data.write_snapshot(cancer, store)
    path = Path(snapshot.uri)
    flipped = cancer.iloc[:60].assign(target=1 - cancer["target"].iloc[:60])
    flipped.to_parquet(path, index=False)
    Path(f"{path}.sha256").write_text(hashlib.sha256(path.read_bytes()).hexdigest())

    with pytest.raises(data.SnapshotDigestError, match="does not hold the content its name promises"):
        data.read_frame(snapshot.uri)
    assert data.write_snapshot(cancer, store) == snapshot
    pd.testing.assert_frame_equal(data.read_frame(snapshot.uri), cancer)


def test_a_snapshot_changed_after_this_process_wrote_it_is_still_checked_on_read(cancer, tmp_path):
    snapshot = data.write_snapshot(cancer, str(tmp_path / "store"))
    path = Path(snapshot.uri)
    pd.testing.assert_frame_equal(data.read_frame(snapshot.uri), cancer)
    replaced = tmp_path / "replaced.parquet"
    cancer.assign(target=1 - cancer["target"]).to_parquet(replaced, index=False)
    os.replace(replaced, path)  # same size, new content
    with pytest.raises(data.SnapshotDigestError, match="does not hold the content its name promises"):
        data.read_frame(snapshot.uri)


WRITER = """
import sys
import numpy as np
import pandas as pd
from ml import data
frame = pd.DataFrame(np.random.default_rng(0).random((1_500_000, 8)), columns=[f"c{i}" for i in range(8)])
print(data.content_digest(frame), flush=True)
data.write_snapshot(frame, sys.argv[1])
"""


@pytest.mark.slow
def test_a_writer_killed_mid_write_leaves_nothing_at_the_content_address(tmp_path):
    store = tmp_path / "store"
    writer = subprocess.Popen([PYTHON, "-c", WRITER, str(store)], stdout=subprocess.PIPE, text=True)
    digest = writer.stdout.readline().strip()
    address = store / "snapshots" / f"{digest}.parquet"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(
        path.stat().st_size > 0 for path in (store / "snapshots").glob("*") if path.is_file()
    ):
        time.sleep(0.002)
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait(timeout=10)
    assert writer.returncode == -signal.SIGKILL, "the writer finished before it could be killed"
    assert not address.exists(), "a partial snapshot sits at the content address"


# ----------------------------------------------------------------------------------------------------------------
# Files that cannot be parsed: bad content is refused at once; only a file cut short, as one still being written is,
# is tried again.


def _csv_bytes(frame: pd.DataFrame) -> bytes:
    return frame.to_csv(index=False).encode()


def _parquet_bytes(frame: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    return buffer.getvalue()


def _not_utf8(frame: pd.DataFrame) -> bytes:
    header, rows = _csv_bytes(frame).split(b"\n", 1)
    _, rest = rows.split(b",", 1)
    return header.replace(b"mean radius", b"mean r\xe9dius", 1) + b"\n\xff\xfe," + rest


UNPARSABLE_FILES = {
    "CSV that is not UTF-8": ("csv", _not_utf8, "is not readable CSV: not UTF-8 text (byte 6)"),
    "CSV with a row longer than its header": (
        "csv",
        lambda frame: _csv_bytes(frame) + b",".join([b"1"] * (frame.shape[1] + 2)) + b"\n",
        "is not readable CSV: ParserError: Error tokenizing data. C error: Expected 31 fields in line 571, saw 33",
    ),
    "CSV with another delimiter": (
        "csv",
        lambda frame: frame.to_csv(index=False, sep=";").encode(),
        "is not CSV with a header row",
    ),
    "file named .parquet that is CSV": ("parquet", _csv_bytes, "is not a Parquet file: it does not begin with PAR1"),
    "Parquet whose footer is corrupt": (
        "parquet",
        lambda frame: b"PAR1" + b"\0" * 64 + b"PAR1",
        "is not readable Parquet: ",
    ),
}
CUT_SHORT_FILES = {
    "CSV ending inside a quoted field": (
        "csv",
        lambda frame: _csv_bytes(frame) + b'1,"2',
        "ends in the middle of a quoted field",
    ),
    "CSV ending inside a character": ("csv", lambda frame: _csv_bytes(frame) + "1,\u00e9".encode()[:-1], "a character"),
    "Parquet without its footer": (
        "parquet",
        lambda frame: _parquet_bytes(frame)[:-100],
        "lacks the footer a Parquet file ends with",
    ),
}


@pytest.mark.parametrize("case", list(UNPARSABLE_FILES))
def test_a_file_with_bad_content_is_refused_as_bad_data(cancer, tmp_path, case):
    suffix, make, message = UNPARSABLE_FILES[case]
    path = tmp_path / f"cases.{suffix}"
    path.write_bytes(make(cancer))
    with pytest.raises(data.DataValidationError) as refused:
        data.load_source(str(path))
    assert f"data file {path} {message}" in str(refused.value)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("case", list(CUT_SHORT_FILES))
def test_a_file_cut_short_may_still_be_landing_and_is_tried_again(cancer, tmp_path, case):
    suffix, make, message = CUT_SHORT_FILES[case]
    path = tmp_path / f"cases.{suffix}"
    path.write_bytes(make(cancer))
    with pytest.raises(data.DataSourceUnavailableError, match=message):
        data.load_source(str(path))


def test_a_damaged_split_is_refused_and_one_cut_short_is_tried_again(cancer, tmp_path):
    split = tmp_path / "runs" / "r" / "train.parquet"
    split.parent.mkdir(parents=True)
    split.write_bytes(_csv_bytes(cancer))
    with pytest.raises(data.DataValidationError, match=f"data store object {split} is not a Parquet file"):
        data.read_frame(str(split))
    split.write_bytes(_parquet_bytes(cancer)[:-100])
    with pytest.raises(data.DataSourceUnavailableError, match="lacks the footer"):
        data.read_frame(str(split))


# ----------------------------------------------------------------------------------------------------------------
# URLs: the real path decides, nothing of a file that failed to parse is echoed, credentials are masked.


@pytest.fixture
def file_server(tmp_path) -> Iterator[tuple[str, list[str]]]:
    """A real HTTP server on loopback serving ``tmp_path/www``; yields its URL and the paths it was asked for."""
    root = tmp_path / "www"
    root.mkdir()
    requested: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def do_GET(self):
            requested.append(self.path)
            super().do_GET()

        def do_HEAD(self):
            requested.append(self.path)
            super().do_HEAD()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requested
    finally:
        server.shutdown()
        server.server_close()


SECRET_LINE = "AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"


def test_a_fragment_cannot_pass_another_file_off_as_csv(file_server):
    url, requested = file_server
    source = f"{url}/secret.txt#.csv"
    with pytest.raises(data.DataSourceError, match="is not recognised"):
        data.load_source(source)
    assert requested == []
    for disguised in (f"{url}/secret.txt?name=.csv", f"{url}/secret.txt#/data.parquet"):
        with pytest.raises(data.DataSourceError, match="is not recognised"):
            data.source_kind(disguised)


def test_a_file_that_is_not_csv_is_refused_without_echoing_its_content(file_server, tmp_path):
    url, _ = file_server
    (tmp_path / "www" / "secret.csv").write_text(SECRET_LINE + "\nsecond line\n")
    (tmp_path / "www" / "binary.csv").write_bytes(b"\xff\xfe" + SECRET_LINE.encode("utf-16-le"))
    (tmp_path / "www" / "binary.parquet").write_bytes(b"PAR1" + SECRET_LINE.encode() + b"PAR1")
    for name in ("secret.csv", "binary.csv", "binary.parquet"):
        with pytest.raises(REFUSED) as refused:
            data.load_source(f"{url}/{name}")
        assert "wJalrXUtnFEMI" not in str(refused.value), name
        assert name in str(refused.value)


def test_data_source_credentials_are_masked_wherever_the_source_is_shown(file_server):
    url, _ = file_server
    with_password = url.replace("http://", "http://reader:hunter2-secret@") + "/missing.csv"
    assert "hunter2-secret" not in data.describe_source(with_password)
    assert "hunter2-secret" not in data.describe_source("postgresql://reader:hunter2-secret@db/cases", "cases")
    with pytest.raises(data.DataSourceError) as refused:
        data.load_source(with_password)
    assert "hunter2-secret" not in str(refused.value) and "reader:***@" in str(refused.value)
    signed = f"{url}/cases.csv?X-Amz-Signature=hunter2-secret&X-Amz-Expires=60"
    assert mask_credentials(signed) == f"{url}/cases.csv?X-Amz-Signature=***&X-Amz-Expires=60"


def test_data_source_credentials_are_masked_in_the_parameters_logged_to_mlflow():
    from ml.settings import Settings

    settings = Settings.from_env({"MLOPS_DATA_SOURCE": "https://reader:hunter2-secret@files.example/cases.csv"})
    assert settings.run_parameters()["data_source"] == "https://reader:***@files.example/cases.csv"
    assert settings.data_source.endswith("hunter2-secret@files.example/cases.csv"), "the source itself still reads"


@pytest.mark.slow
def test_a_run_on_a_source_url_with_credentials_stores_and_logs_them_masked(
    airflow_db, mlops_env, file_server, cancer, tmp_path, monkeypatch, capfd
):
    from ml import registry
    from ml.airflow_runner import run_dag

    url, requested = file_server
    cancer.to_csv(tmp_path / "www" / "cases.csv", index=False)
    monkeypatch.setenv("MLOPS_DATA_SOURCE", url.replace("://", "://reader:hunter2-run-secret@") + "/cases.csv")
    run = run_dag()
    assert run.state == "success"
    assert set(requested) == {"/cases.csv"}, "the source was read, credentials and all"
    extracted = run.result("extract_data")
    assert extracted["source"] == url.replace("://", "://reader:***@") + "/cases.csv"
    trained = registry.client_for(mlops_env).get_run(run.result("train_model")["run_id"])
    assert trained.data.params["data_source"] == extracted["source"]
    stored = [str(run.result(task)) for task in run.tasks] + [str(trained.data.params), str(trained.data.tags)]
    assert all("hunter2-run-secret" not in text for text in stored)
    assert "hunter2-run-secret" not in "".join(capfd.readouterr())


@pytest.mark.parametrize(
    "source",
    [
        "postgresql+psycopg://reader:hunter2 secret@127.0.0.1/cases",
        "postgresql+psycopg://reader:hunter2/secret@127.0.0.1:5432/cases",
        "mysql://reader:hunter2?secret#x@db.example/cases",
    ],
)
def test_a_source_url_is_masked_whatever_its_password_holds(source):
    """SQLAlchemy reads a password up to the first "@", spaces, slashes and all; the mask reads it the same way."""
    from ml.settings import Settings

    assert mask_credentials(source).startswith(source.split(":", 2)[0] + ":" + "//reader:***@")
    settings = Settings.from_env({"MLOPS_DATA_SOURCE": source, "MLOPS_DATA_QUERY": "cases"})
    shown = [settings.run_parameters()["data_source"], data.describe_source(source, "cases"), repr(settings)]
    assert all("hunter2" not in text for text in shown), shown


def test_running_text_keeps_a_url_without_credentials_and_a_later_word_with_an_at():
    text = "serving http://127.0.0.1:5001/version for models:/breast_cancer_classifier@production"
    assert mask_credentials(text) == text


@pytest.mark.parametrize(
    "source",
    [
        "postgresql+psycopg://reader:hunter2-secret@127.0.0.1:99999/cases",
        "postgresql+psycopg://reader:ab/hunter2-secret@127.0.0.1:99999/cases",
    ],
)
def test_a_refused_source_url_never_repeats_its_password(tmp_path, source):
    from test_cli import mlops, refused

    from ml.settings import ConfigurationError, Settings

    with pytest.raises(ConfigurationError) as error:
        Settings.from_env({"MLOPS_DATA_SOURCE": source})
    assert "Port out of range" in str(error.value) and "hunter2" not in str(error.value)
    home = tmp_path / "home"
    result = mlops("run", home=home, MLOPS_DATA_SOURCE=source, MLOPS_DATA_QUERY="cases")
    refused(result, "reader:***@127.0.0.1:99999")
    assert "hunter2" not in result.stdout + result.stderr


def test_a_password_with_a_slash_is_no_port():
    from ml.settings import Settings

    source = "postgresql+psycopg://reader:ab/hunter2-secret@127.0.0.1/cases"
    assert Settings.from_env({"MLOPS_DATA_SOURCE": source, "MLOPS_DATA_QUERY": "cases"}).data_source == source


def test_the_trigger_form_shows_the_deployments_source_masked_and_a_run_keeps_it(tmp_path):
    from ml.settings import Settings

    source = "postgresql+psycopg://reader:hunter2-secret@127.0.0.1/cases"
    settings = Settings.from_env({"MLOPS_DATA_SOURCE": source, "MLOPS_DATA_QUERY": "cases"})
    default = settings.param_specs()["data_source"]["default"]
    assert default == "postgresql+psycopg://reader:***@127.0.0.1/cases"
    assert settings.for_run({"data_source": default}).data_source == source
    other = "postgresql+psycopg://reader@127.0.0.1/other_cases"
    assert settings.for_run({"data_source": other}).data_source == other, "a source without a password is a run's own"


@pytest.mark.parametrize(
    "source",
    ["postgresql+psycopg://reader:hunter2-secret@127.0.0.1/other", "https://u:hunter2-secret@files.example/a.csv"],
)
def test_a_run_may_not_bring_a_password_of_its_own(tmp_path, source):
    """A run's parameters are stored with the run (Airflow's conf), where anyone who can read the run sees them."""
    from test_cli import mlops, refused

    home = tmp_path / "home"
    result = mlops("run", "--param", f"data_source={source}", "--param", "data_query=cases", home=home)
    refused(result, "carries a password")
    assert "hunter2" not in result.stdout + result.stderr
    assert not home.exists(), "nothing is created for a refused command"
