"""Requests to ``/invocations``, checked against the model's signature and turned into a pandas DataFrame.

The server accepts the bodies ``mlflow models serve`` accepts for tabular models: JSON holding exactly one of
``dataframe_split``, ``dataframe_records``, ``instances`` or ``inputs``, and ``text/csv`` with a header row. The checks
are strict, so that a bad request gets a 4xx that names the problem rather than a guess:

- every required column of the signature must be present; a missing optional column is filled with nulls;
- a column the signature does not know is rejected with its name (``mlflow models serve`` drops it silently, which
  hides a client that sends the wrong features);
- each value must have its column's type: a JSON number for double and float (null means missing), an integer for
  long and integer, true or false for boolean, a string for string; a numeric string is not a number;
- an empty batch is rejected.

Signatures with other column types (binary, datetime, arrays, objects) or tensor signatures are not served: loading
such a version fails with :class:`UnsupportedSignatureError`, and the server keeps the version it has.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import pandas as pd
from mlflow.types import DataType, Schema

JSON_MEDIA_TYPE = "application/json"
CSV_MEDIA_TYPE = "text/csv"
JSON_FORMATS = ("dataframe_split", "dataframe_records", "instances", "inputs")
MAX_PROBLEMS_REPORTED = 5


class InputError(ValueError):
    """A request the model cannot score; ``status`` and ``error_code`` are what the client is told."""

    def __init__(self, message: str, status: int = 400, error_code: str = "BAD_REQUEST") -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.error_code = error_code


class UnsupportedSignatureError(ValueError):
    """The model's signature is not a set of named columns of simple types."""


@dataclass(frozen=True)
class ColumnType:
    name: str
    dtype: np.dtype
    json_types: frozenset[type]
    from_text: Callable[[str], Any]


def _float_from_text(text: str) -> float | None:
    return float(text) if text.strip() else None


def _bool_from_text(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered not in {"true", "false"}:
        raise ValueError(text)
    return lowered == "true"


_NULL = type(None)
_FLOATING: frozenset[type] = frozenset({float, int, _NULL})
_INTEGRAL: frozenset[type] = frozenset({int})
COLUMN_TYPES: dict[str, ColumnType] = {
    "double": ColumnType("double", np.dtype(np.float64), _FLOATING, _float_from_text),
    "float": ColumnType("float", np.dtype(np.float32), _FLOATING, _float_from_text),
    "long": ColumnType("long", np.dtype(np.int64), _INTEGRAL, int),
    "integer": ColumnType("integer", np.dtype(np.int32), _INTEGRAL, int),
    "boolean": ColumnType("boolean", np.dtype(np.bool_), frozenset({bool}), _bool_from_text),
    "string": ColumnType("string", np.dtype(object), frozenset({str, _NULL}), str),
}


@dataclass(frozen=True)
class _Table:
    """Rows as the client sent them; ``columns`` is None when the rows are positional (lists without names)."""

    columns: Sequence[str] | None
    rows: Sequence[Sequence[Any]]


@dataclass(frozen=True)
class InputSchema:
    columns: tuple[str, ...]
    types: tuple[ColumnType, ...]
    optional: frozenset[str]
    shared_dtype: np.dtype | None

    @classmethod
    def from_signature(cls, schema: Schema | None) -> InputSchema:
        if schema is None:
            raise UnsupportedSignatureError("the model has no signature; the server needs one to check requests")
        if schema.is_tensor_spec() or not schema.has_input_names():
            raise UnsupportedSignatureError("the model's signature is not a set of named columns")
        columns: list[str] = []
        types: list[ColumnType] = []
        optional: set[str] = set()
        for spec in schema.inputs:
            column_type = COLUMN_TYPES.get(spec.type.name) if isinstance(spec.type, DataType) else None
            if column_type is None:
                raise UnsupportedSignatureError(f"column {spec.name!r} has type {spec.type}, which is not served")
            name = str(spec.name)  # has_input_names() above: every input is named
            columns.append(name)
            types.append(column_type)
            if not spec.required:
                optional.add(name)
        dtypes = {column_type.dtype for column_type in types}
        shared_dtype = dtypes.pop() if len(dtypes) == 1 else None
        return cls(tuple(columns), tuple(types), frozenset(optional), shared_dtype)

    def parse(self, body: bytes, content_type: str) -> pd.DataFrame:
        media_type = _media_type(content_type)
        if media_type == JSON_MEDIA_TYPE:
            return self._frame_from_json(_decode_json(body))
        if media_type == CSV_MEDIA_TYPE:
            return self._frame_from_csv(_decode_text(body))
        raise InputError(
            f"content type {content_type or '(none)'!r} is not supported; use {JSON_MEDIA_TYPE} or {CSV_MEDIA_TYPE}",
            status=415,
            error_code="UNSUPPORTED_MEDIA_TYPE",
        )

    def frame_from_records(self, records: Sequence[Any]) -> pd.DataFrame:
        rows = self._rows_from_records(records)
        self._check_json_types(rows)
        return self._build_frame(rows)

    def _frame_from_json(self, payload: Any) -> pd.DataFrame:
        if not isinstance(payload, dict):
            raise InputError(f"the body must be a JSON object with one of the keys {', '.join(JSON_FORMATS)}")
        present = [key for key in JSON_FORMATS if key in payload]
        unknown = sorted(set(payload) - set(JSON_FORMATS))
        if len(present) != 1 or unknown:
            got = ", ".join(payload) or "none"
            raise InputError(f"the body must hold exactly one of the keys {', '.join(JSON_FORMATS)}; got {got}")
        data = payload[present[0]]
        if present[0] == "dataframe_split":
            rows = self._aligned_rows(_split_table(data))
        elif present[0] == "inputs" and isinstance(data, dict):
            rows = self._aligned_rows(_columnar_table(data))
        elif present[0] == "dataframe_records" or _all_objects(data):
            return self.frame_from_records(data)
        else:
            rows = self._aligned_rows(_positional_table(data))
        self._check_json_types(rows)
        return self._build_frame(rows)

    def _frame_from_csv(self, text: str) -> pd.DataFrame:
        try:
            lines = [row for row in csv.reader(io.StringIO(text)) if row]
        except csv.Error as error:
            raise InputError(f"malformed CSV: {error}") from error
        if not lines:
            raise InputError("empty CSV: expected a header row naming the columns, then one row per record")
        rows = self._aligned_rows(_Table(lines[0], lines[1:]))
        return self._build_frame(self._converted_text(rows))

    def _aligned_rows(self, table: _Table) -> list[list[Any]]:
        """The rows with their values in the signature's column order."""
        if not table.rows:
            raise InputError("empty batch: the request has no rows")
        columns = self.columns if table.columns is None else tuple(table.columns)
        if columns != self.columns:
            self._check_column_names(columns)
        width = len(columns)
        for index, row in enumerate(table.rows):
            if not isinstance(row, list) or len(row) != width:
                raise InputError(f"row {index} must be a list of {width} values, got {_describe(row)}")
        if columns == self.columns:
            # Each row was just checked to be a list.
            return cast(list[list[Any]], list(table.rows))
        position = {name: index for index, name in enumerate(columns)}
        order = [position.get(name) for name in self.columns]
        return [[None if index is None else row[index] for index in order] for row in table.rows]

    def _check_column_names(self, columns: Sequence[str]) -> None:
        given = set(columns)
        if len(given) != len(columns):
            duplicated = sorted({name for name in columns if columns.count(name) > 1})
            raise InputError(f"duplicated columns: {', '.join(duplicated)}")
        missing = [name for name in self.columns if name not in given and name not in self.optional]
        if missing:
            raise InputError(f"missing columns: {', '.join(missing)}")
        known = set(self.columns)
        unknown = [name for name in columns if name not in known]
        if unknown:
            raise InputError(f"unknown columns: {', '.join(unknown)}")

    def _rows_from_records(self, records: Any) -> list[list[Any]]:
        if not isinstance(records, list):
            raise InputError(f"records must be a list of objects, got {_describe(records)}")
        if not records:
            raise InputError("empty batch: the request has no rows")
        expected = set(self.columns)
        rows = []
        for index, record in enumerate(records):
            if not isinstance(record, dict):
                raise InputError(f"record {index} must be an object, got {_describe(record)}")
            if record.keys() != expected:
                try:
                    self._check_column_names(list(record))
                except InputError as error:
                    raise InputError(f"record {index}: {error.message}") from error
            rows.append([record.get(name) for name in self.columns])
        return rows

    def _check_json_types(self, rows: list[list[Any]]) -> None:
        accepted = [column_type.json_types for column_type in self.types]
        problems = []
        for row_index, row in enumerate(rows):
            for column_index, value in enumerate(row):
                if type(value) not in accepted[column_index]:
                    problems.append(self._type_problem(row_index, column_index, value))
            if len(problems) >= MAX_PROBLEMS_REPORTED:
                break
        if problems:
            raise InputError("wrong types: " + "; ".join(problems[:MAX_PROBLEMS_REPORTED]))

    def _converted_text(self, rows: list[list[Any]]) -> list[list[Any]]:
        converters = [column_type.from_text for column_type in self.types]
        converted, problems = [], []
        for row_index, row in enumerate(rows):
            values = []
            for column_index, text in enumerate(row):
                try:
                    values.append(None if text is None else converters[column_index](text))
                except ValueError:
                    problems.append(self._type_problem(row_index, column_index, text))
            converted.append(values)
            if len(problems) >= MAX_PROBLEMS_REPORTED:
                break
        if problems:
            raise InputError("wrong types: " + "; ".join(problems[:MAX_PROBLEMS_REPORTED]))
        return converted

    def _type_problem(self, row_index: int, column_index: int, value: Any) -> str:
        expected = self.types[column_index].name
        return f"column {self.columns[column_index]!r} expects {expected}, got {_describe(value)} in row {row_index}"

    def _build_frame(self, rows: list[list[Any]]) -> pd.DataFrame:
        try:
            if self.shared_dtype is not None:
                # One 2-D array is about five times faster to turn into a frame than one array per column.
                values = np.array(rows, dtype=self.shared_dtype)
                frame = pd.DataFrame(values, columns=list(self.columns), copy=False)
            else:
                by_column = zip(*rows, strict=True)
                frame = pd.DataFrame(
                    {
                        name: np.array(values, dtype=column_type.dtype)
                        for name, column_type, values in zip(self.columns, self.types, by_column, strict=True)
                    }
                )
        except (TypeError, ValueError, OverflowError) as error:
            raise InputError(f"the values do not fit the signature's types: {error}") from error
        _refuse_infinities(frame)
        return frame


def _refuse_infinities(frame: pd.DataFrame) -> None:
    """A model scores finite numbers (a missing one is null); JSON's 1e999 and CSV's "inf" read as infinity."""
    numbers = frame.select_dtypes(include="floating")
    if numbers.empty:
        return
    infinite = np.isinf(numbers.to_numpy())
    if infinite.any():
        row, column = (int(index) for index in np.argwhere(infinite)[0])
        raise InputError(
            f"column {numbers.columns[column]!r} holds an infinite number in row {row}; "
            "send finite numbers, or null for a missing value"
        )


def _media_type(content_type: str) -> str:
    media_type, *parameters = content_type.split(";")
    for parameter in parameters:
        key, _, value = parameter.partition("=")
        key, value = key.strip().lower(), value.strip().strip('"').lower()
        if key != "charset" or value not in {"utf-8", "utf8"}:
            raise InputError(
                f"content type parameter {parameter.strip()!r} is not supported; only charset=utf-8 is",
                status=415,
                error_code="UNSUPPORTED_MEDIA_TYPE",
            )
    return media_type.strip().lower()


def _decode_json(body: bytes) -> Any:
    if not body.strip():
        raise InputError("the body is empty; expected a JSON object")
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"malformed JSON: {error}") from error
    except RecursionError as error:
        raise InputError("the JSON is nested too deeply; a row is a flat list or object of values") from error
    except ValueError as error:  # an integer literal beyond the interpreter's digit limit
        raise InputError(f"the JSON holds a number too large to read: {str(error)[:120]}") from error


def _decode_text(body: bytes) -> str:
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InputError(f"the body is not UTF-8: {error}") from error


def _split_table(data: Any) -> _Table:
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise InputError('dataframe_split must be an object with "columns" and "data" (a list of rows)')
    columns = data.get("columns")
    if columns is not None and not (isinstance(columns, list) and all(isinstance(name, str) for name in columns)):
        raise InputError('dataframe_split "columns" must be a list of column names')
    return _Table(columns, data["data"])


def _columnar_table(data: Mapping[str, Any]) -> _Table:
    values = list(data.values())
    if not any(isinstance(value, list) for value in values):
        return _Table(list(data), [values])
    lengths = {len(value) if isinstance(value, list) else -1 for value in values}
    if len(lengths) != 1 or -1 in lengths:
        raise InputError("inputs given by column must map every column to a list, all of the same length")
    return _Table(list(data), [list(row) for row in zip(*values, strict=True)])


def _positional_table(data: Any) -> _Table:
    if not isinstance(data, list):
        raise InputError(f"instances and inputs must be a list of rows or records, got {_describe(data)}")
    return _Table(None, data)


def _all_objects(data: Any) -> bool:
    return isinstance(data, list) and bool(data) and all(isinstance(item, dict) for item in data)


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{_JSON_NAMES.get(type(value), type(value).__name__)} {text}"


_JSON_NAMES = {
    str: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
    _NULL: "null",
    list: "list",
    dict: "object",
}
