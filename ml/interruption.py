"""Stopping ``mlops run`` cleanly: a signal fails the running task without retry, and rollback_model still runs.

``mlops run`` executes the DAG run in its own process through ``dag.test()``. Python's default for SIGINT raises
KeyboardInterrupt wherever the process is, which Airflow counts as an ordinary task failure and retries. Instead, the
first SIGINT raises an ``AirflowFailException`` in the running task (no retry), so the tasks downstream are
upstream-failed and rollback_model (``trigger_rule="all_done"``) restores Production as the invariant demands. A
signal that arrives between tasks is remembered and fails the next task as it starts. rollback_model itself is never
interrupted; further signals are ignored while the run winds down.
"""

from __future__ import annotations

import logging
import signal
from typing import Any

log = logging.getLogger(__name__)

UNINTERRUPTED_STEPS = frozenset({"rollback_model"})

_requested: list[int] = []


def install() -> None:
    """Handle SIGINT in this process (the one that runs the tasks)."""
    signal.signal(signal.SIGINT, _on_signal)


def requested() -> int | None:
    """The signal that asked the run to stop, if one did."""
    return _requested[0] if _requested else None


def raise_if_requested(step: str) -> None:
    """Called as a step starts: after a stop was asked for, only rollback_model may still run."""
    if _requested and step not in UNINTERRUPTED_STEPS:
        raise _stop_error(step, _requested[0])


def _on_signal(signum: int, frame: Any) -> None:
    if _requested:
        log.warning("%s received again; the run is already stopping", signal.Signals(signum).name)
        return
    _requested.append(signum)
    step = _running_task()
    if step is None or step in UNINTERRUPTED_STEPS:
        log.warning("%s received: the run stops before its next task", signal.Signals(signum).name)
        return
    raise _stop_error(step, signum)


def _running_task() -> str | None:
    from airflow.sdk import get_current_context

    try:
        context = get_current_context()
    except RuntimeError:
        return None
    return getattr(context.get("ti"), "task_id", None)


def _stop_error(step: str, signum: int) -> Exception:
    from airflow.sdk.exceptions import AirflowFailException

    return AirflowFailException(f"{step} stopped by {signal.Signals(signum).name}; not retried, rollback_model runs")
