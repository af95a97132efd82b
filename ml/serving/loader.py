"""One registered model version, loaded, checked and warmed, ready to answer requests."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

import mlflow
from ml.registry import VersionInfo, utc_now
from ml.serving.schema import InputSchema

if TYPE_CHECKING:
    from mlflow.pyfunc import PyFuncModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    """Immutable, so that a request holding a reference sees one consistent model from start to end."""

    name: str
    version: int
    alias: str
    run_id: str | None
    loaded_at: str
    schema: InputSchema
    predict: Callable[[pd.DataFrame], Any]
    # The classes a classifier predicts, as Python values; None for a model that does not say (not scikit-learn).
    classes: tuple[Any, ...] | None = None

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "alias": self.alias,
            "run_id": self.run_id,
            "loaded_at": self.loaded_at,
        }


def load_version(name: str, alias: str, info: VersionInfo, download_root: Path) -> LoadedModel:
    """Download and load ``models:/<name>/<version>``, then score its input example once.

    Raises whatever loading raises; an unsupported signature raises
    :class:`~ml.serving.schema.UnsupportedSignatureError`.
    """
    destination = download_root / f"{name}-v{info.version}-{datetime.now().strftime('%Y%m%dT%H%M%S%f')}"
    destination.mkdir(parents=True)
    pyfunc_model = mlflow.pyfunc.load_model(f"models:/{name}/{info.version}", dst_path=str(destination))
    loaded = LoadedModel(
        name=name,
        version=info.version,
        alias=alias,
        run_id=info.run_id or None,
        loaded_at=utc_now(),
        schema=InputSchema.from_signature(pyfunc_model.metadata.get_input_schema()),
        predict=_predict_function(pyfunc_model),
        classes=_classes(pyfunc_model),
    )
    _warm(loaded, pyfunc_model.input_example)
    return loaded


def _predict_function(pyfunc_model: PyFuncModel) -> Callable[[pd.DataFrame], Any]:
    flavor = pyfunc_model.metadata.flavors.get("python_function", {})
    if flavor.get("loader_module") == "mlflow.sklearn":
        # PyFuncModel.predict enforces the signature again, which costs about 1 ms a request (more than the
        # pipeline's own predict); InputSchema has already checked and typed the frame, so call the flavor's
        # predict function directly, as PyFuncModel does after its checks.
        return getattr(pyfunc_model._model_impl, flavor.get("predict_fn", "predict"))
    return pyfunc_model.predict


def _classes(pyfunc_model: PyFuncModel) -> tuple[Any, ...] | None:
    estimator = getattr(pyfunc_model._model_impl, "sklearn_model", None)
    classes = getattr(estimator, "classes_", None)
    return tuple(classes.tolist()) if classes is not None and hasattr(classes, "tolist") else None


def _warm(loaded: LoadedModel, example: Any) -> None:
    """Score the input example through the request path, so that a version that cannot answer is never swapped in."""
    if not isinstance(example, pd.DataFrame):
        log.info("version %s has no tabular input example; not warmed", loaded.version)
        return
    loaded.predict(loaded.schema.frame_from_records(example.to_dict(orient="records")))
