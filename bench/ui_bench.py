"""Benchmark: trigger to done in ``airflow standalone`` (``make airflow-ui``), with the warm LocalExecutor and without.

Starts ``airflow standalone`` on a fresh home twice in one invocation: once with Airflow's own LocalExecutor, whose
tasks each import mlflow, scikit-learn and pandas afresh, and once with ``ml.local_executor.WarmLocalExecutor``, what
``make airflow-ui`` uses, whose workers fork the tasks with them already imported. On each, it triggers the stub DAG
(the pipeline's graph, seven empty tasks) and the pipeline through the REST API, as a user's Trigger button does, and
times each run from queued to done as Airflow records it. A first run of each DAG on each (the pipeline's creates the
MLflow store) is printed apart; the measured pipeline runs retrain (``force_retrain``) on the same data.

    .venv/bin/python bench/ui_bench.py [--quick] [--runs 3] [--first-runs 1]

``--quick`` starts it once, with the warm executor (what ``make airflow-ui`` runs): Airflow's own differs by one
setting, and its pipeline run, each task importing afresh, is the slowest part of the benchmark. Its table then has
the one row, and no comparison of the two.
"""

from __future__ import annotations

import shutil
import statistics
import sys
import tempfile
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from airflow_api import Airflow  # noqa: E402
from options import BenchOptions  # noqa: E402
from stack import wait_until  # noqa: E402
from ui_stack import ADMIN, UiStack  # noqa: E402

from ml.cli import WARM_LOCAL_EXECUTOR  # noqa: E402

EXECUTORS = {"LocalExecutor": "LocalExecutor", "WarmLocalExecutor": WARM_LOCAL_EXECUTOR}
QUICK_EXECUTORS = ("WarmLocalExecutor",)
DAG_FILES = (REPO / "dags" / "mlops_pipeline.py", REPO / "bench" / "dags" / "stub_pipeline.py")


def wait_for_dag(api: Airflow, dag_id: str) -> None:
    """Wait until the DAG processor has parsed the DAG, then unpause it."""
    wait_until(lambda: api.http.get(f"/dags/{dag_id}").status_code == 200, 240, f"{dag_id} to be parsed")
    api.unpause(dag_id)


def run_seconds(api: Airflow, dag_id: str, conf: dict[str, object] | None = None) -> float:
    """Trigger a run and wait for it; its time from queued to done, as Airflow recorded them."""
    run_id = api.trigger(dag_id, conf)
    if api.wait_for_run(dag_id, run_id) != "success":
        raise SystemExit(f"{dag_id} run {run_id} failed")
    run = api.get(f"/dags/{dag_id}/dagRuns/{run_id}")
    return (_instant(run["end_date"]) - _instant(run["queued_at"])).total_seconds()


def _instant(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def measure(executor: str, root: Path, runs: int, first_runs: int) -> dict[str, list[float]]:
    dags = root / "dags"
    dags.mkdir(parents=True)
    for source in DAG_FILES:
        shutil.copy(source, dags / source.name)
    stack = UiStack(root=root, extra_env={"AIRFLOW__CORE__DAGS_FOLDER": str(dags), "AIRFLOW__CORE__EXECUTOR": executor})
    stack.start()
    try:
        api = Airflow(stack.airflow_url, ADMIN, stack.admin_password())
        for dag_id in ("stub_pipeline", "mlops_pipeline"):
            wait_for_dag(api, dag_id)
        figures: dict[str, list[float]] = {"first": [], "stub": [], "pipeline": []}
        for _ in range(first_runs):
            figures["first"] += [run_seconds(api, "stub_pipeline"), run_seconds(api, "mlops_pipeline")]
        for _ in range(runs):
            figures["stub"].append(run_seconds(api, "stub_pipeline"))
            figures["pipeline"].append(run_seconds(api, "mlops_pipeline", {"force_retrain": True}))
        return figures
    finally:
        stack.stop()


def main() -> int:
    options = BenchOptions(__doc__, "the warm executor alone, one run of each DAG, none before")
    options.size("--runs", full=3, quick=1, meaning="measured runs of each DAG per executor")
    options.size("--first-runs", full=1, quick=0, meaning="unmeasured runs of each DAG per executor, before those")
    args = options.parse()

    workdir = Path(tempfile.mkdtemp(prefix="mlops-ui-bench-"))
    try:
        executors = {name: EXECUTORS[name] for name in QUICK_EXECUTORS} if args.quick else EXECUTORS
        results = {
            name: measure(executor, workdir / name, args.runs, args.first_runs) for name, executor in executors.items()
        }
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print()
    print(f"{'executor':<20}{'stub (s)':>10}{'pipeline (s)':>14}{'ratio':>8}{'first stub / pipeline (s)':>28}")
    medians = {}
    for name, figures in results.items():
        stub, pipeline = statistics.median(figures["stub"]), statistics.median(figures["pipeline"])
        medians[name] = pipeline
        first = " / ".join(f"{seconds:.1f}" for seconds in figures["first"]) or "none"
        print(f"{name:<20}{stub:>10.1f}{pipeline:>14.1f}{pipeline / stub:>7.2f}x{first:>28}")
    if medians.keys() == EXECUTORS.keys():
        print(
            f"pipeline, warm / Airflow's LocalExecutor: {medians['WarmLocalExecutor'] / medians['LocalExecutor']:.2f}x "
            f"(medians of {args.runs})"
        )
    for name, figures in results.items():
        print(
            f"runs, {name}: stub {', '.join(f'{s:.1f}' for s in figures['stub'])}; "
            f"pipeline {', '.join(f'{s:.1f}' for s in figures['pipeline'])}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
