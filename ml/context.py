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

    @classmethod
    def from_airflow(cls, context: Mapping[str, Any]) -> RunContext:
        """Build from an Airflow task context (or any mapping with the same keys, as tests pass)."""
        dag = context.get("dag")
        ti = context.get("ti")
        return cls(
            dag_id=getattr(dag, "dag_id", None) or str(context.get("dag_id", "manual")),
            run_id=str(context.get("run_id") or "manual"),
            try_number=int(getattr(ti, "try_number", None) or context.get("try_number") or 1),
            params=dict(context.get("params") or {}),
            declared_params=frozenset(getattr(dag, "params", None) or ()),
        )

    def lineage_tags(self) -> dict[str, str]:
        return {
            "mlops.airflow.dag_id": self.dag_id,
            "mlops.airflow.run_id": self.run_id,
            "mlops.airflow.try_number": str(self.try_number),
            "mlops.airflow.run_key": self.run_key,
            "mlops.airflow.url": self.airflow_url,
            "mlops.code.revision": code_revision(),
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
