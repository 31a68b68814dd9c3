"""The two event types finopsd ingests, in their native JSON form.

A ``UsageEvent`` is one LLM request as a gateway saw it; a ``GpuSample`` is one
GPU at one instant. On the wire both are flat JSON objects, one per Kafka
message. Keys follow the OpenTelemetry GenAI semantic conventions where one
exists (``gen_ai.usage.input_tokens``); the Python attribute, which is also the
DuckDB column, is the snake_case name after the last namespace
(``input_tokens``).

These models are the contract. The batch decoder in ``finopsd.ingest.decode``
derives its column schema and its checks from them, and falls back to them for
any record its fast path does not accept, so a record is stored if and only if
``Model.model_validate_json(record)`` accepts it, with the same values.

Validation is strict: a number is not a string, a float is not an int, and an
unknown key is ignored (producers may send more than finopsd stores).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from finopsd.providers import split_provider

MAX_TEXT = 256
"""Longest accepted tag or name, in characters."""

# Every number has a bound the store's column holds (BIGINT, DOUBLE) with room for the
# sums the analyzers take over it; a value beyond one is refused (invalid_value).
Text = Annotated[str, Field(min_length=1, max_length=MAX_TEXT)]
Tokens = Annotated[int, Field(ge=0, le=2**40)]
Millis = Annotated[float, Field(ge=0, le=1e9, allow_inf_nan=False)]  # up to ~11.6 days
BlockHash = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
Bytes = Annotated[int, Field(ge=0, le=2**60)]  # 1 EiB

RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})?$")
"""The one timestamp form accepted on the wire: RFC 3339 (a space may stand for the T); the
offset is required by AwareDatetime after it. pydantic alone would also take a number in a
string as Unix time."""


def _rfc3339(value: Any) -> Any:
    """A timestamp is an RFC 3339 string (or, from Python, a datetime); nothing else."""
    if isinstance(value, datetime):
        return value
    if not isinstance(value, str):
        raise PydanticCustomError("datetime_type", "Input should be an RFC 3339 string")
    if not RFC3339.match(value):
        raise ValueError("expected an RFC 3339 timestamp with an offset, e.g. 2026-11-23T05:20:22Z")
    return value


def _in_utc_range(value: datetime) -> datetime:
    """The instant must be within years 1-9999 in UTC, where the store keeps it."""
    try:
        value.astimezone(UTC)
    except OverflowError:
        raise ValueError("the instant is outside years 1-9999 in UTC") from None
    return value


# lax: the before-validator hands pydantic a Python str, which strict mode would refuse
Timestamp = Annotated[
    AwareDatetime, Strict(False), BeforeValidator(_rfc3339), AfterValidator(_in_utc_range)
]


class _Event(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)

    #: Columns that identify one event for deduplication.
    dedup_key: ClassVar[tuple[str, ...]]
    #: The DuckDB table the events are stored in.
    table: ClassVar[str]

    def row(self) -> dict[str, Any]:
        """The event as a store row: column name to value, timestamps in UTC."""
        out = self.model_dump(by_alias=False)
        for name, value in out.items():
            if isinstance(value, datetime):
                out[name] = value.astimezone(UTC)
        return out


class UsageEvent(_Event):
    """One LLM request: who asked, which model answered, how many tokens it took."""

    dedup_key: ClassVar[tuple[str, ...]] = ("event_id",)
    table: ClassVar[str] = "usage_events"

    event_id: Text = Field(description="Idempotency key: a resend with the same id is stored once")
    ts: Timestamp = Field(description="When the request started; RFC 3339 with a UTC offset")
    provider: Text | None = Field(None, alias="gen_ai.provider.name")
    request_model: Text = Field(alias="gen_ai.request.model")
    response_model: Text | None = Field(None, alias="gen_ai.response.model")
    input_tokens: Tokens = Field(alias="gen_ai.usage.input_tokens")
    output_tokens: Tokens = Field(alias="gen_ai.usage.output_tokens")
    cache_read_input_tokens: Tokens | None = Field(
        None, alias="gen_ai.usage.cache_read.input_tokens"
    )
    cache_creation_input_tokens: Tokens | None = Field(
        None, alias="gen_ai.usage.cache_creation.input_tokens"
    )
    reasoning_output_tokens: Tokens | None = Field(
        None, alias="gen_ai.usage.reasoning.output_tokens"
    )
    tenant: Text | None = None
    team: Text | None = None
    app: Text | None = None
    feature: Text | None = None
    latency_ms: Millis | None = None
    ttft_ms: Millis | None = Field(None, description="Time to first token")
    status: Literal["ok", "error"] = "ok"
    prompt_hash: Text | None = Field(None, description="Hash of the whole prompt")
    prefix_hashes: list[BlockHash] | None = Field(
        None, description="Hashes of the prompt's consecutive token blocks, as signed 64-bit ints"
    )
    latency_class: Literal["interactive", "batch"] = "interactive"
    quality_score: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] | None = None
    gateway_cost_usd: Annotated[float, Field(ge=0, le=1e6, allow_inf_nan=False)] | None = Field(
        None,
        alias="cost_usd",
        description="Cost as the gateway computed it, if it did; finopsd prices every event "
        "itself and keeps this beside its own figure",
    )
    deployment: Text | None = Field(
        None, description="The self-hosted deployment that served the request, if any"
    )
    billing_mode: Literal["standard", "batch"] = Field(
        "standard",
        description="batch: sent through the provider's batch API and billed at its discount",
    )
    cache_hit: bool = Field(
        False,
        description="Answered from the gateway's response cache: no provider call was made",
    )

    #: Columns holding model names, whose provider prefix is split off (``split_provider``).
    model_name_columns: ClassVar[tuple[str, ...]] = ("request_model", "response_model")

    @field_validator("status", "latency_class", "billing_mode", "cache_hit", mode="before")
    @classmethod
    def _null_means_default(cls, value: Any, info: ValidationInfo) -> Any:
        """A JSON null for a field with a default means the default."""
        if value is None and info.field_name is not None:
            return cls.model_fields[info.field_name].default
        return value

    @model_validator(mode="after")
    def _split_provider_prefixes(self) -> UsageEvent:
        """``openai/gpt-4o`` is model ``gpt-4o``: a provider prefix (``finopsd.providers``) is
        split off each model name, and names the provider when the event names none (the
        request model's prefix first). The batch decoder applies the same function."""
        provider = self.provider
        for name in self.model_name_columns:
            value = getattr(self, name)
            if value is None:
                continue
            prefix, model = split_provider(value)
            if prefix is not None:
                # frozen: set once, here, while the instance is being validated
                object.__setattr__(self, name, model)
                provider = provider or prefix
        if provider != self.provider:
            object.__setattr__(self, "provider", provider)
        return self


class GpuSample(_Event):
    """One GPU at one instant: how busy it was and what it served."""

    dedup_key: ClassVar[tuple[str, ...]] = ("host", "gpu_index", "ts")
    table: ClassVar[str] = "gpu_samples"

    ts: Timestamp
    host: Text
    gpu_index: Annotated[int, Field(ge=0, le=1023)]
    gpu_uuid: Text | None = None
    gpu_model: Text | None = Field(None, description='Product name, e.g. "NVIDIA H100 80GB HBM3"')
    utilization_pct: Annotated[float, Field(ge=0, le=100, allow_inf_nan=False)]
    memory_used_bytes: Bytes | None = None
    memory_total_bytes: Bytes | None = None
    power_watts: Annotated[float, Field(ge=0, le=1e6, allow_inf_nan=False)] | None = None
    deployment: Text | None = Field(None, description="The model deployment this GPU serves")
    tenant: Text | None = None
    team: Text | None = None


EVENT_TYPES: dict[str, type[_Event]] = {"usage": UsageEvent, "gpu": GpuSample}
"""Event kinds by the name config.toml uses for them."""


def explain(error: ValidationError) -> str:
    """One line that names each offending field and says what was wrong with it."""
    parts = []
    for err in error.errors(include_url=False):
        where = ".".join(str(p) for p in err["loc"]) or "<record>"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)
