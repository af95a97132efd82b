"""Benchmark: the data of a run read from and snapshotted to S3 against the same from a local folder.

Starts a SeaweedFS S3 server on loopback (tests/s3.py, as the tests do) and writes ``--rows`` (default 1,000,000) rows
shaped like the training data (the Breast Cancer set's 30 float features, drawn around its means, and a 0/1 target)
as one Parquet file into a folder source, once on the local disk and once in a bucket. Then each phase of
extract_data's work, on the local folder and on ``s3://bucket/...`` in turn, each in a fresh process that reaches the
store as a worker does (keys and endpoint from the environment):

- extract: ``ml.data.load_source`` of the folder source;
- snapshot write: ``ml.data.write_snapshot`` into the data store (the content digest, the look for the address,
  ``write_frame``); its frame is made in the process beforehand, untimed;
- snapshot read: ``ml.data.read_frame`` of that snapshot, its content digest checked, as the next task reads it.

Each phase runs ``--repeats`` times (default 3) on each store, the two taking turns, each time into a store of its
own. Prints each one's median wall time (of the call alone) and peak resident memory (the process's, its imports and
untimed set-up included, the same on both sides), the ratios S3/local, and the aims for the three together: at most
1.3x wall and 1.2x memory. s3fs is imported before the timing on both sides (0.5 s, which a process pays once and a
local store never): the phases of one task pay it once, not each. The floor is what moving the snapshot's bytes costs
with s3fs alone: a put and a get of its file.

    .venv/bin/python bench/storage_bench.py [--quick] [--rows 1000000] [--repeats 3] [--keep DIR]
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from options import BenchOptions  # noqa: E402
from s3 import running_weed  # noqa: E402

WALL_AIM = 1.3
MEMORY_AIM = 1.2
SOURCE_FILE = "part-000.parquet"

# The process ends with os._exit once its figures are out: pyarrow's Parquet thread pool can abort the interpreter's
# teardown now and then ("terminate called without an active exception", apache/arrow#34314), after the work is done.
PHASE_SCRIPT = """
import json, os, resource, sys, time
import s3fs
from ml import data
phase, source, store, rows = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
result = {}
if phase == "extract":
    started = time.perf_counter()
    frame = data.load_source(source)
elif phase == "write":
    sys.path.insert(0, "bench")
    from storage_bench import training_rows
    frame = training_rows(rows)
    started = time.perf_counter()
    result["uri"] = data.write_snapshot(frame, store).uri
else:
    started = time.perf_counter()
    frame = data.read_frame(source)
result |= {"seconds": time.perf_counter() - started, "rows": len(frame),
           "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
print(json.dumps(result), flush=True)
os._exit(0)
"""

# The same bytes moved with s3fs alone, reaching the server as the project does (keys, endpoint from the environment);
# the first call, which sets the client up, is timed apart.
FLOOR_SCRIPT = """
import json, sys, time
started = time.perf_counter()
import s3fs
imported = time.perf_counter() - started
local, remote = sys.argv[1], sys.argv[2]
fs = s3fs.S3FileSystem()
started = time.perf_counter()
fs.ls(remote.split("/", 1)[0])
connect = time.perf_counter() - started
started = time.perf_counter()
fs.put_file(local, remote)
put = time.perf_counter() - started
started = time.perf_counter()
fs.get_file(remote, local + ".back")
print(json.dumps({"import": imported, "connect": connect, "put": put, "get": time.perf_counter() - started}))
"""

PHASES = {
    "extract": "extract: load_source of the folder",
    "write": "snapshot write: write_snapshot",
    "read": "snapshot read: read_frame, digest checked",
}


def training_rows(rows: int):
    """``rows`` rows like the Breast Cancer set's: its 30 feature names, values around each one's mean, a 0/1 target."""
    import numpy as np
    import pandas as pd
    from sklearn.datasets import load_breast_cancer

    cancer = load_breast_cancer(as_frame=True).frame
    features = cancer.drop(columns="target")
    rng = np.random.default_rng(0)
    values = rng.normal(features.mean().to_numpy(), features.std().to_numpy(), size=(rows, features.shape[1]))
    frame = pd.DataFrame(values, columns=features.columns)
    frame["target"] = rng.integers(0, 2, rows)
    return frame


def measure(phase: str, source: str, store: str, rows: int, env: dict[str, str]) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", PHASE_SCRIPT, phase, source, store, str(rows)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"the {phase} phase on {store} failed:\n{done.stderr[-3000:]}")
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    assert measured["rows"] == rows, (phase, store, measured)
    return measured


def ratio(s3: float, local: float) -> str:
    return f"{s3 / local:5.2f}x"


def verdict(value: float, aim: float) -> str:
    return f"aim {aim}x: {'met' if value <= aim else 'missed'}"


def main() -> None:
    options = BenchOptions(__doc__ or "", "20,000 rows, each phase once")
    options.size("--rows", full=1_000_000, quick=20_000, meaning="rows of the data")
    options.size("--repeats", full=3, quick=1, meaning="runs of each phase on each store; the median is shown")
    options.parser.add_argument("--keep", type=Path, help="keep the local stores and the server's files in this folder")
    arguments = options.parse()
    home = arguments.keep or Path(tempfile.mkdtemp(prefix="storage-bench-"))
    try:
        with running_weed(home / "weed", Path(sys.executable).parent / "weed") as server:
            bucket = server.create_bucket("storage-bench")
            print(f"writing {arguments.rows:,} rows to a local folder and to s3://{bucket}/ ...")
            source_file = home / "source" / SOURCE_FILE
            source_file.parent.mkdir(parents=True)
            sys.path.insert(0, str(REPO))
            from ml.data import to_parquet

            with source_file.open("wb") as handle:
                to_parquet(training_rows(arguments.rows), handle)
            server.filesystem().put_file(str(source_file), f"{bucket}/source/{SOURCE_FILE}")
            env = {key: value for key, value in os.environ.items() if not key.startswith(("MLOPS_", "MLFLOW_", "AWS_"))}
            env |= server.environment() | {"PYTHONPATH": str(REPO)}
            places = {
                "local": (f"{home / 'source'}/", str(home / "datastore")),
                "S3": (f"s3://{bucket}/source/", f"s3://{bucket}/datastore"),
            }
            runs: dict[str, dict[str, list[dict]]] = {place: {phase: [] for phase in PHASES} for place in places}
            for repeat in range(arguments.repeats):
                for phase in PHASES:
                    for place, (source, store) in places.items():
                        # A store of its own each time: a snapshot already at its address would be read, not written.
                        written = runs[place]["write"][-1]["uri"] if phase == "read" else source
                        runs[place][phase].append(measure(phase, written, f"{store}/{repeat}", arguments.rows, env))
            results = {
                place: {
                    phase: {
                        "seconds": statistics.median(run["seconds"] for run in measured),
                        "peak_mib": statistics.median(run["peak_mib"] for run in measured),
                    }
                    for phase, measured in phases.items()
                }
                for place, phases in runs.items()
            }
            snapshot_file = Path(runs["local"]["write"][0]["uri"])
            floor = subprocess.run(
                [sys.executable, "-c", FLOOR_SCRIPT, str(snapshot_file), f"{bucket}/floor/{snapshot_file.name}"],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            moved = json.loads(floor.stdout.strip().splitlines()[-1])
        size_mb = snapshot_file.stat().st_size / 1e6
        local, s3 = results["local"], results["S3"]
        print(
            f"\n{arguments.rows:,} rows x 31 columns (snapshot {size_mb:.0f} MB of Parquet), a local folder against "
            f"S3 (SeaweedFS on loopback); load average {Path('/proc/loadavg').read_text().split()[0]}"
        )
        print(f"{'phase':<44} {'local s':>8} {'S3 s':>8} {'ratio':>7} {'local MiB':>10} {'S3 MiB':>8} {'ratio':>7}")
        for phase, label in PHASES.items():
            print(
                f"{label:<44} {local[phase]['seconds']:8.2f} {s3[phase]['seconds']:8.2f} "
                f"{ratio(s3[phase]['seconds'], local[phase]['seconds']):>7} {local[phase]['peak_mib']:10.0f} "
                f"{s3[phase]['peak_mib']:8.0f} {ratio(s3[phase]['peak_mib'], local[phase]['peak_mib']):>7}"
            )
        local_wall = sum(local[phase]["seconds"] for phase in PHASES)
        s3_wall = sum(s3[phase]["seconds"] for phase in PHASES)
        local_peak = max(local[phase]["peak_mib"] for phase in PHASES)
        s3_peak = max(s3[phase]["peak_mib"] for phase in PHASES)
        print(
            f"{'all three (wall summed, memory the highest)':<44} {local_wall:8.2f} {s3_wall:8.2f} "
            f"{ratio(s3_wall, local_wall):>7} {local_peak:10.0f} {s3_peak:8.0f} {ratio(s3_peak, local_peak):>7}"
        )
        print(
            f"  {verdict(s3_wall / local_wall, WALL_AIM)} for the wall, {verdict(s3_peak / local_peak, MEMORY_AIM)} "
            "for the memory"
        )
        print(
            f"{'floor: s3fs put of the snapshot file':<44} {'':>8} {moved['put']:8.2f}   "
            f"({size_mb / moved['put']:.0f} MB/s; apart: import s3fs {moved['import']:.2f} s, the client's set-up "
            f"{moved['connect']:.2f} s; the snapshot write on S3 took "
            f"{s3['write']['seconds'] - local['write']['seconds']:+.2f} s over the local one)"
        )
        print(
            f"{'floor: s3fs get of the snapshot file':<44} {'':>8} {moved['get']:8.2f}   "
            f"({size_mb / moved['get']:.0f} MB/s; the reads on S3 took "
            f"{s3['extract']['seconds'] - local['extract']['seconds']:+.2f} s and "
            f"{s3['read']['seconds'] - local['read']['seconds']:+.2f} s over the local ones)"
        )
        floor_wall = local_wall + moved["put"] + 2 * moved["get"]
        print(
            f"{'floor for all three: local + a put + two gets':<44} {local_wall:8.2f} {floor_wall:8.2f} "
            f"{ratio(floor_wall, local_wall):>7}   (the project's own on S3 beyond it: {s3_wall - floor_wall:+.2f} s)"
        )
    finally:
        if arguments.keep is None:
            shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
