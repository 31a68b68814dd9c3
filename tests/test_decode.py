"""BatchDecoder: the fast path must accept exactly what the pydantic model accepts.

The model (``UsageEvent.model_validate_json``) is the contract; every test here
compares the decoder's rows and rejects against it record by record.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import typing
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from finopsd.events import MAX_TEXT, GpuSample, UsageEvent, _Event
from finopsd.ingest import decode
from finopsd.ingest.decode import REASONS, BatchDecoder, Reject, store_schema
from finopsd.ingest.loadgen import UsageLoad
from finopsd.pricing import COST_SCHEMA
from finopsd.store import Store, table_columns

START = datetime(2025, 3, 1, 9, 30, tzinfo=UTC)
BIG_BATCH = 300
"""A batch size past the decoder's fallback chunk (256), so chunked retries are exercised."""

# -- helpers ----------------------------------------------------------------------------------


def usage_values(n: int, *, seed: int = 7) -> list[bytes]:
    """``n`` valid usage-event values from the load generator."""
    load = UsageLoad(seed=seed, start=START)
    return [value for _key, value in itertools.islice(load, n)]


def base_event() -> dict[str, Any]:
    """One valid usage event as a dict, with every optional field present."""
    event = json.loads(usage_values(1, seed=3)[0])
    event.update(
        {
            "gen_ai.usage.cache_creation.input_tokens": 12,
            "gen_ai.usage.reasoning.output_tokens": 34,
            "quality_score": 0.5,
            "cost_usd": 0.0123,
        }
    )
    # the base must be valid for the mutations to mean much
    assert UsageEvent.model_validate_json(json.dumps(event))
    return event


BASE = base_event()
WIRE_KEYS: list[str] = [f.alias or name for name, f in UsageEvent.model_fields.items()]
# every key, with the ones whose checks are hardest to get right drawn more often
_MUTATED_KEYS = [*WIRE_KEYS, *["ts"] * 6, "event_id", "gen_ai.request.model", "tenant"]
_MUTATED_KEYS += ["status", "latency_class", "prefix_hashes", "gen_ai.usage.input_tokens"]
_MUTATED_KEYS += ["cache_hit", "gen_ai.response.model", "gen_ai.provider.name"]


def canonical(row: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    """A hashable, order-independent form of a store row (timestamps as UTC ISO text)."""
    out = []
    for key in sorted(row):
        value = row[key]
        if isinstance(value, datetime):
            assert value.tzinfo is not None, f"{key} is naive: {value!r}"
            value = value.astimezone(UTC).isoformat()
        elif isinstance(value, list):
            value = tuple(value)
        elif isinstance(value, float) and math.isnan(value):
            value = "NaN"
        out.append((key, value))
    return tuple(out)


def expected(decoder: BatchDecoder, values: list[bytes]) -> tuple[list[Any], dict[int, str]]:
    """What the model says: sorted canonical rows it accepts, and index -> reason it refuses."""
    rows: list[Any] = []
    refused: dict[int, str] = {}
    for i, value in enumerate(values):
        try:
            event = decoder.model.model_validate_json(value)
        except ValidationError:
            result = decoder.decode_one(value)  # for its reason code
            assert isinstance(result, Reject)
            refused[i] = result.reason
        else:
            rows.append(canonical(event.row()))
    return sorted(rows, key=repr), refused


def assert_agrees_with_model(decoder: BatchDecoder, values: list[bytes]) -> None:
    """decode(values) accepts/refuses exactly what the model does, with identical row values."""
    frame, rejects = decoder.decode(values)
    want_rows, want_refused = expected(decoder, values)
    assert frame.schema == store_schema(decoder.model)
    got_refused = {r.index: r.reason for r in rejects}
    assert len(rejects) == len(got_refused), "an index was rejected twice"
    assert [r.index for r in rejects] == sorted(got_refused), "rejects are not in input order"
    assert got_refused == want_refused, [values[i][:300] for i in got_refused.keys() ^ want_refused]
    got_rows = sorted((canonical(r) for r in frame.to_pylist()), key=repr)
    assert got_rows == want_rows


def encode(event: dict[str, Any], **dumps: Any) -> bytes:
    return json.dumps(event, **dumps).encode()


# -- valid load -------------------------------------------------------------------------------


def test_valid_load_decodes_to_model_rows() -> None:
    """Every generated event is stored with the values the model gives it, in input order."""
    values = usage_values(2000)
    decoder = BatchDecoder(UsageEvent)
    frame, rejects = decoder.decode(values)
    assert rejects == []
    assert frame.num_rows == len(values)
    assert frame.column_names == store_schema(UsageEvent).names
    for got, value in zip(frame.to_pylist(), values, strict=True):
        want = UsageEvent.model_validate_json(value).row()
        assert got == want
        assert got["ts"].utcoffset() == timedelta(0)
        assert isinstance(got["prefix_hashes"], list)
        assert got["prefix_hashes"] == json.loads(value)["prefix_hashes"]


def test_omitted_defaults_are_filled() -> None:
    """Omitted status and latency_class take the model's defaults; omitted optionals are null."""
    event = {k: v for k, v in BASE.items() if k not in ("status", "latency_class", "tenant")}
    event["ts"] = "2025-03-01T11:30:00.25+02:00"
    decoder = BatchDecoder(UsageEvent)
    frame, rejects = decoder.decode([encode(event, separators=(",", ":"))])
    assert rejects == []
    (row,) = frame.to_pylist()
    assert row == UsageEvent.model_validate_json(json.dumps(event)).row()
    assert row["status"] == "ok"
    assert row["latency_class"] == "interactive"
    assert row["tenant"] is None
    assert row["ts"] == datetime(2025, 3, 1, 9, 30, 0, 250_000, tzinfo=UTC)
    assert row["ts"].utcoffset() == timedelta(0)


def test_empty_batch() -> None:
    """No values: an empty frame with the store schema and no rejects."""
    frame, rejects = BatchDecoder(UsageEvent).decode([])
    assert frame.num_rows == 0 and rejects == []
    assert frame.schema == store_schema(UsageEvent)


# -- edge cases, one by one -------------------------------------------------------------------


def _with(**changes: Any) -> bytes:
    event = dict(BASE)
    for key, value in changes.items():
        event[key.replace("__", ".")] = value
    return encode(event)


def _without(*keys: str) -> bytes:
    return encode({k: v for k, v in BASE.items() if k not in keys})


EDGE_CASES: dict[str, bytes] = {
    "valid": encode(BASE),
    "str_for_int": _with(gen_ai__usage__input_tokens="12"),
    "float_for_int": _with(gen_ai__usage__input_tokens=12.0),
    "bool_for_int": _with(gen_ai__usage__output_tokens=True),
    "int_for_str": _with(tenant=12),
    "bool_for_str": _with(team=False),
    "object_for_str": _with(app={"a": 1}),
    "list_for_str": _with(feature=["a"]),
    "int_for_float": _with(latency_ms=12),
    "str_for_float": _with(latency_ms="12.5"),
    "huge_int_for_required_str": _with(gen_ai__request__model=2**64),
    "huge_int_for_optional_str": _with(tenant=2**64),
    "huge_int_for_id": _with(event_id=2**70),
    "huge_negative_int_for_str": _with(tenant=-(2**63) - 1),
    "huge_int_for_int": _with(gen_ai__usage__input_tokens=2**64),
    "tokens_over_limit": _with(gen_ai__usage__input_tokens=2**40 + 1),
    "tokens_at_limit": _with(gen_ai__usage__input_tokens=2**40),
    "negative_tokens": _with(gen_ai__usage__output_tokens=-5),
    "quality_over_1": _with(quality_score=1.5),
    "quality_1": _with(quality_score=1),
    "negative_cost": _with(cost_usd=-0.01),
    "nan_float": _with(latency_ms=float("nan")),
    "inf_float": _with(ttft_ms=float("inf")),
    "status_unknown": _with(status="weird"),
    "status_null": _with(status=None),
    "latency_class_null": _with(latency_class=None),
    "optional_null": _with(tenant=None, cost_usd=None, prefix_hashes=None),
    "required_null": _with(gen_ai__request__model=None),
    "missing_request_model": _without("gen_ai.request.model"),
    "missing_ts": _without("ts"),
    "empty_str": _with(tenant=""),
    "empty_event_id": _with(event_id=""),
    "str_at_max": _with(tenant="x" * MAX_TEXT),
    "str_over_max": _with(tenant="x" * (MAX_TEXT + 1)),
    "multibyte_at_max": _with(team="é" * MAX_TEXT),
    "multibyte_over_max": _with(team="é" * (MAX_TEXT + 1)),
    "emoji_at_max": _with(app="\U0001f600" * MAX_TEXT),
    "emoji_over_max": _with(app="\U0001f600" * (MAX_TEXT + 1)),
    "utf8_unescaped": encode({**BASE, "team": "équipe-ü"}, ensure_ascii=False),
    "nul_char": _with(feature="a\x00b"),
    "lone_surrogate": _with(event_id="\ud83d"),
    "ts_z": _with(ts="2024-05-01T12:00:00Z"),
    "ts_offset": _with(ts="2024-05-01T12:00:00+02:00"),
    "ts_negative_offset_fraction": _with(ts="2024-05-01T12:00:00.5-03:30"),
    "ts_nanoseconds": _with(ts="2024-05-01T12:00:00.123456789Z"),
    "ts_naive": _with(ts="2024-05-01T12:00:00"),
    "ts_date_only": _with(ts="2024-05-01"),
    "ts_space_separator": _with(ts="2024-05-01 12:00:00Z"),
    "ts_lowercase": _with(ts="2024-05-01t12:00:00z"),
    "ts_no_seconds": _with(ts="2024-05-01T12:00Z"),
    "ts_offset_hours_only": _with(ts="2024-05-01T12:00:00+02"),
    "ts_offset_no_colon": _with(ts="2024-05-01T12:00:00+0200"),
    "ts_space_before_offset": _with(ts="2024-05-01T12:00:00 +02:00"),
    "ts_leading_space": _with(ts=" 2024-05-01T12:00:00Z"),
    "ts_single_digit_month": _with(ts="2024-5-01T12:00:00Z"),
    "ts_single_digit_hour": _with(ts="2024-05-01T1:00:00Z"),
    "ts_leap_second": _with(ts="2024-05-01T12:00:60Z"),
    "ts_feb_30": _with(ts="2024-02-30T12:00:00Z"),
    "ts_unix_int": _with(ts=1714564800),
    "ts_unix_str": _with(ts="1714564800"),
    "prefix_hashes_null_item": _with(prefix_hashes=[1, None]),
    "prefix_hashes_float_item": _with(prefix_hashes=[1.5]),
    "prefix_hashes_int_valued_float": _with(prefix_hashes=[1.0]),
    "prefix_hashes_int64_bounds": _with(prefix_hashes=[2**63 - 1, -(2**63)]),
    "prefix_hashes_over_int64": _with(prefix_hashes=[2**63]),
    "prefix_hashes_empty": _with(prefix_hashes=[]),
    "prefix_hashes_str": _with(prefix_hashes="1,2"),
    "cache_hit_true": _with(cache_hit=True),
    "cache_hit_false": _with(cache_hit=False),
    "cache_hit_null": _with(cache_hit=None),
    "cache_hit_str": _with(cache_hit="true"),
    "cache_hit_int": _with(cache_hit=1),
    "cache_hit_zero": _with(cache_hit=0),
    "cache_hit_list": _with(cache_hit=[True]),
    "model_prefixed": _with(gen_ai__request__model="openai/gpt-4o", gen_ai__provider__name=None),
    "model_prefixed_provider_named": _with(
        gen_ai__request__model="azure/gpt-4o", gen_ai__provider__name="azure.ai.openai"
    ),
    "response_model_prefixed": _with(
        gen_ai__response__model="anthropic/claude-sonnet-4-5", gen_ai__provider__name=None
    ),
    "both_prefixed": _with(
        gen_ai__request__model="bedrock/anthropic.claude-3-5-sonnet-20240620-v1:0",
        gen_ai__response__model="anthropic/claude-3-5-sonnet",
        gen_ai__provider__name=None,
    ),
    "prefix_only": _with(gen_ai__request__model="openai/", gen_ai__provider__name=None),
    "prefix_twice": _with(gen_ai__request__model="openrouter/anthropic/claude-3.5-sonnet"),
    "not_a_provider_prefix": _with(gen_ai__request__model="meta-llama/Llama-3.1-8B-Instruct"),
    "upper_case_prefix": _with(gen_ai__request__model="OpenAI/gpt-4o"),
    "prefix_then_newline": _with(gen_ai__request__model="openai/\n"),
    "prefix_over_max": _with(gen_ai__request__model="openai/" + "m" * MAX_TEXT),
    "unknown_keys": _with(extra={"nested": [1, 2]}, another=None),
    "pretty_printed": encode(BASE, indent=2),
    "trailing_newline": encode(BASE) + b"\n",
    "crlf_inside": encode(BASE, indent=1).replace(b"\n", b"\r\n"),
    "nan_literal": b'{"event_id": NaN}',
    "not_json": b"this is not json",
    "truncated": encode(BASE)[:-7],
    "empty_bytes": b"",
    "whitespace": b"   ",
    "array": encode([BASE]),
    "null_doc": b"null",
    "number_doc": b"42",
    "two_objects": encode(BASE) + b"{}",
    "empty_object": b"{}",
    "invalid_utf8": b'{"event_id": "\xff\xfe"}',
    # pydantic's parser refuses a number with more than 4,300 integer digits; Arrow's reads it
    "long_int_in_unknown_key": encode(BASE)[:-1] + b', "x": ' + b"9" * 4301 + b"}",
    "long_int_at_parser_limit": encode(BASE)[:-1] + b', "x": -' + b"9" * 4300 + b"}",
    "long_mantissa_in_float": encode(BASE)[:-1]
    + b', "quality_score": 1'
    + b"0" * 4301
    + b"e-4301}",
    "long_fraction_in_float": encode(BASE)[:-1] + b', "quality_score": 0.' + b"5" * 5000 + b"}",
}


@pytest.mark.parametrize("value", EDGE_CASES.values(), ids=EDGE_CASES.keys())
def test_fast_path_agrees_with_model_on_edge_case(value: bytes) -> None:
    """Alone and between valid neighbours, a value is stored iff the model accepts it, as-is."""
    decoder = BatchDecoder(UsageEvent)
    neighbours = usage_values(3, seed=11)
    assert_agrees_with_model(decoder, [value])
    assert_agrees_with_model(decoder, [neighbours[0], value, neighbours[1], value, neighbours[2]])


def _refuse(constant: str) -> float:
    raise ValueError(constant)


def _strict_json_object(value: bytes) -> bool:
    """Whether ``value`` is one line of standard JSON (no NaN) holding an object."""
    if b"\n" in value.strip():
        return False
    try:
        return isinstance(json.loads(value, parse_constant=_refuse), dict)
    except ValueError:
        return False


@pytest.mark.parametrize("only_objects", [False, True], ids=["all", "json_objects"])
def test_all_edge_cases_in_one_batch(only_objects: bool) -> None:
    """The edge cases mixed into one batch larger than a fallback chunk still agree with the model.

    With only one-line JSON objects the batch can take the fast path as a whole; with all
    of them, unparseable values are mixed in too (a fast path may fall back around them).
    """
    cases = [v for v in EDGE_CASES.values() if not only_objects or _strict_json_object(v)]
    assert len(cases) > len(EDGE_CASES) // 2
    values = usage_values(BIG_BATCH * 2 + 17, seed=5)
    for n, value in enumerate(cases):
        values.insert((n * 37) % len(values), value)
    assert_agrees_with_model(BatchDecoder(UsageEvent), values)


# -- the property -----------------------------------------------------------------------------

_INT64 = st.integers(-(2**63), 2**63 - 1)

_BIG_INTS = st.one_of(
    st.sampled_from([2**40, 2**40 + 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1]),
    st.integers(-(2**80), 2**80),  # ints beyond 64 bits are valid JSON too
)
_ODD_TEXT = st.text(
    # lone surrogates, control and non-BMP characters: json.dumps escapes them all
    st.characters(categories=["Cs", "Cc", "So", "Lo", "Zs"]),
    max_size=4,
)
_WRONG_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    _BIG_INTS,
    st.floats(),
    st.text(max_size=MAX_TEXT + 10),
    _ODD_TEXT,
    st.sampled_from(["", "x" * (MAX_TEXT + 1), "12", "1.5", "ok", "batch", "error"]),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.lists(st.integers(), max_size=2),
)


_TS_PERTURBATIONS: list[tuple[str, str]] = [
    # (regex on a valid "YYYY-MM-DDTHH:MM:SS+HH:MM" text, replacement): forms a lenient
    # parser might accept and a strict one refuses, or the other way round
    (r"-0(\d)-", r"-\1-"),  # single-digit month
    (r"-0(\d)T", r"-\1T"),  # single-digit day
    (r"T0(\d)", r"T\1"),  # single-digit hour
    (r":(\d\d)([+-])", r":60\2"),  # leap second
    (r"^", " "),  # leading space
    (r"$", " "),  # trailing space
    (r"([+-]\d\d:\d\d)$", r" \1"),  # space before the offset
    (r"([+-]\d\d):\d\d$", r"\1"),  # offset hours only
    (r"([+-]\d\d):(\d\d)$", r"\1\2"),  # offset without colon
    (r"[+-]00:00$", "Z"),
    (r"[+-]\d\d:\d\d$", "z"),
    (r"[+-]\d\d:\d\d$", ""),  # naive
    (r"T", " "),
    (r"T", "t"),
    (r":(\d\d)([+-])", r":\1.123456789\2"),  # nanoseconds
    (r":(\d\d)([+-])", r":\1,5\2"),  # comma fraction
    (r":(\d\d)([+-])", r":\1.\2"),  # empty fraction
    (r":\d\d([+-])", r"\1"),  # no seconds
    (r"T.*$", ""),  # date only
    (r"^(\d{4})", r"+00\1"),  # expanded year
]


@st.composite
def _timestamps(draw: st.DrawFn) -> str:
    """A timestamp in one of the forms producers really send, valid or not."""
    moment = draw(st.datetimes(min_value=datetime(1900, 1, 1), max_value=datetime(2200, 1, 1)))
    form = draw(
        st.sampled_from(["z", "offset", "naive", "date", "space", "nanos", "lower", "no_secs"])
    )
    if form == "date":
        return moment.date().isoformat()
    minutes = draw(st.integers(-(23 * 60 + 59), 23 * 60 + 59))
    tz = timezone(timedelta(minutes=minutes))
    text = moment.replace(tzinfo=tz).isoformat(timespec=draw(st.sampled_from(["seconds", "auto"])))
    if form == "z":
        return moment.isoformat() + "Z"
    if form == "naive":
        return moment.isoformat()
    if form == "space":
        return text.replace("T", " ")
    if form == "nanos":
        return moment.strftime("%Y-%m-%dT%H:%M:%S.%f") + "789+00:00"
    if form == "lower":
        return moment.isoformat().lower() + "z"
    if form == "no_secs":
        return moment.strftime("%Y-%m-%dT%H:%MZ")
    return text


@st.composite
def _perturbed_timestamps(draw: st.DrawFn) -> str:
    """A valid RFC 3339 timestamp with one or two small deviations from the standard form."""
    moment = draw(st.datetimes(min_value=datetime(1970, 1, 1), max_value=datetime(2100, 1, 1)))
    offset = timezone(timedelta(minutes=draw(st.integers(-14 * 60, 14 * 60))))
    text = moment.replace(tzinfo=offset, microsecond=0).isoformat()
    for pattern, replacement in draw(st.lists(st.sampled_from(_TS_PERTURBATIONS), max_size=2)):
        text = re.sub(pattern, replacement, text, count=1)
    return text


def _value_for(key: str) -> st.SearchStrategy[Any]:
    """Plausible and implausible values for one wire key."""
    if key == "ts":
        return st.one_of(_timestamps(), _perturbed_timestamps(), _WRONG_VALUES)
    if key == "prefix_hashes":
        return st.one_of(
            st.lists(st.one_of(_INT64, _INT64, st.none(), st.floats(), st.integers()), max_size=4),
            _WRONG_VALUES,
        )
    if key in ("status", "latency_class"):
        return st.one_of(st.sampled_from(["ok", "error", "interactive", "batch"]), _WRONG_VALUES)
    if key == "cache_hit":
        return st.one_of(st.booleans(), _WRONG_VALUES)
    if key in ("gen_ai.request.model", "gen_ai.response.model"):
        prefixed = st.builds(
            "{}/{}".format,
            st.sampled_from(["openai", "azure", "bedrock", "vllm", "meta-llama", "OpenAI", ""]),
            st.one_of(st.text(max_size=MAX_TEXT), st.sampled_from(["", "gpt-4o", "a/b"])),
        )
        return st.one_of(prefixed, st.text(max_size=MAX_TEXT + 2), _WRONG_VALUES)
    if key.startswith("gen_ai.usage"):
        return st.one_of(st.integers(-10, 2**40 + 10), _WRONG_VALUES)
    if key in ("latency_ms", "ttft_ms", "cost_usd", "quality_score"):
        return st.one_of(st.floats(-1, 2), st.integers(-2, 5), _WRONG_VALUES)
    return st.one_of(st.text(max_size=MAX_TEXT + 2), _BIG_INTS, _ODD_TEXT, _WRONG_VALUES)


@st.composite
def _record(draw: st.DrawFn, n: int, parseable: bool) -> bytes:
    """A valid base event with 0-3 mutations, or a raw value that is not an event at all.

    ``parseable``: only one-line JSON objects, so that a batch of them takes the fast path
    (an unparseable value may send its neighbours through the model too).
    """
    kinds = ["valid", "mutated", "mutated", "mutated"] + ([] if parseable else ["raw"])
    kind = draw(st.sampled_from(kinds))
    event = dict(BASE)
    event["event_id"] = f"rec-{n}"
    if kind == "raw":
        return draw(
            st.one_of(
                st.binary(max_size=40),
                st.sampled_from(
                    [b"", b"not json", b"[1, 2]", b"null", b'{"x": NaN}', encode(event)[:-3]]
                ),
                st.builds(lambda e: encode([e]), st.just(event)),
            )
        )
    for _ in range(draw(st.integers(1, 3)) if kind == "mutated" else 0):
        action = draw(st.sampled_from(["set", "set", "set", "delete", "extra", "null"]))
        key = draw(st.sampled_from(_MUTATED_KEYS))
        if action == "delete":
            event.pop(key, None)
        elif action == "null":
            event[key] = None
        elif action == "extra":
            event[draw(st.text(min_size=1, max_size=10))] = draw(_WRONG_VALUES)
        else:
            event[key] = draw(_value_for(key))
    pretty = not parseable and draw(st.booleans())
    return encode(event, indent=2) if pretty else encode(event)


@st.composite
def _batches(draw: st.DrawFn) -> list[bytes]:
    count = draw(st.integers(1, 12))
    parseable = draw(st.booleans())
    records = [draw(_record(n, parseable)) for n in range(count)]
    if draw(st.integers(0, 4)) == 0:  # sometimes past a fallback chunk, to use the chunked retry
        filler = _FILLER[: BIG_BATCH + 20]
        positions = draw(st.lists(st.integers(0, len(filler)), min_size=count, max_size=count))
        out = list(filler)
        for pos, record in sorted(zip(positions, records, strict=True), reverse=True):
            out.insert(pos, record)
        return out
    return records


_FILLER = usage_values(BIG_BATCH + 20, seed=99)
DECODER = BatchDecoder(UsageEvent)
"""``decode`` is pure, so the property tests share one decoder."""


_PROPERTY = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _record_with(key: str, value: Any) -> bytes:
    return encode({**BASE, "event_id": "one", key: value})


@settings(_PROPERTY, max_examples=300)
@given(ts=st.one_of(_timestamps(), _perturbed_timestamps()))
def test_any_timestamp_is_read_like_the_model(ts: str) -> None:
    """A timestamp in any near-RFC 3339 form is accepted iff the model accepts it, same instant."""
    assert_agrees_with_model(DECODER, [_FILLER[0], _record_with("ts", ts), _FILLER[1]])


@settings(_PROPERTY, max_examples=400)
@given(data=st.data(), key=st.sampled_from(WIRE_KEYS))
def test_any_value_of_any_field_is_decided_like_the_model(data: st.DataObject, key: str) -> None:
    """One field set to any JSON value (right type or not, in range or not): the model decides."""
    value = data.draw(_value_for(key), label=key)
    assert_agrees_with_model(DECODER, [_FILLER[0], _record_with(key, value), _FILLER[1]])


@settings(_PROPERTY, max_examples=300)
@given(value=st.booleans().flatmap(lambda parseable: _record(0, parseable)))
def test_each_record_is_decided_like_the_model(value: bytes) -> None:
    """Any one record, valid or not, between two valid neighbours: stored iff the model
    accepts it, with the model's values, and the neighbours are kept."""
    assert_agrees_with_model(DECODER, [_FILLER[0], value, _FILLER[1]])


@settings(_PROPERTY, max_examples=100)
@given(values=_batches())
def test_decode_accepts_exactly_what_the_model_accepts(values: list[bytes]) -> None:
    """For any mix of valid and invalid records, rows and rejects equal the model's verdicts."""
    assert_agrees_with_model(DECODER, values)


# -- one bad line must not sink its batch -----------------------------------------------------


def test_three_bad_records_in_ten_thousand() -> None:
    """9,997 rows survive; the 3 bad ones are rejected at their exact indices with named fields."""
    values = usage_values(10_000, seed=21)
    wrong_type = json.loads(values[0])
    wrong_type["gen_ai.usage.input_tokens"] = "1175"
    missing = json.loads(values[4321])
    del missing["gen_ai.request.model"]
    bad = {
        0: (encode(wrong_type), "wrong_type", "gen_ai.usage.input_tokens"),
        4321: (encode(missing), "missing_field", "gen_ai.request.model"),
        9999: (values[9999][:-9], "invalid_json", "JSON"),
    }
    for i, (value, _reason, _field) in bad.items():
        values[i] = value
    frame, rejects = BatchDecoder(UsageEvent).decode(values)
    assert frame.num_rows == 9_997
    assert [r.index for r in rejects] == sorted(bad)
    for reject in rejects:
        _value, reason, field = bad[reject.index]
        assert reject.reason == reason
        assert reject.reason in REASONS
        assert field in reject.detail
    kept = set(frame.column("event_id").to_pylist())
    assert len(kept) == 9_997
    ids = [json.loads(v)["event_id"] for i, v in enumerate(values) if i not in bad]
    assert kept == set(ids)


REASON_CASES: list[tuple[bytes, str, str]] = [
    (_with(gen_ai__usage__input_tokens="12"), "wrong_type", "gen_ai.usage.input_tokens"),
    (_with(latency_ms="fast"), "wrong_type", "latency_ms"),
    (_with(ts="2024-05-01T12:00:00"), "wrong_type", "ts"),
    (_without("gen_ai.request.model"), "missing_field", "gen_ai.request.model"),
    (_with(gen_ai__usage__output_tokens=-5), "invalid_value", "gen_ai.usage.output_tokens"),
    (_with(quality_score=1.5), "invalid_value", "quality_score"),
    (_with(tenant="x" * (MAX_TEXT + 1)), "invalid_value", "tenant"),
    (_with(event_id=""), "invalid_value", "event_id"),
    (b'{"event_id": ', "invalid_json", "JSON"),
    (encode([BASE["event_id"]]), "not_an_object", ""),
    (b"42", "not_an_object", ""),
]


@pytest.mark.parametrize(("value", "reason", "field"), REASON_CASES)
def test_reject_reason_and_detail(value: bytes, reason: str, field: str) -> None:
    """Each refusal carries the right reason code and a detail naming the offending field."""
    neighbours = usage_values(2, seed=4)
    frame, rejects = BatchDecoder(UsageEvent).decode([neighbours[0], value, neighbours[1]])
    assert frame.num_rows == 2
    assert [(r.index, r.reason) for r in rejects] == [(1, reason)]
    assert field in rejects[0].detail
    assert set(REASONS) >= {r.reason for r in rejects}


def test_loadgen_invalid_payloads_are_all_rejected() -> None:
    """UsageLoad's invalid_share payloads are each refused, and every valid one is kept."""
    load = UsageLoad(seed=8, invalid_share=0.2, start=START)
    values = [value for _key, value in itertools.islice(load, 3000)]
    decoder = BatchDecoder(UsageEvent)
    frame, rejects = decoder.decode(values)
    assert len(rejects) == load.counts["invalid"] > 0
    assert frame.num_rows == load.counts["valid"]
    assert {r.reason for r in rejects} == {
        "invalid_json",
        "wrong_type",
        "missing_field",
        "invalid_value",
        "not_an_object",
    }
    assert_agrees_with_model(decoder, values[:600])


def test_record_over_max_bytes_is_rejected_as_too_large() -> None:
    """A 5 MB value is refused as too_large without parsing; its neighbours are kept."""
    values = usage_values(5, seed=2)
    huge = dict(BASE, feature="x" * MAX_TEXT, padding="p" * (5 << 20))
    values.insert(2, encode(huge))
    frame, rejects = BatchDecoder(UsageEvent, max_record_bytes=1 << 20).decode(values)
    assert frame.num_rows == 5
    assert [(r.index, r.reason) for r in rejects] == [(2, "too_large")]
    assert str(len(values[2])) in rejects[0].detail
    assert set(frame.column("event_id").to_pylist()) == {
        json.loads(v)["event_id"] for i, v in enumerate(values) if i != 2
    }


def test_record_at_max_bytes_is_kept() -> None:
    """The limit is inclusive: a value of exactly max_record_bytes is decoded normally."""
    value = usage_values(1, seed=2)[0]
    frame, rejects = BatchDecoder(UsageEvent, max_record_bytes=len(value)).decode([value])
    assert rejects == [] and frame.num_rows == 1
    frame, rejects = BatchDecoder(UsageEvent, max_record_bytes=len(value) - 1).decode([value])
    assert frame.num_rows == 0 and [r.reason for r in rejects] == ["too_large"]


# -- GPU samples ------------------------------------------------------------------------------


def gpu_samples(n: int) -> list[dict[str, Any]]:
    """``n`` valid GPU samples across two hosts and four GPUs."""
    out = []
    for i in range(n):
        sample: dict[str, Any] = {
            "ts": (START + timedelta(seconds=i // 8)).isoformat().replace("+00:00", "Z"),
            "host": f"node-{i % 2}",
            "gpu_index": (i // 2) % 4,
            "utilization_pct": float(i % 101),
        }
        if i % 3:
            sample.update(
                gpu_uuid=f"GPU-{i:08x}",
                gpu_model="NVIDIA H100 80GB HBM3",
                memory_used_bytes=i * 1_000_000,
                memory_total_bytes=80 * 2**30,
                power_watts=300.5 + i,
                deployment="llama-8b",
                tenant="acme",
                team="cx",
            )
        out.append(sample)
    return out


def test_gpu_samples_decode() -> None:
    """Valid GPU samples decode to the model's rows; bad ones are refused like usage events."""
    samples = [json.dumps(s).encode() for s in gpu_samples(40)]
    bad = {
        3: json.dumps({**gpu_samples(1)[0], "utilization_pct": 101}).encode(),
        7: json.dumps({**gpu_samples(1)[0], "gpu_index": 1024}).encode(),
        9: json.dumps({k: v for k, v in gpu_samples(1)[0].items() if k != "host"}).encode(),
        11: json.dumps({**gpu_samples(1)[0], "gpu_index": "0"}).encode(),
    }
    values = list(samples)
    for i, value in bad.items():
        values[i] = value
    decoder = BatchDecoder(GpuSample)
    frame, rejects = decoder.decode(values)
    assert frame.num_rows == len(values) - len(bad)
    assert [(r.index, r.reason) for r in rejects] == [
        (3, "invalid_value"),
        (7, "invalid_value"),
        (9, "missing_field"),
        (11, "wrong_type"),
    ]
    assert "utilization_pct" in rejects[0].detail
    assert frame.schema == store_schema(GpuSample)
    good = [GpuSample.model_validate_json(v).row() for i, v in enumerate(values) if i not in bad]
    assert frame.to_pylist() == good
    assert_agrees_with_model(decoder, values)


# -- the model and the migration cannot drift -------------------------------------------------

_DUCKDB_TYPES = {
    "string": "VARCHAR",
    "int64": "BIGINT",
    "double": "DOUBLE",
    "timestamp[us, tz=UTC]": "TIMESTAMP WITH TIME ZONE",
    "list<item: int64>": "BIGINT[]",
    "bool": "BOOLEAN",
}


def _nullable(model: type[_Event], name: str) -> bool:
    annotation = model.model_fields[name].annotation
    return type(None) in typing.get_args(annotation)


@pytest.mark.parametrize("model", [UsageEvent, GpuSample], ids=lambda m: m.table)
def test_store_schema_matches_store_table(model: type[_Event], tmp_path: Path) -> None:
    """store_schema's columns, types and nullability equal the migrated table's (plus costs)."""
    with Store(tmp_path / "s.duckdb") as store:
        columns = dict(table_columns(store, model.table))
        nullable = dict(
            store.cursor()
            .execute(
                "SELECT column_name, is_nullable = 'YES' FROM information_schema.columns "
                "WHERE table_name = ?",
                [model.table],
            )
            .fetchall()
        )
    assert columns.pop("ingested_at") == "TIMESTAMP WITH TIME ZONE"
    if model is UsageEvent:  # priced at ingest: the columns pricing adds follow the model's
        for cost in COST_SCHEMA:
            assert columns.pop(cost.name) == _DUCKDB_TYPES[str(cost.type)], cost.name
            assert nullable[cost.name], cost.name
    schema = decode.store_schema(model)
    assert sorted(columns) == sorted(schema.names)
    assert {f.name: _DUCKDB_TYPES[str(f.type)] for f in schema} == columns
    for name in schema.names:
        assert nullable[name] == _nullable(model, name), name


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(
        st.one_of(
            st.binary(max_size=30),
            st.sampled_from(
                [b'{"a":"\\ud83d"}', b'{"a":"\\UD800"}', b"{\n}", b"x\\u", b"\\", b"ud", b"d"]
            ),
            st.integers(190, 210).map(lambda d: b'{"x":' + b"[" * d + b"]" * d + b"}"),
            st.integers(95, 105).map(lambda d: b"{[" * d),
            st.tuples(st.integers(3990, 4010), st.sampled_from([b"", b"{", b"-", b"0."])).map(
                lambda t: t[1] + b"7" * t[0] + b"}"
            ),
            st.integers(1, 3).map(lambda k: b'{"x":' + b"1" * 2000 * k + b"." + b"2" * 2500),
            # long enough to be scanned for digits, flagged for something else
            st.integers(1400, 1500).map(lambda n: b'{"a":"\\ud800",\n' + b"[12 " * n),
        ),
        max_size=20,
    ),
    cut=st.integers(0, 5),
)
def test_scan_for_the_model_names_the_right_values(values: list[bytes], cut: int) -> None:
    """Newlines, surrogate escapes, more than MAX_NESTING opening brackets and runs of more
    than MAX_DIGITS digits."""
    array = pa.array(values, type=pa.large_binary()).slice(min(cut, len(values)))
    long_run = re.compile(rb"[0-9]{%d}" % (decode.MAX_DIGITS + 1))
    expected = [
        b"\n" in v
        or b"\\ud" in v.lower()
        or v.count(b"[") + v.count(b"{") > decode.MAX_NESTING
        or long_run.search(v) is not None
        for v in values[min(cut, len(values)) :]
    ]
    assert decode._needs_the_model(array).to_pylist() == expected


# -- boundaries the store and the analyzers rely on --------------------------------------


GPU_BASE = {"ts": "2026-11-23T05:20:22Z", "host": "h", "gpu_index": 0, "utilization_pct": 50}


def _gpu(**changes: Any) -> bytes:
    return json.dumps({**GPU_BASE, **changes}).encode()


MALFORMED = b'{"event_id": '


@pytest.mark.parametrize(
    ("value", "reason", "field"),
    [
        (_with(ts="0"), "invalid_value", "ts"),
        (_with(ts="1700000000"), "invalid_value", "ts"),
        (_with(ts=1700000000), "wrong_type", "ts"),
        (_with(ts="0001-01-01T00:30:00+01:00"), "invalid_value", "ts"),
        (_with(ts="9999-12-31T23:30:00-01:00"), "invalid_value", "ts"),
        (_with(latency_ms=1e308), "invalid_value", "latency_ms"),
        (_with(cost_usd=1e300), "invalid_value", "cost_usd"),
        (_gpu(memory_used_bytes=2**63), "invalid_value", "memory_used_bytes"),
        (_gpu(memory_total_bytes=2**61), "invalid_value", "memory_total_bytes"),
        (_gpu(power_watts=1e308), "invalid_value", "power_watts"),
        (_gpu(ts="1700000000"), "invalid_value", "ts"),
    ],
)
def test_values_the_store_cannot_hold_are_refused_in_any_batch(
    value: bytes, reason: str, field: str
) -> None:
    """Refused by the model, and so by the decoder alone, among good neighbours, and
    beside a malformed record (the path that validates record by record)."""
    model = GpuSample if b'"host"' in value else UsageEvent
    good = _gpu() if model is GpuSample else usage_values(1, seed=11)[0]
    with pytest.raises(ValidationError):
        model.model_validate_json(value)
    for batch in ([value], [good, value, good], [good, MALFORMED, value]):
        frame, rejects = BatchDecoder(model).decode(batch)
        mine = [r for r in rejects if r.index == batch.index(value)]
        assert [r.reason for r in mine] == [reason], (batch, rejects)
        assert field in mine[0].detail
        assert frame.num_rows == len([v for v in batch if v is good])


def test_edge_years_that_stay_in_range_are_stored() -> None:
    for ts in ("0001-01-01T00:30:00-01:00", "9999-12-31T22:00:00+01:00", "2026-11-23 05:20:22z"):
        frame, rejects = BatchDecoder(GpuSample).decode([_gpu(ts=ts)])
        assert not rejects and frame.num_rows == 1, ts


def test_a_deeply_nested_unknown_key_gets_the_same_answer_in_any_batch() -> None:
    """The model's JSON parser refuses nesting past ~200; Arrow's would read it: the model
    decides, whatever the neighbours."""
    good = usage_values(3, seed=12)
    event = json.loads(good[0])
    for depth, accepted in ((150, True), (10_000, False)):
        value = json.dumps(event)[:-1].encode() + b', "x": ' + b"[" * depth + b"]" * depth + b"}"
        expected = True
        try:
            UsageEvent.model_validate_json(value)
        except ValidationError:
            expected = False
        assert expected is accepted
        for batch in ([value], [good[1], value, good[2]], [good[1], MALFORMED, value]):
            frame, rejects = BatchDecoder(UsageEvent).decode(batch)
            stored = event["event_id"] in frame.column("event_id").to_pylist()
            assert stored is accepted, (depth, len(batch), rejects)


def test_a_number_with_too_many_digits_gets_the_same_answer_in_any_batch() -> None:
    """The model's JSON parser refuses an integer part of more than 4,300 digits; Arrow's
    reads it (in an ignored key, or as a float): the model decides, whatever the neighbours."""
    good = usage_values(3, seed=13)
    event = json.loads(good[0])
    head = json.dumps(event)[:-1].encode()
    for tail, accepted in (
        (b', "x": ' + b"9" * 4300 + b"}", True),
        (b', "x": ' + b"9" * 4301 + b"}", False),
        (b', "quality_score": 1' + b"0" * 4299 + b"e-4299}", True),
        (b', "quality_score": 1' + b"0" * 4300 + b"e-4300}", False),
    ):
        value = head + tail
        expected = True
        try:
            UsageEvent.model_validate_json(value)
        except ValidationError:
            expected = False
        assert expected is accepted
        for batch in ([value], [good[1], value, good[2]], [good[1], MALFORMED, value]):
            frame, rejects = BatchDecoder(UsageEvent).decode(batch)
            stored = event["event_id"] in frame.column("event_id").to_pylist()
            assert stored is accepted, (tail[:20], len(batch), rejects)


def test_events_too_far_in_the_future_are_refused_by_every_path() -> None:
    window = decode.TimeWindow(timedelta(hours=1))
    soon = datetime.now(UTC) + timedelta(minutes=30)
    late = datetime.now(UTC) + timedelta(hours=2)
    ok, ahead = (_gpu(ts=t.isoformat()) for t in (soon, late))
    for batch in ([ok, ahead], [ok, MALFORMED, ahead]):
        frame, rejects = BatchDecoder(GpuSample, window=window).decode(batch)
        assert frame.num_rows == 1
        (refused,) = [r for r in rejects if r.index == batch.index(ahead)]
        assert refused.reason == "invalid_value"
        assert "ingest.max_future_skew_s" in refused.detail
    # without a window the model alone decides: both stored
    frame, rejects = BatchDecoder(GpuSample).decode([ok, ahead])
    assert frame.num_rows == 2 and not rejects


# -- gateway cache hits and provider prefixes -------------------------------------------------


def test_cache_hit_is_stored_as_sent_and_defaults_to_false() -> None:
    """``cache_hit`` true or false is kept; absent or null is false; any other JSON type is
    refused as ``wrong_type``, on the fast path as by the model."""
    values = [
        _with(event_id="hit", cache_hit=True),
        _with(event_id="miss", cache_hit=False),
        _with(event_id="null", cache_hit=None),
        encode({**{k: v for k, v in BASE.items() if k != "cache_hit"}, "event_id": "absent"}),
        _with(event_id="text", cache_hit="true"),
        _with(event_id="one", cache_hit=1),
    ]
    frame, rejects = BatchDecoder(UsageEvent).decode(values)
    got = {row["event_id"]: row["cache_hit"] for row in frame.to_pylist()}
    assert got == {"hit": True, "miss": False, "null": False, "absent": False}
    assert [(r.index, r.reason) for r in rejects] == [(4, "wrong_type"), (5, "wrong_type")]
    assert all("cache_hit" in r.detail for r in rejects)
    assert_agrees_with_model(BatchDecoder(UsageEvent), values)


def test_provider_prefixes_are_split_off_model_names() -> None:
    """``openai/gpt-4o`` is stored as model ``gpt-4o`` of provider ``openai`` (the prefix
    names the provider only where none is sent); names that do not start with a known
    provider keep their slash. Over 20,000 records, so Arrow reads the batch in several
    chunks."""
    cases = [
        # (request model, response model, provider sent) -> (provider, request, response)
        (("openai/gpt-4o", None, None), ("openai", "gpt-4o", None)),
        (
            ("openai/gpt-4o", "gpt-4o-2024-08-06", "openai"),
            ("openai", "gpt-4o", "gpt-4o-2024-08-06"),
        ),
        (("azure/gpt-4o", None, "azure.ai.openai"), ("azure.ai.openai", "gpt-4o", None)),
        (
            ("gpt-4o", "anthropic/claude-sonnet-4-5", None),
            ("anthropic", "gpt-4o", "claude-sonnet-4-5"),
        ),
        (
            ("bedrock/anthropic.claude-3-5-sonnet-20240620-v1:0", "anthropic/x", None),
            ("bedrock", "anthropic.claude-3-5-sonnet-20240620-v1:0", "x"),
        ),
        (
            ("meta-llama/Llama-3.1-8B-Instruct", None, "vllm"),
            ("vllm", "meta-llama/Llama-3.1-8B-Instruct", None),
        ),
        (
            ("openrouter/anthropic/claude-3.5", None, None),
            ("openrouter", "anthropic/claude-3.5", None),
        ),
        (("openai/", None, None), (None, "openai/", None)),
        (("OpenAI/gpt-4o", None, None), (None, "OpenAI/gpt-4o", None)),
    ]
    values = []
    want = {}
    for i in range(21_000):
        (request, response, provider), expect = cases[i % len(cases)]
        event = {**BASE, "event_id": f"e{i}", "gen_ai.request.model": request}
        event["gen_ai.response.model"] = response
        event["gen_ai.provider.name"] = provider
        values.append(encode(event))
        want[f"e{i}"] = expect
    decoder = BatchDecoder(UsageEvent)
    frame, rejects = decoder.decode(values)
    assert not rejects
    got = {
        r["event_id"]: (r["provider"], r["request_model"], r["response_model"])
        for r in frame.to_pylist()
    }
    assert got == want
    for i, value in enumerate(values[: len(cases)]):  # the model alone says the same
        row = UsageEvent.model_validate_json(value).row()
        assert (row["provider"], row["request_model"], row["response_model"]) == want[f"e{i}"]
    assert_agrees_with_model(decoder, values[:300])
