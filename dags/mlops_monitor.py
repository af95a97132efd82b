"""Watch the Production model's live traffic: drift and live accuracy per window, and a retraining when they call for
one.

Thin on purpose, like mlops_pipeline: judge_window imports ``ml.tasks`` inside its body and makes one call; the logic
and its tests live in ``ml.monitor``.
"""

from datetime import timedelta

from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable, Param, dag, task

from ml.assets import recorded_traffic_asset
from ml.settings import Settings

SETTINGS = Settings.from_env_or_embedded()
RECORDED_TRAFFIC = recorded_traffic_asset(SETTINGS)

DOC = """
### Monitor live traffic

Every hour (`MLOPS_MONITOR_SCHEDULE`), and on each event of the recorded-traffic asset, judges the last window
(`MLOPS_MONITOR_WINDOW_MINUTES`) of the requests the model server recorded for the **Production** version:

- **drift**: the window's inputs against the snapshot the version was trained on (PSI per feature, as the pipeline
  measures it); a feature drifts above `MLOPS_DRIFT_THRESHOLD`;
- **live accuracy**: the predictions labelled through the server's `POST /feedback`, against the version's validation
  accuracy.

A window with fewer requests than `MLOPS_MONITOR_MIN_REQUESTS` is not judged. When the share of drifted features is
above `MLOPS_MONITOR_DRIFT_SHARE`, or live accuracy (on at least `MLOPS_MONITOR_MIN_LABELLED` labelled predictions)
is more than `MLOPS_MONITOR_ACCURACY_DROP` below validation, `start_retraining` starts `mlops_pipeline` with the
reason, under the run id `monitor__v<version>__<window end>`: one retraining per version and window, however often the
window is judged. Each window is an MLflow run in the `MLOPS_MONITOR_EXPERIMENT` experiment; the run's note says what
was seen.

`window_end` judges the window that ends then (ISO time, UTC by default) instead of the last one.

Beside it, `compact_records` merges the many small record files of each hour that closed (an hour after its end) into
one file, safely for readers at the same time.
"""


@dag(
    dag_id="mlops_monitor",
    description="Hourly, and on new recorded traffic: drift and live accuracy of the Production model; retrain on need",
    default_args={
        "owner": "airflow",
        "retries": 1,
        "retry_delay": timedelta(seconds=SETTINGS.retry_delay),
        "execution_timeout": timedelta(seconds=SETTINGS.task_timeout),
        "show_return_value_in_logs": False,
    },
    schedule=AssetOrTimeSchedule(
        timetable=CronTriggerTimetable(SETTINGS.monitor_schedule, timezone="UTC"), assets=RECORDED_TRAFFIC
    ),
    catchup=False,
    max_active_runs=1,
    tags=["ml", "mlops", "monitoring"],
    doc_md=DOC,
    params={
        "window_end": Param(
            None,
            type=["null", "string"],
            format="date-time",
            title="Window end",
            description="Judge the window that ends at this time instead of the last one.",
        ),
    },
)
def monitor():
    @task(task_id="judge_window")
    def judge_window(**context):
        """Measure the window against the Production version, log it to MLflow and decide."""
        from ml import tasks

        return tasks.judge_window(context)

    @task.short_circuit(task_id="retraining_due")
    def retraining_due(judged):
        """Go on to start_retraining only when the window calls for a retraining not yet started."""
        return bool(judged and judged.get("trigger_run_id"))

    start_retraining = TriggerDagRunOperator(
        task_id="start_retraining",
        trigger_dag_id="mlops_pipeline",
        trigger_run_id="{{ ti.xcom_pull(task_ids='judge_window')['trigger_run_id'] }}",
        conf={"reason": "{{ ti.xcom_pull(task_ids='judge_window')['reason'] }}"},
        skip_when_already_exists=True,
        wait_for_completion=False,
        retries=0,
    )

    @task(task_id="compact_records")
    def compact_records(**context):
        """Merge the small record files of each closed hour into one (ml/records.py, compact_records)."""
        from ml import tasks

        return tasks.compact_records(context)

    retraining_due(judge_window()) >> start_retraining
    compact_records()


monitor()
