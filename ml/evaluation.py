"""Scoring a model on held-out data, the comparison with the champion, and evaluation plots."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from sklearn import metrics

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# The training-set metrics are there to show over-fitting; a seeded sample of this many rows shows it as well as every
# row would (accuracy within about 0.003 at 95 %), and predicting 800,000 rows would not be free.
TRAIN_SCORE_ROWS = 100_000


@dataclass(frozen=True)
class Verdict:
    passed: bool
    reasons: list[str]


def training_score_sample(train_frame: pd.DataFrame, seed: int, rows: int = TRAIN_SCORE_ROWS) -> pd.DataFrame:
    """The training rows the training-set metrics are computed on: every row up to ``rows``, else a seeded sample."""
    return train_frame if len(train_frame) <= rows else train_frame.sample(n=rows, random_state=seed)


def score(predictions: Any, truth: pd.Series) -> dict[str, float]:
    predicted = np.asarray(predictions).astype(str)
    expected = truth.astype(str).to_numpy()
    average = "binary" if len(set(expected)) == 2 else "macro"
    positive = sorted(set(expected))[-1]
    extra = {"pos_label": positive} if average == "binary" else {}
    return {
        "accuracy": float(metrics.accuracy_score(expected, predicted)),
        "f1": float(metrics.f1_score(expected, predicted, average=average, zero_division=0, **extra)),
        "precision": float(metrics.precision_score(expected, predicted, average=average, zero_division=0, **extra)),
        "recall": float(metrics.recall_score(expected, predicted, average=average, zero_division=0, **extra)),
    }


def judge(
    accuracy: float,
    *,
    threshold: float,
    champion_accuracy: float | None,
    champion_version: int | None,
    tolerance: float,
    compare_with_champion: bool,
    drift: float | None = None,
    drift_threshold: float | None = None,
    drift_margin: float = 0.0,
) -> Verdict:
    """Pass when accuracy reaches the threshold and, if enabled, is no worse than the champion beyond tolerance.

    Under high drift (``drift``, the largest PSI, above ``drift_threshold``) the comparison with the champion is
    stricter: the candidate must beat it by at least ``drift_margin`` instead of being within ``tolerance``. Without a
    drift threshold, or a drift figure, the rule is not applied.
    """
    reasons = []
    if accuracy < threshold:
        reasons.append(f"accuracy {accuracy:.4f} is below the threshold {threshold:.4f}")
    high_drift = drift is not None and drift_threshold is not None and drift > drift_threshold
    if compare_with_champion and champion_accuracy is not None:
        if high_drift and accuracy < champion_accuracy + drift_margin:
            reasons.append(
                f"under high drift (PSI {drift:.3f} > {drift_threshold:.3f}) accuracy {accuracy:.4f} must beat "
                f"Production version {champion_version} ({champion_accuracy:.4f}) by at least {drift_margin:.4f}"
            )
        elif not high_drift and accuracy < champion_accuracy - tolerance:
            reasons.append(
                f"accuracy {accuracy:.4f} is worse than Production version {champion_version} "
                f"({champion_accuracy:.4f}) by more than the tolerance {tolerance:.4f}"
            )
    return Verdict(passed=not reasons, reasons=reasons)


def confusion_matrix_figure(
    predictions: Any, truth: pd.Series, title: str, class_names: Mapping[str, str] | None = None
) -> Figure:
    """The held-out confusion matrix; axes show ``class_names`` (label value -> name) where the data set has them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sorted(set(truth.astype(str)) | set(np.asarray(predictions).astype(str)))
    matrix = metrics.confusion_matrix(truth.astype(str), np.asarray(predictions).astype(str), labels=labels)
    names = [f"{class_names[label]} ({label})" if class_names and label in class_names else label for label in labels]
    figure, axes = plt.subplots(figsize=(4.5, 4))
    metrics.ConfusionMatrixDisplay(matrix, display_labels=names).plot(ax=axes, colorbar=False)
    axes.set_title(title)
    figure.tight_layout()
    return figure
