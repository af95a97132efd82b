"""Manual rollback: put the previous (or a chosen) model version back in Production from the Airflow UI.

The same operation as ``mlops rollback``; both refuse a version that does not exist or never passed validation.
"""

from datetime import datetime, timedelta

from airflow.sdk import Param, dag, task

from ml.notify import RunNotifier
from ml.settings import Settings

SETTINGS = Settings.from_env_or_embedded()

DOC = """
### Roll Production back

Moves the Production stage and the `production` alias of the model to **target_version**: `previous` (the version
that Production replaced when it was promoted) or a version number. The move is recorded in the registry's
deployment history with this DAG run as its author. A version that does not exist, or never passed validation, is
refused and nothing changes.
"""


@dag(
    dag_id="mlops_rollback",
    description="Manually roll the Production model back to the previous or a chosen version",
    default_args={"execution_timeout": timedelta(seconds=SETTINGS.task_timeout)},
    schedule=None,
    start_date=datetime(2023, 1, 1),
    catchup=False,
    max_active_runs=1,
    tags=["ml", "mlops", "mlflow", "rollback"],
    doc_md=DOC,
    on_success_callback=RunNotifier(result_tasks=("rollback_production",)),
    on_failure_callback=RunNotifier(result_tasks=("rollback_production",), failed=True),
    params={
        "target_version": Param(
            "previous",
            type="string",
            pattern=r"^(previous|[0-9]+)$",
            title="Target version",
            description="'previous' or a registered version number.",
        ),
        "reason": Param(
            "manual rollback from the Airflow UI",
            type="string",
            minLength=1,
            title="Reason",
            description="Why Production is being rolled back; kept in the deployment history.",
        ),
    },
)
def manual_rollback():
    @task(task_id="rollback_production", retries=0)
    def rollback_production(**context):
        """Move Production to the target version, or refuse with the reason."""
        from ml import tasks

        return tasks.rollback_production(context)

    rollback_production()


manual_rollback()
