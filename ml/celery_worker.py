"""The Celery worker's configuration: Airflow's own, plus the pipeline's libraries imported once, before tasks fork.

Airflow 3 runs every task in an ``os.fork()`` of a Celery pool process, and the pool processes are forks of the
worker's main process. Whatever the main process has imported, every task inherits for nothing; whatever it has not,
every task imports afresh (mlflow, scikit-learn and pandas cost seconds per task). Airflow's Celery integration
preloads a few of its own modules on Celery's ``import_modules`` signal and freezes the heap; this module does the
same for the pipeline's libraries.

Every Airflow component of the stack sets ``AIRFLOW__CELERY__CELERY_CONFIG_OPTIONS=ml.celery_worker.CELERY_CONFIG``
(the scheduler and the workers must agree on the Celery configuration). Importing this module is cheap: the heavy
imports happen only in a worker, when Celery sends the signal before it starts the pool.

Only modules are imported in the parent: no client, connection, thread or open file is created there, because a
forked child would share it.
"""

from __future__ import annotations

import gc
import importlib
import logging
import time

from airflow.providers.celery.executors.default_celery import DEFAULT_CELERY_CONFIG
from celery.signals import import_modules

log = logging.getLogger(__name__)

CELERY_CONFIG = dict(DEFAULT_CELERY_CONFIG)

# What the pipeline's tasks import, found by diffing sys.modules around a run against an MLflow server.
TASK_MODULES = (
    "ml.tasks",
    "ml.training",
    "mlflow.sklearn",
    "mlflow.pyfunc.scoring_server",
    "mlflow.data.pandas_dataset",
    "mlflow.tracking.request_header.registry",
    "mlflow.tracing.export.utils",
    "mlflow.tracing.processor.otel",
    "matplotlib.pyplot",
    "pyarrow.dataset",
    "pyarrow.parquet",
    "skops.io",
    "git",
    "httpx",
)


def preload_task_modules() -> None:
    """Import every module of ``TASK_MODULES``, and nothing else."""
    import matplotlib

    # The tasks draw with the Agg backend; choosing it before pyplot is imported avoids probing for a display.
    matplotlib.use("Agg")
    for name in TASK_MODULES:
        importlib.import_module(name)


@import_modules.connect
def warm_up_worker(**_: object) -> None:
    started = time.perf_counter()
    preload_task_modules()
    # Objects that exist now are never collected in the children: the collector does not touch (and so copy) their
    # pages after the fork. Airflow does the same after its own preloading.
    gc.freeze()
    log.info("preloaded %d modules for the tasks in %.1f s", len(TASK_MODULES), time.perf_counter() - started)
