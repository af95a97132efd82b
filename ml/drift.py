"""How far new training data has moved from the data behind the Production model.

Per feature: the population stability index (PSI) over the reference's deciles and a two-sample Kolmogorov-Smirnov
test; for the label: each class's share on both sides. A PSI below 0.1 is usually read as no real change, 0.1-0.2 as
moderate and above 0.2 as a significant shift; the pipeline's ``drift_threshold`` (0.2 by default) decides what it
calls high drift. Plain functions on frames; logging the report to MLflow is the only part that touches MLflow.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ml import tags

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

DEFAULT_BINS = 10
# Drift is measured on at most this many rows of each side, drawn uniformly at random with a fixed seed. With 100,000
# rows a side, sampling moves each empirical distribution function by at most 0.0043 (95 %, Dvoretzky-Kiefer-Wolfowitz
# inequality), so a KS statistic by at most about 0.01, and each decile's share by about 0.002 (two standard errors),
# a PSI by well under 0.01: far below the 0.1 and 0.2 that PSI is read against. Below the cap, every row is used.
SAMPLE_ROWS = 100_000
SAMPLING_ERROR = (
    "drift measured on a uniform random sample of at most 100,000 rows of each side (fixed seed): the KS statistic is "
    "within about 0.01 and the PSI well within 0.01 of their values on every row (95 %)"
)
# Share given to a bin that one side leaves empty, so that the logarithm stays finite.
EMPTY_BIN_SHARE = 1e-4
REPORT_TABLE = "drift/report.json"
REPORT_FIGURE = "drift/psi_top_features.png"
# Below this largest PSI the data did not move at all (the same snapshot, say): nothing worth a chart.
NO_DRIFT_PSI = 1e-9
REPORT_SUMMARY = "drift/summary.json"


@dataclass(frozen=True)
class FeatureDrift:
    feature: str
    psi: float
    ks_statistic: float
    ks_pvalue: float
    reference_mean: float
    current_mean: float


@dataclass(frozen=True)
class DriftReport:
    features: list[FeatureDrift]
    reference_rows: int
    current_rows: int
    reference_label_balance: dict[str, float]
    current_label_balance: dict[str, float]
    missing_features: list[str] = field(default_factory=list)
    new_features: list[str] = field(default_factory=list)
    sampled_rows: int | None = None  # the cap on rows measured per side, when a side was over it; None: every row

    @property
    def max_psi(self) -> float:
        return max((f.psi for f in self.features), default=0.0)

    @property
    def max_psi_feature(self) -> str | None:
        if not self.features:
            return None
        return max(self.features, key=lambda f: f.psi).feature

    @property
    def min_ks_pvalue(self) -> float:
        return min((f.ks_pvalue for f in self.features), default=1.0)

    def drifted(self, threshold: float) -> list[str]:
        """Features whose PSI exceeds ``threshold``, most drifted first."""
        return [f.feature for f in self.ranked() if f.psi > threshold]

    def ranked(self) -> list[FeatureDrift]:
        return sorted(self.features, key=lambda f: (-f.psi, f.feature))

    def label_shift(self) -> float:
        """The largest change, in share of rows, of any class between the two sides."""
        classes = set(self.reference_label_balance) | set(self.current_label_balance)
        return max(
            (abs(self.current_label_balance.get(c, 0.0) - self.reference_label_balance.get(c, 0.0)) for c in classes),
            default=0.0,
        )

    def table(self) -> dict[str, list[Any]]:
        """One row per feature, most drifted first: the shape ``mlflow.log_table`` takes."""
        rows = self.ranked()
        return {
            "feature": [f.feature for f in rows],
            "psi": [f.psi for f in rows],
            "ks_statistic": [f.ks_statistic for f in rows],
            "ks_pvalue": [f.ks_pvalue for f in rows],
            "reference_mean": [f.reference_mean for f in rows],
            "current_mean": [f.current_mean for f in rows],
        }

    def summary(self, threshold: float) -> dict[str, Any]:
        return {
            "max_psi": self.max_psi,
            "max_psi_feature": self.max_psi_feature,
            "min_ks_pvalue": self.min_ks_pvalue,
            "threshold": threshold,
            "high_drift": self.max_psi > threshold,
            "drifted_features": self.drifted(threshold),
            "reference_rows": self.reference_rows,
            "current_rows": self.current_rows,
            "sampled_rows": self.sampled_rows,
            "sampling": SAMPLING_ERROR if self.sampled_rows is not None else "every row measured",
            "reference_label_balance": self.reference_label_balance,
            "current_label_balance": self.current_label_balance,
            "label_shift": self.label_shift(),
            "missing_features": self.missing_features,
            "new_features": self.new_features,
        }


def _clean(values: Any) -> np.ndarray:
    array = pd.to_numeric(pd.Series(values), errors="coerce").to_numpy(dtype=float)
    return array[np.isfinite(array)]


def bin_edges(reference: Any, bins: int = DEFAULT_BINS) -> np.ndarray:
    """Inner edges at the reference's quantiles (duplicates merged), so each bin holds about 1/bins of it."""
    values = _clean(reference)
    if values.size == 0:
        return np.array([])
    quantiles = np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1])
    return np.unique(quantiles)


def psi(reference: Any, current: Any, bins: int = DEFAULT_BINS) -> float:
    """Population stability index of ``current`` against ``reference``: sum of (c - r) * ln(c / r) over bins.

    0 for identical distributions; grows without bound as mass moves to bins the reference seldom fills.
    Missing values are left out of both sides; an empty side gives 0 (nothing to compare).
    """
    ref, cur = _clean(reference), _clean(current)
    if ref.size == 0 or cur.size == 0:
        return 0.0
    edges = bin_edges(ref, bins)
    # Bins are (-inf, e1], (e1, e2], ..., (ek, inf): right-closed, so a constant reference fills one bin.
    ref_share = np.bincount(np.searchsorted(edges, ref, side="left"), minlength=edges.size + 1) / ref.size
    cur_share = np.bincount(np.searchsorted(edges, cur, side="left"), minlength=edges.size + 1) / cur.size
    ref_share = np.clip(ref_share, EMPTY_BIN_SHARE, None)
    cur_share = np.clip(cur_share, EMPTY_BIN_SHARE, None)
    return float(np.sum((cur_share - ref_share) * np.log(cur_share / ref_share)))


def ks_test(reference: Any, current: Any) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov statistic and p-value (scipy.stats.ks_2samp); (0, 1) if a side is empty."""
    ref, cur = _clean(reference), _clean(current)
    if ref.size == 0 or cur.size == 0:
        return 0.0, 1.0
    from scipy import stats

    result = stats.ks_2samp(ref, cur)
    return float(result.statistic), float(result.pvalue)


def label_balance(labels: Any) -> dict[str, float]:
    """Each class's share of the rows, classes as strings, in sorted order."""
    series = pd.Series(labels).dropna()
    if series.empty:
        return {}
    if pd.api.types.is_float_dtype(series) and bool((series == series.round()).all()):
        series = series.astype("int64")  # 1.0 and 1 are the same class, whichever file format carried them
    shares = series.astype(str).value_counts(normalize=True)
    return {str(k): float(shares[k]) for k in sorted(shares.index)}


def compare(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    *,
    label: str,
    bins: int = DEFAULT_BINS,
    sample_rows: int = SAMPLE_ROWS,
    current_rows: int | None = None,
) -> DriftReport:
    """The drift report of ``current`` against ``reference`` over their shared numeric feature columns.

    Each side larger than ``sample_rows`` is measured on a uniform random sample of that many rows (see
    ``SAMPLING_ERROR``); label balances use the same rows. ``current_rows`` is the size of the data ``current`` was
    already sampled from, if it was (default: its length).
    """
    full_rows = (len(reference), current_rows if current_rows is not None else len(current))
    sampled = len(reference) > sample_rows or len(current) > sample_rows or full_rows[1] > len(current)
    reference, current = sample(reference, sample_rows), sample(current, sample_rows)
    ref_features = [str(c) for c in reference.columns if str(c) != label]
    cur_features = [str(c) for c in current.columns if str(c) != label]
    shared = [c for c in cur_features if c in ref_features and _numeric(reference[c]) and _numeric(current[c])]
    features = []
    for name in shared:
        statistic, pvalue = ks_test(reference[name], current[name])
        ref_values, cur_values = _clean(reference[name]), _clean(current[name])
        features.append(
            FeatureDrift(
                feature=name,
                psi=psi(ref_values, cur_values, bins),
                ks_statistic=statistic,
                ks_pvalue=pvalue,
                reference_mean=float(ref_values.mean()) if ref_values.size else float("nan"),
                current_mean=float(cur_values.mean()) if cur_values.size else float("nan"),
            )
        )
    return DriftReport(
        features=features,
        reference_rows=full_rows[0],
        current_rows=full_rows[1],
        sampled_rows=sample_rows if sampled else None,
        reference_label_balance=label_balance(reference[label]) if label in reference else {},
        current_label_balance=label_balance(current[label]) if label in current else {},
        missing_features=[c for c in ref_features if c not in cur_features],
        new_features=[c for c in cur_features if c not in ref_features],
    )


def sample(frame: pd.DataFrame, rows: int = SAMPLE_ROWS, seed: int = 0) -> pd.DataFrame:
    """At most ``rows`` rows of ``frame``, drawn uniformly without replacement with a fixed seed (all if fewer)."""
    if len(frame) <= rows:
        return frame
    return frame.sample(n=rows, random_state=seed)


def sample_of_parts(parts: list[pd.DataFrame], rows: int = SAMPLE_ROWS) -> pd.DataFrame:
    """At most ``rows`` rows of the parts taken together, each part sampled in proportion to its size.

    Stands for a data set already split in memory (train and test) without concatenating the whole of it first.
    """
    total = sum(len(part) for part in parts)
    if total <= rows:
        return pd.concat(parts, ignore_index=True)
    shares = [round(rows * len(part) / total) for part in parts]
    return pd.concat([sample(part, share) for part, share in zip(parts, shares, strict=True)], ignore_index=True)


def _numeric(series: pd.Series) -> bool:
    return bool(pd.api.types.is_numeric_dtype(series) or pd.api.types.is_bool_dtype(series))


def psi_figure(
    report: DriftReport, threshold: float, top: int = 10, title: str = "Population stability index"
) -> Figure:
    """A horizontal bar chart of the ``top`` most drifted features, with the threshold marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report.ranked()[:top][::-1]
    figure, axes = plt.subplots(figsize=(7, 0.35 * max(len(rows), 3) + 1.2))
    colours = ["#c0392b" if f.psi > threshold else "#2e86c1" for f in rows]
    axes.barh([f.feature for f in rows], [f.psi for f in rows], color=colours)
    axes.axvline(threshold, color="black", linestyle="--", linewidth=1, label=f"threshold {threshold:g}")
    axes.set_xlabel("PSI against the Production version's training data")
    axes.set_title(title)
    axes.legend(loc="lower right")
    figure.tight_layout()
    return figure


def version_tags(report: DriftReport | None, threshold: float, reference_version: int | None) -> dict[str, str]:
    """The tags that record the largest drift on a model version (``none`` when there was nothing to compare)."""
    if report is None:
        return {
            tags.DRIFT_MAX_PSI: "none",
            tags.DRIFT_MAX_PSI_FEATURE: "none",
            tags.DRIFT_REFERENCE_VERSION: "none",
        }
    return {
        tags.DRIFT_MAX_PSI: f"{report.max_psi:.6f}",
        tags.DRIFT_MAX_PSI_FEATURE: report.max_psi_feature or "none",
        tags.DRIFT_MIN_KS_PVALUE: f"{report.min_ks_pvalue:.6g}",
        tags.DRIFT_LABEL_SHIFT: f"{report.label_shift():.6f}",
        tags.DRIFT_HIGH: str(report.max_psi > threshold).lower(),
        tags.DRIFT_THRESHOLD: f"{threshold:g}",
        tags.DRIFT_REFERENCE_VERSION: str(reference_version) if reference_version is not None else "none",
    }


def result_fields(report: DriftReport | None, threshold: float, reference_version: int | None) -> dict[str, Any]:
    """The drift fields of train_model's and validate_model's returned dicts (XCom-sized)."""
    if report is None:
        return {
            "drift_max_psi": None,
            "drift_max_psi_feature": None,
            "drift_high": False,
            "drift_reference_version": None,
        }
    return {
        "drift_max_psi": report.max_psi,
        "drift_max_psi_feature": report.max_psi_feature,
        "drift_min_ks_pvalue": report.min_ks_pvalue,
        "drift_label_shift": report.label_shift(),
        "drift_high": report.max_psi > threshold,
        "drift_features": report.drifted(threshold)[:10],
        "drift_reference_version": reference_version,
    }


def fields_from_tags(version_tags: Mapping[str, str], threshold: float) -> dict[str, Any]:
    """Rebuild the result fields from a version's tags (a retried train_model registers nothing new)."""
    raw = version_tags.get(tags.DRIFT_MAX_PSI, "none")
    if raw in ("", "none"):
        return result_fields(None, threshold, None)
    reference = version_tags.get(tags.DRIFT_REFERENCE_VERSION, "none")
    return {
        "drift_max_psi": float(raw),
        "drift_max_psi_feature": version_tags.get(tags.DRIFT_MAX_PSI_FEATURE),
        "drift_high": float(raw) > threshold,
        "drift_reference_version": int(reference) if reference.isdigit() else None,
    }


def log_report(mlflow: Any, report: DriftReport, threshold: float, reference_version: int | None) -> None:
    """Log the report to the active MLflow run: a table, a bar chart, a summary and metrics."""
    import matplotlib.pyplot as plt

    mlflow.log_table(data=pd.DataFrame(report.table()), artifact_file=REPORT_TABLE)
    mlflow.log_dict({**report.summary(threshold), "reference_version": reference_version}, REPORT_SUMMARY)
    # Identical distributions give a chart of empty bars; the table and the summary already say "no drift".
    if report.max_psi > NO_DRIFT_PSI:
        figure = psi_figure(
            report, threshold, title=f"PSI against Production version {reference_version}: top features"
        )
        try:
            mlflow.log_figure(figure, REPORT_FIGURE)
        finally:
            plt.close(figure)
    mlflow.log_metrics(
        {
            "drift_max_psi": report.max_psi,
            "drift_min_ks_pvalue": report.min_ks_pvalue,
            "drift_label_shift": report.label_shift(),
            "drift_features_over_threshold": float(len(report.drifted(threshold))),
        }
    )
