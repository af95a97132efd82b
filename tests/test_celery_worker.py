"""The Celery worker's warm-up (ml/celery_worker.py, ml/preload.py): cheap to import, and the preload leaves nothing
a fork shares.

Each check runs in a fresh interpreter, so that what this test session has already imported does not hide a cost.
"""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = """
import gc, json, sys, threading
import ml.celery_worker as worker
heavy = ("mlflow", "sklearn", "pandas", "ml.tasks")
before = [name for name in heavy if name in sys.modules]
worker.warm_up_worker()
after = [name for name in heavy if name in sys.modules]
missing = [name for name in worker.WORKER_MODULES if name not in sys.modules]
print(json.dumps({"before": before, "after": after, "missing": missing,
                  "threads": [t.name for t in threading.enumerate()], "config": bool(worker.CELERY_CONFIG),
                  "frozen": gc.get_freeze_count(), "collecting": gc.isenabled()}))
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
