"""The baseline of the stack benchmark: mlops_pipeline's graph with seven empty tasks.

Loaded only by the stack test (tests/test_stack.py links it into the stack's DAGs folder), never by the service's
dags/. The time from REST trigger to success of this DAG is what Airflow itself costs on the stack; the pipeline's
trigger-to-Production time is measured against it.
"""

from datetime import datetime

from airflow.sdk import dag, task


@dag(
    dag_id="stub_pipeline",
    schedule=None,
    start_date=datetime(2023, 1, 1),
    catchup=False,
    tags=["bench"],
)
def stub_pipeline():
    @task
    def extract_data():
        return {"data_extracted": True, "records": 0}

    @task
    def transform_data(result):
        return {"data_transformed": True, "features": 0}

    @task
    def train_model(result):
        return {"model_trained": True, "accuracy": 0.0}

    @task
    def validate_model(result):
        return {"validation": "passed", "accuracy": 0.0}

    @task(trigger_rule="none_failed")
    def deploy_model(result):
        return {"deployed": True}

    @task
    def archive_model(result):
        return {"archived": True}

    @task(trigger_rule="all_done")
    def rollback_model():
        return {"rollback_performed": False}

    deployed = deploy_model(validate_model(train_model(transform_data(extract_data()))))
    archive_model(deployed)
    deployed >> rollback_model()


stub_pipeline()
