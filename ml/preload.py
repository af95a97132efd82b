"""What a process that will run the pipeline's tasks imports before its first task, and how.

Two kinds of process run tasks: a Celery worker, whose tasks are forks of it (``ml.celery_worker``), and ``mlops run``,
which runs a whole DAG run in itself through ``dag.test()`` (``ml.airflow_runner.prepare_in_process_runs``). Either one
imports Airflow and the pipeline's libraries, a few million objects, before its first task does any work. While a heap
grows like that, Python's collector runs a full collection each time it has grown by a quarter, and each one walks every
object: 3.3 to 3.8 s of a million-row ``mlops run`` went to collections, most of them while importing. What imports make
is almost never garbage: they run with the collector off, and what they made is frozen, never walked again.

Light on purpose: the Celery configuration module imports this one in the scheduler too.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
from collections.abc import Iterable, Iterator

from ml.task_logs import skops_scan_quieted

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
