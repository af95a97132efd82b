"""The configured data source as an Airflow Asset, shared by the DAG that updates it and the DAG that retrains on it.

Light on purpose: DAG files import it at top level, so it imports nothing heavier than the Airflow SDK and the
settings. The asset's URI is where the data lives (``MLOPS_DATA_ASSET_URI`` overrides it):

- a local folder or file: ``file:///abs/path`` (a relative path is resolved against the current directory);
- an fsspec URL (``s3://bucket/incoming/``, ...): the URL itself (Airflow drops a trailing ``/``);
- a SQL table: ``x-mlops-<dialect>://<host or local>/<database>/<table>`` (credentials left out);
- a bundled data set: ``x-mlops://sklearn/<name>``.

Its name is its URI, so pointing the service at another source makes another asset rather than renaming one.
"""

from __future__ import annotations

import hashlib
import logging
import re
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ml.settings import DEFAULT_DATA_SOURCE, SQL_SCHEMES, Settings, url_scheme

if TYPE_CHECKING:
    from airflow.sdk import Asset

log = logging.getLogger(__name__)

# The folder of the data store that holds the model server's records (ml/records.py writes it).
RECORDS_FOLDER = "records"


def data_asset_uri(source: str, query: str = "") -> str:
    """The asset URI of a data source (see the module's docstring); never contains credentials."""
    if source.startswith("sklearn:"):
        return f"x-mlops://sklearn/{source.removeprefix('sklearn:')}"
    if "://" not in source:
        return Path(source).expanduser().resolve().as_uri()
    scheme = url_scheme(source)
    if scheme in SQL_SCHEMES:
        return _sql_asset_uri(source, scheme, query)
    parsed = urllib.parse.urlsplit(source)
    netloc = parsed.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit(parsed._replace(netloc=netloc, query="", fragment=""))


def _sql_asset_uri(source: str, dialect: str, query: str) -> str:
    parsed = urllib.parse.urlsplit(source)
    host = parsed.netloc.rpartition("@")[2] or "local"
    database = re.sub(r"/+", "/", parsed.path).strip("/") or "default"
    statement = query.strip()
    if statement and not re.search(r"\s", statement):
        table = statement.strip('"')
    else:
        table = "query-" + hashlib.sha256(statement.encode()).hexdigest()[:12]
    return f"x-mlops-{dialect}://{host}/{database}/{table}"


def training_data_asset(settings: Settings | None = None) -> Asset:
    """The Asset that stands for the configured data source.

    Never raises: a source Airflow refuses as an asset URI is replaced by the bundled data set's asset, so the DAG files
    still import; the first task then reports the setting.
    """
    from airflow.sdk import Asset

    settings = settings or Settings.from_env_or_embedded()
    extra: dict[str, Any] = {"model": settings.model_name, "label_column": settings.label_column}
    try:
        return Asset(uri=training_data_uri(settings), extra=extra)
    except (ValueError, RuntimeError, OSError) as error:
        log.warning("the configured data source cannot name an asset (%s); using the bundled data set's", error)
        return Asset(uri=data_asset_uri(DEFAULT_DATA_SOURCE), extra=extra)


def recorded_traffic_asset(settings: Settings | None = None) -> Asset:
    """The Asset that stands for the model server's records (docs/recording.md): an event of it starts mlops_monitor.

    Its URI is the records folder of the data store; never raises, like :func:`training_data_asset`.
    """
    from airflow.sdk import Asset

    settings = settings or Settings.from_env_or_embedded()
    extra: dict[str, Any] = {"model": settings.model_name}
    try:
        return Asset(uri=recorded_traffic_uri(settings), extra=extra)
    except (ValueError, RuntimeError, OSError) as error:
        log.warning("the data store cannot name an asset (%s); using the default store's", error)
        default_store = Settings.from_env_or_embedded().home / "datastore"
        return Asset(uri=data_asset_uri(str(default_store / RECORDS_FOLDER)), extra=extra)


def recorded_traffic_uri(settings: Settings) -> str:
    """The URI of :func:`recorded_traffic_asset`, without importing Airflow (the model server posts its events)."""
    return data_asset_uri(f"{settings.data_store.rstrip('/')}/{RECORDS_FOLDER}")


def training_data_uri(settings: Settings) -> str:
    """The URI of :func:`training_data_asset` (``mlops ingest`` posts its events)."""
    return settings.data_asset_uri or data_asset_uri(settings.data_source, settings.data_query)
