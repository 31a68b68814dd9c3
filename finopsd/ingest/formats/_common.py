"""What the per-record decoders share: strict JSON, typed look-ups, rows and rejects.

A decoder of a foreign format translates each record into zero or more
``UsageEvent`` wire dicts (keys as in ``UsageEvent``'s JSON form), then lets the
model validate them: the model stays the one arbiter of what is stored, as for
the native format. A problem found while translating is raised as ``Problem``,
whose ``field`` names the key in the *source* format, so a dead letter tells the
producer which of its own fields was wrong.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
from pydantic import ValidationError

from finopsd.events import UsageEvent, _Event
from finopsd.ingest.decode import Reject, TimeWindow, _reason, store_schema


class Problem(ValueError):
    """Why one record (or one event in it) cannot be stored: a reason code and the field."""

    def __init__(self, reason: str, where: str, message: str) -> None:
        super().__init__(f"{where}: {message}" if where else message)
        self.reason = reason
        self.where = where
        self.message = message


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def load_json(value: bytes) -> Any:
    """The JSON value of a record; ``Problem('invalid_json')`` if it is not strict JSON.

    ``NaN`` and ``Infinity`` (which Python's parser accepts) are refused, as is
    anything that is not UTF-8.
    """
    try:
        return json.loads(value.decode("utf-8"), parse_constant=_no_constants)
    except UnicodeDecodeError as exc:
        raise Problem("invalid_json", "", f"not UTF-8 ({exc.reason} at byte {exc.start})") from exc
    except ValueError as exc:  # JSONDecodeError and the constants above
        raise Problem("invalid_json", "", f"not valid JSON: {exc}") from exc


def type_name(value: Any) -> str:
    """The JSON type of a decoded value, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def want_object(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise Problem("wrong_type", where, f"expected an object, got {type_name(value)}")
    return value


def want_list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise Problem("wrong_type", where, f"expected an array, got {type_name(value)}")
    return value


def optional_str(obj: Mapping[str, Any], key: str, where: str) -> str | None:
    """``obj[key]`` as a string; None when absent, null or empty."""
    value = obj.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise Problem("wrong_type", where, f"expected a string, got {type_name(value)}")
    return value


def optional_int(obj: Mapping[str, Any], key: str, where: str) -> int | None:
    """``obj[key]`` as an integer (a JSON number without fraction); None when absent or null."""
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise Problem("wrong_type", where, f"expected an integer, got {type_name(value)}")
    return value


def optional_number(obj: Mapping[str, Any], key: str, where: str) -> float | None:
    """``obj[key]`` as a finite number; None when absent or null."""
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Problem("wrong_type", where, f"expected a number, got {type_name(value)}")
    if not math.isfinite(value):
        raise Problem("invalid_value", where, "must be finite")
    return float(value)


def short(value: str, limit: int = 80) -> str:
    """``value`` quoted for a message, cut to ``limit`` characters."""
    return repr(value if len(value) <= limit else value[: limit - 1] + "…")


@dataclass
class Candidate:
    """One event a record translates to, before the model has validated it.

    ``wire`` uses ``UsageEvent``'s JSON keys; ``sources`` maps a wire key to the
    source field it came from, for messages; ``label`` names the event within
    its record (e.g. the span's path and ids).
    """

    label: str
    wire: dict[str, Any]
    sources: dict[str, str] = field(default_factory=dict)


def explain_for(error: ValidationError, sources: Mapping[str, str]) -> str:
    """``events.explain`` with each field named by its source field where known."""
    parts = []
    for err in error.errors(include_url=False):
        loc = [str(p) for p in err["loc"]]
        if loc and loc[0] in sources:
            loc[0] = sources[loc[0]]
        parts.append(f"{'.'.join(loc) or '<record>'}: {err['msg']}")
    return "; ".join(parts)


class RecordDecoder:
    """Base of decoders that read one record at a time in Python.

    Subclasses implement ``candidates(value)``: the events a record holds (may be
    none), raising ``Problem`` when the record as a whole is unusable, and
    appending ``Problem``s for single events that are (the others are still
    stored). ``decode`` then validates each candidate with ``UsageEvent`` and
    returns the rows and one ``Reject`` per record with any problem, its detail
    naming every failed event and field.
    """

    name = "record"

    def __init__(
        self,
        model: type[_Event] = UsageEvent,
        *,
        max_record_bytes: int = 1 << 20,
        window: TimeWindow | None = None,
    ) -> None:
        if model is not UsageEvent:
            raise ValueError(
                f"the {self.name} format decodes usage events only, not {model.__name__}"
            )
        self.model: type[_Event] = model
        self.max_record_bytes = max_record_bytes
        self.window = window
        self.schema = store_schema(model)

    def candidates(self, value: bytes, problems: list[Problem]) -> list[Candidate]:
        raise NotImplementedError

    def decode(self, values: list[bytes] | pa.LargeBinaryArray) -> tuple[pa.Table, list[Reject]]:
        """Rows of every valid event, and a ``Reject`` per record with any problem, in order.

        ``values`` are Kafka record values (bytes, or an Arrow array of them). A
        record may yield several rows and a ``Reject`` at once: its valid events
        are stored, and the record goes to the dead-letter topic for the rest
        (a resend is safe: rows are deduplicated by ``event_id``).
        """
        rows: list[dict[str, Any]] = []
        rejects: list[Reject] = []
        latest = self.window.latest() if self.window is not None else None
        getter: Callable[[int], bytes]
        if isinstance(values, pa.Array):
            getter = lambda i: values[i].as_py() or b""  # noqa: E731
        else:
            getter = values.__getitem__
        for i in range(len(values)):
            value = getter(i)
            if len(value) > self.max_record_bytes:
                detail = (
                    f"record is {len(value)} bytes; the limit is {self.max_record_bytes} "
                    "(ingest.max_record_bytes)"
                )
                rejects.append(Reject(i, "too_large", detail))
                continue
            problems: list[Problem] = []
            try:
                found = self.candidates(value, problems)
            except Problem as exc:
                rejects.append(Reject(i, exc.reason, str(exc)))
                continue
            failures: list[tuple[str, str]] = [(p.reason, str(p)) for p in problems]
            for candidate in found:
                try:
                    event = self.model.model_validate(candidate.wire)
                except ValidationError as exc:
                    detail = explain_for(exc, candidate.sources)
                    failures.append((_reason(exc), f"{candidate.label}: {detail}"))
                else:
                    row = event.row()
                    late = None
                    if self.window is not None and latest is not None:
                        late = self.window.refusal(row["ts"], latest)
                    if late is not None:
                        failures.append((late.reason, f"{candidate.label}: {late.detail}"))
                    else:
                        rows.append(row)
            if failures:
                rejects.append(Reject(i, failures[0][0], "; ".join(d for _, d in failures)))
        table = (
            pa.Table.from_pylist(rows, schema=self.schema) if rows else self.schema.empty_table()
        )
        return table, rejects


__all__ = [
    "Candidate",
    "Problem",
    "RecordDecoder",
    "explain_for",
    "load_json",
    "optional_int",
    "optional_number",
    "optional_str",
    "short",
    "type_name",
    "want_list",
    "want_object",
]
