"""Every run, "no new data" runs included, first brings the registry back to a state the invariant allows.

Each test leaves the registry as an interruption or a careless hand leaves it, then runs the real DAG through
Airflow (dag.test()) on the same data, so that the run has nothing to train and only the repair can fix Production.
"""

from __future__ import annotations

import pytest

from ml import registry, tags
from ml.airflow_runner import run_dag
from ml.settings import Settings

pytestmark = pytest.mark.slow


def markers(settings: Settings) -> tuple[int | None, list[int]]:
    """(the version the Production alias names, the versions whose stage is Production)."""
    client = registry.client_for(settings)
    aliased = registry.aliased_version(client, settings.model_name, settings.production_alias)
    staged = [v.version for v in registry.list_versions(client, settings.model_name) if v.stage == "Production"]
    return (aliased.version if aliased else None), staged


@pytest.fixture
def first_run(airflow_db, mlops_env, monkeypatch) -> Settings:
    """Version 1 in Production after a healthy run; later runs see the same data and have nothing to train."""
    monkeypatch.delenv("MLOPS_FORCE_RETRAIN")
    assert run_dag().state == "success"
    assert markers(mlops_env) == (1, [1])
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
    assert markers(settings) == (1, [1])
    assert registry.get_version(client, name, 2).tags[tags.DEPLOYMENT_STATUS] == "demoted"
    last = registry.deployment_history(client, name)[-1]
    assert (last.event, last.version, last.previous_version) == ("rolled_back", 2, 1)
    assert run.result("rollback_model")["production_version"] == 1


def test_stage_and_alias_disagreeing_are_reconciled_by_the_next_no_op_run(first_run):
    settings, client = first_run, registry.client_for(first_run)
    client.transition_model_version_stage(settings.model_name, "1", "Archived")
    assert markers(settings) == (1, [])

    assert "the stage and alias of version 1 disagreed" in repaired(run_dag())
    assert markers(settings) == (1, [1])


def test_an_alias_moved_by_hand_to_a_version_that_failed_validation_is_demoted(first_run):
    settings, client = first_run, registry.client_for(first_run)
    rejected = run_dag(conf={"accuracy_threshold": 1.0, "force_retrain": True})
    assert rejected.result("validate_model")["validation"] == "failed"
    client.set_registered_model_alias(settings.model_name, settings.production_alias, "2")
    assert markers(settings) == (2, [1])

    text = repaired(run_dag())
    assert "version 2 was Production but it never passed validation (validation status: failed)" in text
    assert markers(settings) == (1, [1])
    assert registry.get_version(client, settings.model_name, 2).tags[tags.DEPLOYMENT_STATUS] == "demoted"
