"""Airflow's LocalExecutor, with the pipeline's libraries imported once, before its workers fork the tasks.

``make airflow-ui`` runs ``airflow standalone``, whose scheduler runs every task through the LocalExecutor: at start-up
the executor forks its worker processes from the scheduler, and each worker forks one process per task (Airflow 3's
supervisor). Whatever the scheduler has imported before that, every task inherits for nothing; whatever it has not,
every task imports afresh: mlflow, scikit-learn and pandas cost seconds per task, seven times a run. This executor
imports them in the scheduler just before the workers are forked, as ``ml.celery_worker`` does in a Celery worker.

``mlops env`` (and so ``make airflow-ui``) sets ``AIRFLOW__CORE__EXECUTOR=ml.local_executor.WarmLocalExecutor``. Only
modules are imported in the scheduler: no client, connection, thread or open file, which the forks would share.
"""

from __future__ import annotations

from airflow.executors.local_executor import LocalExecutor

from ml.preload import warm_up_for_forked_tasks


class WarmLocalExecutor(LocalExecutor):
    """A LocalExecutor whose workers, and so their tasks, are forked with the pipeline's libraries already imported."""

    def start(self) -> None:
        # Spawned workers (another start method) would start from a fresh interpreter and inherit nothing.
        if self.is_mp_using_fork:
            warm_up_for_forked_tasks()
        super().start()
