"""Request counters and a latency histogram, rendered in the Prometheus text exposition format.

Only the event loop's thread records requests, so the counters need no lock; the follower's figures are read from
its status snapshot when the page is rendered.
"""

from __future__ import annotations

import bisect
from collections import Counter

from ml.serving.follower import FollowerStatus
from ml.serving.loader import LoadedModel

PREFIX = "mlops_serving"
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ServingMetrics:
    def __init__(self) -> None:
        self.requests: Counter[tuple[str, int]] = Counter()
        self.errors: Counter[tuple[str, str]] = Counter()
        self.latency_counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0

    def record(self, path: str, status: int, error_code: str | None, seconds: float) -> None:
        self.requests[path, status] += 1
        if error_code is not None:
            self.errors[path, error_code] += 1
        if path == "/invocations":
            self.latency_counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
            self.latency_sum += seconds

    def render(self, model: LoadedModel | None, status: FollowerStatus) -> str:
        lines = [
            *_family("requests_total", "counter", "HTTP requests by path and status code."),
            *(
                f'{PREFIX}_requests_total{{path="{path}",code="{code}"}} {count}'
                for (path, code), count in sorted(self.requests.items())
            ),
            *_family("errors_total", "counter", "Requests answered with an error, by path and error code."),
            *(
                f'{PREFIX}_errors_total{{path="{path}",error_code="{code}"}} {count}'
                for (path, code), count in sorted(self.errors.items())
            ),
            *_family("invocation_seconds", "histogram", "Time to answer /invocations, from request to response."),
            *self._latency_lines(),
            *_family("model_version", "gauge", "The registered model version answering requests; 0 before any."),
            f'{PREFIX}_model_version{{name="{_escape(model.name) if model else ""}"}} {model.version if model else 0}',
            *_family("production_version", "gauge", "The version the production alias pointed at when last read."),
            f"{PREFIX}_production_version {status.production_version or 0}",
            *_family("model_swaps_total", "counter", "Times a new version was swapped in."),
            f"{PREFIX}_model_swaps_total {status.swaps}",
            *_family("model_load_failures_total", "counter", "Versions that failed to load or warm."),
            f"{PREFIX}_model_load_failures_total {status.load_failures}",
            *_family("registry_up", "gauge", "1 if the registry answered the last poll, else 0."),
            f"{PREFIX}_registry_up {int(status.polled and status.registry_error is None)}",
        ]
        return "\n".join(lines) + "\n"

    def _latency_lines(self) -> list[str]:
        name = f"{PREFIX}_invocation_seconds"
        lines, cumulative = [], 0
        for bound, count in zip((*LATENCY_BUCKETS, float("inf")), self.latency_counts, strict=True):
            cumulative += count
            label = "+Inf" if bound == float("inf") else repr(bound)
            lines.append(f'{name}_bucket{{le="{label}"}} {cumulative}')
        lines.append(f"{name}_sum {self.latency_sum:.6f}")
        lines.append(f"{name}_count {cumulative}")
        return lines


def _family(name: str, kind: str, help_text: str) -> list[str]:
    return [f"# HELP {PREFIX}_{name} {help_text}", f"# TYPE {PREFIX}_{name} {kind}"]


def _escape(label_value: str) -> str:
    return label_value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
