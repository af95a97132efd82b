"""Who is running: the Airflow DAG run behind a step, and the code revision, for lineage."""

from __future__ import annotations

import functools
import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from ml import tags


@dataclass(frozen=True)
class RunContext:
    dag_id: str
    run_id: str
    try_number: int
    params: Mapping[str, Any]
    declared_params: frozenset[str] = frozenset()

    @property
    def run_key(self) -> str:
        return f"{self.dag_id}/{self.run_id}"

    @property
    def actor(self) -> str:
        return f"airflow:{self.run_key}"

    @property
    def airflow_url(self) -> str:
        base = os.environ.get("AIRFLOW__API__BASE_URL", "http://localhost:8080").rstrip("/")
        return f"{base}/dags/{self.dag_id}/runs/{self.run_id}"

    def lineage_tags(self) -> dict[str, str]:
        return {
            tags.AIRFLOW_DAG_ID: self.dag_id,
            tags.AIRFLOW_RUN_ID: self.run_id,
            tags.AIRFLOW_TRY_NUMBER: str(self.try_number),
            tags.AIRFLOW_RUN_KEY: self.run_key,
            tags.AIRFLOW_URL: self.airflow_url,
            tags.CODE_REVISION: code_revision(),
        }


@functools.cache
def code_revision() -> str:
    """The git commit of the checkout this code runs from, else the installed package version."""
    repo = Path(__file__).resolve().parent.parent
    if (repo / ".git").exists():
        try:
            commit = subprocess.run(
                ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
            ).stdout.strip()
            dirty = subprocess.run(
                ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=5,
                check=True,
            ).stdout.strip()
            return f"git:{commit}{'-dirty' if dirty else ''}"
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        return f"package:mlops-retraining=={metadata.version('mlops-retraining')}"
    except metadata.PackageNotFoundError:
        return "unknown"
