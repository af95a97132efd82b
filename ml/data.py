"""Data sources, content-addressed snapshots, validation and the train/test split.

Data moves between tasks through a store addressed by URI (a local folder by default, any fsspec URL otherwise),
never through XCom, so tasks may run on different machines.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from ml.settings import SQL_SCHEMES, url_scheme

log = logging.getLogger(__name__)

BUNDLED_DATASETS = ("breast_cancer", "iris", "wine")
FILE_FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


class DataSourceError(ValueError):
    """The configured data source cannot be read."""


class DataValidationError(ValueError):
    """The data was read but cannot be trained on; the message names every problem found."""


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
    kind = source_kind(source)
    if kind == "sql":
        return f"SQL {_redact(source)} ({query or 'no query'})"
    return source


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
    suffix = Path(source.split("?", 1)[0]).suffix.lower()
    if suffix in FILE_FORMATS:
        return FILE_FORMATS[suffix]
    if source.endswith("/") or _is_folder(source):
        return "folder"
    raise DataSourceError(
        f"data source {source!r} is not recognised: use sklearn:<name> ({', '.join(BUNDLED_DATASETS)}), "
        "a .csv or .parquet path or URL, a folder of them (an existing directory, or a path ending in /), "
        "or a SQLAlchemy URL with a query"
    )


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


def folder_files(uri: str) -> list[str]:
    """The data files of a folder source, as URLs, in name order; hidden (``.``) and ``_`` files are left out."""
    try:
        fs, path = fsspec.core.url_to_fs(uri)
        if not fs.isdir(path):
            raise DataSourceError(f"data folder {uri} does not exist")
        entries = fs.ls(path, detail=False)
    except DataSourceError:
        raise
    except Exception as error:
        raise DataSourceError(f"cannot list data folder {uri}: {error}") from error
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
    return (f"; missing: {', '.join(missing)}" if missing else "") + (
        f"; unexpected: {', '.join(extra)}" if extra else ""
    )


def _load_folder(uri: str) -> pd.DataFrame:
    """Read every data file of the folder in name order and concatenate them; their columns must agree."""
    files = folder_files(uri)
    if not files:
        raise DataValidationError(f"data folder {uri} has no .csv or .parquet files")
    frames = [(file, _load_file(file, FILE_FORMATS[Path(file).suffix.lower()])) for file in files]
    first_file, first = frames[0]
    columns = [str(c) for c in first.columns]
    for file, frame in frames[1:]:
        if differences := column_differences(columns, [str(c) for c in frame.columns]):
            raise DataValidationError(
                f"data folder {uri}: the columns of {file} differ from those of {first_file}{differences}"
            )
    log.info("read %d files from data folder %s", len(frames), uri)
    return pd.concat([frame[columns] for _, frame in frames], ignore_index=True)


def _load_bundled(name: str, label: str) -> pd.DataFrame:
    from sklearn import datasets

    loader = getattr(datasets, f"load_{name}")
    bunch = loader(as_frame=True)
    frame = bunch.frame.copy()
    return frame.rename(columns={"target": label}) if label != "target" else frame


def _load_sql(url: str, query: str) -> pd.DataFrame:
    import sqlalchemy

    if not query.strip():
        raise DataSourceError(f"data source {_redact(url)} is SQL but no query or table name was given")
    statement = query if re.search(r"\s", query.strip()) else f'SELECT * FROM "{query.strip()}"'
    try:
        engine = sqlalchemy.create_engine(url)
        with engine.connect() as connection:
            return pd.read_sql(sqlalchemy.text(statement), connection)
    except Exception as error:
        raise DataSourceError(f"cannot read SQL data source {_redact(url)} with {statement!r}: {error}") from error


def _load_file(uri: str, kind: str) -> pd.DataFrame:
    try:
        with fsspec.open(uri, "rb") as handle:
            raw = handle.read()
    except FileNotFoundError as error:
        raise DataSourceError(f"data file {uri} does not exist") from error
    except Exception as error:
        raise DataSourceError(f"cannot open data file {uri}: {error}") from error
    if not raw.strip():
        raise DataValidationError(f"data file {uri} is empty")
    if kind == "csv":
        _reject_duplicate_csv_header(raw, uri)
        try:
            return pd.read_csv(io.BytesIO(raw))
        except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as error:
            raise DataSourceError(f"data file {uri} is not readable CSV: {error}") from error
    try:
        return pd.read_parquet(io.BytesIO(raw))
    except Exception as error:
        raise DataSourceError(f"data file {uri} is not readable Parquet: {error}") from error


def _reject_duplicate_csv_header(raw: bytes, uri: str) -> None:
    try:
        header = next(csv.reader(io.StringIO(raw.decode("utf-8", errors="replace"))), [])
    except csv.Error as error:
        raise DataSourceError(f"data file {uri} is not readable CSV: {error}") from error
    seen: set[str] = set()
    duplicated = sorted({name for name in header if name in seen or seen.add(name)})
    if duplicated:
        raise DataValidationError(f"data file {uri} has duplicated column names: {', '.join(duplicated)}")


def content_digest(frame: pd.DataFrame) -> str:
    """A digest of the content: column names, dtypes and values, independent of the row index and file format."""
    hasher = hashlib.sha256()
    for name, dtype in frame.dtypes.items():
        hasher.update(f"{name}\x1f{dtype}\x1e".encode())
    hasher.update(pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes())
    return hasher.hexdigest()


def write_frame(frame: pd.DataFrame, uri: str) -> None:
    fs, path = fsspec.core.url_to_fs(uri)
    fs.makedirs(fs._parent(path), exist_ok=True)
    with fs.open(path, "wb") as handle:
        frame.to_parquet(handle, index=False)


def read_frame(uri: str) -> pd.DataFrame:
    try:
        with fsspec.open(uri, "rb") as handle:
            return pd.read_parquet(handle)
    except FileNotFoundError as error:
        raise DataSourceError(f"data store object {uri} does not exist; was it written by an earlier task?") from error


def store_uri(data_store: str, *parts: str) -> str:
    return "/".join([data_store.rstrip("/"), *parts])


def write_snapshot(frame: pd.DataFrame, data_store: str) -> Snapshot:
    """Store the frame under its content digest: re-extracting unchanged data writes nothing new."""
    digest = content_digest(frame)
    uri = store_uri(data_store, "snapshots", f"{digest}.parquet")
    fs, path = fsspec.core.url_to_fs(uri)
    if not fs.exists(path):
        write_frame(frame, uri)
    return Snapshot(uri=uri, digest=digest, rows=len(frame), columns=[str(c) for c in frame.columns])


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
        raise DataValidationError(f"{where}: label column {label!r} is missing; columns are: {', '.join(columns[:30])}")
    problems: list[str] = []
    features = [c for c in columns if c != label]
    if not features:
        problems.append("there are no feature columns besides the label")
    labels = frame[label]
    if labels.isna().any():
        problems.append(f"label column {label!r} has {int(labels.isna().sum())} missing values")
    counts = labels.dropna().value_counts()
    if len(counts) < 2:
        found = ", ".join(map(str, counts.index)) or "none"
        problems.append(f"label column {label!r} has {len(counts)} class(es) ({found}); at least 2 are needed")
    elif counts.min() < min_rows_per_class:
        scarce = ", ".join(f"{k!r}: {v}" for k, v in counts.items() if v < min_rows_per_class)
        problems.append(
            f"label column {label!r} has too few rows per class for a stratified split "
            f"(at least {min_rows_per_class} needed): {scarce}"
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
        samples = "; ".join(f"{c} (e.g. {_first_non_numeric(frame[c])!r})" for c in non_numeric[:10])
        problems.append(f"non-numeric feature columns: {samples}")
    if len(frame) < min_rows:
        problems.append(f"only {len(frame)} rows; at least {min_rows} are needed")
    if expected_features is not None and (differences := column_differences(expected_features, features)):
        problems.append(f"columns differ from the Production model's signature{differences}")
    if problems:
        raise DataValidationError(f"{where} failed validation: " + "; ".join(problems))
    return features


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
    model_input = frame[[*features, label]].copy()
    # Integer columns cannot hold missing values in an MLflow signature; serving clients do send them.
    for column in features:
        if pd.api.types.is_bool_dtype(model_input[column]) or pd.api.types.is_integer_dtype(model_input[column]):
            model_input[column] = model_input[column].astype(np.float64)
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


def run_folder_name(run_key: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", run_key).strip("_") or "run"


def _redact(url: str) -> str:
    return re.sub(r"://([^:/@]+):[^@/]+@", r"://\1:***@", url)
