"""The model server's metrics, in the Prometheus text format, with Prometheus' Python client.

Requests, errors, latency and predicted classes are counted as requests are answered; the follower's and the
recorder's figures are read from them when the page is scraped. Each server has its own registry, so that two servers
in one process (tests) never share a count. Only the event loop's thread counts requests.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.registry import Collector

from ml.records import label_text
from ml.serving.follower import ProductionFollower
from ml.serving.recorder import QUEUE_FULL, STORE_ERROR, Recorder

PREFIX = "mlops_serving"
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# The classic text format, which every Prometheus server reads.
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
# A counter's start time as its own series (``_created``) doubles the page for a figure Prometheus does not need: a
# restart shows in the counters themselves.
disable_created_metrics()


class ServingMetrics:
    def __init__(self, follower: ProductionFollower, recorder: Recorder) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            f"{PREFIX}_requests",
            "HTTP requests by path, status code and the model version that answered ('none' before any).",
            ["path", "code", "version"],
            registry=self.registry,
        )
        self.errors = Counter(
            f"{PREFIX}_errors",
            "Requests answered with an error, by path, error code and model version.",
            ["path", "error_code", "version"],
            registry=self.registry,
        )
        self.latency = Histogram(
            f"{PREFIX}_invocation_seconds",
            "Time to answer /invocations, from request to response.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.predictions = Counter(
            f"{PREFIX}_predictions",
            "Rows predicted, by model version and predicted class (classifiers).",
            ["version", "class"],
            registry=self.registry,
        )
        self.registry.register(_StateCollector(follower, recorder))
        self._children: dict[tuple[Any, ...], Any] = {}

    def record(self, path: str, status: int, error_code: str | None, version: str, seconds: float) -> None:
        self._child(self.requests, path, str(status), version).inc()
        if error_code is not None:
            self._child(self.errors, path, error_code, version).inc()
        if path == "/invocations":
            self.latency.observe(seconds)

    def count_predictions(self, version: int, answers: list[Any]) -> None:
        for value, count in Tally(map(label_text, answers)).items():
            self._child(self.predictions, str(version), value).inc(count)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def _child(self, family: Counter, *labels: str) -> Any:
        """A labelled counter, kept: ``labels()`` takes a lock and builds a key on every call."""
        key = (family._name, *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = family.labels(*labels)
        return child


class _StateCollector(Collector):
    """The follower's and the recorder's figures, read at each scrape."""

    def __init__(self, follower: ProductionFollower, recorder: Recorder) -> None:
        self.follower = follower
        self.recorder = recorder

    def collect(self) -> Iterator[Metric]:
        model, status, recorder = self.follower.current, self.follower.status, self.recorder
        version = GaugeMetricFamily(
            f"{PREFIX}_model_version", "The registered model version answering requests; 0 before any.", labels=["name"]
        )
        version.add_metric([model.name if model else ""], model.version if model else 0)
        yield version
        yield GaugeMetricFamily(
            f"{PREFIX}_production_version",
            "The version the production alias pointed at when last read.",
            value=status.production_version or 0,
        )
        yield CounterMetricFamily(f"{PREFIX}_model_swaps", "Times a new version was swapped in.", value=status.swaps)
        yield CounterMetricFamily(
            f"{PREFIX}_model_load_failures", "Versions that failed to load or warm.", value=status.load_failures
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_registry_up",
            "1 if the registry answered the last poll, else 0.",
            value=int(status.polled and status.registry_error is None),
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_recording_enabled", "1 if answered requests are recorded, else 0.", value=int(recorder.enabled)
        )
        yield CounterMetricFamily(
            f"{PREFIX}_records_recorded", "Records (scored rows) queued to be written.", value=recorder.recorded
        )
        yield CounterMetricFamily(
            f"{PREFIX}_records_flushed", "Records written to the data store.", value=recorder.flushed
        )
        dropped = CounterMetricFamily(
            f"{PREFIX}_records_dropped",
            "Records lost: the queue was full (queue_full) or the data store refused the batch (store_error).",
            labels=["reason"],
        )
        dropped.add_metric([QUEUE_FULL], recorder.dropped_queue_full)
        dropped.add_metric([STORE_ERROR], recorder.dropped_store_error)
        yield dropped
        yield CounterMetricFamily(
            f"{PREFIX}_record_batches_written", "Parquet files of records written.", value=recorder.batches
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_recording_pending_requests", "Answered requests waiting to be written.", value=recorder.pending()
        )
        events = CounterMetricFamily(
            f"{PREFIX}_window_events",
            "Events of the recorded-traffic asset for completed windows, posted to Airflow (sent) or not (failed).",
            labels=["outcome"],
        )
        events.add_metric(["sent"], recorder.window_events.sent)
        events.add_metric(["failed"], recorder.window_events.failed)
        yield events
        yield CounterMetricFamily(
            f"{PREFIX}_feedback_labels", "True labels received on /feedback and written.", value=recorder.labels
        )
