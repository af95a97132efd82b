"""Hooks that the reliability tests name in MLOPS_STEP_HOOK: they inject faults at the start of a chosen step.

DAG runs go through dag.test(), in the test's own process, so a test hands these hooks the real server or
settings they act on by setting the module's attributes.
"""

from __future__ import annotations

from typing import Any

from ml import registry

mlflow_server: Any = None
fault_step = ""
rollback_settings: Any = None
rollback_target: int | str = "previous"


def stop_mlflow_server(step: str, run_key: str, try_number: int) -> None:
    if step == fault_step and mlflow_server is not None and mlflow_server.process is not None:
        mlflow_server.stop()


def manual_rollback_meanwhile(step: str, run_key: str, try_number: int) -> None:
    if step == fault_step and try_number == 1:
        registry.manual_rollback(rollback_settings, rollback_target, actor="cli:oncall", reason="incident drill")


def _hang_here(where: str) -> None:
    """Hang at ``where`` when MLOPS_TEST_HANG_AT names it, after writing MLOPS_TEST_HANG_MARKER (for processes the
    test starts, which cannot be handed attributes)."""
    import os
    import time
    from pathlib import Path

    if os.environ.get("MLOPS_TEST_HANG_AT") == where:
        marker = os.environ.get("MLOPS_TEST_HANG_MARKER")
        if marker:
            Path(marker).write_text(where)
        time.sleep(600)


def hang_in_step(step: str, run_key: str, try_number: int) -> None:
    _hang_here(step)


def hang_in_deploy_check(model_uri: str, version: int) -> None:
    _hang_here("deploy_check")
