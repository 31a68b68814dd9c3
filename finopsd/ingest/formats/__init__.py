"""Input formats: how the records of a topic are decoded, chosen per topic in config.

Every decoder has the shape of ``finopsd.ingest.decode.BatchDecoder``:

* ``model``: the event model whose rows it returns;
* ``decode(values) -> (rows, rejects)``: ``values`` are Kafka record values
  (``list[bytes]`` or a ``pyarrow.LargeBinaryArray``); ``rows`` is a
  ``pyarrow.Table`` with exactly ``store_schema(model)``; ``rejects`` holds one
  ``Reject(index, reason, detail)`` per refused record, ``index`` being the
  record's position in ``values`` and ``reason`` one of ``decode.REASONS``.

A record may hold several events (an OTLP request holds many spans): then it
may yield rows *and* a ``Reject`` (its valid events are stored, the record also
goes to the dead-letter topic for the others; a resend is deduplicated by
``event_id``).

``FORMATS`` maps the names config.toml uses (``[ingest] formats``) to decoder
classes; ``make_decoder`` builds one. A new format is one module and one entry
here.
"""

from __future__ import annotations

from typing import Protocol

import pyarrow as pa

from finopsd.events import _Event
from finopsd.ingest.decode import BatchDecoder, Reject, TimeWindow
from finopsd.ingest.formats.litellm import LiteLLMDecoder
from finopsd.ingest.formats.otlp_json import OtlpJsonDecoder

NATIVE = "native"


class Decoder(Protocol):
    """What the ingest pipeline needs of a decoder (see the module doc)."""

    model: type[_Event]

    def decode(
        self, values: list[bytes] | pa.LargeBinaryArray
    ) -> tuple[pa.Table, list[Reject]]: ...


FORMATS: dict[str, type] = {
    NATIVE: BatchDecoder,
    "otlp_json": OtlpJsonDecoder,
    "litellm": LiteLLMDecoder,
}
"""Decoder classes by format name. ``native`` is finopsd's own flat JSON events."""


class UnknownFormatError(ValueError):
    """A format name that is not in ``FORMATS``; the message lists the valid ones."""


def valid_names() -> str:
    return ", ".join(sorted(FORMATS))


def check_format(name: str) -> str:
    """``name`` if it is a known format; ``UnknownFormatError`` listing the valid ones if not."""
    if name not in FORMATS:
        raise UnknownFormatError(f"unknown input format {name!r}; valid formats: {valid_names()}")
    return name


def make_decoder(
    name: str, model: type[_Event], *, max_record_bytes: int, window: TimeWindow | None = None
) -> Decoder:
    """A decoder for format ``name`` producing ``model`` rows.

    Raises ``UnknownFormatError`` for a name not in ``FORMATS``, and ``ValueError``
    when the format cannot produce ``model`` (``otlp_json`` and ``litellm`` give
    usage events only).
    """
    decoder: Decoder = FORMATS[check_format(name)](
        model, max_record_bytes=max_record_bytes, window=window
    )
    return decoder


__all__ = [
    "FORMATS",
    "NATIVE",
    "Decoder",
    "LiteLLMDecoder",
    "OtlpJsonDecoder",
    "UnknownFormatError",
    "check_format",
    "make_decoder",
    "valid_names",
]
