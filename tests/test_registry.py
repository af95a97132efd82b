"""Registry semantics on a real MLflow store (SQLite): promotion, rollback, history, the check-then-set guard."""

from __future__ import annotations

import pytest
from conftest import production_markers

from ml import registry, tags


@pytest.fixture
def registered(mlops_env, tmp_path):
    """Three registered versions; 1 and 2 passed validation, 3 failed."""
    client = registry.client_for(mlops_env)
    registry.ensure_registered_model(client, mlops_env.model_name)
    for number, status in ((1, "passed"), (2, "passed"), (3, "failed")):
        source = tmp_path / f"model-{number}"
        source.mkdir()
        version = client.create_model_version(mlops_env.model_name, source.as_uri())
        assert int(version.version) == number
        registry.set_version_tags(client, mlops_env.model_name, number, {tags.VALIDATION_STATUS: status})
    return mlops_env, client


def test_promotion_moves_stage_and_alias_and_archives_the_replaced(registered):
    settings, client = registered
    assert registry.promote(settings, 1, expected_current=None, actor="test", reason="first") is None
    replaced = registry.promote(settings, 2, expected_current=1, actor="test", reason="better")
    assert replaced.version == 1
    assert production_markers(settings) == (2, [2])
    old = registry.get_version(client, settings.model_name, 1)
    assert old.stage == "Archived" and old.tags[tags.DEPLOYMENT_STATUS] == "archived"
    assert old.tags["mlops.deployment.replaced_by"] == "2"
    new = registry.get_version(client, settings.model_name, 2)
    assert new.tags["mlops.deployment.replaced_version"] == "1" and new.aliases == ("production",)


def test_promotion_refuses_when_production_moved_meanwhile(registered):
    settings, _ = registered
    registry.promote(settings, 1, expected_current=None, actor="run-a", reason="first")
    with pytest.raises(registry.ProductionMovedError, match="is version 1, expected None"):
        registry.promote(settings, 2, expected_current=None, actor="run-b", reason="stale decision")
    assert production_markers(settings) == (1, [1])


def test_restore_puts_the_prior_version_back_and_marks_the_candidate(registered):
    settings, client = registered
    registry.promote(settings, 1, expected_current=None, actor="test", reason="first")
    registry.promote(settings, 2, expected_current=1, actor="test", reason="second")
    after = registry.restore(settings, failed_version=2, restore_to=1, actor="test", reason="does not serve")
    assert after == 1
    assert production_markers(settings) == (1, [1])
    demoted = registry.get_version(client, settings.model_name, 2)
    assert demoted.stage == "Archived"
    assert demoted.tags[tags.DEPLOYMENT_STATUS] == "rolled_back"
    assert demoted.tags["mlops.deployment.rollback_reason"] == "does not serve"


def test_restore_with_no_prior_version_clears_production(registered):
    settings, _ = registered
    registry.promote(settings, 1, expected_current=None, actor="test", reason="first")
    assert registry.restore(settings, failed_version=1, restore_to=None, actor="test", reason="broken") is None
    assert production_markers(settings) == (None, [])


def test_restore_never_undoes_a_later_move(registered):
    settings, _ = registered
    registry.promote(settings, 1, expected_current=None, actor="test", reason="first")
    registry.promote(settings, 2, expected_current=1, actor="test", reason="second")
    assert registry.restore(settings, failed_version=1, restore_to=None, actor="test", reason="late") == 2
    assert production_markers(settings) == (2, [2])


def test_history_records_every_move_in_order(registered):
    settings, client = registered
    registry.promote(settings, 1, expected_current=None, actor="run-1", reason="first")
    registry.promote(settings, 2, expected_current=1, actor="run-2", reason="second")
    registry.restore(settings, failed_version=2, restore_to=1, actor="run-2", reason="check failed")
    events = [
        (e.event, e.version, e.previous_version, e.actor)
        for e in registry.deployment_history(client, settings.model_name)
    ]
    assert events == [
        ("promoted", 1, None, "run-1"),
        ("promoted", 2, 1, "run-2"),
        ("rolled_back", 2, 1, "run-2"),
    ]


def test_manual_rollback_to_previous_and_to_a_named_version(registered):
    settings, client = registered
    registry.promote(settings, 1, expected_current=None, actor="test", reason="first")
    registry.promote(settings, 2, expected_current=1, actor="test", reason="second")
    assert registry.manual_rollback(settings, "previous", actor="cli:ops", reason="incident") == (2, 1)
    assert production_markers(settings) == (1, [1])
    assert registry.manual_rollback(settings, 2, actor="cli:ops", reason="fixed") == (1, 2)
    last = registry.deployment_history(client, settings.model_name)[-1]
    assert (last.event, last.version, last.previous_version, last.actor) == ("manual_rollback", 2, 1, "cli:ops")


def test_a_manual_rollback_marks_the_version_it_takes_out_as_rolled_back_with_the_reason(registered):
    settings, client = registered
    registry.promote(settings, 1, expected_current=None, actor="test", reason="first")
    registry.promote(settings, 2, expected_current=1, actor="test", reason="second")
    registry.manual_rollback(settings, "previous", actor="cli:ops", reason="bad predictions")
    taken_out = registry.get_version(client, settings.model_name, 2)
    assert taken_out.stage == "Archived"
    assert taken_out.tags[tags.DEPLOYMENT_STATUS] == "rolled_back"
    assert taken_out.tags[tags.DEPLOYMENT_ROLLBACK_REASON] == "bad predictions (by cli:ops)"
    assert taken_out.tags[tags.DEPLOYMENT_RESTORED_VERSION] == "1"
    assert "Rolled back" in client.get_model_version(settings.model_name, "2").description


def test_rolling_back_to_previous_twice_undoes_the_first(registered):
    settings, _ = registered
    registry.promote(settings, 1, expected_current=None, actor="test", reason="first")
    registry.promote(settings, 2, expected_current=1, actor="test", reason="second")
    assert registry.manual_rollback(settings, "previous", actor="cli", reason="incident") == (2, 1)
    assert registry.manual_rollback(settings, "previous", actor="cli", reason="false alarm") == (1, 2)
    assert production_markers(settings) == (2, [2])


def test_previous_of_an_alias_moved_by_hand_is_the_last_version_the_service_put_in_production(registered):
    settings, client = registered
    registry.promote(settings, 1, expected_current=None, actor="test", reason="first")
    registry.promote(settings, 2, expected_current=1, actor="test", reason="second")
    client.set_registered_model_alias(settings.model_name, settings.production_alias, "3")
    assert registry.manual_rollback(settings, "previous", actor="cli", reason="undo the hand") == (3, 2)
    assert production_markers(settings) == (2, [2])


@pytest.mark.parametrize(
    ("target", "message"),
    [(3, "never passed validation"), (9, "has no version 9"), ("latest", "neither a version number"), (2, "already")],
)
def test_manual_rollback_refuses_bad_targets(registered, target, message):
    settings, _ = registered
    registry.promote(settings, 2, expected_current=None, actor="test", reason="first")
    with pytest.raises(registry.RegistryError, match=message):
        registry.manual_rollback(settings, target, actor="cli", reason="x")
    assert production_markers(settings) == (2, [2])


def test_a_version_number_beyond_what_a_registry_holds_is_no_such_version(mlops_env):
    # The registry keeps version numbers in a 32-bit column: asking the store for a larger one is its internal error.
    for target in ("999999999999999999999999999999", 2**31, 0):
        with pytest.raises(registry.RegistryError, match=f"has no version {target}$"):
            registry.manual_rollback(mlops_env, target, actor="cli", reason="x")


def test_manual_rollback_without_history_is_refused(registered):
    settings, _ = registered
    registry.promote(settings, 1, expected_current=None, actor="test", reason="first")
    with pytest.raises(registry.RegistryError, match="no previous Production version"):
        registry.manual_rollback(settings, "previous", actor="cli", reason="x")


def deployed(settings, client, version: int) -> None:
    """Promote ``version`` as a deploy that ran to the end does: its post-deploy check passed."""
    current = registry.production_version(client, settings.model_name, settings.production_alias)
    registry.promote(
        settings, version, expected_current=current.version if current else None, actor="run", reason="deploy"
    )
    registry.set_version_tags(client, settings.model_name, version, {tags.DEPLOYMENT_HEALTH_CHECK: "passed"})


def deployment_status(client, settings, version: int) -> tuple[str, str]:
    found = registry.get_version(client, settings.model_name, version).tags
    return found.get(tags.DEPLOYMENT_STATUS, ""), found.get(tags.DEPLOYMENT_DEMOTED_REASON, "")


def test_repair_leaves_a_healthy_registry_alone(registered):
    settings, client = registered
    deployed(settings, client, 1)
    deployed(settings, client, 2)
    history = registry.deployment_history(client, settings.model_name)
    assert registry.repair_production(settings, actor="test") == registry.Repair(2, ())
    assert production_markers(settings) == (2, [2])
    assert registry.deployment_history(client, settings.model_name) == history


def test_repair_makes_stage_agree_with_alias(registered):
    settings, client = registered
    deployed(settings, client, 1)
    client.transition_model_version_stage(settings.model_name, "2", "Production")
    repair = registry.repair_production(settings, actor="test")
    assert repair.production_version == 1 and "version 2 held the Production stage" in repair.actions[0]
    assert production_markers(settings) == (1, [1])
    assert deployment_status(client, settings, 2)[0] == "demoted"


def test_repair_finishes_a_move_interrupted_between_stage_and_alias(registered):
    settings, client = registered
    deployed(settings, client, 1)
    client.transition_model_version_stage(settings.model_name, "1", "Archived")  # killed before the alias moved
    client.transition_model_version_stage(settings.model_name, "2", "Production")
    assert registry.repair_production(settings, actor="test").production_version == 1
    assert production_markers(settings) == (1, [1])


def test_repair_does_not_crown_a_version_promoted_by_stage_alone(registered):
    settings, client = registered
    client.transition_model_version_stage(settings.model_name, "2", "Production")
    repair = registry.repair_production(settings, actor="test")
    assert repair.production_version is None
    assert "no deployment record puts it there" in repair.actions[0]
    assert production_markers(settings) == (None, [])
    assert deployment_status(client, settings, 2) == ("demoted", "no deployment record puts it there")


def test_repair_demotes_an_alias_moved_by_hand_to_a_failed_version(registered):
    settings, client = registered
    deployed(settings, client, 1)
    client.set_registered_model_alias(settings.model_name, settings.production_alias, "3")
    client.transition_model_version_stage(settings.model_name, "3", "Production", archive_existing_versions=True)
    repair = registry.repair_production(settings, actor="test")
    assert repair.production_version == 1
    assert "version 3 was Production but it never passed validation (validation status: failed)" in repair.actions[0]
    assert production_markers(settings) == (1, [1])
    assert deployment_status(client, settings, 3)[0] == "demoted"
    last = registry.deployment_history(client, settings.model_name)[-1]
    assert (last.event, last.version, last.previous_version, last.actor) == ("rolled_back", 3, 1, "test")


def test_repair_demotes_a_failed_version_sharing_the_stage_without_the_alias(registered):
    settings, client = registered
    deployed(settings, client, 1)
    client.transition_model_version_stage(settings.model_name, "3", "Production")
    repair = registry.repair_production(settings, actor="test")
    assert repair.production_version == 1
    assert production_markers(settings) == (1, [1])
    assert deployment_status(client, settings, 3) == (
        "demoted",
        "held the Production stage beside version 1: it never passed validation (validation status: failed)",
    )


def test_repair_finds_an_older_version_put_back_in_the_stage_by_hand(registered):
    settings, client = registered
    deployed(settings, client, 1)
    deployed(settings, client, 2)
    client.transition_model_version_stage(settings.model_name, "1", "Production")
    # Neither alias nor tags point at version 1: the stage change made it one of the most recently updated versions.
    repair = registry.repair_production(settings, actor="test")
    assert (
        repair.production_version == 2 and "version 1 held the Production stage beside version 2" in repair.actions[0]
    )
    assert production_markers(settings) == (2, [2])


def test_repair_demotes_a_validated_version_moved_in_without_a_record(registered):
    settings, client = registered
    deployed(settings, client, 1)
    client.set_registered_model_alias(settings.model_name, settings.production_alias, "2")
    client.transition_model_version_stage(settings.model_name, "2", "Production", archive_existing_versions=True)
    assert registry.repair_production(settings, actor="test").production_version == 1
    assert production_markers(settings) == (1, [1])


def test_repair_rolls_back_a_deploy_killed_before_its_post_deploy_check(registered):
    settings, client = registered
    deployed(settings, client, 1)
    registry.promote(settings, 2, expected_current=1, actor="run-2", reason="passed validation")  # then killed
    repair = registry.repair_production(settings, actor="test")
    assert repair.production_version == 1
    assert "its post-deploy check never passed" in repair.actions[0]
    assert production_markers(settings) == (1, [1])
    assert deployment_status(client, settings, 2)[0] == "demoted"
    assert registry.repair_production(settings, actor="test") == registry.Repair(1, ())


def test_repair_of_a_first_deploy_killed_before_its_check_leaves_no_production(registered):
    settings, _ = registered
    registry.promote(settings, 1, expected_current=None, actor="run-1", reason="first")
    assert registry.repair_production(settings, actor="test") == registry.Repair(
        None,
        (
            "version 1 was Production but its post-deploy check never passed (the deploy was interrupted); "
            "demoted, Production is now none",
        ),
    )
    assert production_markers(settings) == (None, [])


def test_repair_puts_back_markers_removed_by_hand(registered):
    settings, client = registered
    deployed(settings, client, 1)
    client.delete_registered_model_alias(settings.model_name, settings.production_alias)
    client.transition_model_version_stage(settings.model_name, "1", "Archived")
    assert registry.repair_production(settings, actor="test").production_version == 1
    assert production_markers(settings) == (1, [1])


def test_a_run_key_finds_its_own_version_among_look_alikes(registered):
    settings, client = registered
    keys = {1: "mlops_pipeline/manual__2026-01-01T00:00:00+00:00", 2: "mlops_pipeline/it's quoted", 3: "both ' and \""}
    for number, key in keys.items():
        registry.set_version_tags(client, settings.model_name, number, {tags.AIRFLOW_RUN_KEY: key})
    for number, key in keys.items():
        assert registry.find_version_for_run_key(client, settings.model_name, key).version == number
    assert registry.find_version_for_run_key(client, settings.model_name, "mlops_pipeline/%") is None


def test_promotion_archives_a_version_left_in_the_stage_by_an_interrupted_move(registered):
    settings, client = registered
    registry.promote(settings, 1, expected_current=None, actor="test", reason="first")
    # A move interrupted after the stage changed and before the alias: version 2 is in the stage beside version 1.
    client.transition_model_version_stage(settings.model_name, "2", "Production")
    registry.promote(settings, 3, expected_current=1, actor="test", reason="third")
    assert production_markers(settings) == (3, [3])


def test_status_shows_the_newest_versions_and_moves_unless_asked_for_all(registered, capsys):
    import json

    from ml import cli

    settings, client = registered
    for number in (4, 5, 6):
        client.create_model_version(settings.model_name, f"file:///nowhere/{number}")
    for number in (1, 2):
        registry.promote(settings, number, expected_current=number - 1 or None, actor="test", reason=f"move {number}")

    def status(*arguments: str) -> dict:
        assert cli.main(["status", "--json", *arguments]) == 0
        return json.loads(capsys.readouterr().out)

    assert [v["version"] for v in status("--last", "4")["versions"]] == [3, 4, 5, 6]
    assert [e["version"] for e in status("--last", "1")["history"]] == [2]
    everything = status("--all")
    assert [v["version"] for v in everything["versions"]] == [1, 2, 3, 4, 5, 6]
    assert [e["version"] for e in everything["history"]] == [1, 2]
    assert everything["production_version"] == 2
    with pytest.raises(SystemExit):
        cli.main(["status", "--last", "0"])
    assert "--last: expected a whole number of at least 1, got '0'" in capsys.readouterr().err


def test_status_warns_when_production_is_not_what_the_service_vouches_for(registered, capsys):
    import json

    from ml import cli

    settings, client = registered
    registry.promote(settings, 1, expected_current=None, actor="test", reason="first")
    assert cli.main(["status"]) == 0
    assert "warning:" not in capsys.readouterr().out
    # In the MLflow UI, someone moves the alias to version 3, which failed validation; the stage stays on 1.
    client.set_registered_model_alias(settings.model_name, settings.production_alias, "3")
    assert cli.main(["status"]) == 0
    shown = capsys.readouterr().out
    assert "warning: v3 holds the 'production' alias and is served, but its validation is failed" in shown
    assert "warning: v3 holds the 'production' alias but its stage is None" in shown
    assert "warning: v1 is in the Production stage without the 'production' alias" in shown
    assert cli.main(["status", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["warnings"]) == 3
