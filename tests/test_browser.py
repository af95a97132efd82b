"""What a user sees, in a real browser: the Airflow UI and the MLflow UI over one pipeline run.

Debian's Chromium, driven by Playwright, against ``airflow standalone`` and ``mlflow ui`` started here on a fresh
MLOPS_HOME (tests/ui_stack.py): log in, trigger ``mlops_pipeline`` from its form with the defaults (which unpauses
it, on a scheduler that runs the daily schedule), wait for the run, read the grid and the train_model log, then open
the run, the registered model and the version in MLflow; then a run on the same data, and a run whose version is
rejected. Then live traffic that drifted: mlops_monitor's run says so and starts a retraining, whose note says why.
Then the same stack restarted with MLOPS_APPROVAL_REQUIRED (the setting shapes the DAG when its file is
parsed): an approver finds two retrained versions under Required Actions, approves the first and rejects the second.

Every page visited is saved as a PNG in ``$MLOPS_SCREENSHOTS`` (``make screenshots`` sets it to .mlops/screenshots).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from airflow_api import Airflow
from conftest import (
    CANDIDATE_TASKS,
    NO_NEW_DATA_RUN_STATES,
    PIPELINE_TASKS,
    PROMOTED_RUN_STATES,
    REJECTED_RUN_STATES,
    production_markers,
    version_count,
)
from stack import wait_until
from ui_stack import ADMIN, CHROMIUM_ARGS, UiStack, chromium_path

from ml import registry, tags
from ml.settings import Settings

pytestmark = pytest.mark.slow

RUN_TIMEOUT_SECONDS = 240
DAG_ID = "mlops_pipeline"
MONITOR_DAG_ID = "mlops_monitor"
# A run of the default one candidate: the pipeline's tasks and the one instance of each candidate task.
RUN_TASK_COUNT = len(PIPELINE_TASKS) + len(CANDIDATE_TASKS)
APPROVAL_TASK = "approve_deployment"
# The approval task's states before it asks (None: the run has not created it yet, waiting behind another run).
APPROVAL_PENDING_STATES = {None, "scheduled", "queued", "running", "deferred"}


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


@dataclass
class Screenshots:
    """Where the module's pages are saved, numbered in the order the tests visit them."""

    folder: Path
    saved: list[Path] = field(default_factory=list)


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Screenshots:
    folder = Path(os.environ.get("MLOPS_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return Screenshots(folder)


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

    def __init__(self, page, screenshots: Screenshots) -> None:
        self.page = page
        self.screenshots = screenshots

    def shot(self, name: str, full_page: bool = False) -> Path:
        saved = self.screenshots.saved
        path = self.screenshots.folder / f"{len(saved) + 1:02d}-{name}.png"
        self.page.screenshot(path=str(path), full_page=full_page)
        saved.append(path)
        return path


def _task_states(page) -> dict[str, str]:
    """Task id -> state of the pipeline's own tasks, as the run page's task-instance table shows them."""
    states = {}
    for row in page.locator("table tbody tr").all():
        cells = [cell.strip() for cell in row.locator("td").all_inner_texts()]
        task_id = next((c for c in cells if c in {*PIPELINE_TASKS, *CANDIDATE_TASKS}), None)
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


def _log_in(tab: Pages, stack: UiStack, password: str, shot: str | None = "airflow-login") -> None:
    page = tab.page
    page.goto(f"{stack.airflow_url}/")
    page.get_by_label("Username").fill(ADMIN)
    page.get_by_label("Password").fill(password)
    if shot:
        tab.shot(shot)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"{stack.airflow_url}/")


def _open_run(
    tab: Pages, stack: UiStack, run_id: str, note: str, name: str, task_count: int = RUN_TASK_COUNT
) -> dict[str, str]:
    page = tab.page
    page.goto(f"{stack.airflow_url}/dags/{DAG_ID}/runs/{run_id}")
    page.get_by_text(f"{task_count} Task Instances").wait_for()
    page.get_by_text(note).first.wait_for()
    tab.shot(name)
    return _task_states(page)


def test_a_user_triggers_the_pipeline_and_follows_it_from_airflow_to_mlflow(stack, browser, screenshots):
    password = stack.admin_password()
    context = browser.new_context(viewport={"width": 1600, "height": 1000})
    context.set_default_timeout(30_000)
    tab = Pages(context.new_page(), screenshots)
    page = tab.page

    _log_in(tab, stack, password)
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
    _visible(page, "Airflow DAG. Each run trains one or more candidate scikit-learn").wait_for()
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


def _settings(stack: UiStack) -> Settings:
    return Settings.from_env(stack.env())


def _production_version(stack: UiStack) -> int:
    """Production's version: the one the first test promoted, or one promoted here when that test did not run."""
    settings = _settings(stack)
    if production_markers(settings)[0] is None:
        api = Airflow(stack.airflow_url, ADMIN, stack.admin_password())
        api.unpause(DAG_ID)
        assert api.wait_for_run(DAG_ID, api.trigger(DAG_ID), timeout=RUN_TIMEOUT_SECONDS) == "success"
    version = production_markers(settings)[0]
    assert version is not None
    return version


def test_live_traffic_that_drifted_starts_a_retraining_whose_run_says_why(stack, browser, screenshots):
    from ml import data, ingest, records
    from ml.monitor import Window, retraining_run_id

    production = _production_version(stack)
    settings = _settings(stack)
    api = Airflow(stack.airflow_url, ADMIN, stack.admin_password())
    context = browser.new_context(viewport={"width": 1600, "height": 1000})
    context.set_default_timeout(30_000)
    tab = Pages(context.new_page(), screenshots)
    _log_in(tab, stack, stack.admin_password())

    # The model server recorded an hour of traffic whose every feature moved far from what Production learned from.
    frame = data.load_source(settings.data_source)
    features = frame.drop(columns=[settings.label_column])
    shifted = ingest.apply_shift(features.sample(300, random_state=3), ingest.parse_shift({"*": 1.6}, list(features)))
    end = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=2)
    answered_at = (end - timedelta(minutes=30)).timestamp()
    records.write_records(
        settings.data_store,
        [
            records.Answered(f"drifted-{i}", answered_at, settings.model_name, production, [0], shifted.iloc[[i]])
            for i in range(len(shifted))
        ],
    )

    api.unpause(MONITOR_DAG_ID)
    monitor_run = api.trigger(MONITOR_DAG_ID, {"window_end": end.isoformat()})
    assert api.wait_for_run(MONITOR_DAG_ID, monitor_run, timeout=RUN_TIMEOUT_SECONDS) == "success"
    page = tab.page
    page.goto(f"{stack.airflow_url}/dags/{MONITOR_DAG_ID}/runs/{monitor_run}")
    page.get_by_text("retraining started").first.wait_for()
    text = page.inner_text("body")
    assert f"v{production}: " in text and re.search(r"drift in \d+ of 30 features", text), text
    tab.shot("airflow-monitor-run-drift")

    # The retraining it started says why in its note. The training data itself has not changed, so the run ends with
    # "no new data": labelled live requests become training data through `mlops ingest`, and the next run learns them.
    retraining = retraining_run_id(production, Window(end - timedelta(hours=1), end))
    assert api.wait_for_run(DAG_ID, retraining, timeout=RUN_TIMEOUT_SECONDS) == "success"
    states = _open_run(tab, stack, retraining, "no new data", "airflow-run-drift-triggered")
    assert states == NO_NEW_DATA_RUN_STATES, states
    # The header shows the note's first line; its note button opens the note whole.
    page.get_by_role("button", name="Edit note").click()
    dialog = page.get_by_role("dialog").filter(has_text="Dag Run Note")
    dialog.get_by_text("Started because: mlops_monitor, ").wait_for()
    text = dialog.inner_text()
    assert f"features of v{production}'s live inputs" in text, text
    tab.shot("airflow-run-drift-triggered-note")
    context.close()


@pytest.fixture(scope="module")
def approval_stack(stack: UiStack) -> UiStack:
    """The module's stack restarted with MLOPS_APPROVAL_REQUIRED, over a Production version to compare a candidate
    with."""
    password = stack.admin_password()
    _production_version(stack)
    stack.restart_airflow(MLOPS_APPROVAL_REQUIRED="true")
    api = Airflow(stack.airflow_url, ADMIN, password)
    # The DAG processor parses the file again as it starts: a run triggered before that would not ask.
    wait_until(
        lambda: APPROVAL_TASK in {task["task_id"] for task in api.get(f"/dags/{DAG_ID}/tasks")["tasks"]},
        RUN_TIMEOUT_SECONDS,
        f"{DAG_ID} to be parsed with {APPROVAL_TASK}",
    )
    return stack


def _retrain(api: Airflow, settings: Settings) -> tuple[str, int]:
    """Trigger a forced retraining after the runs before it; (its run id, the version it will register)."""
    return api.trigger(DAG_ID, {"force_retrain": True}), version_count(settings) + 1


def _wait_until_asked(api: Airflow, run_id: str) -> None:
    def settled() -> str | None:
        state = api.task_instances(DAG_ID, run_id).get(APPROVAL_TASK, {}).get("state")
        return None if state in APPROVAL_PENDING_STATES else str(state)

    state = wait_until(settled, RUN_TIMEOUT_SECONDS, f"run {run_id} to ask for approval", interval=0.5)
    assert state == "awaiting_input", f"{APPROVAL_TASK} of {run_id} ended {state} instead of asking"


def _open_request(tab: Pages, stack: UiStack, subject: str, shot: str | None = None) -> None:
    """Browse → Required Actions, then the request by its subject: its task's Required Action tab, with the buttons."""
    page = tab.page
    page.goto(f"{stack.airflow_url}/required_actions?response_received=false")
    request = page.get_by_role("link", name=subject, exact=True)
    request.wait_for()
    if shot:
        tab.shot(shot)
    request.click()
    page.wait_for_url(re.compile(rf".*/dags/{DAG_ID}/runs/.+/tasks/{APPROVAL_TASK}/required_actions"))
    page.get_by_test_id("hitl-option-Approve").wait_for()


def _decided_at(reason: str, verdict: str) -> datetime:
    """When ``admin`` gave ``verdict``, as the registry recorded it."""
    found = re.search(rf"\b{verdict} by {ADMIN} at (\d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d)", reason)
    assert found, reason
    return datetime.fromisoformat(found[1])


def test_an_approver_approves_one_version_and_rejects_another_in_the_ui(approval_stack, browser, screenshots):
    stack, settings = approval_stack, _settings(approval_stack)
    client, name = registry.client_for(settings), settings.model_name
    password = stack.admin_password()
    api = Airflow(stack.airflow_url, ADMIN, password)
    context = browser.new_context(viewport={"width": 1600, "height": 1000})
    context.set_default_timeout(30_000)
    tab = Pages(context.new_page(), screenshots)
    page = tab.page
    _log_in(tab, stack, password, shot=None)
    production = production_markers(settings)[0]

    # A good candidate waits under Required Actions; its request shows what the decision needs.
    run_id, candidate = _retrain(api, settings)
    _wait_until_asked(api, run_id)
    _open_request(tab, stack, f"Promote {name} v{candidate} to Production?", shot="airflow-required-actions")
    table = page.locator("table").filter(has_text=f"candidate v{candidate}")
    rows = [[cell.strip() for cell in row.locator("th, td").all_inner_texts()] for row in table.locator("tr").all()]
    assert rows[0] == ["", f"candidate v{candidate}", f"Production v{production}"], rows
    assert re.fullmatch(r"accuracy on the same \d+ held-out rows", rows[1][0]), rows
    assert all(re.fullmatch(r"[01]\.\d{4}", value) for value in rows[1][1:]), rows
    text = page.inner_text("body")
    assert "accuracy on the whole held-out set: " in text and "(threshold 0.80)" in text
    assert re.search(r"drift: largest PSI \d\.\d{3} \(", text), text
    digest = registry.get_version(client, name, candidate).tags[tags.DATA_DIGEST]
    assert f"data digest: {digest[:16]}" in text
    for version in (candidate, production):
        link = page.get_by_role("link", name=f"MLflow run of v{version}", exact=True).get_attribute("href")
        mlflow_run = registry.get_version(client, name, version).run_id
        assert link.startswith(f"{stack.mlflow_url}/#/experiments/") and f"/runs/{mlflow_run}?" in link, link
    tab.shot("airflow-approval-request")
    asked_at = datetime.now(UTC).replace(microsecond=0)
    page.get_by_test_id("hitl-option-Approve").click()
    page.get_by_text(re.compile(rf"Response received at .+ from {ADMIN}")).wait_for()
    # The next candidate, queued behind this run (one active run at a time) while this one is checked.
    next_run_id, refused = _retrain(api, settings)
    assert api.wait_for_run(DAG_ID, run_id, timeout=RUN_TIMEOUT_SECONDS) == "success"
    assert production_markers(settings, alias_only=True) == (candidate, [candidate])
    promotion = registry.deployment_history(client, name)[-1]
    assert (promotion.event, promotion.version, promotion.previous_version) == ("promoted", candidate, production)
    assert asked_at <= _decided_at(promotion.reason, "approved") <= datetime.now(UTC)
    states = _open_run(tab, stack, run_id, f"v{candidate} promoted", "airflow-run-approved", RUN_TASK_COUNT + 1)
    assert states == PROMOTED_RUN_STATES, states

    # The next candidate is rejected: Production stays, and the version says who refused it.
    run_id = next_run_id
    _wait_until_asked(api, run_id)
    _open_request(tab, stack, f"Promote {name} v{refused} to Production?")
    page.get_by_text(f"before it replaces Production v{candidate}.").wait_for()
    asked_at = datetime.now(UTC).replace(microsecond=0)
    page.get_by_test_id("hitl-option-Reject").click()
    page.get_by_text(re.compile(rf"Response received at .+ from {ADMIN}")).wait_for()
    tab.shot("airflow-approval-rejected")
    assert api.wait_for_run(DAG_ID, run_id, timeout=RUN_TIMEOUT_SECONDS) == "success"
    assert production_markers(settings, alias_only=True) == (candidate, [candidate])
    version = registry.get_version(client, name, refused)
    assert version.tags[tags.DEPLOYMENT_STATUS] == "not_approved"
    assert asked_at <= _decided_at(version.tags[tags.DEPLOYMENT_REASON], "rejected") <= datetime.now(UTC)
    description = client.get_model_version(name, str(refused)).description
    assert f"**Not approved** for Production: rejected by {ADMIN} at " in description, description
    refusal = registry.history_of(name, registry.registered_model(client, name).tags)[-1]
    assert (refusal.event, refusal.version, refusal.previous_version) == ("not_approved", refused, candidate)
    states = _open_run(tab, stack, run_id, f"v{refused} not deployed", "airflow-run-not-approved", RUN_TASK_COUNT + 1)
    assert states == {**PROMOTED_RUN_STATES, "deploy_model": "skipped", "archive_model": "skipped"}, states
    context.close()
