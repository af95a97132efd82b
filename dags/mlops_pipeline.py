"""The retraining pipeline: extract, transform, train, validate, deploy, then archive or roll back.

Thin on purpose: each task imports ``ml.steps`` inside its body and makes one call, so parsing this file costs no
more than parsing a DAG of empty tasks. The logic, and its tests, live in the ``ml`` package.
"""

import os
from datetime import datetime, timedelta

from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable, Param, dag, task

from ml.assets import training_data_asset
from ml.settings import MODEL_FAMILIES, param_defaults

DEFAULTS = param_defaults()
# The configured data source. A run starts every day at midnight UTC, or as soon as the asset is updated (by the
# mlops_ingest DAG, a POST to /api/v2/assets/events, ...), whichever comes first.
TRAINING_DATA = training_data_asset()

default_args = {
    "owner": "airflow",
    "depends_on_past": False,
    "email_on_failure": False,
    "email_on_retry": False,
    "retries": 1,
    "retry_delay": timedelta(seconds=float(os.environ.get("MLOPS_RETRY_DELAY_SECONDS") or 300)),
}

DOC = """
### Retraining pipeline

Trains a scikit-learn model on a fresh snapshot of the configured data source, logs the run to MLflow and registers
a new version of the model in the MLflow Model Registry. The version is promoted to **Production** (the stage and
the `production` alias) only if its held-out accuracy reaches the threshold and, unless switched off, it is no worse
than the current Production version beyond the tolerance. After promotion the pipeline loads
`models:/<name>@production` and checks it predicts as validated; if that fails, `rollback_model` restores the previous
version.

| task | does |
|---|---|
| extract_data | reads the source, writes a content-addressed snapshot, returns its URI and digest |
| transform_data | validates the data, makes a stratified seeded split |
| train_model | fits the pipeline, logs params, metrics, datasets, plots and the model; registers a version |
| validate_model | scores the version and the Production version on the held-out set |
| deploy_model | promotes a passing version and checks it serves |
| archive_model | writes the deployment record onto the version as tags |
| rollback_model | restores the previous Production version unless the new one is deployed and healthy |

Every parameter of the trigger form overrides the service's setting for this run only.

#### Data-aware
Runs daily **or** when the training-data asset is updated (see the asset's page for the events and the runs they
triggered). If the extracted data has the same digest as the data the Production version was trained on, the run is
a no-op: every task returns `"skipped_reason": "no new data"`, nothing is registered and Production is untouched;
`force_retrain` retrains anyway. Each training run measures drift (PSI and a KS test per feature, label balance)
against the Production version's data and logs it to MLflow (`drift/`); above `drift_threshold` the candidate must
beat Production by `drift_margin` instead of being within the tolerance.
"""


@dag(
    dag_id="mlops_pipeline",
    description="Retrain, validate and promote a scikit-learn model through the MLflow Model Registry",
    default_args=default_args,
    schedule=AssetOrTimeSchedule(timetable=CronTriggerTimetable("@daily", timezone="UTC"), assets=TRAINING_DATA),
    start_date=datetime(2023, 1, 1),
    catchup=False,
    max_active_runs=1,
    tags=["intro", "ml", "mlops", "mlflow"],
    doc_md=DOC,
    params={
        "accuracy_threshold": Param(
            DEFAULTS["accuracy_threshold"],
            type="number",
            minimum=0,
            maximum=1,
            title="Accuracy threshold",
            description="Minimum accuracy on the held-out set for a version to be promoted.",
        ),
        "model_family": Param(
            DEFAULTS["model_family"],
            type="string",
            enum=list(MODEL_FAMILIES),
            title="Model family",
            description="The scikit-learn estimator at the end of the pipeline.",
        ),
        "hyperparameters": Param(
            DEFAULTS["hyperparameters"],
            type="object",
            title="Hyper-parameters",
            description='Estimator arguments as JSON, e.g. {"C": 0.5} or {"n_estimators": 200, "max_depth": 6}. '
            "Unset ones keep the family's defaults.",
        ),
        "data_source": Param(
            DEFAULTS["data_source"],
            type="string",
            minLength=1,
            title="Data source",
            description="sklearn:breast_cancer (bundled), a .csv or .parquet path or URL, "
            "or a SQLAlchemy URL together with a SQL query.",
        ),
        "data_query": Param(
            DEFAULTS["data_query"],
            type="string",
            title="SQL query or table",
            description="Only for a SQL data source: a SELECT statement or a table name.",
        ),
        "label_column": Param(
            DEFAULTS["label_column"],
            type="string",
            minLength=1,
            title="Label column",
            description="The column the model predicts.",
        ),
        "compare_with_champion": Param(
            DEFAULTS["compare_with_champion"],
            type="boolean",
            title="Compare with Production",
            description="Also require the candidate to be no worse than the current Production version.",
        ),
        "champion_tolerance": Param(
            DEFAULTS["champion_tolerance"],
            type="number",
            minimum=0,
            maximum=1,
            title="Tolerance against Production",
            description="How much lower than Production's accuracy the candidate's may be and still pass.",
        ),
        "test_size": Param(
            DEFAULTS["test_size"],
            type="number",
            exclusiveMinimum=0,
            exclusiveMaximum=1,
            title="Held-out fraction",
            description="Share of rows kept out of training for validation (stratified).",
        ),
        "random_seed": Param(
            DEFAULTS["random_seed"],
            type="integer",
            title="Random seed",
            description="Seeds the split and the estimator; recorded on the run and the version.",
        ),
        "force_retrain": Param(
            DEFAULTS["force_retrain"],
            type="boolean",
            title="Retrain on unchanged data",
            description="Train, validate and possibly promote even when the data is the data the Production version "
            "was trained on (same digest); otherwise such a run ends early with 'no new data'.",
        ),
        "drift_threshold": Param(
            DEFAULTS["drift_threshold"],
            type="number",
            minimum=0,
            title="Drift threshold (PSI)",
            description="Largest per-feature population stability index, against the Production version's data, "
            "above which drift counts as high (0.1: moderate, 0.2: significant).",
        ),
        "drift_margin": Param(
            DEFAULTS["drift_margin"],
            type="number",
            minimum=0,
            maximum=1,
            title="Margin over Production under high drift",
            description="Under high drift the candidate must beat Production's accuracy by at least this much, "
            "instead of being within the tolerance.",
        ),
    },
)
def training_pipeline():
    @task(task_id="extract_data")
    def extract_data(**context):
        """Read the data source and write a content-addressed snapshot to the data store."""
        from ml import steps

        return steps.extract_data(context)

    @task(task_id="transform_data")
    def transform_data(extract_result, **context):
        """Validate the snapshot and write a stratified, seeded train/test split."""
        from ml import steps

        return steps.transform_data(extract_result, context)

    @task(task_id="train_model")
    def train_model(transform_result, **context):
        """Fit the scikit-learn pipeline, log it to MLflow and register a new model version."""
        from ml import steps

        return steps.train_model(transform_result, context)

    @task(task_id="validate_model")
    def validate_model(train_result, **context):
        """Score the version and the Production version on the held-out set against the threshold."""
        from ml import steps

        return steps.validate_model(train_result, context)

    @task(task_id="deploy_model", trigger_rule="none_failed")
    def deploy_model(validation_result, **context):
        """Promote a passing version to Production (stage and alias) and check that it serves."""
        from ml import steps

        return steps.deploy_model(validation_result, context)

    @task(task_id="archive_model")
    def archive_model(deploy_result, **context):
        """Write the deployment record onto the deployed version as tags."""
        from ml import steps

        return steps.archive_model(deploy_result, context)

    @task(task_id="rollback_model", trigger_rule="all_done")
    def rollback_model(**context):
        """Restore the previous Production version unless this run deployed a healthy new one.

        Runs whatever happened upstream, so it reads deploy_model's result from XCom itself: a failed deploy_model
        leaves none, and an argument bound to it would fail this task before it could roll anything back.
        """
        from ml import steps

        return steps.rollback_model(context)

    extract_result = extract_data()
    transform_result = transform_data(extract_result)
    train_result = train_model(transform_result)
    validation_result = validate_model(train_result)
    deploy_result = deploy_model(validation_result)
    archive_model(deploy_result)
    deploy_result >> rollback_model()


training_pipeline()
