"""The Airflow boundary: the one module of ``ml`` that knows what an Airflow task context and XCom are.

Each function is the body of one DAG task: it turns the task context into settings and a run, turns the upstream
XCom dicts into typed results, calls the step in ``ml.steps`` and returns the step's result as a small JSON dict.
The DAG files import this module inside their task bodies and make one call.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn, Protocol, TypeVar

from ml import data, object_store, redaction, registry, run_note, selection, steps
from ml.context import RunContext
from ml.hooks import call_hook
from ml.results import (
    APPROVAL_TASK,
    APPROVE,
    ApprovalResult,
    ArchiveResult,
    CandidateResult,
    DeployResult,
    ExtractResult,
    ManualRollbackResult,
    RollbackResult,
    Skip,
    TrainResult,
    TransformResult,
    ValidateResult,
)
from ml.settings import ConfigurationError, Settings


class MissingResultError(RuntimeError):
    """An upstream task that must have returned a result left none in XCom."""


# Errors a retry cannot cure: the task fails at once instead of waiting out retry_delay.
PERMANENT_ERRORS = (
    ConfigurationError,
    data.DataSourceError,
    data.DataValidationError,
    registry.RegistryError,
    MissingResultError,
    selection.NoCandidateTrainedError,
)
# Those of their kind that another try may get past (a data source that did not answer): left to Airflow's retries.
TRANSIENT_ERRORS = (data.DataSourceUnavailableError,)
# The mapped task that trains one candidate per task instance; train_model reads what each left.
CANDIDATE_TASK = "train_candidate"

log = logging.getLogger(__name__)


class StepResult(Protocol):
    def to_xcom(self) -> dict[str, Any]: ...


Result = TypeVar("Result", bound=StepResult)


def run_context(context: Mapping[str, Any]) -> RunContext:
    """The run behind an Airflow task context (or any mapping with the same keys, as tests pass)."""
    dag = context.get("dag")
    ti = context.get("ti")
    return RunContext(
        dag_id=getattr(dag, "dag_id", None) or str(context.get("dag_id", "manual")),
        run_id=str(context.get("run_id") or "manual"),
        try_number=int(getattr(ti, "try_number", None) or context.get("try_number") or 1),
        params=dict(context.get("params") or {}),
        declared_params=frozenset(getattr(dag, "params", None) or ()),
    )


def resolve(context: Mapping[str, Any]) -> tuple[Settings, RunContext]:
    """The task's settings and run; every credential they hold is masked from here on, in whatever the task shows.

    With ``MLOPS_S3_CONN_ID`` set, the task's S3 filesystems are opened with that Airflow connection's keys, masked
    too; without it, with the environment's, whatever task ran before in this process.
    """
    run = run_context(context)
    settings = Settings.from_env()
    redaction.register_secrets(redaction.secrets_of(settings))
    object_store.use_for_this_task(None)
    if settings.s3_conn_id:
        connection = object_store.read_connection(settings.s3_conn_id)
        redaction.register_secrets(connection.secrets())
        object_store.use_for_this_task(connection)
    return settings.for_run(run.params, run.declared_params), run


def upstream_result(context: Mapping[str, Any], task_id: str) -> dict[str, Any] | None:
    """The dict an earlier task of this DAG run returned, or None if it returned nothing (it failed, say).

    Read from XCom by task id, not passed as a TaskFlow argument: an argument would add a graph edge the pipeline's
    contract does not have, or (for rollback_model) fail the task when the upstream task failed.
    """
    ti = context.get("ti")
    return ti.xcom_pull(task_ids=task_id) if ti is not None else context.get(f"{task_id}_result")


def run_step(name: str, context: Mapping[str, Any], step: Callable[[Settings, RunContext], Result]) -> dict[str, Any]:
    """Run one step for an Airflow task and return its result as the task's XCom.

    Errors that a retry cannot cure (bad settings, bad data, a data source that does not exist or refuses the query as
    written, a refused registry change) fail the task at once instead of waiting out ``retry_delay``; anything else
    (an unreachable server or database, a file still being written) is left to Airflow's retries.

    A step that had nothing to do (no new data, nothing deployed to archive, nothing to roll back) ends its task as
    *skipped*, so that the grid shows what a run did; its result is still this task's XCom, as the contract says.
    """
    try:
        settings, run = resolve(context)
        if settings.step_hook:
            call_hook(settings.step_hook, step=name, run_key=run.run_key, try_number=run.try_number)
        result = step(settings, run)
    except TRANSIENT_ERRORS:
        raise
    except PERMANENT_ERRORS as error:
        _fail_without_retry(name, error)
    _refresh_registry_descriptions(settings)
    xcom = result.to_xcom()
    idle = nothing_done(result)
    ti = context.get("ti")
    if idle is not None and ti is not None:
        from airflow.sdk.exceptions import AirflowSkipException

        ti.xcom_push(key="return_value", value=xcom)
        if (rejection := rejected(result)) is not None:
            ti.xcom_push(key=run_note.TASK_NOTE_KEY, value=rejection)
        raise AirflowSkipException(idle)
    return xcom


def nothing_done(result: StepResult) -> str | None:
    """Why a step's task did nothing and should show as skipped, or None when it did its work."""
    if isinstance(result, ExtractResult):
        return None  # finding the data unchanged is extract_data's work; the steps after it have nothing to do
    skip = getattr(result, "skip", None)
    if skip is not None:
        return str(skip.reason)
    if (rejection := rejected(result)) is not None:
        return rejection
    if isinstance(result, DeployResult) and not result.promoted:
        return f"version {result.model_version} was not promoted: {result.reason}"
    if isinstance(result, ArchiveResult) and not result.archived:
        return f"version {result.model_version} was not deployed; nothing to archive"
    if isinstance(result, RollbackResult) and not result.rollback_performed:
        return f"no rollback: {result.reason}"
    return None


def rejected(result: StepResult) -> str | None:
    """Why validate_model rejected its version, or None if it did not.

    A rejected version ends validate_model skipped (the run still succeeds: the pipeline did its job), and this
    reason becomes the task's note, which the grid marks on its square.
    """
    if not isinstance(result, ValidateResult) or result.skip is not None or result.passed:
        return None
    return f"v{result.model_version} rejected: {'; '.join(result.reasons) or 'validation failed'}"


def _refresh_registry_descriptions(settings: Settings) -> None:
    # The descriptions repeat what the tags already record; failing to write them must not fail (and retry) a step
    # that changed the registry. A page left stale is rewritten by the next change to its version.
    try:
        registry.refresh_descriptions(settings)
    except Exception as error:
        log.warning("the registry's descriptions were not updated: %s", error)


def _push_run_note(context: Mapping[str, Any], settings: Settings, rolled: RollbackResult) -> None:
    """Compose the DAG run's note from the run's results; ml.airflow_plugin puts it on the run when it ends."""
    ti = context.get("ti")
    if ti is None:
        return
    trained = upstream_result(context, "train_model") or {}
    links = run_note.MlflowLinks(
        settings.mlflow_ui, settings.model_name, _experiment_id(settings, str(trained.get("run_id") or ""))
    )
    extracted, deployed = upstream_result(context, "extract_data"), upstream_result(context, "deploy_model")
    headline = run_note.compose(
        extract=extracted,
        train=trained,
        validation=upstream_result(context, "validate_model"),
        deploy=deployed,
        rollback=rolled.to_xcom(),
        links=links,
    )
    started_because = run_note.with_reason(headline, (context.get("params") or {}).get("reason"))
    note = run_note.with_candidates(started_because, trained)
    log.info("run note: %s", note.splitlines()[0])
    ti.xcom_push(key=run_note.RUN_NOTE_KEY, value=note)
    events = run_note.events(extract=extracted, deploy=deployed, rollback=rolled.to_xcom())
    _push_notice(context, events, list((extracted or {}).get("repaired") or []))


def _push_notice(context: Mapping[str, Any], events: list[str], details: list[str]) -> None:
    """What ml.notify.RunNotifier tells people when the DAG run ends."""
    ti = context.get("ti")
    if ti is not None:
        ti.xcom_push(key=run_note.NOTICE_KEY, value={"events": events, "details": details})


def _experiment_id(settings: Settings, run_id: str) -> str | None:
    try:
        client = registry.client_for(settings)
        if run_id:
            return str(client.get_run(run_id).info.experiment_id)
        experiment = client.get_experiment_by_name(settings.experiment_name)
        return str(experiment.experiment_id) if experiment else None
    except Exception as error:
        log.warning("no link to the MLflow experiment in the run note: %s", error)
        return None


def _fail_without_retry(name: str, error: Exception) -> NoReturn:
    from airflow.sdk.exceptions import AirflowFailException

    log.error("%s failed and will not be retried: %s", name, error)
    # The message says what is wrong and where; the chain of our own frames under it would only repeat it.
    raise AirflowFailException(f"{type(error).__name__}: {error}") from None


def _split(context: Mapping[str, Any]) -> TransformResult:
    return TransformResult.from_xcom(upstream_result(context, "transform_data") or {})


def extract_data(context: Mapping[str, Any]) -> dict[str, Any]:
    extracted = run_step("extract_data", context, steps.extract)
    ti = context.get("ti")
    if ti is not None and Skip.from_xcom(extracted) is not None:
        _skip_the_rest_of_the_run(context, extracted)
    return extracted


def _skip_the_rest_of_the_run(context: Mapping[str, Any], extracted: dict[str, Any]) -> NoReturn:
    """End a run on the data Production was trained on after extract_data, which succeeds: Airflow marks every task
    after it skipped without starting it (try 0, no duration), as it does the tasks after a skipped one.

    rollback_model, which leaves a run's note and notice otherwise, does not run either, so they are left here.
    """
    from airflow.sdk.exceptions import DownstreamTasksSkipped

    settings, _ = resolve(context)
    ti = context["ti"]
    links = run_note.MlflowLinks(settings.mlflow_ui, settings.model_name)
    note = run_note.with_reason(run_note.no_new_data(extracted, links), (context.get("params") or {}).get("reason"))
    log.info("run note: %s", note)
    # A task that raises returns nothing: its result becomes its XCom here, as the contract says.
    ti.xcom_push(key="return_value", value=extracted)
    ti.xcom_push(key=run_note.RUN_NOTE_KEY, value=note)
    events = run_note.events(extract=extracted, deploy=None, rollback={})
    _push_notice(context, events, list(extracted.get("repaired") or []))
    raise DownstreamTasksSkipped(tasks=sorted(context["task"].get_flat_relative_ids(upstream=False)))


def _unless_no_new_data(context: Mapping[str, Any]) -> None:
    """Skip a task that started although extract_data found no new data: cleared by hand, say. deploy_model and
    rollback_model run after skipped tasks by their trigger rules, but in such a run they have nothing to do."""
    unchanged = Skip.from_xcom(upstream_result(context, "extract_data"))
    if unchanged is not None and context.get("ti") is not None:
        from airflow.sdk.exceptions import AirflowSkipException

        raise AirflowSkipException(
            f"{unchanged.reason}: Production version {unchanged.production_version} was trained on this data"
        )


def transform_data(extract_result: Mapping[str, Any], context: Mapping[str, Any]) -> dict[str, Any]:
    return run_step(
        "transform_data",
        context,
        lambda settings, run: steps.transform(settings, run, ExtractResult.from_xcom(extract_result)),
    )


def plan_candidates(context: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The run's candidates, each as train_candidate is handed it: a list, which Airflow maps train_candidate over
    (it maps only over a task's returned value, and transform_data's is the contract's dict)."""
    from ml.training import candidates_of

    try:
        settings, _ = resolve(context)
        return [candidate.to_xcom() for candidate in candidates_of(settings)]
    except ConfigurationError as error:
        _fail_without_retry("plan_candidates", error)


def train_candidate(
    transform_result: Mapping[str, Any], candidate: Mapping[str, Any], context: Mapping[str, Any]
) -> dict[str, Any]:
    """One mapped instance: fit one candidate and log it to MLflow; its XCom says where the model is, never holds it."""
    from ml.training import Candidate

    def train_one(settings: Settings, run: RunContext) -> CandidateResult:
        split = TransformResult.from_xcom(transform_result)
        return steps.train_candidate(settings, run, split, Candidate.from_xcom(dict(candidate)))

    return run_step(CANDIDATE_TASK, context, train_one)


def train_model(transform_result: Mapping[str, Any], context: Mapping[str, Any]) -> dict[str, Any]:
    """Runs once every candidate is done, if one of them trained: a failed candidate leaves no result and is listed
    as failed; none trained, it fails."""

    def choose_and_register(settings: Settings, run: RunContext) -> TrainResult:
        ti = context.get("ti")
        # A list with a list of task ids: every map index that left a result, the failed ones none.
        pulled = ti.xcom_pull(task_ids=[CANDIDATE_TASK]) if ti is not None else context.get("train_candidate_results")
        trained = sorted(
            (CandidateResult.from_xcom(result) for result in pulled or [] if result), key=lambda c: c.index
        )
        return steps.train(settings, run, TransformResult.from_xcom(transform_result), trained)

    return run_step("train_model", context, choose_and_register)


def validate_model(train_result: Mapping[str, Any], context: Mapping[str, Any]) -> dict[str, Any]:
    return run_step(
        "validate_model",
        context,
        lambda settings, run: steps.validate(settings, run, TrainResult.from_xcom(train_result), _split(context)),
    )


def deploy_model(context: Mapping[str, Any]) -> dict[str, Any]:
    _unless_no_new_data(context)

    def deploy(settings: Settings, run: RunContext) -> DeployResult:
        answered = upstream_result(context, APPROVAL_TASK) if settings.approval_required else None
        approval = ApprovalResult.from_xcom(answered) if answered else None
        return steps.deploy(settings, run, ValidateResult.from_xcom(_verdict(context)), _split(context), approval)

    return run_step("deploy_model", context, deploy)


def approval_request(context: Mapping[str, Any], timeout_seconds: float) -> tuple[str, str]:
    """approve_deployment's subject and body; the task is skipped when validation left nothing to approve."""
    from airflow.sdk.exceptions import AirflowSkipException

    verdict = upstream_result(context, "validate_model") or {}
    if verdict.get("validation") != "passed":
        raise AirflowSkipException(f"nothing to approve: validation {verdict.get('validation') or 'returned nothing'}")
    settings, _ = resolve(context)
    trained = upstream_result(context, "train_model") or {}
    champion = verdict.get("champion_version")
    production_run_id = None
    if champion is not None:
        production_run_id = registry.get_version(registry.client_for(settings), settings.model_name, champion).run_id
    experiment = _experiment_id(settings, str(trained.get("run_id") or ""))
    return run_note.approval_request(
        validation=verdict,
        train=trained,
        digest=str(_split(context).digest),
        production_run_id=production_run_id or "",
        timeout_seconds=timeout_seconds,
        links=run_note.MlflowLinks(settings.mlflow_ui, settings.model_name, experiment),
    )


def approval_answer(answer: Mapping[str, Any], *, timed_out: bool) -> dict[str, Any]:
    """approve_deployment's XCom: the person's answer to the approval request, or that nobody answered in time."""
    user = answer.get("responded_by_user") or {}
    answered_at = answer.get("responded_at")
    result = ApprovalResult(
        approved=not timed_out and list(answer.get("chosen_options") or []) == [APPROVE],
        decided_by=str(user.get("name") or user.get("id") or "") if not timed_out else "",
        decided_at=answered_at.isoformat(timespec="seconds") if answered_at is not None else registry.utc_now(),
        timed_out=timed_out,
    )
    log.info("deployment %s", result.describe())
    return result.to_xcom()


def _verdict(context: Mapping[str, Any]) -> dict[str, Any]:
    """validate_model's verdict, which it leaves even when it rejects a version and ends skipped."""
    verdict = upstream_result(context, "validate_model")
    if not verdict:
        raise MissingResultError("validate_model returned no verdict")
    return verdict


def archive_model(deploy_result: Mapping[str, Any], context: Mapping[str, Any]) -> dict[str, Any]:
    return run_step(
        "archive_model",
        context,
        lambda settings, run: steps.archive(settings, run, DeployResult.from_xcom(deploy_result)),
    )


def rollback_model(context: Mapping[str, Any]) -> dict[str, Any]:
    """Runs whatever happened upstream, so it reads deploy_model's result itself: a failed deploy_model leaves none."""
    _unless_no_new_data(context)
    try:
        resolve(context)
    except ConfigurationError as refusal:
        return _nothing_ran(context, refusal)
    deploy_result = upstream_result(context, "deploy_model")
    deployed = DeployResult.from_xcom(deploy_result) if deploy_result else None

    def rollback_and_note(settings: Settings, run: RunContext) -> RollbackResult:
        rolled = steps.rollback(settings, run, deployed)
        _push_run_note(context, settings, rolled)
        return rolled

    return run_step("rollback_model", context, rollback_and_note)


def _nothing_ran(context: Mapping[str, Any], refusal: ConfigurationError) -> dict[str, Any]:
    """rollback_model of a run refused at its first task (a misspelt parameter, say): nothing changed, so nothing is
    rolled back and the task ends skipped, not failed; the run's note says why it was refused."""
    production = None
    try:
        settings = Settings.from_env()
        champion = registry.production_version(
            registry.registry_client_for(settings), settings.model_name, settings.production_alias
        )
        production = champion.version if champion else None
    except Exception as error:
        log.warning("Production could not be read: %s", error)
    reason = f"the run was refused: {refusal}"
    log.info("no rollback: %s", reason)
    xcom = RollbackResult(False, production, reason).to_xcom()
    ti = context.get("ti")
    if ti is None:
        return xcom
    from airflow.sdk.exceptions import AirflowSkipException

    ti.xcom_push(key=run_note.RUN_NOTE_KEY, value=run_note.refused(str(refusal), production))
    ti.xcom_push(key="return_value", value=xcom)
    raise AirflowSkipException(f"no rollback: {reason}")


def rollback_production(context: Mapping[str, Any]) -> dict[str, Any]:
    """The mlops_rollback DAG's one task: put a chosen version back in Production, and note it on the run."""

    def rollback_and_note(settings: Settings, run: RunContext) -> ManualRollbackResult:
        rolled = steps.manual_rollback(settings, run)
        note = run_note.manual_rollback(
            replaced=rolled.replaced_version,
            restored=rolled.production_version,
            reason=rolled.reason,
            actor=run.actor,
            links=run_note.MlflowLinks(settings.mlflow_ui, settings.model_name),
        )
        ti = context.get("ti")
        if ti is not None:
            ti.xcom_push(key=run_note.RUN_NOTE_KEY, value=note)
        _push_notice(context, ["manual_rollback"], [])
        return rolled

    return run_step("rollback_production", context, rollback_and_note)


def land_batch(context: Mapping[str, Any], asset: Any = None) -> dict[str, Any]:
    """The mlops_ingest DAG's one task: land a batch (of the held-back data, or the labelled requests of a window),
    describe it on the asset event, or skip if there is none."""
    from ml import ingest

    try:
        settings, run = resolve(context)
        params = run.params
        file_format = str(params.get("file_format") or "csv")
        if params.get("from_feedback"):
            if params.get("batch") is not None or params.get("shift"):
                raise ingest.IngestError("from_feedback lands labelled requests; batch and shift do not go with it")
            since, until = ingest.feedback_window(params.get("since"), params.get("until"))
            result = ingest.land_feedback(
                settings, since, until, version=params.get("version"), file_format=file_format, run_key=run.run_key
            )
        else:
            result = ingest.land(
                settings,
                batch=params.get("batch"),
                shift=params.get("shift") or {},
                file_format=file_format,
                run_key=run.run_key,
            )
    except TRANSIENT_ERRORS:
        raise
    except (ConfigurationError, data.DataSourceError, data.DataValidationError) as error:
        # A bundled data set as target, a bad batch number or shift, no labelled requests in the window, a label the
        # training data has no class for, a bucket that does not exist, refused keys: a retry would fail the same way.
        _fail_without_retry("land_batch", error)
    if not result["landed"]:
        from airflow.sdk.exceptions import AirflowSkipException

        # A skipped task emits no asset event, so mlops_pipeline is not triggered for nothing.
        raise AirflowSkipException(result["reason"])
    outlet_events = context.get("outlet_events")
    if asset is not None and outlet_events is not None:
        outlet_events[asset].extra = ingest.event_extra(result)
    return result


def compact_records(context: Mapping[str, Any]) -> dict[str, int]:
    """The mlops_monitor DAG's housekeeping: merge the many small record files of each closed hour into one."""
    from ml import records

    settings, _ = resolve(context)
    # An hour is closed an hour after its end: a server may still flush the last requests of the hour just ended.
    compacted = records.compact_records(settings.data_store, datetime.now(UTC) - timedelta(hours=1))
    log.info("compacted %(files)d record files into one each for %(partitions)d hour partitions", compacted)
    return compacted


def judge_window(context: Mapping[str, Any]) -> dict[str, Any]:
    """The mlops_monitor DAG's first task: judge the run's window of recorded traffic and leave the run's note."""
    from ml import monitor

    ti = context.get("ti")

    def already_started(run_id: str) -> bool:
        return ti is not None and ti.get_dr_count(dag_id=monitor.PIPELINE_DAG, run_ids=[run_id]) > 0

    try:
        settings, run = resolve(context)
        dag_run = context.get("dag_run")
        moment = getattr(dag_run, "run_after", None) or context.get("logical_date")
        window_end = run.params.get("window_end") or monitor.announced_window_end(
            context.get("triggering_asset_events") or {}
        )
        window = monitor.window_of_run(settings, window_end, moment or datetime.now(UTC))
        result = monitor.judge_window(settings, run, window, already_started)
    except PERMANENT_ERRORS as error:
        _fail_without_retry("judge_window", error)
    log.info("run note: %s", result.note)
    if ti is not None:
        ti.xcom_push(key=run_note.RUN_NOTE_KEY, value=result.note)
    return result.to_xcom()
