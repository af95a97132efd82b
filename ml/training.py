"""Model families and the scikit-learn pipeline.

Preprocessing (imputation, scaling) lives inside the pipeline, so the logged model takes raw feature columns.
"""

from __future__ import annotations

import inspect
from typing import Any

from sklearn.ensemble import GradientBoostingClassifier, RandomForestClassifier
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from ml.settings import MODEL_FAMILIES, ConfigurationError

FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "logistic_regression": {"C": 1.0, "max_iter": 1000},
    "random_forest": {"n_estimators": 100, "max_depth": None, "n_jobs": 1},
    "gradient_boosting": {"n_estimators": 100, "learning_rate": 0.1, "max_depth": 3},
}

_ESTIMATORS = {
    "logistic_regression": LogisticRegression,
    "random_forest": RandomForestClassifier,
    "gradient_boosting": GradientBoostingClassifier,
}


def resolve_hyperparameters(family: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The family's defaults with the user's overrides, checked against the estimator's own parameter constraints.

    An unknown name or a value the estimator refuses (``{"C": -1}``) is a configuration error, found before any data
    is read: scikit-learn would otherwise only refuse it in ``fit``, after the data was loaded and split.
    """
    if family not in MODEL_FAMILIES:
        raise ConfigurationError(f"model_family {family!r} is unknown; choose one of {', '.join(MODEL_FAMILIES)}")
    accepted = set(inspect.signature(_ESTIMATORS[family]).parameters) - {"random_state"}
    unknown = sorted(set(overrides) - accepted)
    if unknown:
        raise ConfigurationError(
            f"hyperparameters {', '.join(unknown)} are not accepted by {family}; "
            f"accepted: {', '.join(sorted(accepted))}"
        )
    resolved = {**FAMILY_DEFAULTS[family], **overrides}
    try:
        _ESTIMATORS[family](**resolved)._validate_params()
    except (ValueError, TypeError) as error:
        raise ConfigurationError(f"hyperparameters for {family}: {error}") from error
    return resolved


def build_pipeline(family: str, hyperparameters: dict[str, Any], seed: int) -> Pipeline:
    params = resolve_hyperparameters(family, hyperparameters)
    estimator = _ESTIMATORS[family](random_state=seed, **params)
    steps: list[tuple[str, Any]] = [("impute", SimpleImputer(strategy="median"))]
    if family == "logistic_regression":
        steps.append(("scale", StandardScaler()))
    steps.append(("model", estimator))
    return Pipeline(steps)
