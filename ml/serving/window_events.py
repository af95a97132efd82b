"""Tells Airflow that a window of recorded traffic is complete, so that mlops_monitor judges it at once rather than at
its next scheduled run.

The recorder's writer calls :meth:`WindowEvents.written` after each batch it wrote. When a batch holds a request of a
later monitoring window (``MLOPS_MONITOR_WINDOW_MINUTES``, :func:`ml.records.monitoring_window`) than any written
before, the earlier window is complete (batches are written in the order requests were answered), and one event of
the recorded-traffic asset is posted for it, its end in the event's extra as ``window_end``: the run the event starts
judges that window, not the one just begun. A thread of its own posts the events (:mod:`ml.asset_events`), so a slow
or absent Airflow never holds up the writer; an event that fails is counted, and logged once per failure reason.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterable
from datetime import UTC, datetime

from ml import asset_events, records
from ml.assets import recorded_traffic_uri
from ml.settings import Settings

log = logging.getLogger(__name__)

# Windows waiting to be posted; past it (Airflow down for that many windows) an event is dropped and counted failed.
PENDING_WINDOWS = 8


class WindowEvents:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.enabled = asset_events.configured(settings)
        self.uri = recorded_traffic_uri(settings) if self.enabled else ""
        self.minutes = settings.monitor_window_minutes
        self.sent = 0
        self.failed = 0
        self.last_error: str | None = None
        self._latest_end: datetime | None = None
        self._windows: queue.Queue[datetime | None] = queue.Queue(PENDING_WINDOWS)
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.enabled:
            self._thread = threading.Thread(target=self._run, name="window-events", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        if self._thread is not None:
            self._put(None)
            self._thread.join(timeout)

    def written(self, received_at: Iterable[float]) -> None:
        """Note a written batch (its requests' receive times, seconds since the epoch); never blocks, never raises."""
        if not self.enabled:
            return
        latest = max(received_at, default=None)
        if latest is None:
            return
        end = records.monitoring_window(datetime.fromtimestamp(latest, UTC), self.minutes)[1]
        if self._latest_end is not None and end > self._latest_end:
            self._put(self._latest_end)
        if self._latest_end is None or end > self._latest_end:
            self._latest_end = end

    def _put(self, end: datetime | None) -> None:
        try:
            self._windows.put_nowait(end)
        except queue.Full:
            self._failed(f"{PENDING_WINDOWS} windows already wait to be posted")

    def _run(self) -> None:
        while (end := self._windows.get()) is not None:
            extra = {"window_end": end.isoformat(), "window_minutes": self.minutes, "by": "model server"}
            try:
                asset_events.post_asset_event(self.settings, self.uri, extra)
            except asset_events.AssetEventError as error:
                self._failed(str(error))
                continue
            self.sent += 1
            self.last_error = None

    def _failed(self, reason: str) -> None:
        self.failed += 1
        if reason != self.last_error:
            log.warning(
                "could not tell Airflow that a window of recorded traffic is complete (mlops_monitor judges it at its "
                "next scheduled run): %s",
                reason,
            )
        self.last_error = reason
