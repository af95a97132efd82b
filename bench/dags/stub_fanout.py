"""The floor of the stack benchmark's fan-out: a task that lists N items, N mapped tasks that each keep a core busy
for the same CPU time, and a task after them, the shape of mlops_pipeline's plan_candidates, train_candidate and
train_model with nothing else.

Loaded only by the stack bench and test (tests/native_stack.py links it into the stack's DAGs folder), never by the
service's dags/. Run on one Celery worker and then on two, it shows how much of the mapped tasks' span a second worker
can take off on this machine and this Airflow: bench/stack_bench.py compares the pipeline's candidates with it.
"""

from datetime import datetime

from airflow.sdk import Param, dag, task


@dag(
    dag_id="stub_fanout",
    schedule=None,
    start_date=datetime(2023, 1, 1),
    catchup=False,
    tags=["bench"],
    params={
        "tasks": Param(4, type="integer", minimum=1, maximum=8, description="How many mapped tasks."),
        "cpu_seconds": Param(
            1.0, type="number", minimum=0, maximum=300, description="CPU time each mapped task spends."
        ),
    },
)
def stub_fanout():
    @task
    def plan_items(params=None):
        return [float(params["cpu_seconds"])] * int(params["tasks"])

    @task
    def busy(cpu_seconds: float):
        import time

        began = time.process_time()
        while time.process_time() - began < cpu_seconds:
            sum(range(10_000))
        return cpu_seconds

    @task
    def gather(spent):
        return {"tasks": len(list(spent))}

    gather(busy.expand(cpu_seconds=plan_items()))


stub_fanout()
