"""``finopsd export focus``: a FOCUS 1.2 cost and usage file from a real store.

The store is a real DuckDB file made by ``Store``; usage events and deployment
hours are inserted directly with known token counts and costs. Expected totals
are computed here, in plain Python, from the rows inserted, never from the
export's own code.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import subprocess
import sys
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import Topics, clean_env, write_config

from finopsd.pricing import Price, PriceBook
from finopsd.reports import focus
from finopsd.store import Store

# -- what the FOCUS 1.2 specification requires ---------------------------------------------

FOCUS_1_2_MANDATORY = {
    # FOCUS 1.2, section "Columns": the columns whose Content Constraints say
    # "Feature level: Mandatory" (each "MUST be present in a FOCUS dataset").
    "BilledCost",
    "BillingAccountId",
    "BillingAccountName",
    "BillingCurrency",
    "BillingPeriodEnd",
    "BillingPeriodStart",
    "ChargeCategory",
    "ChargeClass",
    "ChargeDescription",
    "ChargePeriodEnd",
    "ChargePeriodStart",
    "ContractedCost",
    "EffectiveCost",
    "InvoiceIssuerName",
    "ListCost",
    "PricingQuantity",
    "PricingUnit",
    "ProviderName",
    "PublisherName",
    "ServiceCategory",
    "ServiceName",
}

FOCUS_1_2_CONDITIONAL_THAT_APPLY = {
    # FOCUS 1.2, section "Columns", "Feature level: Conditional", with the
    # condition that holds for metered LLM usage priced from a public price list:
    "ConsumedQuantity",  # "when the provider supports the measurement of usage"
    "ConsumedUnit",  # same
    "ContractedUnitPrice",  # "when the provider supports negotiated pricing concepts"
    "ListUnitPrice",  # "when the provider publishes unit prices exclusive of discounts"
    "ResourceId",  # "when the provider supports billing based on provisioned resources"
    "ResourceName",  # same
    "ResourceType",  # same, "and supports assigning a type for resources"
    "SkuId",  # "when the provider publishes a SKU list"
    "SkuMeter",  # "when the provider includes a SkuId"
    "SkuPriceDetails",  # "when the provider supports unit pricing concepts and publishes
    # price lists, publicly or as part of contracting"
    "SkuPriceId",  # "when the provider ... publishes price lists"
    "SubAccountId",  # "when the provider supports a sub account construct" (tenant)
    "SubAccountName",  # same
    "Tags",  # "when the provider supports setting user or provider-defined tags"
}

FOCUS_1_2_RECOMMENDED_EMITTED = {
    # FOCUS 1.2, section "Columns", "Feature level: Recommended", that the export fills
    "ChargeFrequency",
    "InvoiceId",
    "ServiceSubcategory",
}

FOCUS_1_2_ALL = FOCUS_1_2_MANDATORY | {
    # every other column FOCUS 1.2 defines (Conditional or Recommended)
    "AvailabilityZone",
    "BillingAccountType",
    "CapacityReservationId",
    "CapacityReservationStatus",
    "ChargeFrequency",
    "CommitmentDiscountCategory",
    "CommitmentDiscountId",
    "CommitmentDiscountName",
    "CommitmentDiscountQuantity",
    "CommitmentDiscountStatus",
    "CommitmentDiscountType",
    "CommitmentDiscountUnit",
    "ConsumedQuantity",
    "ConsumedUnit",
    "ContractedUnitPrice",
    "InvoiceId",
    "ListUnitPrice",
    "PricingCategory",
    "PricingCurrency",
    "PricingCurrencyContractedUnitPrice",
    "PricingCurrencyEffectiveCost",
    "PricingCurrencyListUnitPrice",
    "RegionId",
    "RegionName",
    "ResourceId",
    "ResourceName",
    "ResourceType",
    "ServiceSubcategory",
    "SkuId",
    "SkuMeter",
    "SkuPriceDetails",
    "SkuPriceId",
    "SubAccountId",
    "SubAccountName",
    "SubAccountType",
    "Tags",
}

# FOCUS 1.2 attribute "Date/Time Format": UTC, extended ISO 8601, ending in Z
FOCUS_DATETIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")
# FOCUS 1.2 attribute "Numeric Format": integer or decimal, no exponent, no plus sign
FOCUS_NUMBER = re.compile(r"^-?\d+(\.\d+)?$")
# a Decimal column written so that a reader inferring types sees a decimal
FOCUS_DECIMAL = re.compile(r"^-?\d+\.\d+$")
DECIMAL_COLUMNS = [
    # FOCUS 1.2, section "Columns": "Data type: Decimal", of the columns the export has
    "BilledCost",
    "ConsumedQuantity",
    "ContractedCost",
    "ContractedUnitPrice",
    "EffectiveCost",
    "ListCost",
    "ListUnitPrice",
    "PricingQuantity",
]

# -- the store -------------------------------------------------------------------------------

H0 = datetime(2025, 3, 31, 22, tzinfo=UTC)  # the period spans a month boundary
H1 = H0 + timedelta(hours=1)
H2 = H0 + timedelta(hours=2)
START, END = H0, H0 + timedelta(hours=3)

PRICES = {
    # price_id: (input, cached input, cache write, output) USD per million tokens, batch discount
    "openai/gpt-4o@2024-10-02": ((2.50, 1.25, 2.50, 10.00), 0.5),
    "anthropic/claude-sonnet-4-5@2025-09-29": ((3.00, 0.30, 3.75, 15.00), 0.5),
}
SELF_HOSTED_TOKEN_USD = 2.0 / 1000  # llama-8b, hour H0: 2 USD over 1,000 tokens


def price_book(prices: dict[str, tuple[tuple[float, ...], float]] = PRICES) -> PriceBook:
    """A real PriceBook holding ``prices`` (as config entries would), nothing else."""
    entries = []
    for price_id, ((p_in, p_cached, p_write, p_out), discount) in prices.items():
        key, _, day = price_id.partition("@")
        provider, _, model = key.partition("/")
        entries.append(
            Price(
                provider,
                model,
                date.fromisoformat(day),
                p_in,
                p_out,
                p_cached,
                p_write,
                discount,
                source="config",
            )
        )
    return PriceBook(entries)


BOOK = price_book()


def _event(
    event_id: str,
    ts: datetime,
    *,
    provider: str,
    model: str,
    inp: int,
    out: int,
    cache_read: int | None = None,
    cache_write: int | None = None,
    tenant: str | None = None,
    tags: tuple[str | None, str | None, str | None] = (None, None, None),
    price_id: str | None = None,
    batch: bool = False,
    deployment: str | None = None,
    self_hosted_settled: bool = True,
    gateway: float | None = None,
    response_model: str | None = None,
    cache_hit: bool = False,
) -> dict[str, Any]:
    """One usage_events row, its costs worked out as the pricing contract says."""
    row: dict[str, Any] = {
        "event_id": event_id,
        "ts": ts,
        "provider": provider,
        "request_model": model,
        "response_model": response_model,
        "input_tokens": inp,
        "output_tokens": out,
        "cache_read_input_tokens": cache_read,
        "cache_creation_input_tokens": cache_write,
        "tenant": tenant,
        "team": tags[0],
        "app": tags[1],
        "feature": tags[2],
        "status": "ok",
        "latency_class": "batch" if batch else "interactive",
        "billing_mode": "batch" if batch else "standard",
        "deployment": deployment,
        "gateway_cost_usd": gateway,
        "price_id": price_id,
        "cache_hit": cache_hit,
    }
    costs: dict[str, Any] = dict.fromkeys(
        [
            "input_cost_usd",
            "cached_input_cost_usd",
            "cache_write_cost_usd",
            "output_cost_usd",
            "list_cost_usd",
            "discount_rate",
            "cost_usd",
        ]
    )
    if deployment is not None:
        row["price_source"] = "self_hosted"
        row["price_id"] = f"self_hosted/{deployment}"
        if self_hosted_settled:
            costs.update(
                input_cost_usd=inp * SELF_HOSTED_TOKEN_USD,
                cached_input_cost_usd=0.0,
                cache_write_cost_usd=0.0,
                output_cost_usd=out * SELF_HOSTED_TOKEN_USD,
                discount_rate=0.0,
            )
    elif price_id is not None:
        row["price_source"] = "catalog"
        (p_in, p_cached, p_write, p_out), discount = PRICES[price_id]
        uncached = max(inp - (cache_read or 0) - (cache_write or 0), 0)
        costs.update(
            input_cost_usd=uncached * p_in / 1e6,
            cached_input_cost_usd=(cache_read or 0) * p_cached / 1e6,
            cache_write_cost_usd=(cache_write or 0) * p_write / 1e6,
            output_cost_usd=out * p_out / 1e6,
            discount_rate=discount if batch else 0.0,
        )
    else:
        row["price_source"] = None
    if cache_hit:  # the gateway answered: the price is kept, the costs are 0
        row["price_source"] = "cache_hit"
        costs.update((k, 0.0) for k in costs)
    if costs["discount_rate"] is not None:
        costs["list_cost_usd"] = sum(
            costs[k]
            for k in (
                "input_cost_usd",
                "cached_input_cost_usd",
                "cache_write_cost_usd",
                "output_cost_usd",
            )
        )
        costs["cost_usd"] = costs["list_cost_usd"] * (1 - costs["discount_rate"])
    row.update(costs)
    return row


GPT = {"provider": "openai", "model": "gpt-4o", "price_id": "openai/gpt-4o@2024-10-02"}
CLAUDE = {
    "provider": "anthropic",
    "model": "claude-sonnet-4-5",
    "price_id": "anthropic/claude-sonnet-4-5@2025-09-29",
}
LLAMA = {"provider": "vllm", "model": "meta-llama/Llama-3.1-8B-Instruct"}
CX = ("cx", "support-bot", "answer")
DIGEST = ("data", "nightly-digest", 'summarise, "short"')  # needs CSV quoting

EVENTS = [
    _event(
        "e1",
        H0 + timedelta(minutes=5),
        **GPT,
        inp=1000,
        cache_read=400,
        out=200,
        tenant="acme",
        tags=CX,
        response_model="gpt-4o-2024-08-06",
    ),
    _event(
        "e2",
        H0 + timedelta(minutes=10),
        **GPT,
        inp=3000,
        cache_read=0,
        out=100,
        tenant="acme",
        tags=CX,
        response_model="gpt-4o-2024-08-06",
        gateway=0.0085,
    ),
    _event(
        "e3",
        H0 + timedelta(minutes=20),
        **GPT,
        inp=2000,
        out=500,
        tenant="acme",
        tags=CX,
        batch=True,
    ),
    _event(
        "e4",
        H1 + timedelta(minutes=1),
        **CLAUDE,
        inp=1500,
        cache_read=100,
        cache_write=300,
        out=100,
        tenant="globex",
        tags=DIGEST,
    ),
    _event(
        "e5",
        H1 + timedelta(minutes=2),
        **CLAUDE,
        inp=5000,
        cache_write=1000,
        out=700,
        tenant="globex",
        tags=DIGEST,
        batch=True,
        gateway=0.02,
    ),
    _event("e6", H2 + timedelta(minutes=3), **GPT, inp=100, out=50, tenant="acme", gateway=0.001),
    # answered from the gateway's response cache: no provider bills it; left out, counted
    _event("e12", H1 + timedelta(minutes=7), **GPT, inp=700, out=70, tenant="acme", cache_hit=True),
    # self-hosted, settled: every input token (cached ones too) at the hour's token cost
    _event(
        "e7",
        H0 + timedelta(minutes=30),
        **LLAMA,
        inp=800,
        cache_read=300,
        out=200,
        tenant="acme",
        tags=("devex", "code-assist", "complete"),
        deployment="llama-8b",
    ),
    # unpriced: left out, counted
    _event(
        "e8",
        H1 + timedelta(minutes=4),
        provider="mistral_ai",
        model="mystery-1",
        inp=10,
        out=10,
        tenant="globex",
    ),
    # self-hosted, hour not settled yet: left out, counted
    _event(
        "e9",
        H2 + timedelta(minutes=5),
        **LLAMA,
        inp=50,
        out=50,
        tenant="acme",
        deployment="qwen-7b",
        self_hosted_settled=False,
    ),
    # outside the half-open period
    _event("e10", END, **GPT, inp=999, out=999, tenant="acme"),
    _event("e11", START - timedelta(microseconds=1), **GPT, inp=999, out=999, tenant="acme"),
]

DEPLOYMENT_HOURS = [
    # deployment, hour, gpu_type, gpus, gpu_hour_usd, cost_usd, requests, tokens
    ("llama-8b", H0, "H100", 1, 2.0, 2.0, 1, 1000),  # carried by e7's tokens
    ("llama-8b", H1, "H100", 1, 2.0, 2.0, 0, 0),  # idle: exported as idle GPU hours
    ("llama-8b", H2, "H100", 2, 2.0, 4.0, 0, 0),  # idle, two GPUs
    ("llama-8b", START - timedelta(hours=1), "H100", 1, 2.0, 2.0, 0, 0),  # before the period
]
IDLE_IN_PERIOD = [h for h in DEPLOYMENT_HOURS if h[7] == 0 and START <= h[1] < END]

USAGE_SCHEMA = pa.schema(
    [
        ("event_id", pa.string()),
        ("ts", pa.timestamp("us", tz="UTC")),
        ("provider", pa.string()),
        ("request_model", pa.string()),
        ("response_model", pa.string()),
        ("input_tokens", pa.int64()),
        ("output_tokens", pa.int64()),
        ("cache_read_input_tokens", pa.int64()),
        ("cache_creation_input_tokens", pa.int64()),
        ("tenant", pa.string()),
        ("team", pa.string()),
        ("app", pa.string()),
        ("feature", pa.string()),
        ("status", pa.string()),
        ("latency_class", pa.string()),
        ("billing_mode", pa.string()),
        ("deployment", pa.string()),
        ("gateway_cost_usd", pa.float64()),
        ("input_cost_usd", pa.float64()),
        ("cached_input_cost_usd", pa.float64()),
        ("cache_write_cost_usd", pa.float64()),
        ("output_cost_usd", pa.float64()),
        ("list_cost_usd", pa.float64()),
        ("discount_rate", pa.float64()),
        ("cost_usd", pa.float64()),
        ("price_source", pa.string()),
        ("price_id", pa.string()),
        ("cache_hit", pa.bool_()),
    ]
)


def build_store(path: Path) -> Path:
    """A migrated store holding EVENTS and DEPLOYMENT_HOURS."""
    with Store(path) as store:
        con = store.cursor()
        rows = pa.Table.from_pylist(EVENTS, schema=USAGE_SCHEMA)
        con.from_arrow(rows).create_view("new_events")
        con.execute("INSERT INTO usage_events BY NAME SELECT * FROM new_events")
        con.execute("DROP VIEW new_events")
        con.executemany(
            "INSERT INTO deployment_hours VALUES (?, ?, ?, ?, ?, ?, ?, ?, current_timestamp)",
            [list(h) for h in DEPLOYMENT_HOURS],
        )
    return path


@pytest.fixture(scope="module")
def store_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_store(tmp_path_factory.mktemp("focus") / "store.duckdb")


@pytest.fixture(scope="module")
def table(store_path: Path) -> pa.Table:
    with Store(store_path, read_only=True) as store:
        return focus.focus_table(store, START, END, prices=BOOK, billing_account="acme-corp")


# -- expected values, from the inserted rows -------------------------------------------------


def _exported_events() -> list[dict[str, Any]]:
    return [
        e
        for e in EVENTS
        if START <= e["ts"] < END and e["cost_usd"] is not None and not e["cache_hit"]
    ]


def expected_by_meter() -> dict[str, dict[str, float]]:
    """Per SkuMeter: list cost, billed cost and quantity, summed event by event."""
    out: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for e in _exported_events():
        cache_read = e["cache_read_input_tokens"] or 0
        cache_write = e["cache_creation_input_tokens"] or 0
        if e["price_source"] == "self_hosted":
            meters = {
                "input tokens": (e["input_tokens"], e["input_cost_usd"]),
                "output tokens": (e["output_tokens"], e["output_cost_usd"]),
            }
        else:
            meters = {
                "input tokens": (
                    max(e["input_tokens"] - cache_read - cache_write, 0),
                    e["input_cost_usd"],
                ),
                "cached-input tokens": (cache_read, e["cached_input_cost_usd"]),
                "cache-write tokens": (cache_write, e["cache_write_cost_usd"]),
                "output tokens": (e["output_tokens"], e["output_cost_usd"]),
            }
        for meter, (qty, cost) in meters.items():
            if qty:
                out[meter]["list"] += cost
                out[meter]["billed"] += cost * (1 - e["discount_rate"])
                out[meter]["qty"] += qty
    for _, _, _, _, price, cost, _, _ in IDLE_IN_PERIOD:
        out[focus.IDLE_METER]["list"] += cost
        out[focus.IDLE_METER]["billed"] += cost
        out[focus.IDLE_METER]["qty"] += cost / price
    return out


def by_meter(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for r in rows:
        m = out[r["SkuMeter"]]
        m["list"] += float(r["ListCost"])
        m["billed"] += float(r["BilledCost"])
        m["effective"] += float(r["EffectiveCost"])
        m["qty"] += float(r["ConsumedQuantity"])
    return out


def assert_meter_totals(rows: list[dict[str, Any]]) -> None:
    got, want = by_meter(rows), expected_by_meter()
    assert set(got) == set(want)
    for meter, w in want.items():
        g = got[meter]
        assert g["list"] == pytest.approx(w["list"], rel=1e-12, abs=1e-15), meter
        assert g["billed"] == pytest.approx(w["billed"], rel=1e-12, abs=1e-15), meter
        assert g["effective"] == pytest.approx(w["billed"], rel=1e-12, abs=1e-15), meter
        assert g["qty"] == pytest.approx(w["qty"]), meter


# -- the dataset -----------------------------------------------------------------------------


def test_columns_are_focus_1_2_columns(table: pa.Table) -> None:
    names = table.column_names
    assert len(names) == len(set(names))
    standard = [n for n in names if not n.startswith("x_")]
    custom = [n for n in names if n.startswith("x_")]
    # every Mandatory column, and only columns FOCUS 1.2 defines, under their Column IDs
    assert set(standard) >= FOCUS_1_2_MANDATORY
    assert set(standard) <= FOCUS_1_2_ALL, set(standard) - FOCUS_1_2_ALL
    assert set(standard) == (
        FOCUS_1_2_MANDATORY | FOCUS_1_2_CONDITIONAL_THAT_APPLY | FOCUS_1_2_RECOMMENDED_EMITTED
    )
    # attribute "Column Handling": custom columns carry the x_ prefix; FOCUS columns
    # first, each group sorted by Column ID
    assert names == standard + custom
    assert standard == sorted(standard) and custom == sorted(custom)
    assert set(custom) == {
        "x_BatchDiscountRate",
        "x_BillingMode",
        "x_GatewayCost",
        "x_Model",
        "x_PriceDetails",
        "x_PriceId",
        "x_PriceSource",
        "x_Requests",
    }
    for name in ("BilledCost", "EffectiveCost", "ListCost", "ContractedCost", "PricingQuantity"):
        assert pa.types.is_floating(table.schema.field(name).type), name
    for name in ("ChargePeriodStart", "ChargePeriodEnd", "BillingPeriodStart", "BillingPeriodEnd"):
        assert table.schema.field(name).type == pa.timestamp("us", tz="UTC"), name


def test_meter_totals_match_the_events(table: pa.Table) -> None:
    assert_meter_totals(table.to_pylist())


def test_total_effective_cost_is_store_cost_plus_idle_hours(table: pa.Table) -> None:
    rows = table.to_pylist()
    want = sum(e["cost_usd"] for e in _exported_events()) + sum(h[5] for h in IDLE_IN_PERIOD)
    assert sum(r["EffectiveCost"] for r in rows) == pytest.approx(want, rel=1e-12)
    assert sum(r["BilledCost"] for r in rows) == pytest.approx(want, rel=1e-12)
    tokens = sum(e["input_tokens"] + e["output_tokens"] for e in _exported_events())
    token_rows = [r for r in rows if r["ConsumedUnit"] == "Tokens"]
    assert sum(r["ConsumedQuantity"] for r in token_rows) == tokens


def test_rows_are_hours_in_the_period(table: pa.Table) -> None:
    hours = set()
    for r in table.to_pylist():
        start, end = r["ChargePeriodStart"], r["ChargePeriodEnd"]
        assert start.utcoffset() == timedelta(0)
        assert (start.minute, start.second, start.microsecond) == (0, 0, 0)
        assert end - start == timedelta(hours=1)
        assert START <= start < END
        month = start.replace(day=1, hour=0)
        assert r["BillingPeriodStart"] == month
        next_month = (month + timedelta(days=32)).replace(day=1)
        assert r["BillingPeriodEnd"] == next_month
        hours.add(start)
    assert hours == {H0, H1, H2}


def test_row_values(table: pa.Table) -> None:
    rows = table.to_pylist()
    for r in rows:
        for name in FOCUS_1_2_MANDATORY - {"ChargeClass", "ChargeDescription"}:
            assert r[name] is not None, name
        assert r["ChargeCategory"] == "Usage"
        assert r["ChargeClass"] is None
        assert r["ChargeFrequency"] == "Usage-Based"
        assert r["ServiceCategory"] == "AI and Machine Learning"
        assert r["ServiceSubcategory"] == "Generative AI"
        assert r["BillingCurrency"] == "USD"
        assert r["BillingAccountId"] == r["BillingAccountName"] == "acme-corp"
        assert r["BilledCost"] == r["EffectiveCost"]
        assert r["ContractedCost"] == r["ListCost"]
        assert r["ListUnitPrice"] * r["PricingQuantity"] == pytest.approx(r["ListCost"])
        assert r["ContractedUnitPrice"] * r["PricingQuantity"] == pytest.approx(r["ContractedCost"])
        assert r["BilledCost"] == pytest.approx(r["ListCost"] * (1 - r["x_BatchDiscountRate"]))
        assert r["ConsumedQuantity"] > 0 and r["PricingQuantity"] > 0
        assert "@" not in r["SkuPriceId"] and r["SkuPriceId"].startswith(r["SkuId"] + "/")
        if r["ConsumedUnit"] == "Tokens":
            assert r["PricingUnit"] == "1000000 Tokens"
            assert r["PricingQuantity"] == pytest.approx(r["ConsumedQuantity"] / 1e6)
        else:
            assert (r["ConsumedUnit"], r["PricingUnit"], r["SkuMeter"]) == (
                "Hours",
                "Hours",
                focus.IDLE_METER,
            )
        if r["Tags"] is not None:
            assert isinstance(json.loads(r["Tags"]), dict)

    gpt = [r for r in rows if r["SkuId"] == "openai/gpt-4o"]
    assert {r["ProviderName"] for r in gpt} == {"OpenAI"}
    assert {r["ServiceName"] for r in gpt} == {"OpenAI API"}
    assert {r["ResourceId"] for r in gpt} == {"openai/gpt-4o-2024-08-06", "openai/gpt-4o"}
    assert {r["x_PriceId"] for r in gpt} == {"openai/gpt-4o@2024-10-02"}
    batch = [r for r in gpt if r["x_BillingMode"] == "batch"]
    assert batch and all(r["x_BatchDiscountRate"] == 0.5 for r in batch)
    assert all("batch discount 50% off" in r["ChargeDescription"] for r in batch)
    # e1 and e2 share hour, tenant, tags, model and price: one row per meter
    e12 = [r for r in gpt if r["x_Model"] == "gpt-4o-2024-08-06"]
    assert sorted(r["SkuMeter"] for r in e12) == [
        "cached-input tokens",
        "input tokens",
        "output tokens",
    ]
    assert {r["SkuMeter"]: r["x_Requests"] for r in e12} == {
        "cached-input tokens": 1,
        "input tokens": 2,
        "output tokens": 2,
    }
    assert json.loads(e12[0]["Tags"]) == {"team": "cx", "app": "support-bot", "feature": "answer"}
    assert e12[0]["SubAccountId"] == e12[0]["SubAccountName"] == "acme"
    # only e2 sent a gateway figure: split over its meters by list cost, it sums back
    assert sum(r["x_GatewayCost"] or 0 for r in e12) == pytest.approx(0.0085)

    idle = [r for r in rows if r["SkuMeter"] == focus.IDLE_METER]
    assert [(r["ChargePeriodStart"], r["ListCost"], r["PricingQuantity"]) for r in idle] == [
        (h[1], h[5], h[5] / h[4]) for h in IDLE_IN_PERIOD
    ]
    assert {r["ResourceId"] for r in idle} == {"llama-8b"}
    assert {r["ProviderName"] for r in idle} == {"Self-hosted"}
    self_hosted = [r for r in rows if r["x_PriceSource"] == "self_hosted"]
    assert {r["ServiceName"] for r in self_hosted} == {"Self-hosted LLM"}
    # self-hosted input counts every input token, cached ones too
    llama_input = [r for r in self_hosted if r["SkuMeter"] == "input tokens"]
    assert [r["ConsumedQuantity"] for r in llama_input] == [800]
    assert llama_input[0]["ListUnitPrice"] == pytest.approx(SELF_HOSTED_TOKEN_USD * 1e6)

    models = {r["x_Model"] for r in rows}
    assert "mystery-1" not in models  # unpriced
    assert not any(r["ResourceId"] == "qwen-7b" for r in rows)  # not settled


METER_PRICE_INDEX = {
    "input tokens": 0,
    "cached-input tokens": 1,
    "cache-write tokens": 2,
    "output tokens": 3,
}


def test_unit_prices_are_the_prices_not_cost_divided_by_quantity(table: pa.Table) -> None:
    rows = table.to_pylist()
    noisy = 0
    for r in rows:
        assert r["ContractedUnitPrice"] == r["ListUnitPrice"]  # no negotiated prices
        assert math.isclose(r["ListUnitPrice"] * r["PricingQuantity"], r["ListCost"], rel_tol=1e-9)
        if r["x_PriceSource"] == "self_hosted":
            continue
        (prices, _discount) = PRICES[r["x_PriceId"]]
        published = prices[METER_PRICE_INDEX[r["SkuMeter"]]]
        assert r["ListUnitPrice"] == published, r  # exactly, batch rows too
        assert r["x_PriceDetails"].startswith("USD per million tokens: input "), r
        noisy += r["ListCost"] / r["PricingQuantity"] != published
    # dividing the cost does not give the published price back on every row
    assert noisy > 0
    # self-hosted tokens: hour H0's 2 USD over the 1,000 tokens served, per million tokens
    tokens = [
        r for r in rows if r["x_PriceSource"] == "self_hosted" and r["ConsumedUnit"] == "Tokens"
    ]
    assert {r["ListUnitPrice"] for r in tokens} == {2.0 * 1e6 / 1000}
    assert all("over the 1000 tokens it served" in r["x_PriceDetails"] for r in tokens)
    # idle rows: the GPU-hour at its rate
    idle = [r for r in rows if r["SkuMeter"] == focus.IDLE_METER]
    assert [r["ListUnitPrice"] for r in idle] == [h[4] for h in IDLE_IN_PERIOD]
    assert focus.derived_unit_prices(table) == {}


def test_a_price_the_book_lacks_or_has_changed_is_derived_and_says_why(store_path: Path) -> None:
    # gpt-4o's input price is not what the events were priced at; claude is not in the book
    book = price_book({"openai/gpt-4o@2024-10-02": ((3.0, 1.25, 2.5, 10.0), 0.5)})
    with Store(store_path, read_only=True) as store:
        rows = focus.focus_table(store, START, END, prices=book).to_pylist()
    claude = [r for r in rows if r["SkuId"] == "anthropic/claude-sonnet-4-5"]
    gpt_input = [r for r in rows if r["SkuPriceId"] == "openai/gpt-4o/input"]
    gpt_other = [r for r in rows if r["SkuId"] == "openai/gpt-4o" and r not in gpt_input]
    assert claude and gpt_input and gpt_other
    for r in claude:
        assert r["x_PriceDetails"] == (
            "derived from the stored cost: the price book has no price "
            "anthropic/claude-sonnet-4-5@2025-09-29"
        )
    for r in gpt_input:
        assert r["x_PriceDetails"] == (
            "derived from the stored cost: the price book's 3 USD per 1000000 Tokens for "
            "openai/gpt-4o@2024-10-02 input tokens is not what its events were costed at"
        )
    for r in claude + gpt_input:
        # ListCost / PricingQuantity to 12 significant digits: the price the events had
        (prices, _discount) = PRICES[r["x_PriceId"]]
        assert r["ListUnitPrice"] == prices[METER_PRICE_INDEX[r["SkuMeter"]]]
        assert r["ContractedUnitPrice"] == r["ListUnitPrice"]
    for r in gpt_other:  # output and cached input still match: the book's prices
        assert not r["x_PriceDetails"].startswith("derived")
    table = pa.Table.from_pylist(rows, schema=focus.SCHEMA)
    assert focus.derived_unit_prices(table) == {
        "anthropic/claude-sonnet-4-5@2025-09-29": len(claude),
        "openai/gpt-4o@2024-10-02": len(gpt_input),
    }


ISSUER_SLUGS = {"OpenAI": "openai", "Anthropic": "anthropic", "Self-hosted": "self-hosted"}


def test_invoice_ids_are_one_per_account_issuer_and_month(store_path: Path) -> None:
    with Store(store_path, read_only=True) as store:
        whole = focus.focus_table(store, START, END, prices=BOOK, billing_account="acme-corp")
        april = focus.focus_table(store, H2, END, prices=BOOK, billing_account="acme-corp")
        other = focus.focus_table(store, START, END, prices=BOOK, billing_account="initech")
    rows = whole.to_pylist()
    for r in rows:
        month = r["BillingPeriodStart"].strftime("%Y-%m")
        assert r["InvoiceId"] == f"acme-corp:{ISSUER_SLUGS[r['InvoiceIssuerName']]}:{month}"
    assert {r["InvoiceId"] for r in rows} == {
        "acme-corp:openai:2025-03",
        "acme-corp:anthropic:2025-03",
        "acme-corp:self-hosted:2025-03",
        "acme-corp:openai:2025-04",
        "acme-corp:self-hosted:2025-04",
    }
    # stable: another export that holds the same charges gives them the same ids
    april_ids = [(r["SkuPriceId"], r["InvoiceId"]) for r in april.to_pylist()]
    assert april_ids == [
        (r["SkuPriceId"], r["InvoiceId"]) for r in rows if r["ChargePeriodStart"] >= H2
    ]
    # the billing account is part of it
    assert {r["InvoiceId"].split(":", 1)[0] for r in other.to_pylist()} == {"initech"}


def test_invoice_id_issuer_slug() -> None:
    con = duckdb.connect()
    sql = focus._invoice_id_sql("$issuer", "TIMESTAMP '2025-04-03 05:00:00'")
    for issuer, want in [
        ("Amazon Web Services", "a:b:amazon-web-services:2025-04"),
        ("  Mistral AI ", "a:b:mistral-ai:2025-04"),
        ("x.AI/Grok", "a:b:x-ai-grok:2025-04"),
    ]:
        row = con.execute(f"SELECT {sql}", {"account": "a:b", "issuer": issuer}).fetchone()
        assert row == (want,)


def test_sku_price_details(table: pa.Table) -> None:
    rows = table.to_pylist()
    by_price: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        assert (r["SkuPriceDetails"] is None) == (r["SkuPriceId"] is None)
        by_price[r["SkuPriceId"]].add(r["SkuPriceDetails"])
        details = json.loads(r["SkuPriceDetails"])
        # FOCUS Key-Value Format: an object of scalars; keys FOCUS-defined or x_
        assert isinstance(details, dict) and details
        for key, value in details.items():
            assert key.startswith("x_") and key[2:3].isupper(), key
            assert isinstance(value, str | int | float | bool) or value is None
        # no amounts and no dates: what stays the same for the SkuPriceId over time
        assert not any(isinstance(v, int | float) for v in details.values())
        assert r["x_PriceId"].split("@")[-1] not in r["SkuPriceDetails"]
    # one SkuPriceDetails per SkuPriceId
    assert all(len(v) == 1 for v in by_price.values()), by_price
    got = {k: json.loads(v.pop()) for k, v in by_price.items()}
    assert got["openai/gpt-4o/cached-input"] == {
        "x_TokenType": "cached input",
        "x_PricingBasis": "price list",
    }
    assert got["anthropic/claude-sonnet-4-5/cache-write"] == {
        "x_TokenType": "cache write",
        "x_PricingBasis": "price list",
    }
    assert got["self_hosted/llama-8b/output"] == {
        "x_TokenType": "output",
        "x_PricingBasis": "deployment GPU-hours",
    }
    assert got["self_hosted/llama-8b/gpu-hours-idle"] == {
        "x_PricingBasis": "deployment GPU-hours (idle)"
    }


def test_skipped_events_are_counted(store_path: Path) -> None:
    with Store(store_path, read_only=True) as store:
        skipped = focus.skipped_events(store, START, END)
    exported = _exported_events()
    assert skipped.exported_events == len(exported)
    assert skipped.cost_usd == pytest.approx(sum(e["cost_usd"] for e in exported))
    assert skipped.unpriced_events == 1
    assert skipped.unpriced_models == {"mistral_ai/mystery-1": 1}
    assert skipped.unsettled_events == 1
    assert skipped.unsettled_deployments == {"qwen-7b": 1}
    assert skipped.cache_hit_events == 1
    assert skipped.idle_hours == len(IDLE_IN_PERIOD)
    assert skipped.idle_cost_usd == pytest.approx(sum(h[5] for h in IDLE_IN_PERIOD))


def test_an_empty_period_has_no_rows(store_path: Path) -> None:
    with Store(store_path, read_only=True) as store:
        empty = focus.focus_table(
            store, END + timedelta(days=1), END + timedelta(days=2), prices=BOOK
        )
    assert empty.num_rows == 0
    assert empty.schema == focus.SCHEMA


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("2025-03-31", datetime(2025, 3, 31, tzinfo=UTC)),
        ("2025-03-31T22:00:00Z", H0),
        ("2025-04-01T00:00:00+02:00", H0),
        ("2025-03-31T22:00", H0),
    ],
)
def test_parse_bound(text: str, want: datetime) -> None:
    assert focus.parse_bound(text) == want


@pytest.mark.parametrize("text", ["yesterday", "2025-13-01", "2025-03-31T22:30:00Z", ""])
def test_parse_bound_rejects(text: str) -> None:
    with pytest.raises(focus.PeriodError):
        focus.parse_bound(text)


def test_decimal_text_never_uses_an_exponent() -> None:
    assert focus.decimal_text(2.5e-06) == "0.0000025"
    assert focus.decimal_text(1e20) == "100000000000000000000"
    assert focus.decimal_text(-0.125) == "-0.125"
    assert focus.decimal_text(3.0) == "3"
    assert focus.decimal_text(0.1 + 0.2) == "0.30000000000000004"
    with pytest.raises(ValueError):
        focus.decimal_text(math.nan)


# -- the command, end to end -----------------------------------------------------------------


@pytest.fixture
def config(tmp_path: Path, store_path: Path) -> Path:
    # no broker is needed: the Kafka settings only have to be valid
    topics = Topics("127.0.0.1:9", "usage.focus", "gpu.focus", "dlq.focus", "group.focus")
    return with_prices(write_config(tmp_path / "finopsd.toml", topics, store_path))


def with_prices(config: Path) -> Path:
    """``config`` with PRICES as [[pricing.prices]] entries, the prices BOOK holds."""
    entries = []
    for price_id, ((p_in, p_cached, p_write, p_out), discount) in PRICES.items():
        key, _, day = price_id.partition("@")
        provider, _, model = key.partition("/")
        entries.append(
            f'''
[[pricing.prices]]
provider = "{provider}"
model = "{model}"
effective_from = {day}
input_per_mtok = {p_in}
cached_input_per_mtok = {p_cached}
cache_write_per_mtok = {p_write}
output_per_mtok = {p_out}
batch_discount = {discount}
'''
        )
    config.write_text(config.read_text() + "".join(entries))
    return config


def run_export(config: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "finopsd", "export", "focus", "--config", str(config), *args],
        capture_output=True,
        text=True,
        env=clean_env(),
        cwd=cwd,
        timeout=120,
    )


def _read_csv(text: str) -> Iterator[dict[str, str]]:
    yield from csv.DictReader(io.StringIO(text, newline=""))


def test_cli_csv(config: Path, tmp_path: Path) -> None:
    period = ("--from", "2025-03-31T22:00:00Z", "--to", "2025-04-01T01:00:00Z")
    done = run_export(config, *period, "--format", "csv", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    out = tmp_path / "focus_2025-03-31T22Z_2025-04-01T01Z.csv"
    assert summary["output"] == out.name and out.exists()
    assert summary["unpriced"] == {"events": 1, "models": {"mistral_ai/mystery-1": 1}}
    assert summary["unsettled"]["events"] == 1
    assert summary["cache_hits"] == {"events": 1}
    assert summary["derived_unit_prices"] == {}  # the config's prices are the events' prices
    text = out.read_text(encoding="utf-8")
    rows = list(_read_csv(text))
    assert list(rows[0]) == list(focus.COLUMNS)
    assert len(rows) == summary["rows"]
    assert_meter_totals([{k: v for k, v in r.items()} for r in rows])
    for r in rows:
        for name in ("ChargePeriodStart", "ChargePeriodEnd", "BillingPeriodStart"):
            assert FOCUS_DATETIME.match(r[name]), r[name]
            assert r[name].endswith(":00:00Z")
        for name in DECIMAL_COLUMNS:
            assert FOCUS_NUMBER.match(r[name]), (name, r[name])
            assert FOCUS_DECIMAL.match(r[name]), (name, r[name])  # 1000.0, never 1000
        assert FOCUS_NUMBER.match(r["x_Requests"]) and "." not in r["x_Requests"]  # an integer
        assert r["ChargeClass"] == ""  # null
    quoted = [r for r in rows if r["Tags"] and "short" in r["Tags"]]
    assert quoted and json.loads(quoted[0]["Tags"])["feature"] == 'summarise, "short"'
    assert sum(float(r["EffectiveCost"]) for r in rows) == pytest.approx(
        summary["store_cost_usd"] + summary["idle_cost_usd"]
    )

    # the same to stdout: identical bytes, summary on stderr
    done = run_export(config, *period, "--format", "csv", "-o", "-", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == text
    assert json.loads(done.stderr)["rows"] == len(rows)


def test_cli_parquet(config: Path, tmp_path: Path, table: pa.Table) -> None:
    out = tmp_path / "march.parquet"
    done = run_export(
        config,
        "--from",
        "2025-03-31T22:00:00Z",
        "--to",
        "2025-04-01T01:00:00Z",
        "--format",
        "parquet",
        "--output",
        str(out),
        "--billing-account",
        "acme-corp",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "left out 1 unpriced events: mistral_ai/mystery-1 (1)" in done.stderr
    assert "left out 1 events answered from a gateway's response cache" in done.stderr
    assert "derived" not in done.stderr
    back = pq.read_table(out)
    assert back.column_names == list(focus.COLUMNS)
    assert back.schema.field("ChargePeriodStart").type == pa.timestamp("us", tz="UTC")
    assert back.equals(table)
    assert_meter_totals(back.to_pylist())


def test_cli_default_name_for_whole_days(config: Path, tmp_path: Path) -> None:
    done = run_export(
        config, "--from", "2025-03-31", "--to", "2025-04-02", "--format", "parquet", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    back = pq.read_table(tmp_path / "focus_2025-03-31_2025-04-02.parquet")
    # the whole of the two days: every priced event (e10 and e11 too), every idle hour
    priced = [e for e in EVENTS if e["cost_usd"] is not None]
    idle = [h for h in DEPLOYMENT_HOURS if h[7] == 0]
    want = sum(e["cost_usd"] for e in priced) + sum(h[5] for h in idle)
    assert focus.column_total(back, "EffectiveCost") == pytest.approx(want)


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--from", "last tuesday", "--to", "2025-04-01"], "--from"),
        (["--from", "2025-03-31", "--to", "2025-04-01T00:30:00Z"], "--to"),
        (["--from", "2025-04-01", "--to", "2025-03-31"], "--to"),
    ],
)
def test_cli_bad_period_exits_2(config: Path, tmp_path: Path, args: list[str], flag: str) -> None:
    done = run_export(config, *args, "--format", "csv", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert flag in done.stderr
    assert "Traceback" not in done.stderr
    assert not list(tmp_path.glob("focus_*"))


def test_cli_parquet_to_stdout_exits_2(config: Path, tmp_path: Path) -> None:
    done = run_export(
        config,
        "--from",
        "2025-03-31",
        "--to",
        "2025-04-01",
        "--format",
        "parquet",
        "-o",
        "-",
        cwd=tmp_path,
    )
    assert done.returncode == 2
    assert "--output -" in done.stderr


def test_cli_store_held_by_a_daemon_exits_1(tmp_path: Path) -> None:
    store_path = build_store(tmp_path / "held.duckdb")
    topics = Topics("127.0.0.1:9", "u", "g", "d", "grp")
    config = with_prices(write_config(tmp_path / "held.toml", topics, store_path))
    with Store(store_path):  # this process holds the file, as a running daemon would
        done = run_export(
            config, "--from", "2025-03-31", "--to", "2025-04-01", "--format", "csv", cwd=tmp_path
        )
    assert done.returncode == 1
    assert "held by a running finopsd" in done.stderr
    assert "Traceback" not in done.stderr


def test_cli_names_unit_prices_derived_from_the_cost(store_path: Path, tmp_path: Path) -> None:
    # no [[pricing.prices]]: the shipped catalogs have no price with the events' ids
    topics = Topics("127.0.0.1:9", "u", "g", "d", "grp")
    config = write_config(tmp_path / "bare.toml", topics, store_path)
    period = ("--from", "2025-03-31T22:00:00Z", "--to", "2025-04-01T01:00:00Z")
    done = run_export(config, *period, "--format", "csv", "-o", "out.csv", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (
        "unit prices derived from the stored cost (x_PriceDetails says why) for: "
        "anthropic/claude-sonnet-4-5@2025-09-29 (" in done.stderr
    )
    assert "openai/gpt-4o@2024-10-02 (" in done.stderr
    rows = list(_read_csv((tmp_path / "out.csv").read_text(encoding="utf-8")))
    api = [r for r in rows if r["x_PriceSource"] != "self_hosted"]
    assert api and all(
        r["x_PriceDetails"].startswith("derived from the stored cost: ") for r in api
    )
    for r in api:  # to 12 significant digits: the prices the events were costed at
        (prices, _discount) = PRICES[r["x_PriceId"]]
        assert float(r["ListUnitPrice"]) == prices[METER_PRICE_INDEX[r["SkuMeter"]]]
