"""Every run, "no new data" runs included, first brings the registry back to a state the invariant allows.

Each test leaves the registry as an interruption or a careless hand leaves it, then runs the real DAG through
Airflow (dag.test()) on the same data, so that the run has nothing to train and only the repair can fix Production.
"""

from __future__ import annotations

import pytest
from conftest import production_markers

from ml import registry, tags
from ml.airflow_runner import run_dag
from ml.settings import Settings

pytestmark = pytest.mark.slow


@pytest.fixture
def first_run(airflow_db, mlops_env, monkeypatch) -> Settings:
    """Version 1 in Production after a healthy run; later runs see the same data and have nothing to train."""
    monkeypatch.delenv("MLOPS_FORCE_RETRAIN")
    assert run_dag().state == "success"
    assert production_markers(mlops_env, alias_only=True) == (1, [1])
    return mlops_env


def repaired(run) -> str:
    extract = run.result("extract_data")
    assert run.state == "success"
    assert extract["skipped_reason"] == "no new data", extract
    return "\n".join(extract["repaired"])


def test_a_deploy_killed_before_its_post_deploy_check_is_rolled_back_by_the_next_no_op_run(first_run):
    settings, client = first_run, registry.client_for(first_run)
    name = settings.model_name
    trained = registry.get_version(client, name, 1)
    # What a worker killed between the promotion and the post-deploy check leaves: a version that passed validation,
    # trained on the same data, in Production, with no check recorded and rollback_model never run.
    lineage = {key: value for key, value in trained.tags.items() if not key.startswith("mlops.deployment.")}
    client.create_model_version(name, trained.source, trained.run_id, tags=lineage)
    registry.promote(settings, 2, expected_current=1, actor="airflow:killed run", reason="passed validation")

    run = run_dag()
    assert "version 2 was Production but its post-deploy check never passed" in repaired(run)
    assert production_markers(settings, alias_only=True) == (1, [1])
    assert registry.get_version(client, name, 2).tags[tags.DEPLOYMENT_STATUS] == "demoted"
    last = registry.deployment_history(client, name)[-1]
    assert (last.event, last.version, last.previous_version) == ("rolled_back", 2, 1)
    assert run.result("extract_data")["production_version"] == 1 and run.tasks["rollback_model"].try_number == 0


def test_stage_and_alias_disagreeing_are_reconciled_by_the_next_no_op_run(first_run):
    settings, client = first_run, registry.client_for(first_run)
    client.transition_model_version_stage(settings.model_name, "1", "Archived")
    assert production_markers(settings, alias_only=True) == (1, [])

    assert "the stage and alias of version 1 disagreed" in repaired(run_dag())
    assert production_markers(settings, alias_only=True) == (1, [1])


def test_an_alias_moved_by_hand_to_a_version_that_failed_validation_is_demoted(first_run):
    settings, client = first_run, registry.client_for(first_run)
    rejected = run_dag(conf={"accuracy_threshold": 1.0, "force_retrain": True})
    assert rejected.result("validate_model")["validation"] == "failed"
    client.set_registered_model_alias(settings.model_name, settings.production_alias, "2")
    assert production_markers(settings, alias_only=True) == (2, [1])

    text = repaired(run_dag())
    assert "version 2 was Production but it never passed validation (validation status: failed)" in text
    assert production_markers(settings, alias_only=True) == (1, [1])
    assert registry.get_version(client, settings.model_name, 2).tags[tags.DEPLOYMENT_STATUS] == "demoted"
