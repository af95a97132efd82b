"""Model families and the scikit-learn pipeline.

Preprocessing (imputation, scaling) lives inside the pipeline, so the logged model takes raw feature columns.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sklearn.ensemble import GradientBoostingClassifier, RandomForestClassifier
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from ml.results import candidate_name
from ml.settings import MODEL_FAMILIES, ConfigurationError

if TYPE_CHECKING:
    from ml.settings import Settings

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


@dataclass(frozen=True)
class Candidate:
    """One model family with its hyper-parameters (resolved: the family's defaults with the run's overrides), as one of
    a run's candidates; ``index`` is its place in the run's list, and its Airflow map index."""

    index: int
    model_family: str
    hyperparameters: dict[str, Any]

    @property
    def name(self) -> str:
        return candidate_name(self.index, self.model_family)

    def to_xcom(self) -> dict[str, Any]:
        return {"index": self.index, "model_family": self.model_family, "hyperparameters": self.hyperparameters}

    @classmethod
    def from_xcom(cls, spec: dict[str, Any]) -> Candidate:
        return cls(int(spec["index"]), str(spec["model_family"]), dict(spec["hyperparameters"]))


def candidates_of(settings: Settings) -> list[Candidate]:
    """The run's candidates, each checked against its estimator; none listed: the one of model_family and
    hyperparameters. A refusal names the entry (``candidates[2] (random_forest): ...``)."""
    if not settings.candidates:
        family = settings.model_family
        return [Candidate(0, family, resolve_hyperparameters(family, settings.hyperparameters))]
    candidates = []
    for index, spec in enumerate(settings.candidates):
        family = str(spec.get("model_family") or settings.model_family)
        try:
            candidates.append(
                Candidate(index, family, resolve_hyperparameters(family, spec.get("hyperparameters", {})))
            )
        except ConfigurationError as error:
            raise ConfigurationError(f"candidates[{index}] ({family}): {error}") from error
    return candidates


def selection_split(train_frame: Any, label: str, share: float, seed: int) -> tuple[Any, Any]:
    """The training rows split into the rows candidates are fitted on and the rows they are ranked on: seeded, so
    every candidate, on whichever worker, carves the same rows. Stratified where each class has the rows for it."""
    from sklearn.model_selection import train_test_split

    try:
        fit_rows, selection_rows = train_test_split(
            train_frame, test_size=share, random_state=seed, stratify=train_frame[label]
        )
    except ValueError:
        # A class with a single training row cannot be on both sides; the ranking then does without it.
        fit_rows, selection_rows = train_test_split(train_frame, test_size=share, random_state=seed)
    return fit_rows, selection_rows
