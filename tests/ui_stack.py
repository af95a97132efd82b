"""The two UIs a user opens, as real processes on a temporary home: ``airflow standalone`` and ``mlflow ui``.

The same commands as ``make airflow-ui`` and ``make mlflow-ui``, on free ports, so the browser test sees what a user
of ``make run`` sees. Airflow runs with the executor ``make airflow-ui`` sets (``ml.local_executor``, a LocalExecutor,
which is what ``standalone`` accepts), so a run triggered in the UI is executed by the scheduler as on a developer's
machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from conftest import BIN, free_port, wait_for_http
from stack import MLFLOW_NO_JOB_RUNNER

CHROMIUM_CANDIDATES = ("chromium", "chromium-browser", "google-chrome")
# Flags that let Debian's Chromium run headless as root in a container, without reaching for the network.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ADMIN = "admin"


def chromium_path() -> str | None:
    for name in CHROMIUM_CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


@dataclass
class UiStack:
    """``airflow standalone`` and ``mlflow ui`` sharing one MLOPS_HOME, as ``make airflow-ui``/``make mlflow-ui``."""

    root: Path
    airflow_port: int = field(default_factory=free_port)
    mlflow_port: int = field(default_factory=free_port)
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    # Taken over the local defaults: another DAGs folder or executor, for the benchmark.
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def airflow_url(self) -> str:
        return f"http://127.0.0.1:{self.airflow_port}"

    @property
    def mlflow_url(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    @property
    def home(self) -> Path:
        return self.root / "mlops"

    @property
    def airflow_home(self) -> Path:
        return self.home / "airflow"

    def log(self, name: str) -> Path:
        return self.root / f"{name}.log"

    def env(self) -> dict[str, str]:
        from ml.cli import apply_local_defaults

        keep = ("HOME", "LANG", "LC_ALL", "TZ", "TMPDIR")
        env = {key: os.environ[key] for key in keep if key in os.environ}
        env.update(
            {
                # `airflow standalone` starts its components by running `airflow` from PATH.
                "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                "MLOPS_HOME": str(self.home),
                "MLOPS_MLFLOW_UI_URL": self.mlflow_url,
                "AIRFLOW__API__PORT": str(self.airflow_port),
                "AIRFLOW__API__HOST": "127.0.0.1",
                "AIRFLOW__API__BASE_URL": self.airflow_url,
                "AIRFLOW__API__WORKERS": "1",
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN}:admin",
                "AIRFLOW__CORE__PARALLELISM": "2",
                "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1",
                "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
                "MLOPS_RETRY_DELAY_SECONDS": "5",
                "MLFLOW_ENABLE_TELEMETRY": "false",
                "DO_NOT_TRACK": "true",
                **self.extra_env,
            }
        )
        # The rest as `make airflow-ui` sets it (`mlops env`): stores under MLOPS_HOME, the repository's DAGs, the
        # executor whose workers fork the tasks with the pipeline's libraries imported.
        apply_local_defaults(env)
        return env

    def start(self) -> None:
        self.airflow_home.mkdir(parents=True, exist_ok=True)
        env = self.env()
        self._spawn("airflow", [str(BIN / "airflow"), "standalone"], env)
        self._spawn(
            "mlflow",
            [
                str(BIN / "mlflow"),
                "ui",
                "--backend-store-uri",
                env["MLFLOW_TRACKING_URI"],
                "--host",
                "127.0.0.1",
                "--port",
                str(self.mlflow_port),
                "--workers",
                "1",
            ],
            {**env, **MLFLOW_NO_JOB_RUNNER},
        )
        wait_for_http(f"{self.mlflow_url}/health", 120, self.processes["mlflow"], log=self.log("mlflow"))
        self._wait_for_airflow()

    def restart_airflow(self, **settings: str) -> None:
        """``airflow standalone`` again on the same home, with ``settings`` added to its environment: a setting that
        shapes the DAG, read when the file is parsed, reaches no component that is already running."""
        _stop([self.processes.pop("airflow")])
        self.extra_env.update(settings)
        self._spawn("airflow", [str(BIN / "airflow"), "standalone"], self.env())
        self._wait_for_airflow()

    def _wait_for_airflow(self) -> None:
        wait_for_http(
            f"{self.airflow_url}/api/v2/monitor/health", 240, self.processes["airflow"], log=self.log("airflow")
        )

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        with self.log(name).open("ab") as log:
            self.processes[name] = subprocess.Popen(
                argv, cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def admin_password(self) -> str:
        passwords = self.airflow_home / "simple_auth_manager_passwords.json.generated"
        deadline = time.monotonic() + 60
        while not passwords.exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        return json.loads(passwords.read_text())[ADMIN]

    def stop(self) -> None:
        """Stop each process group (standalone's scheduler, API server, ... included) and wait until it is gone."""
        _stop(list(self.processes.values()))
        self.processes.clear()


def _stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        _signal_group(process, signal.SIGTERM)
    for process in processes:
        if not _group_gone(process, timeout=30):
            _signal_group(process, signal.SIGKILL)
            _group_gone(process, timeout=10)


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signum)


def _group_gone(process: subprocess.Popen, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        process.poll()
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False
