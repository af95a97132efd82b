"""Task log files and a quiet terminal for the tasks ``dag.test()`` runs in this process (``mlops run``, the tests).

Imported by :mod:`ml.airflow_runner` only: it imports Airflow, which the registry commands and the model server do not.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from airflow.listeners import hookimpl

from ml.redaction import mask_credentials, one_line


@dataclass(frozen=True)
class FailedTry:
    """One failed try of a task: the reason, in one masked line."""

    task_id: str
    try_number: int
    reason: str
    log: Path


class TaskLogRouter:
    """While ``dag.test()`` runs tasks in this process: each task's log goes to its log file, the terminal gets a line.

    ``dag.test()`` writes every task's log lines to the terminal, tracebacks whole, and no task log file. With the
    router, the lines a task logs while it runs are written, credentials masked, to the file Airflow's own task
    supervisor would write (``[logging] base_log_folder`` / ``log_filename_template``, JSON lines, a traceback as
    ``error_detail``), where ``airflow standalone``'s UI shows them; the terminal keeps them but a traceback, which
    becomes one line naming the exception and the file. Each failed try is kept in :attr:`failed_tries`, so that a
    summary can say why a task failed or was retried.

    An Airflow listener (the Task SDK calls it around each task) says which task is running; a structlog processor
    handles Airflow's own lines, a logging filter the standard library's (the project's, MLflow's).
    """

    FAILED_EVENT = "Task failed with exception"

    def __init__(self, base_folder: Path, filename_template: str) -> None:
        self.base_folder = base_folder
        self.filename_template = filename_template
        self.failed_tries: list[FailedTry] = []
        self._task: Any = None
        self._file: TextIO | None = None
        self._path: Path | None = None

    def path_of(self, task_instance: Any) -> Path:
        import jinja2

        relative = jinja2.Template(self.filename_template).render(ti=task_instance, try_number=task_instance.try_number)
        return self.base_folder / relative

    @hookimpl
    def on_task_instance_running(self, previous_state: Any, task_instance: Any) -> None:
        self._close()
        self._task, self._path = task_instance, self.path_of(task_instance)
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self._path.open("a", encoding="utf-8")

    @hookimpl
    def on_task_instance_success(self, previous_state: Any, task_instance: Any) -> None:
        self._close()

    @hookimpl
    def on_task_instance_skipped(self, previous_state: Any, task_instance: Any) -> None:
        self._close()

    @hookimpl
    def on_task_instance_failed(self, previous_state: Any, task_instance: Any, error: Any) -> None:
        self._close()

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._task = self._file = None

    def _write(self, entry: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(mask_credentials(json.dumps(entry, default=str)) + "\n")
            self._file.flush()

    def _terminal_line(self, event: str, error: BaseException | None) -> str:
        """What the terminal shows of a line with a traceback: the line and the exception, and where the rest is."""
        if error is None:
            return mask_credentials(event)
        reason = one_line(error)
        if event == self.FAILED_EVENT and self._task is not None and self._path is not None:
            self.failed_tries.append(FailedTry(self._task.task_id, self._task.try_number, reason, self._path))
            event = f"{self._task.task_id} failed on try {self._task.try_number}"
        where = f" (traceback in {self._path})" if self._file is not None else ""
        return f"{mask_credentials(event)}: {reason}{where}"

    def __call__(self, logger: Any, method_name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        """The structlog processor: placed before the renderer, it sees Airflow's lines with their tracebacks."""
        import structlog

        error = _exception_of(event_dict.pop("exc_info", None))
        if self._file is not None:
            entry = {key: value for key, value in event_dict.items() if not key.startswith("_")}
            if error is not None:
                transform = structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
                entry["error_detail"] = transform((type(error), error, error.__traceback__))
            self._write(entry)
        shown = {key: mask_credentials(value) if isinstance(value, str) else value for key, value in event_dict.items()}
        shown["event"] = self._terminal_line(str(event_dict.get("event", "")), error)
        return shown

    def filter(self, record: logging.LogRecord) -> bool:
        """The logging filter, on each handler of the root logger: the same for the standard library's records."""
        if self._file is not None and not getattr(record, "_mlops_task_log", False):
            record._mlops_task_log = True
            entry = {"timestamp": record.created, "level": record.levelname.lower(), "logger": record.name}
            entry["event"] = record.getMessage()
            if record.exc_info:
                entry["error_detail"] = logging.Formatter().formatException(record.exc_info)
            self._write(entry)
        error = record.exc_info[1] if record.exc_info else None
        record.msg, record.args = self._terminal_line(record.getMessage(), error), None
        record.exc_info = record.exc_text = None
        return True

    @contextlib.contextmanager
    def routing(self) -> Iterator[TaskLogRouter]:
        """Route while the block runs: the listener registered, the processor and the filters in place."""
        import structlog
        from airflow.sdk.listener import get_listener_manager

        manager = get_listener_manager()
        manager.add_listener(self)
        # The chain's list itself: loggers already made hold it, and see the router too.
        processors = structlog.get_config()["processors"]
        processors.insert(len(processors) - 1, self)
        handlers = list(logging.getLogger().handlers)
        for handler in handlers:
            handler.addFilter(self)
        try:
            yield self
        finally:
            for handler in handlers:
                handler.removeFilter(self)
            processors.remove(self)
            manager.pm.unregister(self)
            self._close()


def _exception_of(exc_info: Any) -> BaseException | None:
    if isinstance(exc_info, BaseException):
        return exc_info
    if isinstance(exc_info, tuple):
        return exc_info[1] if len(exc_info) > 1 else None
    if exc_info:
        return sys.exc_info()[1]
    return None


def task_log_router() -> TaskLogRouter:
    """A router to Airflow's configured task log folder and file names."""
    from airflow.configuration import conf

    return TaskLogRouter(
        Path(conf.get("logging", "base_log_folder")).expanduser(), conf.get("logging", "log_filename_template")
    )
