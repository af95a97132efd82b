"""The approval gate before Production: runs of mlops_pipeline (dag.test()) wait for a person's answer, given through
Airflow's own REST API (the Core API the UI calls, served in process on the same metadata database) as a named user.

One module-scoped store: the first run is approved (v1, no Production to compare with), the second rejected (v2 against
Production v1). Without the setting the DAG has no approval task, and every other test runs it so.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from airflow_harness import sweep_approval_timeouts
from conftest import production_markers, retraining_home

from ml import registry, tags
from ml.airflow_runner import load_dag, run_dag
from ml.settings import Settings

pytestmark = pytest.mark.slow
DAG_ID = "mlops_pipeline"
APPROVAL_TASK = "approve_deployment"


class Approver(threading.Thread):
    """Answers the next approval request of mlops_pipeline as ``user`` with ``option`` (None: lets it time out),
    through Airflow's REST API; keeps the request as the UI showed it."""

    def __init__(self, api: Any, user: str, option: str | None) -> None:
        super().__init__(daemon=True)
        from airflow.api_fastapi.app import get_auth_manager
        from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser

        token = get_auth_manager().generate_jwt(SimpleAuthManagerUser(username=user, role="admin"))
        self.api, self.option = api, option
        self.headers = {"Authorization": f"Bearer {token}"}
        self.request: dict[str, Any] = {}
        self.answer: Any = None
        self.called_off = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not self.request and not self.called_off.is_set():
            found = self.api.get("/api/v2/dags/~/dagRuns/~/hitlDetails", headers=self.headers).json()
            waiting = [d for d in found.get("hitl_details", []) if not d["response_received"]]
            self.request = waiting[0] if waiting else {}
            time.sleep(0.3)
        if not self.request:
            return
        if self.option is None:
            # Nobody answers: once the timeout has passed, the scheduler's sweep applies the default.
            time.sleep(1.5)
            sweep_approval_timeouts()
            return
        run_id = self.request["task_instance"]["dag_run_id"]
        self.answer = self.api.patch(
            f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/{APPROVAL_TASK}/-1/hitlDetails",
            headers=self.headers,
            json={"chosen_options": [self.option], "params_input": {}},
        )


@pytest.fixture(scope="module")
def store(airflow_db, tmp_path_factory):
    with retraining_home(tmp_path_factory, "approval") as patch:
        assert APPROVAL_TASK not in load_dag(DAG_ID).task_dict
        patch.setenv("MLOPS_APPROVAL_REQUIRED", "true")
        yield Settings.from_env()


@pytest.fixture(scope="module")
def api(store):
    from airflow.api_fastapi.app import create_app
    from fastapi.testclient import TestClient

    with TestClient(create_app("core")) as client:
        yield client


@pytest.fixture(scope="module")
def approved(store, api):
    return answered_run(api, "alice", "Approve")


def answered_run(api: Any, user: str, option: str) -> tuple[Any, Approver]:
    dag = load_dag(DAG_ID)
    assert dag.task_dict[APPROVAL_TASK].downstream_task_ids == {"deploy_model"}
    assert dag.task_dict["validate_model"].downstream_task_ids == {APPROVAL_TASK, "deploy_model"}
    approver = Approver(api, user, option)
    approver.start()
    run = run_dag(dag=dag)
    approver.join(10)
    assert approver.answer is not None and approver.answer.status_code == 200, approver.answer
    return run, approver


def approved_task_instance(approver: Approver) -> dict[str, Any]:
    """The approval task as the UI's task page reads it."""
    run_id = approver.request["task_instance"]["dag_run_id"]
    path = f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/{APPROVAL_TASK}"
    return approver.api.get(path, headers=approver.headers).json()


def test_an_approved_candidate_is_promoted_and_the_history_says_who_approved_it(store, approved):
    settings, (run, approver) = store, approved

    assert run.state == "success", run.tasks
    assert run.tasks[APPROVAL_TASK].state == "success"
    answer = run.result(APPROVAL_TASK)
    assert (answer["approved"], answer["decided_by"], answer["timed_out"]) == (True, "alice", False)
    assert production_markers(settings) == (1, [1])
    assert approver.request["subject"] == f"Promote {settings.model_name} v1 to Production?"
    assert "before it replaces no Production version." in approver.request["body"]
    rendered = approved_task_instance(approver)["rendered_fields"]
    assert (rendered["subject"], rendered["body"]) == (approver.request["subject"], approver.request["body"])
    last = registry.deployment_history(registry.client_for(settings), settings.model_name)[-1]
    assert (last.event, last.version, last.previous_version) == ("promoted", 1, None)
    assert f"; approved by alice at {answer['decided_at']}" in last.reason
    assert run.note.startswith("**v1 promoted**"), run.note
    assert f". Approved by alice at {answer['decided_at']}." in run.note.splitlines()[0], run.note


def test_a_rejected_candidate_leaves_production_as_it_is_tagged_and_recorded(store, approved, api):
    settings, client = store, registry.client_for(store)
    run, approver = answered_run(api, "bob", "Reject")

    assert run.state == "success", run.tasks
    assert (run.tasks["deploy_model"].state, run.tasks["archive_model"].state) == ("skipped", "skipped")
    assert production_markers(settings) == (1, [1])
    # What the approver saw: the candidate against Production on the same rows, the threshold, drift, the digest,
    # links to both MLflow runs.
    body = approver.request["body"]
    assert "| accuracy on the same " in body and "| candidate v2 | Production v1 |" in body, body
    assert "(threshold 0.80)" in body and "- drift: largest PSI " in body
    assert f"- data digest: `{run.result('extract_data')['digest'][:16]}`" in body
    assert "[MLflow run of v2](http://localhost:5000/#/experiments/" in body and "[MLflow run of v1](" in body
    answer = run.result(APPROVAL_TASK)
    assert (answer["approved"], answer["decided_by"]) == (False, "bob")
    info = registry.get_version(client, settings.model_name, 2)
    assert info.tags[tags.DEPLOYMENT_STATUS] == "not_approved"
    assert info.tags[tags.DEPLOYMENT_REASON] == f"rejected by bob at {answer['decided_at']}"
    description = client.get_model_version(settings.model_name, "2").description
    assert "**Not approved** for Production: rejected by bob at " in description
    model = registry.registered_model(client, settings.model_name)
    refusal = registry.history_of(settings.model_name, model.tags)[-1]
    assert (refusal.event, refusal.version, refusal.previous_version) == ("not_approved", 2, 1)
    # A refusal moved nothing: the history of moves, which rollbacks read, does not list it.
    assert [e.event for e in registry.deployment_history(client, settings.model_name)] == ["promoted"]
    assert run.note.startswith("**v2 not deployed**: rejected by bob at "), run.note


def test_no_answer_in_time_counts_as_a_rejection(store, approved, api, monkeypatch):
    settings = store
    monkeypatch.setenv("MLOPS_APPROVAL_TIMEOUT_SECONDS", "1")
    dag = load_dag(DAG_ID)
    waiter = Approver(api, "nobody", option=None)
    waiter.start()
    run = run_dag(dag=dag)

    assert run.state == "success", run.tasks
    answer = run.result(APPROVAL_TASK)
    assert (answer["approved"], answer["decided_by"], answer["timed_out"]) == (False, "", True)
    assert production_markers(settings) == (1, [1])
    version = run.result("train_model")["model_version"]
    info = registry.get_version(registry.client_for(settings), settings.model_name, version)
    assert info.tags[tags.DEPLOYMENT_STATUS] == "not_approved"
    assert info.tags[tags.DEPLOYMENT_REASON].startswith("not approved: nobody answered the approval request by ")


def test_a_version_that_failed_validation_is_not_asked_about(store, approved, api):
    settings = store
    # Should the run ask anyway, this answer lets it finish, and the test fails on the task's state.
    approver = Approver(api, "carol", "Approve")
    approver.start()
    run = run_dag(conf={"accuracy_threshold": 0.999})
    approver.called_off.set()
    approver.join(10)

    assert run.state == "success", run.tasks
    assert run.tasks[APPROVAL_TASK].state == "skipped"
    assert run.result("validate_model")["validation"] == "failed"
    version = run.result("train_model")["model_version"]
    info = registry.get_version(registry.client_for(settings), settings.model_name, version)
    assert info.tags[tags.DEPLOYMENT_STATUS] == "rejected"
    assert production_markers(settings) == (1, [1])
