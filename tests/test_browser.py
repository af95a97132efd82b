"""What a user sees, in a real browser: the Airflow UI and the MLflow UI over one pipeline run.

Debian's Chromium, driven by Playwright, against ``airflow standalone`` and ``mlflow ui`` started here on a fresh
MLOPS_HOME (tests/ui_stack.py): log in, trigger ``mlops_pipeline`` from its form with the defaults, wait for the run,
read the grid and the train_model log, then open the run, the registered model and the version in MLflow.

Every page visited is saved as a PNG in ``$MLOPS_SCREENSHOTS`` (``make screenshots`` sets it to .mlops/screenshots).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from ui_stack import ADMIN, CHROMIUM_ARGS, UiStack, chromium_path

pytestmark = pytest.mark.slow

RUN_TIMEOUT_SECONDS = 240
DAG_ID = "mlops_pipeline"


@pytest.fixture(scope="module")
def chromium() -> str:
    path = chromium_path()
    if path is None:
        pytest.skip(
            "NO BROWSER: Chromium is not installed, so the browser tests did not run. "
            "`make browser` installs Debian's chromium (as root)."
        )
    return path


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, chromium: str) -> Iterator[UiStack]:
    ui = UiStack(tmp_path_factory.mktemp("ui-stack"))
    try:
        ui.start()
        yield ui
    finally:
        ui.stop()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = Path(os.environ.get("MLOPS_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def browser(chromium: str):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


class Pages:
    """One browser tab, saving a screenshot of every page it is asked to remember."""

    def __init__(self, page, folder: Path) -> None:
        self.page = page
        self.folder = folder
        self.saved: list[Path] = []

    def shot(self, name: str, full_page: bool = False) -> Path:
        path = self.folder / f"{len(self.saved) + 1:02d}-{name}.png"
        self.page.screenshot(path=str(path), full_page=full_page)
        self.saved.append(path)
        return path


def _api_token(stack: UiStack, password: str) -> str:
    import httpx

    response = httpx.post(f"{stack.airflow_url}/auth/token", json={"username": ADMIN, "password": password}, timeout=30)
    response.raise_for_status()
    return response.json()["access_token"]


def _wait_for_run(stack: UiStack, token: str, run_id: str) -> str:
    import httpx

    url = f"{stack.airflow_url}/api/v2/dags/{DAG_ID}/dagRuns/{run_id}"
    deadline = time.monotonic() + RUN_TIMEOUT_SECONDS
    state = "unknown"
    while time.monotonic() < deadline:
        state = httpx.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=30).json()["state"]
        if state in {"success", "failed"}:
            return state
        time.sleep(2)
    raise TimeoutError(f"run {run_id} still {state} after {RUN_TIMEOUT_SECONDS} s; see {stack.log('airflow')}")


def _task_log_lines(stack: UiStack, token: str, run_id: str, task_id: str) -> list[str]:
    import httpx

    response = httpx.get(
        f"{stack.airflow_url}/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/{task_id}/logs/1",
        headers={"Authorization": f"Bearer {token}", "Accept": "application/json"},
        timeout=30,
    )
    response.raise_for_status()
    content = response.json()["content"]
    return [entry.get("event", "") if isinstance(entry, dict) else str(entry) for entry in content]


def _xcom(stack: UiStack, token: str, run_id: str, task_id: str) -> dict:
    import httpx

    response = httpx.get(
        f"{stack.airflow_url}/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/return_value",
        headers={"Authorization": f"Bearer {token}"},
        params={"deserialize": "true"},
        timeout=30,
    )
    response.raise_for_status()
    return response.json()["value"]


def _task_states(page) -> dict[str, str]:
    """Task id -> state, as the run page's task-instance table shows them."""
    states = {}
    for row in page.locator("table tbody tr").all():
        cells = [cell.strip() for cell in row.locator("td").all_inner_texts()]
        task_id = next((c for c in cells if re.fullmatch(r"[a-z_]+_(data|model)", c)), None)
        state = next((c for c in cells if c.lower() in {"success", "skipped", "failed", "upstream_failed"}), None)
        if task_id and state:
            states[task_id] = state.lower()
    return states


def test_a_user_triggers_the_pipeline_and_follows_it_from_airflow_to_mlflow(stack, browser, screenshots):
    password = stack.admin_password()
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    context.set_default_timeout(30_000)
    tab = Pages(context.new_page(), screenshots)
    page = tab.page

    # Log in.
    page.goto(f"{stack.airflow_url}/")
    page.get_by_label("Username").fill(ADMIN)
    page.get_by_label("Password").fill(password)
    tab.shot("airflow-login")
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"{stack.airflow_url}/")

    # The trigger form submits with its defaults.
    page.goto(f"{stack.airflow_url}/dags/{DAG_ID}")
    page.get_by_test_id("trigger-dag-button").click()
    form = page.get_by_role("dialog")
    form.get_by_text("SQL query or table").wait_for()
    tab.shot("airflow-trigger-form")
    submit = form.get_by_role("button", name="Trigger", exact=True)
    assert submit.is_enabled(), "the trigger form cannot be submitted with its defaults"
    submit.click()
    page.wait_for_url(re.compile(rf".*/dags/{DAG_ID}/runs/.+"))
    run_id = page.url.split("/runs/", 1)[1].split("/")[0]
    from urllib.parse import unquote

    run_id = unquote(run_id)

    token = _api_token(stack, password)
    assert _wait_for_run(stack, token, run_id) == "success"

    # The grid and the task table of the run.
    page.goto(f"{stack.airflow_url}/dags/{DAG_ID}/runs/{run_id}")
    page.get_by_text("7 Task Instances").wait_for()
    page.get_by_test_id(f"grid-{run_id}-archive_model").wait_for()
    tab.shot("airflow-run")
    states = _task_states(page)
    assert states == {
        "extract_data": "success",
        "transform_data": "success",
        "train_model": "success",
        "validate_model": "success",
        "deploy_model": "success",
        "archive_model": "success",
        "rollback_model": "success",
    }, states

    # train_model's log: the project's lines, no flood.
    page.goto(f"{stack.airflow_url}/dags/{DAG_ID}/runs/{run_id}/tasks/train_model")
    page.get_by_text("registered breast_cancer_classifier version 1").wait_for()
    tab.shot("airflow-train-model-log")
    shown = page.inner_text("body")
    assert "DeprecatedImportWarning" not in shown
    lines = _task_log_lines(stack, token, run_id, "train_model")
    assert len(lines) < 100, f"train_model logged {len(lines)} lines"
    assert not any("DeprecatedImportWarning" in line for line in lines)
    assert not any("already exists. Creating a new version" in line for line in lines if "ERROR" in line)

    # MLflow: the run, in the model-training view.
    train = _xcom(stack, token, run_id, "train_model")
    page.goto(f"{stack.mlflow_url}/#/experiments")
    page.goto(f"{stack.mlflow_url}/#/models/{train['model_name']}")
    page.get_by_text(f"Version {train['model_version']}").first.wait_for()
    tab.shot("mlflow-registered-model", full_page=True)
    page.goto(f"{stack.mlflow_url}/#/models/{train['model_name']}/versions/{train['model_version']}")
    page.get_by_text("Production").first.wait_for()
    tab.shot("mlflow-model-version", full_page=True)
    context.close()
