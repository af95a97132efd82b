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
import re
from urllib.parse import urlsplit, urlunsplit

MASK = "***"


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
    """``text`` with every URL password and secret-looking query parameter replaced by ``***``."""
    if "://" not in text and "=" not in text:
        return text
    user_info, leading_user_info, secret_parameter = _secret_patterns()
    masked = leading_user_info.sub(lambda m: f"{m['prefix']}{m['user']}:{MASK}@", text, count=1)
    masked = user_info.sub(lambda m: f"{m['prefix']}{m['user']}:{MASK}@", masked)
    return secret_parameter.sub(lambda m: f"{m['prefix']}{MASK}", masked)


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
