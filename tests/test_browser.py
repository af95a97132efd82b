"""What a user sees, in a real browser: the Airflow UI and the MLflow UI over one pipeline run.

Debian's Chromium, driven by Playwright, against ``airflow standalone`` and ``mlflow ui`` started here on a fresh
MLOPS_HOME (tests/ui_stack.py): log in, trigger ``mlops_pipeline`` from its form with the defaults (which unpauses
it, on a scheduler that runs the daily schedule), wait for the run, read the grid and the train_model log, then open
the run, the registered model and the version in MLflow; then a run on the same data, and a run whose version is
rejected.

Every page visited is saved as a PNG in ``$MLOPS_SCREENSHOTS`` (``make screenshots`` sets it to .mlops/screenshots).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from airflow_api import Airflow
from conftest import NO_NEW_DATA_RUN_STATES, PROMOTED_RUN_STATES, REJECTED_RUN_STATES
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


def _visible(page, text: str):
    """The first visible element with ``text``: MLflow's single-page app keeps earlier pages in the DOM, hidden."""
    return page.get_by_text(text).locator("visible=true").first


def _trigger_with_defaults(tab: Pages, stack: UiStack, name: str) -> str:
    """Open the trigger form, submit it untouched, and return the new run's id."""
    from urllib.parse import unquote

    page = tab.page
    page.goto(f"{stack.airflow_url}/dags/{DAG_ID}")
    page.get_by_test_id("trigger-dag-button").click()
    form = page.get_by_role("dialog")
    form.get_by_text("SQL query or table").wait_for()
    tab.shot(name)
    submit = form.get_by_role("button", name="Trigger", exact=True)
    assert submit.is_enabled(), "the trigger form cannot be submitted with its defaults"
    submit.click()
    page.wait_for_url(re.compile(rf".*/dags/{DAG_ID}/runs/.+"))
    return unquote(page.url.split("/runs/", 1)[1].split("/")[0])


def _open_run(tab: Pages, stack: UiStack, run_id: str, note: str, name: str) -> dict[str, str]:
    page = tab.page
    page.goto(f"{stack.airflow_url}/dags/{DAG_ID}/runs/{run_id}")
    page.get_by_text("7 Task Instances").wait_for()
    page.get_by_text(note).first.wait_for()
    tab.shot(name)
    return _task_states(page)


def test_a_user_triggers_the_pipeline_and_follows_it_from_airflow_to_mlflow(stack, browser, screenshots):
    password = stack.admin_password()
    context = browser.new_context(viewport={"width": 1600, "height": 1000})
    context.set_default_timeout(30_000)
    tab = Pages(context.new_page(), screenshots)
    page = tab.page

    page.goto(f"{stack.airflow_url}/")
    page.get_by_label("Username").fill(ADMIN)
    page.get_by_label("Password").fill(password)
    tab.shot("airflow-login")
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"{stack.airflow_url}/")
    api = Airflow(stack.airflow_url, ADMIN, password)

    # The DAG page says when the pipeline runs: its header names only the asset, so the description says both.
    page.goto(f"{stack.airflow_url}/dags/{DAG_ID}/details")
    page.get_by_text("Daily at 00:00 UTC, and whenever the training data is updated").first.wait_for()
    tab.shot("airflow-dag-details")

    # A first run on a fresh home trains, validates and promotes version 1; nothing is rolled back. The form unpauses
    # the DAG, and that starts no scheduled run of its own: the user's run is the only one, and it does the work.
    run_id = _trigger_with_defaults(tab, stack, "airflow-trigger-form")
    assert api.wait_for_run(DAG_ID, run_id, timeout=RUN_TIMEOUT_SECONDS) == "success"
    states = _open_run(tab, stack, run_id, "v1 promoted", "airflow-run")
    assert states == PROMOTED_RUN_STATES, states
    note = page.get_by_text("v1 promoted").first
    assert re.search(r"accuracy 0\.9\d{3} \(threshold 0\.80\)", note.locator("xpath=..").inner_text())
    # The scheduler's executor imported the pipeline's libraries once, before it forked the workers that ran the tasks.
    assert "preloaded" in stack.log("airflow").read_text(errors="replace")
    # Unpausing started no scheduled run beside it.
    runs = api.get(f"/dags/{DAG_ID}/dagRuns")["dag_runs"]
    assert [(run["dag_run_id"], run["run_type"]) for run in runs] == [(run_id, "manual")], runs
    # Unpaused, the header shows the daily schedule's next run: the coming midnight (UTC, as the UI shows times).
    details = api.get(f"/dags/{DAG_ID}")
    assert details["is_paused"] is False and details["next_dagrun_run_after"].endswith("T00:00:00Z"), details
    page.goto(f"{stack.airflow_url}/dags/{DAG_ID}")
    page.get_by_text(re.compile(rf"{details['next_dagrun_run_after'][:10]}[ T]00:00:00")).first.wait_for()
    tab.shot("airflow-dag-unpaused")

    # train_model's log: the project's own lines, no flood, no ERROR from MLflow's progress messages.
    page.goto(f"{stack.airflow_url}/dags/{DAG_ID}/runs/{run_id}/tasks/train_model")
    page.get_by_text("registered breast_cancer_classifier version 1").first.wait_for()
    tab.shot("airflow-train-model-log")
    assert "DeprecatedImportWarning" not in page.inner_text("body")
    entries = api.task_log(DAG_ID, run_id, "train_model")
    assert len(entries) < 100, f"train_model logged {len(entries)} lines"
    assert not any("DeprecatedImportWarning" in str(entry.get("event", "")) for entry in entries)
    errors = [entry for entry in entries if entry.get("level") == "error"]
    assert errors == []
    # The returned dict is in the XCom tab, not spelt out as the log's last line.
    events = [str(entry.get("event", "")) for entry in entries]
    assert not any("Returned value was" in event for event in events)
    assert "Done. Returned value not shown" in events

    # The note links to the MLflow run, which links back to this Airflow run.
    page.goto(f"{stack.airflow_url}/dags/{DAG_ID}/runs/{run_id}")
    mlflow_run_url = page.get_by_role("link", name="MLflow run").first.get_attribute("href")
    version_url = page.get_by_role("link", name="breast_cancer_classifier v1").first.get_attribute("href")
    assert mlflow_run_url.startswith(stack.mlflow_url) and version_url.startswith(stack.mlflow_url)
    page.goto(mlflow_run_url)
    _visible(page, "v1 · logistic_regression ·").wait_for()
    back = page.get_by_role("link", name=f"{DAG_ID}/{run_id}").first
    assert back.get_attribute("href") == f"{stack.airflow_url}/dags/{DAG_ID}/runs/{run_id}"
    tab.shot("mlflow-run", full_page=True)

    # The experiment opens on its training runs, with the Model registry in the sidebar.
    assert page.get_by_role("link", name="Model registry").first.is_visible()
    page.get_by_role("link", name="Runs", exact=True).first.click()
    _visible(page, "Airflow DAG. Each run trains a scikit-learn pipeline").wait_for()
    _visible(page, "v1 · logistic_regression ·").wait_for()
    assert "genai" not in page.url
    tab.shot("mlflow-experiment")

    # The registered model: Production and the deployment history, as text.
    page.get_by_role("link", name="Model registry").first.click()
    model_link = page.get_by_role("link", name="breast_cancer_classifier").first
    model_link.wait_for()
    # The registry list may open with MLflow's announcement of its new registry UI; a user closes it.
    page.wait_for_timeout(1000)
    if page.get_by_role("dialog").count():
        page.keyboard.press("Escape")
    model_link.click()
    _visible(page, "Deployment history").wait_for()
    text = page.inner_text("body")
    assert "Production: version 1" in text and "passed validation with accuracy" in text
    tab.shot("mlflow-registered-model", full_page=True)

    # The version: why it is in Production, accuracy against the threshold, its data and its Airflow run.
    page.goto(version_url)
    _visible(page, "In Production").wait_for()
    text = page.inner_text("body")
    assert "held-out accuracy" in text and "threshold" in text and "data digest" in text
    assert page.get_by_role("link", name=f"{DAG_ID}/{run_id}").count() >= 1
    tab.shot("mlflow-model-version", full_page=True)

    # The same data again: the run says "no new data" and everything after extract_data is skipped.
    run_id = _trigger_with_defaults(tab, stack, "airflow-trigger-again")
    assert api.wait_for_run(DAG_ID, run_id, timeout=RUN_TIMEOUT_SECONDS) == "success"
    states = _open_run(tab, stack, run_id, "no new data", "airflow-run-no-new-data")
    assert states == NO_NEW_DATA_RUN_STATES, states
    # All six skipped alike, as the scheduler recorded them: none started, so none has a try or a duration.
    skipped = {task: ti for task, ti in api.task_instances(DAG_ID, run_id).items() if task != "extract_data"}
    assert {task: (ti["try_number"], ti["duration"] or 0) for task, ti in skipped.items()} == {
        task: (0, 0) for task in skipped
    }

    # A version that fails validation: the run succeeds (the pipeline did its job) but its grid is not green all the
    # way: validate_model ends skipped, with a task note saying why, which the grid marks on its square.
    run_id = api.trigger(DAG_ID, {"accuracy_threshold": 1.0, "force_retrain": True})
    assert api.wait_for_run(DAG_ID, run_id, timeout=RUN_TIMEOUT_SECONDS) == "success"
    states = _open_run(tab, stack, run_id, "v2 rejected", "airflow-run-rejected")
    assert states == REJECTED_RUN_STATES, states
    notes = {task: ti["note"] for task, ti in api.task_instances(DAG_ID, run_id).items() if ti["note"]}
    assert list(notes) == ["validate_model"] and notes["validate_model"].startswith("v2 rejected: accuracy "), notes
    page.goto(f"{stack.airflow_url}/dags/{DAG_ID}/runs/{run_id}/tasks/validate_model")
    page.get_by_text("v2 rejected: accuracy").first.wait_for()
    tab.shot("airflow-validate-model-rejected")
    context.close()
