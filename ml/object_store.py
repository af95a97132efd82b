"""The S3 keys and endpoint of an Airflow connection, as the storage options of the data store and folder sources.

Without ``MLOPS_S3_CONN_ID``, s3fs reads them from the environment as AWS's own clients do (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``). With it, each task reads that connection through Airflow (a secrets
backend, the metadata database or an ``AIRFLOW_CONN_<ID>`` variable), and every S3 filesystem the task opens is
given its keys: the credentials live in Airflow and the secrets backends it reads, not in an image or a worker's
environment.

The credentials are the current task's, held in a context variable that each task sets when it resolves its
settings (:func:`ml.tasks.resolve`), to the connection's or to none: a worker process that runs another task next,
or ``dag.test()`` running a whole run in one process, never hands one task's keys to another.

Outside a task (``mlops ingest``, the model server) the process reads the connection once, at start, through Airflow's
own lookup as its servers make it (a configured secrets backend, ``AIRFLOW_CONN_<ID>``, then the metadata database its
configuration names), and opens every S3 filesystem with it (:func:`use_for_this_process`). The MLflow server, which
reads its S3 keys from the environment, is started through ``python -m ml.object_store COMMAND...``: the keys go into
that command's environment alone, never into its arguments, a file or a log.
"""

from __future__ import annotations

import contextvars
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ml.redaction import mask_logging_credentials, register_secrets, shown_forms
from ml.settings import ConfigurationError, Settings

log = logging.getLogger(__name__)

SETTING = "MLOPS_S3_CONN_ID"
CONNECTION_TYPE = "aws"
# The fsspec protocols an S3 connection's keys are for; another object store keeps its own credentials.
S3_PROTOCOLS = frozenset({"s3", "s3a"})


@dataclass(frozen=True, repr=False)
class S3Connection:
    """An Airflow connection of type ``aws``: login = access key id, password = secret key, extra ``endpoint_url``
    and ``region_name``. Its repr names the connection alone."""

    conn_id: str
    access_key_id: str
    secret_access_key: str
    endpoint_url: str = ""
    region_name: str = ""

    def __repr__(self) -> str:
        return f"S3Connection({self.conn_id!r})"

    def storage_options(self) -> dict[str, Any]:
        """s3fs's keyword arguments for these keys. A filesystem made with them is cached under them, apart from one
        made with the environment's keys or another connection's."""
        options: dict[str, Any] = {"key": self.access_key_id or None, "secret": self.secret_access_key or None}
        client_kwargs = {
            name: value
            for name, value in (("endpoint_url", self.endpoint_url), ("region_name", self.region_name))
            if value
        }
        return {**options, "client_kwargs": client_kwargs} if client_kwargs else options

    def secrets(self) -> set[str]:
        """The keys, in each form a message may show them: both are masked wherever the project masks credentials."""
        return {form for key in (self.access_key_id, self.secret_access_key) if key for form in shown_forms(key)}

    def described(self) -> str:
        return f"the Airflow connection {self.conn_id!r} ({SETTING})"

    def environment(self) -> dict[str, str]:
        """The variables AWS's clients (boto3, MLflow's S3 artifact store) read these keys and endpoint from."""
        found = {"AWS_ACCESS_KEY_ID": self.access_key_id, "AWS_SECRET_ACCESS_KEY": self.secret_access_key}
        if self.endpoint_url:
            found |= {"AWS_ENDPOINT_URL": self.endpoint_url, "MLFLOW_S3_ENDPOINT_URL": self.endpoint_url}
        if self.region_name:
            found["AWS_DEFAULT_REGION"] = self.region_name
        return {name: value for name, value in found.items() if value}


# Unset in a task until it resolves its settings; outside tasks, the process's connection (or none) applies.
_current: contextvars.ContextVar[S3Connection | None] = contextvars.ContextVar("mlops_s3_connection")
_for_process: S3Connection | None = None


def read_connection(conn_id: str, *, in_task: bool = True) -> S3Connection:
    """The S3 connection ``conn_id``, read through Airflow; ConfigurationError naming it and the setting if there is
    none or it is not an S3 one. Anything else (Airflow's API not answering) is left to the task's retries.

    A task asks the Task SDK (the API server hands it over). Outside a task, Airflow's core looks it up along the
    search path its servers use: a configured secrets backend, ``AIRFLOW_CONN_<ID>``, then the metadata database.
    """
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        if in_task:
            from airflow.sdk import BaseHook

            connection = BaseHook.get_connection(conn_id)
        else:
            from airflow.models.connection import Connection

            # Without a Fernet key Airflow warns that it would store values unencrypted, on standard output, where
            # `mlops ingest` prints its result; reading a connection stores nothing.
            logging.getLogger("airflow.models.crypto").setLevel(logging.ERROR)
            connection = Connection.get_connection_from_secrets(conn_id)
    except AirflowNotFoundException:
        raise ConfigurationError(
            f"{SETTING}={conn_id!r} names no Airflow connection: create it (type {CONNECTION_TYPE}: login = access "
            "key id, password = secret key, extra endpoint_url and region_name), or leave the setting empty to read "
            "the keys from the environment"
        ) from None
    if connection.conn_type != CONNECTION_TYPE:
        raise ConfigurationError(
            f"{SETTING}={conn_id!r} names an Airflow connection of type {connection.conn_type!r}; the S3 keys are "
            f"read from one of type {CONNECTION_TYPE!r}"
        )
    extra = connection.extra_dejson
    return S3Connection(
        conn_id=conn_id,
        access_key_id=connection.login or "",
        secret_access_key=connection.password or "",
        endpoint_url=str(extra.get("endpoint_url") or ""),
        region_name=str(extra.get("region_name") or ""),
    )


def use_for_this_task(connection: S3Connection | None) -> None:
    """Open the S3 filesystems of the current task with ``connection``'s keys (None: the environment's)."""
    _current.set(connection)


def use_for_this_process(settings: Settings) -> S3Connection | None:
    """Outside a task: read the connection ``MLOPS_S3_CONN_ID`` names, if it names one, mask its keys in whatever
    this process shows, and open every S3 filesystem of the process with them. ConfigurationError as in a task."""
    global _for_process
    connection = read_connection(settings.s3_conn_id, in_task=False) if settings.s3_conn_id else None
    if connection is not None:
        register_secrets(connection.secrets())
    _for_process = connection
    return connection


def current() -> S3Connection | None:
    return _current.get(_for_process)


def storage_options(protocol: str) -> dict[str, Any]:
    """The keyword arguments of a filesystem for ``protocol`` here: the connection's keys for S3, if there is one."""
    connection = current()
    return connection.storage_options() if connection is not None and protocol in S3_PROTOCOLS else {}


def where_the_keys_come_from() -> str:
    """What a refusal of the keys tells to check."""
    connection = current()
    if connection is not None:
        return f"check the login and password of {connection.described()}"
    return "check the keys the workers read (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY for S3)"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ml.object_store COMMAND [ARG...]``: run COMMAND (the MLflow server) with the S3 keys of the
    connection ``MLOPS_S3_CONN_ID`` names in its environment, in place of any the environment held; without the
    setting, with the environment as it is. A missing or unusable connection ends here, naming it, with status 2."""
    command = list(sys.argv[1:] if argv is None else argv)
    if not command:
        print("usage: python -m ml.object_store COMMAND [ARG...]", file=sys.stderr)
        return 2
    try:
        connection = use_for_this_process(Settings.from_env())
        problem = None
    except ConfigurationError as error:
        connection, problem = None, error
    # Configured after the lookup, which sets Airflow's logging up for its own process: these lines are this one's.
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True
    )
    mask_logging_credentials()
    if problem is not None:
        log.error("%s", problem)
        return 2
    environment = dict(os.environ)
    if connection is not None:
        environment |= connection.environment()
        log.info("starting %s with the S3 keys of %s", command[0], connection.described())
    # What is buffered would be lost with this process's image.
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os.execvpe(command[0], command, environment)


if __name__ == "__main__":
    sys.exit(main())
