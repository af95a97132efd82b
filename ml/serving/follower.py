"""Follow the Production alias: poll the registry, load a new version in the background, swap it in atomically.

The current model is one reference to an immutable :class:`~ml.serving.loader.LoadedModel`. The follower thread
replaces it with a single assignment; request handlers read it once per request. A version that fails to load is
not swapped in and is retried with exponential backoff; a registry that does not answer leaves the current model
serving. The version served just before the current one is kept loaded, so that a rollback swaps back at once.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ml import registry
from ml.redaction import mask_credentials
from ml.registry import HistoryEvent, VersionInfo, utc_now
from ml.serving.loader import LoadedModel, load_version
from ml.settings import Settings

log = logging.getLogger(__name__)

MAX_BACKOFF_SECONDS = 300.0
REASON_WAIT_SECONDS = 1.0


@dataclass(frozen=True)
class FollowerStatus:
    """What the follower last learned; replaced as a whole, so readers on other threads see a consistent snapshot."""

    polled: bool = False
    production_version: int | None = None
    registry_error: str | None = None
    registry_answered_at: str | None = None
    failed_version: int | None = None
    load_error: str | None = None
    swaps: int = 0
    load_failures: int = 0


@dataclass(frozen=True)
class _Failure:
    attempts: int
    retry_at: float


class ProductionFollower:
    def __init__(self, settings: Settings, poll_interval: float, download_root: Path) -> None:
        self.name = settings.model_name
        self.alias = settings.production_alias
        self.poll_interval = poll_interval
        self.current: LoadedModel | None = None
        self.status = FollowerStatus()
        self._client = registry.client_for(settings)
        self._download_root = download_root
        self._previous: LoadedModel | None = None
        self._failures: dict[int, _Failure] = {}
        self._stopping = threading.Event()
        self._woken = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="production-follower", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._woken.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def wake(self) -> None:
        """Read the registry now rather than at the next poll (the registry said the alias moved)."""
        self._woken.set()

    def poll_once(self) -> None:
        try:
            target = registry.production_version(self._client, self.name, self.alias)
        except Exception as error:  # whatever the registry's client raises, the server keeps serving
            self._registry_failed(error)
            return
        if self.status.registry_error is not None:
            log.info("the registry answers again")
        self._update(
            polled=True,
            production_version=target.version if target else None,
            registry_error=None,
            registry_answered_at=utc_now(),
        )
        if target is None or self._is_current(target.version) or self._backing_off(target.version):
            return
        self._switch_to(target)

    def health(self) -> dict[str, Any]:
        model, status = self.current, self.status
        problems = self._problems(model, status)
        if model is None:
            state = "unavailable"
        elif problems:
            state = "degraded"
        elif status.production_version != model.version:
            state = "loading"
        else:
            state = "ok"
        return {
            "status": state,
            "model": model.describe() if model else None,
            "production_version": status.production_version,
            "registry": {
                "reachable": status.registry_error is None if status.polled else None,
                "last_error": status.registry_error,
                "last_answer_at": status.registry_answered_at,
            },
            "failed_version": status.failed_version,
            "last_error": problems[-1] if problems else None,
        }

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self.poll_once()
            except Exception:  # the thread must outlive a bug in one poll, or the server would stop following
                log.exception("polling the %r alias failed", self.alias)
            self._woken.wait(self.poll_interval)
            self._woken.clear()

    def _switch_to(self, target: VersionInfo) -> None:
        previous = self.current
        if self._previous is not None and self._previous.version == target.version:
            model = replace(self._previous, loaded_at=utc_now())
        else:
            loaded = self._load(target)
            if loaded is None or not self._still_production(target.version):
                return
            model = loaded
        self._previous, self.current = previous, model
        self._failures.pop(target.version, None)
        self._update(failed_version=None, load_error=None, swaps=self.status.swaps + 1)
        log.info(
            "swapped %s from version %s to version %s: %s",
            self.name,
            previous.version if previous else "none",
            model.version,
            self._why(target.version, previous),
        )

    def _load(self, target: VersionInfo) -> LoadedModel | None:
        log.info("loading %s version %s", self.name, target.version)
        started = time.monotonic()
        try:
            model = load_version(self.name, self.alias, target, self._download_root)
        except Exception as error:  # a broken version must never take the server down
            self._load_failed(target.version, error)
            return None
        log.info("loaded %s version %s in %.2f s", self.name, target.version, time.monotonic() - started)
        return model

    def _still_production(self, version: int) -> bool:
        """Whether the alias still points at ``version`` after a load that took time; a rollback may have won."""
        try:
            now = registry.production_version(self._client, self.name, self.alias)
        except Exception:  # unknown: keep the decision taken on the registry's last answer
            return True
        if now is not None and now.version == version:
            return True
        log.info("the %r alias left version %s while it loaded; not swapping it in", self.alias, version)
        return False

    def _why(self, version: int, previous: LoadedModel | None) -> str:
        if previous is None:
            return f"first model: the {self.alias!r} alias points at it"
        # The pipeline moves the alias first and records why just after, so the record may lag the move a little.
        deadline = time.monotonic() + REASON_WAIT_SECONDS
        while True:
            try:
                event = self._deployment_event(version, since=previous.loaded_at)
            except Exception as error:  # the reason only decorates the log line
                return f"the {self.alias!r} alias points at it (deployment history unreadable: {error})"
            if event is not None:
                return f"{event.event} by {event.actor} at {event.at}: {event.reason}"
            if time.monotonic() >= deadline or self._stopping.wait(0.2):
                return f"the {self.alias!r} alias was moved without a deployment record"

    def _deployment_event(self, version: int, since: str) -> HistoryEvent | None:
        """The latest recorded move of Production to ``version`` since the previous swap."""
        for event in reversed(registry.deployment_history(self._client, self.name)):
            if event.at < since:
                return None
            restored = event.event == "rolled_back" and event.previous_version == version
            if restored or (event.event != "rolled_back" and event.version == version):
                return event
        return None

    def _is_current(self, version: int) -> bool:
        return self.current is not None and self.current.version == version

    def _backing_off(self, version: int) -> bool:
        failure = self._failures.get(version)
        return failure is not None and time.monotonic() < failure.retry_at

    def _load_failed(self, version: int, error: Exception) -> None:
        attempts = self._failures[version].attempts + 1 if version in self._failures else 1
        delay = min(MAX_BACKOFF_SECONDS, max(self.poll_interval, 1.0) * 2**attempts)
        self._failures[version] = _Failure(attempts, time.monotonic() + delay)
        message = mask_credentials(
            f"version {version} failed to load ({type(error).__name__}: {error}); next attempt in {delay:.0f} s"
        )
        log.error("%s: %s; still serving version %s", self.name, message, self._served_version())
        self._update(failed_version=version, load_error=message, load_failures=self.status.load_failures + 1)

    def _registry_failed(self, error: Exception) -> None:
        message = mask_credentials(f"{type(error).__name__}: {error}")
        if self.status.registry_error is None:
            log.warning("the registry does not answer (%s); still serving version %s", message, self._served_version())
        self._update(polled=True, registry_error=message)

    def _served_version(self) -> int | str:
        return self.current.version if self.current else "none"

    def _problems(self, model: LoadedModel | None, status: FollowerStatus) -> list[str]:
        problems = []
        if not status.polled:
            problems.append("the registry has not answered yet")
        if status.registry_error is not None:
            problems.append(f"the registry is unreachable: {status.registry_error}")
        elif status.polled and status.production_version is None:
            problems.append(f"{self.name!r} has no version with the {self.alias!r} alias")
        if status.failed_version is not None and status.failed_version == status.production_version:
            problems.append(status.load_error or f"version {status.failed_version} failed to load")
        return problems

    def _update(self, **changes: Any) -> None:
        self.status = replace(self.status, **changes)
