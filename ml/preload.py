"""What a process that will run the pipeline's tasks imports before its first task, and how.

Two kinds of process run tasks: one whose tasks are forks of it, a Celery worker (``ml.celery_worker``) or the
scheduler of ``airflow standalone`` with its LocalExecutor (``ml.local_executor``), and ``mlops run``, which runs a
whole DAG run in itself through ``dag.test()`` (``ml.airflow_runner.prepare_in_process_runs``). Each one imports
Airflow and the pipeline's libraries, a few million objects, before its first task does any work. While a heap grows
like that, Python's collector runs a full collection each time it has grown by a quarter, and each one walks every
object: 3.3 to 3.8 s of a million-row ``mlops run`` went to collections, most of them while importing. What imports make
is almost never garbage: they run with the collector off, and what they made is frozen, never walked again.

Light on purpose: the Celery configuration module and the executor module import this one in every Airflow component.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import logging
import sys
import time
from collections.abc import Iterable, Iterator

from ml.task_logs import skops_scan_quieted

log = logging.getLogger(__name__)

# What every run imports, whatever it finds: its first task checks the settings (scikit-learn) and the registry
# (mlflow), and reads data (pandas).
RUN_MODULES = ("ml.tasks", "ml.training")
# What the pipeline's tasks import, found by diffing sys.modules around a run against an MLflow server.
TASK_MODULES = (
    *RUN_MODULES,
    "mlflow.sklearn",
    "mlflow.pyfunc.scoring_server",
    "mlflow.data.pandas_dataset",
    "mlflow.tracking.request_header.registry",
    "mlflow.tracing.export.utils",
    "mlflow.tracing.processor.otel",
    "pyarrow.dataset",
    "pyarrow.parquet",
    "git",
    "httpx",
)
# What only saving and loading a model (skops) and drawing its figures (matplotlib) import. train_model imports them
# while it fits (``ml.tracking.model_logging_imported_meanwhile``); a run on unchanged data never needs them.
MODEL_LOGGING_MODULES = ("skops.io", "matplotlib.pyplot")
# What a process whose forks run the tasks imports for them: those forks draw and save models too.
FORKED_TASK_MODULES = (*TASK_MODULES, *MODEL_LOGGING_MODULES)


def warm_up_for_forked_tasks() -> None:
    """Import what the tasks need, once, in a process whose forks will run them; frozen, so no fork copies it.

    Frozen, the imported objects are never walked by a collection in the forks either, so their pages are not touched,
    and copied, after the fork. Airflow freezes its heap after its own preloading too.

    The libraries stay imported, but the modules of this package that the warm-up imported are forgotten again: each
    task imports them afresh from their sources (about 10 ms with the libraries loaded), so the code a task runs is the
    code as it is when the task starts, not as it was when the process started.
    """
    started = time.perf_counter()
    imported_before = set(sys.modules)
    try:
        with long_lived_objects():
            preload(FORKED_TASK_MODULES)
    except Exception:
        # The process still starts and runs tasks: each imports what it needs itself, and fails there, in its own log.
        log.exception("could not preload the tasks' libraries; each task will import them itself")
        return
    finally:
        forget_modules(name for name in set(sys.modules) - imported_before if name.partition(".")[0] == __package__)
    log.info("preloaded %d modules for the tasks in %.1f s", len(FORKED_TASK_MODULES), time.perf_counter() - started)


def forget_modules(names: Iterable[str]) -> None:
    """Drop modules from ``sys.modules`` and from their packages, so that the next import runs them afresh.

    Both, because ``from package import module`` takes the package's attribute when it has one, without importing.
    """
    for name in names:
        module = sys.modules.pop(name)
        parent, _, child = name.rpartition(".")
        if parent in sys.modules and getattr(sys.modules[parent], child, None) is module:
            delattr(sys.modules[parent], child)


def preload(modules: Iterable[str]) -> None:
    """Import the modules, and nothing else: no client, connection, thread or open file, which a fork would share."""
    with skops_scan_quieted():
        for name in modules:
            import_for_tasks(name)


def import_for_tasks(name: str) -> None:
    """Import one module as the tasks use it: pyplot with the Agg backend, chosen first so no display is probed for."""
    if name == "matplotlib.pyplot":
        import matplotlib

        matplotlib.use("Agg")
    importlib.import_module(name)


@contextlib.contextmanager
def long_lived_objects() -> Iterator[None]:
    """What the block creates lives as long as the process: no collection runs during it, and none walks it afterwards.

    For imports and other start-up work only: garbage the block leaves in reference cycles is never collected.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if was_enabled:
            gc.enable()
