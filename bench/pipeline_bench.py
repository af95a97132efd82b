"""Benchmark: mlops_pipeline against a stub DAG with the same seven tasks doing nothing, both through dag.test().

Prints the DAG file's parse time and a full run's wall time, each as a ratio to the stub's, measured in this one
invocation on the default data set. Two more DAGs split the parse: seven empty tasks with the pipeline's schedule and
its trigger form's 13 Params, attached as the pipeline attaches them, once written out as literals (what Airflow itself
charges for that form: building and validating the Params, the floor for any DAG that offers it) and once built from
``ml.settings`` as the pipeline builds them (adding the cost of importing the settings and reading the environment).

Parse time is what a DAG processor pays per file with Airflow already loaded: each file is parsed in fresh
interpreters, several times, and the median kept. Run time is the median of alternating runs after one warm-up run of
each (the warm-up creates the MLflow store, a one-time cost that is printed apart); the part of a run spent outside its
task instances is Airflow's own work, printed apart too.

    .venv/bin/python bench/pipeline_bench.py [--quick] [--runs 3] [--parses 5]
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from options import BenchOptions

REPO = Path(__file__).resolve().parent.parent
PIPELINE_FILE = REPO / "dags" / "mlops_pipeline.py"
STUB_FILE = REPO / "bench" / "dags" / "stub_pipeline.py"

WARM_UP_DAG = """
from datetime import datetime

from airflow.sdk import dag, task


@dag(dag_id="warm_up", schedule=None, start_date=datetime(2023, 1, 1))
def warm_up():
    @task
    def nothing():
        return None

    nothing()


warm_up()
"""

FORM_DAG = """
from datetime import datetime

from airflow.sdk import Param, dag, task

SPECS_SOURCE


@dag(dag_id="DAG_ID", schedule="@daily", start_date=datetime(2023, 1, 1), catchup=False)
def form_dag():
    previous = None
    for task_id in ("extract", "transform", "train", "validate", "deploy", "archive", "rollback"):
        current = task(task_id=task_id)(lambda: None)()
        if previous is not None:
            previous >> current
        previous = current


form_dag().params = {name: Param(**spec) for name, spec in SPECS.items()}
"""
SPECS_FROM_SETTINGS = "from ml.settings import Settings\n\nSPECS = Settings.from_env_or_embedded().param_specs()"


def form_dag_source(dag_id: str, specs_source: str) -> str:
    """Seven empty tasks with the pipeline's schedule and the Params ``specs_source`` assigns to ``SPECS``."""
    return FORM_DAG.replace("DAG_ID", dag_id).replace("SPECS_SOURCE", specs_source)


# Like Airflow's DAG processor, which parses in children of a process that has loaded Airflow and called
# gc.freeze(): each probe pays the one-time costs on a one-task DAG, freezes the heap, then times the file.
# Without the freeze, a full garbage collection of Airflow's heap (~0.1 s) lands in whichever parse crosses the
# threshold first.
PARSE_PROBE = """
import gc, sys, time
from airflow.dag_processing.dagbag import DagBag
DagBag(dag_folder=sys.argv[2])
gc.collect()
gc.freeze()
started = time.perf_counter()
bag = DagBag(dag_folder=sys.argv[1])
elapsed = time.perf_counter() - started
assert not bag.import_errors, bag.import_errors
print(elapsed)
"""


def prepare_environment(workdir: Path) -> Path:
    dags = workdir / "dags"
    dags.mkdir()
    for source in (PIPELINE_FILE, STUB_FILE):
        shutil.copy(source, dags / source.name)
    home = workdir / "mlops"
    os.environ.update(
        {
            "AIRFLOW_HOME": str(workdir / "airflow"),
            "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "ERROR",
            "MLOPS_HOME": str(home),
            "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
            # Measure full runs: on unchanged data a run would otherwise end early with "no new data".
            "MLOPS_FORCE_RETRAIN": "true",
        }
    )
    return dags


def parse_seconds(path: Path, warm_up: Path, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        out = subprocess.run(
            [sys.executable, "-c", PARSE_PROBE, str(path), str(warm_up)], capture_output=True, text=True, check=True
        ).stdout
        samples.append(float(out.strip().splitlines()[-1]))
    return statistics.median(samples)


def main() -> int:
    options = BenchOptions(__doc__, "one measured run and one parse of each")
    options.size("--runs", full=3, quick=1, meaning="measured runs of each DAG")
    options.size("--parses", full=5, quick=1, meaning="parses of each DAG file")
    args = options.parse()

    workdir = Path(tempfile.mkdtemp(prefix="mlops-bench-"))
    try:
        dags = prepare_environment(workdir)
        from ml.airflow_runner import load_dag, migrate_airflow_db, run_dag

        migrate_airflow_db()
        warm_up = workdir / "warm_up_dag.py"
        warm_up.write_text(WARM_UP_DAG)
        parse_ours = parse_seconds(dags / PIPELINE_FILE.name, warm_up, args.parses)
        parse_stub = parse_seconds(dags / STUB_FILE.name, warm_up, args.parses)
        from ml.settings import Settings

        written_out = workdir / "form_written_out_dag.py"
        written_out.write_text(
            form_dag_source("form_written_out", f"SPECS = {Settings.from_env_or_embedded().param_specs()!r}")
        )
        parse_form_written_out = parse_seconds(written_out, warm_up, args.parses)
        from_settings = workdir / "form_from_settings_dag.py"
        from_settings.write_text(form_dag_source("form_from_settings", SPECS_FROM_SETTINGS))
        parse_form_from_settings = parse_seconds(from_settings, warm_up, args.parses)

        pipeline, stub = load_dag("mlops_pipeline"), load_dag("stub_pipeline")

        def timed(dag) -> tuple[float, float]:
            """The run's wall time, and the part of it spent outside its tasks (Airflow's own work)."""
            started = time.perf_counter()
            run = run_dag(dag=dag)
            elapsed = time.perf_counter() - started
            if run.state != "success":
                raise SystemExit(f"{dag.dag_id} run {run.run_id} ended {run.state}: {run.tasks}")
            return elapsed, elapsed - sum(task.seconds or 0.0 for task in run.tasks.values())

        (cold_ours, _), (cold_stub, _) = timed(pipeline), timed(stub)
        ours, stubs = [], []
        for _ in range(args.runs):
            ours.append(timed(pipeline))
            stubs.append(timed(stub))
        run_ours, run_stub = (statistics.median(wall for wall, _ in runs) for runs in (ours, stubs))
        outside_ours, outside_stub = (statistics.median(outside for _, outside in runs) for runs in (ours, stubs))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print()
    print(f"{'measure':<34}{'mlops_pipeline':>16}{'stub (7 empty)':>16}{'ratio':>9}{'aim':>8}")
    print(
        f"{'DAG file parse, median (ms)':<34}{parse_ours * 1e3:>16.1f}{parse_stub * 1e3:>16.1f}"
        f"{parse_ours / parse_stub:>8.2f}x{'1.2x':>8}"
    )
    for label, seconds in (
        ("  floor: 7 empty tasks + the form", parse_form_written_out),
        ("  same, form built from ml.settings", parse_form_from_settings),
    ):
        print(f"{label:<34}{seconds * 1e3:>16.1f}{parse_stub * 1e3:>16.1f}{seconds / parse_stub:>8.2f}x")
    print(f"{'full run, median (s)':<34}{run_ours:>16.2f}{run_stub:>16.2f}{run_ours / run_stub:>8.2f}x{'1.5x':>8}")
    print(
        f"{'  outside the tasks, median (s)':<34}{outside_ours:>16.2f}{outside_stub:>16.2f}"
        f"{outside_ours / outside_stub:>8.2f}x"
    )
    print(f"{'first run, new MLflow store (s)':<34}{cold_ours:>16.2f}{cold_stub:>16.2f}{cold_ours / cold_stub:>8.2f}x")
    print(
        f"runs: mlops_pipeline {', '.join(f'{wall:.2f}' for wall, _ in ours)}; "
        f"stub {', '.join(f'{wall:.2f}' for wall, _ in stubs)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
