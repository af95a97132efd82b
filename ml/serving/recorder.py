"""Records the requests the model server answers, off the request path, and remembers their ids for ``/feedback``.

On the request path a sampled answer costs one append to a bounded queue (a deque: appending takes no lock and wakes
no thread). A background thread writes the queue as Parquet (:mod:`ml.records`) every ``MLOPS_RECORDING_FLUSH_SECONDS``
or as soon as ``MLOPS_RECORDING_BATCH_SIZE`` requests wait, and once more when the server stops. Recording never holds
up or fails a request: an answer that finds the queue full (``MLOPS_RECORDING_QUEUE_SIZE`` requests), and a batch the
data store refuses, are dropped, counted by reason on ``/metrics`` and ``/health``, and logged at most once a minute.

Counts are of records, one per scored input row. Each counter is written by one thread only (the event loop's or
the writer's), so they need no lock.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pandas as pd

from ml import records
from ml.redaction import mask_credentials
from ml.serving.loader import LoadedModel
from ml.serving.window_events import WindowEvents
from ml.settings import Settings

log = logging.getLogger(__name__)

# Ids of the latest answered requests kept in memory for /feedback: about 200 bytes each, 20 MB in all.
RECENT_REQUESTS = 100_000
DROP_LOG_INTERVAL_SECONDS = 60.0
QUEUE_FULL, STORE_ERROR = "queue_full", "store_error"


@dataclass(frozen=True)
class RecordedRequest:
    """What ``/feedback`` needs to know of a recorded request."""

    version: int
    rows: int


class Recorder:
    def __init__(self, settings: Settings) -> None:
        self.enabled = settings.recording
        self.sample_rate = settings.recording_sample_rate
        self.with_features = settings.recording_features
        self.queue_size = settings.recording_queue_size
        self.batch_size = settings.recording_batch_size
        self.flush_seconds = settings.recording_flush_seconds
        self.feedback_window = timedelta(hours=settings.feedback_window_hours)
        self.data_store = settings.data_store
        self.recorded = 0
        self.dropped_queue_full = 0
        self.flushed = 0
        self.dropped_store_error = 0
        self.batches = 0
        self.labels = 0
        self.last_error: str | None = None
        self.window_events = WindowEvents(settings)
        self._pending: deque[records.Answered] = deque()
        self._recent: OrderedDict[str, RecordedRequest] = OrderedDict()
        self._recent_lock = threading.Lock()
        self._lookup_lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._logged_drops = 0
        self._logged_at = -DROP_LOG_INTERVAL_SECONDS

    def start(self) -> None:
        if self.enabled:
            self._thread = threading.Thread(target=self._run, name="request-recorder", daemon=True)
            self._thread.start()
            self.window_events.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Write what waits, then stop the writer."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self.window_events.stop()

    def offer(
        self, request_id: str, received_at: float, model: LoadedModel, frame: pd.DataFrame, answers: list
    ) -> None:
        """Queue an answered request, if it is sampled and there is room; never blocks, never raises."""
        if not self.enabled or (self.sample_rate < 1.0 and random.random() >= self.sample_rate):
            return
        if len(self._pending) >= self.queue_size:
            self.dropped_queue_full += len(answers)
            return
        features = frame if self.with_features else None
        self._pending.append(records.Answered(request_id, received_at, model.name, model.version, answers, features))
        self.recorded += len(answers)
        with self._recent_lock:
            self._recent[request_id] = RecordedRequest(model.version, len(answers))
            self._recent.move_to_end(request_id)
            if len(self._recent) > RECENT_REQUESTS:
                self._recent.popitem(last=False)
        if len(self._pending) >= self.batch_size:
            self._wake.set()

    def recent(self, request_ids: Iterable[str]) -> dict[str, RecordedRequest]:
        """The requests among ``request_ids`` recorded lately, from memory."""
        with self._recent_lock:
            return {request_id: found for request_id in request_ids if (found := self._recent.get(request_id))}

    def stored(self, request_ids: Iterable[str]) -> dict[str, RecordedRequest]:
        """The requests among ``request_ids`` whose records the data store holds from the feedback window (slow:
        it reads the window's record files; call it off the event loop). One look at a time: many clients sending
        unknown ids at once wait in turn rather than read the store side by side."""
        wanted = set(request_ids)
        if not wanted or not self.feedback_window:
            return {}
        with self._lookup_lock:
            now = datetime.now(UTC)
            found = records.read_records(
                self.data_store,
                now - self.feedback_window,
                now + timedelta(minutes=1),
                columns=["request_id", "row", "version"],
            )
        found = found[found["request_id"].isin(wanted)]
        latest = found.groupby("request_id").agg(version=("version", "last"), rows=("row", "max"))
        return {str(key): RecordedRequest(int(row.version), int(row.rows) + 1) for key, row in latest.iterrows()}

    def pending(self) -> int:
        return len(self._pending)

    def status(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "sample_rate": self.sample_rate,
            "features": self.with_features,
            "recorded": self.recorded,
            "flushed": self.flushed,
            "pending_requests": self.pending(),
            "dropped": {QUEUE_FULL: self.dropped_queue_full, STORE_ERROR: self.dropped_store_error},
            "labels": self.labels,
            "last_error": self.last_error,
            "window_events": {
                "enabled": self.window_events.enabled,
                "sent": self.window_events.sent,
                "failed": self.window_events.failed,
                "last_error": self.window_events.last_error,
            },
        }

    def _run(self) -> None:
        while True:
            self._wake.wait(self.flush_seconds)
            self._wake.clear()
            stopping = self._stopping.is_set()
            while self._pending:
                self._write([self._pending.popleft() for _ in range(min(self.batch_size, len(self._pending)))])
                if not stopping and len(self._pending) < self.batch_size:
                    break
            self._log_drops()
            if stopping:
                return

    def _write(self, batch: Sequence[records.Answered]) -> None:
        rows = sum(len(item.predictions) for item in batch)
        try:
            written = records.write_records(self.data_store, batch, self.with_features)
        except Exception as error:  # a store that is down, full or not writable: the records are lost, and counted
            self.dropped_store_error += rows
            self.last_error = mask_credentials(f"{type(error).__name__}: {error}")
            with self._recent_lock:
                for item in batch:
                    self._recent.pop(item.request_id, None)
            return
        self.flushed += rows
        self.batches += len(written)
        self.window_events.written(item.received_at for item in batch)

    def _log_drops(self) -> None:
        dropped = self.dropped_queue_full + self.dropped_store_error
        now = time.monotonic()
        if dropped == self._logged_drops or now - self._logged_at < DROP_LOG_INTERVAL_SECONDS:
            return
        log.warning(
            "dropped %d records since the last report (%d in all: %d with the queue full, %d the data store refused%s)",
            dropped - self._logged_drops,
            dropped,
            self.dropped_queue_full,
            self.dropped_store_error,
            f"; last store error: {self.last_error}" if self.last_error else "",
        )
        self._logged_drops, self._logged_at = dropped, now
