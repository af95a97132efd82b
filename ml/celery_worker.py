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

from airflow.providers.celery.executors.default_celery import DEFAULT_CELERY_CONFIG
from celery.signals import import_modules

from ml.preload import warm_up_for_forked_tasks

CELERY_CONFIG = dict(DEFAULT_CELERY_CONFIG)


@import_modules.connect
def warm_up_worker(**_: object) -> None:
    warm_up_for_forked_tasks()
