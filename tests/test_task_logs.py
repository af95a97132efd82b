"""Task logs keep the project's lines and real problems: no skops scan flood, no MLflow progress as ERROR."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

# Loads Airflow's deprecated-import shims, as a task process has, then imports skops and counts the warnings.
COUNT_WARNINGS = """
import sys, warnings
import airflow.utils.timezone, airflow.utils.trigger_rule, airflow.utils.operator_resources
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    if sys.argv[1] == "quietly":
        from ml.task_logs import import_skops_quietly
        import_skops_quietly()
    else:
        import skops.io
    import skops.io
print(sum(type(w.message).__name__ == "DeprecatedImportWarning" for w in caught), len(caught))
"""


def _warnings_on_import(how: str) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", COUNT_WARNINGS, how], capture_output=True, text=True, check=True)
    deprecated, total = out.stdout.split()
    return int(deprecated), int(total)


def test_skops_import_in_an_airflow_process_floods_unless_quieted():
    deprecated_plain, _ = _warnings_on_import("plain")
    assert deprecated_plain > 100, "the flood this guards against no longer happens; the guard may be dropped"
    assert _warnings_on_import("quietly") == (0, 0)


# A fit's stand-in: compiled work that releases the GIL, between scikit-learn-style input checks that set and restore
# the warning filters, while the other thread imports skops (whose module scan sets and restores them too).
IMPORT_DURING_FIT = """
import sys, threading, time, warnings
import airflow.utils.timezone, airflow.utils.trigger_rule, airflow.utils.operator_resources
from ml.tracking import MODEL_LOGGING_MODULES, model_logging_imported_meanwhile

shown = []
warnings.showwarning = lambda message, category, *rest: shown.append(category.__name__)
warnings.simplefilter("always")
before = list(warnings.filters)
with model_logging_imported_meanwhile():
    importing = threading.active_count() == 2
    while threading.active_count() == 2:
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            time.sleep(0.0002)
import matplotlib
print(importing, all(m in sys.modules for m in MODEL_LOGGING_MODULES), matplotlib.get_backend().lower())
print(warnings.filters == before, sorted(set(shown)))
"""


def test_model_logging_imports_during_the_fit_are_quiet_and_leave_the_filters_as_they_were():
    out = subprocess.run([sys.executable, "-c", IMPORT_DURING_FIT], capture_output=True, text=True, check=True)
    imports, filters = out.stdout.splitlines()
    assert imports == "True True agg"
    assert filters == "True []"


def test_mlflow_registry_progress_is_logged_at_info_not_printed(mlops_env, caplog, capfd):
    from sklearn.dummy import DummyClassifier

    import mlflow
    from ml.task_logs import import_skops_quietly, mlflow_progress_as_info

    import_skops_quietly()
    mlflow.set_tracking_uri(mlops_env.tracking_uri)
    # An experiment id made active by an earlier test names nothing in this test's new store.
    mlflow.set_experiment("registry_progress")
    model = DummyClassifier().fit([[0.0], [1.0]], [0, 1])
    with mlflow.start_run():
        info = mlflow.sklearn.log_model(model, name="model", pip_requirements=["scikit-learn"])
    capfd.readouterr()
    with caplog.at_level(logging.INFO, logger="ml.mlflow"), mlflow_progress_as_info():
        mlflow.register_model(info.model_uri, "quiet_model")
        mlflow.register_model(info.model_uri, "quiet_model")
    messages = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "ml.mlflow"]
    assert (logging.INFO, "Successfully registered model 'quiet_model'.") in messages
    assert any("already exists" in text for _, text in messages)
    assert (logging.INFO, "Created version '2' of model 'quiet_model'.") in messages
    assert "quiet_model" not in capfd.readouterr().err


def test_mlflow_progress_outside_the_block_still_reaches_stderr(capfd):
    from mlflow.utils.logging_utils import eprint

    from ml.task_logs import mlflow_progress_as_info

    with mlflow_progress_as_info():
        pass
    eprint("printed after the block")
    assert "printed after the block" in capfd.readouterr().err


@pytest.mark.parametrize("text", ["partial line without newline", "two\nlines\n"])
def test_every_line_becomes_one_record(text, caplog):
    from mlflow.utils.logging_utils import eprint

    from ml.task_logs import mlflow_progress_as_info

    with caplog.at_level(logging.INFO, logger="ml.mlflow"), mlflow_progress_as_info():
        eprint(text, end="")
    assert [r.getMessage() for r in caplog.records] == [line for line in text.split("\n") if line]


def test_dag_test_notices_are_dropped_only_while_skips_cascade(airflow_db, caplog):
    """dag.test() warns "No tasks to run" after each pass that only settled tasks after a failed one; a task
    waiting (for a retry, say), a pass that made no progress, or a warning outside a run still shows.

    ``airflow_db`` first: Airflow sets up its logging when first imported, which would remove caplog's handler."""
    from collections import namedtuple

    from ml.airflow_runner import quiet_skip_cascade

    pending = namedtuple("pending", "task_id map_index state")  # what the filter reads of a TaskInstance
    dag_log = logging.getLogger("airflow.sdk.definitions.dag")

    def notice(**states: str | None) -> None:
        unrunnable = {pending(task, -1, state) for task, state in states.items()}
        dag_log.warning("No tasks to run. unrunnable tasks: %s", unrunnable)

    def shown() -> list[list[str]]:
        return [sorted(ti.task_id for ti in record.args[0]) for record in caplog.records]

    with caplog.at_level(logging.WARNING, logger=dag_log.name):
        with quiet_skip_cascade() as clock:
            notice(validate_model=None, deploy_model=None)
            clock.sleep(60)
            notice(deploy_model=None)
            clock.sleep(60)
            assert shown() == [] and clock.skipped_waits == 2
            notice(deploy_model=None)
            clock.sleep(0.01)
            assert shown() == [["deploy_model"]] and clock.skipped_waits == 2, "no progress: the wait is made"
            caplog.clear()
            notice(train_model="up_for_retry", deploy_model=None)
            clock.sleep(0.01)
            assert shown() == [["deploy_model", "train_model"]] and clock.skipped_waits == 2, "a retry is waited for"
        caplog.clear()
        notice(validate_model=None)
        assert shown() == [["validate_model"]]


def test_a_run_that_failed_at_its_first_task_settles_the_rest_without_waiting(airflow_db, mlops_env, monkeypatch):
    """dag.test() sleeps 1 s after each pass that leaves nothing to run: after a failed first task, once per level of
    the tasks after it. Those waits are skipped, and only dag.test() ever sees the clock that skips them."""
    import time

    from ml.airflow_runner import load_dag, quiet_skip_cascade

    monkeypatch.setenv("MLOPS_ACCURACY_THRESHOLD", "1.5")
    dag = load_dag("mlops_pipeline")
    with quiet_skip_cascade() as clock:
        dag_run = dag.test()
        assert sys.modules["time"] is time
    assert dag_run.state == "failed"
    assert clock.skipped_waits >= 4, "a level of the cascade waited"
    assert sys.modules["time"] is time and sys.gettrace() is None
