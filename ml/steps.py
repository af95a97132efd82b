"""The seven pipeline steps as plain functions taking and returning the contract's dicts.

Each step has a typed core (``extract``, ``transform``, ...) that tests call directly, and a thin entry point named
after its Airflow task that reads the run context and settings from an Airflow context mapping. The seed's keys
(``data_extracted``, ``records``, ``features``, ...) are kept in every returned dict; real fields sit beside them.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Mapping
from typing import Any

from ml import data, drift, evaluation, registry
from ml.context import RunContext
from ml.settings import ConfigurationError, Settings

PERMANENT_ERRORS = (ConfigurationError, data.DataValidationError, registry.RegistryError)

log = logging.getLogger(__name__)

# MLflow saves scikit-learn models with skops, which refuses to load types it was not told to trust;
# the imputer keeps the dtype it was fitted on.
SKOPS_TRUSTED_TYPES = ["numpy.dtype"]


def resolve(context: Mapping[str, Any]) -> tuple[Settings, RunContext]:
    run = RunContext.from_airflow(context)
    return Settings.from_env().for_run(run.params, run.declared_params), run


def extract_data(context: Mapping[str, Any]) -> dict[str, Any]:
    return run_step("extract_data", context, extract)


def transform_data(extract_result: Mapping[str, Any], context: Mapping[str, Any]) -> dict[str, Any]:
    return run_step("transform_data", context, transform, extract_result)


def train_model(transform_result: Mapping[str, Any], context: Mapping[str, Any]) -> dict[str, Any]:
    return run_step("train_model", context, train, transform_result)


def validate_model(train_result: Mapping[str, Any], context: Mapping[str, Any]) -> dict[str, Any]:
    return run_step("validate_model", context, validate, train_result)


def deploy_model(validation_result: Mapping[str, Any], context: Mapping[str, Any]) -> dict[str, Any]:
    return run_step("deploy_model", context, deploy, validation_result)


def archive_model(deploy_result: Mapping[str, Any], context: Mapping[str, Any]) -> dict[str, Any]:
    return run_step("archive_model", context, archive, deploy_result)


def rollback_model(context: Mapping[str, Any]) -> dict[str, Any]:
    ti = context.get("ti")
    deploy_result = ti.xcom_pull(task_ids="deploy_model") if ti is not None else context.get("deploy_result")
    return run_step("rollback_model", context, rollback, deploy_result)


def run_step(
    name: str, context: Mapping[str, Any], core: Callable[..., dict[str, Any]], *upstream: Any
) -> dict[str, Any]:
    """Run one step's core for an Airflow task.

    Errors that a retry cannot cure (bad settings, bad data, a refused registry change) fail the task at once instead
    of waiting out ``retry_delay``; anything else (an unreachable server, say) is left to Airflow's retries.
    """
    try:
        settings, run = resolve(context)
        if settings.step_hook:
            call_hook(settings.step_hook, step=name, run_key=run.run_key, try_number=run.try_number)
        return core(settings, run, *upstream)
    except PERMANENT_ERRORS as error:
        from airflow.sdk.exceptions import AirflowFailException

        log.error("%s failed and will not be retried: %s", name, error)
        raise AirflowFailException(f"{type(error).__name__}: {error}") from error


def call_hook(hook: str, **arguments: Any) -> None:
    """Call ``module:function`` from the settings with keyword arguments (a seam for checks and fault injection)."""
    module_name, _, function_name = hook.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as error:
        raise ConfigurationError(f"hook {hook!r} cannot be imported: {error}") from error
    function(**arguments)


def check_configuration(settings: Settings) -> None:
    """Fail fast, before any data is read or model trained, on settings the later steps would trip over."""
    from ml.training import resolve_hyperparameters

    settings.validate()
    resolve_hyperparameters(settings.model_family, settings.hyperparameters)
    try:
        data.source_kind(settings.data_source)
    except data.DataSourceError as error:
        raise ConfigurationError(str(error)) from error
    if settings.tracking_uri.startswith(("http://", "https://")):
        _probe_tracking_server(settings.tracking_uri)
    registry.ensure_registered_model(registry.client_for(settings), settings.model_name)


def _probe_tracking_server(uri: str) -> None:
    """One quick request, so that an unreachable server is reported at once, not after the client's backoff."""
    import httpx

    try:
        httpx.get(f"{uri.rstrip('/')}/health", timeout=10).raise_for_status()
    except httpx.HTTPError as error:
        raise TrackingServerUnavailable(f"MLflow tracking server {uri} does not answer: {error}") from error


class TrackingServerUnavailable(RuntimeError):
    """The tracking server did not answer; worth a retry, unlike a configuration error."""


def extract(settings: Settings, run: RunContext) -> dict[str, Any]:
    check_configuration(settings)
    source = data.describe_source(settings.data_source, settings.data_query)
    log.info("extracting data from %s", source)
    frame = data.load_source(settings.data_source, settings.data_query, settings.label_column)
    snapshot = data.write_snapshot(frame, settings.data_store)
    log.info("extracted %d rows x %d columns; snapshot %s", snapshot.rows, len(snapshot.columns), snapshot.uri)
    result = {
        "data_extracted": True,
        "records": snapshot.rows,
        "source": source,
        "snapshot_uri": snapshot.uri,
        "digest": snapshot.digest,
        "columns": snapshot.columns,
    }
    return {**result, **_freshness(settings, snapshot.digest)}


NO_NEW_DATA = "no new data"


def _freshness(settings: Settings, digest: str) -> dict[str, Any]:
    """Whether the Production version was trained on this very data; if so (and not forced) the run is a no-op."""
    client = registry.client_for(settings)
    champion = registry.production_version(client, settings.model_name, settings.production_alias)
    unchanged = champion is not None and champion.tags.get("mlops.data.digest") == digest
    if not unchanged:
        return {"unchanged": False}
    if settings.force_retrain:
        log.info("Production version %s was trained on this data; retraining anyway (force_retrain)", champion.version)
        return {"unchanged": True, "production_version": champion.version}
    log.info("Production version %s was trained on this data (digest %s): %s", champion.version, digest, NO_NEW_DATA)
    return {"unchanged": True, "production_version": champion.version, "skipped_reason": NO_NEW_DATA}


def _skipped(upstream: Mapping[str, Any] | None, **contract: Any) -> dict[str, Any] | None:
    """The result of a step that has nothing to do because an earlier one found no new data; None otherwise."""
    if not upstream or not upstream.get("skipped_reason"):
        return None
    log.info("nothing to do: %s", upstream["skipped_reason"])
    return {
        **contract,
        "skipped_reason": upstream["skipped_reason"],
        "production_version": upstream.get("production_version"),
    }


def transform(settings: Settings, run: RunContext, extract_result: Mapping[str, Any]) -> dict[str, Any]:
    columns = extract_result.get("columns") or []
    features = len([c for c in columns if c != settings.label_column])
    if skipped := _skipped(extract_result, data_transformed=False, features=features, digest=extract_result["digest"]):
        return skipped
    if not extract_result.get("data_extracted"):
        raise ValueError("Data extraction failed")
    frame = data.read_frame(extract_result["snapshot_uri"])
    features = data.validate_frame(
        frame,
        label=settings.label_column,
        source=extract_result.get("source", settings.data_source),
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
    return {
        "data_transformed": True,
        "features": len(features),
        "feature_names": split.features,
        "label_column": split.label,
        "classes": split.classes,
        "train_uri": split.train_uri,
        "test_uri": split.test_uri,
        "train_rows": split.train_rows,
        "test_rows": split.test_rows,
        "digest": extract_result["digest"],
        "snapshot_uri": extract_result["snapshot_uri"],
    }


def production_features(settings: Settings) -> list[str] | None:
    """The input columns of the Production model's signature, or None when there is no Production model."""
    client = registry.client_for(settings)
    champion = registry.production_version(client, settings.model_name, settings.production_alias)
    if champion is None:
        return None
    mlflow = _mlflow(settings)
    signature = mlflow.models.get_model_info(f"models:/{settings.model_name}/{champion.version}").signature
    return signature.inputs.input_names() if signature is not None else None


def train(settings: Settings, run: RunContext, transform_result: Mapping[str, Any]) -> dict[str, Any]:
    if skipped := _skipped(
        transform_result, model_trained=False, accuracy=None, model_name=settings.model_name, model_version=None
    ):
        return skipped
    if not transform_result.get("data_transformed"):
        raise ValueError("Data transformation failed")
    from ml import training

    client = registry.client_for(settings)
    registry.ensure_registered_model(client, settings.model_name)
    existing = registry.find_version_for_run_key(client, settings.model_name, run.run_key)
    if existing is not None:
        log.info(
            "version %s was already registered for %s; a retry registers nothing new", existing.version, run.run_key
        )
        metrics = client.get_run(existing.run_id).data.metrics if existing.run_id else {}
        drift_fields = drift.fields_from_tags(existing.tags, settings.drift_threshold)
        accuracy = metrics.get("accuracy", 0.0)
        return _train_result(
            settings, transform_result, existing.version, existing.run_id or "", accuracy, drift_fields
        )
    train_frame = data.read_frame(transform_result["train_uri"])
    test_frame = data.read_frame(transform_result["test_uri"])
    features, label = transform_result["feature_names"], transform_result["label_column"]
    hyperparameters = training.resolve_hyperparameters(settings.model_family, settings.hyperparameters)
    pipeline = training.build_pipeline(settings.model_family, settings.hyperparameters, settings.random_seed)

    drift_report, drift_reference = _drift_against_production(settings, client, transform_result)
    drift_tags = drift.version_tags(drift_report, settings.drift_threshold, drift_reference)
    mlflow = _mlflow(settings)
    lineage = {
        **run.lineage_tags(),
        "mlops.data.digest": transform_result["digest"],
        "mlops.data.snapshot_uri": transform_result["snapshot_uri"],
        "mlops.random_seed": str(settings.random_seed),
        "mlops.model_family": settings.model_family,
    }
    with mlflow.start_run(run_name=f"{run.run_id} try {run.try_number}", tags=lineage) as active:
        mlflow.log_params(
            {
                **settings.run_parameters(),
                **{f"model.{k}": v for k, v in hyperparameters.items()},
                "train_rows": len(train_frame),
                "test_rows": len(test_frame),
                "features": len(features),
            }
        )
        _log_datasets(mlflow, train_frame, test_frame, transform_result, label)
        log.info("fitting %s on %d rows", settings.model_family, len(train_frame))
        pipeline.fit(train_frame[features], train_frame[label])
        predictions = pipeline.predict(test_frame[features])
        metrics = evaluation.score(predictions, test_frame[label])
        train_metrics = evaluation.score(pipeline.predict(train_frame[features]), train_frame[label])
        mlflow.log_metrics({**metrics, **{f"train_{k}": v for k, v in train_metrics.items()}})
        figure = evaluation.confusion_matrix_figure(
            predictions, test_frame[label], f"{settings.model_family}: held-out set"
        )
        mlflow.log_figure(figure, "evaluation/confusion_matrix.png")
        _close(figure)
        if drift_report is not None:
            drift.log_report(mlflow, drift_report, settings.drift_threshold, drift_reference)
        mlflow.set_tags(drift_tags)
        model_uri = _log_model(mlflow, pipeline, train_frame[features])
        log.info("logged model %s; registering as %s", model_uri, settings.model_name)
        version = mlflow.register_model(model_uri, settings.model_name, tags={**lineage, **drift_tags})
        run_id = active.info.run_id
    log.info("registered %s version %s with accuracy %.4f", settings.model_name, version.version, metrics["accuracy"])
    drift_fields = drift.result_fields(drift_report, settings.drift_threshold, drift_reference)
    return _train_result(settings, transform_result, int(version.version), run_id, metrics["accuracy"], drift_fields)


def _drift_against_production(
    settings: Settings, client: Any, transform_result: Mapping[str, Any]
) -> tuple[drift.DriftReport | None, int | None]:
    """Compare this run's data with the snapshot the Production version was trained on (none: nothing to compare)."""
    champion = registry.production_version(client, settings.model_name, settings.production_alias)
    reference_uri = champion.tags.get("mlops.data.snapshot_uri") if champion else None
    if champion is None or not reference_uri:
        log.info("no Production version with a data snapshot to measure drift against")
        return None, None
    try:
        reference = data.read_frame(reference_uri)
    except data.DataSourceError as error:
        log.warning("cannot measure drift against Production version %s: %s", champion.version, error)
        return None, None
    report = drift.compare(reference, data.read_frame(transform_result["snapshot_uri"]), label=settings.label_column)
    log.info(
        "drift against Production version %s: largest PSI %.4f (%s), smallest KS p-value %.3g",
        champion.version,
        report.max_psi,
        report.max_psi_feature,
        report.min_ks_pvalue,
    )
    return report, champion.version


def _train_result(
    settings: Settings,
    transform_result: Mapping[str, Any],
    version: int,
    run_id: str,
    accuracy: float,
    drift_fields: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "model_trained": True,
        "accuracy": float(accuracy),
        "run_id": run_id,
        "model_name": settings.model_name,
        "model_version": version,
        "model_uri": f"models:/{settings.model_name}/{version}",
        "model_family": settings.model_family,
        "test_uri": transform_result["test_uri"],
        "label_column": transform_result["label_column"],
        "feature_names": transform_result["feature_names"],
        "digest": transform_result["digest"],
        **(drift_fields or {}),
    }


def validate(settings: Settings, run: RunContext, train_result: Mapping[str, Any]) -> dict[str, Any]:
    if skipped := _skipped(
        train_result, validation="skipped", accuracy=None, reasons=[NO_NEW_DATA], model_version=None
    ):
        return skipped
    if not train_result.get("model_trained"):
        raise ValueError("Model training failed")
    mlflow = _mlflow(settings)
    client = registry.client_for(settings)
    name, version = settings.model_name, int(train_result["model_version"])
    test_frame = data.read_frame(train_result["test_uri"])
    features, label = train_result["feature_names"], train_result["label_column"]
    candidate = mlflow.pyfunc.load_model(f"models:/{name}/{version}")
    accuracy = evaluation.score(candidate.predict(test_frame[features]), test_frame[label])["accuracy"]

    champion = registry.production_version(client, name, settings.production_alias)
    champion_accuracy = None
    if champion is not None and champion.version != version and settings.compare_with_champion:
        champion_accuracy = _score_champion(mlflow, name, champion.version, test_frame, features, label)
    verdict = evaluation.judge(
        accuracy,
        threshold=settings.accuracy_threshold,
        champion_accuracy=champion_accuracy,
        champion_version=champion.version if champion else None,
        tolerance=settings.champion_tolerance,
        compare_with_champion=settings.compare_with_champion,
        drift=train_result.get("drift_max_psi"),
        drift_threshold=settings.drift_threshold,
        drift_margin=settings.drift_margin,
    )
    status = "passed" if verdict.passed else "failed"
    registry.set_version_tags(
        client,
        name,
        version,
        {
            registry.VALIDATION_STATUS_TAG: status,
            "mlops.validation.accuracy": accuracy,
            "mlops.validation.threshold": settings.accuracy_threshold,
            "mlops.validation.champion_version": champion.version if champion else "none",
            "mlops.validation.champion_accuracy": champion_accuracy if champion_accuracy is not None else "none",
            "mlops.validation.reasons": "; ".join(verdict.reasons) or "all checks passed",
            "mlops.validation.validated_at": registry.utc_now(),
        },
    )
    metrics = {"validation_accuracy": accuracy}
    if champion_accuracy is not None:
        metrics["champion_accuracy"] = champion_accuracy
    if train_result.get("run_id"):
        client.log_batch(train_result["run_id"], metrics=_metric_list(metrics))
    if verdict.passed:
        log.info("version %s passed validation: accuracy %.4f >= %.4f", version, accuracy, settings.accuracy_threshold)
    else:
        log.warning("version %s failed validation: %s", version, "; ".join(verdict.reasons))
    return {
        "validation": status,
        "accuracy": accuracy,
        "threshold": settings.accuracy_threshold,
        "champion_version": champion.version if champion else None,
        "champion_accuracy": champion_accuracy,
        "reasons": verdict.reasons,
        "model_name": name,
        "model_version": version,
        "run_id": train_result.get("run_id"),
        "test_uri": train_result["test_uri"],
        "feature_names": features,
        "label_column": label,
        "digest": train_result.get("digest"),
        **{key: value for key, value in train_result.items() if key.startswith("drift_")},
        "drift_margin_required": settings.drift_margin if train_result.get("drift_high") else None,
    }


def _score_champion(
    mlflow: Any, name: str, version: int, test_frame: Any, features: list[str], label: str
) -> float | None:
    try:
        champion_model = mlflow.pyfunc.load_model(f"models:/{name}/{version}")
        predictions = champion_model.predict(test_frame[features])
    except Exception as error:
        log.warning(
            "Production version %s cannot score this held-out set (%s); comparing on threshold only", version, error
        )
        return None
    return evaluation.score(predictions, test_frame[label])["accuracy"]


def deploy(settings: Settings, run: RunContext, validation_result: Mapping[str, Any]) -> dict[str, Any]:
    production = validation_result.get("production_version")
    if skipped := _skipped(
        validation_result,
        deployed=False,
        version=None,
        model_name=settings.model_name,
        previous_version=production,
        promoted=False,
        health_check="not_run",
        reason=f"{NO_NEW_DATA}: Production version {production} was trained on the same data",
    ):
        return skipped
    client = registry.client_for(settings)
    name, version = settings.model_name, int(validation_result["model_version"])
    current = registry.production_version(client, name, settings.production_alias)
    previous = current.version if current else None
    base = {"version": version, "model_name": name, "previous_version": previous}
    if validation_result["validation"] != "passed":
        reason = "validation failed: " + ("; ".join(validation_result.get("reasons") or []) or "unknown")
        log.warning("not deploying version %s (accuracy %s): %s", version, validation_result.get("accuracy"), reason)
        registry.set_version_tags(
            client, name, version, {registry.DEPLOYMENT_STATUS_TAG: "rejected", "mlops.deployment.reason": reason}
        )
        return {"deployed": False, **base, "promoted": False, "health_check": "not_run", "reason": reason}
    reason = f"passed validation with accuracy {validation_result['accuracy']:.4f}"
    if current is not None and current.version == version:
        previous = _int_or_none(current.tags.get("mlops.deployment.replaced_version"))
        base["previous_version"] = previous
        log.info("version %s was already promoted by an earlier try of this run", version)
    else:
        validated_against = validation_result.get("champion_version", previous)
        try:
            registry.promote(settings, version, expected_current=validated_against, actor=run.actor, reason=reason)
        except registry.ProductionMovedError as error:
            log.warning("not deploying version %s: %s", version, error)
            registry.set_version_tags(
                client,
                name,
                version,
                {registry.DEPLOYMENT_STATUS_TAG: "superseded", "mlops.deployment.reason": str(error)},
            )
            return {"deployed": False, **base, "promoted": False, "health_check": "not_run", "reason": str(error)}
    problems = check_deployment(settings, version, validation_result)
    if problems:
        log.error("post-deploy check of version %s failed: %s", version, "; ".join(problems))
        return {
            "deployed": False,
            **base,
            "promoted": True,
            "health_check": "failed",
            "reason": "post-deploy check failed: " + "; ".join(problems),
        }
    log.info("version %s is Production and serves as validated", version)
    return {"deployed": True, **base, "promoted": True, "health_check": "passed", "reason": reason}


def check_deployment(settings: Settings, version: int, validation_result: Mapping[str, Any]) -> list[str]:
    """Load what the Production alias now serves and check it is this version and predicts as validated."""
    if not settings.post_deploy_check:
        return []
    mlflow = _mlflow(settings)
    client = registry.client_for(settings)
    name, alias = settings.model_name, settings.production_alias
    served = registry.production_version(client, name, alias)
    if served is None or served.version != version:
        return [f"alias {alias!r} points at {served.version if served else 'nothing'}, not version {version}"]
    model_uri = f"models:/{name}@{alias}"
    problems = []
    try:
        model = mlflow.pyfunc.load_model(model_uri)
        test_frame = data.read_frame(validation_result["test_uri"])
        features, label = validation_result["feature_names"], validation_result["label_column"]
        predictions = model.predict(test_frame[features])
        served_accuracy = evaluation.score(predictions, test_frame[label])["accuracy"]
        if abs(served_accuracy - float(validation_result["accuracy"])) > 1e-9:
            problems.append(f"{model_uri} scores {served_accuracy:.4f}, validated {validation_result['accuracy']:.4f}")
        elif settings.serving_url:
            problems.extend(
                check_model_server(
                    settings.serving_url, version, test_frame[features], predictions, settings.serving_timeout
                )
            )
    except Exception as error:
        problems.append(f"{model_uri} does not serve: {type(error).__name__}: {error}")
    if not problems and settings.deploy_check_hook:
        problems.extend(_run_deploy_check_hook(settings.deploy_check_hook, model_uri, version))
    return problems


def check_model_server(url: str, version: int, features: Any, expected: Any, timeout: float) -> list[str]:
    """Wait for the model server to follow Production to ``version``, then check it answers as the model does."""
    import time

    import httpx

    base = url.rstrip("/")
    deadline = time.monotonic() + timeout
    serving = None
    while time.monotonic() < deadline:
        try:
            serving = httpx.get(f"{base}/version", timeout=5).json().get("version")
        except (httpx.HTTPError, ValueError):
            serving = None
        if serving == version:
            break
        time.sleep(0.5)
    else:
        return [f"model server {base} still serves version {serving} {timeout:.0f} s after the promotion"]
    sample = features.head(20)
    response = httpx.post(
        f"{base}/invocations", json={"dataframe_split": sample.to_dict(orient="split", index=False)}, timeout=30
    )
    answered_by = response.headers.get("X-Model-Version")
    if response.status_code != 200 or answered_by != str(version):
        return [f"model server {base} answered HTTP {response.status_code} from version {answered_by}"]
    served = [str(p) for p in response.json()["predictions"]]
    if served != [str(p) for p in list(expected[: len(sample)])]:
        return [f"model server {base} predicts differently from version {version} loaded from the registry"]
    log.info("model server %s serves version %s and answers as validated", base, version)
    return []


def _run_deploy_check_hook(hook: str, model_uri: str, version: int) -> list[str]:
    """A user's extra check of the deployment; an exception means the check failed."""
    try:
        call_hook(hook, model_uri=model_uri, version=version)
    except Exception as error:
        return [f"deploy check hook {hook} failed: {type(error).__name__}: {error}"]
    return []


def archive(settings: Settings, run: RunContext, deploy_result: Mapping[str, Any]) -> dict[str, Any]:
    if skipped := _skipped(deploy_result, archived=False, version=None, record={}):
        return skipped
    if not deploy_result.get("deployed"):
        log.info("version %s was not deployed; nothing to archive", deploy_result.get("version"))
        return {"archived": False, "version": deploy_result.get("version"), "record": {}}
    client = registry.client_for(settings)
    name, version = settings.model_name, int(deploy_result["version"])
    info = registry.get_version(client, name, version)
    record = {
        "mlops.deployment.deployed_at": registry.utc_now(),
        "mlops.deployment.airflow_dag_id": run.dag_id,
        "mlops.deployment.airflow_run_id": run.run_id,
        "mlops.deployment.accuracy": info.tags.get("mlops.validation.accuracy", ""),
        "mlops.deployment.data_digest": info.tags.get("mlops.data.digest", ""),
        "mlops.deployment.replaced_version": deploy_result.get("previous_version") or "none",
        "mlops.deployment.health_check": deploy_result.get("health_check", "passed"),
    }
    registry.set_version_tags(client, name, version, record)
    log.info("recorded the deployment of %s version %s", name, version)
    return {"archived": True, "version": version, "record": record}


def rollback(settings: Settings, run: RunContext, deploy_result: Mapping[str, Any] | None) -> dict[str, Any]:
    """Restore the prior Production unless this run ended with a healthy new Production version.

    ``deploy_result`` is ``None`` when deploy_model failed or never ran; the registry then says what this run did.
    """
    client = registry.client_for(settings)
    name, alias = settings.model_name, settings.production_alias
    current = registry.production_version(client, name, alias)
    current_number = current.version if current else None
    if skipped := _skipped(deploy_result, rollback_performed=False, restored_version=None, reason=NO_NEW_DATA):
        return {**skipped, "production_version": current_number}
    if deploy_result and deploy_result.get("deployed"):
        log.info("version %s deployed and healthy; no rollback needed", deploy_result.get("version"))
        return {
            "rollback_performed": False,
            "restored_version": None,
            "production_version": current_number,
            "reason": "deployment healthy",
        }
    candidate = _candidate_of_run(client, name, run, deploy_result)
    if candidate is None or current_number != candidate:
        reason = (
            "this run registered no version" if candidate is None else f"version {candidate} never became Production"
        )
        log.info("no rollback needed: %s; Production stays %s", reason, current_number)
        registry.reconcile_production(settings)
        if candidate is not None:
            why = (deploy_result or {}).get("reason") or "deploy_model did not complete"
            registry.mark_rolled_back_if_demoted(settings, candidate, f"left Production before this run ended: {why}")
        return {
            "rollback_performed": False,
            "restored_version": None,
            "production_version": current_number,
            "reason": reason,
        }
    previous = (deploy_result or {}).get("previous_version")
    if not deploy_result:
        previous = registry.previous_production_version(client, name, candidate)
    reason = (deploy_result or {}).get("reason") or "deploy_model did not complete"
    log.warning("rolling back %s version %s to %s: %s", name, candidate, previous, reason)
    after = registry.restore(settings, failed_version=candidate, restore_to=previous, actor=run.actor, reason=reason)
    return {
        "rollback_performed": True,
        "restored_version": previous,
        "rolled_back_version": candidate,
        "production_version": after,
        "reason": reason,
    }


def _candidate_of_run(client: Any, name: str, run: RunContext, deploy_result: Mapping[str, Any] | None) -> int | None:
    if deploy_result and deploy_result.get("version") is not None:
        return int(deploy_result["version"])
    found = registry.find_version_for_run_key(client, name, run.run_key)
    return found.version if found else None


def _int_or_none(value: str | None) -> int | None:
    return int(value) if value and value.isdigit() else None


def _mlflow(settings: Settings) -> Any:
    import mlflow

    mlflow.set_tracking_uri(settings.tracking_uri)
    if settings.registry_uri:
        mlflow.set_registry_uri(settings.registry_uri)
    experiment = mlflow.get_experiment_by_name(settings.experiment_name)
    if experiment is None:
        location = None
        if not settings.tracking_uri.startswith(("http://", "https://", "databricks")):
            location = _as_uri(settings.artifact_root)
        try:
            mlflow.create_experiment(settings.experiment_name, artifact_location=location)
        except mlflow.exceptions.MlflowException as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
    mlflow.set_experiment(settings.experiment_name)
    return mlflow


def _as_uri(location: str) -> str:
    from pathlib import Path

    return location if "://" in location else Path(location).expanduser().resolve().as_uri()


def _log_datasets(
    mlflow: Any, train_frame: Any, test_frame: Any, transform_result: Mapping[str, Any], label: str
) -> None:
    digest = transform_result["digest"]
    for frame, context, uri in (
        (train_frame, "training", transform_result["train_uri"]),
        (test_frame, "evaluation", transform_result["test_uri"]),
    ):
        dataset = mlflow.data.from_pandas(
            frame, source=_as_uri(uri), targets=label, name=f"snapshot-{digest[:12]}-{context}"
        )
        mlflow.log_input(dataset, context=context, tags={"snapshot_digest": digest})


def _log_model(mlflow: Any, pipeline: Any, features: Any) -> str:
    from importlib import metadata

    from mlflow.models import infer_signature

    requirements = [
        f"{package}=={metadata.version(package)}"
        for package in ("mlflow-skinny", "scikit-learn", "pandas", "numpy", "scipy")
    ]
    example = features.head(3)
    signature = infer_signature(example, pipeline.predict(example))
    info = mlflow.sklearn.log_model(
        pipeline,
        name="model",
        signature=signature,
        input_example=example,
        pip_requirements=requirements,
        skops_trusted_types=SKOPS_TRUSTED_TYPES,
    )
    return info.model_uri


def _metric_list(metrics: Mapping[str, float]) -> list[Any]:
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(key, float(value), now, 0) for key, value in metrics.items()]


def _close(figure: Any) -> None:
    import matplotlib.pyplot as plt

    plt.close(figure)


def rollback_production(context: Mapping[str, Any]) -> dict[str, Any]:
    """The mlops_rollback DAG's one step: put a chosen version back in Production."""
    return run_step("rollback_production", context, manual_rollback)


def manual_rollback(settings: Settings, run: RunContext) -> dict[str, Any]:
    target = str(run.params.get("target_version") or "previous")
    reason = str(run.params.get("reason") or "manual rollback from the Airflow UI")
    replaced, restored = registry.manual_rollback(settings, target, actor=run.actor, reason=reason)
    log.info("Production of %s: version %s -> %s (%s)", settings.model_name, replaced, restored, reason)
    return {"rollback_performed": True, "replaced_version": replaced, "production_version": restored, "reason": reason}
