"""Credentials in the tracking URI never reach what the command line prints: real ``mlops`` processes, a real
``mlflow server`` on loopback (which ignores the credentials, as any server without auth does)."""

from __future__ import annotations

import os
import subprocess

import pytest
from conftest import BIN

PASSWORD = "hunter2-cli-password"


def mlops(*arguments: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "mlops"), *arguments], env={**os.environ, **env}, capture_output=True, text=True, timeout=300
    )


def test_mlops_env_leaves_the_tracking_credentials_out(tmp_path):
    env = {"MLOPS_HOME": str(tmp_path), "MLFLOW_TRACKING_URI": f"https://ops:{PASSWORD}@mlflow.example:5000/"}
    printed = mlops("env", env=env)
    assert printed.returncode == 0, printed.stderr
    assert PASSWORD not in printed.stdout + printed.stderr
    assert "export MLFLOW_TRACKING_URI=https://mlflow.example:5000/\n" in printed.stdout
    assert "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD" in printed.stdout


@pytest.mark.slow
def test_mlops_status_masks_the_tracking_credentials(mlflow_server, tmp_path):
    env = {
        "MLOPS_HOME": str(tmp_path),
        "MLFLOW_TRACKING_URI": mlflow_server.url.replace("://", f"://ops:{PASSWORD}@"),
    }
    for arguments in (("status",), ("status", "--json"), ("-v", "status")):
        printed = mlops(*arguments, env=env)
        assert printed.returncode == 0, printed.stderr
        assert PASSWORD not in printed.stdout + printed.stderr, arguments
    assert f"at {mlflow_server.url.replace('://', '://ops:***@')}" in mlops("status", env=env).stdout
