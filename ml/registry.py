"""The only module that changes the MLflow Model Registry.

Production is two markers on the same version: the deprecated-but-supported stage ``Production`` and an alias
(``production`` by default), which is what ``models:/<name>@<alias>`` URIs resolve. Every function that moves
Production moves both, under a lock, and records the move as tags: the latest record on the version itself and one
history entry on the registered model, so the registry alone tells what was in Production, when and why.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import re
import sqlite3
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mlflow.entities.model_registry import ModelVersion, RegisteredModel
from mlflow.exceptions import MlflowException
from mlflow.tracking._model_registry.client import ModelRegistryClient

from ml import tags
from ml.settings import Settings, shown_value
from ml.task_logs import mlflow_progress_as_info
from mlflow import MlflowClient

log = logging.getLogger(__name__)

PRODUCTION_STAGE = "Production"
ARCHIVED_STAGE = "Archived"
# "skipped": the operator switched the post-deploy check off (MLOPS_POST_DEPLOY_CHECK=false).
HEALTHY_CHECKS = frozenset({"passed", "skipped"})
# The largest version number a registry can hold: MLflow stores it in a 32-bit integer column, and asking a store for
# a larger one is an internal error of the store, not "no such version".
LARGEST_VERSION = 2**31 - 1
# Tags that say a version left Production; a version back in Production must not keep them (its history stays in
# the registered model's deployment history).
LEFT_PRODUCTION_TAGS = (
    tags.DEPLOYMENT_ARCHIVED_AT,
    tags.DEPLOYMENT_REPLACED_BY,
    tags.DEPLOYMENT_ROLLED_BACK_AT,
    tags.DEPLOYMENT_ROLLBACK_REASON,
    tags.DEPLOYMENT_RESTORED_VERSION,
)
RESTORED_TAGS = (tags.DEPLOYMENT_RESTORED_AT, tags.DEPLOYMENT_RESTORED_BY)
LOGGED_MODEL_URI = re.compile(r"models:/m-[0-9a-f]+")
# The registered model's page shows this many of the latest moves of Production; `mlops status --all` lists them all.
MODEL_PAGE_MOVES = 50

# How many of the most recently updated versions a repair looks at for one put in the Production stage another way
# than by our moves (by hand, or by a move cut short); each run repairs twice, so it is the changes since the last run.
RECENTLY_UPDATED = 50

# The descriptions this process's changes made stale, until refresh_descriptions rewrites them: version pages by
# registered model, and the registered models whose own page (Production and its history) changed. A task runs in a
# process of its own, so each step rewrites only the pages its own changes touched, whatever the registry's size. A
# page is derived from the store's tags alone, so rewriting one that did not need it is harmless.
_stale_version_pages: dict[str, set[int]] = {}
_stale_model_pages: set[str] = set()


def _mark_stale(name: str, version: int | str | None = None, *, model_page: bool = False) -> None:
    if version is not None:
        _stale_version_pages.setdefault(name, set()).add(int(version))
    if model_page:
        _stale_model_pages.add(name)


class RegistryError(RuntimeError):
    """The registry refused an operation, or the requested change is not allowed."""


class ProductionMovedError(RegistryError):
    """Production changed between reading it and moving it: another run or a manual rollback got there first."""


@dataclass(frozen=True)
class VersionInfo:
    version: int
    stage: str
    aliases: tuple[str, ...]
    run_id: str | None
    source: str | None
    created_at: datetime
    tags: dict[str, str]
    description: str = ""

    @classmethod
    def from_model_version(cls, model_version: ModelVersion) -> VersionInfo:
        return cls(
            version=int(model_version.version),
            stage=model_version.current_stage or "None",
            aliases=tuple(model_version.aliases or ()),
            run_id=model_version.run_id,
            source=model_version.source,
            created_at=datetime.fromtimestamp(model_version.creation_timestamp / 1000, UTC),
            tags=dict(model_version.tags or {}),
            description=model_version.description or "",
        )


# The history event of a version a person did not approve for Production: the one entry that is no move of it.
NOT_APPROVED = "not_approved"


@dataclass(frozen=True)
class HistoryEvent:
    at: str
    event: str
    version: int
    previous_version: int | None
    actor: str
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# Every function here that takes a client takes either: MlflowClient (what the pipeline's steps hold) or the registry
# side alone (what the command line and the moves of Production use).
Client = MlflowClient | ModelRegistryClient


def client_for(settings: Settings) -> MlflowClient:
    _prepare_local_stores(settings)
    return MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.registry_uri)


def registry_client_for(settings: Settings) -> ModelRegistryClient:
    """A client of the Model Registry alone. MlflowClient also opens the tracking store, which for a SQLite file
    means importing and checking MLflow's whole tracking schema: a second or more that registry work never uses."""
    _prepare_local_stores(settings)
    return ModelRegistryClient(settings.registry_uri or settings.tracking_uri, settings.tracking_uri)


def _prepare_local_stores(settings: Settings) -> None:
    for uri in (settings.tracking_uri, settings.registry_uri):
        if uri and uri.startswith("sqlite:///"):
            use_write_ahead_log(uri.removeprefix("sqlite:///"))


@functools.cache
def use_write_ahead_log(database: str) -> None:
    """Put a local SQLite store in WAL mode: commits cost a third, and readers (the model server) never block
    the pipeline's writes. The mode is stored in the file, so this is needed once per file."""
    path = Path(database)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with contextlib.closing(sqlite3.connect(path, timeout=30)) as connection:
            connection.execute("PRAGMA journal_mode=WAL")
    except sqlite3.DatabaseError as error:
        raise RegistryError(f"the MLflow store {path} is not an SQLite database: {error}") from error


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _writes(client: Client) -> ModelRegistryClient:
    """The registry side of ``client``, for changes to the model this module manages.

    MlflowClient first checks, on every tag, stage or alias change, that the name is not a prompt, by fetching the
    whole registered model: every version (for its latest-per-stage list) and every tag, the deployment history
    included. That made each change cost as much as the registry is long. The registry client makes the same change
    with one request.
    """
    return client._get_registry_client() if isinstance(client, MlflowClient) else client


def ensure_registered_model(client: Client, name: str) -> None:
    # A model with a version exists; asking for one version is cheap where fetching the model reads all of them.
    if client.search_model_versions(f"name = {_literal(name)}", max_results=1):
        return
    try:
        client.get_registered_model(name)
    except MlflowException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        try:
            client.create_registered_model(name, description="Trained and promoted by the mlops_pipeline Airflow DAG.")
        except MlflowException as create_error:
            if create_error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise


def get_version(client: Client, name: str, version: int | str) -> VersionInfo:
    try:
        return VersionInfo.from_model_version(client.get_model_version(name, str(version)))
    except MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise RegistryError(f"model {name!r} has no version {version}") from error
        raise


def load_uri(name: str, info: VersionInfo) -> str:
    """The URI to load a version's model from: the logged model it was registered from, when it was.

    Same files as ``models:/<name>/<version>``, but MLflow resolves that URI through MlflowClient, which first fetches
    the whole registered model (every history tag) to rule out a prompt: a cost that grows with the registry.
    """
    if info.source and LOGGED_MODEL_URI.fullmatch(info.source):
        return info.source
    return f"models:/{name}/{info.version}"


def list_versions(client: Client, name: str, model: RegisteredModel | None = None) -> list[VersionInfo]:
    """Every version, oldest first, with their aliases (from ``model`` when the caller has fetched it already)."""
    versions = client.search_model_versions(f"name = {_literal(name)}")
    return sorted(_with_aliases(client, name, versions, model), key=lambda v: v.version)


def _with_aliases(
    client: Client, name: str, versions: list[ModelVersion], model: RegisteredModel | None = None
) -> list[VersionInfo]:
    if not versions:
        return []
    # Searching versions leaves their aliases out; the registered model has them all.
    aliases_by_version: dict[int, list[str]] = {}
    for alias, version in ((model or client.get_registered_model(name)).aliases or {}).items():
        aliases_by_version.setdefault(int(version), []).append(alias)
    infos = []
    for model_version in versions:
        info = VersionInfo.from_model_version(model_version)
        infos.append(replace(info, aliases=tuple(sorted(aliases_by_version.get(info.version, [])))))
    return infos


def versions_tagged(client: Client, name: str, key: str, value: str) -> list[VersionInfo]:
    """The versions whose tag ``key`` is ``value``, oldest first: one filtered search, whatever the registry's size."""
    try:
        condition = f"name = {_literal(name)} AND tags.`{key}` = {_literal(value)}"
    except ValueError:
        return [info for info in list_versions(client, name) if info.tags.get(key) == value]
    found = client.search_model_versions(condition, order_by=["version_number ASC"])
    return [VersionInfo.from_model_version(model_version) for model_version in found]


def recent_versions(client: Client, name: str, limit: int, model: RegisteredModel | None = None) -> list[VersionInfo]:
    """The ``limit`` newest versions, oldest first, with their aliases (from ``model`` when given)."""
    found = client.search_model_versions(
        f"name = {_literal(name)}", max_results=limit, order_by=["version_number DESC"]
    )
    return sorted(_with_aliases(client, name, found, model), key=lambda v: v.version)


def registered_model(client: Client, name: str) -> RegisteredModel | None:
    """The registered model, aliases and tags (the deployment history) included; None when there is none.

    One fetch that costs as much as the registry is long: callers that need aliases and history fetch it once.
    """
    try:
        return client.get_registered_model(name)
    except MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise


def find_version_for_run_key(client: Client, name: str, run_key: str) -> VersionInfo | None:
    """The version already registered for an Airflow DAG run, so that a retried train_model registers nothing new."""
    matches = versions_tagged(client, name, tags.AIRFLOW_RUN_KEY, run_key)
    return matches[0] if matches else None


def aliased_version(client: Client, name: str, alias: str) -> VersionInfo | None:
    """The version ``alias`` names, or None when the alias (or the model) does not exist."""
    try:
        return VersionInfo.from_model_version(client.get_model_version_by_alias(name, alias))
    except MlflowException as error:
        if error.error_code not in {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"}:
            raise
        return None


def production_version(client: Client, name: str, alias: str) -> VersionInfo | None:
    """The version the Production alias points at; falls back to the stage for registries promoted by hand."""
    aliased = aliased_version(client, name, alias)
    if aliased is not None:
        return aliased
    return latest_in_production_stage(client, name)


def latest_in_production_stage(client: Client, name: str) -> VersionInfo | None:
    """The newest version with stage Production. MLflow's SQL store reads every version to answer: only asked when
    the Production alias is missing."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            latest = client.get_latest_versions(name, stages=[PRODUCTION_STAGE])
    except MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    return VersionInfo.from_model_version(latest[0]) if latest else None


def set_version_tags(client: Client, name: str, version: int, values: dict[str, Any]) -> None:
    _mark_stale(name, version)
    for key, value in values.items():
        _writes(client).set_model_version_tag(name, str(version), key, _tag_value(value))


def register_version(settings: Settings, model_uri: str, version_tags: dict[str, str]) -> int:
    """Register a logged model (``models:/<model id>``, what ``log_model`` returns) as a new version of the
    configured registered model, which must exist; returns its number.

    ``mlflow.register_model`` would first try to create the registered model, and the store answers "already exists"
    only after reading the whole model: every version and every history tag.
    """
    if not LOGGED_MODEL_URI.fullmatch(model_uri):
        raise RegistryError(f"{model_uri!r} is not the URI of a logged model (models:/<model id>)")
    with mlflow_progress_as_info():
        registered = registry_client_for(settings).create_model_version(
            settings.model_name, source=model_uri, tags=version_tags, model_id=model_uri.removeprefix("models:/")
        )
    log.info("registered %s version %s from %s", settings.model_name, registered.version, model_uri)
    _mark_stale(settings.model_name, registered.version)
    return int(registered.version)


def drop_version_tags(client: Client, name: str, version: int, keys: tuple[str, ...]) -> None:
    present = get_version(client, name, version).tags
    for key in keys:
        if key in present:
            _mark_stale(name, version)
            _writes(client).delete_model_version_tag(name, str(version), key)


@contextmanager
def production_lock(settings: Settings) -> Iterator[None]:
    """Serialise moves of Production among the processes that share this machine's MLOPS_HOME.

    Moves are also guarded by a check of the expected current version, which is what protects runs on
    different machines (see :func:`promote`).
    """
    lock_path = Path(settings.home) / "locks" / f"{settings.model_name}.production.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def promote(
    settings: Settings,
    version: int,
    *,
    expected_current: int | None,
    actor: str,
    reason: str,
    event: str = "promoted",
) -> VersionInfo | None:
    """Make ``version`` Production (stage and alias); archive and tag the version it replaces.

    ``expected_current`` is the Production version the caller decided against. If Production has moved since, the
    move is refused with :class:`ProductionMovedError` and nothing changes. Returns the replaced version, if any.
    """
    client = registry_client_for(settings)
    name, alias = settings.model_name, settings.production_alias
    with production_lock(settings):
        current = production_version(client, name, alias)
        current_number = current.version if current else None
        if current_number != expected_current:
            raise ProductionMovedError(
                f"Production of {name!r} is version {current_number}, expected {expected_current}: "
                "another run or a manual rollback moved it; nothing was changed"
            )
        get_version(client, name, version)
        at = utc_now()
        _move_production(client, name, alias, version)
        if current is not None and current.version != version:
            set_version_tags(
                client,
                name,
                current.version,
                {
                    tags.DEPLOYMENT_STATUS: "archived",
                    tags.DEPLOYMENT_ARCHIVED_AT: at,
                    tags.DEPLOYMENT_REPLACED_BY: version,
                },
            )
        set_version_tags(
            client,
            name,
            version,
            {
                tags.DEPLOYMENT_STATUS: "production",
                tags.DEPLOYMENT_EVENT: event,
                tags.DEPLOYMENT_PROMOTED_AT: at,
                tags.DEPLOYMENT_PROMOTED_BY: actor,
                tags.DEPLOYMENT_REASON: reason,
                tags.DEPLOYMENT_REPLACED_VERSION: current_number if current_number is not None else "none",
            },
        )
        drop_version_tags(client, name, version, (*LEFT_PRODUCTION_TAGS, *RESTORED_TAGS))
        record_history(client, name, HistoryEvent(at, event, version, current_number, actor, reason))
        log.info("Production of %s: version %s -> %s (%s)", name, current_number, version, reason)
        return current


def restore(
    settings: Settings,
    *,
    failed_version: int,
    restore_to: int | None,
    actor: str,
    reason: str,
) -> int | None:
    """Undo a promotion of ``failed_version``: Production goes back to ``restore_to`` (or to none).

    Only acts while ``failed_version`` is still Production, so a rollback never undoes a later, healthy move.
    The demoted candidate is tagged ``rolled_back``. Returns the Production version afterwards.
    """
    client = registry_client_for(settings)
    name, alias = settings.model_name, settings.production_alias
    with production_lock(settings):
        current = production_version(client, name, alias)
        current_number = current.version if current else None
        at = utc_now()
        if current_number == failed_version:
            if restore_to is not None:
                _move_production(client, name, alias, restore_to)
                set_version_tags(
                    client,
                    name,
                    restore_to,
                    {
                        tags.DEPLOYMENT_STATUS: "production",
                        tags.DEPLOYMENT_EVENT: "restored",
                        tags.DEPLOYMENT_RESTORED_AT: at,
                        tags.DEPLOYMENT_RESTORED_BY: actor,
                    },
                )
                drop_version_tags(client, name, restore_to, LEFT_PRODUCTION_TAGS)
            else:
                _clear_production(client, name, alias, failed_version)
            record_history(client, name, HistoryEvent(at, "rolled_back", failed_version, restore_to, actor, reason))
            current_number = restore_to
        _mark_rolled_back(client, name, failed_version, at, reason, restore_to)
        log.info("rolled back %s version %s; Production is %s", name, failed_version, current_number)
        return current_number


@dataclass(frozen=True)
class Repair:
    """What :func:`repair_production` found and did: the Production version afterwards, and one line per change."""

    production_version: int | None
    actions: tuple[str, ...]


def repair_production(settings: Settings, *, actor: str) -> Repair:
    """Bring Production back to a state the invariant allows, whatever interrupted or tampered with it.

    Production may only be a version that passed validation, that a move of ours put there (its deployment status
    is ``production``), and whose post-deploy check passed if it got there by promotion (a manual rollback or a
    restore puts back a version an operator or the history vouches for). Anything else holding the Production stage
    or alias (an interrupted deploy, an alias moved by hand, a second version in the stage) is demoted and tagged
    why, and the newest version the deployment history vouches for is restored (or none); the repair is recorded in
    the history. Stage and alias are made to agree.

    A healthy registry costs a handful of requests, whatever its size.
    """
    client = registry_client_for(settings)
    name, alias = settings.model_name, settings.production_alias
    with production_lock(settings):
        aliased = aliased_version(client, name, alias)
        in_stage = _versions_in_production_stage(client, name, alias)
        current = aliased.version if aliased else (in_stage[-1] if in_stage else None)
        if current is None:  # no markers: a version our moves left in Production lost them by hand
            tagged = versions_tagged(client, name, tags.DEPLOYMENT_STATUS, "production")
            current = tagged[-1].version if tagged else None
        problem = _production_problem(get_version(client, name, current)) if current is not None else None
        # A problem is only ever found with a current version; the checks of current say so to the type checker.
        target = current if problem is None or current is None else _last_vouched_version(client, name, exclude=current)

        at, actions = utc_now(), []
        for stray in in_stage:
            if stray not in {current, target}:
                why = _production_problem(get_version(client, name, stray)) or f"version {current} has the alias"
                _demote(client, name, stray, at, f"held the Production stage beside version {current}: {why}")
                actions.append(f"version {stray} held the Production stage beside version {current} ({why}); archived")
        if problem is not None and current is not None:
            _demote(client, name, current, at, problem)
            restored = f"version {target} restored" if target is not None else "Production is now none"
            actions.append(f"version {current} was Production but {problem}; demoted, {restored}")
        if target is None:
            if aliased is not None:
                _mark_stale(name, aliased.version, model_page=True)
                _writes(client).delete_registered_model_alias(name, alias)
        elif aliased is None or aliased.version != target or target not in in_stage:
            if problem is None:
                actions.append(f"the stage and alias of version {target} disagreed; both name it now")
            _move_production(client, name, alias, target)
            if problem is not None:
                set_version_tags(
                    client, name, target, {tags.DEPLOYMENT_STATUS: "production", tags.DEPLOYMENT_EVENT: "restored"}
                )
        if problem is not None and current is not None:
            record_history(client, name, HistoryEvent(at, "rolled_back", current, target, actor, f"repair: {problem}"))
        for action in actions:
            log.warning("%s: %s", name, action)
        return Repair(target, tuple(actions))


def _versions_in_production_stage(client: Client, name: str, alias: str) -> list[int]:
    candidates = _production_stage_candidates(client, name, alias)
    return sorted(v for v in candidates if get_version(client, name, v).stage == PRODUCTION_STAGE)


def _production_problem(info: VersionInfo) -> str | None:
    """Why the version may not be Production; None when it may."""
    validation = info.tags.get(tags.VALIDATION_STATUS, "none")
    if validation != "passed":
        return f"it never passed validation (validation status: {validation})"
    if info.tags.get(tags.DEPLOYMENT_STATUS) != "production":
        return "no deployment record puts it there"
    return _unhealthy(info, info.tags.get(tags.DEPLOYMENT_EVENT, "promoted"))


def _unhealthy(info: VersionInfo, event: str) -> str | None:
    if event == "promoted" and info.tags.get(tags.DEPLOYMENT_HEALTH_CHECK) not in HEALTHY_CHECKS:
        return "its post-deploy check never passed (the deploy was interrupted)"
    return None


def _last_vouched_version(client: Client, name: str, exclude: int) -> int | None:
    """The newest version the deployment history put in Production that may be Production again (not ``exclude``)."""
    for event in reversed(deployment_history(client, name)):
        candidate = production_after(event)
        if candidate is None or candidate == exclude:
            continue
        try:
            info = get_version(client, name, candidate)
        except RegistryError:
            continue
        if info.tags.get(tags.VALIDATION_STATUS) == "passed" and _unhealthy(info, event.event) is None:
            return candidate
    return None


def production_after(event: HistoryEvent) -> int | None:
    """The version a history event left in Production."""
    return event.previous_version if event.event == "rolled_back" else event.version


def _demote(client: Client, name: str, version: int, at: str, reason: str) -> None:
    if get_version(client, name, version).stage == PRODUCTION_STAGE:
        _transition(client, name, version, ARCHIVED_STAGE)
    set_version_tags(
        client,
        name,
        version,
        {
            tags.DEPLOYMENT_STATUS: "demoted",
            tags.DEPLOYMENT_DEMOTED_AT: at,
            tags.DEPLOYMENT_DEMOTED_REASON: reason,
        },
    )


def mark_rolled_back_if_demoted(settings: Settings, version: int, reason: str) -> bool:
    """Tag a version that was promoted and has since left Production (e.g. by an interrupted rollback)."""
    client = registry_client_for(settings)
    info = get_version(client, settings.model_name, version)
    if info.tags.get(tags.DEPLOYMENT_STATUS) != "production" or info.stage == PRODUCTION_STAGE:
        return False
    _mark_rolled_back(client, settings.model_name, version, utc_now(), reason, None)
    return True


def _mark_rolled_back(client: Client, name: str, version: int, at: str, reason: str, restored: int | None) -> None:
    info = get_version(client, name, version)
    if info.stage == PRODUCTION_STAGE:
        return
    if info.stage != ARCHIVED_STAGE:
        _transition(client, name, version, ARCHIVED_STAGE)
    set_version_tags(
        client,
        name,
        version,
        {
            tags.DEPLOYMENT_STATUS: "rolled_back",
            tags.DEPLOYMENT_ROLLED_BACK_AT: at,
            tags.DEPLOYMENT_ROLLBACK_REASON: reason,
            tags.DEPLOYMENT_RESTORED_VERSION: restored if restored is not None else "none",
        },
    )


def _move_production(client: Client, name: str, alias: str, version: int) -> None:
    # Archiving the others one by one instead of archive_existing_versions=True: MLflow's bulk archive query fails
    # on PostgreSQL through psycopg 3 (integer <> character varying).
    for other in _production_stage_candidates(client, name, alias) - {version}:
        if get_version(client, name, other).stage == PRODUCTION_STAGE:
            _transition(client, name, other, ARCHIVED_STAGE)
    _transition(client, name, version, PRODUCTION_STAGE)
    _mark_stale(name, version, model_page=True)
    _writes(client).set_registered_model_alias(name, alias, str(version))


def _production_stage_candidates(client: Client, name: str, alias: str) -> set[int]:
    """Every version that can have stage Production, found without listing the registry.

    Moves made here leave Production on the aliased version and on versions tagged ``production`` (until a move tags
    them ``archived``). Any other way into the stage, a move cut short or a hand in the MLflow UI, is a stage change,
    which stamps the version as updated: it is among the most recently updated versions.
    """
    found = {info.version for info in versions_tagged(client, name, tags.DEPLOYMENT_STATUS, "production")}
    aliased = aliased_version(client, name, alias)
    if aliased is not None:
        found.add(aliased.version)
    recently_updated = client.search_model_versions(
        f"name = {_literal(name)}", max_results=RECENTLY_UPDATED, order_by=["last_updated_timestamp DESC"]
    )
    return found | {int(v.version) for v in recently_updated if v.current_stage == PRODUCTION_STAGE}


def _clear_production(client: Client, name: str, alias: str, version: int) -> None:
    _transition(client, name, version, ARCHIVED_STAGE)
    _mark_stale(name, version, model_page=True)
    try:
        _writes(client).delete_registered_model_alias(name, alias)
    except MlflowException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise


def _transition(client: Client, name: str, version: int, stage: str) -> None:
    _mark_stale(name, version)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        _writes(client).transition_model_version_stage(name, str(version), stage)


def record_history(client: Client, name: str, event: HistoryEvent) -> None:
    _mark_stale(name, model_page=True)
    _writes(client).set_registered_model_tag(name, *history_tag(event))


def history_tag(event: HistoryEvent) -> tuple[str, str]:
    """The registered-model tag (key, value) that records ``event``; keys sort in time order."""
    stamp = datetime.fromisoformat(event.at).astimezone(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    return f"{tags.HISTORY_PREFIX}{stamp}.v{event.version}", json.dumps(event.as_dict(), sort_keys=True)


def deployment_history(client: Client, name: str) -> list[HistoryEvent]:
    """Every move of Production, oldest first, read from the registered model's tags alone (the refusals to approve
    a version, which moved nothing, left out)."""
    model = registered_model(client, name)
    return [event for event in history_of(name, model.tags or {}) if event.event != NOT_APPROVED] if model else []


def record_approval_refusal(
    client: Client, name: str, version: int, production: int | None, *, actor: str, reason: str
) -> None:
    """Record in the deployment history that ``version`` was not approved for Production (who said so, and when, is
    in ``reason``); Production stays ``production``."""
    record_history(client, name, HistoryEvent(utc_now(), NOT_APPROVED, version, production, actor, reason))


def history_of(name: str, model_tags: dict[str, str]) -> list[HistoryEvent]:
    """The deployment history recorded in a registered model's tags, oldest first."""
    events = []
    for key, value in sorted(model_tags.items()):
        if not key.startswith(tags.HISTORY_PREFIX):
            continue
        try:
            data = json.loads(value)
            events.append(
                HistoryEvent(
                    at=str(data["at"]),
                    event=str(data["event"]),
                    version=int(data["version"]),
                    previous_version=_int_or_none(data.get("previous_version")),
                    actor=str(data.get("actor", "")),
                    reason=str(data.get("reason", "")),
                )
            )
        except (ValueError, TypeError, KeyError, AttributeError) as error:
            # A tag edited by hand must not hide the rest of the history, nor stop a rollback that reads it.
            log.warning("tag %s of %s is not a deployment record (%s); skipped", key, name, error)
    return events


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)


def previous_production_version(client: Client, name: str, current: int | None) -> int | None:
    """The version that was Production before ``current`` became it, per the deployment history (a rollback's
    previous version included, so that rolling back twice undoes the first). When ``current`` is in no entry (the
    alias was moved by hand), the last version the service put in Production."""
    history = deployment_history(client, name)
    for event in reversed(history):
        if event.version == current:
            return event.previous_version
    return history[-1].version if history and history[-1].version != current else None


def manual_rollback(settings: Settings, target: int | str, *, actor: str, reason: str) -> tuple[int | None, int]:
    """Put ``target`` (a version number, or ``"previous"``) back in Production.

    Refuses a version that does not exist or never passed validation. Returns (replaced version, new version).
    """
    client = registry_client_for(settings)
    name = settings.model_name
    current = production_version(client, name, settings.production_alias)
    current_number = current.version if current else None
    if str(target).strip().lower() == "previous":
        resolved = previous_production_version(client, name, current_number)
        if resolved is None:
            raise RegistryError(
                f"model {name!r} has no previous Production version to roll back to (Production is {current_number})"
            )
    else:
        try:
            resolved = int(str(target).strip())
        except ValueError:
            raise RegistryError(
                f"rollback target {shown_value(target)} is neither a version number nor 'previous'"
            ) from None
        if not 1 <= resolved <= LARGEST_VERSION:
            raise RegistryError(f"model {name!r} has no version {shown_value(resolved)}")
    info = get_version(client, name, resolved)
    if info.tags.get(tags.VALIDATION_STATUS) != "passed":
        raise RegistryError(
            f"version {resolved} of {name!r} never passed validation "
            f"(validation status: {info.tags.get(tags.VALIDATION_STATUS, 'none')}); refusing to put it in Production"
        )
    if resolved == current_number:
        raise RegistryError(f"version {resolved} of {name!r} is already in Production")
    promote(settings, resolved, expected_current=current_number, actor=actor, reason=reason, event="manual_rollback")
    if current_number is not None:
        # The version taken out says why on its own page, not only in the model's history: it was rolled back.
        _mark_rolled_back(client, name, current_number, utc_now(), f"{reason} (by {actor})", resolved)
    refresh_descriptions(settings)
    return current_number, resolved


def _literal(value: str) -> str:
    """``value`` as a string literal of MLflow's search filters, which take either quote and unescape neither."""
    for quote in ("'", '"'):
        if quote not in value:
            return f"{quote}{value}{quote}"
    raise ValueError(f"{value!r} has both kinds of quote; a search filter cannot express it")


def _tag_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6f}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return str(value)


def refresh_descriptions(settings: Settings) -> None:
    """Write the markdown descriptions of the pages this process's changes made stale: each version it changed and,
    when Production moved, the registered model's.

    Derived from the tags and the deployment history alone (:mod:`ml.registry_docs`), so calling this again, or after
    a change made elsewhere, always converges on the same text. Costs a request per changed version, plus a few for
    the model's page when Production moved, however many versions the registry holds.
    """
    from ml import registry_docs

    name = settings.model_name
    client = client_for(settings)
    for number in sorted(_stale_version_pages.get(name, ())):
        try:
            info = get_version(client, name, number)
        except MlflowException as error:
            if error.error_code == "RESOURCE_DOES_NOT_EXIST":
                continue
            raise
        text = registry_docs.version_description(info.version, info.stage, info.tags)
        if text != info.description:
            _writes(client).update_model_version(name, str(info.version), description=text)
    _stale_version_pages.pop(name, None)
    if name not in _stale_model_pages:
        return
    model = registered_model(client, name)
    if model is None:
        return
    current = production_version(client, name, settings.production_alias)
    history = history_of(name, model.tags or {})
    # The latest moves' actors are the Airflow runs of recent versions; older rows keep the actor as plain text.
    newest = client.search_model_versions(
        f"name = {_literal(name)}", max_results=2 * MODEL_PAGE_MOVES, order_by=["version_number DESC"]
    )
    urls = {
        f"airflow:{run_key}": url
        for run_key, url in ((v.tags.get(tags.AIRFLOW_RUN_KEY), v.tags.get(tags.AIRFLOW_URL)) for v in newest)
        if run_key and url
    }
    text = registry_docs.model_description(
        (current.version, current.tags) if current else None,
        [event.as_dict() for event in history[-MODEL_PAGE_MOVES:]],
        urls,
        earlier_moves=max(len(history) - MODEL_PAGE_MOVES, 0),
    )
    if text != (model.description or ""):
        _writes(client).update_registered_model(name, description=text)
    _stale_model_pages.discard(name)
