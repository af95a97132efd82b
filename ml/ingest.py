"""Land new batches of data in the configured source, so that the loop new data -> retrain -> promote can be shown.

The batches come from the public data set itself: the rows of scikit-learn's breast cancer data, put in a fixed
seeded order, are held back and released over time. Batch 0 is the initial bulk (the first ``INITIAL_ROWS`` rows of
that order); batch k >= 1 is the next ``BATCH_ROWS`` rows after the bulk and the k - 1 batches before it. So batch k is
always the same rows, on any machine. A batch can be shifted on the way in (features multiplied or offset) to show
drift.

Targets:

- a folder (``MLOPS_DATA_SOURCE`` is a directory, or a path or URL ending in ``/``): batch k is written as
  ``batch-000k.csv`` (or ``.parquet``) and recorded in ``_manifest.json`` there, which the pipeline's reader ignores;
- a SQL table (``MLOPS_DATA_SOURCE`` a SQLAlchemy URL, ``MLOPS_DATA_QUERY`` the table name): rows are appended, and the
  batch is recorded in ``<table>_mlops_batches`` in the same transaction.

Labelled live requests land the same way (:func:`land_feedback`): the requests the model server recorded in a window
that received a true label on ``POST /feedback`` (docs/recording.md), as rows of the training data's schema, in a
folder source as ``feedback-<time>-<digest>.csv``. ``_manifest.json`` remembers which recorded rows each such batch
holds, so that no labelled request lands twice, whatever windows are asked for.

The ``mlops_ingest`` DAG calls :func:`ml.tasks.land_batch`; its task has the data asset as outlet, so each landed batch
is an asset event that triggers ``mlops_pipeline``. ``python -m ml.ingest`` (``mlops ingest``) lands a batch without
Airflow, and posts the same event to Airflow's REST API when ``MLOPS_AIRFLOW_API_URL`` is set (:mod:`ml.asset_events`).

The manifest forgets the landed requests received more than ``MLOPS_FEEDBACK_LANDING_DAYS`` ago, so it stays bounded;
labelled requests older than that are not landed, since whether they landed before is no longer known.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd

from ml import data, object_store, records
from ml.redaction import mask_credentials
from ml.settings import SQL_SCHEMES, ConfigurationError, Settings

log = logging.getLogger(__name__)

HELD_BACK_SOURCE = "sklearn:breast_cancer"
INITIAL_ROWS = 269
BATCH_ROWS = 50
RELEASE_SEED = 20241105
MANIFEST = "_manifest.json"
LEDGER_SUFFIX = "_mlops_batches"
FILE_FORMATS = ("csv", "parquet")
BATCH_FILE = re.compile(r"^batch-(\d+)\.(csv|parquet)$")
FEEDBACK_BATCH_PREFIX = "feedback-"
# A moment back from now, as --since and --until take it: 90m, 24h, 7d.
AGO = re.compile(r"^(\d+)([mhd])$")
AGO_UNITS = {"m": "minutes", "h": "hours", "d": "days"}


class IngestError(ConfigurationError):
    """A batch cannot be landed: the target, the batch number or the shift is not usable."""


def release_plan(total_rows: int, initial_rows: int = INITIAL_ROWS, batch_rows: int = BATCH_ROWS) -> list[range]:
    """The positions, in release order, of each batch: batch 0 is the initial bulk, the last may be shorter."""
    if not 0 < initial_rows <= total_rows or batch_rows < 1:
        raise IngestError(f"cannot plan batches: initial {initial_rows}, batch {batch_rows}, total {total_rows} rows")
    plan = [range(0, initial_rows)]
    plan += [range(start, min(start + batch_rows, total_rows)) for start in range(initial_rows, total_rows, batch_rows)]
    return plan


def held_back_batch(
    number: int,
    *,
    label: str = "target",
    source: str = HELD_BACK_SOURCE,
    initial_rows: int = INITIAL_ROWS,
    batch_rows: int = BATCH_ROWS,
    seed: int = RELEASE_SEED,
) -> pd.DataFrame:
    """Batch ``number`` of the held-back data set: a fixed slice of a seeded permutation of its rows, its label
    column named ``label``, as the pipeline reading the batches expects."""
    frame = data.load_source(source).rename(columns={"target": label})
    plan = release_plan(len(frame), initial_rows, batch_rows)
    if not 0 <= number < len(plan):
        raise IngestError(f"batch {number} does not exist: {source} is released as batches 0 to {len(plan) - 1}")
    order = np.random.default_rng(seed).permutation(len(frame))
    return frame.iloc[order[plan[number].start : plan[number].stop]].reset_index(drop=True)


def batch_total(source: str = HELD_BACK_SOURCE) -> int:
    return len(release_plan(len(data.load_source(source))))


def parse_shift(shift: Mapping[str, Any] | str | None, features: Sequence[str]) -> dict[str, tuple[float, float]]:
    """Normalise a shift to ``{feature: (multiply, offset)}``.

    Accepted: ``{"mean radius": 1.5}`` (multiply), ``{"worst area": {"multiply": 1.2, "offset": 10}}``, and ``"*"`` for
    every feature. Unknown features and non-numbers are refused with the valid names.
    """
    if isinstance(shift, str):
        try:
            shift = json.loads(shift or "{}")
        except json.JSONDecodeError as error:
            raise IngestError(f"shift is not valid JSON: {error}") from error
    if not shift:
        return {}
    if not isinstance(shift, Mapping):
        raise IngestError(f"shift must be a JSON object of feature -> factor, got {type(shift).__name__}")
    parsed: dict[str, tuple[float, float]] = {}
    for name, spec in shift.items():
        targets = list(features) if name == "*" else [name]
        if name != "*" and name not in features:
            raise IngestError(f"shift names unknown feature {name!r}; features are: {', '.join(features)}")
        if isinstance(spec, Mapping) and set(spec) - {"multiply", "offset"}:
            unknown = sorted(set(spec) - {"multiply", "offset"})
            raise IngestError(f"shift of {name!r} has unknown keys {unknown}; use multiply, offset")
        try:
            if isinstance(spec, Mapping):
                factor = (float(spec.get("multiply", 1.0)), float(spec.get("offset", 0.0)))
            else:
                factor = (float(spec), 0.0)
        except (TypeError, ValueError) as error:
            raise IngestError(f"shift of {name!r} is not a number or {{multiply, offset}}: {spec!r}") from error
        if not all(math.isfinite(number) for number in factor):
            raise IngestError(f"shift of {name!r} must be finite numbers, got {spec!r}")
        for target in targets:
            parsed[target] = factor
    return parsed


def apply_shift(frame: pd.DataFrame, shift: Mapping[str, tuple[float, float]]) -> pd.DataFrame:
    """A copy of ``frame`` with each named feature multiplied, then offset."""
    shifted = frame.copy()
    for name, (multiply, offset) in shift.items():
        shifted[name] = shifted[name].astype(float) * multiply + offset
    return shifted


def target_kind(source: str) -> str:
    """``folder`` or ``sql``: where batches can land. A bundled data set or a single file cannot take batches."""
    if source.startswith("sklearn:"):
        raise IngestError(
            f"data source {source!r} is a bundled data set, which cannot take new batches; point MLOPS_DATA_SOURCE at "
            "a folder (e.g. .mlops/incoming/) or a SQL table (SQLAlchemy URL + MLOPS_DATA_QUERY=<table>)"
        )
    scheme = source.split("://", 1)[0].split("+", 1)[0].lower() if "://" in source else ""
    if scheme in SQL_SCHEMES:
        return "sql"
    if source.split("?", 1)[0].lower().endswith(tuple(data.FILE_FORMATS)):
        raise IngestError(
            f"data source {source!r} is a single file; batches land in a folder of files: use its directory instead"
        )
    return "folder"


def land(
    settings: Settings,
    *,
    batch: int | None = None,
    shift: Mapping[str, Any] | str | None = None,
    file_format: str = "csv",
    run_key: str = "manual",
) -> dict[str, Any]:
    """Land batch ``batch`` (default: the next one) in the configured source; returns what was landed.

    ``landed`` is False, with a ``reason``, when there is nothing to land (every batch is in, or the requested one
    already is). A second call with the same ``run_key`` (a retried task) returns the batch the first one landed.
    """
    kind = target_kind(settings.data_source)
    if file_format not in FILE_FORMATS:
        raise IngestError(f"file format {file_format!r} is not one of {', '.join(FILE_FORMATS)}")
    target = FolderTarget(settings.data_source) if kind == "folder" else SqlTarget(settings)
    records = target.records()
    earlier = next((r for r in records if r.get("run_key") == run_key and run_key != "manual"), None)
    if earlier is not None and target.holds(earlier):
        log.info("batch %s was landed by an earlier try of %s", earlier["batch"], run_key)
        return {**earlier, "landed": True, "reason": "landed by an earlier try of this run"}
    total = batch_total()
    landed_numbers = {int(r["batch"]) for r in records}
    number = (max(landed_numbers) + 1 if landed_numbers else 0) if batch is None else int(batch)
    if batch is None and number >= total:
        return _nothing(f"all {total} batches of {HELD_BACK_SOURCE} have landed", target, total)
    if number in landed_numbers:
        return _nothing(f"batch {number} has already landed", target, total)
    frame = held_back_batch(number, label=settings.label_column)
    factors = parse_shift(shift, [c for c in frame.columns if c != settings.label_column])
    frame = apply_shift(frame, factors)
    record = {
        "batch": number,
        "rows": len(frame),
        "digest": data.content_digest(frame),
        "shift": {name: {"multiply": m, "offset": o} for name, (m, o) in factors.items()},
        "landed_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "run_key": run_key,
    }
    record["location"] = target.write(frame, record, file_format)
    left = total - len(landed_numbers | {number})
    log.info(
        "landed batch %d (%d rows%s) at %s", number, len(frame), ", shifted" if factors else "", record["location"]
    )
    return {"landed": True, **record, "target": target.describe(), "batches_total": total, "batches_left": left}


def _nothing(reason: str, target: Any, total: int) -> dict[str, Any]:
    log.info("nothing to land: %s", reason)
    return {"landed": False, "reason": reason, "target": target.describe(), "batches_total": total}


@dataclass(frozen=True)
class TrainingSchema:
    """What rows must look like to join the training data: its columns in order, and its label's classes."""

    columns: list[str]
    label: str
    classes: dict[str, Any]  # label as records write it (ml.records.label_text) -> label as the training data holds it
    label_dtype: Any

    @property
    def features(self) -> list[str]:
        return [column for column in self.columns if column != self.label]


@dataclass(frozen=True)
class LabelledRows:
    """Labelled requests of a window as training rows: ``rows`` in the training data's schema, ``requests`` the
    recorded row each comes from, as (request id, row, received at), and those left out for lacking features."""

    rows: pd.DataFrame
    requests: list[tuple[str, int, str]]
    labelled: int
    lacking_features: dict[str, int]  # feature -> labelled rows whose records lack it


def training_schema(source: str, label: str) -> TrainingSchema:
    """The columns and classes of the training data in a folder source, which labelled requests must match."""
    shown = mask_credentials(source)
    try:
        files = data.folder_files(source)
    except data.DataSourceUnavailableError:
        raise
    except data.DataSourceError:
        files = []
    if not files:
        raise IngestError(
            f"data folder {shown} holds no training data yet, so labelled requests have no columns or classes to "
            "match; land the initial batch first (mlops ingest --initial)"
        )
    frame = data.load_source(source)
    columns = [str(column) for column in frame.columns]
    if label not in columns:
        raise IngestError(
            f"label column {label!r} (MLOPS_LABEL_COLUMN) is not a column of the training data in {shown}; "
            f"its columns are: {', '.join(columns[:30])}"
        )
    classes = {records.label_text(value): value for value in frame[label].dropna().unique()}
    return TrainingSchema(columns, label, classes, frame[label].dtype)


def labelled_training_rows(
    data_store: str, schema: TrainingSchema, since: datetime, until: datetime, version: int | None = None
) -> LabelledRows:
    """The requests recorded in ``[since, until)`` (of one version or all) that received a label, the latest label
    of each, as rows of ``schema``: its features from the records, its label column from the feedback.

    A recorded row that lacks a feature of the schema (recorded without features, by a version with other inputs, or
    sent without a value) is left out and counted. IngestError when no request of the window has a label, when none
    of the labelled ones holds every feature, or when a label is not a class of the training data.
    """
    window = describe_window(since, until, version)
    labelled = records.latest_labelled(data_store, since, until, version, labels_until=max(until, datetime.now(UTC)))
    if labelled.empty:
        raise IngestError(f"no labelled requests in {window}: nothing recorded then received a label on POST /feedback")
    _check_classes(labelled, schema, window)
    features = records.features_of(labelled).reindex(columns=schema.features)
    lacking = features.isna()
    complete = ~lacking.any(axis=1)
    lacking_features = {str(name): int(count) for name, count in lacking.sum().items() if count}
    if not complete.any():
        raise IngestError(
            f"none of the {len(labelled)} labelled requests in {window} can become training data: their records "
            f"lack features the training data has ({_lacking(lacking_features)}); the model server records no "
            "features with MLOPS_RECORDING_FEATURES=false, and a version records only its own inputs"
        )
    kept = labelled[complete.to_numpy()]
    rows = features[complete].assign(
        **{schema.label: kept["label"].map(schema.classes).astype(schema.label_dtype).to_numpy()}
    )
    requests = [
        (str(request_id), int(row), pd.Timestamp(received).isoformat())
        for request_id, row, received in zip(kept["request_id"], kept["row"], kept["received_at"], strict=True)
    ]
    return LabelledRows(rows[schema.columns].reset_index(drop=True), requests, len(labelled), lacking_features)


def _check_classes(labelled: pd.DataFrame, schema: TrainingSchema, window: str) -> None:
    unknown = labelled[~labelled["label"].isin(list(schema.classes))]
    if unknown.empty:
        return
    first = unknown.iloc[0]
    found = ", ".join(repr(label) for label in sorted(unknown["label"].unique())[:10])
    raise IngestError(
        f"{len(unknown)} of the {len(labelled)} labels of {window} are not classes of the training data "
        f"({', '.join(sorted(schema.classes))}"
        f"): {found}, e.g. request {first['request_id']!r} row {int(first['row'])}; the pipeline cannot train on a "
        "class its data does not have"
    )


def _lacking(counts: Mapping[str, int]) -> str:
    shown = [f"{name} in {count} rows" for name, count in list(counts.items())[:10]]
    return ", ".join(shown) + (f" and {len(counts) - 10} more features" if len(counts) > 10 else "")


def describe_window(since: datetime, until: datetime, version: int | None) -> str:
    answered = f" answered by v{version}" if version is not None else ""
    start, end = since.isoformat(timespec="seconds"), until.isoformat(timespec="seconds")
    return f"the requests received {start} to {end}{answered}"


def parse_moment(text: str, name: str, now: datetime) -> datetime:
    """An ISO 8601 time (UTC without an offset) or a span back from ``now`` (``90m``, ``24h``, ``7d``)."""
    value = text.strip()
    ago = AGO.match(value)
    if ago:
        return now - timedelta(**{AGO_UNITS[ago.group(2)]: int(ago.group(1))})
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise IngestError(
            f"{name} {text!r} is neither an ISO 8601 time (2026-12-04T12:00, UTC without an offset) nor a span back "
            "from now (90m, 24h, 7d)"
        ) from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def feedback_window(since: str | None, until: str | None, now: datetime | None = None) -> tuple[datetime, datetime]:
    """The window ``[since, until)`` of ``--since``/``--until`` (or the DAG's Params); ``until`` defaults to now."""
    now = now or datetime.now(UTC)
    if not since:
        raise IngestError("labelled requests are landed by window: give since, e.g. 24h or 2026-12-04T00:00")
    start = parse_moment(since, "since", now)
    end = parse_moment(until, "until", now) if until else now
    if start >= end:
        raise IngestError(f"since ({start.isoformat()}) must come before until ({end.isoformat()})")
    return start, end


def land_feedback(
    settings: Settings,
    since: datetime,
    until: datetime,
    *,
    version: int | None = None,
    file_format: str = "csv",
    run_key: str = "manual",
) -> dict[str, Any]:
    """Land the labelled requests of ``[since, until)`` (of one version or all) that have not landed before, as one
    batch in the configured folder source; returns what was landed.

    ``landed`` is False, with a ``reason``, when every labelled request of the window has landed already. A second
    call with the same ``run_key`` (a retried task) returns the batch the first one landed.
    """
    if target_kind(settings.data_source) != "folder":
        raise IngestError(
            f"labelled requests land in a folder source only; MLOPS_DATA_SOURCE is a SQL table "
            f"({data.describe_source(settings.data_source, settings.data_query)})"
        )
    if file_format not in FILE_FORMATS:
        raise IngestError(f"file format {file_format!r} is not one of {', '.join(FILE_FORMATS)}")
    target = FolderTarget(settings.data_source)
    since, horizon = _within_landing_horizon(settings, target, since, until)
    landed = [record for record in target.feedback_records() if target.holds(record)]
    earlier = next((r for r in landed if r.get("run_key") == run_key and run_key != "manual"), None)
    if earlier is not None:
        log.info("labelled requests batch %s was landed by an earlier try of %s", earlier["batch"], run_key)
        return {**_summary(earlier), "landed": True, "reason": "landed by an earlier try of this run"}
    schema = training_schema(settings.data_source, settings.label_column)
    found = labelled_training_rows(settings.data_store, schema, since, until, version)
    already = {tuple(request) for record in landed for request in record["requests"]}
    new = [index for index, request in enumerate(found.requests) if request not in already]
    window = {"since": since.isoformat(), "until": until.isoformat(), "version": version}
    outcome = {"labelled": found.labelled, "already_landed": len(found.requests) - len(new), "window": window}
    if found.lacking_features:
        outcome["lacking_features"] = found.lacking_features
        log.warning("left out labelled requests whose records lack features: %s", _lacking(found.lacking_features))
    if not new:
        reason = f"every labelled request of {describe_window(since, until, version)} has landed already"
        log.info("nothing to land: %s", reason)
        return {"landed": False, "reason": reason, "target": target.describe(), **outcome}
    frame = found.rows.iloc[new].reset_index(drop=True)
    requests = [found.requests[index] for index in new]
    now = datetime.now(UTC)
    keys = hashlib.sha256("\n".join(" ".join(map(str, request)) for request in requests).encode()).hexdigest()
    record = {
        "batch": f"{FEEDBACK_BATCH_PREFIX}{now:%Y%m%dT%H%M%SZ}-{keys[:12]}",
        "rows": len(frame),
        "digest": data.content_digest(frame),
        "landed_at": now.isoformat(timespec="seconds"),
        "run_key": run_key,
        **outcome,
        "requests": [list(request) for request in requests],
    }
    record["location"] = target.write_feedback(frame, record, file_format, horizon)
    log.info("landed %d labelled requests as %s at %s", len(frame), record["batch"], record["location"])
    return {**_summary(record), "landed": True, "target": target.describe()}


def _within_landing_horizon(
    settings: Settings, target: FolderTarget, since: datetime, until: datetime
) -> tuple[datetime, datetime]:
    """``since`` moved up to the landing horizon, and the horizon: requests received before it may have been forgotten
    by the manifest (``MLOPS_FEEDBACK_LANDING_DAYS``), so landing them could land them twice."""
    horizon = max(datetime.now(UTC) - timedelta(days=settings.feedback_landing_days), target.forgotten_before())
    if until <= horizon:
        raise IngestError(
            f"the window ends {until.isoformat(timespec='seconds')}, before {horizon.isoformat(timespec='seconds')}: "
            f"labelled requests land only from the last MLOPS_FEEDBACK_LANDING_DAYS "
            f"({settings.feedback_landing_days:g}) days, as the manifest of {target.describe()} forgets older ones"
        )
    if since < horizon:
        log.warning(
            "landing labelled requests from %s, not %s: older ones may have landed already and been forgotten "
            "(MLOPS_FEEDBACK_LANDING_DAYS=%g)",
            horizon.isoformat(timespec="seconds"),
            since.isoformat(timespec="seconds"),
            settings.feedback_landing_days,
        )
    return max(since, horizon), horizon


def _summary(record: Mapping[str, Any]) -> dict[str, Any]:
    """A feedback batch's record without the recorded rows it holds (they can be many; the manifest keeps them)."""
    return {key: value for key, value in record.items() if key != "requests"}


class FolderTarget:
    """A folder of batch files and the manifest that records them."""

    def __init__(self, uri: str) -> None:
        self.uri = uri.rstrip("/")
        self.fs, self.path = data.store_filesystem(self.uri)

    def describe(self) -> str:
        return self.uri

    def _document(self) -> dict[str, Any]:
        manifest = f"{self.path}/{MANIFEST}"
        if not self.fs.exists(manifest):
            return {"source": HELD_BACK_SOURCE, "batches": []}
        with self.fs.open(manifest, "r") as handle:
            document: dict[str, Any] = json.load(handle)
        return document

    def _manifest(self) -> list[dict[str, Any]]:
        batches: list[dict[str, Any]] = self._document().get("batches", [])
        return batches

    def forgotten_before(self) -> datetime:
        """The moment before which the manifest no longer says which recorded requests landed."""
        with self._reaching():
            moment = self._document().get("feedback_forgotten_before")
        return datetime.fromisoformat(moment) if moment else datetime.min.replace(tzinfo=UTC)

    def feedback_records(self) -> list[dict[str, Any]]:
        """The batches of labelled requests landed here, each with the recorded rows it holds (``requests``)."""
        with self._reaching():
            batches: list[dict[str, Any]] = self._document().get("feedback_batches", [])
        return batches

    @contextlib.contextmanager
    def _reaching(self) -> Iterator[None]:
        """The folder's failures as the data's: a bucket that does not exist or refused keys fail at once, a store that
        does not answer is retried (:func:`ml.data.store_failure`)."""
        try:
            yield
        except Exception as error:
            raise data.store_failure(self.fs, self.path, error, f"batch folder {mask_credentials(self.uri)}") from error

    def records(self) -> list[dict[str, Any]]:
        with self._reaching():
            recorded = self._manifest()
            numbers = {int(r["batch"]) for r in recorded}
            # Files copied in by hand (or landed before a crash) count as landed too.
            if self.fs.isdir(self.path):
                for entry in self.fs.ls(self.path, detail=False):
                    match = BATCH_FILE.match(str(entry).rstrip("/").rsplit("/", 1)[-1])
                    if match and int(match.group(1)) not in numbers:
                        location = self.fs.unstrip_protocol(str(entry))
                        recorded.append({"batch": int(match.group(1)), "location": location})
        return sorted(recorded, key=lambda r: int(r["batch"]))

    def holds(self, record: Mapping[str, Any]) -> bool:
        return bool(record.get("location")) and self.fs.exists(data.store_filesystem(record["location"])[1])

    def write(self, frame: pd.DataFrame, record: dict[str, Any], file_format: str) -> str:
        name = f"batch-{int(record['batch']):04d}.{file_format}"
        return self._land(frame, name, file_format, lambda location: self._record({**record, "location": location}))

    def write_feedback(self, frame: pd.DataFrame, record: dict[str, Any], file_format: str, forget: datetime) -> str:
        """Land a batch of labelled requests; the manifest forgets the requests received before ``forget``."""
        name = f"{record['batch']}.{file_format}"
        return self._land(
            frame, name, file_format, lambda location: self._record_feedback({**record, "location": location}, forget)
        )

    def _land(self, frame: pd.DataFrame, name: str, file_format: str, record: Callable[[str], None]) -> str:
        """Write the batch file whole or not at all (:func:`ml.data.write_whole`: straight to its key on an object
        store, a rename on a disk), recording it in the manifest once written and before it appears."""
        final = f"{self.path}/{name}"
        location = self.fs.unstrip_protocol(final)

        def write(handle: Any) -> None:
            if file_format == "csv":
                handle.write(frame.to_csv(index=False).encode())
            else:
                data.to_parquet(frame, handle)

        with self._reaching():
            data.write_whole(self.fs, final, write, lambda: record(location))
        return location

    def _record(self, record: dict[str, Any]) -> None:
        document = self._document()
        document["batches"] = [r for r in document.get("batches", []) if int(r["batch"]) != int(record["batch"])]
        document["batches"].append(record)
        self._save(document)

    def _record_feedback(self, record: dict[str, Any], forget: datetime) -> None:
        # An entry whose file is missing (a crash before the file appeared) is replaced: its requests land in this one.
        # Requests received before ``forget`` are dropped (and entries left with none), so the manifest holds the
        # landing horizon's requests only; land_feedback lands nothing older than feedback_forgotten_before.
        document = self._document()
        kept = [*(r for r in document.get("feedback_batches", []) if self.holds(r)), record]
        for entry in kept:
            entry["requests"] = [r for r in entry["requests"] if pd.Timestamp(r[2]) >= forget]
        document["feedback_batches"] = [r for r in kept if r["requests"] or r is record]
        previous = document.get("feedback_forgotten_before")
        forgotten = max(forget, datetime.fromisoformat(previous)) if previous else forget
        document["feedback_forgotten_before"] = forgotten.isoformat()
        self._save(document)

    def _save(self, document: dict[str, Any]) -> None:
        with self.fs.open(f"{self.path}/{MANIFEST}", "w") as handle:
            json.dump(document, handle, indent=2)


class SqlTarget:
    """A SQL table that batches are appended to, and its ledger table."""

    def __init__(self, settings: Settings) -> None:
        table = settings.data_query.strip().strip('"')
        if not table or re.search(r"\s", table):
            raise IngestError(
                "a SQL data source takes batches only when MLOPS_DATA_QUERY is a table name, "
                f"not {settings.data_query!r}"
            )
        self.url, self.table, self.ledger = settings.data_source, table, f"{table}{LEDGER_SUFFIX}"

    def describe(self) -> str:
        return f"{data.describe_source(self.url, self.table)}"

    def _engine(self) -> Any:
        import sqlalchemy

        return sqlalchemy.create_engine(self.url)

    def records(self) -> list[dict[str, Any]]:
        import sqlalchemy

        engine = self._engine()
        if not sqlalchemy.inspect(engine).has_table(self.ledger):
            return []
        with engine.connect() as connection:
            rows = pd.read_sql(sqlalchemy.text(f'SELECT * FROM "{self.ledger}" ORDER BY batch'), connection)
        # Through JSON, so that the records hold plain Python values (they travel in XCom).
        return [
            {**row, "batch": int(row["batch"]), "shift": json.loads(row.get("shift") or "{}")}
            for row in json.loads(rows.to_json(orient="records"))
        ]

    def holds(self, record: Mapping[str, Any]) -> bool:
        return True  # rows and ledger entry are committed together

    def write(self, frame: pd.DataFrame, record: dict[str, Any], file_format: str) -> str:
        location = f"{self.describe()} batch {record['batch']}"
        ledger_row = pd.DataFrame([{**record, "shift": json.dumps(record["shift"]), "location": location}])
        engine = self._engine()
        with engine.begin() as connection:
            frame.to_sql(self.table, connection, if_exists="append", index=False)
            ledger_row.to_sql(self.ledger, connection, if_exists="append", index=False)
        return location


def event_extra(result: Mapping[str, Any]) -> dict[str, Any]:
    """What the data asset's event of a landed batch says of it (the DAG's outlet and the command line's alike)."""
    keys = ("batch", "rows", "digest", "location", "shift", "landed_at", "window")
    return {key: result[key] for key in keys if key in result}


def announce(settings: Settings, result: dict[str, Any]) -> None:
    """Post the data asset's event of a batch landed from the command line, when the Airflow API is configured; a
    failure is reported (the batch stays landed: the pipeline's schedule picks it up) and kept in ``result``."""
    from ml import asset_events
    from ml.assets import training_data_uri

    if not result["landed"] or not asset_events.configured(settings):
        return
    try:
        event = asset_events.post_asset_event(settings, training_data_uri(settings), event_extra(result))
    except asset_events.AssetEventError as error:
        log.warning("landed, but no asset event was sent, so mlops_pipeline waits for its schedule: %s", error)
        result["asset_event_error"] = str(error)
        return
    result["asset_event"] = event


def main(argv: Sequence[str] | None = None, prog: str = "python -m ml.ingest") -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Land a batch of the held-back breast cancer data in MLOPS_DATA_SOURCE (a folder or SQL table), "
        "or, with --from-feedback, the requests the model server recorded that received a true label on "
        "POST /feedback (a folder only). With MLOPS_AIRFLOW_API_URL (and MLOPS_AIRFLOW_API_USERNAME, "
        "MLOPS_AIRFLOW_API_PASSWORD) set, a landed batch is posted as an event of the data asset to Airflow's REST "
        "API, which starts mlops_pipeline as the mlops_ingest DAG does; without them the pipeline's schedule picks "
        "it up.",
    )
    parser.add_argument("--initial", action="store_true", help="land batch 0, the initial bulk")
    parser.add_argument("--batch", type=int, help="the batch to land (default: the next one)")
    parser.add_argument("--shift", default="", help='JSON, e.g. \'{"mean radius": 1.5, "*": {"offset": 0.1}}\'')
    parser.add_argument("--format", default="csv", choices=FILE_FORMATS, help="file format in a folder source")
    parser.add_argument("--list", action="store_true", help="list the batches landed so far")
    labelled = parser.add_argument_group("labelled live requests")
    labelled.add_argument(
        "--from-feedback",
        action="store_true",
        help="land the recorded requests of a window that received a label, those not landed before",
    )
    labelled.add_argument("--since", help="start of the window: an ISO time (UTC without offset) or 90m, 24h, 7d ago")
    labelled.add_argument("--until", help="end of the window (default: now), as --since")
    labelled.add_argument("--version", type=int, help="only the requests this model version answered")
    args = parser.parse_args(argv)
    held_back = args.initial or args.batch is not None or args.shift
    if args.from_feedback and (held_back or args.list):
        parser.error("--from-feedback lands labelled requests; --initial, --batch, --shift, --list do not go with it")
    if not args.from_feedback and (args.since or args.until or args.version is not None):
        parser.error("--since, --until and --version choose labelled requests: use them with --from-feedback")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        settings = Settings.from_env()
        object_store.use_for_this_process(settings)
        if args.list:
            kind = target_kind(settings.data_source)
            target = FolderTarget(settings.data_source) if kind == "folder" else SqlTarget(settings)
            for record in target.records():
                print(json.dumps(record, sort_keys=True))
            if isinstance(target, FolderTarget):
                for record in target.feedback_records():
                    print(json.dumps(_summary(record), sort_keys=True))
            return 0
        if args.from_feedback:
            since, until = feedback_window(args.since, args.until)
            result = land_feedback(settings, since, until, version=args.version, file_format=args.format)
        else:
            batch = 0 if args.initial else args.batch
            result = land(settings, batch=batch, shift=args.shift, file_format=args.format)
        announce(settings, result)
    except (ConfigurationError, data.DataSourceError, data.DataValidationError) as error:
        print(f"ingest refused: {error}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2, sort_keys=True))
    # Seeding twice, or landing a window whose labelled requests are in already, is harmless.
    return 0 if result["landed"] or args.initial or args.from_feedback else 1


if __name__ == "__main__":
    sys.exit(main())
