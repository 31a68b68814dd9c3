"""``litellm``: LiteLLM's ``StandardLoggingPayload``, one per Kafka record.

LiteLLM hands every logging callback the same object for each request,
``kwargs["standard_logging_object"]`` (``litellm/types/utils.py``,
``StandardLoggingPayload``; documented at docs.litellm.ai, "StandardLoggingPayload
Specification"). A record holds one payload as a JSON object, or a JSON array of
them (the ``json_array`` form of LiteLLM's ``generic_api`` callback).

=================================  ==================================================
UsageEvent                         StandardLoggingPayload
=================================  ==================================================
event_id                           ``id``
ts                                 ``startTime`` (epoch seconds, UTC)
latency_ms                         ``endTime - startTime``
ttft_ms                            ``completionStartTime - startTime`` (for a call
                                   that did not stream, LiteLLM sets it to ``endTime``;
                                   none for a failed call)
status                             "error" when ``status`` is "failure", else "ok"
gen_ai.request.model               ``model_group`` (the proxy's model group: what the
                                   caller asked for), else ``model``
gen_ai.response.model              ``response.model``; where the proxy rewrote it to
                                   the group (or it is missing), ``model`` (the
                                   deployment that answered)
gen_ai.provider.name               ``custom_llm_provider``
gen_ai.usage.input_tokens          ``prompt_tokens`` (LiteLLM includes cached and
                                   cache-write tokens, as the GenAI conventions do)
gen_ai.usage.output_tokens         ``completion_tokens``
gen_ai.usage.cache_read.…          ``usage.prompt_tokens_details.cached_tokens``, else
                                   ``usage.cache_read_input_tokens``
gen_ai.usage.cache_creation.…      ``usage.prompt_tokens_details.cache_creation_tokens``,
                                   else ``usage.cache_creation_input_tokens``
gen_ai.usage.reasoning.…           ``usage.completion_tokens_details.reasoning_tokens``
cost_usd                           ``response_cost`` (the gateway's own price); none
                                   when LiteLLM had no price for the model
                                   (``response_cost_failure_debug_info`` set: its 0.0
                                   then means "unknown", not "free")
cache_hit                          ``cache_hit`` (true: answered from LiteLLM's
                                   response cache; null or absent: false)
tenant                             ``metadata.user_api_key_org_id``
team                               ``metadata.user_api_key_team_alias``, else
                                   ``metadata.user_api_key_team_id``
app                                ``metadata.user_api_key_alias`` (the virtual key's alias)
feature                            (none from the key)
prompt_hash                        SHA-256 of ``messages`` as canonical JSON (none when
                                   LiteLLM does not log them)
quality_score                      ``metadata.requester_metadata.quality_score`` (or
                                   ``spend_logs_metadata``'s): an eval's score, 0..1
=================================  ==================================================

``usage`` is the first object found of ``response.usage``,
``metadata.usage_object`` and ``hidden_params.usage_object``. A tag the key does
not give is taken from ``metadata.spend_logs_metadata.<tag>``, then
``metadata.requester_metadata.<tag>`` (both set by the caller of the proxy, so
not authenticated: the key's values win).

When ``prompt_tokens`` or ``completion_tokens`` is missing or null, it is
estimated with tiktoken (``finopsd.tokens``) from ``messages`` (chat messages,
counted as OpenAI does, or a plain prompt string) and ``response`` (the text of
``choices[].message.content`` or ``choices[].text``, or a plain string); a
payload without usage and without text is refused (reason ``no_usage``). A
failed call (``status`` "failure") is never estimated: the counts it reports are
kept, a missing one is 0 (a provider that failed the call reported no usage, and
an estimate would bill it).

Model names lose a provider prefix (LiteLLM writes ``openai/gpt-4o`` for a cache
hit or a failed call): ``UsageEvent`` applies ``finopsd.providers.split_provider``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from finopsd import tokens
from finopsd.ingest.formats._common import (
    Candidate,
    Problem,
    RecordDecoder,
    load_json,
    optional_int,
    optional_number,
    optional_str,
    short,
    type_name,
    want_object,
)

STATUSES = {"success": "ok", "failure": "error"}
"""``StandardLoggingPayloadStatus`` to ``UsageEvent.status``."""

KEY_TAGS: dict[str, tuple[str, ...]] = {
    "tenant": ("user_api_key_org_id",),
    "team": ("user_api_key_team_alias", "user_api_key_team_id"),
    "app": ("user_api_key_alias",),
    "feature": (),
}
"""Tags from the virtual key's metadata, in order of preference."""

CALLER_METADATA = ("spend_logs_metadata", "requester_metadata")
"""Free-form metadata objects a tag is read from when the key does not give it."""

USAGE_OBJECTS = (
    ("response", "usage"),
    ("metadata", "usage_object"),
    ("hidden_params", "usage_object"),
)
"""Where the provider's usage object (with cache and reasoning details) is looked for."""


class LiteLLMDecoder(RecordDecoder):
    """Decodes LiteLLM ``StandardLoggingPayload`` records into usage events (module doc)."""

    name = "litellm"

    def candidates(self, value: bytes, problems: list[Problem]) -> list[Candidate]:
        doc = load_json(value)
        if isinstance(doc, dict):
            payloads: list[tuple[str, Any]] = [("payload", doc)]
        elif isinstance(doc, list):
            payloads = [(f"payload [{i}]", p) for i, p in enumerate(doc)]
        else:
            raise Problem(
                "not_an_object",
                "",
                f"expected a StandardLoggingPayload object or an array of them, "
                f"got {type_name(doc)}",
            )
        out = []
        for label, payload in payloads:
            if not isinstance(payload, dict):
                problems.append(Problem("not_an_object", label, f"is {type_name(payload)}"))
                continue
            if isinstance(payload.get("id"), str) and payload["id"]:
                label = f"{label} id {short(payload['id'], 60)}"
            try:
                out.append(candidate(payload, label))
            except Problem as exc:
                problems.append(Problem(exc.reason, label, str(exc)))
        return out


def candidate(p: Mapping[str, Any], label: str) -> Candidate:
    """The usage event one payload describes, before the model validates it."""
    event_id = optional_str(p, "id", "id")
    if event_id is None:
        raise Problem("missing_field", "id", "missing")
    model = optional_str(p, "model", "model")
    if model is None:
        raise Problem("missing_field", "model", "missing")
    start = optional_number(p, "startTime", "startTime")
    if start is None:
        raise Problem("missing_field", "startTime", "missing")
    try:
        ts = datetime.fromtimestamp(start, UTC)
    except (OverflowError, OSError, ValueError) as exc:
        raise Problem("invalid_value", "startTime", f"{start} is not a time") from exc
    end = optional_number(p, "endTime", "endTime")
    first_token = optional_number(p, "completionStartTime", "completionStartTime")
    status = optional_str(p, "status", "status")
    if status is not None and status not in STATUSES:
        raise Problem("invalid_value", "status", f"{short(status)} is not 'success' or 'failure'")
    failed = status == "failure"

    response = p.get("response")
    response_model = None
    if isinstance(response, dict):
        response_model = optional_str(response, "model", "response.model")
    # the proxy: model_group is what the caller asked for, model the deployment that
    # answered (and response.model the group again, as the proxy rewrites it)
    group = optional_str(p, "model_group", "model_group")
    requested, requested_from = model, "model"
    answered_from = "response.model"
    if group:
        requested, requested_from = group, "model_group"
        if response_model is None or response_model == group:
            response_model, answered_from = model, "model"

    input_tokens = optional_int(p, "prompt_tokens", "prompt_tokens")
    output_tokens = optional_int(p, "completion_tokens", "completion_tokens")
    if failed:  # what the provider reported, never an estimate
        input_tokens = input_tokens or 0
        output_tokens = output_tokens or 0
    if input_tokens is None:
        input_tokens = count_prompt(p.get("messages"), model)
    if output_tokens is None:
        output_tokens = count_completion(response, model)
    if input_tokens is None or output_tokens is None:
        field = "prompt_tokens" if input_tokens is None else "completion_tokens"
        text = "messages" if input_tokens is None else "response"
        raise Problem("no_usage", field, f"missing, and no {text} text to count it from")
    cache_hit = p.get("cache_hit")
    if cache_hit is not None and not isinstance(cache_hit, bool):
        raise Problem("wrong_type", "cache_hit", f"expected a boolean, got {type_name(cache_hit)}")
    cost = optional_number(p, "response_cost", "response_cost")
    if p.get("response_cost_failure_debug_info") is not None:
        cost = None  # LiteLLM could not price the call: its 0.0 is no figure

    wire: dict[str, Any] = {
        "event_id": event_id,
        "ts": ts,
        "gen_ai.request.model": requested,
        "gen_ai.response.model": response_model,
        "gen_ai.provider.name": optional_str(p, "custom_llm_provider", "custom_llm_provider"),
        "gen_ai.usage.input_tokens": input_tokens,
        "gen_ai.usage.output_tokens": output_tokens,
        "status": "error" if failed else "ok",
        "cost_usd": cost,
        "cache_hit": cache_hit,
    }
    sources = {
        "event_id": "id",
        "ts": "startTime",
        "latency_ms": "endTime",
        "ttft_ms": "completionStartTime",
        "gen_ai.request.model": requested_from,
        "gen_ai.response.model": answered_from,
        "gen_ai.provider.name": "custom_llm_provider",
        "gen_ai.usage.input_tokens": "prompt_tokens",
        "gen_ai.usage.output_tokens": "completion_tokens",
        "cost_usd": "response_cost",
        "cache_hit": "cache_hit",
    }
    # to the microsecond: the float seconds carry no more, and a difference of two
    # epoch floats would show noise in the last digits
    if end is not None:
        wire["latency_ms"] = round((end - start) * 1000, 3)
    if first_token is not None and not failed:  # a failed call saw no first token
        wire["ttft_ms"] = round((first_token - start) * 1000, 3)
    wire.update(usage_details(p, sources))
    metadata = p.get("metadata")
    metadata = want_object(metadata, "metadata") if metadata is not None else {}
    for tag, keys in KEY_TAGS.items():
        found = tag_value(metadata, keys) or caller_tag(metadata, tag)
        if found is not None:
            wire[tag], sources[tag] = found
    digest = prompt_digest(p.get("messages"))
    if digest is not None:
        wire["prompt_hash"], sources["prompt_hash"] = digest, "messages"
    for name in CALLER_METADATA:  # an eval pipeline's score, sent with the request
        holder = metadata.get(name)
        if isinstance(holder, dict) and holder.get("quality_score") is not None:
            wire["quality_score"] = holder["quality_score"]
            sources["quality_score"] = f"metadata.{name}.quality_score"
            break
    return Candidate(label, {k: v for k, v in wire.items() if v is not None}, sources)


def usage_details(p: Mapping[str, Any], sources: dict[str, str]) -> dict[str, int | None]:
    """Cache-read, cache-write and reasoning token counts from the provider's usage object."""
    usage: Mapping[str, Any] | None = None
    where = ""
    for outer, inner in USAGE_OBJECTS:
        holder = p.get(outer)
        if isinstance(holder, dict) and isinstance(holder.get(inner), dict):
            usage, where = holder[inner], f"{outer}.{inner}"
            break
    if usage is None:
        return {}
    out: dict[str, int | None] = {}
    wanted = (
        (
            "gen_ai.usage.cache_read.input_tokens",
            (("prompt_tokens_details", "cached_tokens"), (None, "cache_read_input_tokens")),
        ),
        (
            "gen_ai.usage.cache_creation.input_tokens",
            (
                ("prompt_tokens_details", "cache_creation_tokens"),
                (None, "cache_creation_input_tokens"),
            ),
        ),
        (
            "gen_ai.usage.reasoning.output_tokens",
            (("completion_tokens_details", "reasoning_tokens"),),
        ),
    )
    for wire, paths in wanted:
        for detail, key in paths:
            holder = usage
            path = where
            if detail is not None:
                holder = usage.get(detail)
                path = f"{where}.{detail}"
                if holder is None:
                    continue
                holder = want_object(holder, path)
            value = optional_int(holder, key, f"{path}.{key}")
            if value is not None:
                out[wire] = value
                sources[wire] = f"{path}.{key}"
                break
    return out


def tag_value(metadata: Mapping[str, Any], keys: tuple[str, ...]) -> tuple[str, str] | None:
    """(value, source) of a tag: the key's metadata first, then the caller's metadata."""
    for key in keys:
        value = optional_str(metadata, key, f"metadata.{key}")
        if value is not None:
            return value, f"metadata.{key}"
    return None


def caller_tag(metadata: Mapping[str, Any], tag: str) -> tuple[str, str] | None:
    """A tag from the caller's free-form metadata (string values only; others ignored)."""
    for name in CALLER_METADATA:
        holder = metadata.get(name)
        if isinstance(holder, dict):
            value = holder.get(tag)
            if isinstance(value, str) and value:
                return value, f"metadata.{name}.{tag}"
    return None


def prompt_digest(messages: Any) -> str | None:
    """``prompt_hash``: SHA-256 (hex, 32 characters) of the messages as canonical JSON
    (keys sorted, no spaces); None without messages (LiteLLM may be told not to log
    them). Two requests with the same prompt have the same hash, whoever sent them."""
    if not messages:
        return None
    try:
        text = json.dumps(messages, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError):
        return None
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def count_prompt(messages: Any, model: str) -> int | None:
    """Input tokens estimated from ``messages``: chat messages or a prompt string; None if none."""
    if isinstance(messages, str):
        return tokens.count_text(messages, model) if messages else None
    if isinstance(messages, list) and messages:
        chat = []
        for i, message in enumerate(messages):
            if isinstance(message, str):  # a list of prompts (text completion)
                message = {"content": message}
            chat.append(want_object(message, f"messages[{i}]"))
        return tokens.count_messages(chat, model)
    return None


def count_completion(response: Any, model: str) -> int | None:
    """Output tokens estimated from the response's text; None if it holds none."""
    if isinstance(response, str):
        return tokens.count_text(response, model) if response else None
    if not isinstance(response, dict) or not isinstance(response.get("choices"), list):
        return None
    texts = []
    for choice in response["choices"]:
        if not isinstance(choice, dict):
            continue
        message = choice.get("message")
        if isinstance(message, dict):
            texts.append(tokens.message_text(message.get("content")))
        elif isinstance(choice.get("text"), str):
            texts.append(choice["text"])
    if not any(texts):
        return None
    return sum(tokens.count_text(t, model) for t in texts)


__all__ = ["LiteLLMDecoder"]
