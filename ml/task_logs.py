"""What a task log shows: the project's own lines and real problems, not a library's chatter.

Two libraries write into the log of every task that saves or loads a model:

- skops (the format MLflow saves scikit-learn models in) computes its default trusted types once, when first
  imported, by looking every ``scipy.special`` ufunc up in every loaded module. In an Airflow process that lookup
  reaches Airflow's deprecated-import shims (``airflow.utils.timezone``, ...), each of which answers with a
  ``DeprecatedImportWarning``: about 1,160 warning lines per task, repeated in the ``airflow standalone`` terminal.
- MLflow prints registry progress ("Registered model ... already exists", "Created version ...") on stderr, which
  Airflow shows as red ERROR lines in a task that succeeded.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import warnings
from collections.abc import Iterator

# The warnings the scan's lookups trigger (Airflow's DeprecatedImportWarning, numpy's rename of numpy.core) are
# matched on the module that triggers them, skops' module lookup: every other warning stays visible, Airflow's too.
# skops ignores numpy's itself, but only while no other thread sets and restores the filters.
SKOPS_MODULE_LOOKUP = r"skops\.io\._utils"

# Not the "mlflow" logger: its own handler writes to stderr, which would bring the line back here.
log = logging.getLogger("ml.mlflow")


@contextlib.contextmanager
def skops_scan_quieted() -> Iterator[None]:
    """While the block runs, the warnings of skops' module scan are ignored, in whichever thread it is imported."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=SKOPS_MODULE_LOOKUP)
        yield


def import_skops_quietly() -> None:
    """Import skops with the warnings of its module scan ignored; a no-op once it is imported."""
    if "skops.io" in sys.modules:
        return
    with skops_scan_quieted():
        import skops.io  # noqa: F401


class _LinesToLog(io.TextIOBase):
    """A text stream whose every complete line becomes one log record."""

    def __init__(self, logger: logging.Logger, level: int) -> None:
        self._logger = logger
        self._level = level
        self._pending = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self._pending += text
        *lines, self._pending = self._pending.split("\n")
        for line in lines:
            if line.strip():
                self._logger.log(self._level, line.strip())
        return len(text)

    def flush(self) -> None:
        if self._pending.strip():
            self._logger.log(self._level, self._pending.strip())
        self._pending = ""


@contextlib.contextmanager
def mlflow_progress_as_info() -> Iterator[None]:
    """Send what MLflow prints on stderr while this block runs to the ``ml.mlflow`` logger at INFO.

    MLflow's registry helpers report progress with ``print(..., file=sys.stderr)``, not with logging; failures raise.
    """
    stream = _LinesToLog(log, logging.INFO)
    try:
        with contextlib.redirect_stderr(stream):
            yield
    finally:
        stream.flush()
