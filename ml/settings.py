"""One typed settings object, read from the environment.

Every field has an embedded default, so a fresh clone runs with no environment at all: Airflow and MLflow keep their
state in SQLite files and local folders under ``MLOPS_HOME`` (``./.mlops`` by default). Per-run overrides come from the
DAG's Params and are applied with :meth:`Settings.with_overrides`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ml.redaction import mask_credentials

MODEL_FAMILIES = ("logistic_regression", "random_forest", "gradient_boosting")
DEFAULT_DATA_SOURCE = "sklearn:breast_cancer"
SQL_SCHEMES = ("sqlite", "postgresql", "postgres", "mysql", "mariadb", "mssql", "oracle", "duckdb")
TRACKING_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "file", "http", "https", "databricks")


class ConfigurationError(ValueError):
    """A setting or a run parameter has a value the pipeline cannot use."""


Environ = Mapping[str, str]


def url_scheme(uri: str) -> str:
    """The scheme of a URL, without a SQLAlchemy driver (``postgresql+psycopg://`` -> ``postgresql``); "" for a path."""
    return uri.split("://", 1)[0].split("+", 1)[0].lower() if "://" in uri else ""


def _env(environ: Environ, name: str, default: str) -> str:
    value = environ.get(name, "").strip()
    return value or default


def _env_float(environ: Environ, name: str, default: float) -> float:
    raw = _env(environ, name, str(default))
    try:
        return float(raw)
    except ValueError as error:
        raise ConfigurationError(f"{name}={raw!r} is not a number") from error


def _env_int(environ: Environ, name: str, default: int) -> int:
    raw = _env(environ, name, str(default))
    try:
        return int(raw)
    except ValueError as error:
        raise ConfigurationError(f"{name}={raw!r} is not a whole number") from error


def _env_bool(environ: Environ, name: str, default: bool) -> bool:
    raw = _env(environ, name, "true" if default else "false").lower()
    if raw in {"1", "true", "yes", "on"}:
        return True
    if raw in {"0", "false", "no", "off"}:
        return False
    raise ConfigurationError(f"{name}={raw!r} is not a boolean (use true or false)")


def _env_json(environ: Environ, name: str, default: dict[str, Any]) -> dict[str, Any]:
    raw = environ.get(name, "").strip()
    if not raw:
        return dict(default)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as error:
        raise ConfigurationError(f"{name} is not valid JSON: {error}") from error
    if not isinstance(value, dict):
        raise ConfigurationError(f"{name} must be a JSON object, got {type(value).__name__}")
    return value


def default_home(environ: Environ) -> Path:
    return Path(_env(environ, "MLOPS_HOME", str(Path.cwd() / ".mlops"))).expanduser().resolve()


@dataclass(frozen=True)
class Settings:
    home: Path
    tracking_uri: str
    registry_uri: str | None
    artifact_root: str
    data_store: str
    experiment_name: str
    model_name: str
    production_alias: str
    data_source: str
    data_query: str
    label_column: str
    accuracy_threshold: float
    champion_tolerance: float
    compare_with_champion: bool
    model_family: str
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    test_size: float = 0.2
    random_seed: int = 42
    min_rows: int = 50
    min_rows_per_class: int = 5
    post_deploy_check: bool = True
    enforce_production_schema: bool = True
    deploy_check_hook: str = ""
    step_hook: str = ""
    serving_url: str = ""
    serving_timeout: float = 60.0
    force_retrain: bool = False
    drift_threshold: float = 0.2
    drift_margin: float = 0.0
    data_asset_uri: str = ""

    @classmethod
    def from_env(cls, environ: Environ | None = None) -> Settings:
        environ = os.environ if environ is None else environ
        home = default_home(environ)
        settings = cls(
            home=home,
            tracking_uri=_env(environ, "MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow.db'}"),
            registry_uri=environ.get("MLFLOW_REGISTRY_URI") or None,
            artifact_root=_env(environ, "MLOPS_ARTIFACT_ROOT", str(home / "mlartifacts")),
            data_store=_env(environ, "MLOPS_DATA_STORE", str(home / "datastore")),
            experiment_name=_env(environ, "MLOPS_EXPERIMENT", "mlops_pipeline"),
            model_name=_env(environ, "MLOPS_MODEL_NAME", "breast_cancer_classifier"),
            production_alias=_env(environ, "MLOPS_PRODUCTION_ALIAS", "production"),
            data_source=_env(environ, "MLOPS_DATA_SOURCE", DEFAULT_DATA_SOURCE),
            data_query=_env(environ, "MLOPS_DATA_QUERY", ""),
            label_column=_env(environ, "MLOPS_LABEL_COLUMN", "target"),
            accuracy_threshold=_env_float(environ, "MLOPS_ACCURACY_THRESHOLD", 0.8),
            champion_tolerance=_env_float(environ, "MLOPS_CHAMPION_TOLERANCE", 0.01),
            compare_with_champion=_env_bool(environ, "MLOPS_COMPARE_WITH_CHAMPION", True),
            model_family=_env(environ, "MLOPS_MODEL_FAMILY", "logistic_regression"),
            hyperparameters=_env_json(environ, "MLOPS_HYPERPARAMETERS", {}),
            test_size=_env_float(environ, "MLOPS_TEST_SIZE", 0.2),
            random_seed=_env_int(environ, "MLOPS_RANDOM_SEED", 42),
            min_rows=_env_int(environ, "MLOPS_MIN_ROWS", 50),
            min_rows_per_class=_env_int(environ, "MLOPS_MIN_ROWS_PER_CLASS", 5),
            post_deploy_check=_env_bool(environ, "MLOPS_POST_DEPLOY_CHECK", True),
            enforce_production_schema=_env_bool(environ, "MLOPS_ENFORCE_PRODUCTION_SCHEMA", True),
            deploy_check_hook=_env(environ, "MLOPS_DEPLOY_CHECK_HOOK", ""),
            serving_url=_env(environ, "MLOPS_SERVING_URL", ""),
            serving_timeout=_env_float(environ, "MLOPS_SERVING_TIMEOUT_SECONDS", 60.0),
            step_hook=_env(environ, "MLOPS_STEP_HOOK", ""),
            force_retrain=_env_bool(environ, "MLOPS_FORCE_RETRAIN", False),
            drift_threshold=_env_float(environ, "MLOPS_DRIFT_THRESHOLD", 0.2),
            drift_margin=_env_float(environ, "MLOPS_DRIFT_MARGIN", 0.0),
            data_asset_uri=_env(environ, "MLOPS_DATA_ASSET_URI", ""),
        )
        settings.validate()
        return settings

    @classmethod
    def from_env_or_embedded(cls, keep: tuple[str, ...] = ()) -> Settings:
        """The environment's settings or, if those are invalid, the embedded ones (with the ``keep`` variables).

        Never raises, so a bad setting cannot break DAG parsing; the first task reads the environment again and
        fails with the error.
        """
        try:
            return cls.from_env()
        except ConfigurationError:
            return cls.from_env({key: value for key, value in os.environ.items() if key in keep})

    def with_overrides(self, overrides: Mapping[str, Any] | None) -> Settings:
        """Apply per-run overrides (the DAG's Params); unknown keys and ``None`` values are ignored."""
        if not overrides:
            return self
        known = {f.name for f in fields(self)}
        changes = {key: value for key, value in overrides.items() if key in known and value is not None}
        if isinstance(changes.get("hyperparameters"), str):
            try:
                changes["hyperparameters"] = json.loads(changes["hyperparameters"] or "{}")
            except json.JSONDecodeError as error:
                raise ConfigurationError(f"hyperparameters is not valid JSON: {error}") from error
        for name in ("accuracy_threshold", "champion_tolerance", "test_size", "drift_threshold", "drift_margin"):
            if name in changes:
                changes[name] = _as_float(name, changes[name])
        for name in ("random_seed", "min_rows", "min_rows_per_class"):
            if name in changes:
                changes[name] = _as_int(name, changes[name])
        if "force_retrain" in changes:
            changes["force_retrain"] = _as_bool("force_retrain", changes["force_retrain"])
        updated = replace(self, **changes)
        updated.validate()
        return updated

    def validate(self) -> None:
        problems = []
        if self.model_family not in MODEL_FAMILIES:
            problems.append(f"model_family {self.model_family!r} is unknown; choose one of {', '.join(MODEL_FAMILIES)}")
        if not 0.0 <= self.accuracy_threshold <= 1.0:
            problems.append(f"accuracy_threshold {self.accuracy_threshold} is outside [0, 1]")
        if not 0.0 <= self.champion_tolerance <= 1.0:
            problems.append(f"champion_tolerance {self.champion_tolerance} is outside [0, 1]")
        if not 0.0 < self.test_size < 1.0:
            problems.append(f"test_size {self.test_size} must be strictly between 0 and 1")
        if not isinstance(self.hyperparameters, dict):
            problems.append("hyperparameters must be a mapping of parameter name to value")
        if self.drift_threshold < 0:
            problems.append(f"drift_threshold {self.drift_threshold} must not be negative")
        if not 0.0 <= self.drift_margin <= 1.0:
            problems.append(f"drift_margin {self.drift_margin} is outside [0, 1]")
        if self.min_rows < 2:
            problems.append(f"min_rows {self.min_rows} must be at least 2")
        if not self.label_column:
            problems.append("label_column is empty")
        if not self.model_name:
            problems.append("model_name is empty")
        scheme = url_scheme(self.tracking_uri) or "file"
        if scheme not in TRACKING_SCHEMES:
            problems.append(
                f"tracking URI {self.tracking_uri!r} has an unsupported scheme {scheme!r}; "
                f"use one of {', '.join(TRACKING_SCHEMES)}"
            )
        if problems:
            raise ConfigurationError("invalid settings: " + "; ".join(problems))

    def run_parameters(self) -> dict[str, Any]:
        """The settings that shape a model, as logged to MLflow."""
        return {
            "model_family": self.model_family,
            "accuracy_threshold": self.accuracy_threshold,
            "champion_tolerance": self.champion_tolerance,
            "compare_with_champion": self.compare_with_champion,
            "test_size": self.test_size,
            "random_seed": self.random_seed,
            "data_source": mask_credentials(self.data_source),
            "label_column": self.label_column,
            "force_retrain": self.force_retrain,
            "drift_threshold": self.drift_threshold,
            "drift_margin": self.drift_margin,
        }


def _as_float(name: str, value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError) as error:
        raise ConfigurationError(f"{name}={value!r} is not a number") from error


def _as_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"1", "true", "yes", "on"}:
        return True
    if text in {"0", "false", "no", "off", ""}:
        return False
    raise ConfigurationError(f"{name}={value!r} is not a boolean (use true or false)")


def _as_int(name: str, value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError) as error:
        raise ConfigurationError(f"{name}={value!r} is not a whole number") from error


def param_defaults() -> dict[str, Any]:
    """Defaults for the DAG's trigger form: the environment's settings, or the embedded ones if those are invalid."""
    settings = Settings.from_env_or_embedded()
    return {
        "accuracy_threshold": settings.accuracy_threshold,
        "model_family": settings.model_family,
        "hyperparameters": settings.hyperparameters,
        "data_source": settings.data_source,
        "data_query": settings.data_query,
        "label_column": settings.label_column,
        "compare_with_champion": settings.compare_with_champion,
        "champion_tolerance": settings.champion_tolerance,
        "test_size": settings.test_size,
        "random_seed": settings.random_seed,
        "force_retrain": settings.force_retrain,
        "drift_threshold": settings.drift_threshold,
        "drift_margin": settings.drift_margin,
    }
