"""Every benchmark under bench/ runs to its table in its quick mode: one that can no longer run fails here.

What the ratios are is not checked: speed stays a benchmark matter (README, Benchmarks). The benchmarks run at once,
each in its own process on its own temporary stores and ports, as a user runs them (``python bench/<name> --quick``):
together they take about as long as the slowest, where one after the other they would take the sum.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import PYTHON, REPO

BENCH = REPO / "bench"
# Each benchmark's tables: how a table's header line begins, and how each line that must carry a ratio begins, in order.
SHAPES = ["   1   1 |", "   1   8 |", " 100   1 |", " 100   8 |"]
TABLES = {
    "cli_bench.py": [("command (fresh process)", ["import mlflow", "mlops status", "mlops rollback"])],
    "monitor_bench.py": [("process ", ["monitor: observe, judge, MLflow run"])],
    "pipeline_bench.py": [
        (
            "measure ",
            [
                "DAG file parse",
                "  floor: 7 empty tasks",
                "  same, form built from ml.settings",
                "full run",
                "  outside the tasks",
                "first run, new MLflow store",
            ],
        )
    ],
    "registry_bench.py": [("measure (median)", ["pipeline run (s)", "mlops status (s)"])],
    "scale_bench.py": [("process ", ["bare read-split-fit-score", "mlops run (first)", "mlops run (forced retrain)"])],
    "serving_bench.py": [("rows thr | mlflow", SHAPES), ("rows thr | off", SHAPES)],
    "storage_bench.py": [
        (
            "phase ",
            [
                "extract: load_source",
                "snapshot write: write_snapshot",
                "snapshot read: read_frame",
                "all three",
            ],
        )
    ],
    "ui_bench.py": [("executor ", ["WarmLocalExecutor "])],
}
RATIO = re.compile(r"\d+\.\d+x(?!\w)")
# Far above what the slowest takes on a busy 2-core machine, 5 minutes.
TIMEOUT_SECONDS = 900


# Started only by hand: each starts the whole native stack (a minute or two before its first run; tests/test_stack.py
# already proves that stack), too slow for every test run. A cheap test below checks that each still loads and computes.
STACK_BENCHES = ("stack_bench.py",)


def test_every_benchmark_is_checked():
    assert sorted(path.name for path in BENCH.glob("*_bench.py")) == sorted([*TABLES, *STACK_BENCHES])


@pytest.mark.parametrize("script", STACK_BENCHES)
def test_stack_benchmark_loads_and_offers_quick_mode(script: str):
    shown = subprocess.run([PYTHON, str(BENCH / script), "--help"], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert "--quick" in shown.stdout and "--repeats" in shown.stdout


def test_stack_benchmark_reads_the_candidates_span_and_its_floor():
    spec = importlib.util.spec_from_file_location("stack_bench", BENCH / "stack_bench.py")
    stack_bench = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCH))
    sys.modules["stack_bench"] = stack_bench  # its dataclasses look their module up
    try:
        spec.loader.exec_module(stack_bench)
    finally:
        sys.path.remove(str(BENCH))
        del sys.modules["stack_bench"]
    instances = [
        {"task_id": "extract_data", "start_date": "2026-12-04T10:00:00+00:00", "end_date": "2026-12-04T10:00:09+00:00"},
        {
            "task_id": "train_candidate",
            "start_date": "2026-12-04T10:00:10+00:00",
            "end_date": "2026-12-04T10:00:13+00:00",
        },
        {
            "task_id": "train_candidate",
            "start_date": "2026-12-04T10:00:11+00:00",
            "end_date": "2026-12-04T10:00:15.5+00:00",
        },
    ]
    assert stack_bench.span_of(instances, "train_candidate") == (5.5, [3.0, 4.5])
    with pytest.raises(ValueError, match="no busy instance"):
        stack_bench.span_of(instances, "busy")
    # 20 s of which 10 s are the candidates: halving them gives 15 s, 0.75x; not shrinking them, 1.0x.
    assert stack_bench.best_whole_run(20.0, 10.0, 0.5) == 0.75
    assert stack_bench.best_whole_run(20.0, 10.0, 1.0) == 1.0


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[subprocess.Popen, Path]]]:
    """Every benchmark started with --quick, on the environment a user has: none of this session's settings."""
    root = tmp_path_factory.mktemp("bench")
    env = {key: value for key, value in os.environ.items() if not key.startswith(("AIRFLOW", "MLOPS_", "MLFLOW_"))}
    env |= {"MLFLOW_ENABLE_TELEMETRY": "false", "DO_NOT_TRACK": "true"}
    runs = {}
    for script in TABLES:
        output = root / f"{script}.out"
        with output.open("wb") as sink:
            process = subprocess.Popen(
                [PYTHON, str(BENCH / script), "--quick"], cwd=root, env=env, stdout=sink, stderr=subprocess.STDOUT
            )
        runs[script] = (process, output)
    yield runs
    for process, _ in runs.values():
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(TABLES))
def test_benchmark_runs_to_its_table_in_quick_mode(quick_runs, script: str):
    process, output = quick_runs[script]
    try:
        process.wait(timeout=TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        pytest.fail(f"bench/{script} --quick did not end within {TIMEOUT_SECONDS} s:\n{output.read_text()[-3000:]}")
    lines = output.read_text(errors="replace").splitlines()
    tail = "\n".join(lines[-40:])
    assert process.returncode == 0, f"bench/{script} --quick exited with {process.returncode}:\n{tail}"
    for header, rows in TABLES[script]:
        assert any(line.startswith(header) for line in lines), f"no table headed {header!r}:\n{tail}"
        after = next(index for index, line in enumerate(lines) if line.startswith(header))
        for row in rows:
            found = next((line for line in lines[after:] if line.startswith(row)), None)
            assert found is not None, f"no line {row!r} after the table's header {header!r}:\n{tail}"
            assert RATIO.search(found), f"no ratio (a number followed by x) in {found!r}"
