"""The warm-up of the processes whose forks run the tasks, a Celery worker (ml/celery_worker.py) and the scheduler of
``airflow standalone`` (ml/local_executor.py): cheap to import, and the preload (ml/preload.py) leaves nothing a fork
shares.

Each check runs in a fresh interpreter, so that what this test session has already imported does not hide a cost.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

PROBE = """
import gc, json, sys, threading
import ml.celery_worker as worker
from ml.preload import FORKED_TASK_MODULES
heavy = ("mlflow", "sklearn", "pandas", "ml.tasks")
before = [name for name in heavy if name in sys.modules]
worker.warm_up_worker()
after = [name for name in heavy if name in sys.modules]
missing = [name for name in FORKED_TASK_MODULES if name not in sys.modules and not name.startswith("ml.")]
found = {"before": before, "after": after, "missing": missing,
         "threads": [t.name for t in threading.enumerate()], "config": bool(worker.CELERY_CONFIG),
         "frozen": gc.get_freeze_count(), "collecting": gc.isenabled(),
         "package keeps": hasattr(sys.modules["ml"], "tasks")}
loaded = set(sys.modules)
from ml import training
import ml.tasks
found["imported by a task"] = sorted(name for name in set(sys.modules) - loaded if not name.startswith("ml."))
found["fresh"] = training is sys.modules["ml.training"] and ml.tasks is sys.modules["ml.tasks"]
print(json.dumps(found))
"""

# Objects made in the block are frozen; the collector is off during it, and afterwards as it was before.
LONG_LIVED = """
import gc, json
from ml.preload import long_lived_objects
found, kept = {}, []
for enabled in (True, False):
    gc.enable() if enabled else gc.disable()
    frozen = gc.get_freeze_count()
    with long_lived_objects():
        found[f"collecting during, {enabled}"] = gc.isenabled()
        kept.append([[number] for number in range(10_000)])
    found[f"frozen, {enabled}"] = gc.get_freeze_count() - frozen >= 10_000
    found[f"collecting after, {enabled}"] = gc.isenabled()
print(json.dumps(found))
"""


def test_importing_the_config_is_cheap_and_the_preload_starts_no_threads_and_keeps_no_code_of_ours():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, timeout=300)
    found = json.loads(out.stdout.strip().splitlines()[-1])
    # The scheduler imports the config too: it must not pay for the pipeline's libraries.
    assert found["before"] == []
    assert found["after"] == ["mlflow", "sklearn", "pandas"]
    assert found["missing"] == []
    # The package's own modules are forgotten (from sys.modules and from the package): a task imports them afresh, as
    # they are when it starts, and that imports no library the warm-up left out.
    assert not found["package keeps"]
    assert found["imported by a task"] == []
    assert found["fresh"]
    # A thread in the parent would not exist in the forked tasks, and whatever it held would be shared half-done.
    assert found["threads"] == ["MainThread"]
    assert found["config"]
    # What the preload made is frozen: no collection in a task walks (and so copies) it.
    assert found["frozen"] > 100_000 and found["collecting"]


def test_long_lived_objects_are_frozen_with_the_collector_off_meanwhile():
    out = subprocess.run([sys.executable, "-c", LONG_LIVED], capture_output=True, text=True, check=True, timeout=60)
    assert json.loads(out.stdout) == {
        "collecting during, True": False,
        "frozen, True": True,
        "collecting after, True": True,
        "collecting during, False": False,
        "frozen, False": True,
        "collecting after, False": False,
    }


def test_the_worker_config_is_airflows_default():
    from airflow.providers.celery.executors.default_celery import DEFAULT_CELERY_CONFIG

    from ml.celery_worker import CELERY_CONFIG

    assert CELERY_CONFIG == DEFAULT_CELERY_CONFIG


# The executor `make airflow-ui` names, loaded the way Airflow loads it; started, it preloads before it forks a worker.
LOCAL_EXECUTOR_PROBE = """
import json, sys, threading
from airflow.executors.executor_loader import ExecutorLoader
heavy = ("mlflow", "sklearn", "pandas", "ml.tasks")
executor_cls, _ = ExecutorLoader.import_default_executor_cls()
loaded = [name for name in heavy if name in sys.modules]
executor = executor_cls(parallelism=1)
executor.start()
found = {"class": executor_cls.__name__, "is_local": executor_cls.is_local, "loaded on import": loaded,
         "loaded at start": [name for name in heavy if name in sys.modules], "workers": len(executor.workers),
         "threads": [t.name for t in threading.enumerate()]}
executor.end()
print(json.dumps(found))
"""


def test_the_local_executor_of_make_airflow_ui_preloads_before_it_forks_its_workers():
    from ml.cli import WARM_LOCAL_EXECUTOR

    env = {**os.environ, "AIRFLOW__CORE__EXECUTOR": WARM_LOCAL_EXECUTOR}
    out = subprocess.run(
        [sys.executable, "-c", LOCAL_EXECUTOR_PROBE], capture_output=True, text=True, check=True, timeout=300, env=env
    )
    found = json.loads(out.stdout.strip().splitlines()[-1])
    # `airflow standalone` keeps an executor only if it is local; every Airflow component imports the class.
    assert found["class"] == "WarmLocalExecutor" and found["is_local"]
    assert found["loaded on import"] == []
    assert found["loaded at start"] == ["mlflow", "sklearn", "pandas"]
    assert found["workers"] == 1
    assert found["threads"] == ["MainThread"]


def test_a_library_that_cannot_be_imported_leaves_the_scheduler_starting_and_the_tasks_to_import_it(tmp_path):
    from ml.cli import WARM_LOCAL_EXECUTOR

    broken = tmp_path / "skops"
    broken.mkdir()
    (broken / "__init__.py").write_text("raise ImportError('this skops is broken')\n")
    env = {
        **os.environ,
        "AIRFLOW__CORE__EXECUTOR": WARM_LOCAL_EXECUTOR,
        "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
    }
    out = subprocess.run(
        [sys.executable, "-c", LOCAL_EXECUTOR_PROBE], capture_output=True, text=True, check=True, timeout=300, env=env
    )
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert found["workers"] == 1 and found["threads"] == ["MainThread"]
    # What was imported before the failure stays, but none of the package's own modules.
    assert found["loaded at start"] == ["mlflow", "sklearn", "pandas"]
    assert "could not preload the tasks' libraries" in out.stderr + out.stdout
    assert "this skops is broken" in out.stderr + out.stdout
