"""How a training run is logged to MLflow: the experiment, datasets, metrics, figures and the model itself."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

from ml.context import RunContext
from ml.preload import MODEL_LOGGING_MODULES, import_for_tasks
from ml.redaction import has_user_info, mask_credentials
from ml.settings import Settings
from ml.task_logs import import_skops_quietly, skops_scan_quieted

# MLflow saves scikit-learn models with skops, which refuses to load types it was not told to trust: the imputer
# keeps the dtype it was fitted on, and the random forest and gradient boosting families hold scikit-learn's trees.
SKOPS_TRUSTED_TYPES = ["numpy.dtype", "sklearn.tree._tree.Tree"]
# Pinned explicitly: inferring a model's requirements costs MLflow about 8 s in a subprocess.
MODEL_REQUIREMENTS = ("mlflow-skinny", "scikit-learn", "pandas", "numpy", "scipy")
# MLflow's own tags: the experiment's kind (without it the UI opens on its GenAI view) and descriptions.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
NOTE_TAG = "mlflow.note.content"
RUN_NAME_TAG = "mlflow.runName"
MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT = "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"


def connect(settings: Settings, experiment_name: str | None = None, description: str | None = None) -> ModuleType:
    """The mlflow module, pointed at the configured stores, with the experiment (the pipeline's unless named, with
    its description unless given) created if need be and active."""
    import mlflow

    if has_user_info(settings.tracking_uri):
        # MLflow prints each run's link on stdout, built from the tracking URI, password included; the run note and
        # the run's description link to the run without it.
        os.environ[MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT] = "true"
    mlflow.set_tracking_uri(settings.tracking_uri)
    if settings.registry_uri:
        mlflow.set_registry_uri(settings.registry_uri)
    experiment_name = experiment_name or settings.experiment_name
    described = experiment_tags(settings, description)
    experiment = mlflow.get_experiment_by_name(experiment_name)
    if experiment is None:
        location = None
        if not settings.tracking_uri.startswith(("http://", "https://", "databricks")):
            location = as_uri(settings.artifact_root)
        try:
            mlflow.create_experiment(experiment_name, artifact_location=location, tags=described)
        except mlflow.exceptions.MlflowException as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
    elif experiment.tags.get(EXPERIMENT_KIND_TAG) != MODEL_TRAINING_KIND:
        # An experiment made before the kind tag existed would still open on MLflow's GenAI view.
        for key, value in described.items():
            mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, key, value)
    mlflow.set_experiment(experiment_name)
    return mlflow


def experiment_tags(settings: Settings, description: str | None = None) -> dict[str, str]:
    """The experiment's kind (MLflow opens a model-training experiment on its runs) and its description."""
    description = description or (
        f"Training runs of the `mlops_pipeline` Airflow DAG. Each run trains one or more candidate scikit-learn "
        f"pipelines on a snapshot of the configured data, each a child run with its parameters, scores and datasets; "
        f"the parent run holds the candidates side by side, and the chosen candidate, with its held-out scores, "
        f"confusion matrix, curves and drift report, becomes a new version of `{settings.model_name}`. Parent runs "
        f"are named `v<version> · <model family or number of candidates> · <UTC time>` and their description links "
        f"to the Airflow run. Which version is in Production, and why, is on the registered model's page."
    )
    return {EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND, NOTE_TAG: description}


def run_name(model_family: str, started: datetime, version: int | None = None) -> str:
    """Short and distinct in MLflow's run list: ``v3 · logistic_regression · 2026-11-24 18:46``."""
    stamp = started.astimezone(UTC).strftime("%Y-%m-%d %H:%M")
    return " · ".join(([f"v{version}"] if version is not None else []) + [model_family, stamp])


def run_description(run: RunContext, settings: Settings, digest: str, model_family: str = "") -> str:
    """Markdown: the Airflow run that trained this model (a link MLflow's UI can follow) and the data it used."""
    family = f", model family `{model_family}`" if model_family else ""
    return (
        f"Trained by the Airflow DAG run [{run.run_key}]({run.airflow_url}) (try {run.try_number}){family}, "
        f"on the snapshot with digest `{digest[:16]}` of "
        f"`{mask_credentials(settings.data_source)}`. The registered version's page says whether it reached Production."
    )


def parent_run(mlflow: ModuleType, run: RunContext, settings: Settings, digest: str) -> str:
    """The id of this DAG run's parent MLflow run, which each candidate's run is a child of: the one an earlier try
    created, else a new one, left running until train_model ends it."""
    from ml import tags

    client = mlflow.MlflowClient()
    experiment = mlflow.get_experiment_by_name(settings.experiment_name)
    lineage = {**run.lineage_tags(), tags.RUN_ROLE: "parent", tags.DATA_DIGEST: digest}
    if "'" not in run.run_key:
        found = client.search_runs(
            [experiment.experiment_id],
            filter_string=f"tags.`{tags.RUN_ROLE}` = 'parent' and tags.`{tags.AIRFLOW_RUN_KEY}` = '{run.run_key}'",
            max_results=1,
        )
        if found:
            return str(found[0].info.run_id)
    started = datetime.now(UTC)
    created = client.create_run(
        experiment.experiment_id,
        run_name=run_name("candidates", started),
        tags={**lineage, NOTE_TAG: run_description(run, settings, digest)},
    )
    return str(created.info.run_id)


def finished_candidate_run(mlflow: ModuleType, experiment_name: str, parent_run_id: str, index: int) -> Any | None:
    """The child run in which an earlier try of this candidate logged its model, if one finished."""
    from ml import tags

    experiment = mlflow.get_experiment_by_name(experiment_name)
    found = mlflow.MlflowClient().search_runs(
        [experiment.experiment_id],
        filter_string=(
            f"tags.`{tags.PARENT_RUN_ID}` = '{parent_run_id}' and tags.`{tags.CANDIDATE_INDEX}` = '{index}' "
            "and attributes.status = 'FINISHED'"
        ),
        max_results=1,
    )
    return found[0] if found and found[0].data.tags.get(tags.CANDIDATE_MODEL_URI) else None


def as_uri(location: str) -> str:
    return location if "://" in location else Path(location).expanduser().resolve().as_uri()


# Rows the datasets' schema is read from: column names and types are in the first rows as much as in all of them.
SCHEMA_ROWS = 1000


def log_datasets(
    mlflow: ModuleType, train_frame: Any, test_frame: Any, *, train_uri: str, test_uri: str, digest: str
) -> None:
    """Record the train and test sets as the run's inputs, named after the snapshot they were split from.

    Lineage by address, digest and schema: ``mlflow.data.from_pandas`` would hash and infer a schema from every row
    (tens of seconds on a million rows) to describe data the snapshot's digest already names. The tags say which
    digest is which: the snapshot's sha256 (the one on the model version) covers the whole extracted data set.
    """
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.models import infer_signature

    for frame, context, uri in ((train_frame, "training", train_uri), (test_frame, "evaluation", test_uri)):
        with warnings.catch_warnings():
            # The label is an integer class, validated to have no missing values: MLflow's hint does not apply.
            warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer column")
            # MLflow registers its local-file source class twice and then warns that a path is ambiguous.
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple")
            # MLflow types Dataset.profile as abstract; MetaDataset has none and is made as MLflow documents.
            dataset = MetaDataset(  # type: ignore[abstract]
                source=resolve_dataset_source(as_uri(uri)),
                name=f"{context} split of snapshot {digest[:12]}",
                digest=digest[:8],
                schema=infer_signature(frame.head(SCHEMA_ROWS)).inputs,
            )
            mlflow.log_input(
                dataset,
                context=context,
                tags={
                    "snapshot sha256 (whole data set, as on the model version)": digest,
                    "dataset digest (shown by MLflow)": f"{dataset.digest}: the first characters of the snapshot's "
                    "sha256",
                },
            )


@contextlib.contextmanager
def model_logging_imported_meanwhile() -> Iterator[None]:
    """Import what logging a model and its figures needs (skops, matplotlib) in another thread while the block runs.

    The block is the fit: on a large data set it spends seconds in compiled code that releases the GIL, and those
    imports (one to two seconds in a task process: skops scans every loaded module) then cost no wall time. On a small
    one the two share the GIL and the run takes as long as it did.

    Python's warning filters are process-wide. skops' scan sets and restores them about a thousand times and the fit
    does too (scikit-learn's input checks), so the two threads' saves and restores interleave: one may restore what
    the other had set. So the scan's own warnings are ignored by module for the whole window, not only by skops, and
    the window is one ``catch_warnings`` of this thread, which puts the filters back as they were when it ends.
    """
    if all(module in sys.modules for module in MODEL_LOGGING_MODULES):
        yield
        return
    with skops_scan_quieted():
        importer = threading.Thread(target=_import_model_logging, name="model-logging-imports", daemon=True)
        importer.start()
        try:
            yield
        finally:
            importer.join()


def _import_model_logging() -> None:
    for module in MODEL_LOGGING_MODULES:
        # One that fails here fails again where the task uses it, in the task's thread, with a traceback saying where.
        with contextlib.suppress(Exception):
            import_for_tasks(module)


def load_model(mlflow: ModuleType, model_uri: str) -> Any:
    """``mlflow.pyfunc.load_model``, with skops (the format scikit-learn models are saved in) imported quietly."""
    import_skops_quietly()
    return mlflow.pyfunc.load_model(model_uri)


def load_fitted_model(mlflow: ModuleType, model_uri: str) -> Any:
    """The scikit-learn pipeline itself, not its pyfunc wrapper: class probabilities too, for the ranking scores."""
    import_skops_quietly()
    return mlflow.sklearn.load_model(model_uri)


def log_figure(mlflow: ModuleType, figure: Any, artifact_file: str) -> None:
    import matplotlib.pyplot as plt

    try:
        mlflow.log_figure(figure, artifact_file)
    finally:
        plt.close(figure)


def log_model(mlflow: ModuleType, pipeline: Any, features: Any, name: str) -> str:
    """Log the fitted pipeline, named after the registered model, with its signature and an input example.

    Returns the model's URI.
    """
    from mlflow.models import infer_signature

    import_skops_quietly()
    requirements = [f"{package}=={metadata.version(package)}" for package in MODEL_REQUIREMENTS]
    example = features.head(3)
    info = mlflow.sklearn.log_model(
        pipeline,
        name=name,
        signature=infer_signature(example, pipeline.predict(example)),
        input_example=example,
        pip_requirements=requirements,
        skops_trusted_types=SKOPS_TRUSTED_TYPES,
    )
    return str(info.model_uri)


def log_metrics_to_run(client: Any, run_id: str, metrics: Mapping[str, float]) -> None:
    """Add metrics to a run that has ended (validation scores land on the training run)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(key, float(value), now, 0) for key, value in metrics.items()])


def input_names(mlflow: ModuleType, model_uri: str) -> list[str] | None:
    """The input columns of a logged model's signature, or None when it has none."""
    signature = mlflow.models.get_model_info(model_uri).signature
    return signature.inputs.input_names() if signature is not None else None
