"""The Celery worker's warm-up (ml/celery_worker.py): cheap to import, and the preload leaves nothing a fork shares.

Each check runs in a fresh interpreter, so that what this test session has already imported does not hide a cost.
"""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = """
import json, sys, threading
import ml.celery_worker as worker
heavy = ("mlflow", "sklearn", "pandas", "ml.tasks")
before = [name for name in heavy if name in sys.modules]
worker.preload_task_modules()
after = [name for name in heavy if name in sys.modules]
missing = [name for name in worker.TASK_MODULES if name not in sys.modules]
print(json.dumps({"before": before, "after": after, "missing": missing,
                  "threads": [t.name for t in threading.enumerate()], "config": bool(worker.CELERY_CONFIG)}))
"""


def test_importing_the_config_is_cheap_and_the_preload_starts_no_threads():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, timeout=300)
    found = json.loads(out.stdout.strip().splitlines()[-1])
    # The scheduler imports the config too: it must not pay for the pipeline's libraries.
    assert found["before"] == []
    assert found["after"] == ["mlflow", "sklearn", "pandas", "ml.tasks"]
    assert found["missing"] == []
    # A thread in the parent would not exist in the forked tasks, and whatever it held would be shared half-done.
    assert found["threads"] == ["MainThread"]
    assert found["config"]


def test_the_worker_config_is_airflows_default():
    from airflow.providers.celery.executors.default_celery import DEFAULT_CELERY_CONFIG

    from ml.celery_worker import CELERY_CONFIG

    assert CELERY_CONFIG == DEFAULT_CELERY_CONFIG
