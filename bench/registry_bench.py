"""Benchmark: a pipeline run and `mlops status` on a long registry, as a ratio to the same on a short one.

Two MLflow stores (SQLite) are built in this one invocation: each starts from one real run of mlops_pipeline (version 1
in Production), then is filled to ``--versions`` (default 1,000) or ``--baseline`` (default 10) versions and as many
moves of Production in the deployment history. The filler rows are written straight into the store with MLflow's own
table definitions, because registering 1,000 versions through the client takes many minutes; they look like the
pipeline's own (archived, validated, with run keys and accuracies). Then forced runs (dag.test()) and `mlops status`
(a fresh process, default output) alternate between the two stores, and the medians are compared. Aim: 1.2x.

    .venv/bin/python bench/registry_bench.py [--quick] [--versions 1000] [--baseline 10] [--repeats 3]
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from options import BenchOptions
from pipeline_bench import prepare_environment

MODEL_NAME = "breast_cancer_classifier"


def use_store(workdir: Path, size: int) -> dict[str, str]:
    """Point this process (and the environment handed to `mlops status`) at the store of the given size."""
    home = workdir / f"registry-{size}"
    values = {"MLOPS_HOME": str(home), "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}"}
    os.environ.update(values)
    return values


def fill_registry(tracking_uri: str, versions: int, history: int) -> None:
    """Add archived versions up to ``versions`` and moves of Production up to ``history``, in one transaction."""
    from mlflow.store.model_registry.dbmodels.models import (
        SqlModelVersion,
        SqlModelVersionTag,
        SqlRegisteredModelTag,
    )
    from sqlalchemy import create_engine, func, select

    from ml import registry, tags

    model_versions, version_tags = SqlModelVersion.__table__, SqlModelVersionTag.__table__
    model_tags = SqlRegisteredModelTag.__table__
    engine = create_engine(tracking_uri)
    with engine.begin() as connection:
        template = connection.execute(
            select(model_versions).where(model_versions.c.name == MODEL_NAME, model_versions.c.version == 1)
        ).one()
        last = connection.execute(
            select(func.max(model_versions.c.version)).where(model_versions.c.name == MODEL_NAME)
        ).scalar_one()
        recorded = connection.execute(
            select(func.count())
            .select_from(model_tags)
            .where(model_tags.c.name == MODEL_NAME, model_tags.c.key.like(f"{tags.HISTORY_PREFIX}%"))
        ).scalar_one()
        start = datetime(2024, 1, 1, tzinfo=UTC)
        new_versions = range(last + 1, versions + 1)
        if new_versions:
            connection.execute(
                model_versions.insert(),
                [
                    {
                        "name": MODEL_NAME,
                        "version": number,
                        "creation_time": int((start + timedelta(hours=number)).timestamp() * 1000),
                        "last_updated_time": int((start + timedelta(hours=number)).timestamp() * 1000),
                        "current_stage": registry.ARCHIVED_STAGE,
                        "source": template.source,
                        "storage_location": template.storage_location,
                        "run_id": template.run_id,
                        "status": template.status,
                    }
                    for number in new_versions
                ],
            )
            connection.execute(
                version_tags.insert(),
                [
                    {"name": MODEL_NAME, "version": number, "key": key, "value": value}
                    for number in new_versions
                    for key, value in {
                        tags.AIRFLOW_RUN_KEY: f"mlops_pipeline/filler__{number}",
                        tags.AIRFLOW_RUN_ID: f"filler__{number}",
                        tags.VALIDATION_STATUS: "passed",
                        tags.VALIDATION_ACCURACY: "0.950000",
                        tags.DEPLOYMENT_STATUS: "archived",
                        tags.DATA_DIGEST: f"{number:064x}",
                    }.items()
                ],
            )
        events = [
            registry.HistoryEvent(
                at=(start + timedelta(minutes=index)).isoformat(timespec="microseconds"),
                event="promoted",
                version=2 + index % max(versions - 1, 1),
                previous_version=None,
                actor="bench:filler",
                reason="filler",
            )
            for index in range(max(history - recorded, 0))
        ]
        if events:
            connection.execute(
                model_tags.insert(),
                [
                    {"name": MODEL_NAME, "key": key, "value": value}
                    for key, value in (registry.history_tag(event) for event in events)
                ],
            )
    engine.dispose()


def status_seconds(env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "ml.cli", "status"], env={**os.environ, **env}, check=True, capture_output=True
    )
    return time.perf_counter() - started


def main() -> int:
    options = BenchOptions(__doc__, "registries of 3 and 30 versions, one measured run and status call on each")
    options.size("--versions", full=1000, quick=30, meaning="versions and history entries, long registry")
    options.size("--baseline", full=10, quick=3, meaning="versions and history entries, short registry")
    options.size("--repeats", full=3, quick=1, meaning="measured runs and status calls per registry")
    args = options.parse()

    workdir = Path(tempfile.mkdtemp(prefix="mlops-registry-bench-"))
    sizes = (args.baseline, args.versions)
    runs: dict[int, list[float]] = {size: [] for size in sizes}
    statuses: dict[int, list[float]] = {size: [] for size in sizes}
    try:
        prepare_environment(workdir)
        from ml.airflow_runner import load_dag, migrate_airflow_db, run_dag
        from ml.registry import client_for, list_versions
        from ml.settings import Settings

        migrate_airflow_db()
        pipeline = load_dag("mlops_pipeline")
        fill_seconds = {}
        for size in sizes:
            use_store(workdir, size)
            first = run_dag(dag=pipeline)
            if first.state != "success":
                raise SystemExit(f"the first run on the {size}-version registry ended {first.state}: {first.tasks}")
            started = time.perf_counter()
            fill_registry(os.environ["MLFLOW_TRACKING_URI"], versions=size, history=size)
            fill_seconds[size] = time.perf_counter() - started
            count = len(list_versions(client_for(Settings.from_env()), MODEL_NAME))
            print(f"registry of {count} versions built (filler written in {fill_seconds[size]:.2f} s)", flush=True)
        for _ in range(args.repeats):
            for size in sizes:
                env = use_store(workdir, size)
                started = time.perf_counter()
                run = run_dag(dag=pipeline)
                runs[size].append(time.perf_counter() - started)
                if run.state != "success":
                    raise SystemExit(f"a run on the {size}-version registry ended {run.state}: {run.tasks}")
                statuses[size].append(status_seconds(env))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    small, large = sizes
    print()
    print(f"{'measure (median)':<26}{f'{small} versions':>16}{f'{large} versions':>16}{'ratio':>9}{'aim':>8}")
    for label, samples in (("pipeline run (s)", runs), ("mlops status (s)", statuses)):
        a, b = statistics.median(samples[small]), statistics.median(samples[large])
        print(f"{label:<26}{a:>16.2f}{b:>16.2f}{b / a:>8.2f}x{'1.2x':>8}")
    for size in sizes:
        print(
            f"{size} versions: runs {', '.join(f'{s:.2f}' for s in runs[size])}; "
            f"status {', '.join(f'{s:.2f}' for s in statuses[size])}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
