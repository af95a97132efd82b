"""The pipeline's steps, as in the lesson: extract, transform, train, validate, deploy, then archive or roll back.

Each step is a plain function of the settings, the run and the typed results of the steps it needs, and returns its
own typed result (``ml.results``). Nothing here knows Airflow (``ml.tasks`` is the boundary); logging to MLflow lives
in ``ml.tracking``, checking a deployment in ``ml.deployment`` and every change of the registry in ``ml.registry``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from ml import data, deployment, drift, evaluation, registry, selection, tags, tracking
from ml.context import RunContext
from ml.results import (
    NO_NEW_DATA,
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

if TYPE_CHECKING:
    from ml import training

log = logging.getLogger(__name__)


def check_configuration(settings: Settings) -> None:
    """Fail fast, before any data is read or model trained, on settings the later steps would trip over."""
    from ml.training import candidates_of

    settings.validate()
    candidates_of(settings)
    try:
        data.source_kind(settings.data_source)
    except data.DataSourceError as error:
        raise ConfigurationError(str(error)) from error
    if settings.tracking_uri.startswith(("http://", "https://")):
        deployment.probe_tracking_server(settings.tracking_uri)
    registry.ensure_registered_model(registry.client_for(settings), settings.model_name)


def extract(settings: Settings, run: RunContext) -> ExtractResult:
    """Read the data source and write a content-addressed snapshot; note whether Production was trained on it."""
    check_configuration(settings)
    # Before anything else, no-op runs included: an interrupted deploy or a hand in the registry is undone here.
    repair = registry.repair_production(settings, actor=run.actor)
    source = data.describe_source(settings.data_source, settings.data_query)
    log.info("extracting data from %s", source)
    frame = data.load_source(settings.data_source, settings.data_query, settings.label_column)
    snapshot = data.write_snapshot(frame, settings.data_store)
    log.info("extracted %d rows x %d columns; snapshot %s", snapshot.rows, len(snapshot.columns), snapshot.uri)
    trained_on_it = _production_trained_on(settings, snapshot.digest)
    return ExtractResult(
        records=snapshot.rows,
        source=source,
        snapshot_uri=snapshot.uri,
        digest=snapshot.digest,
        columns=snapshot.columns,
        repaired=list(repair.actions),
        trained_on_same_data=trained_on_it,
        skip=Skip(NO_NEW_DATA, trained_on_it) if trained_on_it is not None and not settings.force_retrain else None,
    )


def _production_trained_on(settings: Settings, digest: str) -> int | None:
    """The Production version, if it was trained on this very data; if so (and not forced) the run is a no-op."""
    client = registry.client_for(settings)
    champion = registry.production_version(client, settings.model_name, settings.production_alias)
    if champion is None:
        log.info("no Production version yet: training on this data (digest %s)", digest[:12])
        return None
    if champion.tags.get(tags.DATA_DIGEST) != digest:
        log.info(
            "new data: digest %s; Production version %s was trained on %s",
            digest[:12],
            champion.version,
            (champion.tags.get(tags.DATA_DIGEST) or "data of unknown digest")[:12],
        )
        return None
    # The same data with another label column is another model: transform_data checks the label, train_model trains.
    champion_label = client.get_run(champion.run_id).data.params.get("label_column") if champion.run_id else None
    if champion_label is not None and champion_label != settings.label_column:
        log.info(
            "Production version %s was trained on this data to predict %r; this run predicts %r",
            champion.version,
            champion_label,
            settings.label_column,
        )
        return None
    if settings.force_retrain:
        log.info("Production version %s was trained on this data; retraining anyway (force_retrain)", champion.version)
    else:
        log.info(
            "Production version %s was trained on this data (digest %s): %s", champion.version, digest, NO_NEW_DATA
        )
    return champion.version


def _nothing_to_do(skip: Skip) -> Skip:
    log.info("nothing to do: %s", skip.reason)
    return skip


def transform(settings: Settings, run: RunContext, extracted: ExtractResult) -> TransformResult:
    """Validate the snapshot and write a stratified, seeded train/test split."""
    if extracted.skip:
        features = [c for c in extracted.columns if c != settings.label_column]
        return TransformResult(
            feature_names=features,
            label_column=settings.label_column,
            digest=extracted.digest,
            snapshot_uri=extracted.snapshot_uri,
            skip=_nothing_to_do(extracted.skip),
        )
    frame = data.read_frame(extracted.snapshot_uri)
    features = data.validate_frame(
        frame,
        label=settings.label_column,
        source=extracted.source,
        min_rows=settings.min_rows,
        min_rows_per_class=settings.min_rows_per_class,
        expected_features=production_features(settings) if settings.enforce_production_schema else None,
    )
    split = data.split_frame(
        frame,
        label=settings.label_column,
        features=features,
        test_size=settings.test_size,
        seed=settings.random_seed,
        data_store=settings.data_store,
        run_folder=data.run_folder_name(run.run_key),
    )
    log.info(
        "split %d rows: %d train, %d test, %d features", len(frame), split.train_rows, split.test_rows, len(features)
    )
    parent = tracking.parent_run(tracking.connect(settings), run, settings, extracted.digest)
    return TransformResult(
        feature_names=split.features,
        label_column=split.label,
        digest=extracted.digest,
        snapshot_uri=extracted.snapshot_uri,
        classes=split.classes,
        train_uri=split.train_uri,
        test_uri=split.test_uri,
        train_rows=split.train_rows,
        test_rows=split.test_rows,
        parent_run_id=parent,
    )


def production_features(settings: Settings) -> list[str] | None:
    """The input columns of the Production model's signature, or None when there is no Production model."""
    client = registry.client_for(settings)
    champion = registry.production_version(client, settings.model_name, settings.production_alias)
    if champion is None:
        return None
    return tracking.input_names(tracking.connect(settings), registry.load_uri(settings.model_name, champion))


def train_candidate(
    settings: Settings, run: RunContext, split: TransformResult, candidate: training.Candidate
) -> CandidateResult:
    """Fit one candidate and log it, its parameters and its scores as a child of the run's parent MLflow run.

    When the run has several candidates it is fitted on the training rows less a seeded selection split, and scored
    on that split; alone, it is fitted on every training row, as there is nothing to choose.
    """
    from ml import training

    several = len(settings.candidates) > 1
    mlflow = tracking.connect(settings)
    earlier = tracking.finished_candidate_run(mlflow, settings.experiment_name, split.parent_run_id, candidate.index)
    if earlier is not None:
        log.info("candidate %s was trained by an earlier try: run %s", candidate.name, earlier.info.run_id)
        return _candidate_result(candidate, earlier)
    train_frame = data.read_frame(split.train_uri)
    features, label = split.feature_names, split.label_column
    fit_rows, ranking_rows = (
        training.selection_split(train_frame, label, settings.test_size, settings.random_seed)
        if several
        else (train_frame, None)
    )
    pipeline = training.build_pipeline(candidate.model_family, candidate.hyperparameters, settings.random_seed)
    lineage = {
        **run.lineage_tags(),
        tags.DATA_DIGEST: split.digest,
        tags.RANDOM_SEED: str(settings.random_seed),
        tags.MODEL_FAMILY: candidate.model_family,
        tags.RUN_ROLE: "candidate",
        tags.CANDIDATE_INDEX: str(candidate.index),
    }
    with mlflow.start_run(
        run_name=f"{candidate.name} · {run.run_id}",
        parent_run_id=split.parent_run_id,
        nested=True,
        tags=lineage,
        description=tracking.run_description(run, settings, split.digest, candidate.model_family),
    ) as active:
        mlflow.log_params(
            {
                **settings.run_parameters(),
                "model_family": candidate.model_family,
                **{f"model.{k}": v for k, v in candidate.hyperparameters.items()},
                "train_rows": len(fit_rows),
                "selection_rows": len(ranking_rows) if ranking_rows is not None else 0,
                "test_rows": split.test_rows,
                "features": len(features),
            }
        )
        tracking.log_datasets(
            mlflow, train_frame, train_frame, train_uri=split.train_uri, test_uri=split.test_uri, digest=split.digest
        )
        log.info("fitting candidate %s on %d rows", candidate.name, len(fit_rows))
        try:
            with tracking.model_logging_imported_meanwhile():
                pipeline.fit(fit_rows[features], fit_rows[label])
        except (ValueError, TypeError) as error:
            # The estimator refused this combination of settings only when fitting: another try would too.
            raise ConfigurationError(
                f"candidate {candidate.name} {candidate.hyperparameters} failed to fit: {error}"
            ) from error
        scored = evaluation.training_score_sample(fit_rows, settings.random_seed)
        train_metrics = evaluation.score(pipeline.predict(scored[features]), scored[label])
        mlflow.log_metrics({f"train_{k}": v for k, v in train_metrics.items()})
        scores: dict[str, float] = {}
        if ranking_rows is not None:
            _, scores = evaluation.full_scores(pipeline, ranking_rows[features], ranking_rows[label])
            mlflow.log_metrics({f"selection_{k}": v for k, v in scores.items()})
        model_uri = tracking.log_model(mlflow, pipeline, fit_rows[features], settings.model_name)
        mlflow.set_tag(tags.CANDIDATE_MODEL_URI, model_uri)
        run_id = active.info.run_id
    log.info("candidate %s trained: %s", candidate.name, scores or "alone, nothing to rank")
    return CandidateResult(
        candidate.index, candidate.model_family, candidate.hyperparameters, run_id, model_uri, scores
    )


def _candidate_result(candidate: training.Candidate, logged: Any) -> CandidateResult:
    scores = {
        key.removeprefix("selection_"): value
        for key, value in logged.data.metrics.items()
        if key.startswith("selection_")
    }
    return CandidateResult(
        candidate.index,
        candidate.model_family,
        candidate.hyperparameters,
        logged.info.run_id,
        logged.data.tags[tags.CANDIDATE_MODEL_URI],
        scores,
    )


def _train_each_here(
    settings: Settings, run: RunContext, split: TransformResult, planned: list[training.Candidate]
) -> list[CandidateResult]:
    """Every candidate in turn, in this process: what the mapped train_candidate tasks do in a DAG run."""
    trained = []
    for candidate in planned:
        try:
            trained.append(train_candidate(settings, run, split, candidate))
        except ConfigurationError as error:
            log.warning("candidate %s failed: %s", candidate.name, error)
    return trained


def train(
    settings: Settings, run: RunContext, split: TransformResult, trained: list[CandidateResult] | None = None
) -> TrainResult:
    """Choose the best trained candidate, score it on the held-out set and register it as a new version (once per
    DAG run). ``trained`` are the train_candidate tasks' results; None trains every candidate here first."""
    if split.skip:
        return TrainResult(model_name=settings.model_name, skip=_nothing_to_do(split.skip))
    client = registry.client_for(settings)
    registry.ensure_registered_model(client, settings.model_name)
    existing = registry.find_version_for_run_key(client, settings.model_name, run.run_key)
    if existing is not None:
        log.info(
            "version %s was already registered for %s; a retry registers nothing new", existing.version, run.run_key
        )
        metrics = client.get_run(existing.run_id).data.metrics if existing.run_id else {}
        return TrainResult(
            model_name=settings.model_name,
            model_version=existing.version,
            accuracy=float(metrics.get("accuracy", 0.0)),
            run_id=existing.run_id or "",
            model_family=existing.tags.get(tags.MODEL_FAMILY, settings.model_family),
            drift=drift.fields_from_tags(existing.tags, settings.drift_threshold),
            parent_run_id=split.parent_run_id,
            candidates=json.loads(existing.tags.get(tags.CANDIDATES) or "[]"),
            selection=existing.tags.get(tags.CANDIDATES_SELECTION, ""),
            selection_metric=existing.tags.get(tags.CANDIDATES_METRIC, ""),
        )
    from ml import training

    planned = training.candidates_of(settings)
    parent = split.parent_run_id or tracking.parent_run(tracking.connect(settings), run, settings, split.digest)
    split = replace(split, parent_run_id=parent)
    if trained is None:
        trained = _train_each_here(settings, run, split, planned)
    mlflow = tracking.connect(settings)
    try:
        chosen, why = selection.choose(trained, settings.selection_metric, len(planned))
    except selection.NoCandidateTrainedError:
        client.set_terminated(parent, "FAILED")
        raise
    rows = selection.summary([c.to_xcom() for c in planned], trained, chosen)
    log.info("chose candidate %s: %s", chosen.name, why)

    train_frame = data.read_frame(split.train_uri)
    test_frame = data.read_frame(split.test_uri)
    features, label = split.feature_names, split.label_column
    model = tracking.load_fitted_model(mlflow, chosen.model_uri)
    predictions, metrics = evaluation.full_scores(model, test_frame[features], test_frame[label])
    drift_report, drift_reference = _drift_against_production(settings, client, train_frame, test_frame)
    drift_tags = drift.version_tags(drift_report, settings.drift_threshold, drift_reference)
    # The chosen candidate's run becomes the version's: its held-out scores, plots and drift report go there.
    with mlflow.start_run(run_id=chosen.run_id):
        mlflow.log_metrics(metrics)
        title = f"{chosen.model_family}: held-out set"
        figures = {
            "evaluation/confusion_matrix.png": evaluation.confusion_matrix_figure(
                predictions, test_frame[label], title, data.class_names(settings.data_source)
            ),
            **evaluation.curve_figures(model, test_frame[features], test_frame[label], title),
        }
        for artifact_file, figure in figures.items():
            tracking.log_figure(mlflow, figure, artifact_file)
        if drift_report is not None:
            drift.log_report(mlflow, drift_report, settings.drift_threshold, drift_reference)
        mlflow.set_tags(drift_tags)
    lineage = {
        **run.lineage_tags(),
        tags.DATA_DIGEST: split.digest,
        tags.DATA_SNAPSHOT_URI: split.snapshot_uri,
        tags.RANDOM_SEED: str(settings.random_seed),
        tags.MODEL_FAMILY: chosen.model_family,
        tags.DATA_TRAIN_SPLIT_URI: split.train_uri,
    }
    started = datetime.now(UTC)
    chosen_tags = {**lineage, **drift_tags}
    if len(planned) > 1:
        chosen_tags |= {
            tags.CANDIDATES: json.dumps(rows, separators=(",", ":")),
            tags.CANDIDATES_SELECTION: why,
            tags.CANDIDATES_METRIC: settings.selection_metric,
        }
    with mlflow.start_run(run_id=parent):
        mlflow.log_params({**settings.run_parameters(), "candidates": len(planned), "chosen": chosen.name})
        mlflow.log_metrics({f"chosen_{k}": v for k, v in metrics.items()})
        mlflow.set_tags(chosen_tags)
        version = registry.register_version(settings, chosen.model_uri, chosen_tags)
        described = tracking.run_description(run, settings, split.digest)
        if len(planned) > 1:
            described += "\n\n" + selection.explained(rows, why, settings.selection_metric)
        mlflow.set_tag(tracking.NOTE_TAG, described)
        named = f"{len(planned)} candidates" if len(planned) > 1 else chosen.model_family
        mlflow.set_tag(tracking.RUN_NAME_TAG, tracking.run_name(named, started, version))
    client.set_tag(chosen.run_id, tracking.RUN_NAME_TAG, tracking.run_name(chosen.name, started, version))
    log.info("version %s (%s) scores %.4f on the held-out set", version, chosen.name, metrics["accuracy"])
    return TrainResult(
        model_name=settings.model_name,
        model_version=version,
        accuracy=float(metrics["accuracy"]),
        run_id=chosen.run_id,
        model_family=chosen.model_family,
        drift=drift.result_fields(drift_report, settings.drift_threshold, drift_reference),
        parent_run_id=parent,
        candidates=rows if len(planned) > 1 else [],
        selection=why,
        selection_metric=settings.selection_metric,
    )


def _drift_against_production(
    settings: Settings, client: Any, train_frame: Any, test_frame: Any
) -> tuple[drift.DriftReport | None, int | None]:
    """Compare this run's data with the snapshot the Production version was trained on (none: nothing to compare).

    This run's side is a sample of the train and test sets already in memory, which together hold the snapshot's
    rows: reading the snapshot again would cost a full read for a bounded sample.
    """
    champion = registry.production_version(client, settings.model_name, settings.production_alias)
    reference_uri = champion.tags.get(tags.DATA_SNAPSHOT_URI) if champion else None
    if champion is None or not reference_uri:
        log.info("no Production version with a data snapshot to measure drift against")
        return None, None
    try:
        reference = data.read_frame(reference_uri)
    except data.DataSourceError as error:
        log.warning("cannot measure drift against Production version %s: %s", champion.version, error)
        return None, None
    report = drift.compare(
        reference,
        drift.sample_of_parts([train_frame, test_frame]),
        label=settings.label_column,
        current_rows=len(train_frame) + len(test_frame),
    )
    log.info(
        "drift against Production version %s: largest PSI %.4f (%s), smallest KS p-value %.3g",
        champion.version,
        report.max_psi,
        report.max_psi_feature,
        report.min_ks_pvalue,
    )
    return report, champion.version


def validate(settings: Settings, run: RunContext, trained: TrainResult, split: TransformResult) -> ValidateResult:
    """Score the version and the Production version on the held-out set; record the verdict on the version."""
    if trained.skip:
        skip = _nothing_to_do(trained.skip)
        return ValidateResult(
            model_name=settings.model_name,
            model_version=None,
            passed=False,
            accuracy=None,
            reasons=[NO_NEW_DATA],
            skip=skip,
        )
    assert trained.model_version is not None, "a trained result names its version"
    import numpy as np

    mlflow = tracking.connect(settings)
    client = registry.client_for(settings)
    name, version = settings.model_name, trained.model_version
    registered = registry.get_version(client, name, version)
    champion = registry.production_version(client, name, settings.production_alias)
    stale = _no_longer_promotable(registered, champion)
    if stale is not None:
        # Its earlier verdict stays on the version: `mlops rollback --to` may still put it back deliberately.
        log.warning("version %s is not validated again: %s", version, stale)
        return ValidateResult(
            model_name=name,
            model_version=version,
            passed=False,
            accuracy=None,
            reasons=[stale],
            threshold=settings.accuracy_threshold,
            champion_version=champion.version if champion else None,
            run_id=trained.run_id,
        )
    test_frame = data.read_frame(split.test_uri)
    features, label = split.feature_names, split.label_column
    candidate = tracking.load_model(mlflow, registry.load_uri(name, registered))
    predictions = np.asarray(candidate.predict(test_frame[features]))
    accuracy = evaluation.score(predictions, test_frame[label])["accuracy"]

    champion_accuracy = comparison = compared_accuracy = None
    if champion is not None and champion.version != version and settings.compare_with_champion:
        comparison = _comparison_rows(settings, client, champion, split, test_frame, features, label)
        compared = test_frame[comparison.used]
        champion_accuracy = _score_champion(mlflow, name, champion, compared, features, label)
        compared_accuracy = evaluation.score(predictions[comparison.used], compared[label])["accuracy"]
    if champion_accuracy is None:
        # Production could not score these rows: no comparison was made, so none is recorded.
        comparison = compared_accuracy = None
    verdict = evaluation.judge(
        accuracy,
        threshold=settings.accuracy_threshold,
        champion_accuracy=champion_accuracy,
        champion_version=champion.version if champion else None,
        tolerance=settings.champion_tolerance,
        compare_with_champion=settings.compare_with_champion,
        drift=trained.drift_max_psi,
        drift_threshold=settings.drift_threshold,
        drift_margin=settings.drift_margin,
        compared_accuracy=compared_accuracy,
        compared_rows=comparison.rows if comparison else None,
    )
    result = ValidateResult(
        model_name=name,
        model_version=version,
        passed=verdict.passed,
        accuracy=accuracy,
        reasons=verdict.reasons,
        threshold=settings.accuracy_threshold,
        champion_version=champion.version if champion else None,
        champion_accuracy=champion_accuracy,
        run_id=trained.run_id,
        drift=trained.drift,
        drift_margin_required=settings.drift_margin if trained.drift.get("drift_high") else None,
        comparison_rows=comparison.rows if comparison else None,
        comparison_excluded_rows=comparison.excluded if comparison else None,
        comparison_accuracy=compared_accuracy,
        comparison_note=comparison.note if comparison else None,
    )
    registry.set_version_tags(
        client,
        name,
        version,
        {
            tags.VALIDATION_STATUS: result.status,
            tags.VALIDATION_ACCURACY: accuracy,
            tags.VALIDATION_THRESHOLD: settings.accuracy_threshold,
            tags.VALIDATION_CHAMPION_VERSION: champion.version if champion else "none",
            tags.VALIDATION_CHAMPION_ACCURACY: champion_accuracy if champion_accuracy is not None else "none",
            tags.VALIDATION_COMPARISON_ROWS: comparison.rows if comparison else "none",
            tags.VALIDATION_COMPARISON_EXCLUDED_ROWS: comparison.excluded if comparison else "none",
            tags.VALIDATION_COMPARISON_ACCURACY: compared_accuracy if compared_accuracy is not None else "none",
            tags.VALIDATION_COMPARISON_NOTE: comparison.note if comparison else "none",
            tags.VALIDATION_REASONS: "; ".join(verdict.reasons) or "all checks passed",
            tags.VALIDATION_VALIDATED_AT: registry.utc_now(),
        },
    )
    metrics = {"validation_accuracy": accuracy}
    if champion_accuracy is not None and compared_accuracy is not None:
        metrics["champion_accuracy"] = champion_accuracy
        metrics["comparison_accuracy"] = compared_accuracy
    if trained.run_id:
        tracking.log_metrics_to_run(client, trained.run_id, metrics)
    if verdict.passed:
        log.info("version %s passed validation: accuracy %.4f >= %.4f", version, accuracy, settings.accuracy_threshold)
    else:
        log.warning("version %s failed validation: %s", version, "; ".join(verdict.reasons))
    return result


def _no_longer_promotable(registered: registry.VersionInfo, champion: registry.VersionInfo | None) -> str | None:
    """Why the pipeline may not put this version in Production: an old run's tasks, cleared and run again, would
    otherwise promote the version that run registered long ago, over newer ones or after an operator took it out."""
    left = registered.tags.get(tags.DEPLOYMENT_STATUS)
    if left in {"archived", "demoted", "rolled_back"}:
        return (
            f"version {registered.version} was in Production and left it ({left}); the pipeline does not promote it "
            f"again (`mlops rollback --to {registered.version}` does)"
        )
    if champion is not None and registered.version < champion.version:
        return (
            f"version {registered.version} is older than Production version {champion.version}; the pipeline only "
            f"promotes newer versions (`mlops rollback --to {registered.version}` puts an older one back)"
        )
    return None


def _comparison_rows(
    settings: Settings,
    client: Any,
    champion: registry.VersionInfo,
    split: TransformResult,
    test_frame: Any,
    features: list[str],
    label: str,
) -> evaluation.ComparisonRows:
    """The held-out rows to compare the candidate and Production on: those Production did not train on.

    A version registered before its training split was recorded, or whose split is gone, is compared as it always was,
    on the whole held-out set.
    """
    train_uri = champion.tags.get(tags.DATA_TRAIN_SPLIT_URI)
    if train_uri and _split_as_production_was(settings, client, champion, split):
        # Production trained on this very split (a forced retrain, say): its held-out rows were held out from it too,
        # and reading its training split to say so would cost a full read on large data.
        comparison = evaluation.held_out_by_both(len(test_frame), champion.version)
    elif not train_uri:
        comparison = evaluation.whole_held_out(
            len(test_frame),
            f"Production version {champion.version} has no record of its training split (it was registered before "
            "splits were recorded), so rows it trained on may be among them",
        )
    else:
        try:
            trained_on = data.read_frame(train_uri)
        except data.DataSourceError as error:
            comparison = evaluation.whole_held_out(
                len(test_frame), f"the training split of Production version {champion.version} cannot be read: {error}"
            )
        else:
            comparison = evaluation.rows_unseen_by_champion(
                test_frame,
                trained_on,
                columns=[*features, label],
                label=label,
                min_rows_per_class=settings.min_rows_per_class,
                champion_version=champion.version,
            )
    if comparison.independent:
        log.info("comparing with Production version %s on %s", champion.version, comparison.note)
    else:
        log.warning("comparing with Production version %s on %s", champion.version, comparison.note)
    return comparison


def _split_as_production_was(
    settings: Settings, client: Any, champion: registry.VersionInfo, split: TransformResult
) -> bool:
    """Whether this run's split is the one Production trained on: the split is seeded, so the same snapshot split
    with the same seed, held-out share and label gives the same rows."""
    if champion.tags.get(tags.DATA_DIGEST) != split.digest or not champion.run_id:
        return False
    logged = client.get_run(champion.run_id).data.params
    return all(
        logged.get(name) == str(getattr(settings, name)) for name in ("random_seed", "test_size", "label_column")
    )


def _score_champion(
    mlflow: Any, name: str, champion: registry.VersionInfo, test_frame: Any, features: list[str], label: str
) -> float | None:
    version = champion.version
    try:
        champion_model = tracking.load_model(mlflow, registry.load_uri(name, champion))
        predictions = champion_model.predict(test_frame[features])
    except Exception as error:
        log.warning(
            "Production version %s cannot score this held-out set (%s); comparing on threshold only", version, error
        )
        return None
    return evaluation.score(predictions, test_frame[label])["accuracy"]


def deploy(
    settings: Settings,
    run: RunContext,
    validated: ValidateResult,
    split: TransformResult,
    approval: ApprovalResult | None = None,
) -> DeployResult:
    """Promote a passing version to Production (stage and alias), then check that it serves as validated.

    With ``approval_required``, only a version a person approved (``approval``, approve_deployment's answer) is
    promoted; a rejection, or no answer in time, is recorded on the version and in the deployment history.
    """
    name = settings.model_name
    if validated.skip:
        production = validated.skip.production_version
        return DeployResult(
            deployed=False,
            model_name=name,
            model_version=None,
            previous_version=production,
            promoted=False,
            health_check="not_run",
            reason=f"{NO_NEW_DATA}: Production version {production} was trained on the same data",
            skip=_nothing_to_do(validated.skip),
        )
    assert validated.model_version is not None, "a verdict names its version"
    client = registry.client_for(settings)
    version = validated.model_version
    current = registry.production_version(client, name, settings.production_alias)
    previous = current.version if current else None

    def not_deployed(reason: str, *, promoted: bool = False, health_check: str = "not_run") -> DeployResult:
        return DeployResult(False, name, version, previous, promoted, health_check, reason)

    if not validated.passed:
        reason = "validation failed: " + ("; ".join(validated.reasons) or "unknown")
        log.warning("not deploying version %s (accuracy %s): %s", version, validated.accuracy, reason)
        if validated.accuracy is not None:
            # A version not scored again (one that left Production, or older than it) keeps its record as it was.
            _record_refusal(client, name, version, "rejected", reason)
        return not_deployed(reason)
    assert validated.accuracy is not None, "a passed verdict has its accuracy"
    reason = f"passed validation with accuracy {validated.accuracy:.4f}"
    already_promoted = current if current is not None and current.version == version else None
    approved_by = ""
    if settings.approval_required and already_promoted is None:
        if approval is None or not approval.approved:
            refusal = (
                approval.describe() if approval else "not approved: no answer to the approval request was recorded"
            )
            log.warning("not deploying version %s: %s", version, refusal)
            _record_refusal(client, name, version, "not_approved", refusal)
            registry.record_approval_refusal(client, name, version, previous, actor=run.actor, reason=refusal)
            return not_deployed(refusal)
        approved_by = approval.describe()
        reason = f"{reason}; {approved_by}"
    if already_promoted is not None:
        previous = _int_or_none(already_promoted.tags.get(tags.DEPLOYMENT_REPLACED_VERSION))
        log.info("version %s was already promoted by an earlier try of this run", version)
    else:
        try:
            registry.promote(
                settings, version, expected_current=validated.champion_version, actor=run.actor, reason=reason
            )
        except registry.ProductionMovedError as error:
            log.warning("not deploying version %s: %s", version, error)
            _record_refusal(client, name, version, "superseded", str(error))
            return not_deployed(str(error))
    problems = deployment.check_deployment(settings, version, split, validated.accuracy)
    # Recorded at once: a version promoted without a passed check is rolled back by the next run's repair.
    outcome = "failed" if problems else ("passed" if settings.post_deploy_check else "skipped")
    registry.set_version_tags(client, name, version, {tags.DEPLOYMENT_HEALTH_CHECK: outcome})
    if problems:
        log.error("post-deploy check of version %s failed: %s", version, "; ".join(problems))
        return not_deployed("post-deploy check failed: " + "; ".join(problems), promoted=True, health_check="failed")
    log.info("version %s is Production and serves as validated", version)
    return DeployResult(True, name, version, previous, True, outcome, reason, approval=approved_by)


def _record_refusal(client: Any, name: str, version: int, status: str, reason: str) -> None:
    registry.set_version_tags(client, name, version, {tags.DEPLOYMENT_STATUS: status, tags.DEPLOYMENT_REASON: reason})


def archive(settings: Settings, run: RunContext, deployed: DeployResult) -> ArchiveResult:
    """Write the deployment record onto the deployed version as tags."""
    if deployed.skip:
        return ArchiveResult(archived=False, model_version=None, skip=_nothing_to_do(deployed.skip))
    if not deployed.deployed or deployed.model_version is None:
        log.info("version %s was not deployed; nothing to archive", deployed.model_version)
        return ArchiveResult(archived=False, model_version=deployed.model_version)
    client = registry.client_for(settings)
    name, version = settings.model_name, deployed.model_version
    info = registry.get_version(client, name, version)
    record = {
        tags.DEPLOYMENT_DEPLOYED_AT: registry.utc_now(),
        tags.DEPLOYMENT_AIRFLOW_DAG_ID: run.dag_id,
        tags.DEPLOYMENT_AIRFLOW_RUN_ID: run.run_id,
        tags.DEPLOYMENT_ACCURACY: info.tags.get(tags.VALIDATION_ACCURACY, ""),
        tags.DEPLOYMENT_DATA_DIGEST: info.tags.get(tags.DATA_DIGEST, ""),
        tags.DEPLOYMENT_REPLACED_VERSION: deployed.previous_version or "none",
        tags.DEPLOYMENT_HEALTH_CHECK: deployed.health_check,
    }
    registry.set_version_tags(client, name, version, record)
    log.info("recorded the deployment of %s version %s", name, version)
    return ArchiveResult(archived=True, model_version=version, record=record)


def rollback(settings: Settings, run: RunContext, deployed: DeployResult | None) -> RollbackResult:
    """Restore the prior Production unless this run ended with a healthy new Production version.

    ``deployed`` is ``None`` when deploy_model failed or never ran; the registry then says what this run did.
    """
    client = registry.client_for(settings)
    name, alias = settings.model_name, settings.production_alias
    current = registry.production_version(client, name, alias)
    current_number = current.version if current else None
    if deployed is not None and deployed.skip:
        return RollbackResult(False, current_number, NO_NEW_DATA, skip=_nothing_to_do(deployed.skip))
    if deployed is not None and deployed.deployed:
        log.info("version %s deployed and healthy; no rollback needed", deployed.model_version)
        return RollbackResult(False, current_number, "deployment healthy")
    candidate = _candidate_of_run(client, name, run, deployed)
    why = (deployed.reason if deployed else "") or "deploy_model did not complete"
    if candidate is None or current_number != candidate:
        reason = (
            "this run registered no version" if candidate is None else f"version {candidate} never became Production"
        )
        log.info("no rollback needed: %s; Production stays %s", reason, current_number)
        registry.repair_production(settings, actor=run.actor)
        if candidate is not None:
            registry.mark_rolled_back_if_demoted(settings, candidate, f"left Production before this run ended: {why}")
        return RollbackResult(False, current_number, reason)
    if deployed is not None:
        previous = deployed.previous_version
    else:
        previous = registry.previous_production_version(client, name, candidate)
    log.warning("rolling back %s version %s to %s: %s", name, candidate, previous, why)
    after = registry.restore(settings, failed_version=candidate, restore_to=previous, actor=run.actor, reason=why)
    return RollbackResult(True, after, why, restored_version=previous, rolled_back_version=candidate)


def _candidate_of_run(client: Any, name: str, run: RunContext, deployed: DeployResult | None) -> int | None:
    if deployed is not None and deployed.model_version is not None:
        return deployed.model_version
    found = registry.find_version_for_run_key(client, name, run.run_key)
    return found.version if found else None


def _int_or_none(value: str | None) -> int | None:
    return int(value) if value and value.isdigit() else None


def manual_rollback(settings: Settings, run: RunContext) -> ManualRollbackResult:
    """The mlops_rollback DAG's one step: put a chosen version back in Production."""
    target = str(run.params.get("target_version") or "previous")
    reason = str(run.params.get("reason") or "manual rollback from the Airflow UI")
    replaced, restored = registry.manual_rollback(settings, target, actor=run.actor, reason=reason)
    return ManualRollbackResult(replaced_version=replaced, production_version=restored, reason=reason)
