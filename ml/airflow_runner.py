"""Run a DAG of this project once, in this process, through Airflow's ``dag.test()``, and read back what it did.

Used by the command line (``mlops run``), the tests and the benchmark; the tests' harness for runs the scheduler
would create is ``tests/airflow_harness.py``. The Airflow metadata database must exist
(``airflow db migrate``) and ``AIRFLOW__CORE__DAGS_FOLDER`` must point at ``dags/``: ``dag.test()`` refuses a DAG
whose file lies outside the configured DAGs folder.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import os
import subprocess
import sys
import time
import types
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from airflow.models.dagrun import DagRun
    from airflow.sdk import DAG
    from sqlalchemy.orm import Session

    from ml.task_log_files import FailedTry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskOutcome:
    state: str
    result: dict[str, Any] | None
    try_number: int
    # From the task instance's start to its end; None for a task that never ran.
    seconds: float | None = None


@dataclass(frozen=True)
class PipelineRun:
    dag_id: str
    run_id: str
    state: str
    tasks: dict[str, TaskOutcome] = field(default_factory=dict)
    note: str = ""
    # Why each failed try failed, retried ones included; known to the process that ran the tasks (run_dag).
    failed_tries: tuple[FailedTry, ...] = ()

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
    """Create or upgrade the Airflow metadata database named by the environment, unless it is current already.

    A new database is created in this process, as ``airflow db migrate`` creates one (:func:`create_airflow_db`). One
    at an older revision is upgraded by ``airflow db migrate`` in a subprocess: migrations take the database lock,
    swap the ORM's connection pool for a single connection and can run for minutes, which this process should not
    share; the subprocess costs 3 to 7 s, most of it importing Airflow afresh. For a current database, this process
    does the rest of what the command would do.
    """
    with _logging_kept():
        state = airflow_db_state()
        if state == "current":
            sync_airflow_db_settings()
            return
        if state == "new":
            log.info("creating the Airflow metadata database")
            create_airflow_db()
            return
    log.info("upgrading the Airflow metadata database (airflow db migrate)")
    airflow = Path(sys.executable).parent / "airflow"
    subprocess.run([str(airflow), "db", "migrate"], check=True, capture_output=True)


def create_airflow_db() -> None:
    """Create a new metadata database in this process, as ``airflow db migrate`` creates one: Airflow's tables from
    the ORM stamped with the installed revision, the external DB managers' tables (the FAB provider's, say), the
    default pool and the log file name template."""
    from airflow.providers_manager import ProvidersManager
    from airflow.utils.db import upgradedb

    with _logging_kept():
        # As the command does first: a provider's configuration may hold options its DB manager reads.
        ProvidersManager().initialize_providers_configuration()
        upgradedb()


@contextlib.contextmanager
def _logging_kept() -> Iterator[None]:
    """Leave this process's logging as it is, and the terminal as quiet as ``airflow db migrate`` in a subprocess
    left it, while Airflow checks or creates its database here.

    Creating stamps the database, which runs Alembic's ``env.py`` (Airflow's and each DB manager's); when the root
    logger has no handler, it configures logging from ``alembic.ini``: closes every handler of the process and sets
    the root's level and Alembic's. A handler held on the root meanwhile prevents that: Python's last resort, which
    prints what a record no handler takes would print anyway. Airflow and Alembic narrate each step at INFO: they are
    held at WARNING meanwhile.
    """
    root = logging.getLogger()
    held = None if root.handlers else (logging.lastResort or logging.NullHandler())
    narrators = {logger: logger.level for logger in map(logging.getLogger, ("airflow", "alembic"))}
    if held is not None:
        root.addHandler(held)
    for logger in narrators:
        logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for logger, level in narrators.items():
            logger.setLevel(level)
        if held is not None:
            root.removeHandler(held)


def airflow_db_is_current() -> bool:
    """Whether every migration of the installed Airflow, and of its external DB managers (the FAB provider's, say),
    is applied to the metadata database: then ``airflow db migrate`` would apply nothing."""
    return airflow_db_state() == "current"


def airflow_db_state() -> Literal["current", "new", "to migrate", "unreadable"]:
    """Where the metadata database stands against the installed Airflow and its external DB managers.

    Read-only. ``new``: no Alembic revision, so ``airflow db migrate`` would create the tables from the ORM and apply
    no migration. ``to migrate``: one left by an older Airflow, say. ``unreadable``: the migration then reports why.
    """
    import airflow
    from airflow import settings
    from airflow.utils.db_manager import RunDBManager
    from airflow.utils.session import create_session
    from alembic.migration import MigrationContext
    from alembic.script import ScriptDirectory
    from sqlalchemy.exc import SQLAlchemyError

    # Where Airflow's own Alembic configuration points its script location.
    migrations = ScriptDirectory(str(Path(airflow.__file__).parent / "migrations"))
    try:
        with settings.get_engine().connect() as connection:
            applied = set(MigrationContext.configure(connection).get_current_heads())
        if not applied:
            return "new"
        if applied != set(migrations.get_heads()):
            return "to migrate"
        with create_session() as session:
            return "current" if RunDBManager().check_migration(session) else "to migrate"
    except SQLAlchemyError as error:
        log.info("the Airflow metadata database cannot be read as it is (%s); migrating it", error)
        return "unreadable"


def sync_airflow_db_settings() -> None:
    """What ``airflow db migrate`` does besides migrating: the default pool exists, and the log file name template
    recorded for new runs is the configured one."""
    from airflow.utils.db import add_default_pool_if_not_exists, synchronize_log_template

    add_default_pool_if_not_exists()
    synchronize_log_template()


def prepare_in_process_runs(modules: Iterable[str] = ()) -> None:
    """Ready this process to run DAGs through ``dag.test()``: the Airflow database current, ``modules`` imported and
    the in-process execution API started, with the collector off meanwhile and all of it frozen afterwards
    (:func:`ml.preload.long_lived_objects`).

    The execution API's first request builds the routes of every API version Airflow serves: some 400,000 objects that
    live as long as the process. Built by the first task instead, they cost four full collections on the way (0.5 s of
    a run on unchanged data), and every later collection walked them again.
    """
    from ml import preload

    with preload.long_lived_objects():
        migrate_airflow_db()
        preload.preload(modules)
        _start_in_process_execution_api()


def _start_in_process_execution_api() -> None:
    import httpx
    from airflow.sdk.execution_time.supervisor import in_process_api_server

    request = httpx.Request("GET", "http://in-process/health")
    response = in_process_api_server().transport.handle_request(request)
    body = response.read()
    if response.status_code != httpx.codes.OK:
        raise RuntimeError(f"Airflow's in-process execution API answered {response.status_code}: {body!r}")


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
    """Run the DAG once; each task's log goes to its task log file, the terminal keeps one line per traceback."""
    from ml.task_log_files import task_log_router

    dag = dag or load_dag(dag_id)
    log.info("running %s through Airflow (dag.test) with %s", dag.dag_id, conf or "default parameters")
    with quiet_skip_cascade(), task_log_router().routing() as router:
        # In a context of its own: what a task sets for itself (its S3 connection, ml.object_store) ends with the run,
        # as it ends with a worker's task process, and never reaches whatever this process does next.
        dag_run = contextvars.copy_context().run(dag.test, run_conf=conf or None)
    return dataclasses.replace(collect(dag.dag_id, dag_run.run_id), failed_tries=tuple(router.failed_tries))


class SkipCascadeFilter(logging.Filter):
    """Drops ``dag.test()``'s "No tasks to run" warning for a scheduling pass that was still skipping tasks.

    Each pass of ``dag.test()``'s loop settles one more level of the tasks downstream of a failed or skipped one: after
    a failed transform_data, train_model in one pass and validate_model in the next. Such a pass leaves nothing to
    run, and ``dag.test()`` warns about the tasks not yet reached, which a reader takes for a failure; the scheduler
    makes the same passes silently. The warning still shows when it may mean something: a task in it is waiting (for
    a retry, say) rather than not yet evaluated, or the pass made no progress (the same tasks as the pass before).
    """

    def __init__(self) -> None:
        super().__init__()
        self.previous: frozenset[tuple[str, int]] = frozenset()
        # Set by a pass that only settled the cascade, for the 1 s idle wait dag.test() makes right after its warning.
        self.settling = False

    def filter(self, record: logging.LogRecord) -> bool:
        unrunnable = record.args[0] if isinstance(record.args, tuple) and record.args else None
        if not str(record.msg).startswith("No tasks to run") or not isinstance(unrunnable, set):
            return True
        keys = frozenset((ti.task_id, ti.map_index) for ti in unrunnable)
        progressed, self.previous = keys != self.previous, keys
        self.settling = progressed and all(ti.state is None for ti in unrunnable)
        return not self.settling


class CascadeAwareClock:
    """The clock ``dag.test()`` imports while :func:`quiet_skip_cascade` is on: the ``time`` module, but for one wait.

    ``dag.test()`` sleeps 1 s after every pass that leaves nothing to run, the passes that only settle the next level of
    a cascade included, though nothing is there to wait for: a run that failed at its first task slept 5 s, a run on
    unchanged data or a rejected version 2 to 4 s. After such a pass (``SkipCascadeFilter.settling``) the wait is
    skipped; a pass that waits for something, a retry's delay or a person's input, sleeps as before.
    """

    def __init__(self, cascade: SkipCascadeFilter) -> None:
        self.cascade = cascade
        self.skipped_waits = 0

    def sleep(self, seconds: float) -> None:
        if self.cascade.settling:
            self.cascade.settling = False
            self.skipped_waits += 1
            return
        time.sleep(seconds)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


@contextlib.contextmanager
def quiet_skip_cascade() -> Iterator[CascadeAwareClock]:
    """Filter the benign "No tasks to run" warnings of ``dag.test()`` and skip the idle wait after each of them (see
    ``SkipCascadeFilter`` and ``CascadeAwareClock``) while it runs.

    ``dag.test()`` imports ``time`` in its own body: the clock stands in for the module in ``sys.modules`` from the
    call until that import has bound it (a tracer on that one frame sees it), so nothing else in the process sees it.
    """
    from airflow.sdk.definitions.dag import DAG

    # The logger of airflow.sdk.definitions.dag, whose DAG.test() logs the warning.
    dag_log = logging.getLogger(DAG.__module__)
    cascade = SkipCascadeFilter()
    clock = CascadeAwareClock(cascade)
    test_code, previous_tracer = DAG.test.__code__, sys.gettrace()

    def restore() -> None:
        sys.modules["time"] = time
        sys.settrace(previous_tracer)

    def in_test(frame: types.FrameType, event: str, arg: Any) -> Any:
        if "time" not in frame.f_locals:
            return in_test
        restore()
        frame.f_trace = None
        return None

    def on_call(frame: types.FrameType, event: str, arg: Any) -> Any:
        return in_test if frame.f_code is test_code else None

    dag_log.addFilter(cascade)
    sys.modules["time"] = clock  # type: ignore[assignment]
    sys.settrace(on_call)
    try:
        yield clock
    finally:
        restore()
        dag_log.removeFilter(cascade)


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
            ti.task_id: TaskOutcome(
                state=str(ti.state),
                result=values.get(ti.task_id),
                try_number=ti.try_number,
                seconds=(ti.end_date - ti.start_date).total_seconds() if ti.start_date and ti.end_date else None,
            )
            for ti in instances
        }
        return PipelineRun(dag_id=dag_id, run_id=run_id, state=str(dag_run.state), tasks=tasks, note=dag_run.note or "")
