"""One typed settings object, read from the environment, each setting declared once.

Every field of :class:`Settings` is declared with :func:`setting`: its environment variable, default, description,
bounds and whether a run may override it. Reading the environment, coercing and checking values, the parameters logged
to MLflow and the DAG's trigger form (its ``Param`` s) are all derived from those declarations.

Every field has an embedded default, so a fresh clone runs with no environment at all: Airflow and MLflow keep their
state in SQLite files and local folders under ``MLOPS_HOME`` (``./.mlops`` by default). Settings marked ``per_run``
may be overridden by a DAG run's parameters (:meth:`Settings.for_run`); the others (checks, hooks, stores, names) come
from the deployment alone.

Light on purpose: DAG files import this module at parse time, so it imports nothing beyond the standard library.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import typing
import urllib.parse
from collections.abc import Callable, Collection, Mapping
from dataclasses import MISSING, Field, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ml.redaction import mask_credentials

MODEL_FAMILIES = ("logistic_regression", "random_forest", "gradient_boosting")
# What a run's candidates are ranked by, on the selection split: the held-out rows stay for the gate and Production.
SELECTION_METRICS = ("accuracy", "roc_auc", "average_precision", "f1")
# Each candidate is a task instance, a fit and an MLflow run: a run may not ask for more than this many.
MAX_CANDIDATES = 8
CANDIDATE_KEYS = ("model_family", "hyperparameters")
DEFAULT_DATA_SOURCE = "sklearn:breast_cancer"
SQL_SCHEMES = ("sqlite", "postgresql", "postgres", "mysql", "mariadb", "mssql", "oracle", "duckdb")
TRACKING_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "file", "http", "https", "databricks")
# MLflow's own rules for alias names: "latest" and "v<digits>" name versions, so an alias may not take them.
ALIAS_PATTERN = re.compile(r"^[\w\-]{1,255}$")
# SQLAlchemy's reading of a URL's user-info: a user name without ":" or "/", then a password up to the first "@".
# Patterns, not compiled ones: a DAG parse imports this module and reads no URL.
USER_INFO = r"^[^:/@]*(?::[^@]*)?@"
USER_INFO_WITH_PASSWORD = r"^[^:/@]*:[^@]*@"
# A URL whose password is anything but the mask is refused when a run is triggered, before Airflow stores its conf.
NO_PASSWORD_BUT_THE_MASK = r"^(?![A-Za-z][A-Za-z0-9+.\-]*://[^/@:]*:(?!\*\*\*@)[^@]*@)"
RESERVED_ALIAS = re.compile(r"^(latest|v\d+)$", re.IGNORECASE)
# What the service tells people about (ml.notify): a run's outcome, a rollback by hand, a repair of the registry.
NOTICE_EVENTS = ("promoted", "rejected", "rolled_back", "manual_rollback", "repaired", "failed")
# The dialect of the trigger form's schemas. Airflow validates every Param with jsonschema at parse time, at trigger
# time and in each task; a schema without "$schema" is checked against draft 2020-12's metaschema, seven documents
# joined by references, which costs three times draft 7's single document. The form uses nothing newer than draft 7.
PARAM_SCHEMA_DIALECT = "http://json-schema.org/draft-07/schema#"
# A refusal echoes the value it refuses, but no more of it than a reader needs to recognise it: a value pasted by
# mistake may be thousands of characters long, and the refusal must stay one readable line.
LONGEST_ECHOED_VALUE = 60


class ConfigurationError(ValueError):
    """A setting or a run parameter has a value the pipeline cannot use."""


Environ = Mapping[str, str]


# Declarations and specs are compared by identity (each setting is declared once): no generated __eq__ or __hash__,
# two functions fewer for Python to compile at every DAG parse.
@dataclass(frozen=True, eq=False)
class Declaration:
    """What is known about one setting besides its name, type and default."""

    env: str
    description: str
    title: str = ""
    per_run: bool = False
    logged: bool = True
    required: bool = False
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: float | None = None
    exclusive_maximum: float | None = None
    choices: tuple[str, ...] = ()
    # A run's value must match it (the trigger form's schema); the deployment's value need not.
    run_pattern: str | None = None
    home_default: Callable[[Path], str] | None = None
    check: Callable[[Any], str | None] | None = None


def setting(default: Any, env: str, description: str, *, secret: bool = False, **declared: Any) -> Any:
    """Declare a settings field (see :class:`Declaration` for the keywords); a secret is left out of the repr, so a
    settings object that reaches a log does not carry it."""
    metadata = {"setting": Declaration(env=env, description=description, **declared)}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, repr=not secret, metadata=metadata)


def url_scheme(uri: str) -> str:
    """The scheme of a URL, without a SQLAlchemy driver (``postgresql+psycopg://`` -> ``postgresql``); "" for a path."""
    return uri.split("://", 1)[0].split("+", 1)[0].lower() if "://" in uri else ""


def data_source_problem(source: str) -> str | None:
    """Why ``source`` cannot even be parsed as a data source (a path that cannot be expanded, a malformed URL).

    A URL's user-info is read as SQLAlchemy reads it (the password runs to the first ``@``) and left out of the
    parsing: a password with a ``/`` in it is no port, and no message repeats any part of it.
    """
    if source.startswith("sklearn:"):
        return None
    shown = mask_credentials(source)
    try:
        if "://" in source:
            scheme, rest = source.split("://", 1)
            parsed = urllib.parse.urlsplit(f"{scheme}://{re.sub(USER_INFO, '', rest, count=1)}")
            parsed.port  # noqa: B018 - reading the port is what checks it
            if not parsed.scheme or not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.\-]*", parsed.scheme):
                return f"data source {shown!r} is not a URL with a valid scheme"
        else:
            Path(source).expanduser().resolve()
    except (ValueError, RuntimeError, OSError) as error:
        return f"data source {shown!r} cannot be used: {mask_credentials(str(error))}"
    return None


def has_password(source: str) -> bool:
    """Whether a URL data source carries a password in its user-info."""
    return "://" in source and bool(re.match(USER_INFO_WITH_PASSWORD, source.split("://", 1)[1]))


def alias_problem(alias: str) -> str | None:
    if not ALIAS_PATTERN.match(alias):
        return f"production_alias {alias!r} may hold only letters, digits, _ and - (1 to 255 of them)"
    if RESERVED_ALIAS.match(alias):
        return f"production_alias {alias!r} is reserved by MLflow ('latest' and v<number> name versions); use another"
    return None


def candidates_problem(candidates: list[Any]) -> str | None:
    """Why a list of candidate specs cannot be trained, naming the entry; the estimators' own checks of each entry's
    hyper-parameters come later (ml.training.candidates_of), still before any data is read."""
    if len(candidates) > MAX_CANDIDATES:
        return f"candidates holds {len(candidates)} entries; a run trains at most {MAX_CANDIDATES}"
    for index, spec in enumerate(candidates):
        where = f"candidates[{index}]"
        if not isinstance(spec, dict):
            return f"{where} must be a JSON object with {' and/or '.join(CANDIDATE_KEYS)}, got {shown_value(spec)}"
        unknown = sorted(str(key) for key in spec if key not in CANDIDATE_KEYS)
        if unknown:
            return f"{where} has unknown keys {shown_value(unknown)}; a candidate takes {', '.join(CANDIDATE_KEYS)}"
        family = spec.get("model_family", MODEL_FAMILIES[0])
        if family not in MODEL_FAMILIES:
            return f"{where}: model_family {shown_value(family)} is unknown; choose one of {', '.join(MODEL_FAMILIES)}"
        hyperparameters = spec.get("hyperparameters", {})
        if not isinstance(hyperparameters, dict):
            return f"{where}: hyperparameters must be a JSON object, got {shown_value(hyperparameters)}"
        non_finite = [str(key) for key, value in hyperparameters.items() if not _finite_or_not_a_number(value)]
        if non_finite:
            return f"{where}: hyperparameters {', '.join(non_finite)} must be finite numbers"
    return None


def _finite_or_not_a_number(value: Any) -> bool:
    return not isinstance(value, float) or math.isfinite(value)


def notice_events(value: str) -> tuple[str, ...]:
    """The events a comma-separated list names (``all`` names every one, ``none`` none)."""
    named = tuple(word.strip().lower() for word in value.split(",") if word.strip())
    if named in {("all",), ("none",)}:
        return NOTICE_EVENTS if named == ("all",) else ()
    return named


def notice_routing(env: str, goes: str) -> Any:
    """Declare a setting that lists the events whose notices go to one channel."""

    def problem(value: str) -> str | None:
        unknown = [event for event in notice_events(value) if event not in NOTICE_EVENTS]
        if unknown:
            return (
                f"{env} names unknown events {', '.join(unknown)}; use all, none or some of {', '.join(NOTICE_EVENTS)}"
            )
        return None

    described = f"Which events {goes}, comma-separated: all, none, or some of {', '.join(NOTICE_EVENTS)}."
    return setting("all", env, described, check=problem)


CRON_PRESETS = ("@hourly", "@daily", "@midnight", "@weekly", "@monthly", "@yearly", "@annually")
CRON_FIELD = re.compile(r"^[0-9*/,\-?LW#A-Za-z]+$")


def cron_problem(expression: str) -> str | None:
    """Why ``expression`` is no cron expression (five fields) or preset; the scheduler would refuse it only later."""
    fields_ = expression.split()
    if expression in CRON_PRESETS or (len(fields_) == 5 and all(CRON_FIELD.match(part) for part in fields_)):
        return None
    return f"schedule {shown_value(expression)} is neither five cron fields nor one of {', '.join(CRON_PRESETS)}"


def s3_conn_id_problem(conn_id: str) -> str | None:
    """Why ``conn_id`` cannot name an Airflow connection (whose ids are letters, digits, ``_``, ``-`` and ``.``)."""
    if conn_id and not re.fullmatch(r"[\w.-]{1,250}", conn_id):
        return f"MLOPS_S3_CONN_ID={shown_value(conn_id)} is no Airflow connection id: use letters, digits, _, - and ."
    return None


def tracking_uri_problem(uri: str) -> str | None:
    scheme = url_scheme(uri) or "file"
    if scheme not in TRACKING_SCHEMES:
        return f"tracking URI {uri!r} has an unsupported scheme {scheme!r}; use one of {', '.join(TRACKING_SCHEMES)}"
    return None


@dataclass(frozen=True, repr=False)
class Settings:
    """The service's settings: one field per setting, each declared with :func:`setting`.

    Build them with :meth:`from_env` (raises on a bad value), :meth:`from_env_or_embedded` (never raises) or, for a
    run, :meth:`for_run`. Compared by value; not hashable, since ``hyperparameters`` is a dict. The repr masks
    credentials in URLs (data source, stores) and leaves out the serving token.
    """

    # Said outright rather than generated: a generated __hash__ would raise on the dict anyway.
    __hash__ = None  # type: ignore[assignment]
    home: Path = setting(
        Path(".mlops"), "MLOPS_HOME", "Folder for the embedded stores (Airflow, MLflow, data snapshots)."
    )
    tracking_uri: str = setting(
        "",
        "MLFLOW_TRACKING_URI",
        "MLflow tracking store: a database URL, a folder or an http(s) server.",
        home_default=lambda home: f"sqlite:///{home / 'mlflow.db'}",
        check=tracking_uri_problem,
    )
    registry_uri: str | None = setting(
        None, "MLFLOW_REGISTRY_URI", "Model Registry store, when it is not the tracking store."
    )
    artifact_root: str = setting(
        "",
        "MLOPS_ARTIFACT_ROOT",
        "Where a local tracking store keeps run artifacts.",
        home_default=lambda home: str(home / "mlartifacts"),
    )
    data_store: str = setting(
        "",
        "MLOPS_DATA_STORE",
        "Folder or fsspec URL for data snapshots and splits, e.g. s3://bucket/prefix (keys and endpoint from the "
        "Airflow connection MLOPS_S3_CONN_ID names, or else AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and "
        "AWS_ENDPOINT_URL).",
        home_default=lambda home: str(home / "datastore"),
    )
    s3_conn_id: str = setting(
        "",
        "MLOPS_S3_CONN_ID",
        "Airflow connection (type aws: login = access key id, password = secret key, extra endpoint_url and "
        "region_name) whose keys the tasks, mlops ingest and the model server open the data store and folder sources "
        "on S3 with, and python -m ml.object_store gives the MLflow server it starts; empty: the keys and endpoint "
        "of the environment.",
        check=s3_conn_id_problem,
    )
    experiment_name: str = setting(
        "mlops_pipeline", "MLOPS_EXPERIMENT", "MLflow experiment of the runs.", required=True
    )
    model_name: str = setting("breast_cancer_classifier", "MLOPS_MODEL_NAME", "Registered model name.", required=True)
    production_alias: str = setting(
        "production", "MLOPS_PRODUCTION_ALIAS", "Alias that marks the Production version.", check=alias_problem
    )
    accuracy_threshold: float = setting(
        0.8,
        "MLOPS_ACCURACY_THRESHOLD",
        "Minimum accuracy on the held-out set for a version to be promoted.",
        title="Accuracy threshold",
        per_run=True,
        minimum=0,
        maximum=1,
    )
    model_family: str = setting(
        "logistic_regression",
        "MLOPS_MODEL_FAMILY",
        "The scikit-learn estimator at the end of the pipeline.",
        title="Model family",
        per_run=True,
        required=True,
        choices=MODEL_FAMILIES,
    )
    hyperparameters: dict[str, Any] = setting(
        {},
        "MLOPS_HYPERPARAMETERS",
        'Estimator arguments as JSON, e.g. {"C": 0.5} or {"n_estimators": 200, "max_depth": 6}. '
        "Unset ones keep the family's defaults.",
        title="Hyper-parameters",
        per_run=True,
        logged=False,
    )
    candidates: list[dict[str, Any]] = setting(
        [],
        "MLOPS_CANDIDATES",
        "Several candidates to train in parallel and choose from, as a JSON list, e.g. "
        '[{"model_family": "random_forest", "hyperparameters": {"max_depth": 6}}, {"hyperparameters": {"C": 0.5}}]; '
        "an entry without model_family takes the run's model family. Empty: one candidate, the model family with "
        f"its hyper-parameters. At most {MAX_CANDIDATES}.",
        title="Candidates",
        per_run=True,
        logged=False,
        maximum=MAX_CANDIDATES,
        check=candidates_problem,
    )
    selection_metric: str = setting(
        "accuracy",
        "MLOPS_SELECTION_METRIC",
        "What chooses among several candidates, scored on a selection split carved from the training rows.",
        title="Selection metric",
        per_run=True,
        required=True,
        choices=SELECTION_METRICS,
    )
    data_source: str = setting(
        DEFAULT_DATA_SOURCE,
        "MLOPS_DATA_SOURCE",
        "sklearn:breast_cancer (bundled), a .csv or .parquet path or URL, a folder of them, "
        "or a SQLAlchemy URL together with a SQL query. The deployment's password shows as ***: left so, the run "
        "uses it; a run's own source may not carry one.",
        title="Data source",
        per_run=True,
        required=True,
        run_pattern=NO_PASSWORD_BUT_THE_MASK,
        check=data_source_problem,
    )
    data_query: str = setting(
        "",
        "MLOPS_DATA_QUERY",
        "Only for a SQL data source: a SELECT statement or a table name.",
        title="SQL query or table",
        per_run=True,
        logged=False,
    )
    label_column: str = setting(
        "target",
        "MLOPS_LABEL_COLUMN",
        "The column the model predicts.",
        title="Label column",
        per_run=True,
        required=True,
    )
    compare_with_champion: bool = setting(
        True,
        "MLOPS_COMPARE_WITH_CHAMPION",
        "Also require the candidate to be no worse than the current Production version.",
        title="Compare with Production",
        per_run=True,
    )
    champion_tolerance: float = setting(
        0.01,
        "MLOPS_CHAMPION_TOLERANCE",
        "How much lower than Production's accuracy the candidate's may be and still pass.",
        title="Tolerance against Production",
        per_run=True,
        minimum=0,
        maximum=1,
    )
    test_size: float = setting(
        0.2,
        "MLOPS_TEST_SIZE",
        "Share of rows kept out of training for validation (stratified).",
        title="Held-out fraction",
        per_run=True,
        exclusive_minimum=0,
        exclusive_maximum=1,
    )
    random_seed: int = setting(
        42,
        "MLOPS_RANDOM_SEED",
        "Seeds the split and the estimator; recorded on the run and the version.",
        title="Random seed",
        per_run=True,
        minimum=0,
        maximum=2**32 - 1,
    )
    force_retrain: bool = setting(
        False,
        "MLOPS_FORCE_RETRAIN",
        "Train, validate and possibly promote even when the data is the data the Production version was trained "
        "on (same digest); otherwise such a run ends early with 'no new data'.",
        title="Retrain on unchanged data",
        per_run=True,
    )
    drift_threshold: float = setting(
        0.2,
        "MLOPS_DRIFT_THRESHOLD",
        "Largest per-feature population stability index, against the Production version's data, above which drift "
        "counts as high (0.1: moderate, 0.2: significant).",
        title="Drift threshold (PSI)",
        per_run=True,
        minimum=0,
    )
    drift_margin: float = setting(
        0.0,
        "MLOPS_DRIFT_MARGIN",
        "Under high drift the candidate must beat Production's accuracy by at least this much, instead of being "
        "within the tolerance.",
        title="Margin over Production under high drift",
        per_run=True,
        minimum=0,
        maximum=1,
    )
    min_rows: int = setting(50, "MLOPS_MIN_ROWS", "Fewest rows a data set may have.", minimum=2)
    min_rows_per_class: int = setting(
        5, "MLOPS_MIN_ROWS_PER_CLASS", "Fewest rows per class for a stratified split.", minimum=1
    )
    post_deploy_check: bool = setting(
        True, "MLOPS_POST_DEPLOY_CHECK", "Check that the promoted version serves as validated."
    )
    enforce_production_schema: bool = setting(
        True, "MLOPS_ENFORCE_PRODUCTION_SCHEMA", "Refuse data whose columns differ from the Production model's."
    )
    deploy_check_hook: str = setting(
        "", "MLOPS_DEPLOY_CHECK_HOOK", "module:function called with the deployed model; raising fails the check."
    )
    step_hook: str = setting("", "MLOPS_STEP_HOOK", "module:function called at the start of every step.")
    serving_url: str = setting("", "MLOPS_SERVING_URL", "Model server that deploy_model checks follows Production.")
    serving_timeout: float = setting(
        60.0,
        "MLOPS_SERVING_TIMEOUT_SECONDS",
        "How long the model server may take to follow a promotion.",
        exclusive_minimum=0,
    )
    serving_token: str = setting(
        "",
        "MLOPS_SERVING_TOKEN",
        "Bearer token of the model server: it requires it, and deploy_model's check sends it.",
        secret=True,
        logged=False,
    )
    serving_webhook_url: str = setting(
        "",
        "MLOPS_SERVING_WEBHOOK_URL",
        "Where the MLflow server reaches the model server's /webhooks/mlflow: set (with a tracking server and the "
        "secret), the model server subscribes to the registry's alias events and follows a move at once; polling "
        "stays as the fallback.",
    )
    serving_webhook_secret: str = setting(
        "",
        "MLOPS_SERVING_WEBHOOK_SECRET",
        "The secret MLflow signs its webhook deliveries to the model server with.",
        secret=True,
        logged=False,
    )
    recording: bool = setting(
        True,
        "MLOPS_RECORDING",
        "The model server records the requests it answers (features, prediction, version, time, request id) as "
        "Parquet in the data store, off the request path, and takes their true labels on POST /feedback.",
    )
    recording_sample_rate: float = setting(
        1.0,
        "MLOPS_RECORDING_SAMPLE_RATE",
        "Share of answered requests the model server records, drawn at random per request.",
        minimum=0,
        maximum=1,
    )
    recording_features: bool = setting(
        True,
        "MLOPS_RECORDING_FEATURES",
        "Record each request's input features; off, a record keeps the request id, time, version and prediction.",
    )
    recording_queue_size: int = setting(
        10000,
        "MLOPS_RECORDING_QUEUE_SIZE",
        "Most answered requests waiting to be written; past it a request's records are dropped and counted.",
        minimum=1,
    )
    recording_batch_size: int = setting(
        1000,
        "MLOPS_RECORDING_BATCH_SIZE",
        "Waiting requests that start a write before the flush interval is up.",
        minimum=1,
    )
    recording_flush_seconds: float = setting(
        5.0,
        "MLOPS_RECORDING_FLUSH_SECONDS",
        "Longest a recorded request waits before it is written.",
        exclusive_minimum=0,
    )
    feedback_window_hours: float = setting(
        24.0,
        "MLOPS_FEEDBACK_WINDOW_HOURS",
        "How far back POST /feedback looks in the data store for a request id the server no longer holds in memory "
        "(it holds the latest 100,000); 0: memory only.",
        minimum=0,
    )
    feedback_landing_days: float = setting(
        30.0,
        "MLOPS_FEEDBACK_LANDING_DAYS",
        "How far back `mlops ingest --from-feedback` can land labelled requests; the folder source's manifest forgets "
        "which requests landed once they are older, so that it stays bounded.",
        exclusive_minimum=0,
    )
    airflow_api_url: str = setting(
        "",
        "MLOPS_AIRFLOW_API_URL",
        "Airflow's API server (http://host:8080): set, the model server posts an event of the recorded-traffic asset "
        "for each completed monitoring window, and `mlops ingest` one of the data asset for each landed batch; unset, "
        "neither does.",
    )
    airflow_api_username: str = setting(
        "",
        "MLOPS_AIRFLOW_API_USERNAME",
        "The Airflow user those events are posted as (a token is asked of the API server's /auth/token).",
        logged=False,
    )
    airflow_api_password: str = setting(
        "",
        "MLOPS_AIRFLOW_API_PASSWORD",
        "That user's password.",
        secret=True,
        logged=False,
    )
    monitor_schedule: str = setting(
        "@hourly",
        "MLOPS_MONITOR_SCHEDULE",
        "When mlops_monitor looks at the recorded traffic, as a cron expression or preset (UTC); it also runs on "
        "each event of the recorded-traffic asset.",
        required=True,
        check=cron_problem,
    )
    monitor_window_minutes: int = setting(
        60,
        "MLOPS_MONITOR_WINDOW_MINUTES",
        "Length of the window of recorded traffic mlops_monitor judges: the window, aligned on this length since "
        "midnight UTC, that holds the moment just before the run.",
        minimum=1,
        maximum=1440,
    )
    monitor_drift_share: float = setting(
        0.3,
        "MLOPS_MONITOR_DRIFT_SHARE",
        "Share of the features whose population stability index against the Production version's training data "
        "is above the drift threshold (MLOPS_DRIFT_THRESHOLD) beyond which mlops_monitor starts a retraining.",
        minimum=0,
        maximum=1,
    )
    monitor_accuracy_drop: float = setting(
        0.05,
        "MLOPS_MONITOR_ACCURACY_DROP",
        "How far live accuracy, on the window's labelled requests, may fall below the Production version's "
        "validation accuracy before mlops_monitor starts a retraining.",
        minimum=0,
        maximum=1,
    )
    monitor_min_requests: int = setting(
        100,
        "MLOPS_MONITOR_MIN_REQUESTS",
        "Fewest requests the Production version must have answered in a window for mlops_monitor to judge it; "
        "below, the window is left alone.",
        minimum=1,
    )
    monitor_min_labelled: int = setting(
        30,
        "MLOPS_MONITOR_MIN_LABELLED",
        "Fewest labelled requests in a window for mlops_monitor to judge live accuracy.",
        minimum=1,
    )
    monitor_experiment: str = setting(
        "mlops_monitor",
        "MLOPS_MONITOR_EXPERIMENT",
        "MLflow experiment of mlops_monitor's runs, one per window.",
        required=True,
    )
    mlflow_ui_url: str = setting(
        "",
        "MLOPS_MLFLOW_UI_URL",
        "Base URL of the MLflow UI, for the links on Airflow runs; default: the tracking server when it is one, "
        "else http://localhost:5000 (make mlflow-ui).",
        logged=False,
    )
    data_asset_uri: str = setting(
        "", "MLOPS_DATA_ASSET_URI", "URI of the training-data asset, when not derived from the data source."
    )
    task_timeout: float = setting(
        3600.0,
        "MLOPS_TASK_TIMEOUT_SECONDS",
        "Longest a task may run before Airflow stops it (execution_timeout).",
        exclusive_minimum=0,
    )
    retry_delay: float = setting(
        300.0, "MLOPS_RETRY_DELAY_SECONDS", "Wait before a failed task is retried once.", minimum=0
    )
    approval_required: bool = setting(
        False,
        "MLOPS_APPROVAL_REQUIRED",
        "A validated candidate waits for a person to approve it in the Airflow UI (Required actions) before "
        "deploy_model promotes it; rejected or unanswered, Production stays as it is.",
    )
    approval_timeout: float = setting(
        86400.0,
        "MLOPS_APPROVAL_TIMEOUT_SECONDS",
        "How long a candidate waits for approval; no answer by then counts as a rejection.",
        exclusive_minimum=0,
    )
    notify_email_to: str = setting(
        "", "MLOPS_NOTIFY_EMAIL_TO", "Comma-separated addresses the service's notices are e-mailed to; none: no e-mail."
    )
    notify_email_events: str = notice_routing("MLOPS_NOTIFY_EMAIL_EVENTS", "are e-mailed")
    notify_smtp_conn_id: str = setting(
        "smtp_default",
        "MLOPS_NOTIFY_SMTP_CONN_ID",
        "Airflow connection of the SMTP server (host, port, login, password; extras from_email, disable_ssl and "
        "disable_tls as Airflow's SMTP provider reads them).",
    )
    notify_webhook_conn_id: str = setting(
        "",
        "MLOPS_NOTIFY_WEBHOOK_CONN_ID",
        "Airflow connection whose URL receives the notices as a JSON POST with a markdown 'text', as chat tools' "
        "incoming webhooks accept; none: no webhook.",
    )
    notify_webhook_events: str = notice_routing("MLOPS_NOTIFY_WEBHOOK_EVENTS", "go to the webhook")
    notify_timeout: float = setting(
        5.0,
        "MLOPS_NOTIFY_TIMEOUT_SECONDS",
        "Longest a notice may take to send; a channel that fails or does not answer in time is logged and skipped.",
        exclusive_minimum=0,
    )

    @classmethod
    def from_env(cls, environ: Environ | None = None) -> Settings:
        """The settings the environment names, embedded defaults for the rest; any invalid value is refused."""
        environ = os.environ if environ is None else environ
        home = _home(environ)
        values: dict[str, Any] = {"home": home}
        problems = []
        for spec in declarations().values():
            if spec.name == "home":
                continue
            try:
                values[spec.name] = spec.from_environ(environ, home)
            except ConfigurationError as error:
                problems.append(str(error))
        if problems:
            raise ConfigurationError("invalid settings: " + "; ".join(problems))
        return cls(**values)

    def __post_init__(self) -> None:
        self.validate()

    def __repr__(self) -> str:
        values = ((item.name, getattr(self, item.name)) for item in fields(self) if item.repr)
        shown = ", ".join(
            f"{name}={mask_credentials(value) if isinstance(value, str) else value!r}" for name, value in values
        )
        return mask_credentials(f"{type(self).__name__}({shown})")

    def validate(self) -> None:
        """Refuse values no declaration allows (a constructor or :func:`dataclasses.replace` skips the readers)."""
        problems = [problem for spec in declarations().values() if (problem := spec.problem(getattr(self, spec.name)))]
        if problems:
            raise ConfigurationError("invalid settings: " + "; ".join(problems))

    @property
    def mlflow_ui(self) -> str:
        """Where a person opens MLflow: the configured UI, else the tracking server, else ``make mlflow-ui``'s."""
        if self.mlflow_ui_url:
            return self.mlflow_ui_url.rstrip("/")
        if url_scheme(self.tracking_uri) in {"http", "https"}:
            parts = urllib.parse.urlsplit(self.tracking_uri)
            # Never a password in a link: keep the host and port only.
            return urllib.parse.urlunsplit(
                (
                    parts.scheme,
                    (parts.hostname or "") + (f":{parts.port}" if parts.port else ""),
                    parts.path.rstrip("/"),
                    "",
                    "",
                )
            )
        return "http://localhost:5000"

    @classmethod
    def from_env_or_embedded(cls) -> Settings:
        """Each setting from the environment or, where the environment's value is invalid, its embedded default.

        Never raises, so a bad setting cannot break DAG parsing; the first task reads the environment again with
        :meth:`from_env` and fails with the error.
        """
        try:
            home = _home(os.environ)
        except ConfigurationError:
            home = _home({})
        values: dict[str, Any] = {"home": home}
        for spec in declarations().values():
            if spec.name != "home":
                try:
                    values[spec.name] = spec.from_environ(os.environ, home)
                except ConfigurationError:
                    values[spec.name] = spec.embedded(home)
        return cls(**values)

    def for_run(self, params: Mapping[str, Any] | None, declared: Collection[str] = ()) -> Settings:
        """These settings with a run's parameters applied.

        ``declared`` are the Params the DAG declares (default: the per-run settings). A declared Param that is a
        per-run setting overrides it (``None`` keeps the deployment's value); a declared Param that is no setting is
        the DAG's own business. Any other name is refused: an operator setting (a check, hook, store or name) cannot
        be switched per run, and a misspelt parameter must not run with the default.
        """
        run_names = run_parameter_names()
        accepted = set(declared) or set(run_names)
        unknown = sorted(set(params or {}) - accepted)
        if unknown:
            raise ConfigurationError("; ".join(_refusal(name, accepted) for name in unknown))
        values = {key: value for key, value in (params or {}).items() if key in run_names}
        source = values.get("data_source")
        if isinstance(source, str) and source != self.data_source:
            if source == self.shown_data_source():
                values["data_source"] = None
            elif has_password(source):
                raise ConfigurationError(
                    f"invalid parameters: data_source {mask_credentials(source)!r} carries a password; a run's "
                    "parameters are stored with the run where anyone who reads the run sees them. Set the source "
                    "with its password in the deployment's MLOPS_DATA_SOURCE, or leave the password out of the "
                    "URL and give it to the driver from the workers' environment (PGPASSWORD for PostgreSQL)"
                )
        return self.with_values(values)

    def shown_data_source(self) -> str:
        """The data source as the trigger form shows it: its password masked. Submitted unchanged, it keeps this one."""
        return mask_credentials(self.data_source)

    def with_values(self, values: Mapping[str, Any]) -> Settings:
        """These settings with some fields set (``None`` keeps a value), coerced and checked like the environment's."""
        specs = declarations()
        unknown = sorted(set(values) - set(specs))
        if unknown:
            raise ConfigurationError("; ".join(_refusal(name, specs) for name in unknown))
        changes, problems = {}, []
        for name, value in values.items():
            if value is None:
                continue
            try:
                changes[name] = specs[name].coerce(value, name)
            except ConfigurationError as error:
                problems.append(str(error))
        if problems:
            raise ConfigurationError("invalid parameters: " + "; ".join(problems))
        return replace(self, **changes)

    def run_parameters(self) -> dict[str, Any]:
        """The settings that shape a model, as logged to MLflow (credentials in the data source masked)."""
        logged = {
            name: getattr(self, name)
            for name, spec in declarations().items()
            if spec.declaration.per_run and spec.declaration.logged
        }
        return {**logged, "data_source": self.shown_data_source()}

    def param_specs(self) -> dict[str, dict[str, Any]]:
        """The DAG's trigger form: one ``Param(**spec)`` per per-run setting, defaulting to these settings' values."""
        shown = {name: getattr(self, name) for name in run_parameter_names()}
        shown["data_source"] = self.shown_data_source()
        return {name: declarations()[name].param_spec(shown[name]) for name in run_parameter_names()}


@dataclass(frozen=True, eq=False)
class SettingSpec:
    """A settings field with its declaration and Python type: reads, coerces and checks one value."""

    name: str
    kind: Any
    default: Any
    declaration: Declaration

    @property
    def base_kind(self) -> Any:
        """``str`` for ``str | None``; ``dict`` for ``dict[str, Any]``, ``list`` for ``list[...]``; the type itself
        otherwise."""
        arguments = [a for a in typing.get_args(self.kind) if a is not type(None)]
        if typing.get_origin(self.kind) in (dict, list):
            return typing.get_origin(self.kind)
        return arguments[0] if arguments else self.kind

    def embedded(self, home: Path) -> Any:
        if self.declaration.home_default is not None:
            return self.declaration.home_default(home)
        return type(self.default)(self.default) if isinstance(self.default, (dict, list)) else self.default

    def from_environ(self, environ: Environ, home: Path) -> Any:
        raw = environ.get(self.declaration.env, "").strip()
        if not raw:
            return self.embedded(home)
        return self.coerce(raw, self.declaration.env)

    def coerce(self, value: Any, label: str) -> Any:
        """``value`` (a string from the environment or a form, or a JSON value) as this setting's type, checked."""
        converted = _convert(self.base_kind, value, label)
        problem = self.problem(converted)
        if problem:
            raise ConfigurationError(problem)
        return converted

    def problem(self, value: Any) -> str | None:
        spec, name = self.declaration, self.name
        if spec.required and not value:
            return f"{name} is empty"
        if spec.choices and value not in spec.choices:
            return f"{name} {shown_value(value)} is unknown; choose one of {', '.join(spec.choices)}"
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            low, high = spec.minimum, spec.maximum
            if low is not None and high is not None and not low <= value <= high:
                return f"{name} {shown_value(value)} is outside [{_number(low)}, {_number(high)}]"
            if low is not None and high is None and value < low:
                return f"{name} {shown_value(value)} must be at least {_number(low)}"
            above, below = spec.exclusive_minimum, spec.exclusive_maximum
            if above is not None and below is not None and not above < value < below:
                return f"{name} {shown_value(value)} must be strictly between {_number(above)} and {_number(below)}"
            if above is not None and below is None and not value > above:
                return f"{name} {shown_value(value)} must be greater than {_number(above)}"
        return spec.check(value) if spec.check else None

    def param_spec(self, value: Any) -> dict[str, Any]:
        """Keyword arguments of the ``Param`` for this setting, with ``value`` as its default."""
        spec = self.declaration
        json_type = {bool: "boolean", int: "integer", float: "number", dict: "object", list: "array"}.get(
            self.base_kind, "string"
        )
        schema: dict[str, Any] = {
            "$schema": PARAM_SCHEMA_DIALECT,
            "title": spec.title or self.name,
            "description": spec.description,
        }
        if json_type == "string" and not spec.required:
            # An empty optional text field must not hold the form back: the UI treats "" as missing.
            schema["type"], value = ["null", "string"], value or None
        else:
            schema["type"] = json_type
        if json_type == "string" and spec.required:
            schema["minLength"] = 1
        bounds: tuple[tuple[str, float | None], ...] = (
            ("minimum", spec.minimum),
            ("maximum", spec.maximum),
            ("exclusiveMinimum", spec.exclusive_minimum),
            ("exclusiveMaximum", spec.exclusive_maximum),
        )
        if json_type == "array":
            # A list's bounds are on its length; its items are checked where they are read (the declaration's check).
            schema["items"] = {"type": "object"}
            bounds = (("minItems", spec.minimum), ("maxItems", spec.maximum))
        for key, bound in bounds:
            if bound is not None:
                schema[key] = bound
        if spec.choices:
            schema["enum"] = list(spec.choices)
        if spec.run_pattern:
            schema["pattern"] = spec.run_pattern
        return {"default": value, **schema}


@functools.cache
def declarations() -> dict[str, SettingSpec]:
    """Every setting by field name, in declaration order."""
    hints = typing.get_type_hints(Settings)
    specs = {}
    for item in fields(Settings):
        specs[item.name] = SettingSpec(item.name, hints[item.name], _field_default(item), item.metadata["setting"])
    return specs


@functools.cache
def run_parameter_names() -> tuple[str, ...]:
    """The settings a run may override: the DAG's Params."""
    return tuple(name for name, spec in declarations().items() if spec.declaration.per_run)


def _number(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else str(bound)


def _field_default(item: Field[Any]) -> Any:
    if item.default is not MISSING:
        return item.default
    return item.default_factory()  # type: ignore[operator]


def _home(environ: Environ) -> Path:
    raw = environ.get("MLOPS_HOME", "").strip() or str(Path.cwd() / ".mlops")
    try:
        return Path(raw).expanduser().resolve()
    except (RuntimeError, OSError) as error:
        raise ConfigurationError(f"MLOPS_HOME={raw!r} cannot be used: {error}") from error


def _refusal(name: str, accepted: Collection[str]) -> str:
    specs = declarations()
    if name in specs and name not in accepted:
        return (
            f"{name!r} cannot be set per run: it is the deployment's setting {specs[name].declaration.env}, "
            "set in the environment of the scheduler and workers"
        )
    import difflib  # only a refusal needs it; every DAG file imports this module

    close = difflib.get_close_matches(name, list(accepted), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown parameter {shown_value(name)}{hint}; parameters are: {', '.join(sorted(accepted))}"


TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off"})


def _convert(kind: Any, value: Any, label: str) -> Any:
    if kind is bool:
        return _as_bool(value, label)
    if kind is int:
        return _as_int(value, label)
    if kind is float:
        return _as_float(value, label)
    if kind is dict:
        return _as_mapping(value, label)
    if kind is list:
        return _as_list(value, label)
    if kind is Path:
        return _home({"MLOPS_HOME": str(value)})
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise ConfigurationError(f"{label}={shown_value(value)} is not text")


def _as_bool(value: Any, label: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower() if isinstance(value, str) else None
    if text in TRUE_WORDS:
        return True
    if text in FALSE_WORDS:
        return False
    raise ConfigurationError(f"{label}={shown_value(value)} is not a boolean (use true or false)")


def _as_int(value: Any, label: str) -> int:
    if isinstance(value, bool):
        raise ConfigurationError(f"{label}={shown_value(value)} is not a whole number")
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, int):
        return value
    text = str(value).strip()
    try:
        return int(text)
    except ValueError as error:
        if re.fullmatch(r"[+-]?\d+", text):  # longer than Python turns into a number (4,300 digits)
            raise ConfigurationError(f"{label}={shown_value(text)} is a whole number too long to read") from None
        raise ConfigurationError(f"{label}={shown_value(value)} is not a whole number") from error


def _as_float(value: Any, label: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigurationError(f"{label}={shown_value(value)} is not a number")
    try:
        number = float(value)
    except ValueError as error:
        raise ConfigurationError(f"{label}={shown_value(value)} is not a number") from error
    if not math.isfinite(number):
        raise ConfigurationError(f"{label}={shown_value(value)} is not a finite number")
    return number


def _as_mapping(value: Any, label: str) -> dict[str, Any]:
    if isinstance(value, str):
        value = read_json(value or "{}", label)
    if not isinstance(value, dict):
        raise ConfigurationError(f"{label} must be a JSON object, got {type(value).__name__}")
    # Python's JSON reader takes NaN and Infinity, which no estimator argument should be.
    non_finite = [key for key, item in value.items() if isinstance(item, float) and not math.isfinite(item)]
    if non_finite:
        raise ConfigurationError(f"{label}: {', '.join(non_finite)} must be finite numbers")
    return dict(value)


def _as_list(value: Any, label: str) -> list[Any]:
    if isinstance(value, str):
        value = read_json(value or "[]", label)
    if not isinstance(value, (list, tuple)):
        raise ConfigurationError(f"{label} must be a JSON list, got {type(value).__name__}")
    return list(value)


def read_json(text: str, label: str) -> Any:
    """The JSON value ``text`` holds; ConfigurationError, in one line naming ``label``, for anything Python's JSON
    reader refuses, including what it cannot follow: nesting deeper than the interpreter's recursion limit, a number
    of more digits than Python turns into one."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigurationError(f"{label} is not valid JSON: {error}") from error
    except RecursionError:
        raise ConfigurationError(f"{label} is not readable JSON: it nests arrays or objects too deeply") from None
    except ValueError:
        raise ConfigurationError(f"{label} is not readable JSON: it holds a number too long to read") from None


def shown_value(value: Any) -> str:
    """``repr(value)`` as a refusal shows it: a long one keeps its start and end, and says how long it is."""
    try:
        text = repr(value)
    except ValueError:  # an integer of more digits than Python turns into text
        return f"an integer of {value.bit_length()} bits"
    if len(text) <= LONGEST_ECHOED_VALUE:
        return text
    return f"{text[: LONGEST_ECHOED_VALUE - 20]}...{text[-10:]} ({len(text)} characters)"


def local_store_problem(uri: str) -> str | None:
    """What keeps a command that reads the registry from using a local (SQLite) MLflow store: none there (a mistyped
    home, where MLflow would create an empty one), a file that is no database, or a database without MLflow's tables.
    None for a store that is there, and for a store that is not a local file."""
    if not uri.startswith("sqlite:///"):
        return None
    database = Path(uri.removeprefix("sqlite:///"))
    if not database.is_file():
        return (
            f"no MLflow store at {database} (MLOPS_HOME={os.environ.get('MLOPS_HOME')}): is the home mistyped? "
            "`mlops run` creates the store"
        )
    if "registered_models" not in sqlite_tables(database):
        return f"{database} holds no MLflow store (no registry tables); `mlops run` creates one"
    return None


def sqlite_tables(database: Path) -> set[str]:
    """The tables of an SQLite file, read without writing to it; ConfigurationError for a file that is no database."""
    import contextlib
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(f"{database.resolve().as_uri()}?mode=ro", uri=True)) as connection:
            return {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as error:
        raise ConfigurationError(f"the MLflow store {database} is not an SQLite database: {error}") from error


def param_defaults() -> dict[str, Any]:
    """Defaults for the DAG's trigger form: each setting from the environment, or embedded where that is invalid."""
    return {name: spec["default"] for name, spec in Settings.from_env_or_embedded().param_specs().items()}
