"""Credentials out of everything shown or stored: logs, HTTP responses, command output, MLflow params, XCom.

URLs carry secrets in two places: the user-info part (``scheme://user:password@host``) and query parameters such as
``?password=`` or a signed URL's ``sig=``. :func:`mask_credentials` replaces the secret parts wherever they occur in a
text, keeping the rest (scheme, user name, host, path), which is what a reader needs to tell one store from another.
A text that is itself a URL (a data source, a tracking URI) is read as SQLAlchemy reads one: its password runs to
the first ``@``, whatever it holds, so a password with a space or a ``/`` in it is masked whole.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

MASK = "***"
# Credentials the service's libraries read from the environment rather than from a URL.
SECRET_ENVIRONMENT = (
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
)
# Shorter secrets are masked only where a URL shows them: replaced wherever they occur, they would mangle every word
# that holds them. Airflow's masker has the same limit ([logging] min_length_masked_secret).
MIN_SECRET_LENGTH = 5
# Every secret :func:`register_secrets` was told of, in each form it may be shown in, longest first (a form may hold
# another); :func:`mask_credentials` masks them wherever they occur, whoever wrote the text.
_known_secrets: list[str] = []


# Compiled on first use, not at import: every DAG file imports this module (through ml.settings), and a DAG parse
# masks nothing.
@functools.cache
def _secret_patterns() -> tuple[re.Pattern[str], re.Pattern[str], re.Pattern[str]]:
    """A URL's user-info in a text and in a text that is one URL; a query parameter whose name says it holds a secret.

    In running text a password stops at white space, so that a URL without user-info followed by a word with an ``@``
    (``http://host:5001 serves models:/m@production``) is not taken for one.
    """
    user_info = re.compile(r"(?P<prefix>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^\s/@:?#]*):(?P<password>[^\s@]*)@")
    leading_user_info = re.compile(
        r"^(?P<prefix>\s*[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^/@:]*):(?P<password>[^@]*)@(?=[^\s@]*\s*$)"
    )
    secret_parameter = re.compile(
        r"(?P<prefix>[?&;](?:[A-Za-z0-9_.-]*(?:password|passwd|pwd|secret|token|signature|credential|api[_-]?key"
        r"|access[_-]?key|sig))=)(?P<value>[^&#\s'\"]+)",
        re.IGNORECASE,
    )
    return user_info, leading_user_info, secret_parameter


def mask_credentials(text: str) -> str:
    """``text`` with every URL password, secret-looking query parameter and registered secret replaced by ``***``."""
    for secret in _known_secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    if "://" not in text and "=" not in text:
        return text
    user_info, leading_user_info, secret_parameter = _secret_patterns()
    masked = leading_user_info.sub(lambda m: f"{m['prefix']}{m['user']}:{MASK}@", text, count=1)
    masked = user_info.sub(lambda m: f"{m['prefix']}{m['user']}:{MASK}@", masked)
    return secret_parameter.sub(lambda m: f"{m['prefix']}{MASK}", masked)


def one_line(error: BaseException) -> str:
    """An exception as the project reports one: its type and the first line of its message, credentials masked.

    The project's refusals reach Airflow as ``AirflowFailException("DataSourceError: ...")`` (ml.tasks): named once.
    """
    lines = str(error).strip().splitlines()
    message = lines[0] if lines else ""
    if type(error).__name__ != "AirflowFailException":
        message = f"{type(error).__name__}: {message}" if message else type(error).__name__
    return mask_credentials(message)


def secrets_in(text: str) -> set[str]:
    """The secrets a text that is a URL (or a query string) carries: its password and secret query parameters."""
    _, leading_user_info, secret_parameter = _secret_patterns()
    found = {m["value"] for m in secret_parameter.finditer(text)}
    if password := leading_user_info.match(text):
        found.add(password["password"])
    return found


def shown_forms(secret: str) -> set[str]:
    """A secret as written, decoded and encoded: a URL's password may reach a message in any of these forms."""
    decoded = unquote(secret)
    return {form for form in (secret, decoded, quote(decoded, safe="")) if form and form != MASK}


def secrets_of(settings: Any, environ: Mapping[str, str] = os.environ) -> set[str]:
    """Every credential a run knows, in each form it may be shown in: the passwords in the settings' URLs (tracking
    and registry stores, data source, data and artifact stores), the model server's token, and what the MLflow client
    and S3 read from the environment."""
    texts = [value for value in vars(settings).values() if isinstance(value, str)]
    secrets = {secret for text in texts for secret in secrets_in(text)}
    secrets |= {settings.serving_token, *(environ.get(name, "") for name in SECRET_ENVIRONMENT)}
    return {form for secret in secrets if secret for form in shown_forms(secret)}


def register_secrets(secrets: Iterable[str]) -> None:
    """Mask ``secrets`` in this process's own masking and in Airflow's: its secrets masker then keeps them out of task
    logs (a task's process and its supervisor's), tracebacks, XCom and rendered fields, whoever wrote the text.

    Airflow keeps two maskers, the Task SDK's and the core's (``dag.test()`` and the scheduler use it): both are told.
    """
    new = {secret for secret in secrets if len(secret) >= MIN_SECRET_LENGTH} - set(_known_secrets)
    if not new:
        return
    _known_secrets[:] = sorted({*_known_secrets, *new}, key=len, reverse=True)
    from airflow.sdk.log import mask_secret

    for secret in new:
        mask_secret(secret)
    try:
        from airflow._shared.secrets_masker import mask_secret as mask_in_core
    except ImportError:  # a worker with the Task SDK alone
        return
    for secret in new:
        mask_in_core(secret)


def without_user_info(url: str) -> str:
    """The URL without ``user:password@``: what may be printed for a shell to use, the credentials going elsewhere."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port is not None else host
    return urlunsplit(parts._replace(netloc=netloc))


def has_user_info(url: str) -> bool:
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    return parts.username is not None or parts.password is not None


class MaskCredentialsFilter(logging.Filter):
    """Masks credentials in every record a handler emits, third-party libraries' records included."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = mask_credentials(message)
        if masked != message:
            record.msg, record.args = masked, None
        if record.exc_info and not record.exc_text:
            record.exc_text = mask_credentials(logging.Formatter().formatException(record.exc_info))
        elif record.exc_text:
            record.exc_text = mask_credentials(record.exc_text)
        return True


def mask_logging_credentials() -> None:
    """Attach :class:`MaskCredentialsFilter` to every handler of the root logger."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, MaskCredentialsFilter) for f in handler.filters):
            handler.addFilter(MaskCredentialsFilter())
