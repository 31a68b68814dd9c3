"""Where an event is decoded: raw Kafka record values in, store rows and rejects out.

``BatchDecoder.decode(values)`` turns a list of record values into an Arrow
table of valid rows (store column names, store types) and a list of
``Reject``s that say, by index, which values were refused and why.

Two paths, one contract:

* the fast path joins the values into NDJSON and parses them with Arrow's JSON
  reader (which releases the GIL) against a schema derived from the event
  model, then checks every constraint of the model column-wise. It accepts a
  row only when the model would accept it with the same values; anything else
  it hands on.
* the slow path validates one value at a time with the pydantic model, which is
  the arbiter: it returns the row, or a ``Reject`` whose detail names the field.

A batch that Arrow cannot parse as a whole (one malformed line, a value with
an embedded newline, an empty value) is retried in chunks; a chunk that still
fails is checked record by record, and its good records are parsed together
again. One bad record costs its chunk a slower pass, never its neighbours.
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pa_json
from pydantic import AwareDatetime, ValidationError
from pydantic.fields import FieldInfo

from finopsd.events import _Event, explain
from finopsd.providers import split_provider

FALLBACK_CHUNK = 256
"""When a batch does not parse as a whole, it is retried in chunks of this many records;
a chunk that still fails is validated record by record."""

REASONS = (
    "too_large",
    "invalid_json",
    "not_an_object",
    "missing_field",
    "wrong_type",
    "invalid_value",
    "no_usage",  # a model call that reports no token counts and no text to count them from
    "internal",  # decoding, pricing or storing the record raised: a bug, logged with the error
)
"""Dead-letter reason codes, one counter each."""


@dataclass(frozen=True, slots=True)
class Reject:
    """A record value the decoder refused: its index in the input, a reason code, a detail."""

    index: int
    reason: str
    detail: str


@dataclass(frozen=True)
class _Column:
    wire: str
    name: str
    kind: Literal["str", "int", "float", "bool", "ts", "int_list", "enum"]
    required: bool
    default: Any
    ge: float | None
    le: float | None
    min_len: int | None
    max_len: int | None
    choices: tuple[str, ...] = ()
    item_ge: int | None = None
    item_le: int | None = None


def _unwrap(annotation: Any) -> tuple[Any, list[Any], bool]:
    """(base type, constraint metadata, nullable) of a field annotation."""
    metadata: list[Any] = []
    nullable = False
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation, *extra = typing.get_args(annotation)
            for item in extra:
                metadata.extend(item.metadata if isinstance(item, FieldInfo) else [item])
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            nullable = nullable or len(args) < len(typing.get_args(annotation))
            if len(args) != 1:
                raise TypeError(f"unsupported union {annotation!r}")
            annotation = args[0]
        else:
            return annotation, metadata, nullable


def _constraint(metadata: list[Any], attr: str) -> Any:
    for item in metadata:
        if hasattr(item, attr):
            return getattr(item, attr)
    return None


def _columns(model: type[_Event]) -> list[_Column]:
    cols = []
    for name, field in model.model_fields.items():
        base, metadata, _nullable = _unwrap(field.annotation)
        metadata = [*field.metadata, *metadata]
        kw: dict[str, Any] = {}
        if base is str:
            kind = "str"
        elif base is bool:
            kind = "bool"
        elif base is int:
            kind = "int"
        elif base is float:
            kind = "float"
        elif base is AwareDatetime or base is datetime:
            kind = "ts"
        elif typing.get_origin(base) is Literal:
            kind = "enum"
            kw["choices"] = tuple(typing.get_args(base))
        elif typing.get_origin(base) is list:
            item, item_meta, _ = _unwrap(typing.get_args(base)[0])
            if item is not int:
                raise TypeError(f"{model.__name__}.{name}: only list[int] is supported")
            kind = "int_list"
            kw["item_ge"] = _constraint(item_meta, "ge")
            kw["item_le"] = _constraint(item_meta, "le")
        else:
            raise TypeError(f"{model.__name__}.{name}: unsupported type {base!r}")
        cols.append(
            _Column(
                wire=field.alias or name,
                name=name,
                kind=kind,
                required=field.is_required(),
                default=None if field.is_required() else field.default,
                ge=_constraint(metadata, "ge"),
                le=_constraint(metadata, "le"),
                min_len=_constraint(metadata, "min_length"),
                max_len=_constraint(metadata, "max_length"),
                **kw,
            )
        )
    return cols


RFC3339 = (
    r"^(000[2-9]|00[1-9]\d|0[1-9]\d{2}|[1-8]\d{3}|9[0-8]\d{2}|99[0-8]\d|999[0-8])-\d{2}-\d{2}"
    r"T([01]\d|2[0-3]):[0-5]\d:[0-5]\d(\.\d{1,6})?"
    r"(Z|[+-]([01]\d|2[0-3]):[0-5]\d)$"
)
"""Timestamps the fast path reads (years 2-9998, at most microseconds); any other form is
left to the model, and so are years 1 and 9999, where an offset can move the instant out of
the range the store keeps."""

MAX_NESTING = 200
"""Values with more ``[`` and ``{`` bytes than this go to the model: its JSON parser refuses
nesting deeper than about 200, which Arrow's would read (an unknown key is ignored)."""

MAX_DIGITS = 4000
"""Values with a run of more ASCII digits than this go to the model: its JSON parser refuses
a number whose integer part has more than 4,300 digits ("number out of range", Python's
limit on int-to-text digits), which Arrow's reads (as a float, or in an ignored key)."""

TIMESTAMP = pa.timestamp("us", "UTC")
_NEWLINE = pa.scalar(b"\n", pa.large_binary())

_WIRE_TYPES: dict[str, pa.DataType] = {
    # Arrow's JSON reader refuses a number, boolean, object or array where the schema
    # says string (the whole parse fails and the batch is retried in chunks), so no JSON
    # value is silently turned into text; the model refuses them too.
    "str": pa.string(),
    "enum": pa.string(),
    "ts": pa.string(),
    "int": pa.int64(),
    "float": pa.float64(),
    "bool": pa.bool_(),
    "int_list": pa.list_(pa.int64()),
}
_STORE_TYPES: dict[str, pa.DataType] = {**_WIRE_TYPES, "ts": TIMESTAMP}


def store_schema(model: type[_Event]) -> pa.Schema:
    """Column names and Arrow types of the rows ``BatchDecoder`` returns for ``model``."""
    return pa.schema([pa.field(c.name, _STORE_TYPES[c.kind]) for c in _columns(model)])


@dataclass(frozen=True)
class TimeWindow:
    """Timestamps ingest accepts on top of the model's rules: none more than
    ``max_future_skew`` ahead of the clock (``ingest.max_future_skew_s``). Such an
    event would sit in every analyzer's future; it is refused as ``invalid_value``."""

    max_future_skew: timedelta

    def latest(self) -> datetime:
        """The latest acceptable timestamp, now."""
        return datetime.now(UTC) + self.max_future_skew

    def refusal(self, ts: datetime, latest: datetime) -> Reject | None:
        if ts <= latest:
            return None
        ahead = (ts - latest + self.max_future_skew).total_seconds()
        return Reject(
            0,
            "invalid_value",
            f"ts: {ts.isoformat()} is {ahead:.0f}s ahead of now; at most "
            f"{self.max_future_skew.total_seconds():.0f}s is accepted (ingest.max_future_skew_s)",
        )


class BatchDecoder:
    """Decodes record values of one event model into store rows and rejects.

    ``decode(values)`` is pure (no I/O but the clock, for ``window``) and safe to
    call from a worker thread; its heavy work runs in Arrow without the GIL.
    """

    def __init__(
        self,
        model: type[_Event],
        *,
        max_record_bytes: int = 1 << 20,
        window: TimeWindow | None = None,
    ) -> None:
        self.model = model
        self.max_record_bytes = max_record_bytes
        self.window = window
        self._latest: datetime | None = None
        self.columns = _columns(model)
        self.schema = store_schema(model)
        # columns whose provider prefix the model splits off (UsageEvent: request and
        # response model); the fast path does it with the model's own function
        self._model_names: tuple[str, ...] = getattr(model, "model_name_columns", ())
        wire = pa.schema([pa.field(c.wire, _WIRE_TYPES[c.kind]) for c in self.columns])
        self._parse_options = pa_json.ParseOptions(
            explicit_schema=wire, unexpected_field_behavior="ignore"
        )
        # one thread: the ingest pipeline runs decoding beside polling and storing, and a
        # single-threaded parse costs the least CPU per record
        self._read_options = pa_json.ReadOptions(use_threads=False, block_size=8 << 20)

    # -- public -----------------------------------------------------------------

    def decode(self, values: list[bytes] | pa.LargeBinaryArray) -> tuple[pa.Table, list[Reject]]:
        """Rows the model accepts, and a ``Reject`` (in input order) for every other value.

        ``values`` are record values, as bytes or already in an Arrow array.

        Rows the fast path reads keep their input order; a row the model recovers on
        its own may come anywhere.
        """
        frames: list[pa.Table] = []
        rejects: list[Reject] = []
        if not len(values):
            return self.empty(), rejects
        # one clock reading per call: every record of the call is judged against it
        self._latest = self.window.latest() if self.window is not None else None
        # The only per-record Python work: one copy into Arrow. Every scan below runs in
        # Arrow without the GIL, so decoding leaves the polling thread alone.
        batch = (
            values
            if isinstance(values, pa.LargeBinaryArray)
            else pa.array(values, type=pa.large_binary())
        )
        values = _Values(batch)
        sizes = pc.binary_length(batch)
        limit = self.max_record_bytes
        # The fast path takes one JSON object per line; anything else goes to the model,
        # and so does a value with a surrogate escape, where Arrow and the model may disagree.
        fast = pc.and_not(pc.starts_with(batch, "{"), _needs_the_model(batch))
        oversized = pc.greater(sizes, limit)
        if pc.all(fast).as_py() and not pc.any(oversized).as_py():
            self._decode_chunk(batch, None, values, frames, rejects)
        else:
            for i in pc.indices_nonzero(oversized).to_pylist():
                size = f"record is {len(values[i])} bytes"
                detail = f"{size}; the limit is {limit} (ingest.max_record_bytes)"
                rejects.append(Reject(i, "too_large", detail))
            fast = pc.and_not(fast, oversized)
            for i in pc.indices_nonzero(pc.invert(pc.or_(fast, oversized))).to_pylist():
                self._slow(values[i], i, frames, rejects)
            index = pc.indices_nonzero(fast)
            if len(index):
                self._decode_chunk(batch.take(index), index.to_pylist(), values, frames, rejects)
        rejects.sort(key=lambda r: r.index)
        return self._concat(frames), rejects

    def decode_one(self, value: bytes) -> dict[str, Any] | Reject:
        """Validate a single value with the model (and the window): its row, or why it
        was refused."""
        if len(value) > self.max_record_bytes:
            return Reject(0, "too_large", f"record is {len(value)} bytes")
        try:
            row = self.model.model_validate_json(value).row()
        except ValidationError as exc:
            return Reject(0, _reason(exc), explain(exc))
        if self.window is not None:
            latest = self._latest or self.window.latest()
            refused = self.window.refusal(row["ts"], latest)
            if refused is not None:
                return refused
        return row

    def empty(self) -> pa.Table:
        return self.schema.empty_table()

    # -- internals --------------------------------------------------------------

    def _decode_chunk(
        self,
        batch: pa.LargeBinaryArray,
        index: list[int] | None,
        values: _Values,
        frames: list[pa.Table],
        rejects: list[Reject],
    ) -> None:
        """Decode ``batch``, whose position ``k`` holds ``values[index[k]]`` (None: identity).

        Every value in ``batch`` is one line that starts with ``{``.
        """
        if self._fast(batch, index, values, frames, rejects):
            return
        idx = index if index is not None else list(range(len(batch)))
        survivors: list[int] = []  # positions in batch
        for start in range(0, len(batch), FALLBACK_CHUNK):
            part = batch.slice(start, FALLBACK_CHUNK)
            part_index = idx[start : start + FALLBACK_CHUNK]
            if self._fast(part, part_index, values, frames, rejects):
                continue
            for pos, i in enumerate(part_index, start):
                try:
                    self.model.model_validate_json(values[i])
                except ValidationError as exc:
                    rejects.append(Reject(i, _reason(exc), explain(exc)))
                else:
                    survivors.append(pos)
        if not survivors:
            return
        survivor_index = [idx[pos] for pos in survivors]
        kept = batch.take(pa.array(survivors, type=pa.int64()))
        if not self._fast(kept, survivor_index, values, frames, rejects):
            for i in survivor_index:
                self._slow(values[i], i, frames, rejects)

    def _fast(
        self,
        batch: pa.LargeBinaryArray,
        index: list[int] | None,
        values: _Values,
        frames: list[pa.Table],
        rejects: list[Reject],
    ) -> bool:
        """Parse ``batch`` as one NDJSON document; False if Arrow cannot (nothing appended)."""
        try:
            batch.cast(
                pa.large_string()
            )  # Arrow's JSON reader does not check UTF-8; the model does
            lines = pa.LargeListArray.from_arrays(pa.array([0, len(batch)], pa.int64()), batch)
            document = pc.binary_join(lines, _NEWLINE)[0].as_buffer()
            parsed = pa_json.read_json(
                pa.BufferReader(document),
                read_options=self._read_options,
                parse_options=self._parse_options,
            )
            if parsed.num_rows != len(batch):
                return False  # not one row per line: left to the caller
            rows, valid = self._check(parsed)
        except (pa.ArrowException, ValueError):  # not parseable here: left to the caller
            return False
        if pc.all(valid).as_py():
            frames.append(rows)
            return True
        frames.append(rows.filter(valid))
        for pos in pc.indices_nonzero(pc.invert(valid)).to_pylist():
            i = pos if index is None else index[pos]
            self._slow(values[i], i, frames, rejects)
        return True

    def _slow(self, value: bytes, i: int, frames: list[pa.Table], rejects: list[Reject]) -> None:
        result = self.decode_one(value)
        if isinstance(result, Reject):
            rejects.append(Reject(i, result.reason, result.detail))
        else:
            frames.append(pa.Table.from_pylist([result], schema=self.schema))

    def _concat(self, frames: list[pa.Table]) -> pa.Table:
        if not frames:
            return self.empty()
        if len(frames) == 1:
            return frames[0]
        return pa.concat_tables(frames)

    def _check(self, parsed: pa.Table) -> tuple[pa.Table, pa.Array]:
        """Wire columns as store columns, and one boolean per row: the model accepts it.

        A check that cannot decide a row (a null where the value is optional) passes it.
        """
        checks: list[Any] = []
        columns: list[Any] = []
        for c in self.columns:
            raw = parsed.column(c.wire)
            value = raw
            if c.required and raw.null_count:
                checks.append(pc.is_valid(raw))
            if c.kind == "ts":
                readable = pc.match_substring_regex(raw, RFC3339)
                checks.append(readable)
                # a timestamp the fast form does not cover is left to the model
                value = pc.cast(pc.if_else(readable, raw, None), TIMESTAMP)
                if self._latest is not None:  # beyond the window: the slow path explains
                    checks.append(pc.less_equal(value, pa.scalar(self._latest, TIMESTAMP)))
            elif c.kind == "str" and (c.min_len is not None or c.max_len is not None):
                # Bytes bound characters from above, so a string within max_len bytes is
                # within max_len characters; a longer one is left to the model to judge.
                # Likewise a non-empty string has at least one character.
                lo = c.min_len or 0
                hi = c.max_len if c.max_len is not None else 2**62
                size = pc.utf8_length(raw) if lo > 1 else pc.binary_length(raw)
                checks.append(pc.and_(pc.greater_equal(size, lo), pc.less_equal(size, hi)))
            elif c.kind == "enum":
                checks.append(pc.or_(pc.is_null(raw), pc.is_in(raw, pa.array(c.choices))))
            elif c.kind in ("int", "float"):
                if c.ge is not None:
                    checks.append(pc.greater_equal(raw, c.ge))
                if c.le is not None:
                    checks.append(pc.less_equal(raw, c.le))
                if c.kind == "float":
                    checks.append(pc.is_finite(raw))  # NaN slips through Arrow's parser
            elif c.kind == "int_list" and raw.null_count < len(raw):
                checks.append(_no_null_items(raw))
            if c.default is not None and raw.null_count:
                value = pc.fill_null(value, c.default)
            columns.append(value)
        valid = pc.fill_null(checks[0], True) if checks else pc.is_valid(parsed.column(0))
        for check in checks[1:]:
            valid = pc.and_(valid, pc.fill_null(check, True))
        table = pa.Table.from_arrays(columns, schema=self.schema)
        if self._model_names:
            table = _split_provider_prefixes(table, self._model_names)
        return table, valid


class _Values:
    """``values[i]``: the bytes of record ``i`` of an Arrow array, for the slow path."""

    def __init__(self, batch: pa.LargeBinaryArray) -> None:
        self.batch = batch

    def __getitem__(self, i: int) -> bytes:
        return self.batch[i].as_py() or b""


def _needs_the_model(batch: pa.LargeBinaryArray) -> pa.BooleanArray:
    """Per value: it holds a newline byte, ``\\ud`` in any case (a surrogate escape),
    more than ``MAX_NESTING`` ``[`` and ``{`` bytes (a bound on its nesting depth), or a
    run of more than ``MAX_DIGITS`` digits (only a value that long can hold one).

    numpy over the whole data buffer (GIL released, about 20× faster than Arrow's
    per-value substring search); then only the values with a hit are named.
    """
    flags = np.zeros(len(batch), dtype=bool)
    _, offsets_buf, data_buf = batch.buffers()
    if data_buf is None or len(batch) == 0:
        return pa.array(flags)
    offsets = np.frombuffer(offsets_buf, dtype=np.int64)[
        batch.offset : batch.offset + len(batch) + 1
    ]
    data = np.frombuffer(data_buf, dtype=np.uint8)[offsets[0] : offsets[-1]]

    def owners(at: np.ndarray) -> np.ndarray:
        return np.searchsorted(offsets, at + offsets[0], side="right") - 1

    flags[owners(np.flatnonzero(data == 0x0A))] = True
    opens = np.flatnonzero((data | 0x20) == 0x7B)  # "[" is 0x5B, "{" 0x7B: one compare
    if len(opens) > MAX_NESTING:
        counts = np.bincount(owners(opens), minlength=len(batch))
        flags |= counts > MAX_NESTING
    # only a value longer than MAX_DIGITS can hold such a run: rare (records are ~0.5 KB),
    # so those are scanned one by one, at about the cost of parsing them
    for i in np.flatnonzero(np.diff(offsets) > MAX_DIGITS).tolist():
        if _long_digit_run(data[offsets[i] - offsets[0] : offsets[i + 1] - offsets[0]]):
            flags[i] = True
    backslashes = np.flatnonzero(data[:-2] == 0x5C)
    if len(backslashes):
        u = (data[backslashes + 1] | 0x20) == ord("u")
        d = (data[backslashes + 2] | 0x20) == ord("d")
        at = backslashes[u & d]
        values = owners(at)
        inside = at + 3 + offsets[0] <= offsets[values + 1]  # not across two values
        flags[values[inside]] = True
    return pa.array(flags)


def _long_digit_run(value: np.ndarray) -> bool:
    """Whether the bytes ``value`` hold a run of more than ``MAX_DIGITS`` ASCII digits."""
    digit = (value - np.uint8(0x30)) < 10
    if np.count_nonzero(digit) <= MAX_DIGITS:
        return False
    edges = np.flatnonzero(np.diff(digit, prepend=False, append=False))  # run starts, ends
    return bool((np.diff(edges)[0::2] > MAX_DIGITS).any())


def _split_provider_prefixes(table: pa.Table, names: tuple[str, ...]) -> pa.Table:
    """``UsageEvent``'s prefix rule over a batch: each of the columns ``names`` loses a
    provider prefix (``finopsd.providers.split_provider``), and ``provider`` is filled from
    the first prefix where it is null.

    A batch whose model names hold no ``/`` byte is returned as it is (one numpy pass over
    the names); otherwise the function runs once per distinct name of each chunk
    (``dictionary_encode``), not once per row: a batch names a few models.
    """
    heads: list[pa.ChunkedArray] = []
    for name in names:
        column = table.column(name)
        if not any(_holds_byte(chunk, 0x2F) for chunk in column.chunks):
            continue
        models, prefixes = [], []
        for chunk in column.chunks:
            encoded = pc.dictionary_encode(chunk)
            split = [split_provider(v) for v in encoded.dictionary.to_pylist()]
            if all(prefix is None for prefix, _ in split):
                models.append(chunk)
                prefixes.append(pa.nulls(len(chunk), pa.string()))
                continue
            models.append(pa.array([m for _, m in split], pa.string()).take(encoded.indices))
            prefixes.append(pa.array([p for p, _ in split], pa.string()).take(encoded.indices))
        table = table.set_column(
            table.schema.get_field_index(name), name, pa.chunked_array(models, pa.string())
        )
        heads.append(pa.chunked_array(prefixes, pa.string()))
    if heads and "provider" in table.column_names:
        at = table.schema.get_field_index("provider")
        provider = pc.coalesce(table.column(at), *heads)
        table = table.set_column(at, "provider", provider)
    return table


def _holds_byte(values: pa.Array, byte: int) -> bool:
    """Whether the data buffer of a string array slice holds ``byte`` (nulls' bytes are none)."""
    _, offsets_buf, data_buf = values.buffers()
    if data_buf is None or len(values) == 0:
        return False
    offsets = np.frombuffer(offsets_buf, dtype=np.int32)[
        values.offset : values.offset + len(values) + 1
    ]
    data = np.frombuffer(data_buf, dtype=np.uint8)[offsets[0] : offsets[-1]]
    return bool(np.any(data == byte))


def _no_null_items(lists: pa.ChunkedArray) -> pa.ChunkedArray:
    """Per row: the list holds no null item (a null list passes)."""
    chunks = []
    for chunk in lists.chunks:
        items = pc.list_flatten(chunk)
        flags = [True] * len(chunk)
        if items.null_count:  # rare: worth a Python loop over the offending rows only
            for row in pc.filter(pc.list_parent_indices(chunk), pc.is_null(items)).to_pylist():
                flags[row] = False
        chunks.append(pa.array(flags, type=pa.bool_()))
    return pa.chunked_array(chunks, type=pa.bool_())


_TYPE_ERRORS = ("_type", "_parsing", "literal_error", "timezone_aware", "timezone_naive")


def _reason(error: ValidationError) -> str:
    """The reason code for a validation error: the first error decides."""
    kind = error.errors(include_url=False)[0]["type"]
    if kind == "json_invalid":
        return "invalid_json"
    if kind in ("model_type", "model_attributes_type"):
        return "not_an_object"
    if kind == "missing":
        return "missing_field"
    if kind.endswith(_TYPE_ERRORS) or kind in _TYPE_ERRORS:
        return "wrong_type"
    return "invalid_value"


__all__ = ["REASONS", "BatchDecoder", "Reject", "TimeWindow", "store_schema"]
