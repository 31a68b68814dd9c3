"""FOCUS 1.2 cost-and-usage export of the priced usage in the store.

FOCUS (the FinOps Open Cost and Usage Specification, https://focus.finops.org)
is the common billing-data format FinOps tools read. ``focus_table`` turns the
priced ``usage_events`` of a period, plus the cost of idle self-hosted
deployment-hours, into a FOCUS 1.2 Cost and Usage dataset (an Arrow table);
``write_csv`` and ``write_parquet`` write it.

Rows. One row per UTC hour × tenant × team × app × feature × provider × model
× deployment × price (``price_id``) × billing mode × meter. The meters
(``SkuMeter``) are "input tokens" (uncached input), "cached-input tokens",
"cache-write tokens" and "output tokens"; a meter with no tokens in a group has
no row. Self-hosted deployments price every input token alike, so their
"input tokens" meter counts all input tokens and they have no cache meters.
Each ``deployment_hours`` row whose deployment served no tokens in that hour
(``tokens = 0``) becomes a "GPU hours (idle)" row carrying its whole cost, so
the file's total ``EffectiveCost`` is the store's ``sum(cost_usd)`` over the
period plus the idle deployment-hour cost.

Costs per row: ``ListCost`` is the meter's list cost, ``BilledCost`` =
``EffectiveCost`` = ListCost × (1 − discount_rate) (the provider's batch
discount; finopsd knows no commitments or negotiated prices, so
``ContractedCost`` = ``ListCost``). ``PricingUnit`` is "1000000 Tokens" (FOCUS
Unit Format: a unit quantity is a plain integer), so ``PricingQuantity`` is
tokens / 1,000,000 and ``ListUnitPrice`` USD per million tokens.

Unit prices (``ListUnitPrice`` = ``ContractedUnitPrice``, no negotiated prices
being known) come from the price, not from dividing the cost: a row priced from
a price list (catalog or config) takes the meter's price of
``PriceBook.unit_prices(x_PriceId)`` — as published, e.g. 2.5 — and its
``x_PriceDetails`` is that price's ``details`` (every meter's price, the
catalog, where it is published). A self-hosted row's tokens carry the hour's
GPU cost spread over the tokens served (FOCUS wants a unit price on every usage
row; no price list has one): ``deployment_hours.cost_usd × 10⁶ / tokens`` of its
deployment and hour, the figure pricing divided by; an idle row's unit is the
GPU-hour at its rate. Either way ``ListUnitPrice × PricingQuantity = ListCost``
within rounding (``unit_price_matches``). Where that fails — the price book no
longer has the ``price_id``, or has other prices for it than the events were
costed at — the row's unit price is ListCost / PricingQuantity to 12
significant digits and ``x_PriceDetails`` starts "derived from the stored cost"
and says why (``derived_unit_prices`` counts those rows).

``InvoiceId`` names finopsd's provisional invoice of the row (FOCUS: "MAY be
generated prior to an invoice being issued"): one per billing account, invoice
issuer and billing month, ``<BillingAccountId>:<issuer>:<YYYY-MM>`` with the
issuer's name in lower case, runs of other characters than letters and digits
as ``-`` (``acme-corp:openai:2025-03``, ``default:amazon-web-services:2025-04``,
``default:self-hosted:2025-03``). It depends only on those three, so every
export of a month gives its rows the same id. It is not the provider's invoice
number, which finopsd does not know.

``SkuPriceDetails`` (FOCUS Key-Value Format, one JSON object per SkuPriceId)
holds the stable properties of the SKU price, never amounts or dates (the spec
leaves those out so that it stays the same over time): ``x_TokenType`` (input,
cached input, cache write, output) and ``x_PricingBasis`` ("price list",
"deployment GPU-hours", or "deployment GPU-hours (idle)" for idle rows, which
have no token type).

Left out, and counted by ``skipped_events``: unpriced events (``price_source``
NULL), self-hosted events whose hour is not settled yet (costs NULL), and
events a gateway answered from its response cache (``price_source``
cache_hit: no provider bills them).

Conformance choices (spec section "Columns", each column's "Feature level"):
every Mandatory column is present; of the Conditional ones those whose
condition holds for LLM usage (ConsumedQuantity/Unit, ContractedUnitPrice,
ListUnitPrice, ResourceId/Name/Type, SkuId, SkuMeter, SkuPriceDetails,
SkuPriceId, SubAccountId/Name, Tags); of the Recommended ones ChargeFrequency,
InvoiceId and ServiceSubcategory. ``SkuPriceId`` leaves out the price's
effective date (the spec wants it constant over time) but keeps its tier
(``>200000``: above 200k input tokens) and time of day (``~0030-1630Z``), which
are distinct prices; the full ``price_id`` is in ``x_PriceId``.
"""

from __future__ import annotations

import csv
import io
import math
import os
import secrets
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from finopsd.store import Store

if TYPE_CHECKING:
    from finopsd.pricing import PriceBook, UnitPrices

FOCUS_VERSION = "1.2"

TOKENS_PER_PRICING_UNIT = 1_000_000
TOKEN_PRICING_UNIT = "1000000 Tokens"
IDLE_METER = "GPU hours (idle)"
SELF_HOSTED_PROVIDER = "Self-hosted"
SELF_HOSTED_SERVICE = "Self-hosted LLM"
SELF_HOSTED_SOURCE = "self_hosted"
CACHE_HIT = "cache_hit"
"""``price_source`` of an event a gateway answered from its response cache (costs 0)."""

BASIS_PRICE_LIST = "price list"
BASIS_SELF_HOSTED = "deployment GPU-hours"
BASIS_IDLE = "deployment GPU-hours (idle)"
"""``SkuPriceDetails.x_PricingBasis``: what a SKU price is set by."""

METERS: tuple[tuple[str, str], ...] = (
    ("input", "input tokens"),
    ("cached-input", "cached-input tokens"),
    ("cache-write", "cache-write tokens"),
    ("output", "output tokens"),
)
"""(SkuPriceId suffix, SkuMeter) of the token meters, in the order rows are built."""

PROVIDERS: dict[str, tuple[str, str]] = {
    "openai": ("OpenAI", "OpenAI API"),
    "anthropic": ("Anthropic", "Anthropic API"),
    "aws.bedrock": ("Amazon Web Services", "Amazon Bedrock"),
    "azure.ai.openai": ("Microsoft", "Azure OpenAI"),
    "azure.ai.inference": ("Microsoft", "Azure AI Inference"),
    "gcp.vertex_ai": ("Google Cloud", "Vertex AI"),
    "gcp.gemini": ("Google", "Gemini API"),
    "gcp.gen_ai": ("Google", "Google Generative AI"),
    "cohere": ("Cohere", "Cohere API"),
    "mistral_ai": ("Mistral AI", "Mistral AI API"),
    "deepseek": ("DeepSeek", "DeepSeek API"),
    "groq": ("Groq", "GroqCloud"),
    "x_ai": ("xAI", "xAI API"),
    "perplexity": ("Perplexity", "Perplexity API"),
    "ibm.watsonx.ai": ("IBM", "IBM watsonx.ai"),
}
"""OpenTelemetry ``gen_ai.provider.name`` values to (ProviderName, ServiceName).
Any other provider is named as it is, its service "<provider> API"."""

SCHEMA = pa.schema(
    [
        # FOCUS columns, alphabetically (ColumnHandling: FOCUS columns first, sorted)
        pa.field("BilledCost", pa.float64(), nullable=False),
        pa.field("BillingAccountId", pa.string(), nullable=False),
        pa.field("BillingAccountName", pa.string()),
        pa.field("BillingCurrency", pa.string(), nullable=False),
        pa.field("BillingPeriodEnd", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("BillingPeriodStart", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("ChargeCategory", pa.string(), nullable=False),
        pa.field("ChargeClass", pa.string()),
        pa.field("ChargeDescription", pa.string()),
        pa.field("ChargeFrequency", pa.string()),
        pa.field("ChargePeriodEnd", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("ChargePeriodStart", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("ConsumedQuantity", pa.float64()),
        pa.field("ConsumedUnit", pa.string()),
        pa.field("ContractedCost", pa.float64(), nullable=False),
        pa.field("ContractedUnitPrice", pa.float64()),
        pa.field("EffectiveCost", pa.float64(), nullable=False),
        pa.field("InvoiceId", pa.string()),
        pa.field("InvoiceIssuerName", pa.string(), nullable=False),
        pa.field("ListCost", pa.float64(), nullable=False),
        pa.field("ListUnitPrice", pa.float64()),
        pa.field("PricingQuantity", pa.float64()),
        pa.field("PricingUnit", pa.string()),
        pa.field("ProviderName", pa.string(), nullable=False),
        pa.field("PublisherName", pa.string(), nullable=False),
        pa.field("ResourceId", pa.string()),
        pa.field("ResourceName", pa.string()),
        pa.field("ResourceType", pa.string()),
        pa.field("ServiceCategory", pa.string(), nullable=False),
        pa.field("ServiceName", pa.string(), nullable=False),
        pa.field("ServiceSubcategory", pa.string()),
        pa.field("SkuId", pa.string()),
        pa.field("SkuMeter", pa.string()),
        pa.field("SkuPriceDetails", pa.string()),
        pa.field("SkuPriceId", pa.string()),
        pa.field("SubAccountId", pa.string()),
        pa.field("SubAccountName", pa.string()),
        pa.field("Tags", pa.string()),
        # custom columns (x_ prefix), alphabetically
        pa.field("x_BatchDiscountRate", pa.float64()),
        pa.field("x_BillingMode", pa.string()),
        pa.field("x_GatewayCost", pa.float64()),
        pa.field("x_Model", pa.string()),
        pa.field("x_PriceDetails", pa.string()),
        pa.field("x_PriceId", pa.string()),
        pa.field("x_PriceSource", pa.string()),
        pa.field("x_Requests", pa.int64()),
    ]
)
"""The export's columns and types. Timestamps are UTC instants; ``Tags`` is a JSON
object (FOCUS Key-Value Format) or null. Custom columns:

* ``x_BatchDiscountRate``: the fraction off list of the row (0 unless batch).
* ``x_BillingMode``: standard | batch (null on idle rows).
* ``x_GatewayCost``: the gateway's own cost figure for the row's events, split over
  their meters in proportion to list cost (null where no gateway sent one).
* ``x_Model``: the model that answered (response model, else the requested one).
* ``x_PriceDetails``: where ListUnitPrice comes from, amounts included (the price
  list entry, the deployment-hour, or why it was derived from the cost).
* ``x_PriceId``: finopsd's price id, with its effective date (``provider/model@date``
  or ``self_hosted/<deployment>``).
* ``x_PriceSource``: catalog | config | self_hosted.
* ``x_Requests``: requests that used the meter (idle rows: requests in the hour).
"""

COLUMNS: tuple[str, ...] = tuple(SCHEMA.names)


class PeriodError(ValueError):
    """A period bound that cannot be used; the message says why."""


# -- the period ---------------------------------------------------------------------------


def parse_bound(text: str) -> datetime:
    """``YYYY-MM-DD`` or an ISO 8601 date-time, as an aware UTC datetime on a whole hour.

    A date means its midnight UTC; a date-time without an offset is UTC. Raises
    ``PeriodError`` for anything else, or for a time that is not on a whole hour
    (rows are hourly, so a partial first or last hour could not be told apart).
    """
    text = text.strip()
    try:
        if len(text) == 10:
            value = datetime.combine(date.fromisoformat(text), datetime.min.time(), UTC)
        else:
            value = datetime.fromisoformat(text)
    except ValueError:
        raise PeriodError(
            f"{text!r} is not a date (YYYY-MM-DD) or an ISO 8601 date-time "
            "(e.g. 2025-03-01T06:00:00Z)"
        ) from None
    value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    if value.minute or value.second or value.microsecond:
        raise PeriodError(f"{text!r} is not on a whole hour (UTC)")
    return value


def format_instant(value: datetime) -> str:
    """``value`` in the FOCUS date-time format, ``YYYY-MM-DDTHH:mm:ssZ`` (UTC)."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def default_output_name(start: datetime, end: datetime, fmt: str) -> str:
    """``focus_<from>_<to>.<fmt>``: bounds as ``YYYY-MM-DD``, or ``YYYY-MM-DDTHHZ`` off midnight."""

    def bound(value: datetime) -> str:
        value = value.astimezone(UTC)
        return value.strftime("%Y-%m-%d" if value.hour == 0 else "%Y-%m-%dT%HZ")

    return f"focus_{bound(start)}_{bound(end)}.{fmt}"


# -- the dataset --------------------------------------------------------------------------


def _lit(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _providers_sql() -> str:
    rows = ", ".join(
        f"({_lit(key)}, {_lit(name)}, {_lit(service)})"
        for key, (name, service) in PROVIDERS.items()
    )
    return f"providers(provider, provider_name, service_name) AS (VALUES {rows})"


def _token_type_sql(slug: str) -> str:
    """``'x_TokenType', <type>`` for json_object: the meter's token type, or nothing."""
    cases = " ".join(
        f"WHEN {_lit(s)} THEN {_lit(meter.removesuffix(' tokens').replace('-', ' '))}"
        for s, meter in METERS
    )
    return f"'x_TokenType', CASE {slug} {cases} END"


def _invoice_id_sql(issuer: str, hour: str) -> str:
    """``<billing account>:<issuer slug>:<YYYY-MM>``, the provisional invoice of a row."""
    slug = f"trim(lower(regexp_replace({issuer}, '[^A-Za-z0-9]+', '-', 'g')), '-')"
    return f"$account || ':' || {slug} || ':' || strftime({hour}, '%Y-%m')"


def _meters_sql() -> str:
    """The per-event list of meters: (slug, meter, quantity, list cost)."""
    uncached = (
        "greatest(e.input_tokens - coalesce(e.cache_read_input_tokens, 0) "
        "- coalesce(e.cache_creation_input_tokens, 0), 0)"
    )
    quantities = {
        "input": "CASE WHEN e.price_source = 'self_hosted' THEN e.input_tokens "
        f"ELSE {uncached} END",
        "cached-input": "CASE WHEN e.price_source = 'self_hosted' THEN 0 "
        "ELSE coalesce(e.cache_read_input_tokens, 0) END",
        "cache-write": "CASE WHEN e.price_source = 'self_hosted' THEN 0 "
        "ELSE coalesce(e.cache_creation_input_tokens, 0) END",
        "output": "e.output_tokens",
    }
    costs = {
        "input": "e.input_cost_usd",
        "cached-input": "e.cached_input_cost_usd",
        "cache-write": "e.cache_write_cost_usd",
        "output": "e.output_cost_usd",
    }
    items = [
        f"{{'slug': {_lit(slug)}, 'meter': {_lit(meter)}, "
        f"'qty': ({quantities[slug]})::BIGINT, 'list': coalesce({costs[slug]}, 0.0)::DOUBLE}}"
        for slug, meter in METERS
    ]
    return "[" + ", ".join(items) + "]"


def _sql() -> str:
    sh = "price_source = 'self_hosted'"
    tags = (
        "nullif(json_merge_patch('{}', json_object('team', team, 'app', app, "
        "'feature', feature))::VARCHAR, '{}')"
    )
    return f"""
WITH {_providers_sql()},
ev AS (
    SELECT
        date_trunc('hour', timezone('UTC', e.ts)) AS hour,
        e.tenant, e.team, e.app, e.feature, e.provider, e.deployment,
        coalesce(e.response_model, e.request_model) AS model,
        e.price_source, e.price_id, e.billing_mode, e.discount_rate,
        e.list_cost_usd, e.gateway_cost_usd,
        {_meters_sql()} AS meters
    FROM usage_events e
    WHERE e.ts >= $start AND e.ts < $end AND e.cost_usd IS NOT NULL
      AND e.price_source IS DISTINCT FROM '{CACHE_HIT}'
),
by_meter AS (
    SELECT * EXCLUDE (meters), unnest(meters) AS m,
        list_sum(list_transform(meters, x -> x.qty)) AS event_qty
    FROM ev
),
agg AS (
    SELECT
        hour, tenant, team, app, feature, provider, deployment, model,
        price_source, price_id, billing_mode, discount_rate,
        m.slug AS slug, m.meter AS meter,
        sum(m.qty)::DOUBLE AS qty,
        sum(m.list) AS list_cost,
        sum(m.list * (1 - discount_rate)) AS billed,
        count(*) AS requests,
        sum(gateway_cost_usd * CASE WHEN list_cost_usd > 0 THEN m.list / list_cost_usd
                                    ELSE m.qty / event_qty END) AS gateway
    FROM by_meter
    WHERE m.qty > 0
    GROUP BY ALL
),
usage_rows AS (
    SELECT
        a.*,
        regexp_replace(a.price_id, '@[^@/]*$', '') AS sku_id,
        -- the price without its date, with its tier (>N) and time of day (~HHMM-HHMMZ)
        regexp_replace(a.price_id, '@[^@/~>]*', '') AS sku_price_base,
        CASE WHEN a.{sh} THEN '{SELF_HOSTED_PROVIDER}'
             ELSE coalesce(p.provider_name, a.provider, 'unknown') END AS provider_name,
        CASE WHEN a.{sh} THEN '{SELF_HOSTED_SERVICE}'
             ELSE coalesce(p.service_name, coalesce(a.provider, 'unknown') || ' API')
        END AS service_name,
        CASE WHEN h.tokens > 0 THEN h.cost_usd * {TOKENS_PER_PRICING_UNIT} / h.tokens
        END AS sh_unit_price,
        CASE WHEN h.tokens > 0
            THEN 'USD per million tokens: the cost of deployment ' || a.deployment
                 || ' in this hour, ' || printf('%.10g', h.cost_usd) || ' USD (' || h.gpus
                 || ' x ' || h.gpu_type || ' at ' || printf('%.10g', h.gpu_hour_usd)
                 || ' USD per GPU-hour), over the ' || h.tokens || ' tokens it served'
        END AS sh_details
    FROM agg a
    LEFT JOIN providers p ON p.provider = a.provider
    LEFT JOIN deployment_hours h ON a.{sh} AND h.deployment = a.deployment
        AND timezone('UTC', h.hour) = a.hour
)
SELECT
    billed AS BilledCost,
    $account AS BillingAccountId,
    $account AS BillingAccountName,
    'USD' AS BillingCurrency,
    date_trunc('month', hour) + INTERVAL 1 MONTH AS BillingPeriodEnd,
    date_trunc('month', hour) AS BillingPeriodStart,
    'Usage' AS ChargeCategory,
    NULL::VARCHAR AS ChargeClass,
    CASE WHEN {sh}
        THEN model || ' ' || meter || ' on self-hosted deployment ' || deployment
             || ' (its GPU-hour cost spread over the tokens it served)'
        ELSE model || ' ' || meter || ' on ' || service_name || ' at list price'
             || CASE WHEN discount_rate > 0
                     THEN ', ' || billing_mode || ' discount ' || printf('%g', discount_rate * 100)
                          || '% off'
                     ELSE '' END
    END AS ChargeDescription,
    'Usage-Based' AS ChargeFrequency,
    hour + INTERVAL 1 HOUR AS ChargePeriodEnd,
    hour AS ChargePeriodStart,
    qty AS ConsumedQuantity,
    'Tokens' AS ConsumedUnit,
    list_cost AS ContractedCost,
    sh_unit_price AS ContractedUnitPrice,
    billed AS EffectiveCost,
    {_invoice_id_sql("provider_name", "hour")} AS InvoiceId,
    provider_name AS InvoiceIssuerName,
    list_cost AS ListCost,
    sh_unit_price AS ListUnitPrice,
    qty / {TOKENS_PER_PRICING_UNIT} AS PricingQuantity,
    '{TOKEN_PRICING_UNIT}' AS PricingUnit,
    provider_name AS ProviderName,
    provider_name AS PublisherName,
    CASE WHEN {sh} THEN coalesce(deployment, sku_id)
         ELSE coalesce(provider, 'unknown') || '/' || model END AS ResourceId,
    CASE WHEN {sh} THEN coalesce(deployment, sku_id) ELSE model END AS ResourceName,
    CASE WHEN {sh} THEN 'LLM Deployment' ELSE 'LLM Model' END AS ResourceType,
    'AI and Machine Learning' AS ServiceCategory,
    service_name AS ServiceName,
    'Generative AI' AS ServiceSubcategory,
    sku_id AS SkuId,
    meter AS SkuMeter,
    json_object({_token_type_sql("slug")},
        'x_PricingBasis', CASE WHEN {sh} THEN '{BASIS_SELF_HOSTED}' ELSE '{BASIS_PRICE_LIST}' END
    )::VARCHAR AS SkuPriceDetails,
    sku_price_base || '/' || slug AS SkuPriceId,
    tenant AS SubAccountId,
    tenant AS SubAccountName,
    {tags} AS Tags,
    discount_rate AS x_BatchDiscountRate,
    billing_mode AS x_BillingMode,
    gateway AS x_GatewayCost,
    model AS x_Model,
    sh_details AS x_PriceDetails,
    price_id AS x_PriceId,
    price_source AS x_PriceSource,
    requests AS x_Requests
FROM usage_rows
UNION ALL
SELECT
    d.cost_usd AS BilledCost,
    $account AS BillingAccountId,
    $account AS BillingAccountName,
    'USD' AS BillingCurrency,
    date_trunc('month', timezone('UTC', d.hour)) + INTERVAL 1 MONTH AS BillingPeriodEnd,
    date_trunc('month', timezone('UTC', d.hour)) AS BillingPeriodStart,
    'Usage' AS ChargeCategory,
    NULL::VARCHAR AS ChargeClass,
    'Idle GPU hours of self-hosted deployment ' || d.deployment || ': ' || d.gpus || ' x '
        || d.gpu_type || ' at ' || printf('%g', d.gpu_hour_usd)
        || ' USD per GPU-hour; it served no tokens in this hour' AS ChargeDescription,
    'Usage-Based' AS ChargeFrequency,
    timezone('UTC', d.hour) + INTERVAL 1 HOUR AS ChargePeriodEnd,
    timezone('UTC', d.hour) AS ChargePeriodStart,
    g.gpu_hours AS ConsumedQuantity,
    'Hours' AS ConsumedUnit,
    d.cost_usd AS ContractedCost,
    d.gpu_hour_usd AS ContractedUnitPrice,
    d.cost_usd AS EffectiveCost,
    {_invoice_id_sql(_lit(SELF_HOSTED_PROVIDER), "timezone('UTC', d.hour)")} AS InvoiceId,
    '{SELF_HOSTED_PROVIDER}' AS InvoiceIssuerName,
    d.cost_usd AS ListCost,
    d.gpu_hour_usd AS ListUnitPrice,
    g.gpu_hours AS PricingQuantity,
    'Hours' AS PricingUnit,
    '{SELF_HOSTED_PROVIDER}' AS ProviderName,
    '{SELF_HOSTED_PROVIDER}' AS PublisherName,
    d.deployment AS ResourceId,
    d.deployment AS ResourceName,
    'LLM Deployment' AS ResourceType,
    'AI and Machine Learning' AS ServiceCategory,
    '{SELF_HOSTED_SERVICE}' AS ServiceName,
    'Generative AI' AS ServiceSubcategory,
    'self_hosted/' || d.deployment AS SkuId,
    '{IDLE_METER}' AS SkuMeter,
    json_object('x_PricingBasis', '{BASIS_IDLE}')::VARCHAR AS SkuPriceDetails,
    'self_hosted/' || d.deployment || '/gpu-hours-idle' AS SkuPriceId,
    NULL::VARCHAR AS SubAccountId,
    NULL::VARCHAR AS SubAccountName,
    NULL::VARCHAR AS Tags,
    0.0 AS x_BatchDiscountRate,
    NULL::VARCHAR AS x_BillingMode,
    NULL::DOUBLE AS x_GatewayCost,
    NULL::VARCHAR AS x_Model,
    'USD per GPU-hour: ' || d.gpus || ' x ' || d.gpu_type || ' at '
        || printf('%.10g', d.gpu_hour_usd) || ' USD per GPU-hour, as the hour was settled'
        AS x_PriceDetails,
    'self_hosted/' || d.deployment AS x_PriceId,
    'self_hosted' AS x_PriceSource,
    d.requests AS x_Requests
FROM deployment_hours d,
    LATERAL (SELECT CASE WHEN d.gpu_hour_usd > 0 THEN d.cost_usd / d.gpu_hour_usd
                         ELSE d.gpus::DOUBLE END AS gpu_hours) g
WHERE d.tokens = 0 AND d.hour >= $start AND d.hour < $end
ORDER BY ChargePeriodStart, SubAccountId NULLS LAST, ProviderName, SkuId, x_Model, Tags,
    x_BillingMode, x_PriceId, SkuPriceId
"""


def _cursor(source: Store | duckdb.DuckDBPyConnection) -> duckdb.DuckDBPyConnection:
    return source.cursor()


def _check_period(start: datetime, end: datetime) -> None:
    if start.tzinfo is None or end.tzinfo is None:
        raise PeriodError("period bounds must be timezone-aware")
    if end <= start:
        raise PeriodError(
            f"the period is empty: {format_instant(end)} is not after {format_instant(start)}"
        )


def focus_table(
    source: Store | duckdb.DuckDBPyConnection,
    start: datetime,
    end: datetime,
    *,
    prices: PriceBook,
    billing_account: str = "default",
) -> pa.Table:
    """The FOCUS 1.2 rows of the half-open period [start, end), with ``SCHEMA``.

    ``source`` is a Store or a DuckDB connection to a store at schema version 2
    or later; it is only read. ``start`` and ``end`` are aware datetimes; rows
    are UTC hours, so bounds off a whole hour cut an hour short. Events count
    by ``ts`` (request start); idle deployment-hours by their ``hour``.
    ``prices`` gives the list unit prices of priced rows
    (``PriceBook.unit_prices`` of each ``price_id``; see the module docstring).
    ``billing_account`` fills BillingAccountId and BillingAccountName (finopsd
    does not know the provider's account) and starts every InvoiceId. Rows are
    sorted by hour, tenant, provider, SKU. Raises ``PeriodError`` when
    ``end <= start``.
    """
    _check_period(start, end)
    con = _cursor(source)
    try:
        table = con.execute(
            _sql(), {"start": start, "end": end, "account": billing_account}
        ).to_arrow_table()
    finally:
        con.close()
    # DuckDB hands back naive timestamps (UTC wall time, from timezone('UTC', ...)):
    # casting them to a UTC zone keeps the instant.
    return _with_unit_prices(table.cast(SCHEMA), prices)


METER_PRICES: dict[str, str] = {
    "input tokens": "input",
    "cached-input tokens": "cached_input",
    "cache-write tokens": "cache_write",
    "output tokens": "output",
}
"""SkuMeter to the ``UnitPrices`` field that prices it (USD per million tokens)."""

DERIVED = "derived from the stored cost"
"""How ``x_PriceDetails`` starts where ListUnitPrice is ListCost / PricingQuantity."""


def unit_price_matches(unit_price: float, quantity: float, cost: float) -> bool:
    """Whether ``unit_price × quantity`` is ``cost`` within floating-point rounding.

    ``cost`` is a sum of per-event costs, each rounded on its own, so the
    tolerance is relative (1e-9) with an absolute floor of 1e-12 USD.
    """
    return math.isclose(unit_price * quantity, cost, rel_tol=1e-9, abs_tol=1e-12)


def _derived_unit_price(cost: float, quantity: float) -> float:
    """``cost / quantity`` to 12 significant digits (no division noise), 0 when nothing."""
    return float(f"{cost / quantity:.12g}") if quantity else 0.0


def _with_unit_prices(table: pa.Table, prices: PriceBook) -> pa.Table:
    """``table`` with ListUnitPrice, ContractedUnitPrice and x_PriceDetails filled in.

    Priced-from-a-list rows take the meter's price from ``prices.unit_prices``
    of their ``x_PriceId``; self-hosted rows keep what the SQL took from their
    ``deployment_hours`` row. A row whose unit price is unknown, or does not
    give its ListCost (``unit_price_matches``: the price book has changed since
    the events were priced), gets ListCost / PricingQuantity instead, and
    ``x_PriceDetails`` says so and why.
    """
    if table.num_rows == 0:
        return table
    sources = table.column("x_PriceSource").to_pylist()
    price_ids = table.column("x_PriceId").to_pylist()
    meters = table.column("SkuMeter").to_pylist()
    costs = table.column("ListCost").to_pylist()
    quantities = table.column("PricingQuantity").to_pylist()
    pricing_units = table.column("PricingUnit").to_pylist()
    units = table.column("ListUnitPrice").to_pylist()
    details = table.column("x_PriceDetails").to_pylist()
    book: dict[str, UnitPrices | None] = {}
    for i, source in enumerate(sources):
        unit, detail, why = units[i], details[i], ""
        if source != SELF_HOSTED_SOURCE:
            price_id = price_ids[i]
            if price_id not in book:
                book[price_id] = prices.unit_prices(price_id)
            found = book[price_id]
            field_name = METER_PRICES.get(meters[i])
            if found is None or field_name is None:
                unit, detail = None, None
                why = f"the price book has no price {price_id}"
            else:
                unit, detail = float(getattr(found, field_name)), found.details
        elif unit is None:
            why = "no settled deployment hour gives its price"
        if unit is not None and not unit_price_matches(unit, quantities[i], costs[i]):
            why = (
                f"the price book's {unit:.10g} USD per {pricing_units[i]} for "
                f"{price_ids[i]} {meters[i]} is not what its events were costed at"
            )
            unit = None
        if unit is None:
            unit = _derived_unit_price(costs[i], quantities[i])
            detail = f"{DERIVED}: {why}"
        units[i], details[i] = unit, detail
    unit_array = pa.array(units, pa.float64())
    for name, values in (
        ("ListUnitPrice", unit_array),
        ("ContractedUnitPrice", unit_array),  # no negotiated prices are known
        ("x_PriceDetails", pa.array(details, pa.string())),
    ):
        table = table.set_column(table.schema.get_field_index(name), SCHEMA.field(name), values)
    return table


def derived_unit_prices(table: pa.Table) -> dict[str, int]:
    """Rows whose ListUnitPrice is derived from their cost, by ``x_PriceId``."""
    out: dict[str, int] = {}
    pairs = zip(
        table.column("x_PriceId").to_pylist(),
        table.column("x_PriceDetails").to_pylist(),
        strict=True,
    )
    for price_id, detail in pairs:
        if detail is not None and detail.startswith(DERIVED):
            out[price_id] = out.get(price_id, 0) + 1
    return dict(sorted(out.items()))


@dataclass
class SkippedEvents:
    """What an export of a period leaves out or adds, beside its rows."""

    exported_events: int = 0
    cost_usd: float = 0.0
    list_cost_usd: float = 0.0
    unpriced_events: int = 0
    unpriced_models: dict[str, int] = field(default_factory=dict)
    unsettled_events: int = 0
    unsettled_deployments: dict[str, int] = field(default_factory=dict)
    cache_hit_events: int = 0
    idle_hours: int = 0
    idle_cost_usd: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "exported_events": self.exported_events,
            "store_cost_usd": self.cost_usd,
            "store_list_cost_usd": self.list_cost_usd,
            "idle_deployment_hours": self.idle_hours,
            "idle_cost_usd": self.idle_cost_usd,
            "unpriced": {"events": self.unpriced_events, "models": self.unpriced_models},
            "unsettled": {
                "events": self.unsettled_events,
                "deployments": self.unsettled_deployments,
            },
            "cache_hits": {"events": self.cache_hit_events},
        }


def skipped_events(
    source: Store | duckdb.DuckDBPyConnection, start: datetime, end: datetime
) -> SkippedEvents:
    """Counts for the export summary of [start, end), straight from the store.

    ``exported_events``, ``cost_usd``, ``list_cost_usd``: the priced events (cost
    known) and their totals, which the file's rows sum to (plus idle cost).
    ``unpriced_*``: events without a price (``price_source`` NULL), by
    ``provider/model`` (response model, else requested). ``unsettled_*``: priced
    events without a cost yet (self-hosted hours not settled), by deployment.
    ``cache_hit_events``: events a gateway answered from its response cache
    (``price_source`` cache_hit, cost 0), which no provider bills.
    ``idle_*``: deployment-hours with no tokens, exported as idle GPU rows.
    """
    _check_period(start, end)
    con = _cursor(source)
    params = {"start": start, "end": end}
    where = "ts >= $start AND ts < $end"
    billed = f"cost_usd IS NOT NULL AND price_source IS DISTINCT FROM '{CACHE_HIT}'"
    try:
        row = con.execute(
            f"""SELECT count(*) FILTER (WHERE {billed}),
                    coalesce(sum(cost_usd) FILTER (WHERE {billed}), 0),
                    coalesce(sum(list_cost_usd) FILTER (WHERE {billed}), 0),
                    count(*) FILTER (WHERE price_source IS NULL),
                    count(*) FILTER (WHERE price_source IS NOT NULL AND cost_usd IS NULL),
                    count(*) FILTER (WHERE price_source = '{CACHE_HIT}')
                FROM usage_events WHERE {where}""",
            params,
        ).fetchone()
        assert row is not None
        out = SkippedEvents(
            exported_events=int(row[0]),
            cost_usd=float(row[1]),
            list_cost_usd=float(row[2]),
            unpriced_events=int(row[3]),
            unsettled_events=int(row[4]),
            cache_hit_events=int(row[5]),
        )
        if out.unpriced_events:
            out.unpriced_models = dict(
                con.execute(
                    f"""SELECT coalesce(provider, '?') || '/'
                            || coalesce(response_model, request_model) AS m, count(*)
                        FROM usage_events WHERE {where} AND price_source IS NULL
                        GROUP BY m ORDER BY m""",
                    params,
                ).fetchall()
            )
        if out.unsettled_events:
            out.unsettled_deployments = dict(
                con.execute(
                    f"""SELECT coalesce(deployment, coalesce(price_id, '?')) AS d, count(*)
                        FROM usage_events
                        WHERE {where} AND price_source IS NOT NULL AND cost_usd IS NULL
                        GROUP BY d ORDER BY d""",
                    params,
                ).fetchall()
            )
        idle = con.execute(
            """SELECT count(*), coalesce(sum(cost_usd), 0) FROM deployment_hours
               WHERE tokens = 0 AND hour >= $start AND hour < $end""",
            params,
        ).fetchone()
        assert idle is not None
        out.idle_hours, out.idle_cost_usd = int(idle[0]), float(idle[1])
    finally:
        con.close()
    return out


def export_summary(
    table: pa.Table, skipped: SkippedEvents, start: datetime, end: datetime, fmt: str
) -> dict[str, Any]:
    """What ``finopsd export focus`` reports about an export of ``table`` (and the API's
    ``X-Finopsd-Export`` header): rows, billed and list cost, what was left out."""
    return {
        "format": fmt,
        "focus_version": FOCUS_VERSION,
        "from": format_instant(start),
        "to": format_instant(end),
        "rows": table.num_rows,
        "billed_cost_usd": column_total(table, "BilledCost"),
        "list_cost_usd": column_total(table, "ListCost"),
        **skipped.as_dict(),
        "derived_unit_prices": derived_unit_prices(table),
    }


def column_total(table: pa.Table, column: str) -> float:
    """The sum of a numeric column of ``table`` (0.0 when it has no rows)."""
    return float(pc.sum(table.column(column)).as_py() or 0.0)


# -- writers ------------------------------------------------------------------------------


def decimal_text(value: float) -> str:
    """``value`` as a FOCUS Numeric Format decimal: no exponent, no ``+``, shortest digits.

    Raises ``ValueError`` for NaN or infinity, which FOCUS cannot express.
    """
    if not math.isfinite(value):
        raise ValueError(f"{value!r} is not a finite number")
    if value == 0:
        return "0"
    if value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return format(Decimal(repr(value)), "f")


def _float_text(value: float | None) -> str:
    if value is None:
        return ""
    text = repr(value)
    if "e" in text or "n" in text or text == "-0.0":  # exponent, nan, inf, negative zero
        text = decimal_text(value)
    # FOCUS Decimal columns: 1000.0, never 1000, so that a reader inferring types
    # (the FinOps Foundation validator reads CSV with pandas) sees a decimal
    return text if "." in text else text + ".0"


def _column_text(column: pa.ChunkedArray) -> list[str]:
    """One column's CSV fields: nulls empty, date-times and numbers in FOCUS formats."""
    kind = column.type
    if pa.types.is_timestamp(kind):
        seconds = pc.cast(column, pa.timestamp("s", tz="UTC"))
        column = pc.strftime(seconds, format="%Y-%m-%dT%H:%M:%SZ")
    elif pa.types.is_floating(kind):
        return [_float_text(v) for v in column.to_pylist()]
    elif not pa.types.is_string(kind):
        column = pc.cast(column, pa.string())
    return ["" if v is None else v for v in column.to_pylist()]


def csv_rows(table: pa.Table) -> Iterable[list[str]]:
    yield list(table.column_names)
    for batch in table.to_batches(max_chunksize=16384):
        part = pa.Table.from_batches([batch])
        columns = [_column_text(part.column(i)) for i in range(part.num_columns)]
        yield from (list(row) for row in zip(*columns, strict=True))


def write_csv(table: pa.Table, out: str | Path | TextIO) -> None:
    """Write ``table`` as CSV (RFC 4180: comma, double quotes where needed, CRLF rows).

    A header row of column IDs comes first. Nulls are empty fields; date-times
    are ``YYYY-MM-DDTHH:mm:ssZ``; numbers are plain decimals without an exponent
    (FOCUS Numeric Format), and the Decimal columns (every float column) always
    have a decimal point (``1000.0``); ``x_Requests`` is an integer. ``out`` is
    a path (written atomically: a temporary file in the same directory, then
    renamed) or an open text stream, which should have been opened with
    ``newline=""``.
    """
    if isinstance(out, str | Path):
        _atomic_write(Path(out), "w", lambda f: _write_csv_stream(table, f))
    else:
        _write_csv_stream(table, out)


def _write_csv_stream(table: pa.Table, stream: TextIO) -> None:
    writer = csv.writer(stream, quoting=csv.QUOTE_MINIMAL)
    writer.writerows(csv_rows(table))
    stream.flush()


def write_parquet(table: pa.Table, path: str | Path) -> None:
    """Write ``table`` as Parquet (zstd), atomically (temporary file, then renamed).

    Date-times are UTC-adjusted microsecond timestamps, costs and quantities
    doubles, ``x_Requests`` int64, everything else UTF-8 strings.
    """

    def write(f: Any) -> None:
        pq.write_table(table, f, compression="zstd")

    _atomic_write(Path(path), "wb", write)


def _atomic_write(path: Path, mode: str, write: Any) -> None:
    """Run ``write(file)`` on a new file beside ``path``, then rename it to ``path``.

    The file gets the permissions a plain ``open`` would (0666 less the umask).
    """
    path = path.resolve()
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        if "b" in mode:
            with os.fdopen(fd, "wb") as f:
                write(f)
        else:
            with os.fdopen(fd, "w", newline="", encoding="utf-8") as f:
                write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_csv_stdout(table: pa.Table) -> None:
    """``write_csv`` to standard output, as UTF-8 bytes whatever the locale."""
    sys.stdout.flush()
    stream = io.TextIOWrapper(sys.stdout.buffer, encoding="utf-8", newline="")
    try:
        _write_csv_stream(table, stream)
    finally:
        stream.detach()  # leave sys.stdout's buffer open
