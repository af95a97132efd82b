"""Notices (ml.notify) against a real SMTP server (aiosmtpd) and a real HTTP receiver, both on loopback.

The fast tests call :func:`ml.notify.deliver` directly; the DAG tests let Airflow run the DAGs' callbacks
(``dag.test()`` runs them as the DAG processor would) and read what arrived.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from conftest import free_port

from ml import notify, run_note
from ml.settings import ConfigurationError, Settings

SMTP_PASSWORD = "smtp-pa55-word"
WEBHOOK_TOKEN = "T0KEN-b7c1e9d2"
NOTE = (
    "**v3 promoted**, accuracy 0.9737 (threshold 0.80, Production v2 had 0.9649) · "
    "[MLflow run](http://mlflow.test/#/experiments/1/runs/abc?workflowType=machine_learning) · "
    "[breast_cancer_classifier v3](http://mlflow.test/#/models/breast_cancer_classifier/versions/3)"
)
PROMOTED = notify.Notice(
    events=("promoted",),
    note=NOTE,
    dag_id="mlops_pipeline",
    run_id="manual__2026-12-04T05:00:00+00:00",
    run_url="http://airflow.test/dags/mlops_pipeline/runs/manual__2026-12-04T05:00:00+00:00",
)


@dataclass
class Mailbox:
    port: int
    messages: list[Any] = field(default_factory=list)
    logins: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class Receiver:
    """An HTTP server that records JSON POSTs; ``answer`` is the status it replies with, ``hang`` holds replies."""

    port: int
    posts: list[dict[str, Any]] = field(default_factory=list)
    answer: int = 200
    hang: threading.Event | None = None


@pytest.fixture
def mailbox() -> Iterator[Mailbox]:
    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import AuthResult, LoginPassword

    box = Mailbox(free_port())

    class Handler:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            import email
            import email.policy

            message = email.message_from_bytes(envelope.content, policy=email.policy.default)
            message["X-Envelope-To"] = ", ".join(envelope.rcpt_tos)
            box.messages.append(message)
            return "250 OK"

    def authenticate(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
        assert isinstance(data, LoginPassword)
        box.logins.append((data.login.decode(), data.password.decode()))
        return AuthResult(success=data.password.decode() == SMTP_PASSWORD)

    controller = Controller(
        Handler(), hostname="127.0.0.1", port=box.port, authenticator=authenticate, auth_require_tls=False
    )
    controller.start()
    try:
        yield box
    finally:
        controller.stop()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    received = Receiver(free_port())

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if received.hang is not None:
                received.hang.wait(30)
            received.posts.append({"path": self.path, "json": json.loads(body)})
            self.send_response(received.answer)
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", received.port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield received
    finally:
        if received.hang is not None:
            received.hang.set()
        server.shutdown()
        server.server_close()


@pytest.fixture
def channels_env(mlops_env, mailbox: Mailbox, receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """E-mail and webhook notices of every event, through Airflow connections given in the environment."""
    smtp = {
        "conn_type": "smtp",
        "host": "127.0.0.1",
        "port": mailbox.port,
        "login": "mlops",
        "password": SMTP_PASSWORD,
        "extra": {"from_email": "mlops@example.com", "disable_ssl": True, "disable_tls": True},
    }
    monkeypatch.setenv("AIRFLOW_CONN_MLOPS_SMTP", json.dumps(smtp))
    monkeypatch.setenv("AIRFLOW_CONN_MLOPS_WEBHOOK", f"http://127.0.0.1:{receiver.port}/hooks/{WEBHOOK_TOKEN}")
    monkeypatch.setenv("MLOPS_NOTIFY_EMAIL_TO", "ops@example.com, ml@example.com")
    monkeypatch.setenv("MLOPS_NOTIFY_SMTP_CONN_ID", "mlops_smtp")
    monkeypatch.setenv("MLOPS_NOTIFY_WEBHOOK_CONN_ID", "mlops_webhook")
    monkeypatch.setenv("MLOPS_NOTIFY_TIMEOUT_SECONDS", "2")
    return Settings.from_env()


def test_a_promotion_is_mailed_and_posted_with_the_note_and_its_links(channels_env, mailbox, receiver):
    outcomes = notify.deliver(channels_env, PROMOTED)

    assert outcomes == {"e-mail via mlops_smtp": "sent", "webhook mlops_webhook": "sent"}
    [mail] = mailbox.messages
    assert mailbox.logins == [("mlops", SMTP_PASSWORD)]
    assert mail["Subject"] == (
        "[breast_cancer_classifier] v3 promoted, accuracy 0.9737 (threshold 0.80, Production v2 had 0.9649)"
    )
    assert mail["From"] == "mlops@example.com"
    assert mail["X-Envelope-To"] == "ops@example.com, ml@example.com"
    body = mail.get_content()
    assert "MLflow run: http://mlflow.test/#/experiments/1/runs/abc" in body and "**" not in body
    assert f"Airflow run mlops_pipeline / {PROMOTED.run_id}: {PROMOTED.run_url}" in body
    [post] = receiver.posts
    assert post["path"] == f"/hooks/{WEBHOOK_TOKEN}"
    assert post["json"]["text"].startswith("**v3 promoted**, accuracy 0.9737")
    assert f"[Airflow run mlops_pipeline / {PROMOTED.run_id}]({PROMOTED.run_url})" in post["json"]["text"]
    assert post["json"] | {"events": ["promoted"], "model": "breast_cancer_classifier"} == post["json"]


def test_each_channel_gets_only_the_events_the_deployment_routes_to_it(channels_env, mailbox, receiver, monkeypatch):
    monkeypatch.setenv("MLOPS_NOTIFY_EMAIL_EVENTS", "promoted")
    monkeypatch.setenv("MLOPS_NOTIFY_WEBHOOK_EVENTS", "failed, rolled_back")
    settings = Settings.from_env()

    assert notify.deliver(settings, PROMOTED) == {"e-mail via mlops_smtp": "sent"}
    failed = notify.Notice(events=("failed",), note="**failed** before a version was registered.")
    assert notify.deliver(settings, failed) == {"webhook mlops_webhook": "sent"}
    assert [m["Subject"][:31] for m in mailbox.messages] == ["[breast_cancer_classifier] v3 p"]
    assert [p["json"]["events"] for p in receiver.posts] == [["failed"]]
    monkeypatch.setenv("MLOPS_NOTIFY_WEBHOOK_EVENTS", "none")
    assert notify.deliver(Settings.from_env(), failed) == {}


def test_a_channel_that_fails_or_hangs_is_logged_once_and_holds_nothing_up(channels_env, receiver, monkeypatch, caplog):
    # The SMTP server refuses the password; the webhook holds its answer past the timeout.
    monkeypatch.setenv(
        "AIRFLOW_CONN_MLOPS_SMTP",
        json.dumps({"conn_type": "smtp", "host": "127.0.0.1", "port": free_port(), "password": SMTP_PASSWORD}),
    )
    monkeypatch.setenv("MLOPS_NOTIFY_TIMEOUT_SECONDS", "1")
    receiver.hang = threading.Event()
    settings = Settings.from_env()

    with caplog.at_level(logging.INFO, logger="ml.notify"):
        started = time.monotonic()
        outcomes = notify.deliver(settings, PROMOTED)
        elapsed = time.monotonic() - started

    assert elapsed < 1.5, elapsed
    assert outcomes["e-mail via mlops_smtp"].startswith("failed: ConnectionRefusedError"), outcomes
    assert outcomes["webhook mlops_webhook"].startswith("failed:"), outcomes
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings
    assert all(w.startswith("notice of promoted not sent by ") for w in warnings), warnings
    assert SMTP_PASSWORD not in caplog.text and WEBHOOK_TOKEN not in caplog.text


def test_a_webhook_that_refuses_and_a_connection_that_is_not_defined_are_reported_without_their_secrets(
    channels_env, receiver, monkeypatch, caplog
):
    receiver.answer = 500
    monkeypatch.setenv("MLOPS_NOTIFY_SMTP_CONN_ID", "no_such_smtp")
    with caplog.at_level(logging.WARNING, logger="ml.notify"):
        outcomes = notify.deliver(Settings.from_env(), PROMOTED)

    assert outcomes == {
        "e-mail via no_such_smtp": "failed: AirflowNotFoundException: The conn_id `no_such_smtp` isn't defined",
        "webhook mlops_webhook": "failed: RuntimeError: the webhook answered HTTP 500",
    }
    assert WEBHOOK_TOKEN not in caplog.text


def test_an_unknown_event_in_a_routing_setting_is_refused_naming_the_setting(mlops_env, monkeypatch):
    monkeypatch.setenv("MLOPS_NOTIFY_WEBHOOK_EVENTS", "promoted,promotd")
    with pytest.raises(ConfigurationError, match="MLOPS_NOTIFY_WEBHOOK_EVENTS names unknown events promotd; use all"):
        Settings.from_env()


@pytest.mark.slow
def test_airflow_tells_of_a_promotion_a_refused_manual_rollback_and_a_repair_through_the_dags_callbacks(
    airflow_db, channels_env, mailbox, receiver, monkeypatch
):
    from ml import registry
    from ml.airflow_runner import run_dag

    promoted = run_dag()
    refused = run_dag("mlops_rollback", conf={"target_version": "7"})
    # The same data again, after a hand archived Production's stage: extract_data repairs the registry, finds no new
    # data and ends the run there, rollback_model never starting, so the notice is the one extract_data left.
    registry.client_for(channels_env).transition_model_version_stage(channels_env.model_name, "1", "Archived")
    monkeypatch.delenv("MLOPS_FORCE_RETRAIN")
    repaired = run_dag()

    assert (promoted.state, refused.state, repaired.state) == ("success", "failed", "success")
    assert repaired.tasks["rollback_model"].try_number == 0
    first, second, third = (post["json"] for post in receiver.posts)
    assert first["events"] == ["promoted"] and first["run_id"] == promoted.run_id
    assert first["text"].startswith(promoted.note + "\n[Airflow run mlops_pipeline / "), first["text"]
    assert second["events"] == ["failed"] and second["dag_id"] == "mlops_rollback"
    assert second["text"].startswith("**failed** at rollback_production.\n[Airflow run mlops_rollback / "), second
    assert third["events"] == ["repaired"] and third["run_id"] == repaired.run_id
    assert third["text"].startswith("**no new data**: Production v1") and repaired.note in third["text"], third
    assert "the stage and alias of version 1 disagreed" in third["text"], third["text"]
    assert [m["Subject"].split("] ")[1][:11] for m in mailbox.messages] == ["v1 promoted", "failed at r", "no new data"]


@pytest.mark.parametrize(
    ("extract", "deploy", "rollback", "events"),
    [
        ({"repaired": []}, {"deployed": True, "model_version": 3}, {"rollback_performed": False}, ["promoted"]),
        ({"repaired": []}, {"deployed": False, "model_version": 3}, {"rollback_performed": False}, ["rejected"]),
        (
            {"repaired": ["version 2 was Production but it never passed validation; demoted, version 1 restored"]},
            {"deployed": False, "model_version": 3, "skipped_reason": "no new data"},
            {"rollback_performed": False},
            ["repaired"],
        ),
        ({"repaired": []}, {"deployed": False, "model_version": 4}, {"rollback_performed": True}, ["rolled_back"]),
        (None, None, {"rollback_performed": False}, []),
    ],
)
def test_a_runs_events_follow_from_its_results(extract, deploy, rollback, events):
    assert run_note.events(extract=extract, deploy=deploy, rollback=rollback) == events


def test_a_manual_rollback_from_the_command_line_is_told(channels_env, receiver, tmp_path):
    from ml import cli, registry, tags

    name = channels_env.model_name
    client = registry.client_for(channels_env)
    registry.ensure_registered_model(client, name)
    for number in (1, 2):
        (tmp_path / f"model-{number}").mkdir()
        client.create_model_version(name, (tmp_path / f"model-{number}").as_uri())
        registry.set_version_tags(client, name, number, {tags.VALIDATION_STATUS: "passed"})
        registry.promote(channels_env, number, expected_current=number - 1 or None, actor="test", reason="passed")

    assert cli.main(["rollback", "--reason", "bad predictions"]) == 0

    [post] = receiver.posts
    assert post["json"]["events"] == ["manual_rollback"]
    assert post["json"]["text"].startswith("**Production rolled back to v1** by cli:"), post
    assert ", replacing v2: bad predictions. · [breast_cancer_classifier v1](" in post["json"]["text"]
