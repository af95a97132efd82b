"""Benchmark: mlops_monitor's work on one window of recorded traffic against reading the same records with pandas alone.

Writes ``--requests`` (default 1,000,000) one-row requests of ``--features`` (default 30) numeric features into one
hour of a data store, in batches of 1,000 requests as the model server writes them (ml/records.py's writer), labels
``--labelled`` of them (default 10 %) through the feedback writer, and a training snapshot of 100,000 rows for the
version. Then, each in a fresh process, one after the other:

- pandas alone: ``pd.read_parquet`` of the hour's folder (the same rows, every column);
- the monitor, timed from the end of its imports (the project's workers import mlflow and pandas before a task
  starts), on an MLflow store made beforehand: ``ml.monitor.observe`` (read the window's records and labels, drift
  against the snapshot, live accuracy), ``judge`` and the window's MLflow run (a local SQLite store), as judge_window
  does for the Production version; the registry read is left out.

Prints each one's wall time (from its imports done to its end) and peak resident memory, and the monitor's ratio to
pandas alone. Aim: the monitor at most 30 s and 2 GB on 1,000,000 requests.

    .venv/bin/python bench/monitor_bench.py [--quick] [--requests 1000000] [--features 30] [--keep DIR]
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from options import BenchOptions

REPO = Path(__file__).resolve().parent.parent
BATCH = 1000
WINDOW_END = "2026-12-04T13:00:00+00:00"

PANDAS_SCRIPT = """
import json, resource, sys, time
import pandas as pd
started = time.perf_counter()
frame = pd.read_parquet(sys.argv[1])
print(json.dumps({"seconds": time.perf_counter() - started, "rows": len(frame),
                  "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

# The MLflow store and the monitor's experiment made beforehand, as a deployment has them.
PREPARE_SCRIPT = """
from ml import monitor, tracking
from ml.settings import Settings
settings = Settings.from_env()
tracking.connect(settings, settings.monitor_experiment, monitor.EXPERIMENT_DESCRIPTION)
"""

# Timed from the end of its imports, mlflow's included: the project's workers have them imported before a task starts.
MONITOR_SCRIPT = """
import json, resource, sys, time
from datetime import datetime
import mlflow
from ml import monitor, registry, tags
from ml.context import RunContext
from ml.settings import Settings
started = time.perf_counter()
settings = Settings.from_env()
end = datetime.fromisoformat(sys.argv[2])
window = monitor.window_of_run(settings, sys.argv[2], end)
version = registry.VersionInfo(1, "Production", ("production",), None, None, end, {
    tags.DATA_SNAPSHOT_URI: sys.argv[1], tags.VALIDATION_ACCURACY: "0.97"})
seen, report = monitor.observe(settings, window, version)
verdict = monitor.judge(seen, monitor.Rules.of(settings))
run = RunContext("mlops_monitor", "bench", 1, {})
monitor._log_window(settings, run, window, seen, verdict, report, None)
print(json.dumps({"seconds": time.perf_counter() - started, "rows": seen.rows, "labelled": seen.labelled,
                  "drifted": len(seen.drifted), "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def write_traffic(home: Path, requests: int, features: int, labelled: int) -> tuple[str, Path]:
    """The window's records and labels, and the version's training snapshot; (snapshot URI, the hour's folder)."""
    import numpy as np
    import pandas as pd

    sys.path.insert(0, str(REPO))
    from ml import data, records

    store = str(home / "datastore")
    rng = np.random.default_rng(0)
    names = [f"f{i}" for i in range(features)]
    snapshot = pd.DataFrame(rng.normal(size=(100_000, features)), columns=names)
    snapshot["target"] = rng.integers(0, 2, len(snapshot))
    snapshot_uri = f"{store}/reference.parquet"
    data.write_frame(snapshot, snapshot_uri)
    template = [
        records.Answered(f"t{i}", 0.0, "bench_model", 1, [0], pd.DataFrame(np.zeros((1, features)), columns=names))
        for i in range(BATCH)
    ]
    start = pd.Timestamp(WINDOW_END) - pd.Timedelta(minutes=50)
    written = 0
    while written < requests:
        size = min(BATCH, requests - written)
        rows = records.records_frame(template[:size])
        rows["request_id"] = [f"r{written + i}" for i in range(size)]
        rows["received_at"] = start + pd.to_timedelta(np.arange(written, written + size) % 2_400_000, unit="ms")
        rows["prediction"] = rng.integers(0, 2, size).astype(str)
        # A shift on half the features: the monitor has drift to find.
        values = rng.normal(size=(size, features))
        values[:, : features // 2] += 0.5
        rows[[f"{records.FEATURE_PREFIX}{name}" for name in names]] = values
        uri = records.write_record_batch(store, rows)
        written += size
    chosen = rng.choice(requests, size=labelled, replace=False)
    labels = [(f"r{i}", 0, int(rng.integers(0, 2)), 1) for i in chosen]
    records.write_feedback(store, records.labels_frame(labels, "bench_model"))
    return snapshot_uri, Path(uri).parent


def run(script: str, arguments: list[str], env: dict[str, str]) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, "-c", script, *arguments], env=env, cwd=REPO, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"a measured process failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    options = BenchOptions(__doc__ or "", "10,000 requests")
    options.size("--requests", full=1_000_000, quick=10_000, meaning="recorded requests in the window")
    options.size("--features", full=30, quick=30, meaning="features of each request")
    options.parser.add_argument("--keep", type=Path, help="keep the stores in this folder")
    arguments = options.parse()
    home = arguments.keep or Path(tempfile.mkdtemp(prefix="monitor-bench-"))
    try:
        labelled = arguments.requests // 10
        print(f"writing {arguments.requests:,} requests x {arguments.features} features, {labelled:,} labelled ...")
        snapshot_uri, hour = write_traffic(home, arguments.requests, arguments.features, labelled)
        env = {key: value for key, value in os.environ.items() if not key.startswith(("MLOPS_", "MLFLOW_"))}
        env |= {
            "MLOPS_HOME": str(home),
            "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
            "PYTHONPATH": str(REPO),
            "MLFLOW_ENABLE_TELEMETRY": "false",
        }
        subprocess.run([sys.executable, "-c", PREPARE_SCRIPT], env=env, cwd=REPO, capture_output=True, check=True)
        baseline = run(PANDAS_SCRIPT, [str(hour)], env)
        measured = run(MONITOR_SCRIPT, [snapshot_uri, WINDOW_END], env)
        assert measured["rows"] == baseline["rows"] == arguments.requests, (baseline, measured)
        print(f"\nthe monitor's window on {arguments.requests:,} requests ({measured['labelled']:,.0f} labelled)")
        print(f"{'process':<44} {'seconds':>8} {'peak MiB':>9} {'ratio':>7}")
        print(f"{'pandas alone: read_parquet of the hour':<44} {baseline['seconds']:8.2f} {baseline['peak_mib']:9.0f}")
        ratio = measured["seconds"] / baseline["seconds"]
        memory = measured["peak_mib"] / baseline["peak_mib"]
        print(
            f"{'monitor: observe, judge, MLflow run':<44} {measured['seconds']:8.2f} {measured['peak_mib']:9.0f} "
            f"{ratio:6.2f}x  (memory {memory:.2f}x; {measured['drifted']:.0f} features drifted)"
        )
    finally:
        if arguments.keep is None:
            shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
