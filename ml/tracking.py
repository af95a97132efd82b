"""How a training run is logged to MLflow: the experiment, datasets, metrics, figures and the model itself."""

from __future__ import annotations

import time
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

from ml.settings import Settings

# MLflow saves scikit-learn models with skops, which refuses to load types it was not told to trust;
# the imputer keeps the dtype it was fitted on.
SKOPS_TRUSTED_TYPES = ["numpy.dtype"]
# Pinned explicitly: inferring a model's requirements costs MLflow about 8 s in a subprocess.
MODEL_REQUIREMENTS = ("mlflow-skinny", "scikit-learn", "pandas", "numpy", "scipy")


def connect(settings: Settings) -> ModuleType:
    """The mlflow module, pointed at the configured stores, with the experiment created if need be and active."""
    import mlflow

    mlflow.set_tracking_uri(settings.tracking_uri)
    if settings.registry_uri:
        mlflow.set_registry_uri(settings.registry_uri)
    if mlflow.get_experiment_by_name(settings.experiment_name) is None:
        location = None
        if not settings.tracking_uri.startswith(("http://", "https://", "databricks")):
            location = as_uri(settings.artifact_root)
        try:
            mlflow.create_experiment(settings.experiment_name, artifact_location=location)
        except mlflow.exceptions.MlflowException as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
    mlflow.set_experiment(settings.experiment_name)
    return mlflow


def as_uri(location: str) -> str:
    return location if "://" in location else Path(location).expanduser().resolve().as_uri()


def log_datasets(
    mlflow: ModuleType, train_frame: Any, test_frame: Any, *, train_uri: str, test_uri: str, digest: str, label: str
) -> None:
    """Record the train and test sets as the run's inputs, named after the snapshot they were split from."""
    for frame, context, uri in ((train_frame, "training", train_uri), (test_frame, "evaluation", test_uri)):
        dataset = mlflow.data.from_pandas(
            frame, source=as_uri(uri), targets=label, name=f"snapshot-{digest[:12]}-{context}"
        )
        mlflow.log_input(dataset, context=context, tags={"snapshot_digest": digest})


def log_figure(mlflow: ModuleType, figure: Any, artifact_file: str) -> None:
    import matplotlib.pyplot as plt

    try:
        mlflow.log_figure(figure, artifact_file)
    finally:
        plt.close(figure)


def log_model(mlflow: ModuleType, pipeline: Any, features: Any) -> str:
    """Log the fitted pipeline with its signature and an input example; returns the model's URI."""
    from mlflow.models import infer_signature

    requirements = [f"{package}=={metadata.version(package)}" for package in MODEL_REQUIREMENTS]
    example = features.head(3)
    info = mlflow.sklearn.log_model(
        pipeline,
        name="model",
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
