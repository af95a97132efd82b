"""What the model server records of the requests it answers and the labels it is told, and how to read them back.

Both live in the data store (``MLOPS_DATA_STORE``: a local folder by default, any fsspec URL such as ``s3://...``):

    records/version=<v>/date=YYYY-MM-DD/hour=HH/<batch>.parquet   one row per scored input row
    feedback/date=YYYY-MM-DD/hour=HH/<batch>.parquet              one row per true label received

Partitions are by the UTC time a request was received (a label: when it was received) and, for records, by the
version that answered. ``<batch>`` is the UTC time the batch was written and a random suffix
(``20261204T114312.123456Z-0f3a9c2b71d4``), so file names sort by time and two servers never write the same name.
Every file is written whole or not at all (:func:`ml.data.write_frame`): a reader never sees half a batch.

A record's columns (:data:`RECORD_COLUMNS`, then the features):

- ``request_id`` (string): the id the server answered with in ``X-Request-Id``;
- ``row`` (int64): the row's position in the request, from 0; a single-row request has row 0 only;
- ``received_at`` (timestamp, UTC): when the server received the request;
- ``model_name`` (string), ``version`` (int64): the registered model and the version that answered;
- ``prediction`` (string): the answer for the row, as :func:`label_text` writes it (``"1"``, ``"setosa"``);
- ``feature.<name>``, one per input column of the version's signature, with its type: absent when the server records
  no features (``MLOPS_RECORDING_FEATURES=false``). :func:`features_of` gives them under their own names.

A label's columns (:data:`FEEDBACK_COLUMNS`): ``request_id``, ``row``, ``label`` (string, as :func:`label_text` writes
it, so that it compares equal to a ``prediction`` of the same class), ``model_name`` and ``version`` (those of the
recorded answer), ``received_at`` (when the label arrived). A label sent again for the same row replaces the earlier
one: :func:`read_feedback` keeps the latest.
"""

from __future__ import annotations

import contextlib
import json
import math
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ml.assets import RECORDS_FOLDER
from ml.data import store_filesystem, store_uri, write_frame, write_whole

RECORDS = RECORDS_FOLDER
FEEDBACK = "feedback"
FEATURE_PREFIX = "feature."
# A compacted file (compact_records) holds the rows of the files it names in its Parquet metadata under COVERS_KEY;
# readers skip those files, so a record is read once whether or not they are deleted yet.
COMPACTED_PREFIX = "compacted-"
COVERS_KEY = b"mlops.compacted_from"
# How far back compaction looks: each hourly monitor run compacts the hours that closed since the last one, so a week
# covers a monitor stopped for days; older hours are not listed again, which would cost a listing per hour of history.
COMPACTION_LOOKBACK = timedelta(days=7)
RECORD_COLUMNS = ("request_id", "row", "received_at", "model_name", "version", "prediction")
FEEDBACK_COLUMNS = ("request_id", "row", "label", "model_name", "version", "received_at")


@dataclass(frozen=True)
class Answered:
    """One answered request, as the server queues it: cheap to make on the request path, turned into rows later."""

    request_id: str
    received_at: float  # seconds since the epoch
    model_name: str
    version: int
    predictions: Sequence[Any]
    features: pd.DataFrame | None


def label_text(value: Any) -> str:
    """A class label as records and feedback store it: a whole number without a fraction (``1`` and ``1.0`` are
    ``"1"``), booleans as ``true``/``false``, text as itself, anything else as JSON."""
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        number = float(value)
        return str(int(number)) if math.isfinite(number) and number.is_integer() else repr(number)
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, default=str)


def records_uri(data_store: str) -> str:
    """Where the records are: the folder of every version's partitions."""
    return store_uri(data_store, RECORDS)


def batch_name(now: datetime) -> str:
    return f"{now.strftime('%Y%m%dT%H%M%S.%fZ')}-{uuid.uuid4().hex[:12]}"


def hour_partition(moment: datetime) -> str:
    return f"date={moment:%Y-%m-%d}/hour={moment:%H}"


def monitoring_window(moment: datetime, minutes: int) -> tuple[datetime, datetime]:
    """The monitoring window that holds ``moment``: windows of ``minutes`` counted from midnight UTC, a day's last one
    ending at midnight. mlops_monitor judges them; the model server tells Airflow when one is complete."""
    moment = moment.astimezone(UTC)
    midnight = moment.replace(hour=0, minute=0, second=0, microsecond=0)
    length = timedelta(minutes=minutes)
    start = midnight + length * ((moment - midnight) // length)
    return start, min(start + length, midnight + timedelta(days=1))


def records_frame(answered: Sequence[Answered], with_features: bool = True) -> pd.DataFrame:
    """The record rows of some answered requests, all answered by one version (their features share its columns)."""
    sizes = [len(item.predictions) for item in answered]
    frame = pd.DataFrame(
        {
            "request_id": np.repeat([item.request_id for item in answered], sizes),
            "row": np.concatenate([np.arange(size, dtype=np.int64) for size in sizes]),
            "received_at": pd.to_datetime(
                np.repeat([item.received_at for item in answered], sizes), unit="s", utc=True
            ),
            "model_name": np.repeat([item.model_name for item in answered], sizes),
            "version": np.repeat(np.array([item.version for item in answered], dtype=np.int64), sizes),
            "prediction": _label_texts([value for item in answered for value in item.predictions]),
        }
    )
    features = [item.features for item in answered if item.features is not None]
    if not with_features or len(features) != len(answered):
        return frame
    return pd.concat([frame, _stacked(features).add_prefix(FEATURE_PREFIX)], axis=1)


def _label_texts(values: list[Any]) -> list[str]:
    """:func:`label_text` of each value; whole numbers, the common case, at once (a thousand times faster)."""
    if values and all(type(value) is int for value in values):
        return np.array(values, dtype=np.int64).astype(str).tolist()
    return [label_text(value) for value in values]


def _stacked(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """The frames one under the other. Frames of one type throughout (a model's features usually are) are stacked as
    arrays: ``pd.concat`` of a thousand single-row frames takes a tenth of a second, on the GIL the server answers
    requests with."""
    first = frames[0]
    dtypes = set(first.dtypes)
    if len(dtypes) == 1 and all(
        frame.columns.equals(first.columns) and set(frame.dtypes) == dtypes for frame in frames
    ):
        stacked = np.concatenate([frame.to_numpy() for frame in frames])
        return pd.DataFrame(stacked, columns=first.columns).astype(dtypes.pop(), copy=False)
    return pd.concat(frames, ignore_index=True)


def write_records(data_store: str, answered: Sequence[Answered], with_features: bool = True) -> list[str]:
    """Write answered requests as records, one file per version and hour; the files' URIs."""
    groups: dict[tuple[int, str], list[Answered]] = {}
    for item in answered:
        moment = datetime.fromtimestamp(item.received_at, UTC)
        groups.setdefault((item.version, hour_partition(moment)), []).append(item)
    return [write_record_batch(data_store, records_frame(items, with_features)) for items in groups.values()]


def write_record_batch(data_store: str, rows: pd.DataFrame) -> str:
    """Write record rows (as :func:`records_frame` makes them) of one version and one hour as one batch; its URI."""
    version, moment = int(rows["version"].iloc[0]), rows["received_at"].iloc[0].to_pydatetime()
    uri = store_uri(
        data_store, RECORDS, f"version={version}", hour_partition(moment), f"{batch_name(datetime.now(UTC))}.parquet"
    )
    write_frame(rows, uri)
    return uri


def labels_frame(labels: Sequence[tuple[str, int, Any, int]], model_name: str) -> pd.DataFrame:
    """Labels received now, as (request id, row, label, version of the recorded answer), in the feedback layout."""
    return pd.DataFrame(
        {
            "request_id": [request_id for request_id, _, _, _ in labels],
            "row": np.array([row for _, row, _, _ in labels], dtype=np.int64),
            "label": [label_text(label) for _, _, label, _ in labels],
            "model_name": model_name,
            "version": np.array([version for _, _, _, version in labels], dtype=np.int64),
            "received_at": pd.Timestamp.now(tz=UTC),
        }
    )


def write_feedback(data_store: str, labels: pd.DataFrame) -> list[str]:
    """Write labels (the columns of :data:`FEEDBACK_COLUMNS`), one file per hour received; the files' URIs."""
    now = datetime.now(UTC)
    written = []
    for hour, rows in labels.groupby(labels["received_at"].map(hour_partition), sort=True):
        uri = store_uri(data_store, FEEDBACK, str(hour), f"{batch_name(now)}.parquet")
        write_frame(rows.reset_index(drop=True), uri)
        written.append(uri)
    return written


def read_records(
    data_store: str,
    start: datetime,
    end: datetime,
    version: int | None = None,
    columns: Sequence[str] | None = None,
) -> pd.DataFrame:
    """The records of requests received in ``[start, end)`` (aware datetimes), of one version or all, oldest first.

    ``columns`` limits what is read (for instance ``["request_id", "row", "version"]``); the default is every column.
    Records of versions with different features are read together, each missing feature null. Reads only the hour
    partitions the window covers.
    """
    fs, root = store_filesystem(records_uri(data_store))
    versions = [version] if version is not None else _versions(fs, root)
    folders = [f"{root}/version={v}/{hour}" for v in versions for hour in _hours(start, end)]
    read = list(dict.fromkeys([*columns, "received_at"])) if columns else None
    frame = _read_files(fs, folders, read)
    if frame.empty:
        return pd.DataFrame(columns=list(columns or RECORD_COLUMNS))
    frame = frame[(frame["received_at"] >= start) & (frame["received_at"] < end)]
    frame = frame.sort_values("received_at", kind="stable").reset_index(drop=True)
    return frame[[column for column in columns if column in frame]] if columns else frame


def read_feedback(data_store: str, start: datetime, end: datetime) -> pd.DataFrame:
    """The labels received in ``[start, end)``, the latest for each request id and row."""
    fs, root = store_filesystem(store_uri(data_store, FEEDBACK))
    frame = _read_files(fs, [f"{root}/{hour}" for hour in _hours(start, end)], None)
    if frame.empty:
        return pd.DataFrame(columns=list(FEEDBACK_COLUMNS))
    frame = frame[(frame["received_at"] >= start) & (frame["received_at"] < end)]
    latest = frame.sort_values("received_at", kind="stable").drop_duplicates(["request_id", "row"], keep="last")
    return latest.reset_index(drop=True)


def with_labels(records: pd.DataFrame, feedback: pd.DataFrame) -> pd.DataFrame:
    """The records that have a label, with a ``label`` column beside their ``prediction``."""
    labels = feedback[["request_id", "row", "label"]]
    return records.merge(labels, on=["request_id", "row"], how="inner")


def latest_labelled(
    data_store: str, start: datetime, end: datetime, version: int | None = None, labels_until: datetime | None = None
) -> pd.DataFrame:
    """The records of requests received in ``[start, end)`` (of one version or all) that have a label, with the latest
    label received for each from ``start`` until ``labels_until`` (default: now) in a ``label`` column.

    A request id a client reused is labelled on its latest record of the window only, as the server applies a label
    to the latest request of an id.
    """
    served = read_records(data_store, start, end, version)
    served = served.drop_duplicates(["request_id", "row"], keep="last")
    labels = read_feedback(data_store, start, labels_until or datetime.now(UTC))
    return with_labels(served, labels)


def features_of(records: pd.DataFrame) -> pd.DataFrame:
    """The recorded input features, under the names the model's signature gives them."""
    columns = [column for column in records.columns if str(column).startswith(FEATURE_PREFIX)]
    return records[columns].rename(columns=lambda column: column.removeprefix(FEATURE_PREFIX))


def _versions(fs: Any, root: str) -> list[int]:
    try:
        entries = fs.ls(root, detail=False)
    except FileNotFoundError:
        return []
    names = (str(entry).rstrip("/").rsplit("/", 1)[-1] for entry in entries)
    return sorted(int(name.split("=", 1)[1]) for name in names if name.startswith("version=") and name[8:].isdigit())


def _hours(start: datetime, end: datetime) -> Iterator[str]:
    moment = start.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    while moment < end:
        yield hour_partition(moment)
        moment += timedelta(hours=1)


def _parquet_files(fs: Any, folder: str) -> list[str]:
    """A partition's Parquet files in name order, but hidden ones (a write under way on a disk)."""
    try:
        names = sorted(str(name) for name in fs.ls(folder, detail=False))
    except FileNotFoundError:
        return []
    return [name for name in names if name.endswith(".parquet") and not _base(name).startswith(".")]


def _batch_files(fs: Any, folder: str) -> list[str]:
    """The files of a partition a reader reads."""
    return _uncovered(fs, _parquet_files(fs, folder))


def _uncovered(fs: Any, names: list[str]) -> list[str]:
    """Of a partition's files, those a reader reads: not those a compacted file there holds already.

    Two compactions of a partition at once (the monitor's runs overlapping) each write a merged file of the same
    small files: of compacted files whose rows another one holds too, only that other one is read (of two holding the
    same, the later-named)."""
    compacted = {_base(name): set(_covers(fs, name)) for name in names if _base(name).startswith(COMPACTED_PREFIX)}
    covered = set().union(*compacted.values())
    for name, holds in compacted.items():
        if any(other != name and holds <= more and (holds < more or other > name) for other, more in compacted.items()):
            covered.add(name)
    return [name for name in names if _base(name) not in covered]


def _base(name: str) -> str:
    return name.rstrip("/").rsplit("/", 1)[-1]


def _covers(fs: Any, name: str) -> list[str]:
    with fs.open(name, "rb") as handle:
        metadata = pq.read_metadata(handle).metadata or {}
    return json.loads(metadata.get(COVERS_KEY, b"[]"))


def compact_records(data_store: str, before: datetime, since: datetime | None = None) -> dict[str, int]:
    """Merge the record files of each hour partition that ended by ``before``, and began at ``since`` or later (by
    default ``COMPACTION_LOOKBACK`` before ``before``), into one file; how many partitions were compacted and how many
    files they held.

    Safe to stop at any point and to run again, alongside readers and other compactions' retries: the merged file is
    written whole (:func:`ml.data.write_whole`) and names the files it holds in its metadata, so readers skip those
    from the moment it appears; they are deleted after, and a run that finds them still there (a crash in between)
    deletes them. A partition that got files after its compaction is compacted again, the earlier merged file with
    them.
    """
    fs, root = store_filesystem(records_uri(data_store))
    compacted = {"partitions": 0, "files": 0}
    since = before - COMPACTION_LOOKBACK if since is None else since
    for version in _versions(fs, root):
        for folder in _closed_hours(f"{root}/version={version}", since, before):
            merged = _compact_folder(fs, folder)
            compacted["partitions"] += bool(merged)
            compacted["files"] += merged
    return compacted


def _closed_hours(version_root: str, since: datetime, before: datetime) -> list[str]:
    """The hour partitions that began at ``since`` or later and ended by ``before``: only those are looked at."""
    last_start = before - timedelta(hours=1)
    return [f"{version_root}/{hour}" for hour in _hours(since, last_start + timedelta(microseconds=1))]


def _compact_folder(fs: Any, folder: str) -> int:
    """Compact one partition; the number of files merged (0: nothing to do)."""
    names = _parquet_files(fs, folder)
    live = _uncovered(fs, names)
    # Files a compacted file holds, left by a compaction stopped before it deleted them.
    leftovers = {_base(name) for name in names} - {_base(name) for name in live}
    if len(live) > 1:
        covers = sorted({_base(name) for name in live} | leftovers)
        tables = []
        for name in live:
            with fs.open(name, "rb") as handle:
                tables.append(pq.read_table(handle))
        table = pa.concat_tables(tables, promote_options="permissive")  # as _read_files reads them
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), COVERS_KEY: json.dumps(covers)})
        target = f"{folder}/{COMPACTED_PREFIX}{batch_name(datetime.now(UTC))}.parquet"
        write_whole(fs, target, lambda handle: pq.write_table(table, handle))
        leftovers |= {_base(name) for name in live}
    for name in sorted(leftovers):
        with contextlib.suppress(FileNotFoundError):  # deleted meanwhile by a compaction running beside this one
            fs.rm(f"{folder}/{name}")
    return len(live) if len(live) > 1 else 0


def _read_files(fs: Any, folders: Sequence[str], columns: Sequence[str] | None) -> pd.DataFrame:
    tables = [table for folder in folders for table in _read_folder(fs, folder, columns)]
    if not tables:
        return pd.DataFrame()
    # Permissive: batches may differ in timestamp unit (pandas writes whole-second times in us, others in ns).
    return pa.concat_tables(tables, promote_options="permissive").to_pandas()


def _read_folder(fs: Any, folder: str, columns: Sequence[str] | None, tries: int = 3) -> list[pa.Table]:
    """A partition's tables. A file that vanished between listing and reading was compacted meanwhile: the partition
    is listed and read again, so each record is read once."""
    for attempt in range(tries):
        try:
            tables = []
            for name in _batch_files(fs, folder):
                with fs.open(name, "rb") as handle:
                    parquet = pq.ParquetFile(handle)
                    wanted = [column for column in columns if column in parquet.schema_arrow.names] if columns else None
                    tables.append(parquet.read(columns=wanted))
            return tables
        except FileNotFoundError:
            if attempt == tries - 1:
                raise
            fs.invalidate_cache(folder)
    return []
