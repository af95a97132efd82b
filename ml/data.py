"""Data sources, content-addressed snapshots, validation and the train/test split.

Data moves between tasks through a store addressed by URI (a local folder by default, any fsspec URL otherwise),
never through XCom, so tasks may run on different machines.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import logging
import math
import re
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlsplit

import fsspec
import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from ml import object_store
from ml.redaction import mask_credentials
from ml.settings import SQL_SCHEMES, url_scheme

log = logging.getLogger(__name__)

BUNDLED_DATASETS = ("breast_cancer", "iris", "wine")
FILE_FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
SNAPSHOT_NAME = re.compile(r"(?:^|/)snapshots/(?P<digest>[0-9a-f]{64})\.parquet$")
LONGEST_ECHOED_VALUE = 40
# A file is empty when it holds nothing but white space; a local Parquet file is looked at this far to tell.
EMPTY_FILE_PEEK = 4096
# fsspec protocols of object stores: a "folder" there is a key prefix, not a directory to make.
OBJECT_STORE_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "abfs", "abfss", "az", "adl"})


class DataSourceError(ValueError):
    """The configured data source cannot be read, and reading it again would fail the same way: a file or table that
    does not exist, a directory named like a file, a query the database refuses as written."""


class DataSourceUnavailableError(DataSourceError):
    """The data source could not be read this time, in a way that may pass: a database or remote store that does not
    answer, a dropped connection, a timeout, a file cut short as one still being written is."""


class DataValidationError(ValueError):
    """The data was read but cannot be trained on, or its content cannot be parsed (a CSV file that is not UTF-8, a
    file that is not Parquet); the message names every problem found."""


class SnapshotDigestError(DataSourceError):
    """The file at a snapshot's content address does not hold the content its name promises."""


@dataclass(frozen=True)
class Snapshot:
    uri: str
    digest: str
    rows: int
    columns: list[str]


@dataclass(frozen=True)
class SplitData:
    train_uri: str
    test_uri: str
    train_rows: int
    test_rows: int
    features: list[str]
    label: str
    classes: list[str]


def describe_source(source: str, query: str = "") -> str:
    """The source as it may be shown, logged or stored: credentials masked."""
    kind = source_kind(source)
    if kind == "sql":
        return f"SQL {mask_credentials(source)} ({query or 'no query'})"
    return mask_credentials(source)


def source_kind(source: str) -> str:
    """One of ``bundled``, ``sql``, ``csv``, ``parquet`` or ``folder``; raises DataSourceError for anything else.

    A folder is a local directory, or a path or fsspec URL ending in ``/`` (``s3://bucket/incoming/``);
    its ``.csv`` and ``.parquet`` files are read in name order and concatenated.
    """
    if source.startswith("sklearn:"):
        name = source.removeprefix("sklearn:")
        if name not in BUNDLED_DATASETS:
            raise DataSourceError(
                f"data source {source!r}: unknown bundled data set {name!r}; "
                f"choose one of {', '.join('sklearn:' + n for n in BUNDLED_DATASETS)}"
            )
        return "bundled"
    if url_scheme(source) in SQL_SCHEMES:
        return "sql"
    suffix = Path(_path_of(source)).suffix.lower()
    if suffix in FILE_FORMATS:
        return FILE_FORMATS[suffix]
    if _path_of(source).endswith("/") or _is_folder(source):
        return "folder"
    raise DataSourceError(
        f"data source {mask_credentials(source)!r} is not recognised: "
        f"use sklearn:<name> ({', '.join(BUNDLED_DATASETS)}), "
        "a .csv or .parquet path or URL, a folder of them (an existing directory, or a path ending in /), "
        "or a SQLAlchemy URL with a query"
    )


def _path_of(source: str) -> str:
    """The path a source names: for a URL, without its query and fragment, which the fetch does not treat as part of
    the file name (``http://host/secret.txt#.csv`` fetches ``secret.txt``)."""
    if "://" not in source:
        return source
    return urlsplit(source).path


def _is_folder(source: str) -> bool:
    """A local directory. Remote folders are marked by a trailing ``/``: telling them apart needs a network call."""
    if "://" in source and not source.startswith("file://"):
        return False
    return Path(source.removeprefix("file://")).expanduser().is_dir()


def load_source(source: str, query: str = "", label: str = "target") -> pd.DataFrame:
    """Read the configured source into a frame. Raises DataSourceError naming the source when it cannot."""
    kind = source_kind(source)
    if kind == "bundled":
        return _load_bundled(source.removeprefix("sklearn:"), label)
    if kind == "sql":
        return _load_sql(source, query)
    if kind == "folder":
        return _load_folder(source)
    return _load_file(source, kind)


def store_filesystem(uri: str) -> tuple[Any, str]:
    """The fsspec filesystem and path of a store or source URI (a local path included).

    An object store's listings are not cached: the filesystem object lives as long as the process, and another
    process (a worker on another host, ``mlops ingest``) may have written since it last listed. Endpoint and keys come
    from the task's S3 connection (:mod:`ml.object_store`, ``MLOPS_S3_CONN_ID``) or else from the environment as the
    cloud's own clients read them (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` for S3).
    """
    scheme = url_scheme(uri)
    if scheme in OBJECT_STORE_PROTOCOLS:
        return fsspec.core.url_to_fs(uri, use_listings_cache=False, **object_store.storage_options(scheme))
    return fsspec.core.url_to_fs(uri)


def is_object_store(fs: Any) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return any(protocol in OBJECT_STORE_PROTOCOLS for protocol in protocols)


def store_failure(fs: Any, path: str, error: Exception, what: str, missing: str = "does not exist") -> DataSourceError:
    """Why a store or a remote file could not be used, as a refusal or as a retry; ``what`` names it (credentials
    masked), ``missing`` says what a missing file means.

    An object store that refuses the keys or has no such bucket refuses them the same way next time: that fails at
    once, and the bucket is looked at to say which it is. A server that does not answer, a dropped connection or a
    timeout may pass, and so may anything on a local disk but a missing file (a permission not granted yet while a file
    is still being copied in).
    """
    reason = mask_credentials(str(error)) or type(error).__name__
    if is_object_store(fs) and isinstance(error, (PermissionError, FileNotFoundError)):
        bucket = fs._strip_protocol(path).split("/", 1)[0]
        try:
            fs.ls(bucket, detail=False)
        except FileNotFoundError:
            return DataSourceError(f"{what}: bucket {bucket!r} does not exist; create it, or correct the URL")
        except PermissionError as refused:
            return DataSourceError(
                f"{what}: the object store refuses these credentials ({mask_credentials(str(refused))}); "
                f"{object_store.where_the_keys_come_from()}"
            )
        except Exception as unanswered:
            return DataSourceUnavailableError(
                f"{what}: {reason}; the bucket cannot be listed either: {mask_credentials(str(unanswered))}"
            )
        if isinstance(error, PermissionError):
            return DataSourceError(
                f"{what}: access denied ({reason}); the credentials may list bucket {bucket!r} but not do this"
            )
    if isinstance(error, FileNotFoundError):
        return DataSourceError(f"{what} {missing}")
    return DataSourceUnavailableError(f"{what}: {reason}")


def folder_files(uri: str) -> list[str]:
    """The data files of a folder source, as URLs, in name order; hidden (``.``) and ``_`` files are left out."""
    shown = f"data folder {mask_credentials(uri)}"
    fs, path = store_filesystem(uri)
    try:
        if not fs.isdir(path):
            # A prefix no object is under, in a bucket that may not exist or keys that may be refused: say which.
            raise FileNotFoundError(path)
        entries = fs.ls(path, detail=False)
    except Exception as error:
        raise store_failure(fs, path, error, shown) from error
    names = {}
    for entry in entries:
        name = str(entry).rstrip("/").rsplit("/", 1)[-1]
        if Path(name).suffix.lower() in FILE_FORMATS and not name.startswith((".", "_")):
            names[name] = fs.unstrip_protocol(str(entry))
    return [names[name] for name in sorted(names)]


def column_differences(expected: list[str], actual: list[str]) -> str:
    """ "; missing: a, b; unexpected: c" for the columns ``actual`` lacks and adds; "" when they agree."""
    missing = [c for c in expected if c not in actual]
    extra = [c for c in actual if c not in expected]
    return (f"; missing: {_some(missing)}" if missing else "") + (f"; unexpected: {_some(extra)}" if extra else "")


def _some(names: list[str], shown: int = 10) -> str:
    """The first names, and how many more: a wide table's difference stays one readable line."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(_shorten(name) for name in names[:shown]) + more


def _load_folder(uri: str) -> pd.DataFrame:
    """Read every data file of the folder in name order and concatenate them; their columns must agree."""
    files = folder_files(uri)
    shown = mask_credentials(uri)
    if not files:
        raise DataValidationError(f"data folder {shown} has no .csv or .parquet files")
    frames = [(file, _load_file(file, FILE_FORMATS[Path(file).suffix.lower()])) for file in files]
    first_file, first = frames[0]
    columns = [str(c) for c in first.columns]
    for file, frame in frames[1:]:
        if differences := column_differences(columns, [str(c) for c in frame.columns]):
            raise DataValidationError(
                f"data folder {shown}: the columns of {mask_credentials(file)} differ from those of "
                f"{mask_credentials(first_file)}{differences}"
            )
    log.info("read %d files from data folder %s", len(frames), shown)
    return pd.concat([frame[columns] for _, frame in frames], ignore_index=True)


def _load_bundled(name: str, label: str) -> pd.DataFrame:
    from sklearn import datasets

    loader = getattr(datasets, f"load_{name}")
    frame = loader(as_frame=True).frame.copy()
    if label not in frame.columns:
        raise DataValidationError(
            f"label column {_shorten(label)!r} is not a column of the bundled data set sklearn:{name}; "
            "its label column is 'target'"
        )
    return frame


def class_names(source: str) -> dict[str, str]:
    """Label value (as text) -> class name, for the bundled data sets that have names ({"0": "malignant", ...})."""
    if not source.startswith("sklearn:") or source.removeprefix("sklearn:") not in BUNDLED_DATASETS:
        return {}
    from sklearn import datasets

    names = getattr(datasets, f"load_{source.removeprefix('sklearn:')}")().target_names
    return {str(value): str(name) for value, name in enumerate(names)}


def _load_sql(url: str, query: str) -> pd.DataFrame:
    """Run one query in a read-only transaction that is always rolled back: reading never changes the database."""
    import sqlalchemy

    shown = mask_credentials(url)
    if not query.strip():
        raise DataSourceError(f"data source {shown} is SQL but no query or table name was given")
    try:
        engine = sqlalchemy.create_engine(_read_only_url(url, shown), **_read_only_engine_options(url))
    except DataSourceError:
        raise
    except Exception as error:
        raise DataSourceError(f"cannot open SQL data source {shown}: {mask_credentials(str(error))}") from error
    statement = read_statement(query, engine.dialect.identifier_preparer.quote)
    try:
        with engine.connect() as connection:
            _make_read_only(connection)
            if not connection.in_transaction():
                connection.begin()  # ours, so that pandas does not open (and commit) one itself
            try:
                frame = pd.read_sql(sqlalchemy.text(statement), connection)
            finally:
                connection.rollback()
    except Exception as error:
        failure = DataSourceUnavailableError if _sql_failure_may_pass(error) else DataSourceError
        raise failure(
            f"cannot read SQL data source {shown} with {statement!r}: {mask_credentials(str(error))}"
        ) from error
    finally:
        engine.dispose()
    _reject_cells_holding_collections(frame, f"SQL data source {shown}")
    return frame


# SQLite's primary result codes for a statement the database refuses as written: SQLITE_ERROR (no such table or
# column, a syntax error), SQLITE_READONLY (a write), SQLITE_AUTH (denied by an authorizer).
SQLITE_REFUSALS = {1, 8, 23}
# What PostgreSQL says when it refuses a connection for good: psycopg gives a failed connection no SQLSTATE, only the
# server's message (in English unless the server's lc_messages says otherwise; another language is retried once).
POSTGRESQL_REFUSAL = re.compile(
    r'(database|role) "[^"]*" does not exist|password authentication failed|no pg_hba\.conf entry'
)


def _sql_failure_may_pass(error: Exception) -> bool:
    """Whether reading the SQL source again later may succeed: the database did not answer, refused or dropped the
    connection, was busy or timed out. A missing table, a syntax error, a write stopped by the read-only transaction,
    a denied permission, a login or database name the server refuses fail the same way every time."""
    import sqlalchemy.exc

    # pandas wraps a failed query in its own DatabaseError; the database's answer is its cause.
    while not isinstance(error, sqlalchemy.exc.SQLAlchemyError) and isinstance(error.__cause__, Exception):
        error = error.__cause__
    if not isinstance(error, sqlalchemy.exc.SQLAlchemyError):
        return True  # raised below SQLAlchemy: a socket or the file system
    if not isinstance(error, sqlalchemy.exc.DBAPIError):
        return False  # SQLAlchemy's own refusals (a result without rows, an unknown dialect) are about the statement
    if error.connection_invalidated:
        return True
    if not isinstance(error, sqlalchemy.exc.OperationalError):
        return False  # programming, integrity, data and internal errors: the statement, not the moment
    sqlite_code = getattr(error.orig, "sqlite_errorcode", None)
    if sqlite_code is not None:
        return sqlite_code & 0xFF not in SQLITE_REFUSALS
    return not POSTGRESQL_REFUSAL.search(str(error.orig))


def read_statement(query: str, quote: Any) -> str:
    """The one query to run for the configured query or table name; refuses anything but a single SELECT.

    A table name (no white space; ``schema.table`` allowed) is quoted with the dialect's ``quote``, so that a name
    cannot close its quotes and append a statement.
    """
    import sqlparse

    text = query.strip()
    if not re.search(r"\s", text):
        return "SELECT * FROM " + ".".join(quote(part) for part in text.split("."))
    statements = [part for part in sqlparse.split(text) if part.strip().rstrip(";").strip()]
    if len(statements) != 1:
        raise DataValidationError(
            f"the SQL data query holds {len(statements)} statements; give exactly one SELECT (a source is only read)"
        )
    kind = sqlparse.parse(statements[0])[0].get_type()
    if kind != "SELECT":
        raise DataValidationError(
            f"the SQL data query is a {kind} statement; give one SELECT (or WITH ... SELECT): a source is only read"
        )
    return statements[0].strip().rstrip(";").rstrip()


def _read_only_url(url: str, shown: str) -> Any:
    """The URL to open: a SQLite file is opened read-only (SQLite would otherwise create an empty database where a
    mistyped path points), after checking that it exists so that a mistake is named as such."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    database = parsed.database or ""
    if parsed.get_backend_name() != "sqlite" or parsed.get_driver_name() != "pysqlite":
        return parsed
    if database in ("", ":memory:"):
        return parsed  # a new in-memory database: nothing on disk to create
    if parsed.query.get("uri") == "true":
        return parsed.update_query_dict({"mode": "ro"})  # a file: URI already; its missing file is SQLite's to name
    path = Path(database).absolute()
    if not path.exists():
        raise DataSourceError(f"SQL data source {shown}: the SQLite database file {path} does not exist")
    if path.is_dir():
        raise DataSourceError(f"SQL data source {shown}: the SQLite database file {path} is a directory")
    return parsed.set(database=path.as_uri()).update_query_dict({"mode": "ro", "uri": "true"})


def _read_only_engine_options(url: str) -> dict[str, Any]:
    if url_scheme(url) == "duckdb":
        return {"connect_args": {"read_only": True}}
    return {}


def _make_read_only(connection: Any) -> None:
    """Make the connection's transaction read-only where the database can enforce it (the check of the statement
    already refuses anything but a query; this also stops a query that writes, e.g. a data-modifying WITH)."""
    dialect = connection.dialect.name
    if dialect == "postgresql":
        connection.execution_options(postgresql_readonly=True)
    elif dialect == "sqlite":
        connection.exec_driver_sql("PRAGMA query_only = ON")
    elif dialect in {"mysql", "mariadb"}:
        connection.exec_driver_sql("SET SESSION TRANSACTION READ ONLY")
    elif dialect == "oracle":
        connection.exec_driver_sql("SET TRANSACTION READ ONLY")


def _load_file(uri: str, kind: str) -> pd.DataFrame:
    shown = mask_credentials(uri)
    fs, path = store_filesystem(uri)
    try:
        with _open_for_parsing(fs, path) as handle:
            if kind == "parquet":
                return _load_parquet(handle, shown)
            raw = handle.read()
    except IsADirectoryError as error:
        raise DataSourceError(
            f"data file {shown} is a directory; a folder source is named without a file suffix, or with a trailing /"
        ) from error
    except (DataSourceError, DataValidationError):
        raise
    except Exception as error:
        raise store_failure(fs, path, error, f"data file {shown}") from error
    if not raw.strip():
        raise DataValidationError(f"data file {shown} is empty")
    if kind == "csv":
        _reject_duplicate_csv_header(raw, shown)
        try:
            frame = pd.read_csv(io.BytesIO(raw))
        except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as error:
            raise _csv_failure(raw, shown, error) from error
        if frame.shape[1] < 2:
            # One column means no delimiter in the first line: most likely not CSV at all, and its "column name"
            # would be the file's first line, which must not be echoed.
            raise DataValidationError(
                f"data file {shown} is not CSV with a header row: its first line has no comma-separated column names"
            )
        return frame
    return _read_parquet(io.BytesIO(raw), shown)


def _open_for_parsing(fs: Any, path: str) -> Any:
    """A file to parse. From an object store, each read fetches the range asked for and nothing more: the Parquet
    reader asks for its footer, then for its columns in ranges it merges itself, and a read-ahead cache beneath would
    fetch past each range and copy every byte once more."""
    if is_object_store(fs):
        return fs.open(path, "rb", cache_type="none")
    return fs.open(path, "rb")


def _load_parquet(handle: Any, shown: str) -> pd.DataFrame:
    """A Parquet file, local or remote, parsed from its handle: reading it whole into memory first would hold a copy
    of its bytes beside the frame (1.37x the memory on S3, measured by bench/storage_bench.py), and on a local disk take
    four times as long. A remote handle fetches the ranges the parser asks for (:func:`_open_for_parsing`)."""
    head = handle.read(EMPTY_FILE_PEEK)
    if not head.strip() and len(head) < EMPTY_FILE_PEEK:
        raise DataValidationError(f"data file {shown} is empty")
    handle.seek(0)
    return _read_parquet(handle, shown)


def _read_parquet(handle: Any, shown: str) -> pd.DataFrame:
    """Parse a Parquet file whose column names are all different and whose cells each hold one value."""
    import pyarrow.parquet as pq

    try:
        # The names first: pandas cannot read a file whose columns share a name, and would say so in Arrow's words.
        _reject_duplicated_names(pq.ParquetFile(handle).schema_arrow.names, f"data file {shown}")
        handle.seek(0)
        frame = pd.read_parquet(handle)
    except DataValidationError:
        raise
    except Exception as error:
        raise _parquet_failure(handle, f"data file {shown}", error) from error
    _reject_cells_holding_collections(frame, f"data file {shown}")
    return frame


# Which files a parser refuses are retried. A file still being written (copied, uploaded, appended to) is cut short, and
# only a cut that shows can be told from a finished file: a CSV ending inside a quoted field or inside a character, a
# Parquet file that begins like one but lacks the footer it ends with. Those are retried once, after retry_delay: the
# writer may have finished by then (a file that stays cut short fails then). A CSV cut at the end of a line parses and
# is validated as it stands. Any other fault is in the content (bytes that are not UTF-8, a row with more fields than
# the header, a file that is not Parquet at all, a finished Parquet file that is corrupt): reading it again gives the
# same answer, so it is refused at once, as bad data.
CSV_CUT_SHORT = ("EOF inside string", "EOF following escape character")
PARQUET_MAGIC = b"PAR1"


def _csv_failure(raw: bytes, shown: str, error: Exception) -> DataSourceError | DataValidationError:
    """Why a CSV file could not be parsed, as a retry (a file cut short) or a refusal (bad content)."""
    if isinstance(error, UnicodeDecodeError):
        # pandas decodes in chunks and gives offsets within one; decoding the whole file names the byte in the file.
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as whole:
            error = whole
    cut_short = (
        isinstance(error, UnicodeDecodeError) and error.end == len(raw) and error.reason == "unexpected end of data"
    ) or (isinstance(error, pd.errors.ParserError) and any(cut in str(error) for cut in CSV_CUT_SHORT))
    if cut_short:
        return DataSourceUnavailableError(
            f"data file {shown} is not readable CSV yet: it ends in the middle of a "
            f"{'character' if isinstance(error, UnicodeDecodeError) else 'quoted field'}, as a file still being "
            "written does"
        )
    return DataValidationError(f"data file {shown} is not readable CSV: {_parse_failure(error)}")


def _parquet_failure(handle: Any, where: str, error: Exception) -> DataSourceError | DataValidationError:
    """Why a Parquet file could not be parsed, as a retry (a file cut short) or a refusal (bad content)."""
    try:
        handle.seek(0)
        head = handle.read(len(PARQUET_MAGIC))
        handle.seek(max(handle.seek(0, io.SEEK_END) - len(PARQUET_MAGIC), 0))
        tail = handle.read(len(PARQUET_MAGIC))
    except OSError as unreadable:
        return DataSourceUnavailableError(f"{where} cannot be read: {_parse_failure(unreadable)}")
    if head != PARQUET_MAGIC:
        return DataValidationError(f"{where} is not a Parquet file: it does not begin with {PARQUET_MAGIC.decode()}")
    if tail != PARQUET_MAGIC:
        return DataSourceUnavailableError(
            f"{where} is not readable Parquet yet: it lacks the footer a Parquet file ends with, as a file still "
            "being written does"
        )
    return DataValidationError(f"{where} is not readable Parquet: {_parse_failure(error)}")


def _parse_failure(error: Exception) -> str:
    """Why a parser refused a file: the exception's first line, which for pandas' C parser and pyarrow's Parquet
    reader names a line number or a structural fault, never the content; a decoding error is reduced to its offset."""
    if isinstance(error, UnicodeDecodeError):
        return f"not UTF-8 text (byte {error.start})"
    first_line = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {first_line[:200]}"


def _reject_duplicate_csv_header(raw: bytes, shown: str) -> None:
    try:
        header = next(csv.reader(io.StringIO(raw.decode("utf-8", errors="replace"))), [])
    except csv.Error as error:
        raise DataValidationError(f"data file {shown} is not readable CSV: {error}") from error
    _reject_duplicated_names(header, f"data file {shown}")


def _reject_duplicated_names(names: list[str], where: str) -> None:
    duplicated = sorted(name for name, count in Counter(names).items() if count > 1)
    if duplicated:
        shown_names = ", ".join(_shorten(name) for name in duplicated[:10])
        raise DataValidationError(f"{where} has duplicated column names: {shown_names}")


def _reject_cells_holding_collections(frame: pd.DataFrame, where: str) -> None:
    """Refuse a column whose cells hold lists, arrays or mappings (a Parquet list or struct column, a PostgreSQL array
    or JSON column): such a column can be neither digested nor trained on. Only object columns can hold them."""
    for position, dtype in enumerate(frame.dtypes):
        if not pd.api.types.is_object_dtype(dtype):
            continue
        column = frame.iloc[:, position]
        try:
            pd.util.hash_pandas_object(column, index=False)
        except TypeError:
            row, value = next((row, value) for row, value in enumerate(column) if not _hashable(value))
            raise DataValidationError(
                f"{where}: column {_shorten(frame.columns[position])!r} holds {type(value).__name__} values "
                f"(row {row}: {_shorten(repr(value))}); each cell must hold a single value"
            ) from None


def _hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


def _shorten(value: Any) -> str:
    text = str(value)
    return text if len(text) <= LONGEST_ECHOED_VALUE else text[: LONGEST_ECHOED_VALUE - 3] + "..."


def content_digest(frame: pd.DataFrame) -> str:
    """A digest of the content: column names, dtypes and the rows, independent of the row index, the rows' order and
    the file format. A table whose rows moved on disk (an UPDATE setting a value to itself, a VACUUM FULL) or a file
    written in another order holds the same data; a duplicated row is still a row more."""
    return _digest(frame, np.sort(row_hashes(frame)))


def holds_content(frame: pd.DataFrame, digest: str) -> bool:
    """Whether the frame holds the content ``digest`` names: its content digest or, for a snapshot named before
    ``content_digest`` left the order of the rows out (such as the one a Production version trained before that change
    refers to), the digest of its rows in order. Both come from one hashing of the rows."""
    hashes = row_hashes(frame)
    return _digest(frame, np.sort(hashes)) == digest or _digest(frame, hashes) == digest


def row_hashes(frame: pd.DataFrame) -> np.ndarray:
    """One 64-bit hash per row, of its values alone: the same row hashes alike in any frame, whatever its index."""
    return pd.util.hash_pandas_object(frame, index=False).to_numpy()


def _digest(frame: pd.DataFrame, hashes: np.ndarray) -> str:
    hasher = hashlib.sha256()
    for name, dtype in frame.dtypes.items():
        hasher.update(f"{name}\x1f{dtype}\x1e".encode())
    hasher.update(hashes.tobytes())
    return hasher.hexdigest()


def to_parquet(frame: pd.DataFrame, handle: BinaryIO) -> None:
    """Write the frame as Parquet, without its index; floating-point columns skip dictionary encoding.

    Measured values rarely repeat, so a dictionary of them overflows and is dropped, after costing more than the rest
    of the write: 800,000 rows x 30 random floats take 0.4 s written plain, 1.0 s with dictionaries tried first, and
    the file is smaller. Other columns (labels, codes, flags, text) keep their dictionaries.
    """
    dictionary_encoded = [
        str(column) for column, dtype in frame.dtypes.items() if not pd.api.types.is_float_dtype(dtype)
    ]
    frame.to_parquet(handle, index=False, use_dictionary=dictionary_encoded)


def write_frame(frame: pd.DataFrame, uri: str) -> None:
    """Write the frame whole or not at all: a killed or failed write never leaves a partial file at ``uri``."""
    _write_atomically(uri, lambda handle: to_parquet(frame, handle))


def _write_atomically(uri: str, write: Callable[[BinaryIO], None]) -> None:
    fs, path = store_filesystem(uri)
    try:
        write_whole(fs, path, write)
    except Exception as error:
        raise store_failure(fs, path, error, f"data store object {mask_credentials(uri)} (writing)") from error


def write_whole(
    fs: Any, path: str, write: Callable[[BinaryIO], None], before_shown: Callable[[], None] = lambda: None
) -> None:
    """Write ``path`` on ``fs`` whole or not at all: readers of its folder never see a partial file, and a write that
    fails or is killed leaves nothing there. ``before_shown`` runs once every byte is written, just before the file
    appears (a landed batch is recorded in its manifest then: a crash in between leaves a record without its file,
    which the next try lands again, never a file that no record knows of)."""
    if is_object_store(fs):
        _upload_whole(fs, path, write, before_shown)
    else:
        _write_then_rename(fs, path, write, before_shown)


def _upload_whole(fs: Any, path: str, write: Callable[[BinaryIO], None], before_shown: Callable[[], None]) -> None:
    """Upload straight to the object's key, committed only once every byte is up: an object store shows an upload
    whole or not at all. A temporary name and a rename would double the write there, a rename being a copy and a
    delete: 15.4 s against 8.5 s for a snapshot of 1,000,000 rows (bench/storage_bench.py)."""
    handle = fs.open(path, "wb", autocommit=False)
    try:
        with handle:
            write(handle)
        before_shown()
    except BaseException:
        # What was uploaded is invisible until committed; the failure to report is the write's, not the abort's.
        with contextlib.suppress(Exception):
            handle.discard()
        raise
    handle.commit()


def _write_then_rename(fs: Any, path: str, write: Callable[[BinaryIO], None], before_shown: Callable[[], None]) -> None:
    """Write under a temporary name beside ``path``, then rename it there: on a disk the rename is what is atomic."""
    parent = fs._parent(path)
    temporary = f"{parent}/.{path.rsplit('/', 1)[-1]}.{uuid.uuid4().hex}.partial"
    fs.makedirs(parent, exist_ok=True)
    try:
        with fs.open(temporary, "wb") as handle:
            write(handle)
        before_shown()
        fs.mv(temporary, path)
    finally:
        if fs.exists(temporary):
            fs.rm(temporary)


def read_frame(uri: str) -> pd.DataFrame:
    """Read a stored frame. A snapshot is checked on every read against the content digest it is named by, from the
    frame read (its file is read once): whatever lies beside it, only its content can vouch for it."""
    shown = mask_credentials(uri)
    named = SNAPSHOT_NAME.search(uri)
    fs, path = store_filesystem(uri)
    try:
        with _open_for_parsing(fs, path) as handle:
            try:
                frame = pd.read_parquet(handle)
            except Exception as error:
                if named:
                    raise SnapshotDigestError(
                        f"snapshot {shown} is damaged ({_parse_failure(error)}); the next extract_data replaces it"
                    ) from error
                raise _parquet_failure(handle, f"data store object {shown}", error) from error
    except (DataSourceError, DataValidationError):
        raise
    except Exception as error:  # refused keys fail at once; a store that does not answer is retried
        raise store_failure(
            fs, path, error, f"data store object {shown}", "does not exist; was it written by an earlier task?"
        ) from error
    if named and not holds_content(frame, named["digest"]):
        raise SnapshotDigestError(
            f"snapshot {shown} does not hold the content its name promises; the next extract_data replaces it"
        )
    return frame


def store_uri(data_store: str, *parts: str) -> str:
    return "/".join([data_store.rstrip("/"), *parts])


def write_snapshot(frame: pd.DataFrame, data_store: str) -> Snapshot:
    """Store the frame under its content digest: re-extracting unchanged data writes nothing new.

    The same rows in another order have the same digest, and the snapshot already at that address is kept: every run
    on that data reads, splits and trains on the same file, whatever order the source returned the rows in. It is
    kept only if it is read back and holds that content; one that does not (a write killed by an older version, a bad
    disk, a hand edit, a file replaced on purpose) is written again. Nothing recorded beside the file could vouch for
    it instead: whoever can replace the file can replace that too.
    """
    digest = content_digest(frame)
    uri = store_uri(data_store, "snapshots", f"{digest}.parquet")
    snapshot = Snapshot(uri=uri, digest=digest, rows=len(frame), columns=[str(c) for c in frame.columns])
    fs, path = store_filesystem(uri)
    try:
        exists = fs.exists(path)
    except Exception as error:
        raise store_failure(fs, path, error, f"snapshot {mask_credentials(uri)}") from error
    if exists:
        try:
            read_frame(uri)
            return snapshot
        except SnapshotDigestError as damage:
            log.warning("writing snapshot %s again: %s", mask_credentials(uri), damage)
    write_frame(frame, uri)
    return snapshot


def validate_frame(
    frame: pd.DataFrame,
    *,
    label: str,
    source: str,
    min_rows: int,
    min_rows_per_class: int,
    expected_features: list[str] | None = None,
) -> list[str]:
    """Check the frame can be trained on; returns the feature columns or raises DataValidationError."""
    where = f"data from {source}"
    if frame.empty or frame.shape[1] == 0:
        raise DataValidationError(f"{where} is empty (rows: {len(frame)}, columns: {frame.shape[1]})")
    columns = [str(c) for c in frame.columns]
    duplicated = sorted({c for c in columns if columns.count(c) > 1})
    if duplicated:
        raise DataValidationError(f"{where} has duplicated column names: {', '.join(duplicated)}")
    if label not in columns:
        raise DataValidationError(
            f"{where}: label column {label!r} is missing; columns are: {', '.join(_shorten(c) for c in columns[:30])}"
        )
    problems: list[str] = []
    features = [c for c in columns if c != label]
    if not features:
        problems.append("there are no feature columns besides the label")
    labels = frame[label]
    if labels.isna().any():
        problems.append(f"label column {label!r} has {int(labels.isna().sum())} missing values")
    # Only the classes that occur: a categorical label also counts its unused categories, with 0 rows each.
    counts = labels.dropna().value_counts()
    counts = counts[counts > 0]
    if len(counts) < 2:
        found = ", ".join(map(str, counts.index)) or "none"
        problems.append(f"label column {label!r} has {len(counts)} class(es) ({found}); at least 2 are needed")
    elif counts.min() < min_rows_per_class:
        scarce = [f"{_shorten(repr(k))}: {v}" for k, v in counts.items() if v < min_rows_per_class]
        problems.append(
            f"label column {label!r} has too few rows per class for a stratified split "
            f"(at least {min_rows_per_class} needed; {len(counts)} classes in all): {_first_few(scarce)}"
        )
    empty = [c for c in features if frame[c].isna().all()]
    if empty:
        problems.append(f"columns entirely empty: {', '.join(empty)}")
    non_numeric = [
        c
        for c in features
        if c not in empty and not (pd.api.types.is_numeric_dtype(frame[c]) or pd.api.types.is_bool_dtype(frame[c]))
    ]
    if non_numeric:
        samples = "; ".join(
            f"{_shorten(c)} (e.g. {_shorten(repr(_first_non_numeric(frame[c])))})" for c in non_numeric[:10]
        )
        problems.append(f"non-numeric feature columns: {samples}")
    infinite = {
        c: int(np.isinf(frame[c].to_numpy(dtype=float, na_value=np.nan)).sum())
        for c in features
        if c not in empty and c not in non_numeric and not pd.api.types.is_bool_dtype(frame[c])
    }
    if any(infinite.values()):
        problems.append(
            "infinite values in feature columns: "
            + _first_few([f"{_shorten(c)} ({n} rows)" for c, n in infinite.items() if n])
        )
    if len(frame) < min_rows:
        problems.append(f"only {len(frame)} rows; at least {min_rows} are needed")
    if expected_features is not None and (differences := column_differences(expected_features, features)):
        problems.append(f"columns differ from the Production model's signature{differences}")
    if problems:
        raise DataValidationError(f"{where} failed validation: " + "; ".join(problems))
    return features


def _first_few(items: list[str], shown: int = 10) -> str:
    """The first ``shown`` items, and how many more: a refusal stays short however many there are."""
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more


def _first_non_numeric(series: pd.Series) -> Any:
    for value in series.dropna():
        try:
            float(value)
        except (TypeError, ValueError):
            return value
    return series.dropna().iloc[0] if series.notna().any() else None


def split_frame(
    frame: pd.DataFrame,
    *,
    label: str,
    features: list[str],
    test_size: float,
    seed: int,
    data_store: str,
    run_folder: str,
) -> SplitData:
    """Stratified, seeded split; both halves are written to the data store."""
    check_split_sizes(len(frame), frame[label].nunique(), test_size)
    columns = [*features, label]
    # The split copies the rows anyway: a copy beforehand would hold the whole data set twice at once.
    model_input = frame if [str(c) for c in frame.columns] == columns else frame[columns]
    # Integer columns cannot hold missing values in an MLflow signature; serving clients do send them.
    widened = {
        column: np.float64
        for column in features
        if pd.api.types.is_bool_dtype(model_input[column]) or pd.api.types.is_integer_dtype(model_input[column])
    }
    if widened:
        model_input = model_input.astype(widened)
    train, test = train_test_split(model_input, test_size=test_size, random_state=seed, stratify=model_input[label])
    train_uri = store_uri(data_store, "runs", run_folder, "train.parquet")
    test_uri = store_uri(data_store, "runs", run_folder, "test.parquet")
    write_frame(train.reset_index(drop=True), train_uri)
    write_frame(test.reset_index(drop=True), test_uri)
    return SplitData(
        train_uri=train_uri,
        test_uri=test_uri,
        train_rows=len(train),
        test_rows=len(test),
        features=features,
        label=label,
        classes=[str(c) for c in sorted(model_input[label].unique(), key=str)],
    )


def check_split_sizes(rows: int, classes: int, test_size: float) -> None:
    """Refuse a held-out fraction that leaves either side of a stratified split without a row of every class."""
    test_rows = math.ceil(test_size * rows)
    train_rows = rows - test_rows
    if min(train_rows, test_rows) < classes:
        low, high = classes / rows, 1 - classes / rows
        raise DataValidationError(
            f"test_size {test_size} leaves {train_rows} of {rows} rows for training and {test_rows} for validation; "
            f"each side needs at least one row of each of the {classes} classes: choose a test_size between "
            f"{low:.3f} and {high:.3f}"
        )


def run_folder_name(run_key: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", run_key).strip("_") or "run"
