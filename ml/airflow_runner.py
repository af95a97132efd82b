"""Run a DAG of this project once, in this process, through Airflow's ``dag.test()``, and read back what it did.

Used by the command line (``mlops run``), the tests and the benchmark; the tests' harness for runs the scheduler
would create is ``tests/airflow_harness.py``. The Airflow metadata database must exist
(``airflow db migrate``) and ``AIRFLOW__CORE__DAGS_FOLDER`` must point at ``dags/``: ``dag.test()`` refuses a DAG
whose file lies outside the configured DAGs folder.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from airflow.models.dagrun import DagRun
    from airflow.sdk import DAG
    from sqlalchemy.orm import Session

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskOutcome:
    state: str
    result: dict[str, Any] | None
    try_number: int


@dataclass(frozen=True)
class PipelineRun:
    dag_id: str
    run_id: str
    state: str
    tasks: dict[str, TaskOutcome] = field(default_factory=dict)
    note: str = ""

    @property
    def run_key(self) -> str:
        return f"{self.dag_id}/{self.run_id}"

    def result(self, task_id: str) -> dict[str, Any]:
        outcome = self.tasks.get(task_id)
        return (outcome.result if outcome else None) or {}

    def state_of(self, task_id: str) -> str:
        outcome = self.tasks.get(task_id)
        return outcome.state if outcome else "missing"


def dags_folder() -> Path:
    return Path(os.environ.get("AIRFLOW__CORE__DAGS_FOLDER") or Path(__file__).resolve().parent.parent / "dags")


def migrate_airflow_db() -> None:
    """Create or upgrade the Airflow metadata database named by the environment."""
    airflow = Path(sys.executable).parent / "airflow"
    subprocess.run([str(airflow), "db", "migrate"], check=True, capture_output=True)


def load_dag(dag_id: str) -> DAG:
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(dags_folder()))
    if bag.import_errors:
        problems = "; ".join(f"{path}: {error.strip().splitlines()[-1]}" for path, error in bag.import_errors.items())
        raise RuntimeError(f"DAG files failed to import: {problems}")
    dag = bag.get_dag(dag_id)
    if dag is None:
        raise RuntimeError(f"no DAG {dag_id!r} in {dags_folder()}")
    return dag


def run_dag(dag_id: str = "mlops_pipeline", conf: dict[str, Any] | None = None, dag: DAG | None = None) -> PipelineRun:
    dag = dag or load_dag(dag_id)
    log.info("running %s through Airflow (dag.test) with %s", dag.dag_id, conf or "default parameters")
    dag_run = dag.test(run_conf=conf or None)
    return collect(dag.dag_id, dag_run.run_id)


def dag_run_row(session: Session, dag_id: str, run_id: str) -> DagRun:
    from airflow.models.dagrun import DagRun
    from sqlalchemy import select

    return session.scalars(select(DagRun).where(DagRun.dag_id == dag_id, DagRun.run_id == run_id)).one()


def collect(dag_id: str, run_id: str) -> PipelineRun:
    from airflow.models.taskinstance import TaskInstance
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        dag_run = dag_run_row(session, dag_id, run_id)
        instances = session.scalars(
            select(TaskInstance).where(TaskInstance.dag_id == dag_id, TaskInstance.run_id == run_id)
        ).all()
        # get_many is typed as selecting one-column rows; scalars() unwraps them into the XCom models.
        xcoms: Sequence[XComModel] = session.scalars(  # type: ignore[assignment]
            XComModel.get_many(run_id=run_id, dag_ids=dag_id, key="return_value")
        ).all()
        values = {row.task_id: XComModel.deserialize_value(row) for row in xcoms}
        tasks = {
            ti.task_id: TaskOutcome(state=str(ti.state), result=values.get(ti.task_id), try_number=ti.try_number)
            for ti in instances
        }
        return PipelineRun(dag_id=dag_id, run_id=run_id, state=str(dag_run.state), tasks=tasks, note=dag_run.note or "")
