"""``POST /feedback``: the true labels of answered requests, checked item by item.

The body is JSON, ``{"feedback": [{"request_id": "...", "label": 1}, ...]}``; an item may name a ``row`` (default 0)
of a request that scored several. Every refusal is a 4xx that names the item (``feedback[3]``) and what is wrong
with it, and nothing of a refused body is kept.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ml.records import label_text
from ml.serving.recorder import RecordedRequest
from ml.serving.schema import InputError

MAX_FEEDBACK_BYTES = 1024 * 1024
MAX_FEEDBACK_ITEMS = 1000
ITEM_KEYS = frozenset({"request_id", "label", "row"})
# A request id a client may choose: short, and safe in a log line, a header, a file and a query.
REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
REQUEST_ID_RULE = (
    "X-Request-Id must be 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit; leave it out "
    "and the server makes one"
)


@dataclass(frozen=True)
class Label:
    request_id: str
    row: int
    label: Any


def parse_feedback(body: bytes, classes: Sequence[Any] | None) -> list[Label]:
    """The labels of a ``/feedback`` body; InputError naming the first bad item. ``classes`` are the answering
    model's (None: any number or text is a label)."""
    try:
        document = json.loads(body, parse_constant=_refuse_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError) as error:
        raise InputError(f"the body is not valid JSON: {error}") from None
    if not isinstance(document, dict) or set(document) != {"feedback"}:
        raise InputError('the body must be a JSON object with one key, "feedback", a list of labels')
    items = document["feedback"]
    if not isinstance(items, list) or not items:
        raise InputError('"feedback" must be a non-empty list of {"request_id": ..., "label": ...}')
    if len(items) > MAX_FEEDBACK_ITEMS:
        raise InputError(
            f'"feedback" holds {len(items)} labels; send at most {MAX_FEEDBACK_ITEMS} a request',
            status=413,
            error_code="TOO_MANY_ITEMS",
        )
    known = {label_text(value) for value in classes} if classes is not None else None
    labels, seen = [], set()
    for index, item in enumerate(items):
        label = _label(f"feedback[{index}]", item, classes, known)
        if (label.request_id, label.row) in seen:
            raise InputError(f"feedback[{index}]: request {label.request_id!r} row {label.row} is labelled twice")
        seen.add((label.request_id, label.row))
        labels.append(label)
    return labels


def unknown_problem(labels: Sequence[Label], found: dict[str, RecordedRequest], window_hours: float) -> str | None:
    """Why a label names no recorded request or row; None when every one does."""
    for index, label in enumerate(labels):
        request = found.get(label.request_id)
        if request is None:
            return (
                f"feedback[{index}]: request {label.request_id!r} is not one this server recorded (it remembers "
                f"recent requests, and looks {window_hours:g} h back in the data store)"
            )
        if label.row >= request.rows:
            rows = f"{request.rows} row{'s' if request.rows > 1 else ''}"
            return f"feedback[{index}]: request {label.request_id!r} scored {rows}; there is no row {label.row}"
    return None


def _label(where: str, item: Any, classes: Sequence[Any] | None, known: set[str] | None) -> Label:
    if not isinstance(item, dict):
        raise InputError(f'{where} must be an object {{"request_id": ..., "label": ...}}, not {type(item).__name__}')
    unknown = sorted(set(item) - ITEM_KEYS)
    if unknown:
        raise InputError(f"{where} has unknown keys {', '.join(map(repr, unknown))}; keys are label, request_id, row")
    request_id = item.get("request_id")
    if not isinstance(request_id, str) or not REQUEST_ID.fullmatch(request_id):
        raise InputError(f"{where}: request_id must be the X-Request-Id of an answer, got {_shown(request_id)}")
    row = item.get("row", 0)
    if isinstance(row, bool) or not isinstance(row, int) or row < 0:
        raise InputError(f"{where}: row must be a whole number from 0, got {_shown(row)}")
    if "label" not in item:
        raise InputError(f"{where} has no label")
    label = item["label"]
    numeric_classes = classes is not None and all(isinstance(value, (int, float)) for value in classes)
    if isinstance(label, bool) or not isinstance(label, (int, float, str)):
        raise InputError(f"{where}: label must be a number or a string, got {_shown(label)}")
    if classes is not None and isinstance(label, str) == numeric_classes:
        kind = "a number" if numeric_classes else "a string"
        raise InputError(f"{where}: label must be {kind}, as the model's classes are, got {_shown(label)}")
    if known is not None and label_text(label) not in known:
        shown = ", ".join(sorted(known))
        raise InputError(f"{where}: label {_shown(label)} is not a class the model knows ({shown})")
    return Label(request_id, row, label)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _shown(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else repr(value)
    return text if len(text) <= 60 else f"{text[:40]}...({len(text)} characters)"
