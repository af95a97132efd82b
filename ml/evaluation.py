"""Scoring a model on held-out data, the comparison with the champion, and evaluation plots."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from sklearn import metrics

from ml import data

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


@dataclass(frozen=True)
class Classes:
    """Labels and predictions as codes into one sorted list of class names, a class being a value's text.

    Classes are compared as text, so that a prediction of 1 and a label of "1" are the same class. Only the distinct
    values are turned into text: converting every one of a million labels costs seconds, and scikit-learn's metrics on
    text labels seconds more, where integer codes cost milliseconds.
    """

    expected: np.ndarray
    predicted: np.ndarray
    names: list[str]


def classes_of(predictions: Any, truth: pd.Series) -> Classes:
    """The classes of ``truth`` (as ``truth.astype(str)`` writes them) and ``predictions`` (as numpy does)."""
    true_codes, true_names = _text_codes(truth, lambda values: pd.Series(values, dtype=truth.dtype).astype(str))
    predicted_codes, predicted_names = _text_codes(
        np.asarray(predictions), lambda values: np.asarray(values).astype(str)
    )
    names = sorted(set(true_names) | set(predicted_names))
    position = {name: index for index, name in enumerate(names)}
    return Classes(
        expected=np.array([position[name] for name in true_names], dtype=np.intp)[true_codes],
        predicted=np.array([position[name] for name in predicted_names], dtype=np.intp)[predicted_codes],
        names=names,
    )


def _text_codes(values: Any, as_text: Callable[[Any], Any]) -> tuple[np.ndarray, list[str]]:
    """Each value's code into the texts of the distinct values, ``as_text`` being how the whole column would be made
    text (pandas and numpy write some values differently)."""
    codes, distinct = pd.factorize(values, use_na_sentinel=False)
    return codes, [str(text) for text in as_text(distinct)]


def score(predictions: Any, truth: pd.Series) -> dict[str, float]:
    classes = classes_of(predictions, truth)
    expected, predicted = classes.expected, classes.predicted
    present = np.unique(expected)
    average = "binary" if len(present) == 2 else "macro"
    # Codes follow the names' sorted order: the last class the labels hold is the positive one.
    extra = {"pos_label": int(present[-1])} if average == "binary" else {}
    return {
        "accuracy": float(metrics.accuracy_score(expected, predicted)),
        "f1": float(metrics.f1_score(expected, predicted, average=average, zero_division=0, **extra)),
        "precision": float(metrics.precision_score(expected, predicted, average=average, zero_division=0, **extra)),
        "recall": float(metrics.recall_score(expected, predicted, average=average, zero_division=0, **extra)),
    }


def ranking_scores(probabilities: np.ndarray, model_classes: Any, truth: pd.Series) -> dict[str, float]:
    """ROC AUC and average precision of a model's class probabilities (columns in ``model_classes``' order).

    Two classes: the last one is the positive class, as in :func:`score`. Several: one against the rest, macro
    averaged. A score that cannot be computed on these rows (a class missing from them) is left out.
    """
    names = [str(name) for name in model_classes]
    expected = truth.astype(str).to_numpy()
    scores = {}
    if len(names) == 2:
        positive = expected == names[1]
        ranked = probabilities[:, 1]
        computations = {
            "roc_auc": lambda: metrics.roc_auc_score(positive, ranked),
            "average_precision": lambda: metrics.average_precision_score(positive, ranked),
        }
    else:
        one_hot = np.column_stack([expected == name for name in names])
        computations = {
            "roc_auc": lambda: metrics.roc_auc_score(one_hot, probabilities, average="macro"),
            "average_precision": lambda: metrics.average_precision_score(one_hot, probabilities, average="macro"),
        }
    for name, compute in computations.items():
        try:
            value = float(compute())
        except ValueError:
            continue
        if np.isfinite(value):
            scores[name] = value
    return scores


def full_scores(model: Any, features: pd.DataFrame, truth: pd.Series) -> tuple[np.ndarray, dict[str, float]]:
    """A fitted scikit-learn model's predictions on ``features`` and every score of them: :func:`score`'s and, where
    the model gives class probabilities, :func:`ranking_scores`'."""
    predictions = np.asarray(model.predict(features))
    scores = score(predictions, truth)
    if hasattr(model, "predict_proba"):
        scores |= ranking_scores(np.asarray(model.predict_proba(features)), model.classes_, truth)
    return predictions, scores


def curve_figures(model: Any, features: pd.DataFrame, truth: pd.Series, title: str) -> dict[str, Figure]:
    """The ROC and precision-recall curves of a fitted model on ``features``, one line per class (one against the
    rest) or, for two classes, one for the positive class; keyed by artifact file name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probabilities = np.asarray(model.predict_proba(features))
    names = [str(name) for name in model.classes_]
    expected = truth.astype(str).to_numpy()
    shown = [1] if len(names) == 2 else range(len(names))
    figures = {}
    for file, display, what in (
        ("evaluation/roc_curve.png", metrics.RocCurveDisplay, "ROC"),
        ("evaluation/precision_recall_curve.png", metrics.PrecisionRecallDisplay, "precision-recall"),
    ):
        figure, axes = plt.subplots(figsize=(4.5, 4))
        for column in shown:
            positive = expected == names[column]
            if positive.all() or not positive.any():
                continue
            display.from_predictions(positive, probabilities[:, column], ax=axes, name=f"class {names[column]}")
        axes.set_title(f"{title}: {what}")
        figure.tight_layout()
        figures[file] = figure
    return figures


@dataclass(frozen=True)
class ComparisonRows:
    """The held-out rows the candidate and Production are compared on, and why those.

    ``used`` is a mask over the held-out rows; ``excluded`` counts the rows left out because Production trained on
    them; ``independent`` says whether the rows are known to hold none it trained on; ``note`` says in one sentence
    which rows these are and why, for the log and the version's record.
    """

    used: np.ndarray
    excluded: int
    independent: bool
    note: str

    @property
    def rows(self) -> int:
        return int(self.used.sum())


def whole_held_out(rows: int, why: str) -> ComparisonRows:
    """The comparison on every held-out row, as before Production's training rows were left out."""
    return ComparisonRows(np.ones(rows, dtype=bool), 0, False, f"the whole held-out set ({rows} rows): {why}")


def held_out_by_both(rows: int, champion_version: int) -> ComparisonRows:
    """The comparison on every held-out row when Production trained on this run's own split: it saw none of them."""
    return ComparisonRows(
        np.ones(rows, dtype=bool),
        0,
        True,
        f"the whole held-out set ({rows} rows): Production version {champion_version} trained on this same split",
    )


def rows_unseen_by_champion(
    held_out: pd.DataFrame,
    trained_on: pd.DataFrame,
    *,
    columns: list[str],
    label: str,
    min_rows_per_class: int,
    champion_version: int,
) -> ComparisonRows:
    """The held-out rows whose values (in ``columns``) are no row of ``trained_on``, Production's training split.

    A growing source makes this needed: the seeded split of the larger data set does not keep the old test rows apart,
    so part of this run's held-out set can be rows Production was fitted on, which flatter it. When the rows left hold
    fewer than ``min_rows_per_class`` of a held-out class (fewer than all of its rows, where the held-out set has
    fewer), they cannot stand for the held-out set, and the comparison falls back to the whole of it: a fallback that
    can only favour Production, so it never lets a worse candidate through on a handful of rows.
    """
    missing = [column for column in columns if column not in trained_on.columns]
    if missing:
        return whole_held_out(
            len(held_out),
            f"the training split of Production version {champion_version} lacks the columns {', '.join(missing)}",
        )
    try:
        # The same value read as int64 from one file and as float64 from another would hash differently.
        reference = trained_on[columns].astype(held_out[columns].dtypes.to_dict())
    except (TypeError, ValueError) as error:
        return whole_held_out(
            len(held_out), f"the training split of Production version {champion_version} cannot be matched ({error})"
        )
    seen = np.isin(data.row_hashes(held_out[columns]), data.row_hashes(reference))
    unseen, excluded = ~seen, int(seen.sum())
    short = _short_classes(held_out[label], unseen, min_rows_per_class)
    if short:
        return whole_held_out(
            len(held_out),
            f"{excluded} of them were in Production version {champion_version}'s training set and the "
            f"{int(unseen.sum())} others hold too few rows of a class to compare on ({short}; at least "
            f"{min_rows_per_class} per class are needed)",
        )
    note = (
        f"{int(unseen.sum())} of the {len(held_out)} held-out rows, leaving out the {excluded} Production version "
        f"{champion_version} trained on"
        if excluded
        else f"all {len(held_out)} held-out rows: Production version {champion_version} trained on none of them"
    )
    return ComparisonRows(unseen, excluded, True, note)


def _short_classes(labels: pd.Series, used: np.ndarray, min_rows_per_class: int) -> str:
    """The classes the used rows hold fewer than ``min_rows_per_class`` of (than all, where ``labels`` has fewer)."""
    held_out = labels.astype(str).value_counts()
    kept = labels[used].astype(str).value_counts()
    return ", ".join(
        f"class {name}: {int(kept.get(name, 0))}"
        for name, count in held_out.items()
        if kept.get(name, 0) < min(count, min_rows_per_class)
    )


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
    compared_accuracy: float | None = None,
    compared_rows: int | None = None,
) -> Verdict:
    """Pass when accuracy reaches the threshold and, if enabled, is no worse than the champion beyond tolerance.

    The champion was scored on ``compared_rows`` held-out rows (the ones it did not train on, see
    :func:`rows_unseen_by_champion`); ``compared_accuracy`` is the candidate's accuracy on those same rows, and is what
    the comparison uses (``accuracy``, on the whole held-out set, when not given). The threshold always applies to
    ``accuracy``.

    Under high drift (``drift``, the largest PSI, above ``drift_threshold``) the comparison with the champion is
    stricter: the candidate must beat it by at least ``drift_margin`` instead of being within ``tolerance``. Without a
    drift threshold, or a drift figure, the rule is not applied.
    """
    reasons = []
    if accuracy < threshold:
        reasons.append(f"accuracy {accuracy:.4f} is below the threshold {threshold:.4f}")
    high_drift = drift is not None and drift_threshold is not None and drift > drift_threshold
    if compare_with_champion and champion_accuracy is not None:
        compared = accuracy if compared_accuracy is None else compared_accuracy
        on_rows = f" on {compared_rows} held-out rows" if compared_rows is not None else ""
        if high_drift and compared < champion_accuracy + drift_margin:
            reasons.append(
                f"under high drift (PSI {drift:.3f} > {drift_threshold:.3f}) accuracy {compared:.4f}{on_rows} must "
                f"beat Production version {champion_version} ({champion_accuracy:.4f}) by at least {drift_margin:.4f}"
            )
        elif not high_drift and compared < champion_accuracy - tolerance:
            reasons.append(
                f"accuracy {compared:.4f}{on_rows} is worse than Production version {champion_version} "
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

    classes = classes_of(predictions, truth)
    matrix = metrics.confusion_matrix(classes.expected, classes.predicted, labels=range(len(classes.names)))
    names = [
        f"{class_names[label]} ({label})" if class_names and label in class_names else label for label in classes.names
    ]
    figure, axes = plt.subplots(figsize=(4.5, 4))
    metrics.ConfusionMatrixDisplay(matrix, display_labels=names).plot(ax=axes, colorbar=False)
    axes.set_title(title)
    figure.tight_layout()
    return figure
