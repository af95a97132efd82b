"""The registry's story as markdown, for the descriptions MLflow's UI shows on a registered model and its versions.

The tags stay the record machines read; these descriptions are derived from them alone (see
:func:`ml.registry.refresh_descriptions`), so they can always be written again and never disagree with the tags.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from datetime import datetime

from ml import selection
from ml import tags as t

NONE = "\u2013"  # an en dash: an empty table cell

EVENT_WORDS = {"promoted": "promoted", "rolled_back": "rolled back", "manual_rollback": "manual rollback"}


def when(stamp: str | None) -> str:
    """An ISO timestamp as ``2026-11-24 18:46 UTC``; anything unreadable as it is."""
    if not stamp:
        return NONE
    try:
        return datetime.fromisoformat(stamp).strftime("%Y-%m-%d %H:%M UTC")
    except ValueError:
        return stamp


def _number(value: str | None, digits: int = 4) -> str:
    try:
        return f"{float(value):.{digits}f}" if value not in (None, "", "none") else NONE
    except ValueError:
        return str(value)


def _cell(text: object) -> str:
    """Table cells may not hold a pipe or a line break."""
    return str(text).replace("|", "\\|").replace("\n", " ").strip() or NONE


def _airflow_link(tags: Mapping[str, str]) -> str:
    url = tags.get(t.AIRFLOW_URL)
    run = tags.get(t.AIRFLOW_RUN_KEY) or tags.get(t.AIRFLOW_RUN_ID)
    if url and run:
        return f"[{run}]({url})"
    return run or NONE


def version_status(stage: str, tags: Mapping[str, str]) -> str:
    """One sentence: where this version stands and why, from its stage and tags."""
    status = tags.get(t.DEPLOYMENT_STATUS, "")
    reason = tags.get(t.DEPLOYMENT_REASON, "")
    if stage == "Production" or status == "production":
        if tags.get(t.DEPLOYMENT_RESTORED_AT):
            return f"**In Production** again since {when(tags[t.DEPLOYMENT_RESTORED_AT])}, restored by a rollback."
        return f"**In Production** since {when(tags.get(t.DEPLOYMENT_PROMOTED_AT))}: {reason or 'promoted'}."
    if status == "rolled_back":
        restored = tags.get(t.DEPLOYMENT_RESTORED_VERSION, "none")
        back_to = f"Production went back to version {restored}" if restored != "none" else "no version was restored"
        return (
            f"**Rolled back** on {when(tags.get(t.DEPLOYMENT_ROLLED_BACK_AT))}: "
            f"{tags.get(t.DEPLOYMENT_ROLLBACK_REASON, 'no reason recorded')}; {back_to}."
        )
    if status == "archived":
        return (
            f"**Superseded** by version {tags.get(t.DEPLOYMENT_REPLACED_BY, '?')} on "
            f"{when(tags.get(t.DEPLOYMENT_ARCHIVED_AT))}; it was in Production from "
            f"{when(tags.get(t.DEPLOYMENT_PROMOTED_AT))}."
        )
    if status == "rejected":
        return f"**Rejected**, never deployed: {reason or 'validation failed'}."
    if status == "not_approved":
        return f"**Not approved** for Production: {reason}."
    if status == "superseded":
        return f"**Not deployed**: {reason or 'Production moved while this run was deciding'}."
    validation = tags.get(t.VALIDATION_STATUS)
    if validation == "passed":
        return "**Passed validation**, not deployed (yet)."
    if validation == "failed":
        return f"**Failed validation**: {tags.get(t.VALIDATION_REASONS, 'no reason recorded')}."
    return "**Registered**, not validated yet."


def version_description(version: int, stage: str, tags: Mapping[str, str]) -> str:
    champion = tags.get(t.VALIDATION_CHAMPION_VERSION, "none")
    against = (
        f"version {champion}, accuracy {_number(tags.get(t.VALIDATION_CHAMPION_ACCURACY))}"
        if champion not in ("", "none")
        else "none (first version, or comparison off)"
    )
    if tags.get(t.VALIDATION_COMPARISON_ACCURACY, "none") != "none":
        # The comparison may leave out held-out rows Production trained on: both figures are on the same rows.
        against += f"; this version {_number(tags[t.VALIDATION_COMPARISON_ACCURACY])} on the same rows"
    digest = tags.get(t.DATA_DIGEST, "")
    rows = [
        ("held-out accuracy", _number(tags.get(t.VALIDATION_ACCURACY))),
        ("threshold", _number(tags.get(t.VALIDATION_THRESHOLD), 2)),
        ("Production when validated", against),
        ("compared on", tags.get(t.VALIDATION_COMPARISON_NOTE, NONE)),
        ("validation", tags.get(t.VALIDATION_REASONS, NONE)),
        ("model family", tags.get(t.MODEL_FAMILY, NONE)),
        ("data digest", f"`{digest[:16]}`" if digest else NONE),
        ("trained by Airflow run", _airflow_link(tags)),
        ("code", f"`{tags[t.CODE_REVISION]}`" if tags.get(t.CODE_REVISION) else NONE),
    ]
    table = "\n".join(f"| {_cell(name)} | {_cell(value)} |" for name, value in rows)
    return f"{version_status(stage, tags)}\n\n| | |\n|---|---|\n{table}\n{_candidates(tags)}"


def _candidates(tags: Mapping[str, str]) -> str:
    """The candidates the version was chosen among, when its run trained several; unreadable: left out."""
    try:
        rows = json.loads(tags.get(t.CANDIDATES) or "[]")
    except ValueError:
        return ""
    if not isinstance(rows, list) or not rows:
        return ""
    why = tags.get(t.CANDIDATES_SELECTION, "")
    return f"\n### Candidates\n\n{selection.explained(rows, why, tags.get(t.CANDIDATES_METRIC, ''))}\n"


def model_description(
    production: tuple[int, Mapping[str, str]] | None,
    history: Iterable[Mapping[str, object]],
    airflow_url_of: Mapping[str, str],
    earlier_moves: int = 0,
) -> str:
    """The registered model's page: what is in Production now and the given moves of Production, newest first.

    ``history`` holds the deployment history's events as dicts (``at``, ``event``, ``version``, ``previous_version``,
    ``actor``, ``reason``); ``airflow_url_of`` maps an actor (``airflow:<dag>/<run>``) to its Airflow run's URL;
    ``earlier_moves`` counts the older moves left out.
    """
    if production is None:
        now = "**Production: none.** No version has been promoted, or the only one was rolled back."
    else:
        version, tags = production
        now = (
            f"**Production: version {version}**, held-out accuracy {_number(tags.get(t.VALIDATION_ACCURACY))}, "
            f"since {when(tags.get(t.DEPLOYMENT_RESTORED_AT) or tags.get(t.DEPLOYMENT_PROMOTED_AT))}."
        )
    rows = []
    for event in sorted(history, key=lambda e: str(e.get("at")), reverse=True):
        actor = str(event.get("actor") or "")
        url = airflow_url_of.get(actor)
        by = f"[{actor.removeprefix('airflow:')}]({url})" if url else actor or NONE
        previous = event.get("previous_version")
        rows.append(
            "| "
            + " | ".join(
                _cell(cell)
                for cell in (
                    when(str(event.get("at"))),
                    EVENT_WORDS.get(str(event.get("event")), event.get("event")),
                    f"v{event.get('version')}",
                    f"v{previous}" if previous is not None else NONE,
                    by,
                    event.get("reason") or NONE,
                )
            )
            + " |"
        )
    history_table = (
        "| when | event | version | before | by | why |\n|---|---|---|---|---|---|\n" + "\n".join(rows)
        if rows
        else "No deployments yet."
    )
    if earlier_moves:
        history_table += f"\n\n{earlier_moves} earlier moves are not shown: `mlops status --all` lists every one."
    return (
        "Trained, validated and promoted by the `mlops_pipeline` Airflow DAG; each version's description says why it "
        f"was promoted, rejected, superseded or rolled back.\n\n{now}\n\n### Deployment history\n\n{history_table}\n"
    )
