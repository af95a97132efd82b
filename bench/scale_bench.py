"""Benchmark: mlops_pipeline on a large Parquet file against a bare read-split-fit-score script on the same file.

Generates ``--rows`` (default 1,000,000) rows x ``--features`` (default 30) numeric features and a binary label, then
runs, each in a fresh process, one after the other in this invocation:

- the bare script: read the Parquet file, stratified split, fit the same scikit-learn pipeline, score the held-out set;
- ``mlops run`` on an empty registry (no Production: no drift, no champion to compare with);
- ``mlops run --param force_retrain=true`` on the same data (drift and the comparison with Production included).

For the fixed part, the floor that Airflow itself sets: the stub DAG (the pipeline's graph, seven empty tasks) run the
same way as ``mlops run``, in a fresh process that prepares its own Airflow database, on a new database just before the
first run and on the existing one just before the forced retrain, so that each pair is measured at the same machine
speed. Most of it is the in-process execution API that ``dag.test()`` builds for the first task of a process, and
importing Airflow.

Prints wall time and peak memory (largest resident set of the process and the processes it waited for) of each, their
ratios to the bare script, and each pipeline task's duration from Airflow's metadata database.
Aim: at most 1.5x the bare time plus a fixed overhead under 10 s; peak memory at most 1.5x the bare script's.

    .venv/bin/python bench/scale_bench.py [--quick] [--rows 1000000] [--features 30] [--keep DIR]
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from options import BenchOptions

LABEL = "label"

BARE_SCRIPT = """
import json, sys
import pandas as pd
from sklearn.metrics import accuracy_score
from sklearn.model_selection import train_test_split
from ml.training import build_pipeline

path, label = sys.argv[1], sys.argv[2]
frame = pd.read_parquet(path)
features = [c for c in frame.columns if c != label]
train, test = train_test_split(frame, test_size=0.2, random_state=42, stratify=frame[label])
pipeline = build_pipeline("logistic_regression", {}, 42)
pipeline.fit(train[features], train[label])
print(json.dumps({"accuracy": accuracy_score(test[label], pipeline.predict(test[features]))}))
"""

# Airflow alone, cold: what `mlops run` does (prepare the Airflow database and start the in-process execution API,
# with the heap frozen after them, parse, dag.test()) for seven empty tasks.
STUB_RUN_SCRIPT = """
import sys
from ml.airflow_runner import load_dag, prepare_in_process_runs, run_dag

prepare_in_process_runs()
run = run_dag(dag=load_dag("stub_pipeline"))
sys.exit(0 if run.state == "success" else 1)
"""
STUB_FILE = Path(__file__).resolve().parent / "dags" / "stub_pipeline.py"


def generate(path: Path, rows: int, features: int, seed: int = 7) -> None:
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    values = rng.standard_normal((rows, features))
    weights = rng.standard_normal(features)
    frame = pd.DataFrame(values, columns=[f"f{i:02d}" for i in range(features)])
    frame[LABEL] = ((values @ weights + rng.standard_normal(rows) * 2.0) > 0).astype("int64")
    frame.to_parquet(path, index=False)


def measured(argv: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """Wall seconds, peak resident memory in MB (the process and the children it waited for), and stdout."""
    started = time.perf_counter()
    with tempfile.TemporaryFile() as out:
        process = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.DEVNULL)
        _, status, usage = os.wait4(process.pid, 0)
        elapsed = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read().decode(errors="replace")
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:4])} failed with exit code {process.returncode}:\n{text[-3000:]}")
    return elapsed, usage.ru_maxrss / 1024, text


def task_durations(airflow_db: Path) -> dict[str, float]:
    """Each task's duration in the latest run of mlops_pipeline."""
    with sqlite3.connect(airflow_db) as connection:
        (run_id,) = connection.execute(
            "SELECT run_id FROM dag_run WHERE dag_id = 'mlops_pipeline' ORDER BY id DESC LIMIT 1"
        ).fetchone()
        rows = connection.execute(
            "SELECT task_id, start_date, end_date FROM task_instance WHERE dag_id = 'mlops_pipeline' AND run_id = ?",
            (run_id,),
        ).fetchall()
    return {
        task: (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()
        for task, start, end in rows
        if start and end
    }


def main() -> int:
    options = BenchOptions(__doc__, "2,000 rows")
    options.size("--rows", full=1_000_000, quick=2_000, meaning="rows of the generated data set")
    options.parser.add_argument("--features", type=int, default=30, help="numeric features (default 30)")
    options.parser.add_argument(
        "--keep", type=Path, help="keep the data and stores in this folder (default: a temporary one)"
    )
    args = options.parse()

    workdir = args.keep or Path(tempfile.mkdtemp(prefix="mlops-scale-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    data = workdir / "data.parquet"
    home = workdir / "mlops"
    env = {
        **os.environ,
        "MLOPS_HOME": str(home),
        "AIRFLOW_HOME": str(home / "airflow"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
        "MLOPS_DATA_SOURCE": str(data),
        "MLOPS_LABEL_COLUMN": LABEL,
        "MLOPS_MODEL_NAME": "scale_bench_classifier",
    }
    mlops = [sys.executable, "-m", "ml.cli", "run"]
    results: dict[str, tuple[float, float]] = {}
    durations: dict[str, dict[str, float]] = {}
    floors: dict[str, float] = {}
    try:
        started = time.perf_counter()
        generate(data, args.rows, args.features)
        print(
            f"{args.rows:,} rows x {args.features} features: {data.stat().st_size / 1e6:.0f} MB of Parquet "
            f"written in {time.perf_counter() - started:.1f} s",
            flush=True,
        )
        seconds, peak, out = measured([sys.executable, "-c", BARE_SCRIPT, str(data), LABEL], env)
        results["bare read-split-fit-score"] = (seconds, peak)
        print(f"bare script: {seconds:.1f} s, accuracy {json.loads(out.splitlines()[-1])['accuracy']:.4f}", flush=True)
        stub_dags = workdir / "stub_dags"
        stub_dags.mkdir(exist_ok=True)
        shutil.copy(STUB_FILE, stub_dags / STUB_FILE.name)
        stub_home = workdir / "stub"
        stub_env = {
            **env,
            "MLOPS_HOME": str(stub_home),
            "AIRFLOW_HOME": str(stub_home / "airflow"),
            "AIRFLOW__CORE__DAGS_FOLDER": str(stub_dags),
        }
        (stub_home / "airflow").mkdir(parents=True, exist_ok=True)
        runs = (
            ("stub, new database", "mlops run (first)", []),
            ("stub, again", "mlops run (forced retrain)", ["--param", "force_retrain=true"]),
        )
        for floor, label, extra in runs:
            floors[floor], _, _ = measured([sys.executable, "-c", STUB_RUN_SCRIPT], stub_env)
            print(f"Airflow alone: {floor}: {floors[floor]:.1f} s", flush=True)
            seconds, peak, _ = measured([*mlops, *extra], env)
            results[label] = (seconds, peak)
            durations[label] = task_durations(home / "airflow" / "airflow.db")
            print(f"{label}: {seconds:.1f} s", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    bare_seconds, bare_peak = results["bare read-split-fit-score"]
    print()
    print(f"{'process':<30}{'wall (s)':>10}{'x bare':>9}{'over 1.5x bare (s)':>20}{'peak MB':>10}{'x bare':>9}")
    for label, (seconds, peak) in results.items():
        print(
            f"{label:<30}{seconds:>10.1f}{seconds / bare_seconds:>8.2f}x{seconds - 1.5 * bare_seconds:>20.1f}"
            f"{peak:>10.0f}{peak / bare_peak:>8.2f}x"
        )
    print("aim: wall <= 1.5x bare + 10 s (last column but one under 10); peak memory <= 1.5x bare")
    print()
    print(f"{'fixed part: Airflow alone':<30}{'wall (s)':>10}")
    for label, seconds in floors.items():
        print(f"{label:<30}{seconds:>10.1f}")
    first, forced = results["mlops run (first)"][0], results["mlops run (forced retrain)"][0]
    print(
        "over 1.5x bare beyond Airflow alone: "
        f"first run {first - 1.5 * bare_seconds - floors['stub, new database']:.1f} s, "
        f"forced retrain {forced - 1.5 * bare_seconds - floors['stub, again']:.1f} s"
    )
    for label, tasks in durations.items():
        listed = ", ".join(f"{task} {seconds:.1f}" for task, seconds in sorted(tasks.items(), key=lambda kv: kv[0]))
        print(f"{label} task seconds: {listed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
