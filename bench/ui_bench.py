"""Benchmark: trigger to done in ``airflow standalone`` (``make airflow-ui``), with the warm LocalExecutor and without.

Starts ``airflow standalone`` on a fresh home twice in one invocation: once with Airflow's own LocalExecutor, whose
tasks each import mlflow, scikit-learn and pandas afresh, and once with ``ml.local_executor.WarmLocalExecutor``, what
``make airflow-ui`` uses, whose workers fork the tasks with them already imported. On each, it triggers the stub DAG
(the pipeline's graph, seven empty tasks) and the pipeline through the REST API, as a user's Trigger button does, and
times each run from queued to done as Airflow records it. The first pipeline run of each creates the MLflow store and
is printed apart; the measured pipeline runs retrain (``force_retrain``) on the same data.

    .venv/bin/python bench/ui_bench.py [--runs 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from ui_stack import ADMIN, UiStack  # noqa: E402

from ml.cli import WARM_LOCAL_EXECUTOR  # noqa: E402

EXECUTORS = {"LocalExecutor": "LocalExecutor", "WarmLocalExecutor": WARM_LOCAL_EXECUTOR}
DAG_FILES = (REPO / "dags" / "mlops_pipeline.py", REPO / "bench" / "dags" / "stub_pipeline.py")
RUN_TIMEOUT_SECONDS = 900


class Api:
    """The REST calls a user's browser makes: log in, unpause, trigger, read a run."""

    def __init__(self, stack: UiStack) -> None:
        import httpx

        password = stack.admin_password()
        response = httpx.post(
            f"{stack.airflow_url}/auth/token", json={"username": ADMIN, "password": password}, timeout=30
        )
        response.raise_for_status()
        self.http = httpx.Client(
            base_url=f"{stack.airflow_url}/api/v2",
            headers={"Authorization": f"Bearer {response.json()['access_token']}"},
            timeout=30,
        )

    def wait_for_dag(self, dag_id: str) -> None:
        deadline = time.monotonic() + 240
        while self.http.get(f"/dags/{dag_id}").status_code != 200:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{dag_id} was not parsed within 240 s")
            time.sleep(1)
        self.http.patch(f"/dags/{dag_id}", json={"is_paused": False}).raise_for_status()

    def run_seconds(self, dag_id: str, conf: dict[str, object] | None = None) -> float:
        """Trigger a run and wait for it; its time from queued to done, as Airflow recorded them."""
        response = self.http.post(f"/dags/{dag_id}/dagRuns", json={"logical_date": None, "conf": conf or {}})
        response.raise_for_status()
        run_id = response.json()["dag_run_id"]
        deadline = time.monotonic() + RUN_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            run = self.http.get(f"/dags/{dag_id}/dagRuns/{run_id}").json()
            if run["state"] == "success":
                return (_instant(run["end_date"]) - _instant(run["queued_at"])).total_seconds()
            if run["state"] == "failed":
                raise SystemExit(f"{dag_id} run {run_id} failed")
            time.sleep(0.5)
        raise TimeoutError(f"{dag_id} run {run_id} did not finish within {RUN_TIMEOUT_SECONDS} s")


def _instant(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def measure(executor: str, root: Path, runs: int) -> dict[str, list[float]]:
    dags = root / "dags"
    dags.mkdir(parents=True)
    for source in DAG_FILES:
        shutil.copy(source, dags / source.name)
    stack = UiStack(root=root, extra_env={"AIRFLOW__CORE__DAGS_FOLDER": str(dags), "AIRFLOW__CORE__EXECUTOR": executor})
    stack.start()
    try:
        api = Api(stack)
        for dag_id in ("stub_pipeline", "mlops_pipeline"):
            api.wait_for_dag(dag_id)
        first = [api.run_seconds("stub_pipeline"), api.run_seconds("mlops_pipeline")]
        figures: dict[str, list[float]] = {"first": first, "stub": [], "pipeline": []}
        for _ in range(runs):
            figures["stub"].append(api.run_seconds("stub_pipeline"))
            figures["pipeline"].append(api.run_seconds("mlops_pipeline", {"force_retrain": True}))
        return figures
    finally:
        stack.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="measured runs of each DAG per executor (default 3)")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="mlops-ui-bench-"))
    try:
        results = {name: measure(executor, workdir / name, args.runs) for name, executor in EXECUTORS.items()}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print()
    print(f"{'executor':<20}{'stub (s)':>10}{'pipeline (s)':>14}{'ratio':>8}{'first stub / pipeline (s)':>28}")
    medians = {}
    for name, figures in results.items():
        stub, pipeline = statistics.median(figures["stub"]), statistics.median(figures["pipeline"])
        medians[name] = pipeline
        first = " / ".join(f"{seconds:.1f}" for seconds in figures["first"])
        print(f"{name:<20}{stub:>10.1f}{pipeline:>14.1f}{pipeline / stub:>7.2f}x{first:>28}")
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
