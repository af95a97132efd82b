"""Choosing among a run's candidates, and the table that shows them side by side.

The table is the same wherever it appears (the run note, the MLflow parent run, the version's description), written
from the rows :func:`summary` makes; those rows are what train_model's XCom and the version's tag carry.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ml.results import CandidateResult, candidate_name

# The columns of the table, in order: the score each shows, and its heading.
SCORE_COLUMNS = (
    ("accuracy", "accuracy"),
    ("roc_auc", "ROC AUC"),
    ("average_precision", "average precision"),
    ("f1", "F1"),
)
NONE = "\u2013"


class NoCandidateTrainedError(RuntimeError):
    """Every candidate of the run failed: nothing to register, and Production stays as it was."""


def choose(trained: Sequence[CandidateResult], metric: str, planned: int) -> tuple[CandidateResult, str]:
    """The best of the trained candidates by ``metric`` on the selection split (the first listed among equals), and
    why, in one sentence; ``planned`` is how many the run asked for, failed ones included."""
    if not trained:
        which = "the run's only candidate" if planned == 1 else f"all {planned} candidates"
        raise NoCandidateTrainedError(f"{which} failed to train; see the train_candidate task logs")
    if planned == 1:
        return trained[0], "the run's only candidate"
    ranked = sorted(trained, key=lambda c: (-c.scores.get(metric, float("-inf")), c.index))
    chosen = ranked[0]
    failed = planned - len(trained)
    lost = f"; {failed} of {planned} candidates failed" if failed else ""
    if len(ranked) == 1:
        return chosen, f"{chosen.name} is the only candidate that trained{lost}"
    best, runner_up = chosen.scores.get(metric), ranked[1]
    return chosen, (
        f"{chosen.name} has the highest {metric} ({_score(best)}; next {runner_up.name} with "
        f"{_score(runner_up.scores.get(metric))}){lost}"
    )


def summary(
    planned: Sequence[Mapping[str, Any]], trained: Sequence[CandidateResult], chosen: CandidateResult
) -> list[dict[str, Any]]:
    """One row per planned candidate (``index``, ``model_family``, ``hyperparameters``): its selection scores and
    whether it was chosen, trained or failed."""
    by_index = {candidate.index: candidate for candidate in trained}
    rows = []
    for spec in planned:
        index = int(spec["index"])
        result = by_index.get(index)
        status = "failed" if result is None else "chosen" if index == chosen.index else "trained"
        rows.append(
            {
                "name": candidate_name(index, str(spec["model_family"])),
                "hyperparameters": dict(spec["hyperparameters"]),
                "status": status,
                "scores": dict(result.scores) if result is not None else {},
                "run_id": result.run_id if result is not None else "",
            }
        )
    return rows


def table(rows: Sequence[Mapping[str, Any]], metric: str = "", *, compact: bool = False) -> str:
    """The candidates as a markdown table, the selection metric's heading in bold; ``compact``: only that metric's
    column, and no hyper-parameters, for a place that holds little text."""
    columns = [(key, title) for key, title in SCORE_COLUMNS if not compact or key == metric]
    headings = [f"**{title}**" if key == metric else title for key, title in columns]
    lines = [
        "| candidate |" + ("" if compact else " hyper-parameters |") + " " + " | ".join(headings) + " | |",
        "|---|" + ("" if compact else "---|") + "---|" * len(columns) + "---|",
    ]
    for row in rows:
        scores = row.get("scores") or {}
        settings = ", ".join(f"{key}={value}" for key, value in (row.get("hyperparameters") or {}).items())
        cells = [str(row.get("name"))] + ([] if compact else [settings or NONE])
        cells += [_score(scores.get(key)) for key, _ in columns]
        cells.append(str(row.get("status")))
        lines.append("| " + " | ".join(_cell(cell) for cell in cells) + " |")
    return "\n".join(lines)


def explained(rows: Sequence[Mapping[str, Any]], why: str, metric: str, *, compact: bool = False) -> str:
    """The table and the sentence under it: what the scores are on and why the chosen candidate won."""
    return (
        f"{table(rows, metric, compact=compact)}\n\nScores on the selection split carved from the training rows; "
        f"chosen by {metric}: {why}. The held-out rows judged only the chosen one."
    )


def _score(value: Any) -> str:
    return f"{float(value):.4f}" if isinstance(value, (int, float)) else NONE


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ").strip() or NONE
