"""The approval gate before Production: a person approves or rejects a validated version in the Airflow UI.

``approve_deployment`` is Airflow's human-in-the-loop operator (``HITLOperator``), in the DAG only when the deployment
sets ``MLOPS_APPROVAL_REQUIRED``: it asks under *Required actions*, showing the candidate against Production on the
same held-out rows, the threshold, drift, the data digest and links to both MLflow runs, and waits. Its answer (who,
when, which) is its XCom; deploy_model promotes only an approved version. No answer within
``MLOPS_APPROVAL_TIMEOUT_SECONDS`` takes the default, Reject. A version that failed validation is not asked about:
the task is skipped and deploy_model records the rejection as without approval.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from airflow.providers.standard.operators.hitl import HITLOperator

from ml.results import APPROVAL_TASK, APPROVE, REJECT


class DeploymentApproval(HITLOperator):
    """Asks a person whether the validated version may replace Production; returns their answer."""

    def __init__(self, *, timeout_seconds: float, **kwargs: Any) -> None:
        super().__init__(
            task_id=APPROVAL_TASK,
            subject="Promote the validated version to Production?",
            options=[APPROVE, REJECT],
            defaults=[REJECT],
            response_timeout=timedelta(seconds=timeout_seconds),
            **kwargs,
        )
        self.timeout_seconds = timeout_seconds

    def render_template_fields(self, context: Any, jinja_env: Any = None) -> None:
        # The request is made here rather than in execute: Airflow saves the rendered fields right after rendering,
        # and the task's Rendered Templates tab should show the request the approver was asked, not a placeholder.
        from ml import tasks

        super().render_template_fields(context, jinja_env)
        self.subject, self.body = tasks.approval_request(context, self.timeout_seconds)

    def execute_complete(self, context: Any, event: dict[str, Any]) -> Any:
        from ml import tasks

        answer = super().execute_complete(context, event)
        return tasks.approval_answer(answer, timed_out=bool(event.get("timedout")))
