"""What mlops_monitor does with a window of recorded traffic: measure it against the Production version, judge it by
the rules, log it to MLflow and say whether to retrain.

The window's inputs are compared with the snapshot the version was trained on (the pipeline's drift report,
:mod:`ml.drift`); where labels arrived through ``POST /feedback``, the predictions they label give a live accuracy,
compared with the version's validation accuracy. The rules are settings (``MLOPS_MONITOR_*``). Records and labels are
read through :mod:`ml.records`, the one module that knows their layout.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from ml import data, drift, records, registry, run_note, tags, tracking
from ml.context import RunContext
from ml.settings import ConfigurationError, Settings

log = logging.getLogger(__name__)

PIPELINE_DAG = "mlops_pipeline"
EXPERIMENT_DESCRIPTION = (
    "Windows of live traffic watched by the `mlops_monitor` Airflow DAG: one run per window, tagged with the model and "
    "the Production version it served, with the window's requests, drifted features and live accuracy as metrics "
    "stamped at the window's end, so that they plot over time. Its description links to the Airflow run."
)
MONITOR_MODEL = "mlops.monitor.model"
MONITOR_VERSION = "mlops.monitor.version"
MONITOR_WINDOW_START = "mlops.monitor.window_start"
MONITOR_WINDOW_END = "mlops.monitor.window_end"
MONITOR_RETRAINING_RUN = "mlops.monitor.retraining_run_id"


@dataclass(frozen=True)
class Window:
    """Recorded traffic received in ``[start, end)``."""

    start: datetime
    end: datetime

    def describe(self) -> str:
        return f"{self.start:%Y-%m-%d %H:%M}-{self.end:%H:%M} UTC"


def aligned_window(moment: datetime, minutes: int) -> Window:
    """The window of ``minutes``, counted from midnight UTC, that holds the instant just before ``moment``: an hourly
    run at 13:00 judges 12:00-13:00, a run at 13:20 the 13:00 window so far. A day's last window ends at midnight."""
    return Window(*records.monitoring_window(moment - timedelta(microseconds=1), minutes))


def window_of_run(settings: Settings, window_end: str | None, run_moment: datetime) -> Window:
    """The run's window: the ``window_end`` Param's exact window (ISO time, UTC if no offset), else the aligned one."""
    if not window_end:
        return aligned_window(run_moment, settings.monitor_window_minutes)
    try:
        end = datetime.fromisoformat(window_end.strip())
    except ValueError as error:
        raise ConfigurationError(f"window_end {window_end!r} is not an ISO 8601 time: {error}") from None
    end = end.replace(tzinfo=UTC) if end.tzinfo is None else end.astimezone(UTC)
    return Window(end - timedelta(minutes=settings.monitor_window_minutes), end)


def announced_window_end(triggering_events: Mapping[Any, Sequence[Any]]) -> str | None:
    """The latest ``window_end`` in the extra of the asset events that started the run: the model server announces a
    completed window so (ml/serving/window_events.py), and the run judges it rather than the window just begun."""
    ends = [
        str(event.extra["window_end"])
        for events in triggering_events.values()
        for event in events
        if isinstance(event.extra, Mapping) and event.extra.get("window_end")
    ]
    return max(ends, key=lambda end: datetime.fromisoformat(end)) if ends else None


@dataclass(frozen=True)
class Rules:
    drift_threshold: float
    drift_share: float
    accuracy_drop: float
    min_requests: int
    min_labelled: int

    @classmethod
    def of(cls, settings: Settings) -> Rules:
        return cls(
            drift_threshold=settings.drift_threshold,
            drift_share=settings.monitor_drift_share,
            accuracy_drop=settings.monitor_accuracy_drop,
            min_requests=settings.monitor_min_requests,
            min_labelled=settings.monitor_min_labelled,
        )


@dataclass(frozen=True)
class Observation:
    """What a window held for one version."""

    version: int
    requests: int
    rows: int
    features: int = 0  # features compared; 0 when drift was not measured
    drifted: tuple[str, ...] = ()
    max_psi: float | None = None
    labelled: int = 0
    live_accuracy: float | None = None
    validation_accuracy: float | None = None
    drift_problem: str | None = None  # why drift was not measured

    @property
    def drift_share(self) -> float | None:
        return len(self.drifted) / self.features if self.features else None


@dataclass(frozen=True)
class Verdict:
    judged: bool
    findings: tuple[str, ...]
    reasons: tuple[str, ...] = ()

    @property
    def retrain(self) -> bool:
        return bool(self.reasons)


def judge(seen: Observation, rules: Rules) -> Verdict:
    """Whether the window calls for a retraining, and what was seen, each as a short phrase."""
    if seen.requests < rules.min_requests:
        return Verdict(
            judged=False,
            findings=(
                f"too little traffic: {seen.requests} requests answered by v{seen.version} "
                f"(fewer than {rules.min_requests}); not judged",
            ),
        )
    findings, reasons = [], []
    share = seen.drift_share
    if share is None:
        findings.append(f"drift not measured: {seen.drift_problem or 'no feature to compare'}")
    else:
        drifted = f"drift in {len(seen.drifted)} of {seen.features} features"
        if len(seen.drifted) == 0:
            findings.append(f"no drift (0 of {seen.features} features above PSI {rules.drift_threshold:g})")
        elif share > rules.drift_share:
            top = ", ".join(seen.drifted[:3])
            findings.append(f"{drifted} ({top}{', ...' if len(seen.drifted) > 3 else ''})")
            reasons.append(
                f"{drifted} of v{seen.version}'s live inputs (PSI above {rules.drift_threshold:g}; "
                f"the rule allows {rules.drift_share:.0%})"
            )
        else:
            findings.append(f"{drifted}, within the rule ({rules.drift_share:.0%})")
    if seen.labelled < rules.min_labelled or seen.live_accuracy is None:
        findings.append(
            f"live accuracy not judged: {seen.labelled} labelled predictions (fewer than {rules.min_labelled})"
        )
    else:
        accuracy = f"live accuracy {seen.live_accuracy:.2f} on {seen.labelled} labelled predictions"
        validated = seen.validation_accuracy
        if validated is None:
            findings.append(f"{accuracy} (no validation accuracy to compare with)")
        elif validated - seen.live_accuracy > rules.accuracy_drop:
            findings.append(f"{accuracy}, {validated - seen.live_accuracy:.2f} below validation ({validated:.2f})")
            reasons.append(
                f"{accuracy}, {validated - seen.live_accuracy:.2f} below v{seen.version}'s validation accuracy "
                f"{validated:.2f} (the rule allows {rules.accuracy_drop:g})"
            )
        else:
            findings.append(f"{accuracy} (validation {validated:.2f})")
    return Verdict(judged=True, findings=tuple(findings), reasons=tuple(reasons))


def retraining_run_id(version: int, window: Window) -> str:
    """The mlops_pipeline run a window starts: one per version and window, so a window never retrains twice."""
    return f"monitor__v{version}__{window.end:%Y%m%dT%H%M%S}Z"


@dataclass(frozen=True)
class MonitorResult:
    """judge_window's XCom."""

    window_start: str
    window_end: str
    note: str
    production_version: int | None = None
    judged: bool = False
    reason: str | None = None
    trigger_run_id: str | None = None  # the mlops_pipeline run to start; None: none
    already_started: bool = False
    mlflow_run_id: str | None = None
    observation: dict[str, Any] = field(default_factory=dict)

    def to_xcom(self) -> dict[str, Any]:
        return asdict(self)


def observe(settings: Settings, window: Window, version: registry.VersionInfo) -> tuple[Observation, Any]:
    """Measure the window's records of ``version``; the drift report too, or None where it could not be made."""
    store = settings.data_store
    served = records.read_records(store, window.start, window.end, version=version.version)
    requests, rows = int(served["request_id"].nunique()) if len(served) else 0, len(served)
    report, problem = None, None
    reference_uri = version.tags.get(tags.DATA_SNAPSHOT_URI)
    inputs = records.features_of(served)
    if rows == 0:
        problem = "no recorded requests"
    elif inputs.empty or not len(inputs.columns):
        problem = "the records hold no features (MLOPS_RECORDING_FEATURES=false)"
    elif not reference_uri:
        problem = f"v{version.version} has no training snapshot"
    else:
        try:
            report = drift.compare(data.read_frame(reference_uri), inputs, label=settings.label_column)
        except data.DataSourceError as error:
            problem = f"v{version.version}'s training snapshot cannot be read ({error})"
    # Labels arrive after their requests, for as long as the server accepts them (the feedback window).
    labels_until = window.end + timedelta(hours=settings.feedback_window_hours)
    labelled = records.with_labels(served, records.read_feedback(store, window.start, labels_until)) if rows else None
    validated = version.tags.get(tags.VALIDATION_ACCURACY)
    seen = Observation(
        version=version.version,
        requests=requests,
        rows=rows,
        features=len(report.features) if report else 0,
        drifted=tuple(report.drifted(settings.drift_threshold)) if report else (),
        max_psi=report.max_psi if report else None,
        labelled=len(labelled) if labelled is not None else 0,
        live_accuracy=float((labelled["prediction"] == labelled["label"]).mean())
        if labelled is not None and len(labelled)
        else None,
        validation_accuracy=_float_or_none(validated),
        drift_problem=problem,
    )
    return seen, report


def _float_or_none(value: str | None) -> float | None:
    try:
        return float(value) if value not in (None, "", "none") else None
    except ValueError:
        return None


def judge_window(
    settings: Settings,
    run: RunContext,
    window: Window,
    already_started: Callable[[str], bool] = lambda _run_id: False,
) -> MonitorResult:
    """Judge one window for the Production version: log it as an MLflow run and say whether to retrain."""
    shown = (window.start.isoformat(), window.end.isoformat())
    client = registry.client_for(settings)
    production = registry.production_version(client, settings.model_name, settings.production_alias)
    if production is None:
        note = f"**nothing to watch**: {settings.model_name} has no Production version ({window.describe()})."
        return MonitorResult(*shown, note=note)
    rules = Rules.of(settings)
    seen, report = observe(settings, window, production)
    verdict = judge(seen, rules)
    log.info("window %s, v%s: %s", window.describe(), production.version, "; ".join(verdict.findings))
    trigger_run_id = retraining_run_id(production.version, window) if verdict.retrain else None
    started_before = trigger_run_id is not None and already_started(trigger_run_id)
    mlflow_run_id, experiment_id = _log_window(settings, run, window, seen, verdict, report, trigger_run_id)
    reason = f"mlops_monitor, {window.describe()}: " + "; ".join(verdict.reasons) if verdict.retrain else None
    note = compose_note(
        seen,
        verdict,
        window,
        trigger_run_id,
        started_before,
        run_note.MlflowLinks(settings.mlflow_ui, settings.model_name, experiment_id),
        mlflow_run_id,
    )
    return MonitorResult(
        *shown,
        note=note,
        production_version=production.version,
        judged=verdict.judged,
        reason=reason,
        trigger_run_id=None if started_before else trigger_run_id,
        already_started=started_before,
        mlflow_run_id=mlflow_run_id,
        observation=asdict(seen),
    )


def compose_note(
    seen: Observation,
    verdict: Verdict,
    window: Window,
    trigger_run_id: str | None,
    started_before: bool,
    links: run_note.MlflowLinks,
    mlflow_run_id: str | None,
) -> str:
    """The monitor run's note: what the window held and what was done about it, in one line."""
    headline = "; ".join(verdict.findings)
    if not verdict.judged:
        text = f"**{headline}** ({window.describe()})."
    elif trigger_run_id is None:
        text = f"**v{seen.version}: {headline}** on {seen.requests} requests ({window.describe()}); no retraining."
    elif started_before:
        text = (
            f"**v{seen.version}: {headline}** on {seen.requests} requests ({window.describe()}); retraining for this "
            f"window was already started (mlops_pipeline run `{trigger_run_id}`)."
        )
    else:
        text = (
            f"**v{seen.version}: {headline}** on {seen.requests} requests ({window.describe()}); retraining started: "
            f"mlops_pipeline run `{trigger_run_id}`."
        )
    return run_note.with_links(text, links, seen.version, mlflow_run_id or "")


def _log_window(
    settings: Settings,
    run: RunContext,
    window: Window,
    seen: Observation,
    verdict: Verdict,
    report: drift.DriftReport | None,
    trigger_run_id: str | None,
) -> tuple[str, str]:
    """One MLflow run for the window, its metrics stamped at the window's end; (run id, experiment id)."""
    mlflow = tracking.connect(settings, settings.monitor_experiment, EXPERIMENT_DESCRIPTION)
    stamp = int(window.end.timestamp() * 1000)
    metrics = {
        "requests": seen.requests,
        "rows": seen.rows,
        "labelled": seen.labelled,
        "live_accuracy": seen.live_accuracy,
        "validation_accuracy": seen.validation_accuracy,
        "drifted_features": len(seen.drifted) if seen.features else None,
        "drift_share": seen.drift_share,
        "drift_max_psi": seen.max_psi,
        "retraining_started": float(trigger_run_id is not None),
    }
    run_tags = {
        **run.lineage_tags(),
        MONITOR_MODEL: settings.model_name,
        MONITOR_VERSION: str(seen.version),
        MONITOR_WINDOW_START: window.start.isoformat(),
        MONITOR_WINDOW_END: window.end.isoformat(),
        MONITOR_RETRAINING_RUN: trigger_run_id or "none",
        tracking.RUN_NAME_TAG: f"v{seen.version} · {window.describe()}",
    }
    with mlflow.start_run(
        tags=run_tags, description=f"{'; '.join(verdict.findings)}. [Airflow run]({run.airflow_url})"
    ) as active:
        client = mlflow.MlflowClient()
        from mlflow.entities import Metric

        client.log_batch(
            active.info.run_id,
            metrics=[Metric(key, float(value), stamp, 0) for key, value in metrics.items() if value is not None],
        )
        if report is not None:
            mlflow.log_table(data=_frame(report.table()), artifact_file=drift.REPORT_TABLE)
            mlflow.log_dict(report.summary(settings.drift_threshold), drift.REPORT_SUMMARY)
        return active.info.run_id, active.info.experiment_id


def _frame(table: Mapping[str, list[Any]]) -> Any:
    import pandas as pd

    return pd.DataFrame(table)
