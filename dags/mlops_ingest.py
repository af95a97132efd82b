"""Land a new batch of data in the configured source and announce it as an update of the training-data asset.

Thin on purpose, like mlops_pipeline: the one task imports ``ml.ingest`` inside its body and makes one call. Its
outlet is the asset mlops_pipeline is scheduled on, so each landed batch triggers a retraining run.
"""

from datetime import datetime, timedelta

from airflow.sdk import Param, dag, task

from ml.assets import training_data_asset
from ml.settings import Settings

SETTINGS = Settings.from_env_or_embedded()
TRAINING_DATA = training_data_asset(SETTINGS)

DOC = """
### Land a batch of new data

Writes the next batch of the held-back breast cancer data into the data source that `mlops_pipeline` reads
(`MLOPS_DATA_SOURCE`: a folder of CSV/Parquet files, or a SQL table) and updates the training-data asset, which
triggers `mlops_pipeline`. The first run lands the initial bulk (batch 0); later runs land batches 1, 2, ... (each a
fixed slice of a seeded permutation of the data set, so the same on every machine). When every batch has landed, or
the requested one already has, the task is skipped and no asset event is emitted.

`shift` distorts the batch on its way in, to show drift: `{"mean radius": 1.5}` multiplies a feature,
`{"worst area": {"multiply": 1.2, "offset": 10}}` multiplies then offsets, `"*"` means every feature.

`from_feedback` lands, instead, the requests the model server recorded between `since` and `until` (optionally of one
`version`) that received a true label on `POST /feedback`, as rows of the training data (a folder source only).
Each labelled request lands once: one already landed is left out, and a window with nothing new skips the task.
A window without labelled requests, a label that is no class of the training data, or records without the training
data's features fail the task, saying so.
"""


@dag(
    dag_id="mlops_ingest",
    description="Land a batch of new training data and update the training-data asset",
    default_args={
        "owner": "airflow",
        "retries": 1,
        "retry_delay": timedelta(seconds=SETTINGS.retry_delay),
        "execution_timeout": timedelta(seconds=SETTINGS.task_timeout),
    },
    schedule=None,
    start_date=datetime(2023, 1, 1),
    catchup=False,
    max_active_runs=1,
    tags=["ml", "mlops", "data"],
    doc_md=DOC,
    params={
        "batch": Param(
            None,
            type=["null", "integer"],
            minimum=0,
            title="Batch",
            description="The batch to land; empty for the next one (batch 0, the initial bulk, on the first run).",
        ),
        "shift": Param(
            {},
            type="object",
            title="Shift",
            description='Distort the batch to show drift, e.g. {"mean radius": 1.5} or '
            '{"*": {"multiply": 1.1, "offset": 0}}. Empty: the rows as they are.',
        ),
        "file_format": Param(
            "csv",
            type="string",
            enum=["csv", "parquet"],
            title="File format",
            description="Format of the batch file in a folder source (ignored for a SQL table).",
        ),
        "from_feedback": Param(
            False,
            type="boolean",
            title="From feedback",
            description="Land the recorded requests of the window below that received a true label on POST /feedback "
            "(and did not land before), instead of a batch of the held-back data.",
        ),
        "since": Param(
            None,
            type=["null", "string"],
            title="Since",
            description="With from_feedback: the start of the window, an ISO time (UTC without an offset) or a span "
            "back from now (90m, 24h, 7d).",
        ),
        "until": Param(
            None,
            type=["null", "string"],
            title="Until",
            description="With from_feedback: the end of the window, as since; empty for now.",
        ),
        "version": Param(
            None,
            type=["null", "integer"],
            minimum=1,
            title="Version",
            description="With from_feedback: only the requests this model version answered; empty for all.",
        ),
    },
)
def ingest_pipeline():
    @task(task_id="land_batch", outlets=[TRAINING_DATA])
    def land_batch(**context):
        """Land the batch; the asset event it emits carries the batch number, rows, digest and shift."""
        from ml import tasks

        return tasks.land_batch(context, TRAINING_DATA)

    land_batch()


ingest_pipeline()
