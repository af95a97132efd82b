"""An Airflow plugin that gives each finished ``mlops_pipeline`` run its note ("v3 promoted, accuracy 0.97", ...),
and a task that asked for one (validate_model, when it rejects a version) its task instance note.

Tasks cannot write a DAG run's note: in Airflow 3 they have no access to the metadata database, and the Task SDK has
no call for it. So the task that knows the outcome (rollback_model, which runs last, whatever happened, or extract_data
when it found no new data and skipped the rest) pushes the note as an XCom under :data:`RUN_NOTE_KEY`, and this
listener, called by the scheduler (or by ``dag.test()``) in the transaction that ends the run, copies it onto the run.
A note someone wrote by hand (the UI and the REST API record who) is left alone; the service's own note is replaced
when the run ends again (cleared and run anew). Task notes come the same way, from :data:`TASK_NOTE_KEY` XComs.

Registered through the ``airflow.plugins`` entry point (pyproject.toml), so every Airflow process of this environment
loads it; it imports nothing beyond Airflow.
"""

from __future__ import annotations

import logging
from typing import Any

from airflow.listeners import hookimpl
from airflow.plugins_manager import AirflowPlugin

from ml.run_note import RUN_NOTE_KEY, TASK_NOTE_KEY

log = logging.getLogger(__name__)


def copy_run_note(dag_run: Any) -> str | None:
    """Set the run's note from its :data:`RUN_NOTE_KEY` XCom, and its task instances' notes from their
    :data:`TASK_NOTE_KEY` XComs; returns the run's note, or None if none was set.

    The scheduler passes a run bound to its own session, which commits the note with the run's new state;
    ``dag.test()`` passes a detached one, so the note is written in a session of its own.
    """
    from sqlalchemy.orm import object_session

    session = object_session(dag_run)
    if session is not None:
        return _copy_note(session, dag_run)
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as own:
        bound = own.scalar(select(DagRun).where(DagRun.dag_id == dag_run.dag_id, DagRun.run_id == dag_run.run_id))
        return _copy_note(own, bound) if bound is not None else None


def _xcom_rows(session: Any, dag_id: str, run_id: str, key: str, task_id: str | None = None) -> list[Any]:
    from airflow.models.xcom import XComModel

    return list(session.scalars(XComModel.get_many(run_id=run_id, dag_ids=dag_id, key=key, task_ids=task_id)).all())


def run_xcom(dag_id: str, run_id: str, task_id: str, key: str) -> Any:
    """What a task of a run pushed under ``key``, read from the metadata database, for the processes that have it
    (``dag.test()``'s); None if it pushed nothing."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = _xcom_rows(session, dag_id, run_id, key, task_id)
        return XComModel.deserialize_value(rows[0]) if rows else None


def _copy_note(session: Any, dag_run: Any) -> str | None:
    _copy_task_notes(session, dag_run)
    if dag_run.note and dag_run.dag_run_note.user_id is not None:
        return None
    note = next(iter(_notes(session, dag_run, RUN_NOTE_KEY).values()), None)
    if note is not None:
        dag_run.note = note
    return note


def _copy_task_notes(session: Any, dag_run: Any) -> None:
    """Each task instance gets the note its task left, or none: a note from an earlier try of the run is dropped."""
    notes = _notes(session, dag_run, TASK_NOTE_KEY)
    for ti in dag_run.get_task_instances(session=session):
        if ti.note and ti.task_instance_note.user_id is not None:
            continue
        note = notes.get(ti.task_id)
        if ti.note != note:
            ti.note = note


def _notes(session: Any, dag_run: Any, key: str) -> dict[str, str]:
    """Task id -> the non-empty text a task of this run left as an XCom under ``key``."""
    from airflow.models.xcom import XComModel

    rows = _xcom_rows(session, dag_run.dag_id, dag_run.run_id, key)
    notes = {row.task_id: XComModel.deserialize_value(row) for row in rows}
    return {task_id: note for task_id, note in notes.items() if isinstance(note, str) and note.strip()}


class RunNoteListener:
    @hookimpl
    def on_dag_run_success(self, dag_run: Any, msg: str) -> None:
        copy_run_note(dag_run)

    @hookimpl
    def on_dag_run_failed(self, dag_run: Any, msg: str) -> None:
        copy_run_note(dag_run)


class MlopsPlugin(AirflowPlugin):
    name = "mlops"
    listeners = [RunNoteListener()]
