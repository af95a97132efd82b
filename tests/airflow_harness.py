"""Do in this process what Airflow's scheduler would do, for tests that need asset-triggered runs.

Built on the scheduler's private functions (``SchedulerJobRunner._create_dag_runs_asset_triggered``,
``airflow.sdk.definitions.dag._run_task``), which is why it lives with the tests and not in ``ml``: an Airflow upgrade
that changes them breaks a test, never ``mlops run``.
"""

from __future__ import annotations

import logging

from ml.airflow_runner import PipelineRun, collect, dag_run_row, load_dag

log = logging.getLogger(__name__)


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
    # As dag.test() does: the run's end calls the DAG's callbacks, which serialisation leaves out.
    scheduler_dag.on_success_callback = dag.on_success_callback
    scheduler_dag.on_failure_callback = dag.on_failure_callback
    with create_session() as session:
        dag_run = dag_run_row(session, dag_id, run_id)
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


def sweep_approval_timeouts() -> None:
    """Do what the scheduler does with human-in-the-loop tasks whose response timeout has passed: answer them with
    their defaults, or fail them (``SchedulerJobRunner.check_awaiting_input_timeouts``); ``dag.test()`` never does."""
    from airflow.jobs.job import Job
    from airflow.jobs.scheduler_job_runner import SchedulerJobRunner
    from airflow.utils.session import create_session

    with create_session() as session:
        SchedulerJobRunner(job=Job(), num_runs=1).check_awaiting_input_timeouts(session=session)
