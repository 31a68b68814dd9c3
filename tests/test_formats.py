"""Input formats: the registry, the otlp_json and litellm decoders, config and end to end.

Sample payloads are files in tests/data (see its README for where each shape
comes from). Expected values are written out from the payloads by hand, or
counted with tokenizers other than finopsd's (tiktoken's own cl100k encoding,
bpe_openai's o200k), never by the code under test.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import bpe_openai
import pyarrow as pa
import pytest
from conftest import (
    DaemonProcess,
    DaemonSetup,
    Topics,
    committed_offsets,
    consume_all,
    produce_messages,
    read_store,
)
from kafka import TopicPartition

from finopsd.config import ConfigError, load_settings
from finopsd.events import GpuSample, UsageEvent
from finopsd.ingest.broker import ensure_topics
from finopsd.ingest.decode import REASONS, BatchDecoder, Reject, store_schema
from finopsd.ingest.formats import (
    FORMATS,
    LiteLLMDecoder,
    OtlpJsonDecoder,
    UnknownFormatError,
    make_decoder,
)
from finopsd.store import Store

DATA = Path(__file__).resolve().parent / "data"
MakeConfig = Callable[..., DaemonSetup]
Daemons = Callable[..., DaemonProcess]


def sample(name: str) -> bytes:
    return (DATA / name).read_bytes()


def sample_json(name: str) -> Any:
    return json.loads(sample(name))


def decode(decoder: Any, values: list[bytes]) -> tuple[dict[str, dict[str, Any]], list[Reject]]:
    """Rows by event_id (None values dropped) and rejects; checks the shared contract."""
    table, rejects = decoder.decode(values)
    assert table.schema == store_schema(UsageEvent)
    assert [r.index for r in rejects] == sorted(r.index for r in rejects)
    assert all(r.reason in REASONS for r in rejects), rejects
    rows = {}
    for row in table.to_pylist():
        assert row["event_id"] not in rows
        rows[row["event_id"]] = {k: v for k, v in row.items() if v is not None}
    return rows, rejects


def span_request(*spans: dict[str, Any], resource: list[Any] | None = None) -> bytes:
    """An ExportTraceServiceRequest holding ``spans`` under one resource and scope."""
    body = {
        "resourceSpans": [
            {
                "resource": {"attributes": resource or []},
                "scopeSpans": [{"scope": {"name": "test"}, "spans": list(spans)}],
            }
        ]
    }
    return json.dumps(body).encode()


def kv(key: str, value: Any) -> dict[str, Any]:
    """A KeyValue as the Collector writes it (int64 as a decimal string)."""
    if isinstance(value, bool):
        return {"key": key, "value": {"boolValue": value}}
    if isinstance(value, int):
        return {"key": key, "value": {"intValue": str(value)}}
    if isinstance(value, float):
        return {"key": key, "value": {"doubleValue": value}}
    return {"key": key, "value": {"stringValue": value}}


def chat_span(**changes: Any) -> dict[str, Any]:
    """A valid chat span; ``attrs`` replaces attributes by key (None removes one)."""
    attrs = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "gpt-4o-mini",
        "gen_ai.usage.input_tokens": 40,
        "gen_ai.usage.output_tokens": 8,
    }
    attrs.update(changes.pop("attrs", {}))
    span = {
        "traceId": "7d3f1a2b4c5d6e7f8091a2b3c4d5e6f7",
        "spanId": "1122334455667788",
        "name": "chat gpt-4o-mini",
        "kind": 3,
        "startTimeUnixNano": "1718200000000000000",
        "endTimeUnixNano": "1718200000500000000",
        "attributes": [
            kv(k, v) if not isinstance(v, dict) else {"key": k, "value": v}
            for k, v in attrs.items()
            if v is not None
        ],
        "status": {},
    }
    span.update(changes)
    return {k: v for k, v in span.items() if v is not None}


# -- the registry -------------------------------------------------------------------------


def test_registry_names_each_format() -> None:
    assert dict(FORMATS) == {
        "native": BatchDecoder,
        "otlp_json": OtlpJsonDecoder,
        "litellm": LiteLLMDecoder,
    }
    native = make_decoder("native", UsageEvent, max_record_bytes=1 << 20)
    assert isinstance(native, BatchDecoder) and native.model is UsageEvent
    assert make_decoder("native", GpuSample, max_record_bytes=1 << 20).model is GpuSample
    for name in ("otlp_json", "litellm"):
        decoder = make_decoder(name, UsageEvent, max_record_bytes=4096)
        assert decoder.model is UsageEvent
        table, rejects = decoder.decode([])
        assert table.num_rows == 0 and table.schema == store_schema(UsageEvent) and not rejects


def test_unknown_format_lists_the_valid_names() -> None:
    with pytest.raises(
        UnknownFormatError, match="'otlp'; valid formats: litellm, native, otlp_json"
    ):
        make_decoder("otlp", UsageEvent, max_record_bytes=1 << 20)


def test_span_formats_decode_usage_events_only() -> None:
    with pytest.raises(ValueError, match="otlp_json format decodes usage events only"):
        make_decoder("otlp_json", GpuSample, max_record_bytes=1 << 20)


# -- otlp_json ----------------------------------------------------------------------------


def test_otlp_collector_request_becomes_one_row_per_model_call() -> None:
    """The chat span and the failed span are stored; the HTTP span and the agent span are not."""
    rows, rejects = decode(OtlpJsonDecoder(), [sample("otlp_genai_chat.json")])
    assert not rejects
    assert set(rows) == {
        "5b8efff798038103d269b633813fc60c-eee19b7ec3c1b174",
        "0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
    }
    chat = rows["5b8efff798038103d269b633813fc60c-eee19b7ec3c1b174"]
    assert chat == {
        "event_id": "5b8efff798038103d269b633813fc60c-eee19b7ec3c1b174",
        # startTimeUnixNano 1718000000123456789, to the microsecond
        "ts": datetime(2024, 6, 10, 6, 13, 20, 123456, tzinfo=UTC),
        "provider": "openai",
        "request_model": "gpt-4o",
        "response_model": "gpt-4o-2024-08-06",
        "input_tokens": 1200,
        "output_tokens": 300,
        "cache_read_input_tokens": 1024,
        "tenant": "acme",  # resource attribute finopsd.tenant
        "team": "support",  # span attribute team
        "app": "support-bot",  # resource attribute service.name
        "feature": "ticket-summary",
        "latency_ms": 1500.0,
        "status": "ok",
        **_defaults(chat),
    }
    failed = rows["0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331"]
    assert failed["status"] == "error"  # status.code 2
    assert failed["provider"] == "anthropic"
    assert (failed["input_tokens"], failed["output_tokens"]) == (5000, 0)
    assert failed["cache_creation_input_tokens"] == 4096
    assert failed["reasoning_output_tokens"] == 0
    assert failed["latency_ms"] == 400.0


def _defaults(row: dict[str, Any]) -> dict[str, Any]:
    """Columns with defaults the sample does not set (whatever the model adds over time)."""
    known = {
        "event_id",
        "ts",
        "provider",
        "request_model",
        "response_model",
        "input_tokens",
        "output_tokens",
        "cache_read_input_tokens",
        "tenant",
        "team",
        "app",
        "feature",
        "latency_ms",
        "status",
    }
    return {k: v for k, v in row.items() if k not in known}


def test_otlp_older_attribute_names_and_numbers() -> None:
    """gen_ai.system and prompt/completion_tokens; numeric times and intValue; upper-case ids."""
    rows, rejects = decode(OtlpJsonDecoder(), [sample("otlp_genai_legacy.json")])
    assert not rejects
    (row,) = rows.values()
    assert row["event_id"] == "4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7"
    assert row["provider"] == "openai"
    assert (row["request_model"], row["response_model"]) == ("gpt-3.5-turbo", "gpt-3.5-turbo-0125")
    assert (row["input_tokens"], row["output_tokens"]) == (57, 17)
    assert row["ts"] == datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)
    assert row["latency_ms"] == 250.0
    assert row["status"] == "ok"  # status.code 1 (OK)


def test_otlp_new_names_win_over_old_ones() -> None:
    span = chat_span(
        attrs={
            "gen_ai.usage.prompt_tokens": 1,
            "gen_ai.usage.completion_tokens": 2,
            "gen_ai.system": "az.ai.openai",
        }
    )
    rows, rejects = decode(OtlpJsonDecoder(), [span_request(span)])
    assert not rejects
    (row,) = rows.values()
    assert (row["input_tokens"], row["output_tokens"], row["provider"]) == (40, 8, "openai")


def test_otlp_multi_span_record_keeps_valid_spans_and_rejects_the_record() -> None:
    """One bad GenAI span: the record goes to the dead letters naming the span and field, and
    its valid span is still stored; the non-GenAI span (with junk attributes) is ignored."""
    rows, rejects = decode(OtlpJsonDecoder(), [sample("otlp_genai_broken.json")])
    assert set(rows) == {"7d3f1a2b4c5d6e7f8091a2b3c4d5e6f7-1122334455667788"}
    assert (rows["7d3f1a2b4c5d6e7f8091a2b3c4d5e6f7-1122334455667788"]["input_tokens"]) == 40
    (reject,) = rejects
    assert reject.index == 0
    assert reject.reason == "wrong_type"
    assert "spans[1]" in reject.detail
    assert "spanId 1122334455667789" in reject.detail
    assert "gen_ai.usage.input_tokens: intValue '12x' is not a decimal int64" in reject.detail


def test_otlp_every_bad_span_is_named() -> None:
    bad_model = chat_span(spanId="00000000000000a1", attrs={"gen_ai.request.model": 7})
    bad_tokens = chat_span(spanId="00000000000000a2", attrs={"gen_ai.usage.output_tokens": -1})
    good = chat_span(spanId="00000000000000a3")
    rows, rejects = decode(OtlpJsonDecoder(), [span_request(bad_model, good, bad_tokens)])
    assert list(rows) == ["7d3f1a2b4c5d6e7f8091a2b3c4d5e6f7-00000000000000a3"]
    (reject,) = rejects
    assert reject.reason == "wrong_type"  # the first problem decides
    first, second = reject.detail.split("; ")
    assert (
        "spans[0]" in first
        and "gen_ai.request.model: expected a stringValue, got intValue" in first
    )
    assert "spans[2]" in second and "gen_ai.usage.output_tokens:" in second
    assert "greater than or equal to 0" in second


def test_otlp_counts_tokens_from_messages() -> None:
    """No usage attributes: input from system instructions + input messages (a JSON string),
    output from output messages (structured AnyValue), counted as OpenAI counts chat."""
    rows, rejects = decode(OtlpJsonDecoder(), [sample("otlp_genai_messages.json")])
    assert not rejects
    (row,) = rows.values()
    o200k = bpe_openai.get_encoding("o200k_base")  # gpt-4o-mini's encoding, another tokenizer

    def n(text: str) -> int:
        return len(o200k.encode_ordinary(text))

    # cookbook: 3 per message + role + content, + 3 for the reply's priming
    expected_input = (
        3
        + (3 + n("system") + n("You are a weather assistant."))
        + (3 + n("user") + n("Weather in Paris?"))
    )
    expected_output = n("The weather in Paris is currently rainy with a temperature of 57°F.")
    assert (row["input_tokens"], row["output_tokens"]) == (expected_input, expected_output)


def test_otlp_usage_attributes_win_over_message_text() -> None:
    messages = json.dumps([{"role": "user", "parts": [{"type": "text", "content": "hi " * 50}]}])
    span = chat_span(attrs={"gen_ai.input.messages": messages})
    rows, _ = decode(OtlpJsonDecoder(), [span_request(span)])
    (row,) = rows.values()
    assert row["input_tokens"] == 40


@pytest.mark.parametrize(
    ("value", "reason", "detail"),
    [
        (b"{not json", "invalid_json", "not valid JSON"),
        (b"\xff\xfe{}", "invalid_json", "not UTF-8"),
        (b'{"resourceSpans": [], "x": NaN}', "invalid_json", "NaN is not valid JSON"),
        (b"[]", "wrong_type", "expected an object, got array"),
        (b'{"event_id": "e1"}', "missing_field", "resourceSpans: missing"),
        (b'{"resourceSpans": {}}', "wrong_type", "resourceSpans: expected an array, got object"),
        (b'{"resourceSpans": [7]}', "wrong_type", "resourceSpans[0]: expected an object"),
        (
            b'{"resourceSpans": [{"scopeSpans": [{"spans": "x"}]}]}',
            "wrong_type",
            "resourceSpans[0].scopeSpans[0].spans: expected an array",
        ),
        (
            b'{"resourceSpans": [{"resource": {"attributes": [{"key": 1}]}}]}',
            "wrong_type",
            "resourceSpans[0].resource.attributes[0].key: expected a string",
        ),
    ],
)
def test_otlp_broken_records(value: bytes, reason: str, detail: str) -> None:
    rows, rejects = decode(OtlpJsonDecoder(), [value])
    assert not rows
    assert [(r.index, r.reason) for r in rejects] == [(0, reason)]
    assert detail in rejects[0].detail, rejects[0].detail


@pytest.mark.parametrize(
    ("changes", "reason", "detail"),
    [
        ({"traceId": None}, "missing_field", "traceId: missing"),
        ({"traceId": "xyz"}, "invalid_value", "traceId: 'xyz' is not 32 hex digits"),
        ({"spanId": "0" * 16}, "invalid_value", "spanId: is all zeros"),
        ({"spanId": 12}, "wrong_type", "spanId: expected a hex string, got number"),
        ({"startTimeUnixNano": None}, "missing_field", "startTimeUnixNano: missing"),
        ({"startTimeUnixNano": "soon"}, "wrong_type", "'soon' is not a decimal uint64"),
        ({"endTimeUnixNano": "1718199999000000000"}, "invalid_value", "is before startTime"),
        ({"status": {"code": "STATUS_CODE_ERROR"}}, "wrong_type", "status.code: expected an int"),
        (
            {"attrs": {"gen_ai.usage.input_tokens": None}},
            "no_usage",
            "gen_ai.usage.input_tokens: missing, and no gen_ai.input.messages text",
        ),
        (
            {"attrs": {"gen_ai.usage.output_tokens": None}},
            "no_usage",
            "gen_ai.usage.output_tokens: missing, and no gen_ai.output.messages text",
        ),
        (
            {"attrs": {"gen_ai.usage.input_tokens": {"doubleValue": 1.5}}},
            "wrong_type",
            "gen_ai.usage.input_tokens: expected an intValue, got doubleValue",
        ),
        (
            {"attrs": {"gen_ai.usage.input_tokens": {"intValue": "99999999999999999999"}}},
            "invalid_value",
            "out of the int64 range",
        ),
        (
            {"attrs": {"gen_ai.request.model": None}},
            "missing_field",
            "gen_ai.request.model: Field required",
        ),
        (
            {"attrs": {"gen_ai.request.model": "m" * 300}},
            "invalid_value",
            "gen_ai.request.model: String should have at most 256 characters",
        ),
        (
            {"attrs": {"gen_ai.input.messages": "not json", "gen_ai.usage.input_tokens": None}},
            "invalid_value",
            "gen_ai.input.messages: is a string but not JSON",
        ),
        (
            {"attrs": {"team": {"intValue": "7"}}},
            "wrong_type",
            "team: expected a stringValue, got intValue",
        ),
    ],
)
def test_otlp_invalid_genai_span(changes: dict[str, Any], reason: str, detail: str) -> None:
    span = chat_span(**changes) if "attrs" in changes else {**chat_span(), **changes}
    span = {k: v for k, v in span.items() if v is not None}
    rows, rejects = decode(OtlpJsonDecoder(), [span_request(span)])
    assert not rows
    assert [(r.index, r.reason) for r in rejects] == [(0, reason)], rejects
    assert detail in rejects[0].detail, rejects[0].detail
    assert "span resourceSpans[0].scopeSpans[0].spans[0]" in rejects[0].detail


def test_otlp_spans_that_are_not_model_calls_are_skipped() -> None:
    http = chat_span(
        attrs={
            k: None
            for k in (
                "gen_ai.operation.name",
                "gen_ai.provider.name",
                "gen_ai.request.model",
                "gen_ai.usage.input_tokens",
                "gen_ai.usage.output_tokens",
            )
        }
    )
    conversation_only = chat_span(
        attrs={
            "gen_ai.request.model": None,
            "gen_ai.usage.input_tokens": None,
            "gen_ai.usage.output_tokens": None,
            "gen_ai.conversation.id": "conv_1",
        }
    )
    tool = chat_span(attrs={"gen_ai.operation.name": "execute_tool"})
    agent = chat_span(attrs={"gen_ai.operation.name": "invoke_agent"})
    rows, rejects = decode(OtlpJsonDecoder(), [span_request(http, conversation_only, tool, agent)])
    assert not rows and not rejects
    # an empty request (what a filter may leave) is no error either
    rows, rejects = decode(OtlpJsonDecoder(), [b'{"resourceSpans": []}'])
    assert not rows and not rejects


def test_otlp_failed_and_embedding_spans_without_usage() -> None:
    """A failed call without usage is stored with zeros; an embedding has no output tokens."""
    failed = chat_span(
        spanId="00000000000000b1",
        status={"code": 2, "message": "rate limited"},
        attrs={"gen_ai.usage.input_tokens": None, "gen_ai.usage.output_tokens": None},
    )
    embedding = chat_span(
        spanId="00000000000000b2",
        attrs={
            "gen_ai.operation.name": "embeddings",
            "gen_ai.request.model": "text-embedding-3-small",
            "gen_ai.usage.output_tokens": None,
        },
    )
    rows, rejects = decode(OtlpJsonDecoder(), [span_request(failed, embedding)])
    assert not rejects
    by_span = {k.rsplit("-", 1)[1]: v for k, v in rows.items()}
    assert by_span["00000000000000b1"]["status"] == "error"
    assert (
        by_span["00000000000000b1"]["input_tokens"],
        by_span["00000000000000b1"]["output_tokens"],
    ) == (0, 0)
    assert (
        by_span["00000000000000b2"]["input_tokens"],
        by_span["00000000000000b2"]["output_tokens"],
    ) == (40, 0)


def test_otlp_failed_span_is_not_estimated_from_its_messages() -> None:
    """A failed span with captured messages but no usage gets 0 tokens, not an estimate from
    its text (which would bill a call that failed); counts it reports are kept."""
    messages = json.dumps([{"role": "user", "parts": [{"type": "text", "content": "hi " * 500}]}])
    output = json.dumps([{"role": "assistant", "parts": [{"type": "text", "content": "no"}]}])
    unreported = chat_span(
        spanId="00000000000000c1",
        status={"code": 2, "message": "timeout"},
        attrs={
            "gen_ai.usage.input_tokens": None,
            "gen_ai.usage.output_tokens": None,
            "gen_ai.input.messages": messages,
            "gen_ai.output.messages": output,
        },
    )
    reported = chat_span(
        spanId="00000000000000c2",
        status={"code": 2},
        attrs={
            "gen_ai.usage.input_tokens": 1500,
            "gen_ai.usage.output_tokens": None,
            "gen_ai.input.messages": messages,
            "gen_ai.output.messages": output,
        },
    )
    ok = chat_span(  # the same text on a successful span is counted
        spanId="00000000000000c3",
        attrs={"gen_ai.usage.input_tokens": None, "gen_ai.input.messages": messages},
    )
    rows, rejects = decode(OtlpJsonDecoder(), [span_request(unreported, reported, ok)])
    assert not rejects
    by_span = {k.rsplit("-", 1)[1]: v for k, v in rows.items()}
    assert by_span["00000000000000c1"]["status"] == "error"
    assert (
        by_span["00000000000000c1"]["input_tokens"],
        by_span["00000000000000c1"]["output_tokens"],
    ) == (0, 0)
    assert (
        by_span["00000000000000c2"]["input_tokens"],
        by_span["00000000000000c2"]["output_tokens"],
    ) == (1500, 0)
    assert by_span["00000000000000c3"]["input_tokens"] > 500


def test_otlp_litellm_cache_hit_and_model_prefix() -> None:
    """LiteLLM's OpenTelemetry spans: ``litellm.cache_hit`` (boolValue) is the event's
    cache_hit; a prefixed model names the provider when the span names none."""
    hit = chat_span(
        spanId="00000000000000d1",
        attrs={
            "litellm.cache_hit": True,
            "gen_ai.request.model": "openai/gpt-4o",
            "gen_ai.provider.name": None,
        },
    )
    miss = chat_span(spanId="00000000000000d2", attrs={"litellm.cache_hit": False})
    plain = chat_span(spanId="00000000000000d3")
    rows, rejects = decode(OtlpJsonDecoder(), [span_request(hit, miss, plain)])
    assert not rejects
    by_span = {k.rsplit("-", 1)[1]: v for k, v in rows.items()}
    assert by_span["00000000000000d1"]["cache_hit"] is True
    assert (
        by_span["00000000000000d1"]["provider"],
        by_span["00000000000000d1"]["request_model"],
    ) == ("openai", "gpt-4o")
    assert by_span["00000000000000d2"]["cache_hit"] is False
    assert by_span["00000000000000d3"]["cache_hit"] is False
    wrong = chat_span(attrs={"litellm.cache_hit": "true"})
    rows, rejects = decode(OtlpJsonDecoder(), [span_request(wrong)])
    assert not rows
    assert [r.reason for r in rejects] == ["wrong_type"]
    assert "litellm.cache_hit: expected a boolValue, got stringValue" in rejects[0].detail


def test_otlp_token_counts_as_numbers_and_whole_doubles() -> None:
    span = chat_span(
        attrs={
            "gen_ai.usage.input_tokens": {"intValue": 41},
            "gen_ai.usage.output_tokens": {"doubleValue": 9.0},
        }
    )
    rows, rejects = decode(OtlpJsonDecoder(), [span_request(span)])
    assert not rejects
    (row,) = rows.values()
    assert (row["input_tokens"], row["output_tokens"]) == (41, 9)


def test_otlp_tags_prefer_span_then_resource_and_finopsd_keys() -> None:
    span = chat_span(
        attrs={"tenant": "span-tenant", "finopsd.team": "span-team", "app": "span-app"}
    )
    resource = [
        kv("finopsd.tenant", "res-tenant"),
        kv("team", "res-team"),
        kv("service.name", "svc"),
        kv("feature", "res-feature"),
    ]
    rows, _ = decode(OtlpJsonDecoder(), [span_request(span, resource=resource)])
    (row,) = rows.values()
    # finopsd.<tag> first (span, then resource), then <tag> (span, then resource)
    assert (row["tenant"], row["team"], row["app"], row["feature"]) == (
        "res-tenant",
        "span-team",
        "span-app",
        "res-feature",
    )


def test_otlp_too_large_and_arrow_input() -> None:
    decoder = OtlpJsonDecoder(max_record_bytes=1024)
    big = sample("otlp_genai_chat.json")
    small = span_request(chat_span())
    assert len(big) > 1024 >= len(small)
    table, rejects = decoder.decode(pa.array([small, big, small], type=pa.large_binary()))
    assert table.num_rows == 2  # the same span twice: the pipeline keeps the first
    assert [(r.index, r.reason) for r in rejects] == [(1, "too_large")]
    assert "ingest.max_record_bytes" in rejects[0].detail


# -- litellm ------------------------------------------------------------------------------


def test_litellm_success_payload() -> None:
    rows, rejects = decode(LiteLLMDecoder(), [sample("litellm_success.json")])
    assert not rejects
    row = rows["chatcmpl-9870a859d6df402795f75dc5fca5b2e0"]
    assert row["ts"] == datetime(2025, 2, 11, 0, 56, 19, 683053, tzinfo=UTC)  # startTime
    assert row["provider"] == "openai"
    assert (row["request_model"], row["response_model"]) == (
        "gpt-4o-mini",
        "gpt-4o-mini-2024-07-18",
    )
    assert (row["input_tokens"], row["output_tokens"]) == (1400, 136)
    assert row["cache_read_input_tokens"] == 1024  # response.usage.prompt_tokens_details
    assert row["reasoning_output_tokens"] == 0
    assert "cache_creation_input_tokens" not in row
    cost = {k: v for k, v in row.items() if "cost" in k}
    assert list(cost.values()) == [0.000342]  # response_cost, the gateway's figure
    assert row["latency_ms"] == pytest.approx(1501.277)
    assert row["ttft_ms"] == pytest.approx(301.277)
    assert row["status"] == "ok"
    # the key's org, team alias and alias; the feature from spend_logs_metadata (the key's
    # team wins over the one the caller sent)
    assert (row["tenant"], row["team"], row["app"], row["feature"]) == (
        "org-acme",
        "support",
        "support-bot-prod",
        "ticket-summary",
    )


def test_litellm_anthropic_prompt_caching() -> None:
    rows, rejects = decode(LiteLLMDecoder(), [sample("litellm_anthropic_cache.json")])
    assert not rejects
    (row,) = rows.values()
    assert row["provider"] == "anthropic"
    assert (row["input_tokens"], row["output_tokens"]) == (12307, 550)
    assert row["cache_creation_input_tokens"] == 12304
    assert row["cache_read_input_tokens"] == 0
    assert row["team"] == "team-7f2c"  # no alias: the team id
    assert row["tenant"] == "org-acme"  # the key's org, not the caller's requester_metadata
    assert row["feature"] == "code-review"  # requester_metadata


def test_litellm_usage_from_anthropic_keys_alone() -> None:
    payload = sample_json("litellm_anthropic_cache.json")
    usage = payload["response"]["usage"]
    del usage["prompt_tokens_details"]
    usage["cache_read_input_tokens"] = 2048
    rows, _ = decode(LiteLLMDecoder(), [json.dumps(payload).encode()])
    (row,) = rows.values()
    assert (row["cache_read_input_tokens"], row["cache_creation_input_tokens"]) == (2048, 12304)


def test_litellm_failure_payload() -> None:
    rows, rejects = decode(LiteLLMDecoder(), [sample("litellm_failure.json")])
    assert not rejects
    (row,) = rows.values()
    assert row["status"] == "error"
    assert (row["input_tokens"], row["output_tokens"]) == (0, 0)
    assert row["latency_ms"] == 30000.0
    assert "ttft_ms" not in row  # a failed call saw no first token
    # LiteLLM's failure payload keeps the route's prefix: the model is gpt-4o, served by azure
    assert row["request_model"] == "gpt-4o" and row["provider"] == "azure"
    assert row["app"] == "batch-jobs" and "team" not in row


def test_litellm_counts_tokens_when_usage_is_missing() -> None:
    """prompt_tokens/completion_tokens null: counted from messages and the response text.
    The messages are the cookbook's; the OpenAI API counted 124 prompt tokens on gpt-4o."""
    rows, rejects = decode(LiteLLMDecoder(), [sample("litellm_no_usage.json")])
    assert not rejects
    (row,) = rows.values()
    assert row["input_tokens"] == 124
    assert row["output_tokens"] == 8  # "お誕生日おめでとう" on o200k_base (cookbook)
    assert (row["team"], row["feature"]) == ("research", "qa")  # caller metadata, no key


def test_litellm_prompt_string_and_text_choices_are_counted_with_cl100k() -> None:
    payload = {
        "id": "cmpl-1",
        "model": "gpt-3.5-turbo-instruct",
        "startTime": 1739235500.0,
        "messages": "tiktoken is great!",
        "response": {"choices": [{"index": 0, "text": "2 + 2 = 4"}]},
    }
    rows, rejects = decode(LiteLLMDecoder(), [json.dumps(payload).encode()])
    assert not rejects
    (row,) = rows.values()
    assert (row["input_tokens"], row["output_tokens"]) == (6, 7)  # the cookbook's cl100k counts


def test_litellm_array_of_payloads() -> None:
    """generic_api's json_array: many payloads in one record, each judged on its own."""
    good = sample_json("litellm_success.json")
    other = copy.deepcopy(good)
    other["id"] = "chatcmpl-second"
    bad = copy.deepcopy(good)
    bad["id"] = "chatcmpl-bad"
    bad["prompt_tokens"] = "1400"
    record = json.dumps([good, other, bad, 5]).encode()
    rows, rejects = decode(LiteLLMDecoder(), [record])
    assert set(rows) == {"chatcmpl-9870a859d6df402795f75dc5fca5b2e0", "chatcmpl-second"}
    (reject,) = rejects
    assert reject.reason == "wrong_type"
    assert "payload [2] id 'chatcmpl-bad': prompt_tokens: expected an integer, got string" in (
        reject.detail
    )
    assert "payload [3]: is number" in reject.detail


def test_litellm_cache_hit_is_kept() -> None:
    """``cache_hit`` true is a response-cache hit; false, null or absent is not."""
    for value, want in ((True, True), (False, False), (None, False), (..., False)):
        rows, rejects = decode(LiteLLMDecoder(), [_mutated(cache_hit=value)])
        assert not rejects
        (row,) = rows.values()
        assert row["cache_hit"] is want, value
    rows, rejects = decode(LiteLLMDecoder(), [_mutated(cache_hit="yes")])
    assert not rows
    assert [r.reason for r in rejects] == ["wrong_type"]
    assert "cache_hit: expected a boolean, got string" in rejects[0].detail


def test_litellm_cost_without_a_price_is_no_gateway_cost() -> None:
    """LiteLLM writes response_cost 0.0 when it has no price for the model, with
    response_cost_failure_debug_info saying so: that is no figure, not a cost of 0."""
    debug = {"error_str": "This model isn't mapped yet.", "model": "my-model"}
    cases = {
        "unpriced": (_mutated(response_cost=0.0, response_cost_failure_debug_info=debug), None),
        "null": (_mutated(response_cost=None), None),
        "priced": (_mutated(response_cost_failure_debug_info=None), 0.000342),
        "free": (_mutated(response_cost=0.0, response_cost_failure_debug_info=None), 0.0),
    }
    for name, (value, want) in cases.items():
        rows, rejects = decode(LiteLLMDecoder(), [value])
        assert not rejects
        (row,) = rows.values()
        assert row.get("gateway_cost_usd") == want, name


def test_litellm_provider_prefix_is_split_off() -> None:
    """``openai/gpt-4o`` (a cache hit's model) is gpt-4o; with no custom_llm_provider the
    prefix names the provider."""
    rows, _ = decode(LiteLLMDecoder(), [_mutated(model="openai/gpt-4o", model_group=...)])
    (row,) = rows.values()
    assert (row["provider"], row["request_model"]) == ("openai", "gpt-4o")
    rows, _ = decode(
        LiteLLMDecoder(),
        [_mutated(model="anthropic/claude-sonnet-4-5", custom_llm_provider=..., model_group=...)],
    )
    (row,) = rows.values()
    assert (row["provider"], row["request_model"]) == ("anthropic", "claude-sonnet-4-5")


def test_litellm_proxy_names_the_group_asked_for_and_the_deployment_that_answered() -> None:
    """Through the proxy, ``model_group`` is what the caller asked for (the request
    model) and ``model`` the deployment that served it; the proxy rewrites
    ``response.model`` to the group, so the response model is the deployment's (and
    the price is the deployment's). A caller's eval score in ``requester_metadata`` is
    the request's quality."""
    payload = sample_json("litellm_success.json")
    payload["model_group"] = "chat-large"
    payload["model"] = "openai/gpt-4o-mini"
    payload["response"]["model"] = "chat-large"
    payload["metadata"]["requester_metadata"] = {"quality_score": 0.83}
    rows, rejects = decode(LiteLLMDecoder(), [json.dumps(payload).encode()])
    assert not rejects
    (row,) = rows.values()
    assert (row["request_model"], row["response_model"]) == ("chat-large", "gpt-4o-mini")
    assert row["quality_score"] == 0.83
    payload["response"]["model"] = "gpt-4o-mini-2024-07-18"  # the provider's own name: kept
    rows, _ = decode(LiteLLMDecoder(), [json.dumps(payload).encode()])
    (row,) = rows.values()
    assert row["response_model"] == "gpt-4o-mini-2024-07-18"
    payload["metadata"]["requester_metadata"]["quality_score"] = 1.7
    _rows, rejects = decode(LiteLLMDecoder(), [json.dumps(payload).encode()])
    assert [r.reason for r in rejects] and "quality_score" in rejects[0].detail


def test_litellm_prompt_hash_is_the_same_for_the_same_messages_only() -> None:
    """The response-cache analysis needs ``prompt_hash``: the same messages (whatever
    the key order) hash alike, other messages do not, no messages give none."""
    payload = sample_json("litellm_success.json")
    payload["messages"] = [{"role": "user", "content": "what is the refund policy?"}]
    same = json.loads(json.dumps(payload))
    same["id"] = "other-call"
    same["messages"] = [{"content": "what is the refund policy?", "role": "user"}]
    other = json.loads(json.dumps(same))
    other["id"] = "third-call"
    other["messages"][0]["content"] = "what is the return policy?"
    bare = json.loads(json.dumps(payload))
    bare["id"] = "no-messages"
    bare.pop("messages")
    rows, rejects = decode(
        LiteLLMDecoder(), [json.dumps(x).encode() for x in (payload, same, other, bare)]
    )
    assert not rejects
    hashes = [r.get("prompt_hash") for r in rows.values()]
    assert hashes[0] == hashes[1] and len(hashes[0]) == 32
    assert hashes[2] != hashes[0] and hashes[3] is None


def test_litellm_failed_call_is_not_estimated_from_its_messages() -> None:
    """A failure payload with null counts and the request's messages: 0 tokens, as for a
    failed span; a success with the same payload is counted."""
    payload = sample_json("litellm_no_usage.json")
    payload["status"] = "failure"
    rows, rejects = decode(LiteLLMDecoder(), [json.dumps(payload).encode()])
    assert not rejects
    (row,) = rows.values()
    assert (row["status"], row["input_tokens"], row["output_tokens"]) == ("error", 0, 0)


# -- the README's LiteLLM callback, as LiteLLM's SDK drives it --------------------------------

RECIPE = DATA.parent.parent / "deploy" / "litellm" / "finopsd_kafka_logger.py"


def sdk_records() -> dict[str, dict[str, Any]]:
    """tests/data/litellm_sdk_records.json by scenario: what the recipe sent, byte for byte."""
    captured = sample_json("litellm_sdk_records.json")
    return {r["scenario"]: r for r in captured["records"]}


def test_litellm_recipe_is_the_readme_block_and_the_one_captured() -> None:
    """The README shows deploy/litellm/finopsd_kafka_logger.py as it is, and the fixture was
    captured through this very file (recapture with tests/data/capture_litellm.py after
    changing it)."""
    readme = (DATA.parent.parent / "README.md").read_text()
    after = readme[readme.index("[`deploy/litellm/finopsd_kafka_logger.py`]") :]
    block = after[after.index("```python\n") + len("```python\n") :]
    block = block[: block.index("```")]
    recipe = RECIPE.read_text()
    assert block == recipe
    for hook in ("log_success_event", "log_failure_event"):  # sync SDK calls need these
        assert f"    def {hook}(self, kwargs, response_obj, start_time, end_time):" in recipe
        assert f"    async def async_{hook}(self, kwargs, response_obj," in recipe
    captured = sample_json("litellm_sdk_records.json")["captured_with"]
    assert captured["recipe"] == "deploy/litellm/finopsd_kafka_logger.py"
    assert captured["recipe_sha256"] == hashlib.sha256(RECIPE.read_bytes()).hexdigest()


def test_litellm_sdk_records_sent_by_the_recipe() -> None:
    """Records from real litellm.completion() (sync hooks) and acompletion() (async hooks):
    keyed by the payload id; the response-cache hit is a cache hit of model gpt-4o (LiteLLM
    names it openai/gpt-4o); an unpriced model has no gateway cost; failures no tokens."""
    records = sdk_records()
    assert {r["api"] for r in records.values()} == {"completion", "acompletion"}
    rows, rejects = decode(LiteLLMDecoder(), [r["value"].encode() for r in records.values()])
    assert not rejects
    assert len(rows) == len(records)  # a cache hit has an id of its own
    by_scenario = {}
    for name, record in records.items():
        payload = json.loads(record["value"])
        assert record["key"] == payload["id"]
        by_scenario[name] = rows[payload["id"]]

    hit = by_scenario["sync_cache_hit"]
    assert json.loads(records["sync_cache_hit"]["value"])["model"] == "openai/gpt-4o"
    assert (hit["cache_hit"], hit["provider"], hit["request_model"]) == (True, "openai", "gpt-4o")
    assert hit["gateway_cost_usd"] == 0.0  # LiteLLM's response_cost for a hit
    assert by_scenario["async_cache_hit"]["cache_hit"] is True
    for name in ("sync_success", "async_success", "sync_cache_miss", "async_cache_miss"):
        row = by_scenario[name]
        assert row["cache_hit"] is False and row["status"] == "ok", name
        assert row["gateway_cost_usd"] > 0, name  # LiteLLM priced these
    # the same model, however LiteLLM named it: one name in the store
    assert by_scenario["sync_cache_miss"]["request_model"] == hit["request_model"]
    assert by_scenario["async_success"]["request_model"] == "gpt-4o-mini"

    unpriced = by_scenario["sync_unpriced"]
    assert json.loads(records["sync_unpriced"]["value"])["response_cost"] == 0.0
    assert "gateway_cost_usd" not in unpriced  # NULL: LiteLLM had no price, 0.0 is no figure
    assert unpriced["request_model"] == "finopsd-unpriced-model"

    for name, provider in (("sync_failure", "openai"), ("async_failure", "anthropic")):
        row = by_scenario[name]
        assert row["status"] == "error", name
        assert (row["input_tokens"], row["output_tokens"]) == (0, 0), name
        assert row["provider"] == provider, name


def _mutated(**changes: Any) -> bytes:
    payload = sample_json("litellm_success.json")
    for key, value in changes.items():
        if value is ...:
            payload.pop(key, None)
        else:
            payload[key] = value
    return json.dumps(payload).encode()


@pytest.mark.parametrize(
    ("value", "reason", "detail"),
    [
        (b"{", "invalid_json", "not valid JSON"),
        (b'"text"', "not_an_object", "got string"),
        (_mutated(id=...), "missing_field", "id: missing"),
        (_mutated(model=None), "missing_field", "model: missing"),
        (_mutated(startTime=...), "missing_field", "startTime: missing"),
        (_mutated(startTime="2025-02-11T00:56:19Z"), "wrong_type", "startTime: expected a number"),
        (_mutated(startTime=1e20), "invalid_value", "startTime: 1e+20 is not a time"),
        (_mutated(prompt_tokens=12.5), "wrong_type", "prompt_tokens: expected an integer"),
        (_mutated(completion_tokens=True), "wrong_type", "completion_tokens: expected an integer"),
        (_mutated(prompt_tokens=-3), "invalid_value", "prompt_tokens: Input should be greater"),
        (_mutated(status="ok"), "invalid_value", "status: 'ok' is not 'success' or 'failure'"),
        (_mutated(response_cost=-1), "invalid_value", "response_cost: Input should be greater"),
        (_mutated(endTime=1739235000.0), "invalid_value", "endTime: Input should be greater"),
        (_mutated(metadata="x"), "wrong_type", "metadata: expected an object"),
        (
            _mutated(metadata={"user_api_key_team_id": 12}),
            "wrong_type",
            "metadata.user_api_key_team_id: expected a string",
        ),
        (
            _mutated(prompt_tokens=None, messages=None),
            "no_usage",
            "prompt_tokens: missing, and no messages text to count it from",
        ),
        (
            _mutated(completion_tokens=..., response={"choices": []}),
            "no_usage",
            "completion_tokens: missing, and no response text",
        ),
    ],
)
def test_litellm_broken_payloads(value: bytes, reason: str, detail: str) -> None:
    rows, rejects = decode(LiteLLMDecoder(), [value])
    assert not rows
    assert [(r.index, r.reason) for r in rejects] == [(0, reason)], rejects
    assert detail in rejects[0].detail, rejects[0].detail


# -- config -------------------------------------------------------------------------------


def test_config_formats(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[ingest.formats]\n"otlp_spans" = "otlp_json"\n"litellm.spend" = "litellm"\n')
    settings = load_settings(path, {})
    assert settings.ingest.formats == {"otlp_spans": "otlp_json", "litellm.spend": "litellm"}


def test_config_formats_default_is_empty(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text("")
    assert load_settings(path, {}).ingest.formats == {}


def test_config_unknown_format_names_the_key_and_the_valid_ones(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[ingest]\nformats = { "otlp_spans" = "otlp" }\n')
    with pytest.raises(ConfigError) as info:
        load_settings(path, {})
    message = str(info.value)
    assert "ingest.formats.otlp_spans" in message
    assert "unknown input format 'otlp'; valid formats: litellm, native, otlp_json" in message


def test_config_formats_from_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text("")
    env = {"FINOPSD_INGEST__FORMATS": '{"spans": "otlp_json"}'}
    assert load_settings(path, env).ingest.formats == {"spans": "otlp_json"}
    with pytest.raises(ConfigError, match=r"ingest.formats.spans: .*valid formats"):
        load_settings(path, {"FINOPSD_INGEST__FORMATS": '{"spans": "jaeger"}'})
    with pytest.raises(ConfigError, match=r"ingest.formats: .*expected a JSON object"):
        load_settings(path, {"FINOPSD_INGEST__FORMATS": "spans=otlp_json"})


@pytest.mark.parametrize("key", ["gpu_topic", "dead_letter_topic"])
def test_config_formats_may_not_name_the_gpu_or_dead_letter_topic(tmp_path: Path, key: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(f'[kafka]\n{key} = "t1"\n[ingest.formats]\n"t1" = "otlp_json"\n')
    with pytest.raises(ConfigError, match=f"ingest.formats.t1: 't1' is kafka.{key}"):
        load_settings(path, {})


# -- end to end ---------------------------------------------------------------------------


def test_format_topics_end_to_end(
    topics: Topics, make_config: MakeConfig, daemons: Daemons
) -> None:
    """The daemon consumes an otlp_json topic and a litellm topic beside its usage topics:
    GenAI spans are stored with their token counts, broken records land on the dead-letter
    topic with the reason and the span named, and nothing else is stored."""
    otlp_topic = f"otlp.{topics.group}"
    litellm_topic = f"litellm.{topics.group}"
    ensure_topics(topics.bootstrap, {otlp_topic: 1, litellm_topic: 1})
    setup = make_config("formats")
    with setup.config.open("a") as config:
        config.write(
            f'\n[ingest.formats]\n"{otlp_topic}" = "otlp_json"\n"{litellm_topic}" = "litellm"\n'
        )

    otlp_values = [
        sample("otlp_genai_chat.json"),  # 2 model calls (+ an HTTP span, an agent span)
        sample("otlp_genai_legacy.json"),  # 1, older attribute names
        sample("otlp_genai_broken.json"),  # 1 stored, 1 bad span -> dead letter
        b"this is not OTLP",  # dead letter
    ]
    litellm_values = [
        sample("litellm_success.json"),
        sample("litellm_anthropic_cache.json"),
        _mutated(id="chatcmpl-bad", prompt_tokens="many"),  # dead letter
    ]
    produce_messages(topics.bootstrap, otlp_topic, [(None, v) for v in otlp_values])
    produce_messages(topics.bootstrap, litellm_topic, [(None, v) for v in litellm_values])

    daemon = daemons(setup)
    daemon.start()
    daemon.wait_ready()

    def consumed() -> bool:
        done = committed_offsets(
            topics.bootstrap, topics.group, [TopicPartition(otlp_topic, 0)]
        ).get(0, 0) >= len(otlp_values)
        return done and committed_offsets(
            topics.bootstrap, topics.group, [TopicPartition(litellm_topic, 0)]
        ).get(0, 0) >= len(litellm_values)

    daemon.wait_until(consumed, timeout=60, what="both format topics to be committed", interval=0.3)
    assert not daemon.logged_error(), daemon.log_tail()
    assert daemon.terminate() == 0, daemon.log_tail()

    state = read_store(setup.store)
    with Store(setup.store, read_only=True) as store:
        rows = (
            store.cursor()
            .execute("SELECT event_id, input_tokens, output_tokens, status, app FROM usage_events")
            .fetchall()
        )
    by_id = {r[0]: r[1:] for r in rows}
    otlp_ids = {
        "5b8efff798038103d269b633813fc60c-eee19b7ec3c1b174",  # chat, 1200 / 300
        "0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",  # failed, 5000 / 0
        "4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",  # legacy, 57 / 17
        "7d3f1a2b4c5d6e7f8091a2b3c4d5e6f7-1122334455667788",  # broken's valid span, 40 / 8
    }
    litellm_ids = {
        "chatcmpl-9870a859d6df402795f75dc5fca5b2e0",  # 1400 / 136
        "chatcmpl-2d1f5a9e-6c3b-4f0e-9a7d-8b5c4e3f2a10",  # 12307 / 550
    }
    assert set(by_id) == otlp_ids | litellm_ids
    otlp_sums = tuple(sum(by_id[i][k] for i in otlp_ids) for k in (0, 1))
    assert otlp_sums == (1200 + 5000 + 57 + 40, 300 + 0 + 17 + 8)
    assert state.token_sums == (otlp_sums[0] + 1400 + 12307, otlp_sums[1] + 136 + 550)
    assert by_id["0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331"][2] == "error"
    assert by_id["5b8efff798038103d269b633813fc60c-eee19b7ec3c1b174"][3] == "support-bot"
    assert state.offsets[(otlp_topic, 0)] == len(otlp_values)
    assert state.offsets[(litellm_topic, 0)] == len(litellm_values)

    dead = consume_all(topics.bootstrap, topics.dead_letter, 3)
    assert len(dead) == 3, [d.value[:60] for d in dead]
    by_source = {}
    for record in dead:
        headers = {k: v.decode() for k, v in record.headers}
        by_source[(headers["finopsd-source-topic"], int(headers["finopsd-source-offset"]))] = (
            headers,
            record.value,
        )
    broken_headers, broken_value = by_source[(otlp_topic, 2)]
    assert broken_value == sample("otlp_genai_broken.json")  # unchanged
    assert broken_headers["finopsd-reason"] == "wrong_type"
    assert "spanId 1122334455667789" in broken_headers["finopsd-detail"]
    assert "gen_ai.usage.input_tokens" in broken_headers["finopsd-detail"]
    assert by_source[(otlp_topic, 3)][0]["finopsd-reason"] == "invalid_json"
    assert by_source[(litellm_topic, 2)][0]["finopsd-reason"] == "wrong_type"
    assert "prompt_tokens" in by_source[(litellm_topic, 2)][0]["finopsd-detail"]
    assert state.counts["dead_letters"] == 3


def test_litellm_sdk_records_end_to_end(
    topics: Topics, make_config: MakeConfig, daemons: Daemons
) -> None:
    """The recipe's records, produced with their keys to a litellm topic, are stored: the
    cache hit with cache_hit true and model gpt-4o, the unpriced call with a NULL gateway
    cost, the failures with no tokens."""
    topic = f"litellm-sdk.{topics.group}"
    ensure_topics(topics.bootstrap, {topic: 1})
    # captured on one day: the window ahead of the clock must not refuse them on another
    setup = make_config("sdk", ingest={"max_future_skew_s": 366 * 86_400})
    with setup.config.open("a") as config:
        config.write(f'\n[ingest.formats]\n"{topic}" = "litellm"\n')
    records = sdk_records()
    produce_messages(
        topics.bootstrap,
        topic,
        [(r["key"].encode(), r["value"].encode()) for r in records.values()],
    )
    daemon = daemons(setup)
    daemon.start()
    daemon.wait_ready()
    daemon.wait_until(
        lambda: (
            committed_offsets(topics.bootstrap, topics.group, [TopicPartition(topic, 0)]).get(0, 0)
            >= len(records)
        ),
        timeout=60,
        what="the litellm topic to be committed",
        interval=0.3,
    )
    assert not daemon.logged_error(), daemon.log_tail()
    assert daemon.terminate() == 0, daemon.log_tail()

    with Store(setup.store, read_only=True) as store:
        cursor = store.cursor().execute(
            "SELECT event_id, cache_hit, provider, request_model, status, input_tokens, "
            "output_tokens, gateway_cost_usd, cost_usd, price_source FROM usage_events"
        )
        columns = [d[0] for d in cursor.description]
        stored = {r[0]: dict(zip(columns, r, strict=True)) for r in cursor.fetchall()}
    ids = {name: json.loads(r["value"])["id"] for name, r in records.items()}
    assert set(stored) == set(ids.values())
    hit = stored[ids["sync_cache_hit"]]
    assert (hit["cache_hit"], hit["provider"], hit["request_model"]) == (True, "openai", "gpt-4o")
    assert stored[ids["async_cache_hit"]]["cache_hit"] is True
    assert [name for name in ids if stored[ids[name]]["cache_hit"]] == [
        "sync_cache_hit",
        "async_cache_hit",
    ]
    for name in ("sync_cache_hit", "async_cache_hit"):  # no provider call: nothing billed
        assert (stored[ids[name]]["cost_usd"], stored[ids[name]]["price_source"]) == (
            0.0,
            "cache_hit",
        ), name
    assert stored[ids["sync_cache_miss"]]["cost_usd"] > 0
    assert stored[ids["sync_unpriced"]]["gateway_cost_usd"] is None
    assert stored[ids["sync_success"]]["gateway_cost_usd"] > 0
    for name in ("sync_failure", "async_failure"):
        failed = stored[ids[name]]
        assert (failed["status"], failed["input_tokens"], failed["output_tokens"]) == (
            "error",
            0,
            0,
        )
