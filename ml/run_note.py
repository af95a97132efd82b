"""The note on an Airflow DAG run, in markdown: what the run did, in one line, with links into MLflow.

"**v3 promoted**, accuracy 0.9737 ...", "**no new data** ...", "**v4 rejected**: ...", "**v5 rolled back**: ...".
Composed from the run's task results (the XCom dicts of the pipeline's contract) by rollback_model, the task that runs
last whatever happened, or by extract_data when it found no new data and the run ends with it; :mod:`ml.airflow_plugin`
puts it on the run.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

Result = Mapping[str, Any] | None
# MLflow 3's UI opens in its GenAI view (no Model registry in the sidebar) unless the link asks for model training.
MODEL_TRAINING_VIEW = "?workflowType=machine_learning"
# The longest note Airflow keeps on a run (its column's length).
AIRFLOW_NOTE_LIMIT = 1000
# The XCom key under which rollback_model (extract_data, on no new data) leaves the note for ml.airflow_plugin.
RUN_NOTE_KEY = "run_note"
# The XCom key under which a task leaves a note for its own task instance (validate_model, why it rejected a version).
TASK_NOTE_KEY = "task_note"
# The XCom key under which the same task leaves what ml.notify tells people: the run's events and their details.
NOTICE_KEY = "notice"


@dataclass(frozen=True)
class MlflowLinks:
    """Where the MLflow UI shows a run and a registered version."""

    ui_url: str
    model_name: str
    experiment_id: str | None = None

    def run(self, run_id: str) -> str | None:
        if not (self.experiment_id and run_id):
            return None
        return f"{self.ui_url.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{run_id}{MODEL_TRAINING_VIEW}"

    def version(self, version: int) -> str:
        return f"{self.ui_url.rstrip('/')}/#/models/{quote(self.model_name)}/versions/{version}{MODEL_TRAINING_VIEW}"


def _accuracy(value: Any) -> str:
    return f"{float(value):.4f}" if value is not None else "?"


def _links(links: MlflowLinks, version: int | None, run_id: str) -> str:
    parts = []
    if run_url := links.run(run_id):
        parts.append(f"[MLflow run]({run_url})")
    if version is not None:
        parts.append(f"[{links.model_name} v{version}]({links.version(version)})")
    return " · ".join(parts)


def with_links(text: str, links: MlflowLinks, version: int | None, run_id: str) -> str:
    # One line: the run page shows a note's first line in its header.
    linked = _links(links, version, run_id)
    return f"{text} · {linked}" if linked else text


def compose(
    *,
    extract: Result,
    train: Result,
    validation: Result,
    deploy: Result,
    rollback: Mapping[str, Any],
    links: MlflowLinks,
) -> str:
    production = rollback.get("production_version")
    stays = f"Production stays v{production}." if production is not None else "There is no Production version."
    run_id = str((train or {}).get("run_id") or "")
    version = (deploy or {}).get("version") or (train or {}).get("model_version") or rollback.get("rolled_back_version")
    if rollback.get("rollback_performed"):
        restored = rollback.get("restored_version")
        back = f"Production is back to v{restored}." if restored is not None else "No version is in Production."
        text = f"**v{rollback.get('rolled_back_version')} rolled back**: {rollback.get('reason')}. {back}"
        return with_links(text, links, rollback.get("rolled_back_version"), run_id)
    if deploy and deploy.get("deployed"):
        validated = validation or {}
        compared = ""
        if validated.get("champion_accuracy") is not None:
            champion = f"Production v{validated['champion_version']}"
            rows = validated.get("comparison_rows")
            if validated.get("comparison_excluded_rows") and validated.get("comparison_accuracy") is not None:
                # Compared on the rows Production never trained on: both scores on those rows, like for like.
                ours, theirs = _accuracy(validated["comparison_accuracy"]), _accuracy(validated["champion_accuracy"])
                compared = f"; on the {rows} held-out rows {champion} did not train on, {ours} against its {theirs}"
            else:
                compared = f", {champion} had {_accuracy(validated['champion_accuracy'])}"
        threshold = validated.get("threshold")
        limit = f" (threshold {float(threshold):.2f}{compared})" if threshold is not None else ""
        text = f"**v{version} promoted**, accuracy {_accuracy(validated.get('accuracy'))}{limit}."
        if approval := deploy.get("approval"):
            text = f"{text} {approval[0].upper()}{approval[1:]}."
        return with_links(text, links, version, run_id)
    if deploy and (validation or {}).get("validation") == "failed":
        reasons = "; ".join((validation or {}).get("reasons") or []) or "validation failed"
        return with_links(f"**v{version} rejected**: {reasons}. {stays}", links, version, run_id)
    if deploy:
        return with_links(f"**v{version} not deployed**: {deploy.get('reason')}. {stays}", links, version, run_id)
    if version is not None:
        return with_links(
            f"**v{version} not deployed**: the run failed before deployment. {stays}", links, version, run_id
        )
    return f"**failed** before a version was registered. {stays}"


def no_new_data(extract: Mapping[str, Any], links: MlflowLinks) -> str:
    """The note of a run that ended after extract_data, which found the data Production was trained on."""
    production = extract.get("production_version")
    digest = str(extract.get("digest") or "")[:12]
    text = (
        f"**{extract.get('skipped_reason')}**: Production v{production} was trained on this snapshot "
        f"(digest `{digest}`); nothing was trained."
    )
    return with_links(text, links, production, "")


def with_reason(note: str, reason: str | None) -> str:
    """A pipeline run's note followed, on a line of its own, by why the run was started (its ``reason`` Param), cut
    short where the whole would pass what Airflow keeps of a note."""
    if not reason:
        return note
    lead = f"{note}\n\nStarted because: "
    room = AIRFLOW_NOTE_LIMIT - len(lead)
    return lead + (reason if len(reason) <= room else reason[: max(room - 1, 0)] + "…")


def with_candidates(note: str, train: Result) -> str:
    """The note and, under it, the run's candidates side by side when it trained several, with why one won.

    Airflow keeps a run's note in 1,000 characters (PostgreSQL refuses more): the table shrinks to the selection
    metric's column, then to the sentence alone; the MLflow parent run and the version's description keep it whole.
    """
    rows = (train or {}).get("candidates") or []
    if not rows:
        return note
    from ml import selection

    why, metric = str((train or {}).get("selection") or ""), str((train or {}).get("selection_metric") or "")
    for shown in (selection.explained(rows, why, metric), selection.explained(rows, why, metric, compact=True)):
        if len(note) + 2 + len(shown) <= AIRFLOW_NOTE_LIMIT:
            return f"{note}\n\n{shown}"
    sentence = f"Chosen among {len(rows)} candidates by {metric}: {why}."
    return f"{note}\n\n{sentence}" if len(note) + 2 + len(sentence) <= AIRFLOW_NOTE_LIMIT else note


def refused(reason: str, production: int | None) -> str:
    """The note of a run whose parameters or settings were refused before anything ran."""
    stays = f"Production stays v{production}." if production is not None else "Production was not read."
    return f"**refused**: {reason}. {stays}"


def events(*, extract: Result, deploy: Result, rollback: Mapping[str, Any]) -> list[str]:
    """What a pipeline run did that people are told about (:data:`ml.settings.NOTICE_EVENTS`), from the same results
    as its note; a run that failed adds ``failed`` when it ends."""
    found = ["repaired"] if (extract or {}).get("repaired") else []
    if rollback.get("rollback_performed"):
        found.append("rolled_back")
    elif deploy and deploy.get("deployed"):
        found.append("promoted")
    elif deploy and deploy.get("model_version") is not None and not deploy.get("skipped_reason"):
        found.append("rejected")
    return found


def manual_rollback(*, replaced: int | None, restored: int, reason: str, actor: str, links: MlflowLinks) -> str:
    """The note of a rollback by hand (the mlops_rollback DAG, ``mlops rollback``)."""
    taken_out = f"v{replaced}" if replaced is not None else "no version"
    text = f"**Production rolled back to v{restored}** by {actor}, replacing {taken_out}: {reason}."
    return with_links(text, links, restored, "")


def approval_request(
    *,
    validation: Mapping[str, Any],
    train: Mapping[str, Any],
    digest: str,
    production_run_id: str,
    timeout_seconds: float,
    links: MlflowLinks,
) -> tuple[str, str]:
    """The subject and markdown body of the approval request before Production: what a person needs to decide."""
    version, champion = validation.get("model_version"), validation.get("champion_version")
    subject = f"Promote {links.model_name} v{version} to Production?"
    threshold = validation.get("threshold")
    lines = [
        f"**v{version}** ({train.get('model_family') or 'model'}) passed validation and waits for your approval "
        f"before it replaces {f'Production v{champion}' if champion is not None else 'no Production version'}.",
        "",
    ]
    if champion is not None and validation.get("champion_accuracy") is not None:
        rows = validation.get("comparison_rows")
        on_rows = f"the same {rows} held-out rows" if rows else "the same held-out rows"
        ours = validation.get("comparison_accuracy")
        ours = ours if ours is not None else validation.get("accuracy")
        # The measure names its own row, beside its two values: a reader scans a row, not a header and a blank cell.
        lines += [
            f"| | candidate v{version} | Production v{champion} |",
            "|---|---|---|",
            f"| accuracy on {on_rows} | {_accuracy(ours)} | {_accuracy(validation['champion_accuracy'])} |",
            "",
        ]
        if validation.get("comparison_note"):
            lines += [f"Rows compared: {str(validation['comparison_note']).rstrip('.')}.", ""]
    limit = f"{float(threshold):.2f}" if threshold is not None else "?"
    lines.append(f"- accuracy on the whole held-out set: {_accuracy(validation.get('accuracy'))} (threshold {limit})")
    psi = validation.get("drift_max_psi")
    if psi is not None:
        level = "high" if validation.get("drift_high") else "below the threshold"
        lines.append(f"- drift: largest PSI {float(psi):.3f} ({validation.get('drift_max_psi_feature')}), {level}")
    else:
        lines.append("- drift: not measured (no Production version to compare with)")
    lines.append(f"- data digest: `{digest[:16]}`")
    runs = [f"[MLflow run of v{version}]({url})" for url in [links.run(str(train.get("run_id") or ""))] if url]
    runs += [f"[MLflow run of v{champion}]({url})" for url in [links.run(production_run_id)] if url]
    runs.append(f"[{links.model_name} v{version}]({links.version(int(version))})" if version is not None else "")
    lines += ["- " + " · ".join(filter(None, runs)), ""]
    hours = timeout_seconds / 3600
    wait = f"{hours:g} h" if hours >= 1 else f"{timeout_seconds:g} s"
    lines.append(f"**Approve** promotes v{version}; **Reject**, or no answer within {wait}, keeps Production as it is.")
    return subject, "\n".join(lines)
