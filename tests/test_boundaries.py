"""Boundary values for every field of both event types, through decode → price → store.

A property test (hypothesis, bounded): records built from the extremes a producer can
send — integers at 0, ±1, ±2^31, ±2^53, ±2^63, 2^64; floats at ±0, ±1e308, ±5e-324, NaN
and ±Infinity as JSON tokens; strings empty, at and over their limits, with NUL and lone
surrogates; deep nesting; timestamps as numbers, numeric strings, edge years with
offsets, no offset, far future — mixed with valid and malformed records in one batch.
The path never raises, and each record is stored with exactly the values the model gives
it iff the model (and the future-skew window) accepts it, whatever its neighbours.
"""

from __future__ import annotations

import itertools
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from finopsd.config import PricingSettings
from finopsd.events import MAX_TEXT, GpuSample, UsageEvent, _Event
from finopsd.ingest.decode import BatchDecoder, TimeWindow
from finopsd.ingest.loadgen import UsageLoad
from finopsd.pricing import PriceBook
from finopsd.store import Store, StoreBatch

WINDOW = TimeWindow(timedelta(hours=1))
NOW = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)

INTS = [0, 1, -1, 2**31, -(2**31), 2**53, -(2**53), 2**63 - 1, 2**63, -(2**63), 2**64, 2**40]
FLOATS = ["0.0", "-0.0", "1e308", "-1e308", "5e-324", "-5e-324", "NaN", "Infinity", "-Infinity"]
FLOATS += ["0.5", "1.0", "100.0", "1e9", "1e10"]
STRINGS = [
    "",
    "a",
    "x" * MAX_TEXT,
    "x" * (MAX_TEXT + 1),
    "nul\u0000inside",
    "\ud800",
    "é" * MAX_TEXT,
    "ok",
]
TIMESTAMPS: list[Any] = [
    0,
    1700000000,
    "0",
    "1700000000",
    "0001-01-01T00:30:00+01:00",
    "0001-01-01T00:30:00-01:00",
    "9999-12-31T23:30:00-01:00",
    "9999-12-31T22:00:00+01:00",
    "2026-11-23T05:20:22",
    "2026-11-23 05:20:22z",
    NOW.isoformat(),
    (NOW + timedelta(days=3)).isoformat(),
    "2026-13-40T99:99:99Z",
    None,
]


def _json_value(kind: str) -> st.SearchStrategy[str]:
    """A JSON token (as text) for a field of ``kind``; any kind may get any value."""
    ints = st.sampled_from(INTS).map(str)
    floats = st.sampled_from(FLOATS)
    strings = st.sampled_from(STRINGS).map(lambda s: json.dumps(s, ensure_ascii=True))
    deep = st.integers(1, 400).map(lambda d: "[" * d + "]" * d)
    others = st.sampled_from(["null", "true", "[]", "{}", "[1, null]", "[9223372036854775808]"])
    # more integer digits than pydantic's parser takes (4,300), or just as many
    others |= st.sampled_from(["1" + "0" * 4301 + "e-4301", "9" * 4300, "-" + "9" * 4301])
    by_kind = {"int": ints, "float": floats, "str": strings}
    return st.one_of(by_kind.get(kind, strings), ints, floats, strings, deep, others)


def _field_kind(model: type[_Event], name: str) -> str:
    text = str(model.model_fields[name].annotation)
    return "int" if "int" in text else "float" if "float" in text else "str"


def _base(model: type[_Event]) -> dict[str, Any]:
    if model is GpuSample:
        return {"ts": NOW.isoformat(), "host": "h", "gpu_index": 0, "utilization_pct": 50.0}
    ((_, value),) = itertools.islice(iter(UsageLoad(seed=5, start=NOW)), 1)
    return json.loads(value)


@st.composite
def record(draw: st.DrawFn, model: type[_Event]) -> bytes:
    """A valid base event with a few fields replaced by boundary values, as raw JSON."""
    fields = {(f.alias or name): name for name, f in model.model_fields.items()}
    base = _base(model)
    base["event_id"] = f"e-{draw(st.integers(0, 10**9))}" if model is UsageEvent else None
    if model is GpuSample:
        base.pop("event_id")
        base["gpu_index"] = draw(st.integers(0, 1023))
        base["host"] = f"h{draw(st.integers(0, 10**9))}"
    tokens = {k: json.dumps(v) for k, v in base.items()}
    for wire in draw(st.lists(st.sampled_from(sorted(fields)), max_size=3, unique=True)):
        if wire == "ts":
            tokens[wire] = json.dumps(draw(st.sampled_from(TIMESTAMPS)))
        else:
            tokens[wire] = draw(_json_value(_field_kind(model, fields[wire])))
    if draw(st.booleans()):
        tokens["unknown"] = draw(_json_value("str"))
    body = ", ".join(f"{json.dumps(k)}: {v}" for k, v in tokens.items())
    text = "{" + body + "}"
    raw = text.encode("utf-8", "surrogatepass")
    if draw(st.integers(0, 20)) == 0:
        raw = raw.replace(b"h", b"\xff", 1)  # invalid UTF-8
    return raw


MALFORMED = [b'{"event_id": ', b"", b"null", b"[1]", b'{"a": 1}\n{"b": 2}']


def _expected(model: type[_Event], value: bytes) -> dict[str, Any] | None:
    """The row the model gives ``value``, or None if the model or the window refuses it."""
    try:
        row = model.model_validate_json(value).row()
    except ValidationError:
        return None
    if WINDOW.refusal(row["ts"], WINDOW.latest()) is not None:
        return None
    return row


def _key(model: type[_Event], row: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(row[k] for k in model.dedup_key)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (a != a and b != b)
    return a == b


_STORE: dict[str, Store] = {}
_BOOK = PriceBook.from_settings(PricingSettings())


def _store(tmp: Path) -> Store:
    if "s" not in _STORE:
        _STORE["s"] = Store(tmp / "boundaries.duckdb")
    return _STORE["s"]


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    model=st.sampled_from([UsageEvent, GpuSample]),
    data=st.data(),
)
def test_boundary_values_are_stored_as_the_model_says_or_refused(
    model: type[_Event], data: st.DataObject, tmp_path_factory: Any
) -> None:
    values = data.draw(st.lists(record(model), min_size=1, max_size=12))
    values += data.draw(st.lists(st.sampled_from(MALFORMED), max_size=2))
    values = data.draw(st.permutations(values))
    decoder = BatchDecoder(model, window=WINDOW)
    rows, rejects = decoder.decode(values)
    refused = {r.index for r in rejects}
    expected = {i: _expected(model, v) for i, v in enumerate(values)}
    assert refused == {i for i, row in expected.items() if row is None}
    # the same answer alone as in the batch
    for i, value in enumerate(values):
        alone, alone_rejects = decoder.decode([value])
        assert (alone.num_rows == 0) == (i in refused), value
        assert len(alone_rejects) == (1 if i in refused else 0)
    if model is UsageEvent and rows.num_rows:
        rows, _ = _BOOK.price(rows)
    # rows may come in any order, and two records may share a key (a boundary value in
    # event_id or host): each expected row is matched to one stored row of its key
    got: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in rows.to_pylist():
        got.setdefault(_key(model, r), []).append(r)
    assert rows.num_rows == sum(row is not None for row in expected.values())
    for row in expected.values():
        if row is None:
            continue
        candidates = got[_key(model, row)]
        match = [c for c in candidates if all(_same(c[k], v) for k, v in row.items())]
        assert match, (row, candidates)
        candidates.remove(match[0])
    # the store takes every row the decoder and the prices give
    store = _store(tmp_path_factory.getbasetemp())
    result = store.append(
        StoreBatch(
            rows={model.table: _first_of_each(rows, model)},
            dedup={model.table: (model.dedup_key, timedelta(hours=1))},
        )
    )
    assert result.inserted.get(model.table, 0) <= rows.num_rows


def _first_of_each(rows: pa.Table, model: type[_Event]) -> pa.Table:
    from finopsd.ingest.pipeline import first_of_each_key

    return first_of_each_key(rows, model.dedup_key) if rows.num_rows else rows
