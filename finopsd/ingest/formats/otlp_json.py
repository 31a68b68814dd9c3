"""``otlp_json``: OpenTelemetry GenAI spans, as the Collector's Kafka exporter writes them.

With ``traces: {encoding: otlp_json}`` the OpenTelemetry Collector's ``kafka``
exporter writes one ``ExportTraceServiceRequest`` per Kafka record, in OTLP's
JSON Protobuf Encoding (opentelemetry-proto ``docs/specification.md``, "JSON
Protobuf Encoding"): ``resourceSpans[] → scopeSpans[] → spans[]``; keys in
lowerCamelCase; ``traceId``/``spanId`` as case-insensitive hex; 64-bit integers
(``startTimeUnixNano``, ``intValue``) as decimal strings, though numbers are
accepted too; enums (``status.code``) as integers; unknown fields ignored.
Attributes are ``{"key": ..., "value": AnyValue}`` with ``AnyValue`` one of
``stringValue``, ``boolValue``, ``intValue``, ``doubleValue``, ``arrayValue``,
``kvlistValue``, ``bytesValue``.

Which spans become usage events: a span that carries ``gen_ai.request.model``,
``gen_ai.response.model`` or a token count (``gen_ai.usage.input_tokens``,
``output_tokens``, or the older ``prompt_tokens``/``completion_tokens``) is one
model call, unless its ``gen_ai.operation.name`` is ``invoke_agent``,
``create_agent`` or ``execute_tool``: an agent span's usage sums the model calls
beneath it, which are spans of their own, so counting it too would count them
twice. Every other span is skipped, silently.

What a model-call span becomes (span attributes unless said otherwise):

=================================  ==================================================
UsageEvent                         source
=================================  ==================================================
event_id                           ``traceId`` + "-" + ``spanId`` (lower-case hex)
ts                                 ``startTimeUnixNano`` (UTC, to the microsecond)
latency_ms                         ``endTimeUnixNano - startTimeUnixNano``
status                             "error" when ``status.code`` is 2 (ERROR), else "ok"
gen_ai.usage.input_tokens          ``gen_ai.usage.input_tokens``, else the older
                                   ``gen_ai.usage.prompt_tokens``
gen_ai.usage.output_tokens         ``gen_ai.usage.output_tokens``, else
                                   ``gen_ai.usage.completion_tokens``
gen_ai.usage.cache_read.…          ``gen_ai.usage.cache_read.input_tokens``
gen_ai.usage.cache_creation.…      ``gen_ai.usage.cache_creation.input_tokens``
gen_ai.usage.reasoning.…           ``gen_ai.usage.reasoning.output_tokens``
gen_ai.provider.name               ``gen_ai.provider.name``, else the older ``gen_ai.system``
gen_ai.request.model               ``gen_ai.request.model``, else ``gen_ai.response.model``
gen_ai.response.model              ``gen_ai.response.model``
cache_hit                          ``litellm.cache_hit`` (a ``boolValue``; LiteLLM's
                                   OpenTelemetry integration sets it on every span,
                                   true for a response-cache hit). The GenAI
                                   conventions have no attribute for a gateway's
                                   response cache: their cache attributes count the
                                   provider's prompt-cache tokens, read above.
tenant / team / app / feature      the first of ``finopsd.<tag>``, ``<tag>`` found, each
                                   looked up in the span's attributes, then the
                                   resource's; ``app`` falls back to the resource's
                                   ``service.name``
=================================  ==================================================

Model names lose a provider prefix (``openai/gpt-4o``, as LiteLLM's spans name the
requested model): ``UsageEvent`` applies ``finopsd.providers.split_provider``.

Token counts must be ``intValue`` (a ``doubleValue`` with no fraction is taken
too). A missing count is estimated with tiktoken (``finopsd.tokens``) from
``gen_ai.input.messages`` plus ``gen_ai.system_instructions`` (input) or
``gen_ai.output.messages`` (output), in the structured form or as a JSON string,
following the GenAI input/output message schemas (text parts only). A span
still without counts is refused (reason ``no_usage``), except an ``embeddings``
span, stored with 0 output tokens. A failed span (status ERROR) is never
estimated: the counts it carries are kept, a missing one is 0 (the provider
reported no usage for it, and an estimate from its captured messages would bill
a call that failed).

A record is refused as a whole (dead-letter topic) when it is not JSON, not an
object, has no ``resourceSpans`` array, or its envelopes are malformed. A
model-call span that is invalid (bad ids or times, wrong attribute types, no
usage, values the model refuses) sends the record to the dead-letter topic with
a detail naming the span and the field, while the record's valid spans are
stored (a resend is deduplicated by ``event_id``).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from finopsd import tokens
from finopsd.ingest.formats._common import (
    Candidate,
    Problem,
    RecordDecoder,
    load_json,
    short,
    type_name,
    want_list,
    want_object,
)

INPUT_TOKENS = ("gen_ai.usage.input_tokens", "gen_ai.usage.prompt_tokens")
OUTPUT_TOKENS = ("gen_ai.usage.output_tokens", "gen_ai.usage.completion_tokens")
CACHE_READ_TOKENS = ("gen_ai.usage.cache_read.input_tokens",)
CACHE_CREATION_TOKENS = ("gen_ai.usage.cache_creation.input_tokens",)
REASONING_TOKENS = ("gen_ai.usage.reasoning.output_tokens",)
CACHE_HIT = ("litellm.cache_hit",)
PROVIDER = ("gen_ai.provider.name", "gen_ai.system")
REQUEST_MODEL = ("gen_ai.request.model",)
RESPONSE_MODEL = ("gen_ai.response.model",)
OPERATION = "gen_ai.operation.name"
INPUT_MESSAGES = "gen_ai.input.messages"
SYSTEM_INSTRUCTIONS = "gen_ai.system_instructions"
OUTPUT_MESSAGES = "gen_ai.output.messages"

MARKERS = (*REQUEST_MODEL, *RESPONSE_MODEL, *INPUT_TOKENS, *OUTPUT_TOKENS)
"""A span with any of these attributes is a model call (unless its operation is skipped)."""

SKIPPED_OPERATIONS = frozenset({"invoke_agent", "create_agent", "execute_tool"})
"""Operations whose spans are not model calls of their own (their usage would count twice)."""

TAGS: dict[str, tuple[str, ...]] = {
    "tenant": ("finopsd.tenant", "tenant"),
    "team": ("finopsd.team", "team"),
    "app": ("finopsd.app", "app", "service.name"),
    "feature": ("finopsd.feature", "feature"),
}
"""Attribute keys read for each tag, in order; each is looked up on the span, then the resource."""

STATUS_CODE_ERROR = 2
_INT = re.compile(r"^[-+]?\d+$")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_INT64 = (-(2**63), 2**63 - 1)

Attrs = dict[str, tuple[Any, str]]
"""Attribute key to (raw AnyValue, where it is), for one span or resource."""


class OtlpJsonDecoder(RecordDecoder):
    """Decodes OTLP/JSON ``ExportTraceServiceRequest`` records into usage events (module doc)."""

    name = "otlp_json"

    def candidates(self, value: bytes, problems: list[Problem]) -> list[Candidate]:
        request = want_object(load_json(value), "")
        if "resourceSpans" not in request:
            raise Problem(
                "missing_field",
                "resourceSpans",
                "missing: not an OTLP/JSON ExportTraceServiceRequest",
            )
        out: list[Candidate] = []
        for r, resource_spans in enumerate(want_list(request["resourceSpans"], "resourceSpans")):
            rwhere = f"resourceSpans[{r}]"
            resource_spans = want_object(resource_spans, rwhere)
            resource = want_object(resource_spans.get("resource") or {}, f"{rwhere}.resource")
            resource_attrs = attributes(resource.get("attributes"), f"{rwhere}.resource.attributes")
            scope_list = want_list(resource_spans.get("scopeSpans") or [], f"{rwhere}.scopeSpans")
            for s, scope_spans in enumerate(scope_list):
                swhere = f"{rwhere}.scopeSpans[{s}]"
                scope_spans = want_object(scope_spans, swhere)
                for k, span in enumerate(
                    want_list(scope_spans.get("spans") or [], f"{swhere}.spans")
                ):
                    where = f"{swhere}.spans[{k}]"
                    span = want_object(span, where)
                    attrs = attributes(span.get("attributes"), f"{where}.attributes")
                    if not any(key in attrs for key in MARKERS):
                        continue
                    label = span_label(span, where)
                    try:
                        operation = string_attr(attrs, (OPERATION,))
                        if operation in SKIPPED_OPERATIONS:
                            continue
                        out.append(self._candidate(span, attrs, resource_attrs, label, operation))
                    except Problem as exc:
                        problems.append(Problem(exc.reason, label, str(exc)))
        return out

    def _candidate(
        self,
        span: Mapping[str, Any],
        attrs: Attrs,
        resource_attrs: Attrs,
        label: str,
        operation: str | None,
    ) -> Candidate:
        trace_id = hex_id(span.get("traceId"), 32, "traceId")
        span_id = hex_id(span.get("spanId"), 16, "spanId")
        start = unix_nanos(span.get("startTimeUnixNano"), "startTimeUnixNano")
        if start is None:
            raise Problem("missing_field", "startTimeUnixNano", "missing")
        end = unix_nanos(span.get("endTimeUnixNano"), "endTimeUnixNano")
        status = want_object(span.get("status") or {}, "status")
        code = status.get("code", 0)
        if isinstance(code, bool) or not isinstance(code, int):
            raise Problem(
                "wrong_type", "status.code", f"expected an integer, got {type_name(code)}"
            )
        failed = code == STATUS_CODE_ERROR

        request_model = string_attr(attrs, REQUEST_MODEL)
        response_model = string_attr(attrs, RESPONSE_MODEL)
        model = request_model or response_model
        sources: dict[str, str] = {
            "event_id": "traceId/spanId",
            "ts": "startTimeUnixNano",
            "latency_ms": "endTimeUnixNano",
            "gen_ai.request.model": REQUEST_MODEL[0],
        }
        counts: dict[str, int | None] = {}
        for wire, keys in (
            ("gen_ai.usage.input_tokens", INPUT_TOKENS),
            ("gen_ai.usage.output_tokens", OUTPUT_TOKENS),
            ("gen_ai.usage.cache_read.input_tokens", CACHE_READ_TOKENS),
            ("gen_ai.usage.cache_creation.input_tokens", CACHE_CREATION_TOKENS),
            ("gen_ai.usage.reasoning.output_tokens", REASONING_TOKENS),
        ):
            counts[wire] = int_attr(attrs, keys)
            sources[wire] = next((k for k in keys if k in attrs), keys[0])
        for wire in ("gen_ai.usage.input_tokens", "gen_ai.usage.output_tokens"):
            if failed and counts[wire] is None:  # as reported, never estimated
                counts[wire] = 0
        if counts["gen_ai.usage.input_tokens"] is None:
            counts["gen_ai.usage.input_tokens"] = count_input(attrs, model)
        if counts["gen_ai.usage.output_tokens"] is None:
            counts["gen_ai.usage.output_tokens"] = count_output(attrs, model)
        missing = [
            wire
            for wire in ("gen_ai.usage.input_tokens", "gen_ai.usage.output_tokens")
            if counts[wire] is None
        ]
        if operation == "embeddings" and missing == ["gen_ai.usage.output_tokens"]:
            counts["gen_ai.usage.output_tokens"] = 0
            missing = []
        if missing:
            texts = {
                "gen_ai.usage.input_tokens": INPUT_MESSAGES,
                "gen_ai.usage.output_tokens": OUTPUT_MESSAGES,
            }
            raise Problem(
                "no_usage",
                INPUT_TOKENS[0] if missing[0] == "gen_ai.usage.input_tokens" else OUTPUT_TOKENS[0],
                "missing, and no "
                + " or ".join(texts[w] for w in missing)
                + " text to count it from",
            )

        wire_event: dict[str, Any] = {
            "event_id": f"{trace_id}-{span_id}",
            "ts": _EPOCH + timedelta(microseconds=start // 1000),
            "gen_ai.provider.name": string_attr(attrs, PROVIDER),
            "gen_ai.request.model": model,
            "gen_ai.response.model": response_model,
            "status": "error" if failed else "ok",
            "cache_hit": bool_attr(attrs, CACHE_HIT),
            **counts,
        }
        sources["gen_ai.provider.name"] = next((k for k in PROVIDER if k in attrs), PROVIDER[0])
        sources["cache_hit"] = CACHE_HIT[0]
        if end is not None:
            if end < start:
                raise Problem("invalid_value", "endTimeUnixNano", "is before startTimeUnixNano")
            wire_event["latency_ms"] = (end - start) / 1e6
        for tag, keys in TAGS.items():
            found = tag_value(attrs, resource_attrs, keys)
            if found is not None:
                wire_event[tag], sources[tag] = found
        return Candidate(
            label=label,
            wire={k: v for k, v in wire_event.items() if v is not None},
            sources=sources,
        )


# -- OTLP/JSON pieces --------------------------------------------------------------------


def span_label(span: Mapping[str, Any], where: str) -> str:
    """How a span is named in a dead letter: its path, name and ids as sent."""
    parts = [f"span {where}"]
    name = span.get("name")
    if isinstance(name, str) and name:
        parts.append(short(name, 60))
    ids = [
        f"{key} {span[key]}"
        for key in ("traceId", "spanId")
        if isinstance(span.get(key), str) and span[key]
    ]
    if ids:
        parts.append(f"({', '.join(ids)})")
    return " ".join(parts)


def attributes(value: Any, where: str) -> Attrs:
    """A ``KeyValue`` list as key to (raw AnyValue, where); values are decoded on demand."""
    out: Attrs = {}
    if value is None:
        return out
    for i, item in enumerate(want_list(value, where)):
        item = want_object(item, f"{where}[{i}]")
        key = item.get("key")
        if not isinstance(key, str):
            raise Problem(
                "wrong_type", f"{where}[{i}].key", f"expected a string, got {type_name(key)}"
            )
        out[key] = (item.get("value"), key)
    return out


def any_value(value: Any, where: str) -> Any:
    """An OTLP/JSON ``AnyValue`` as a Python value (None when unset).

    ``intValue`` may be a decimal string or a number; ``doubleValue`` a number
    or "NaN"/"Infinity"/"-Infinity"; ``bytesValue`` is base64 (proto3 JSON).
    """
    if value is None:
        return None
    value = want_object(value, where)
    if "stringValue" in value:
        v = value["stringValue"]
        if not isinstance(v, str):
            raise Problem("wrong_type", where, f"stringValue is {type_name(v)}, not a string")
        return v
    if "boolValue" in value:
        v = value["boolValue"]
        if not isinstance(v, bool):
            raise Problem("wrong_type", where, f"boolValue is {type_name(v)}, not a boolean")
        return v
    if "intValue" in value:
        return _int64(value["intValue"], where)
    if "doubleValue" in value:
        return _double(value["doubleValue"], where)
    if "arrayValue" in value:
        array = want_object(value["arrayValue"] or {}, f"{where}.arrayValue")
        items = want_list(array.get("values") or [], f"{where}.arrayValue.values")
        return [any_value(v, f"{where}.arrayValue.values[{i}]") for i, v in enumerate(items)]
    if "kvlistValue" in value:
        kvlist = want_object(value["kvlistValue"] or {}, f"{where}.kvlistValue")
        pairs = attributes(kvlist.get("values") or [], f"{where}.kvlistValue.values")
        return {k: any_value(v, f"{where}.{k}") for k, (v, _) in pairs.items()}
    if "bytesValue" in value:
        v = value["bytesValue"]
        if not isinstance(v, str):
            raise Problem("wrong_type", where, f"bytesValue is {type_name(v)}, not a string")
        try:
            return base64.b64decode(v, validate=True)
        except binascii.Error as exc:
            raise Problem("invalid_value", where, "bytesValue is not base64") from exc
    return None  # an empty AnyValue, or a kind this decoder does not know: unset


def _int64(v: Any, where: str) -> int:
    if isinstance(v, str) and _INT.match(v):
        n = int(v)
    elif isinstance(v, int) and not isinstance(v, bool):
        n = v
    else:
        shown = short(v, 30) if isinstance(v, str) else type_name(v)
        raise Problem("wrong_type", where, f"intValue {shown} is not a decimal int64")
    if not _INT64[0] <= n <= _INT64[1]:
        raise Problem("invalid_value", where, f"intValue {n} is out of the int64 range")
    return n


def _double(v: Any, where: str) -> float:
    special = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
    if isinstance(v, str) and v in special:
        return special[v]
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise Problem("wrong_type", where, f"doubleValue is {type_name(v)}, not a number")
    return float(v)


def _first(attrs: Attrs, keys: tuple[str, ...]) -> tuple[Any, str] | None:
    for key in keys:
        if key in attrs:
            raw, where = attrs[key]
            value = any_value(raw, where)
            if value is not None:
                return value, where
    return None


def int_attr(attrs: Attrs, keys: tuple[str, ...]) -> int | None:
    """The first of ``keys`` present, as an integer (``intValue``, or a whole ``doubleValue``)."""
    found = _first(attrs, keys)
    if found is None:
        return None
    value, where = found
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise Problem("wrong_type", where, f"expected an intValue, got {_kind(attrs[where][0])}")
    return value


def bool_attr(attrs: Attrs, keys: tuple[str, ...]) -> bool | None:
    """The first of ``keys`` present, as a boolean (``boolValue``)."""
    found = _first(attrs, keys)
    if found is None:
        return None
    value, where = found
    if not isinstance(value, bool):
        raise Problem("wrong_type", where, f"expected a boolValue, got {_kind(attrs[where][0])}")
    return value


def string_attr(attrs: Attrs, keys: tuple[str, ...]) -> str | None:
    """The first of ``keys`` present, as a string (``stringValue``); empty counts as absent."""
    found = _first(attrs, keys)
    if found is None:
        return None
    value, where = found
    if not isinstance(value, str):
        raise Problem("wrong_type", where, f"expected a stringValue, got {_kind(attrs[where][0])}")
    return value or None


def _kind(raw: Any) -> str:
    if isinstance(raw, dict) and raw:
        return next(iter(raw))
    return type_name(raw)


def tag_value(attrs: Attrs, resource_attrs: Attrs, keys: tuple[str, ...]) -> tuple[str, str] | None:
    """(value, source) of the first of ``keys`` on the span, then on the resource."""
    for key in keys:
        for scope, table in (("span", attrs), ("resource", resource_attrs)):
            if key in table:
                value = string_attr(table, (key,))
                if value is not None:
                    return value, f"{scope} attribute {key}"
    return None


def hex_id(value: Any, digits: int, where: str) -> str:
    """A trace or span id: ``digits`` hex digits, not all zero, returned lower-case."""
    if value is None or value == "":
        raise Problem("missing_field", where, "missing")
    if not isinstance(value, str):
        raise Problem("wrong_type", where, f"expected a hex string, got {type_name(value)}")
    if len(value) != digits or not all(c in "0123456789abcdefABCDEF" for c in value):
        raise Problem("invalid_value", where, f"{short(value, 40)} is not {digits} hex digits")
    if set(value) == {"0"}:
        raise Problem("invalid_value", where, "is all zeros (an invalid id)")
    return value.lower()


def unix_nanos(value: Any, where: str) -> int | None:
    """A ``fixed64`` time in ns since the epoch (decimal string or number); None if unset (0)."""
    if value is None:
        return None
    if isinstance(value, str) and value.isdigit():
        n = int(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        n = value
    else:
        shown = short(value, 30) if isinstance(value, str) else type_name(value)
        raise Problem("wrong_type", where, f"{shown} is not a decimal uint64")
    if n < 0 or n >= 2**64:
        raise Problem("invalid_value", where, f"{n} is out of the uint64 range")
    return n or None


# -- token counting from message text ----------------------------------------------------


def _messages(attrs: Attrs, key: str) -> list[Any] | None:
    """A GenAI messages attribute (structured, or a JSON string) as a list; None if absent."""
    found = _first(attrs, (key,))
    if found is None:
        return None
    value, where = found
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise Problem("invalid_value", where, "is a string but not JSON") from exc
    return want_list(value, where)


def count_input(attrs: Attrs, model: str | None) -> int | None:
    """Input tokens estimated from the input messages and system instructions; None if no text."""
    messages = _messages(attrs, INPUT_MESSAGES)
    system = _messages(attrs, SYSTEM_INSTRUCTIONS)
    if messages is None and system is None:
        return None
    chat: list[dict[str, Any]] = []
    if system:
        chat.append({"role": "system", "content": tokens.message_text(system)})
    for i, message in enumerate(messages or []):
        message = want_object(message, f"{INPUT_MESSAGES}[{i}]")
        entry = {"role": message.get("role"), "content": message.get("parts")}
        if isinstance(message.get("name"), str):
            entry["name"] = message["name"]
        chat.append(entry)
    return tokens.count_messages(chat, model)


def count_output(attrs: Attrs, model: str | None) -> int | None:
    """Output tokens estimated from the output messages' text; None if there are none."""
    messages = _messages(attrs, OUTPUT_MESSAGES)
    if messages is None:
        return None
    total = 0
    for i, message in enumerate(messages):
        message = want_object(message, f"{OUTPUT_MESSAGES}[{i}]")
        total += tokens.count_text(tokens.message_text(message.get("parts")), model)
    return total


__all__ = ["OtlpJsonDecoder"]
