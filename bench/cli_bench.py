"""Benchmark: `mlops status` and `mlops rollback` against `python -c "import mlflow"`, each a fresh process.

The registry (a SQLite store) holds two validated versions with a deployment history, so that every rollback has
something to do: they alternate Production between the two. The three commands alternate too, so that load on the
machine falls on all of them alike; medians are compared. Aim: at most 2x the import.

    .venv/bin/python bench/cli_bench.py [--quick] [--repeats 5]
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

MODEL_NAME = "breast_cancer_classifier"


def build_registry(home: Path) -> dict[str, str]:
    """Two versions that passed validation, version 2 in Production after version 1."""
    env = {
        "MLOPS_HOME": str(home),
        "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
        "MLOPS_MODEL_NAME": MODEL_NAME,
    }
    os.environ.update(env)
    from ml import registry, tags
    from ml.settings import Settings

    settings = Settings.from_env()
    client = registry.client_for(settings)
    registry.ensure_registered_model(client, MODEL_NAME)
    for number in (1, 2):
        client.create_model_version(MODEL_NAME, source=(home / f"model-{number}").as_uri())
        registry.set_version_tags(client, MODEL_NAME, number, {tags.VALIDATION_STATUS: "passed"})
        registry.promote(settings, number, expected_current=number - 1 or None, actor="bench", reason="set-up")
    return env


def seconds(argv: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, env={**os.environ, **env}, check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> int:
    options = BenchOptions(__doc__, "each command run once")
    options.size("--repeats", full=5, quick=1, meaning="runs of each command")
    args = options.parse()

    workdir = Path(tempfile.mkdtemp(prefix="mlops-cli-bench-"))
    mlops = [sys.executable, "-m", "ml.cli"]
    samples: dict[str, list[float]] = {"import mlflow": [], "mlops status": [], "mlops rollback": []}
    try:
        env = build_registry(workdir / "mlops")
        for repeat in range(args.repeats):
            samples["import mlflow"].append(seconds([sys.executable, "-c", "import mlflow"], env))
            samples["mlops status"].append(seconds([*mlops, "status"], env))
            target = "1" if repeat % 2 == 0 else "2"
            samples["mlops rollback"].append(seconds([*mlops, "rollback", "--to", target], env))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    baseline = statistics.median(samples["import mlflow"])
    print()
    print(f"{'command (fresh process)':<28}{'median (s)':>12}{'ratio':>9}{'aim':>7}  samples")
    for label, values in samples.items():
        ratio = statistics.median(values) / baseline
        aim = "" if label == "import mlflow" else "2x"
        listed = ", ".join(f"{value:.2f}" for value in values)
        print(f"{label:<28}{statistics.median(values):>12.2f}{ratio:>8.2f}x{aim:>7}  {listed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
