"""The S3 keys and endpoint of an Airflow connection, as the storage options of the data store and folder sources.

Without ``MLOPS_S3_CONN_ID``, s3fs reads them from the environment as AWS's own clients do (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``). With it, each task reads that connection through Airflow (a secrets
backend, the metadata database or an ``AIRFLOW_CONN_<ID>`` variable), and every S3 filesystem the task opens is
given its keys: the credentials live in Airflow and the secrets backends it reads, not in an image or a worker's
environment.

The credentials are the current task's, held in a context variable that each task sets when it resolves its
settings (:func:`ml.tasks.resolve`), to the connection's or to none: a worker process that runs another task next,
or ``dag.test()`` running a whole run in one process, never hands one task's keys to another.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass
from typing import Any

from ml.redaction import shown_forms
from ml.settings import ConfigurationError

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


_current: contextvars.ContextVar[S3Connection | None] = contextvars.ContextVar("mlops_s3_connection", default=None)


def read_connection(conn_id: str) -> S3Connection:
    """The S3 connection ``conn_id``, read through Airflow; ConfigurationError naming it and the setting if there is
    none or it is not an S3 one. Anything else (Airflow's API not answering) is left to the task's retries."""
    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        connection = BaseHook.get_connection(conn_id)
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


def current() -> S3Connection | None:
    return _current.get()


def storage_options(protocol: str) -> dict[str, Any]:
    """The keyword arguments of a filesystem for ``protocol`` in the current task: the connection's keys for S3."""
    connection = _current.get()
    return connection.storage_options() if connection is not None and protocol in S3_PROTOCOLS else {}


def where_the_keys_come_from() -> str:
    """What a refusal of the keys tells to check."""
    connection = _current.get()
    if connection is not None:
        return f"check the login and password of {connection.described()}"
    return "check the keys the workers read (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY for S3)"
