"""Notices: people hear when the service promotes, rejects, rolls back or repairs something, or a run fails.

A notice is the run's note (``ml.run_note``: one line of facts with links into MLflow) and a link to the Airflow run,
sent by e-mail (SMTP) and to a webhook (a JSON POST whose markdown ``text`` chat tools' incoming webhooks accept).
Which events go where is the deployment's (``MLOPS_NOTIFY_*``); the SMTP server and the webhook's URL, with their
secrets, are Airflow connections (``AIRFLOW_CONN_<ID>`` in the environment works too), masked in every log.

Sending never fails or holds up what it reports on: every channel is sent in parallel and given
``MLOPS_NOTIFY_TIMEOUT_SECONDS`` in all; a channel that fails or does not answer is logged once and given up.

The DAGs send through :class:`RunNotifier`, Airflow's notifier interface, as their ``on_success_callback`` and
``on_failure_callback``; the command line calls :func:`deliver`. Light on purpose: DAG files import this module.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from airflow.sdk import BaseNotifier

from ml.context import RunContext
from ml.redaction import mask_credentials
from ml.run_note import NOTICE_KEY, RUN_NOTE_KEY
from ml.settings import Settings, notice_events

log = logging.getLogger(__name__)
# A markdown link, as run notes write them; mail shows it as "text: url".
MARKDOWN_LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")
# The links a run note ends its line with (" · [MLflow run](...) · [model v3](...)"), left out of a subject.
LINKS_AFTER_TEXT = re.compile(r"(?: · \[[^\]]+\]\([^)\s]+\))+")


@dataclass(frozen=True)
class Notice:
    """What one run (or one rollback by hand) did, as people are told."""

    events: tuple[str, ...]
    note: str
    dag_id: str = ""
    run_id: str = ""
    run_url: str = ""
    details: tuple[str, ...] = ()

    @property
    def headline(self) -> str:
        """The note's first line without its links and markdown: the e-mail's subject."""
        first = self.note.splitlines()[0] if self.note else ", ".join(self.events)
        return plain(LINKS_AFTER_TEXT.sub("", first))

    def markdown(self) -> str:
        lines = [self.note, *(f"- {detail}" for detail in self.details)]
        if self.run_url:
            lines.append(f"[Airflow run {self.dag_id} / {self.run_id}]({self.run_url})")
        return "\n".join(lines)

    def webhook_payload(self, model_name: str) -> dict[str, Any]:
        return {
            "text": self.markdown(),
            "events": list(self.events),
            "model": model_name,
            "dag_id": self.dag_id,
            "run_id": self.run_id,
        }


def plain(markdown: str) -> str:
    """A run note as plain text: links as "text: url", no emphasis or code marks."""
    return MARKDOWN_LINK.sub(r"\1: \2", markdown).replace("**", "").replace("`", "")


@dataclass(frozen=True)
class Channel:
    """Where notices of some events go: a name for the logs (never a secret) and how to send one."""

    name: str
    events: frozenset[str]
    send: Callable[[Notice, float], None] = field(repr=False)


def channels(settings: Settings) -> list[Channel]:
    """The channels the deployment configures."""
    configured = []
    recipients = [address.strip() for address in settings.notify_email_to.split(",") if address.strip()]
    if recipients:
        conn_id = settings.notify_smtp_conn_id

        def send_mail(notice: Notice, timeout: float) -> None:
            _send_mail(conn_id, recipients, settings.model_name, notice, timeout)

        configured.append(
            Channel(f"e-mail via {conn_id}", frozenset(notice_events(settings.notify_email_events)), send_mail)
        )
    if settings.notify_webhook_conn_id:
        webhook_id = settings.notify_webhook_conn_id

        def post(notice: Notice, timeout: float) -> None:
            _post_webhook(webhook_id, notice.webhook_payload(settings.model_name), timeout)

        configured.append(
            Channel(f"webhook {webhook_id}", frozenset(notice_events(settings.notify_webhook_events)), post)
        )
    return configured


def deliver(settings: Settings, notice: Notice) -> dict[str, str]:
    """Send ``notice`` to every channel routed one of its events; returns each channel's outcome by name.

    Never raises, and returns within the timeout: each channel runs in a thread of its own, and one still sending
    when the time is up is left to finish (or fail) on its own.
    """
    routed = [channel for channel in channels(settings) if channel.events.intersection(notice.events)]
    outcomes: dict[str, str] = {}
    timeout = settings.notify_timeout

    def attempt(channel: Channel) -> None:
        try:
            channel.send(notice, timeout)
        except Exception as error:
            outcomes[channel.name] = f"failed: {_described(error)}"
        else:
            outcomes[channel.name] = "sent"

    threads = [threading.Thread(target=attempt, args=(channel,), daemon=True) for channel in routed]
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    for channel in routed:
        outcome = outcomes.setdefault(channel.name, f"failed: no answer within {timeout:g} s")
        if outcome == "sent":
            log.info("notice of %s sent by %s", ", ".join(notice.events), channel.name)
        else:
            log.warning("notice of %s not sent by %s: %s", ", ".join(notice.events), channel.name, outcome[8:])
    return dict(outcomes)


def _described(error: Exception) -> str:
    # Errors of HTTP clients quote the URL, and a webhook's URL holds its token: keep only what names the failure.
    text = re.sub(r"https?://\S+", "<url>", str(error)) or type(error).__name__
    return mask_credentials(f"{type(error).__name__}: {text}")


def _connection(conn_id: str) -> Any:
    """An Airflow connection, from the API server in Airflow's processes, else from the environment or a secrets
    backend; its password is masked in the logs from here on."""
    from airflow.sdk import Connection

    return Connection.get(conn_id)


def _send_mail(conn_id: str, recipients: list[str], model_name: str, notice: Notice, timeout: float) -> None:
    import smtplib
    from email.message import EmailMessage

    conn = _connection(conn_id)
    extra = conn.extra_dejson
    sender = str(extra.get("from_email") or conn.login or "mlops@localhost")
    message = EmailMessage()
    message["Subject"] = f"[{model_name}] {notice.headline}"[:200]
    message["From"] = sender
    message["To"] = ", ".join(recipients)
    message.set_content(plain(notice.markdown()) + "\n")
    # The SMTP provider's extras: SSL unless disable_ssl, then STARTTLS unless disable_tls.
    use_ssl = not _flag(extra.get("disable_ssl"))
    host, port = conn.host or "localhost", int(conn.port or (465 if use_ssl else 25))
    server = smtplib.SMTP_SSL(host, port, timeout=timeout) if use_ssl else smtplib.SMTP(host, port, timeout=timeout)
    with server:
        if not use_ssl and not _flag(extra.get("disable_tls")):
            server.starttls()
        if conn.login:
            server.login(conn.login, conn.password or "")
        server.send_message(message)


def _flag(value: Any) -> bool:
    return value is True or str(value).strip().lower() in {"1", "true", "yes", "on"}


def webhook_url(conn: Any) -> str:
    """A webhook connection's URL: its host when that is a whole URL (as Airflow's HTTP provider reads it), else
    scheme (the connection type), host, port and path (the schema)."""
    from airflow.sdk.log import mask_secret

    host = str(conn.host or "")
    if "://" in host:
        url = host
    else:
        scheme = "https" if conn.conn_type == "https" else "http"
        url = f"{scheme}://{host}{f':{conn.port}' if conn.port else ''}"
    if conn.schema:
        url = f"{url.rstrip('/')}/{conn.schema.lstrip('/')}"
    # Chat tools put the token in the URL itself.
    mask_secret(url)
    return url


def _post_webhook(conn_id: str, payload: Mapping[str, Any], timeout: float) -> None:
    import httpx

    conn = _connection(conn_id)
    auth = (conn.login, conn.password or "") if conn.login else None
    response = httpx.post(webhook_url(conn), json=dict(payload), auth=auth, timeout=timeout)
    if response.status_code >= 300:
        raise RuntimeError(f"the webhook answered HTTP {response.status_code}")


class RunNotifier(BaseNotifier):
    """Tells people what a finished DAG run did: a DAG's ``on_success_callback`` and ``on_failure_callback``.

    The events and the note are what the first of ``result_tasks`` that left them (the task that runs last, whatever
    happened, or one that ended the run early) pushed under :data:`~ml.run_note.NOTICE_KEY` and
    :data:`~ml.run_note.RUN_NOTE_KEY`; a failed run is one event more. Airflow
    runs DAG callbacks in the DAG processor (or in ``dag.test()``), after the run has ended.
    """

    def __init__(self, *, result_tasks: tuple[str, ...], failed: bool = False) -> None:
        super().__init__()
        self.result_tasks = result_tasks
        self.failed = failed

    def render_template_fields(self, context: Any, jinja_env: Any = None) -> None:
        """Nothing to render: the notice is composed from the run's results, not from templates (and dag.test() hands
        DAG callbacks a serialized DAG, which has no template environment)."""

    def notify(self, context: Any) -> None:
        try:
            settings = Settings.from_env()
            if channels(settings):
                deliver(settings, self.notice(context))
        except Exception as error:
            log.warning("the run's notice was not sent: %s", _described(error))

    def notice(self, context: Any) -> Notice:
        dag_id = str(getattr(context.get("dag"), "dag_id", "") or "")
        run_id = str(context.get("run_id") or "")
        told = self._pushed(context, dag_id, run_id, NOTICE_KEY)
        note = self._pushed(context, dag_id, run_id, RUN_NOTE_KEY)
        told = told if isinstance(told, Mapping) else {}
        events = [str(event) for event in told.get("events") or []]
        if self.failed:
            events.append("failed")
            failed_task = getattr(context.get("ti"), "task_id", None)
            note = note or (f"**failed** at {failed_task}." if failed_task else f"**failed**: {context.get('reason')}.")
        return Notice(
            events=tuple(events),
            note=str(note or ""),
            dag_id=dag_id,
            run_id=run_id,
            run_url=RunContext(dag_id, run_id, 1, {}).airflow_url if dag_id and run_id else "",
            details=tuple(str(detail) for detail in told.get("details") or []),
        )

    def _pushed(self, context: Any, dag_id: str, run_id: str, key: str) -> Any:
        """What the first of ``result_tasks`` that pushed anything under ``key`` pushed: through the task SDK in the
        DAG processor, from the metadata database in ``dag.test()``, whose callbacks run outside any task and have no
        channel to the API server."""
        from airflow.sdk.execution_time import task_runner

        ti = context.get("ti")
        if ti is not None and getattr(task_runner, "SUPERVISOR_COMMS", None) is not None:
            pulled = (ti.xcom_pull(task_ids=task_id, key=key) for task_id in self.result_tasks)
        else:
            from ml.airflow_plugin import run_xcom

            pulled = (run_xcom(dag_id, run_id, task_id, key) for task_id in self.result_tasks)
        return next((pushed for pushed in pulled if pushed is not None), None)
