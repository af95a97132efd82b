"""A client of Airflow's REST API as a user's browser uses it: log in, unpause, trigger, follow a run.

Used by the stack test against its API server, and by the browser test and ``bench/ui_bench.py`` against
``airflow standalone``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import stack
from stack import Process

RUN_TIMEOUT_SECONDS = 600


class Airflow:
    def __init__(self, url: str, username: str, password: str) -> None:
        import httpx

        self.url = url
        response = httpx.post(f"{url}/auth/token", json={"username": username, "password": password}, timeout=30)
        assert response.status_code == 201, f"POST /auth/token: {response.status_code} {response.text}"
        token = response.json()["access_token"]
        self.http = httpx.Client(base_url=f"{url}/api/v2", headers={"Authorization": f"Bearer {token}"}, timeout=30)

    def get(self, path: str, **params: Any) -> dict[str, Any]:
        response = self.http.get(path, params=params)
        response.raise_for_status()
        return response.json()

    def unpause(self, dag_id: str) -> None:
        response = self.http.patch(f"/dags/{dag_id}", json={"is_paused": False})
        assert response.status_code == 200, f"unpause {dag_id}: {response.status_code} {response.text}"

    def trigger(self, dag_id: str, conf: dict[str, Any] | None = None) -> str:
        response = self.http.post(f"/dags/{dag_id}/dagRuns", json={"logical_date": None, "conf": conf or {}})
        assert response.status_code == 200, f"trigger {dag_id}: {response.status_code} {response.text}"
        return response.json()["dag_run_id"]

    def run_state(self, dag_id: str, run_id: str) -> str:
        return self.get(f"/dags/{dag_id}/dagRuns/{run_id}")["state"]

    def wait_for_run(
        self, dag_id: str, run_id: str, processes: Sequence[Process] = (), timeout: float = RUN_TIMEOUT_SECONDS
    ) -> str:
        return stack.wait_until(
            lambda: (state := self.run_state(dag_id, run_id)) in {"success", "failed"} and state,
            timeout,
            f"{dag_id} run {run_id} to finish",
            processes,
            interval=0.25,
        )

    def task_instances(self, dag_id: str, run_id: str) -> dict[str, dict[str, Any]]:
        """The run's task instances by task id; of a mapped task's, one (see :meth:`all_task_instances`)."""
        return {ti["task_id"]: ti for ti in self.all_task_instances(dag_id, run_id)}

    def all_task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        """Every task instance of the run, a mapped task's each with its ``map_index``."""
        return self.get(f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances", limit=1000)["task_instances"]

    def task_log(self, dag_id: str, run_id: str, task_id: str, try_number: int = 1) -> list[dict[str, Any]]:
        """The task's log as the UI reads it: one entry per line, with its level and event."""
        response = self.http.get(
            f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/logs/{try_number}",
            headers={"Accept": "application/json"},
        )
        response.raise_for_status()
        return [entry if isinstance(entry, dict) else {"event": str(entry)} for entry in response.json()["content"]]
