"""The retraining pipeline: extract, transform, train, validate, deploy, then archive or roll back.

Thin on purpose: each task imports ``ml.tasks`` inside its body and makes one call, so parsing this file costs no
more than parsing a DAG of empty tasks. The logic, and its tests, live in the ``ml`` package.
"""

from datetime import timedelta

from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable, Param, dag, task

from ml.assets import training_data_asset
from ml.notify import RunNotifier
from ml.settings import PARAM_SCHEMA_DIALECT, Settings

# The trigger form's defaults and the task limits; never raises, so a bad setting fails the first task, not the import.
SETTINGS = Settings.from_env_or_embedded()
# The configured data source. A run starts every day at midnight UTC, or as soon as the asset is updated (by the
# mlops_ingest DAG, a POST to /api/v2/assets/events, ...), whichever comes first.
TRAINING_DATA = training_data_asset(SETTINGS)
# The first scheduled run is the first midnight after the DAG is unpaused, so that unpausing (the trigger form's
# "Unpause on trigger" box) starts nothing beside the run the user asked for. The timetable decides that only for a DAG
# without a start_date; with one, catchup=False always starts the last midnight's run at once. A parse within five
# minutes of midnight still schedules that midnight's run, so a scheduler a little late never loses the first one.
DAILY = CronTriggerTimetable("@daily", timezone="UTC", run_immediately=timedelta(minutes=5))

default_args = {
    "owner": "airflow",
    "depends_on_past": False,
    "email_on_failure": False,
    "email_on_retry": False,
    "retries": 1,
    "retry_delay": timedelta(seconds=SETTINGS.retry_delay),
    "execution_timeout": timedelta(seconds=SETTINGS.task_timeout),
    # Airflow would log each returned dict whole as a task's last line; the XCom tab shows it, and the task's own
    # lines say what it did.
    "show_return_value_in_logs": False,
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
| plan_candidates | lists the run's candidates |
| train_candidate | one per candidate: fits it, logs it as a child MLflow run with its scores on a selection split |
| train_model | chooses the best candidate, scores it on the held-out set, logs its plots; registers a version |
| validate_model | scores the version and the Production version on the held-out set |
| deploy_model | promotes a passing version and checks it serves |
| archive_model | writes the deployment record onto the version as tags |
| rollback_model | restores the previous Production version unless the new one is deployed and healthy |

Every parameter of the trigger form overrides the service's setting for this run only; the form opens on the
service's settings, and a `conf` that leaves a parameter out keeps it. Any other name in a run's `conf` is refused:
checks, hooks, stores and names are the deployment's. `reason` says why the run was started (`mlops_monitor` gives
the drift or accuracy drop it saw) and the run's note repeats it.
Each task is stopped after `MLOPS_TASK_TIMEOUT_SECONDS` (one hour by default).

#### Data-aware
Runs daily at 00:00 UTC **or** when the training-data asset is updated (see the asset's page for the events and the
runs they triggered). The first daily run is the first midnight after the DAG is unpaused: unpausing starts no run of
its own, so the first run you trigger is the one that trains. If the extracted data has the same digest as the data
the Production version was trained on, the run is a no-op: extract_data succeeds and skips every task after it
without starting it (try 0, no duration), nothing is registered and Production is untouched; `force_retrain` retrains
anyway. Each training run measures drift (PSI and a
KS test per feature, label balance) against the Production version's data and logs it to MLflow (`drift/`); above
`drift_threshold` the candidate must beat Production by `drift_margin` instead of being within the tolerance.

#### Candidates
`candidates` lists model families and hyper-parameters to train side by side (empty: the one `model_family` with its
`hyperparameters`). Each is a `train_candidate` task instance and a child of the run's MLflow run; with several, each
is fitted on the training rows less a seeded selection split and ranked on that split by `selection_metric`. Only the
winner is registered, and only it meets the held-out rows, the threshold and Production. A candidate that fails shows
as a failed `train_candidate` square; the run goes on with the others and succeeds. If every candidate fails,
train_model fails and Production stays as it was.

#### Reading a run
The grid uses Airflow's states: a task that had nothing to do is *skipped* (deploy_model and archive_model when
nothing was promoted, rollback_model when nothing was rolled back), so a green rollback_model means a rollback
happened. A rejected version ends validate_model *skipped*, with a task note that says why (the corner mark on its
square): Production was not reached, and the run still succeeds, since the pipeline did its job. Each run's note says
what it did ("v3 promoted, accuracy ...", "no new data", "v4 rejected: ...", "v5 rolled back: ...") and links to the
MLflow run and the registered version.
"""


@dag(
    dag_id="mlops_pipeline",
    # The DAG page's header names only the asset of an asset-or-time schedule: the description says both.
    description=(
        "Daily at 00:00 UTC, and whenever the training data is updated: retrain, validate and promote a scikit-learn "
        "model through the MLflow Model Registry"
    ),
    default_args=default_args,
    schedule=AssetOrTimeSchedule(timetable=DAILY, assets=TRAINING_DATA),
    catchup=False,
    max_active_runs=1,
    tags=["ml", "mlops", "mlflow"],
    doc_md=DOC,
    # Tell people what the run did (MLOPS_NOTIFY_*), from what rollback_model, the last task, left for it, or
    # extract_data, when it found no new data and skipped every task after it.
    on_success_callback=RunNotifier(result_tasks=("rollback_model", "extract_data")),
    on_failure_callback=RunNotifier(result_tasks=("rollback_model", "extract_data"), failed=True),
)
def training_pipeline():
    @task(task_id="extract_data")
    def extract_data(**context):
        """Read the data source and write a content-addressed snapshot to the data store."""
        from ml import tasks

        return tasks.extract_data(context)

    @task(task_id="transform_data")
    def transform_data(extract_result, **context):
        """Validate the snapshot and write a stratified, seeded train/test split."""
        from ml import tasks

        return tasks.transform_data(extract_result, context)

    @task(task_id="plan_candidates")
    def plan_candidates(transform_result, **context):
        """List the run's candidates: the list train_candidate is mapped over."""
        from ml import tasks

        return tasks.plan_candidates(context)

    # A mapped task takes default_args' show_return_value_in_logs only when given outright.
    @task(task_id="train_candidate", show_return_value_in_logs=False)
    def train_candidate(transform_result, candidate, **context):
        """Fit one candidate (a model family with its hyper-parameters) and log it as a child MLflow run; mapped
        over the run's candidates, so each is a task instance of its own, on whichever worker is free."""
        from ml import tasks

        return tasks.train_candidate(transform_result, candidate, context)

    # Once every candidate is done, if any trained: a failed candidate fails its own task instance, not the run.
    # Skipped with transform_data when there is nothing to train.
    @task(task_id="train_model", trigger_rule="all_done_min_one_success")
    def train_model(transform_result, **context):
        """Choose the best candidate, score it on the held-out set and register it as a new model version."""
        from ml import tasks

        return tasks.train_model(transform_result, context)

    @task(task_id="validate_model")
    def validate_model(train_result, **context):
        """Score the version and the Production version on the held-out set against the threshold."""
        from ml import tasks

        return tasks.validate_model(train_result, context)

    # Runs when validate_model was skipped too (it rejected the version), so it reads validate_model's verdict from
    # XCom itself: a validate_model that never started leaves none, and Airflow logs an argument bound to a missing
    # XCom as an error.
    @task(task_id="deploy_model", trigger_rule="none_failed")
    def deploy_model(**context):
        """Promote a version that passed validation to Production (stage and alias), then check that the deployed
        model serves as validated. Skipped when there is nothing to promote."""
        from ml import tasks

        return tasks.deploy_model(context)

    @task(task_id="archive_model")
    def archive_model(deploy_result, **context):
        """Write the deployment record onto the deployed version as tags."""
        from ml import tasks

        return tasks.archive_model(deploy_result, context)

    # Runs whatever happened upstream, so it reads deploy_model's result from XCom itself: a failed deploy_model
    # leaves none, and an argument bound to it would fail this task before it could roll anything back. Likewise
    # validate_model and deploy_model read transform_data's split from XCom, keeping the contract's graph.
    @task(task_id="rollback_model", trigger_rule="all_done")
    def rollback_model(**context):
        """Restore the previous Production version unless this run ended with a healthy new one. Runs whatever
        happened before it; green only when it rolled something back, and it writes the run's note."""
        from ml import tasks

        return tasks.rollback_model(context)

    extract_result = extract_data()
    transform_result = transform_data(extract_result)
    candidates = train_candidate.partial(transform_result=transform_result).expand(
        candidate=plan_candidates(transform_result)
    )
    train_result = train_model(transform_result)
    candidates >> train_result
    validation_result = validate_model(train_result)
    deploy_result = deploy_model()
    validation_result >> deploy_result
    if SETTINGS.approval_required:
        from ml.approval import DeploymentApproval

        validation_result >> DeploymentApproval(timeout_seconds=SETTINGS.approval_timeout) >> deploy_result
    archive_model(deploy_result)
    deploy_result >> rollback_model()


pipeline = training_pipeline()
# The trigger form is attached once the tasks exist. Airflow gives every task created under a DAG that already has
# Params its own deep copy of them, then serialises those copies with each task, while a task reads the DAG's Params at
# run time anyway.
pipeline.params = {
    **{name: Param(**spec) for name, spec in SETTINGS.param_specs().items()},
    "reason": Param(
        None,
        **{"$schema": PARAM_SCHEMA_DIALECT},
        type=["null", "string"],
        maxLength=1000,
        title="Reason",
        description="Why this run was started (mlops_monitor gives the drift or accuracy drop it saw); shown in the "
        "run's note.",
    ),
}
