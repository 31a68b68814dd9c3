"""Where an event is decoded: raw Kafka record values in, store rows and rejects out.

``BatchDecoder.decode(values)`` turns a list of record values into a polars
frame of valid rows (store column names, store dtypes) and a list of
``Reject``s that say, by index, which values were refused and why.

Two paths, one contract:

* the fast path joins the values into NDJSON and parses them with polars
  (which releases the GIL) against a schema derived from the event model, then
  checks every constraint of the model column-wise. It accepts a row only when
  the model would accept it with the same values; anything else it hands on.
* the slow path validates one value at a time with the pydantic model, which is
  the arbiter: it returns the row, or a ``Reject`` whose detail names the field.

A batch that polars cannot parse as a whole (one malformed line, a value with
an embedded newline, an empty value) is retried in chunks; a chunk that still
fails is checked record by record, and its good records are parsed together
again. One bad record costs its chunk a slower pass, never its neighbours.
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import polars as pl
from pydantic import AwareDatetime, ValidationError
from pydantic.fields import FieldInfo

from finopsd.events import _Event, explain

TS_FORMAT = "%Y-%m-%dT%H:%M:%S%.f%#z"
"""RFC 3339 timestamps the fast path parses; other forms go to the model."""

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
    kind: Literal["str", "int", "float", "ts", "int_list", "enum"]
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
    r"^\d{4}-\d{2}-\d{2}T([01]\d|2[0-3]):[0-5]\d:[0-5]\d(\.\d{1,9})?"
    r"(Z|[+-]([01]\d|2[0-3]):[0-5]\d)$"
)
"""Timestamps the fast path reads; any other form is left to the model."""

_WIRE_DTYPES: dict[str, Any] = {
    # Categorical refuses JSON numbers, booleans and objects where String would
    # silently turn them into text; the model refuses them too.
    "str": pl.Categorical,
    "enum": pl.Categorical,
    "ts": pl.Categorical,
    "int": pl.Int64,
    "float": pl.Float64,
    "int_list": pl.List(pl.Int64),
}
_STORE_DTYPES: dict[str, Any] = {
    "str": pl.String,
    "enum": pl.String,
    "ts": pl.Datetime("us", "UTC"),
    "int": pl.Int64,
    "float": pl.Float64,
    "int_list": pl.List(pl.Int64),
}


def store_schema(model: type[_Event]) -> dict[str, Any]:
    """Column name to polars dtype of the rows ``BatchDecoder`` returns for ``model``."""
    return {c.name: _STORE_DTYPES[c.kind] for c in _columns(model)}


class BatchDecoder:
    """Decodes record values of one event model into store rows and rejects.

    ``decode(values)`` is pure (no I/O) and safe to call from a worker thread;
    its heavy work runs in polars without the GIL.
    """

    def __init__(self, model: type[_Event], *, max_record_bytes: int = 1 << 20) -> None:
        self.model = model
        self.max_record_bytes = max_record_bytes
        self.columns = _columns(model)
        self.wire_schema = {c.wire: _WIRE_DTYPES[c.kind] for c in self.columns}
        self.schema = store_schema(model)
        self._as_text = [
            pl.col(c.wire).cast(pl.String) for c in self.columns if c.kind in ("str", "enum", "ts")
        ]
        self._convert, self._valid = self._expressions()

    # -- public -----------------------------------------------------------------

    def decode(self, values: list[bytes]) -> tuple[pl.DataFrame, list[Reject]]:
        """Rows the model accepts, and a ``Reject`` (in input order) for every other value.

        Rows keep their input order except that rows recovered by the slow path
        come after the chunk they were in.
        """
        frames: list[pl.DataFrame] = []
        rejects: list[Reject] = []
        if not values:
            return self.empty(), rejects
        index: list[int] | None = None
        if max(map(len, values)) > self.max_record_bytes:
            limit = self.max_record_bytes
            index = [i for i, v in enumerate(values) if len(v) <= limit]
            rejects = [
                Reject(
                    i,
                    "too_large",
                    f"record is {len(v)} bytes; the limit is {limit} (ingest.max_record_bytes)",
                )
                for i, v in enumerate(values)
                if len(v) > limit
            ]
            values = [values[i] for i in index]
        if values:
            self._decode_chunk(values, index, frames, rejects)
        rejects.sort(key=lambda r: r.index)
        return self._concat(frames), rejects

    def decode_one(self, value: bytes) -> dict[str, Any] | Reject:
        """Validate a single value with the model: its row, or why it was refused."""
        if len(value) > self.max_record_bytes:
            return Reject(0, "too_large", f"record is {len(value)} bytes")
        try:
            return self.model.model_validate_json(value).row()
        except ValidationError as exc:
            return Reject(0, _reason(exc), explain(exc))

    def empty(self) -> pl.DataFrame:
        return pl.DataFrame(schema=self.schema)

    # -- internals --------------------------------------------------------------

    def _decode_chunk(
        self,
        values: list[bytes],
        index: list[int] | None,
        frames: list[pl.DataFrame],
        rejects: list[Reject],
    ) -> None:
        """Decode ``values``; ``index`` maps their positions to input indices (None: identity)."""
        if self._fast(values, index, frames, rejects):
            return
        idx = index if index is not None else list(range(len(values)))
        survivors: list[bytes] = []
        survivor_index: list[int] = []
        for start in range(0, len(values), FALLBACK_CHUNK):
            part = values[start : start + FALLBACK_CHUNK]
            part_index = idx[start : start + FALLBACK_CHUNK]
            if self._fast(part, part_index, frames, rejects):
                continue
            for value, i in zip(part, part_index, strict=True):
                try:
                    self.model.model_validate_json(value)
                except ValidationError as exc:
                    rejects.append(Reject(i, _reason(exc), explain(exc)))
                else:
                    survivors.append(value)
                    survivor_index.append(i)
        if survivors and not self._fast(survivors, survivor_index, frames, rejects):
            for value, i in zip(survivors, survivor_index, strict=True):
                self._slow(value, i, frames, rejects)

    def _fast(
        self,
        values: list[bytes],
        index: list[int] | None,
        frames: list[pl.DataFrame],
        rejects: list[Reject],
    ) -> bool:
        """Parse ``values`` as one NDJSON document; False if polars cannot (nothing appended)."""
        joined = b"\n".join(values)
        if joined.count(b"\n") != len(values) - 1:
            return False  # a value holds a newline: lines and records no longer line up
        try:
            parsed = pl.read_ndjson(joined, schema=self.wire_schema)
        except Exception:  # polars raises several types for bad input; any means "not here"
            return False
        if parsed.height != len(values):
            return False  # a blank value produced no row
        checked = parsed.with_columns(self._as_text).select(
            [*self._convert, self._valid.alias("__valid")]
        )
        valid = checked.get_column("__valid")
        if b"\\ud" in joined or b"\\uD" in joined:
            # polars and the model disagree on unpaired surrogate escapes: the model decides
            escaped = pl.Series([b"\\ud" in v or b"\\uD" in v for v in values])
            valid = valid & ~escaped
        if valid.all():
            frames.append(checked.drop("__valid"))
            return True
        frames.append(checked.filter(valid).drop("__valid"))
        for pos in (~valid).arg_true().to_list():
            self._slow(values[pos], pos if index is None else index[pos], frames, rejects)
        return True

    def _slow(
        self, value: bytes, i: int, frames: list[pl.DataFrame], rejects: list[Reject]
    ) -> None:
        result = self.decode_one(value)
        if isinstance(result, Reject):
            rejects.append(Reject(i, result.reason, result.detail))
        else:
            frames.append(pl.DataFrame([result], schema=self.schema))

    def _concat(self, frames: list[pl.DataFrame]) -> pl.DataFrame:
        if not frames:
            return self.empty()
        if len(frames) == 1:
            return frames[0]
        return pl.concat(frames, how="vertical", rechunk=False)

    def _expressions(self) -> tuple[list[pl.Expr], pl.Expr]:
        """Wire columns to store columns, and one boolean: the model accepts the row."""
        convert: list[pl.Expr] = []
        checks: list[pl.Expr] = []
        for c in self.columns:
            raw = pl.col(c.wire)  # text kinds are already cast from Categorical to String
            present = raw.is_not_null()
            if c.kind == "str":
                # polars renders an integer beyond 64 bits as "Static(...)" text; enum and
                # ts values meet stricter checks below
                checks.append(~present | ~raw.str.starts_with("Static("))
            if c.kind == "ts":
                checks.append(~present | raw.str.contains(RFC3339))
                value = raw.str.to_datetime(
                    TS_FORMAT, time_zone="UTC", time_unit="us", strict=False
                )
                # a timestamp the fast format cannot read is left to the model
                checks.append(value.is_not_null() | raw.is_null())
            else:
                value = raw
            if c.required:
                checks.append(present)
            if c.default is not None:
                value = value.fill_null(c.default)
            if c.kind == "str" and (c.min_len is not None or c.max_len is not None):
                # Bytes bound characters from above, so a string within max_len bytes is
                # within max_len characters; a longer one is left to the model to judge.
                # Likewise a non-empty string has at least one character.
                size = raw.str.len_bytes()
                lo = c.min_len or 0
                hi = c.max_len if c.max_len is not None else 2**62
                if lo <= 1:
                    checks.append(~present | size.is_between(lo, hi))
                else:
                    checks.append(~present | raw.str.len_chars().is_between(lo, hi))
            if c.kind == "enum":
                checks.append(~present | raw.is_in(list(c.choices)))
            if c.kind in ("int", "float"):
                if c.ge is not None:
                    checks.append(~present | (raw >= c.ge))
                if c.le is not None:
                    checks.append(~present | (raw <= c.le))
            if c.kind == "int_list":
                checks.append(~present | ~raw.list.eval(pl.element().is_null()).list.any())
            convert.append(value.cast(_STORE_DTYPES[c.kind]).alias(c.name))
        valid = pl.all_horizontal(checks) if checks else pl.lit(True)
        return convert, valid


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


__all__ = ["REASONS", "BatchDecoder", "Reject", "store_schema"]
