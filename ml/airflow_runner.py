"""Run a DAG of this project once, in this process, through Airflow's ``dag.test()``, and read back what it did.

Used by the command line (``mlops run``), the tests and the benchmark. The Airflow metadata database must exist
(``airflow db migrate``) and ``AIRFLOW__CORE__DAGS_FOLDER`` must point at ``dags/``: ``dag.test()`` refuses a DAG
whose file lies outside the configured DAGs folder.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


def load_dag(dag_id: str):
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(dags_folder()))
    if bag.import_errors:
        problems = "; ".join(f"{path}: {error.strip().splitlines()[-1]}" for path, error in bag.import_errors.items())
        raise RuntimeError(f"DAG files failed to import: {problems}")
    dag = bag.get_dag(dag_id)
    if dag is None:
        raise RuntimeError(f"no DAG {dag_id!r} in {dags_folder()}")
    return dag


def run_dag(dag_id: str = "mlops_pipeline", conf: dict[str, Any] | None = None, dag=None) -> PipelineRun:
    dag = dag or load_dag(dag_id)
    log.info("running %s through Airflow (dag.test) with %s", dag.dag_id, conf or "default parameters")
    dag_run = dag.test(run_conf=conf or None)
    return collect(dag.dag_id, dag_run.run_id)


def _dag_run(session, dag_id: str, run_id: str):
    from airflow.models.dagrun import DagRun
    from sqlalchemy import select

    return session.scalars(select(DagRun).where(DagRun.dag_id == dag_id, DagRun.run_id == run_id)).one()


def collect(dag_id: str, run_id: str) -> PipelineRun:
    from airflow.models.taskinstance import TaskInstance
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        dag_run = _dag_run(session, dag_id, run_id)
        instances = session.scalars(
            select(TaskInstance).where(TaskInstance.dag_id == dag_id, TaskInstance.run_id == run_id)
        ).all()
        values = {
            row.task_id: XComModel.deserialize_value(row)
            for row in session.scalars(XComModel.get_many(run_id=run_id, dag_ids=dag_id, key="return_value")).all()
        }
        tasks = {
            ti.task_id: TaskOutcome(state=str(ti.state), result=values.get(ti.task_id), try_number=ti.try_number)
            for ti in instances
        }
        return PipelineRun(dag_id=dag_id, run_id=run_id, state=str(dag_run.state), tasks=tasks)


def create_asset_triggered_runs(dag_id: str) -> list[str]:
    """Do what the scheduler does with queued asset events, for one DAG: create the asset-triggered runs now due.

    Uses the scheduler's own queries and DAG-run factory (``DagModel.dags_needing_dagruns`` and
    ``SchedulerJobRunner._create_dag_runs_asset_triggered``), so the run consumes the queued events exactly as a
    running scheduler would; the daily timetable is left out. Returns the ids of the runs created (state queued).
    """
    from airflow.jobs.job import Job
    from airflow.jobs.scheduler_job_runner import SchedulerJobRunner
    from airflow.models.dag import DagModel
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from airflow.utils.types import DagRunType
    from sqlalchemy import select

    def asset_runs(session) -> set[str]:
        query = select(DagRun.run_id).where(DagRun.dag_id == dag_id, DagRun.run_type == DagRunType.ASSET_TRIGGERED)
        return set(session.scalars(query))

    with create_session() as session:
        before = asset_runs(session)
        query, triggered_date_by_dag = DagModel.dags_needing_dagruns(session)
        due = [model for model in query.all() if model.dag_id == dag_id and dag_id in triggered_date_by_dag]
        if due:
            runner = SchedulerJobRunner(job=Job(), num_runs=1)
            runner._create_dag_runs_asset_triggered(dag_models=due, session=session)
        session.commit()
        return sorted(asset_runs(session) - before)


def run_existing(dag_id: str, run_id: str, dag=None) -> PipelineRun:
    """Execute, in this process, the tasks of a DAG run that already exists (one the scheduler created, say).

    The same loop as ``dag.test()``, which can only run a manual run it creates itself.
    """
    import time

    from airflow.sdk.definitions.dag import _run_task
    from airflow.serialization.serialized_objects import DagSerialization
    from airflow.utils.session import create_session
    from airflow.utils.state import DagRunState, TaskInstanceState

    dag = dag or load_dag(dag_id)
    scheduler_dag = DagSerialization.deserialize_dag(DagSerialization.serialize_dag(dag))
    with create_session() as session:
        dag_run = _dag_run(session, dag_id, run_id)
        dag_run.dag = scheduler_dag
        if dag_run.state == DagRunState.QUEUED:
            dag_run.set_state(DagRunState.RUNNING)
        session.commit()
        while dag_run.state == DagRunState.RUNNING:
            session.expire_all()
            schedulable, _ = dag_run.update_state(session=session)
            for ti in schedulable:
                if ti.state != TaskInstanceState.UP_FOR_RESCHEDULE:
                    ti.try_number += 1
                ti.state = TaskInstanceState.SCHEDULED
            session.commit()
            scheduled = [ti for ti in dag_run.get_task_instances(session=session) if ti.state == "scheduled"]
            if not scheduled and dag_run.state == DagRunState.RUNNING:
                time.sleep(0.5)
            for ti in scheduled:
                try:
                    _run_task(ti=ti, task=dag.task_dict[ti.task_id], run_triggerer=True)
                except Exception:
                    log.exception("task %s failed", ti.task_id)
    return collect(dag_id, run_id)
