"""The registry tells its story in MLflow's UI: markdown descriptions derived from the tags, tags that stay true."""

from __future__ import annotations

import pytest

from ml import registry, tags


@pytest.fixture
def registered(mlops_env, tmp_path):
    """Three versions that passed validation, each tagged with the Airflow run that trained it."""
    client = registry.client_for(mlops_env)
    registry.ensure_registered_model(client, mlops_env.model_name)
    for number, accuracy in ((1, 0.95), (2, 0.97), (3, 0.96)):
        source = tmp_path / f"model-{number}"
        source.mkdir()
        client.create_model_version(mlops_env.model_name, source.as_uri())
        run_key = f"mlops_pipeline/run-{number}"
        registry.set_version_tags(
            client,
            mlops_env.model_name,
            number,
            {
                tags.VALIDATION_STATUS: "passed",
                "mlops.validation.accuracy": accuracy,
                "mlops.validation.threshold": 0.8,
                "mlops.validation.reasons": "all checks passed",
                "mlops.data.digest": f"{number}" * 64,
                tags.AIRFLOW_RUN_KEY: run_key,
                "mlops.airflow.url": f"http://airflow.example/dags/mlops_pipeline/runs/run-{number}",
            },
        )
    return mlops_env, client


def _version(settings, client, number):
    return registry.get_version(client, settings.model_name, number)


def test_descriptions_tell_production_history_and_why(registered):
    settings, client = registered
    registry.promote(settings, 1, expected_current=None, actor="airflow:mlops_pipeline/run-1", reason="first")
    registry.promote(settings, 2, expected_current=1, actor="airflow:mlops_pipeline/run-2", reason="better: 0.97")
    registry.set_version_tags(
        client,
        settings.model_name,
        3,
        {tags.DEPLOYMENT_STATUS: "rejected", "mlops.deployment.reason": "validation failed: below threshold"},
    )
    registry.refresh_descriptions(settings)

    model = client.get_registered_model(settings.model_name).description
    assert "**Production: version 2**, held-out accuracy 0.9700" in model
    assert "### Deployment history" in model
    newest, oldest = [line for line in model.splitlines() if "| promoted |" in line]
    assert "| v2 | v1 | [mlops_pipeline/run-2](http://airflow.example/dags/mlops_pipeline/runs/run-2) |" in newest
    assert "better: 0.97" in newest and "| v1 | \u2013 |" in oldest

    assert _version(settings, client, 2).description.startswith("**In Production** since ")
    first = _version(settings, client, 1).description
    assert first.startswith("**Superseded** by version 2 on ")
    assert "| held-out accuracy | 0.9500 |" in first and "| threshold | 0.80 |" in first
    assert f"| data digest | `{'1' * 16}` |" in first
    assert "[mlops_pipeline/run-1](http://airflow.example/dags/mlops_pipeline/runs/run-1)" in first
    assert _version(settings, client, 3).description.startswith(
        "**Rejected**, never deployed: validation failed: below threshold."
    )


def test_a_version_back_in_production_keeps_no_tag_that_says_it_left(registered):
    settings, client = registered
    registry.promote(settings, 1, expected_current=None, actor="test", reason="first")
    registry.promote(settings, 2, expected_current=1, actor="test", reason="second")
    assert "mlops.deployment.archived_at" in _version(settings, client, 1).tags
    registry.restore(settings, failed_version=2, restore_to=1, actor="test", reason="post-deploy check failed")
    registry.refresh_descriptions(settings)

    back = _version(settings, client, 1)
    assert back.stage == "Production" and back.tags[tags.DEPLOYMENT_STATUS] == "production"
    assert not set(registry.LEFT_PRODUCTION_TAGS) & set(back.tags)
    assert back.description.startswith("**In Production** again since ")
    demoted = _version(settings, client, 2).description
    assert demoted.startswith("**Rolled back** on ") and "post-deploy check failed" in demoted
    assert "Production went back to version 1" in demoted

    # A manual rollback re-promotes the rolled-back version: its rollback and restore tags no longer hold.
    registry.manual_rollback(settings, 2, actor="test", reason="fixed the server")
    again = _version(settings, client, 2)
    assert not set(registry.LEFT_PRODUCTION_TAGS + registry.RESTORED_TAGS) & set(again.tags)
    assert again.description.startswith("**In Production** since ") and "fixed the server" in again.description
    assert "**Production: version 2**" in client.get_registered_model(settings.model_name).description


def test_refreshing_twice_changes_nothing(registered):
    settings, client = registered
    registry.promote(settings, 1, expected_current=None, actor="test", reason="first")
    registry.refresh_descriptions(settings)
    before = client.get_model_version(settings.model_name, "1").last_updated_timestamp
    registry.refresh_descriptions(settings)
    assert client.get_model_version(settings.model_name, "1").last_updated_timestamp == before
