"""Our model server against ``mlflow models serve`` on the same registered model, under the same load.

    .venv/bin/python bench/serving_bench.py [--quick] [--seconds 16] [--rounds 8] [--warm-up 0.5] [--poll-interval 2]

In one run, on a temporary MLflow store (SQLite), the pipeline's own steps (``ml.steps``, as the DAG's tasks call
them, without Airflow) train, register and validate two versions on the bundled breast cancer data: version 1 is
deployed to Production, version 2 (stronger regularisation) is left a candidate. Both servers start on
``models:/<name>@production``. Each is driven with single-row and 100-row requests from 1 and 8 threads (one
keep-alive httpx client per thread), the servers taking turns in rounds, and the table gives throughput, p50 and p99
latency and the ratios ours/mlflow.
Ours runs twice, side by side: without recording (the first table) and recording every request with its features
(``MLOPS_RECORDING_SAMPLE_RATE=1``) into the data store; the second table gives the ratios recording on/off, and the
records written and dropped.
Last, Production moves to version 2 and back (a promotion, then a rollback), and the time from each alias change to
the first answer from the new version on our server is measured. Every process started here is stopped, also on error.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import httpx
from options import BenchOptions
from prometheus_client.parser import text_string_to_metric_families
from sklearn.datasets import load_breast_cancer

from ml import registry, steps
from ml.context import RunContext
from ml.settings import Settings

BIN = Path(sys.executable).parent
RECORDING = "ours, recording"
SERVERS = ("mlflow", "ours", RECORDING)
LOAD_SHAPES = ((1, 1), (1, 8), (100, 1), (100, 8))
# Version 2's run: the same data, retrained with another regularisation so that it is a different model.
CANDIDATE_PARAMS = {"force_retrain": True, "hyperparameters": {"C": 0.1}}


@dataclass(frozen=True)
class LoadResult:
    requests: int
    failures: int
    seconds: float
    latencies: list[float]
    sent: int  # the warm-up's requests included
    cpu_seconds: float = 0.0  # the server process's over the load shape (0 where the system does not say)

    @classmethod
    def joined(cls, parts: list[LoadResult]) -> LoadResult:
        return cls(
            sum(part.requests for part in parts),
            sum(part.failures for part in parts),
            sum(part.seconds for part in parts),
            [latency for part in parts for latency in part.latencies],
            sum(part.sent for part in parts),
        )

    @property
    def cpu_ms_per_request(self) -> float:
        return self.cpu_seconds * 1000 / max(1, self.sent)

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds

    def percentile(self, fraction: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] * 1000


def train_and_register(settings: Settings) -> None:
    """Version 1 trained, validated and deployed, version 2 trained and validated, by the pipeline's own steps."""
    for run_id, params, deploy in (("serving-bench-1", {}, True), ("serving-bench-2", CANDIDATE_PARAMS, False)):
        run = RunContext("mlops_pipeline", run_id, 1, params)
        configured = settings.for_run(params)
        transformed = steps.transform(configured, run, steps.extract(configured, run))
        trained = steps.train(configured, run, transformed)
        validated = steps.validate(configured, run, trained, transformed)
        if not validated.passed:
            raise SystemExit(f"version {trained.model_version} failed validation: {validated.reasons}")
        if deploy and not steps.deploy(configured, run, validated, transformed).deployed:
            raise SystemExit(f"version {trained.model_version} was not deployed")


def request_bodies() -> dict[int, bytes]:
    features = load_breast_cancer(as_frame=True).data
    return {
        rows: json.dumps(
            {"dataframe_split": {"columns": list(features.columns), "data": features.head(rows).values.tolist()}}
        ).encode()
        for rows in (1, 100)
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def started(command: list[str], env: dict[str, str], log_path: Path) -> Iterator[subprocess.Popen]:
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield process
    finally:
        stop(process)


def wait_until_ready(url: str, process: subprocess.Popen, log_path: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url} exited with {process.returncode}; log:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} not ready within {timeout} s; log:\n{log_path.read_text()[-3000:]}")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    except ProcessLookupError:
        pass


def drive(url: str, body: bytes, threads: int, seconds: float, warm_up: float) -> LoadResult:
    """``threads`` clients, each sending requests back to back; counts those sent after the warm-up.

    Each client sends at least one counted request, also when one request outlasts a short window (``--quick``).
    """
    started = time.perf_counter()
    measure_from, stop_at = started + warm_up, started + warm_up + seconds
    latencies: list[list[float]] = [[] for _ in range(threads)]
    failures = [0] * threads
    sent = [0] * threads

    def client(index: int) -> None:
        with httpx.Client(headers={"content-type": "application/json"}, timeout=30) as session:
            while (now := time.perf_counter()) < stop_at or not latencies[index]:
                try:
                    ok = session.post(f"{url}/invocations", content=body).status_code == 200
                except httpx.HTTPError:
                    ok = False
                sent[index] += 1
                if now >= measure_from:
                    latencies[index].append(time.perf_counter() - now)
                    failures[index] += not ok

    workers = [threading.Thread(target=client, args=(index,)) for index in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    merged = [latency for per_thread in latencies for latency in per_thread]
    return LoadResult(len(merged) - sum(failures), sum(failures), seconds, merged, sum(sent))


def time_to_new_version(url: str, version: int, move: Callable[[], object]) -> float:
    """Seconds from ``move()`` returning (the alias has moved) to the first answer carrying ``version``."""
    body = request_bodies()[1]
    with httpx.Client(headers={"content-type": "application/json"}, timeout=30) as session:
        move()
        moved = time.perf_counter()
        while time.perf_counter() - moved < 120:
            if session.post(f"{url}/invocations", content=body).headers.get("x-model-version") == str(version):
                return time.perf_counter() - moved
            time.sleep(0.005)
    raise TimeoutError(f"version {version} never answered")


def main(argv: list[str] | None = None) -> int:
    options = BenchOptions(__doc__, "0.2 s of load per shape after 0.1 s of warm-up, our server polling every 0.5 s")
    options.size("--seconds", full=16.0, quick=0.2, meaning="measured seconds per load shape and server", convert=float)
    options.size("--warm-up", full=0.5, quick=0.1, meaning="unmeasured seconds before each round", convert=float)
    options.size(
        "--rounds",
        full=8,
        quick=1,
        meaning="rounds per load shape, the servers taking turns, so that a change in the machine's load falls on all",
    )
    options.size(
        "--poll-interval", full=2.0, quick=0.5, meaning="seconds between our server's registry polls", convert=float
    )
    arguments = options.parse(argv)

    with tempfile.TemporaryDirectory(prefix="serving-bench-") as root, ExitStack() as servers:
        home = Path(root)
        environ = {key: value for key, value in os.environ.items() if not key.startswith(("MLOPS_", "MLFLOW_"))}
        environ |= {"MLOPS_HOME": str(home), "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}"}
        settings = Settings.from_env(environ)
        print(f"training and registering 2 versions of {settings.model_name} in {home} ...", flush=True)
        train_and_register(settings)

        urls = {name: f"http://127.0.0.1:{free_port()}" for name in SERVERS}
        model_uri = f"models:/{settings.model_name}@{settings.production_alias}"
        ours = [sys.executable, "-m", "ml.serving", "--poll-interval", str(arguments.poll_interval)]
        commands = {
            "mlflow": [str(BIN / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local"],
            "ours": ours,
            RECORDING: ours,
        }
        # mlflow models serve starts `uvicorn` from PATH.
        path = f"{BIN}{os.pathsep}{environ.get('PATH', '')}"
        environ |= {"MLFLOW_ENABLE_TELEMETRY": "false", "DO_NOT_TRACK": "true", "PATH": path}
        recording = {
            "mlflow": {},
            "ours": {"MLOPS_RECORDING": "false"},
            RECORDING: {
                "MLOPS_RECORDING": "true",
                "MLOPS_RECORDING_SAMPLE_RATE": "1",
                "MLOPS_RECORDING_FEATURES": "true",
            },
        }
        processes = {}
        for name in SERVERS:
            port = urls[name].rsplit(":", 1)[1]
            command = [*commands[name], "-p" if name == "mlflow" else "--port", port]
            print(f"starting {name}: {' '.join(command)}", flush=True)
            log_path = home / f"{name}.log"
            processes[name] = servers.enter_context(started(command, environ | recording[name], log_path))
        # All start at once: the load begins only when all answer.
        for name, process in processes.items():
            wait_until_ready(f"{urls[name]}/ping", process, home / f"{name}.log")

        bodies = request_bodies()
        results: dict[tuple[str, int, int], LoadResult] = {}
        for rows, threads in LOAD_SHAPES:
            print(f"  {rows} row(s), {threads} thread(s): {arguments.rounds} round(s) of each server ...", flush=True)
            slices: dict[str, list[LoadResult]] = {name: [] for name in SERVERS}
            cpu_before = {name: cpu_seconds(process.pid) for name, process in processes.items()}
            for _ in range(arguments.rounds):
                for name in SERVERS:
                    seconds = arguments.seconds / arguments.rounds
                    slices[name].append(drive(urls[name], bodies[rows], threads, seconds, arguments.warm_up))
            record_counts(urls[RECORDING])  # the shape's records written: their cost is the shape's
            for name, parts in slices.items():
                spent = cpu_seconds(processes[name].pid) - cpu_before[name]
                results[name, rows, threads] = replace(LoadResult.joined(parts), cpu_seconds=spent)
        print_table(results)
        print_recording_table(results, record_counts(urls[RECORDING]))

        promote = partial(registry.promote, settings, 2, expected_current=1, actor="bench", reason="swap")
        rollback = partial(registry.restore, settings, failed_version=2, restore_to=1, actor="bench", reason="back")
        promoted_after = time_to_new_version(urls["ours"], 2, promote)
        rolled_back_after = time_to_new_version(urls["ours"], 1, rollback)
        poll = arguments.poll_interval
        print(
            f"\nalias change -> first answer from the new version on ours (poll interval {poll:g} s):\n"
            f"  promotion 1 -> 2 (new version loaded): {promoted_after:.2f} s\n"
            f"  rollback 2 -> 1 (previous version kept loaded): {rolled_back_after:.2f} s"
        )
    return 0


def print_table(results: dict[tuple[str, int, int], LoadResult]) -> None:
    print(
        f"\n{'rows':>4} {'thr':>3} | {'mlflow req/s':>12} {'p50 ms':>7} {'p99 ms':>7} | "
        f"{'ours req/s':>10} {'p50 ms':>7} {'p99 ms':>7} | {'x req/s':>7} {'p99 ratio':>9} | failures"
    )
    for rows, threads in LOAD_SHAPES:
        theirs, ours = results["mlflow", rows, threads], results["ours", rows, threads]
        print(
            f"{rows:>4} {threads:>3} | {theirs.throughput:>12.0f} {theirs.percentile(0.5):>7.1f} "
            f"{theirs.percentile(0.99):>7.1f} | {ours.throughput:>10.0f} {ours.percentile(0.5):>7.1f} "
            f"{ours.percentile(0.99):>7.1f} | {ours.throughput / theirs.throughput:>6.2f}x "
            f"{ours.percentile(0.99) / theirs.percentile(0.99):>8.2f}x | {theirs.failures}/{ours.failures}"
        )


def cpu_seconds(pid: int) -> float:
    """CPU time a process has used, user and system (Linux's /proc; 0 elsewhere). Unlike throughput, it hardly
    changes with what else the machine runs, so it shows what recording costs on a busy machine too."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def record_counts(url: str) -> dict[str, float]:
    """The recording server's record counters, read after every request has been answered and its records written."""
    counters = ("records_recorded", "records_flushed", "records_dropped")

    def read() -> dict[str, float]:
        families = text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text)
        wanted = {f"mlops_serving_{name}": name for name in counters}
        return {wanted[f.name]: sum(s.value for s in f.samples) for f in families if f.name in wanted}

    deadline = time.monotonic() + 30
    counts = read()
    while counts["records_flushed"] + counts["records_dropped"] < counts["records_recorded"]:
        if time.monotonic() > deadline:
            break
        time.sleep(0.5)
        counts = read()
    return counts


def print_recording_table(results: dict[tuple[str, int, int], LoadResult], counts: dict[str, float]) -> None:
    print(
        f"\nrecording every request (sampling 1.0, features on) against not recording, ours:\n"
        f"{'rows thr | off req/s':<21} {'p99 ms':>7} | {'on req/s':>9} {'p99 ms':>7} | {'x req/s':>7} {'p99 ratio':>9} "
        f"| {'CPU ms/request off':>18} {'on':>5} {'ratio':>6}"
    )
    for rows, threads in LOAD_SHAPES:
        off, on = results["ours", rows, threads], results[RECORDING, rows, threads]
        print(
            f"{rows:>4} {threads:>3} | {off.throughput:>9.0f} {off.percentile(0.99):>7.1f} | "
            f"{on.throughput:>9.0f} {on.percentile(0.99):>7.1f} | {on.throughput / off.throughput:>6.2f}x "
            f"{on.percentile(0.99) / off.percentile(0.99):>8.2f}x | {off.cpu_ms_per_request:>18.2f} "
            f"{on.cpu_ms_per_request:>5.2f} {on.cpu_ms_per_request / max(off.cpu_ms_per_request, 1e-9):>5.2f}x"
        )
    print(
        f"records (one per scored row): {counts['records_recorded']:.0f} recorded, "
        f"{counts['records_flushed']:.0f} written, {counts['records_dropped']:.0f} dropped"
    )


if __name__ == "__main__":
    raise SystemExit(main())
