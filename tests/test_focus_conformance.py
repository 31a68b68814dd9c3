"""The FOCUS export checked against the FOCUS 1.2 requirements, on a store priced for real.

The FinOps Foundation's validator (``focus-validator`` on PyPI, 1.0.0) knows
FOCUS 0.5, 1.0-preview and 1.0 only, so the Mandatory and Conditional
requirements of FOCUS 1.2 that apply to this export are written out here, each
citing the spec's column or attribute: column presence, data types as a CSV
reader sees them, nullability, allowed values, unit prices times quantities,
Key-Value Format. ``focus_violations`` is checked to catch each kind of fault.

The store is made as the daemon makes it: wire events decoded, priced by a real
``PriceBook`` over the genai-prices catalog shipped with finopsd, appended to
a real DuckDB store, self-hosted hours settled; the export gets the same book.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from finopsd.catalog import GenaiCatalog
from finopsd.events import GpuSample, UsageEvent
from finopsd.ingest.decode import BatchDecoder
from finopsd.pricing import Deployment, PriceBook, settle_self_hosted
from finopsd.reports import focus
from finopsd.store import Store, StoreBatch

# -- FOCUS 1.2, section "Columns" ---------------------------------------------------------------

MANDATORY = {
    "BilledCost", "BillingAccountId", "BillingAccountName", "BillingCurrency",
    "BillingPeriodEnd", "BillingPeriodStart", "ChargeCategory", "ChargeClass",
    "ChargeDescription", "ChargePeriodEnd", "ChargePeriodStart", "ContractedCost",
    "EffectiveCost", "InvoiceIssuerName", "ListCost", "PricingQuantity", "PricingUnit",
    "ProviderName", "PublisherName", "ServiceCategory", "ServiceName",
}  # fmt: skip
CONDITIONAL_THAT_APPLY = {
    # the condition holds for metered LLM usage priced from public price lists
    "ConsumedQuantity", "ConsumedUnit", "ContractedUnitPrice", "ListUnitPrice",
    "ResourceId", "ResourceName", "ResourceType", "SkuId", "SkuMeter", "SkuPriceDetails",
    "SkuPriceId", "SubAccountId", "SubAccountName", "Tags",
}  # fmt: skip
RECOMMENDED = {"AvailabilityZone", "ChargeFrequency", "InvoiceId", "ServiceSubcategory"}
OTHER_CONDITIONAL = {
    "BillingAccountType", "CapacityReservationId", "CapacityReservationStatus",
    "CommitmentDiscountCategory", "CommitmentDiscountId", "CommitmentDiscountName",
    "CommitmentDiscountQuantity", "CommitmentDiscountStatus", "CommitmentDiscountType",
    "CommitmentDiscountUnit", "PricingCategory", "PricingCurrency",
    "PricingCurrencyContractedUnitPrice", "PricingCurrencyEffectiveCost",
    "PricingCurrencyListUnitPrice", "RegionId", "RegionName", "SubAccountType",
}  # fmt: skip
ALL_COLUMNS = MANDATORY | CONDITIONAL_THAT_APPLY | RECOMMENDED | OTHER_CONDITIONAL

# each column's "Data type" (String otherwise) and "Allows nulls: False"
DECIMAL = {
    "BilledCost", "ConsumedQuantity", "ContractedCost", "ContractedUnitPrice", "EffectiveCost",
    "ListCost", "ListUnitPrice", "PricingQuantity",
}  # fmt: skip
DATETIME = {"BillingPeriodEnd", "BillingPeriodStart", "ChargePeriodEnd", "ChargePeriodStart"}
JSON_KEY_VALUE = {"SkuPriceDetails", "Tags"}
NOT_NULL = {
    "BilledCost", "BillingAccountId", "BillingCurrency", "BillingPeriodEnd",
    "BillingPeriodStart", "ChargeCategory", "ChargeFrequency", "ChargePeriodEnd",
    "ChargePeriodStart", "ContractedCost", "EffectiveCost", "InvoiceIssuerName", "ListCost",
    "ProviderName", "PublisherName", "ServiceCategory", "ServiceName", "ServiceSubcategory",
}  # fmt: skip
# "MUST NOT be null when ChargeCategory is "Usage" ... and ChargeClass is not "Correction""
NOT_NULL_FOR_USAGE = {
    "ConsumedQuantity", "ConsumedUnit", "ContractedUnitPrice", "ListUnitPrice",
    "PricingQuantity", "PricingUnit", "SkuId", "SkuPriceId",
}  # fmt: skip

CHARGE_CATEGORIES = {"Usage", "Purchase", "Tax", "Credit", "Adjustment"}
CHARGE_FREQUENCIES = {"One-Time", "Recurring", "Usage-Based"}
SERVICE_CATEGORIES = {
    "AI and Machine Learning", "Analytics", "Business Applications", "Compute", "Databases",
    "Developer Tools", "Multicloud", "Identity", "Integration", "Internet of Things",
    "Management and Governance", "Media", "Migration", "Mobile", "Networking", "Security",
    "Storage", "Web", "Other",
}  # fmt: skip
AI_SUBCATEGORIES = {
    "AI Platforms", "Bots", "Generative AI", "Machine Learning", "Natural Language Processing",
    "Other (AI and Machine Learning)",
}  # fmt: skip

# attribute "Date/Time Format"
DATETIME_TEXT = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")
# attribute "Numeric Format" (no exponent is written), Decimal with its decimal point
DECIMAL_TEXT = re.compile(r"^-?\d+\.\d+$")
INTEGER_TEXT = re.compile(r"^-?\d+$")
# attribute "Unit Format": "<plural-units>" or "<quantity> <plural-units>"
UNIT_TEXT = re.compile(r"^(\d+ )?[A-Z][A-Za-z]*s$")


def _key_value(text: str) -> list[str]:
    """Faults of a Key-Value Format value (ECMA-404 object, unique keys, scalar values)."""
    pairs: list[tuple[str, Any]] = []
    try:
        value = json.loads(text, object_pairs_hook=lambda p: pairs.extend(p) or dict(p))
    except ValueError:
        return ["not JSON"]
    if not isinstance(value, dict):
        return ["not a JSON object"]
    faults = []
    if len({k for k, _ in pairs}) != len(pairs):
        faults.append("duplicate keys")
    if any(isinstance(v, dict | list) for _, v in pairs):
        faults.append("a value is an object or an array")
    return faults


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def focus_violations(header: list[str], rows: list[dict[str, str]]) -> list[str]:
    """Every FOCUS 1.2 requirement a CSV export breaks, one line each (empty: none)."""
    out: list[str] = []
    cols = set(header)
    out += [f"Mandatory column {c} missing" for c in sorted(MANDATORY - cols)]
    out += [f"Conditional column {c} missing" for c in sorted(CONDITIONAL_THAT_APPLY - cols)]
    out += [f"Recommended column {c} missing" for c in sorted({"InvoiceId"} - cols)]
    unknown = {c for c in cols if not c.startswith("x_")} - ALL_COLUMNS
    out += [f"{c} is not a FOCUS 1.2 column and has no x_ prefix" for c in sorted(unknown)]
    sku_of: dict[str, set[str]] = defaultdict(set)
    details_of: dict[str, set[str]] = defaultdict(set)
    invoice_of: dict[str, set[tuple[str, str, str]]] = defaultdict(set)
    for i, r in enumerate(rows):
        where = f"row {i + 1}"
        for c in sorted(cols & DECIMAL):
            if r[c] and not DECIMAL_TEXT.match(r[c]):
                out.append(f"{where}: {c} {r[c]!r} is not a decimal")
        for c in sorted(cols & DATETIME):
            if r[c] and not DATETIME_TEXT.match(r[c]):
                out.append(f"{where}: {c} {r[c]!r} is not a FOCUS date-time")
        for c in sorted(cols & JSON_KEY_VALUE):
            out += [f"{where}: {c}: {f}" for f in _key_value(r[c])] if r[c] else []
        for c in sorted(cols & NOT_NULL):
            if not r[c].strip():
                out.append(f"{where}: {c} is null")
        if r.get("ChargeClass") not in ("", "Correction"):
            out.append(f"{where}: ChargeClass {r['ChargeClass']!r}")
        if r.get("ChargeCategory") not in CHARGE_CATEGORIES:
            out.append(f"{where}: ChargeCategory {r.get('ChargeCategory')!r}")
        if r.get("ChargeFrequency") not in CHARGE_FREQUENCIES:
            out.append(f"{where}: ChargeFrequency {r.get('ChargeFrequency')!r}")
        if r.get("ServiceCategory") not in SERVICE_CATEGORIES:
            out.append(f"{where}: ServiceCategory {r.get('ServiceCategory')!r}")
        elif (
            r["ServiceCategory"] == "AI and Machine Learning"
            and r.get("ServiceSubcategory") not in AI_SUBCATEGORIES
        ):
            out.append(f"{where}: ServiceSubcategory {r.get('ServiceSubcategory')!r}")
        if not re.fullmatch(r"[A-Z]{3}", r.get("BillingCurrency", "")):
            out.append(f"{where}: BillingCurrency {r.get('BillingCurrency')!r}")
        for c in ("PricingUnit", "ConsumedUnit"):
            if r.get(c) and not UNIT_TEXT.match(r[c]):
                out.append(f"{where}: {c} {r[c]!r} is not in Unit Format")
        usage = r.get("ChargeCategory") == "Usage" and r.get("ChargeClass") != "Correction"
        if usage:
            out += [f"{where}: {c} is null on a usage row" for c in NOT_NULL_FOR_USAGE if not r[c]]
        if (r.get("SkuPriceDetails") or "") and not r.get("SkuPriceId"):
            out.append(f"{where}: SkuPriceDetails without a SkuPriceId")
        if "InvoiceId" in cols and usage and not r["InvoiceId"]:
            out.append(f"{where}: InvoiceId is null on a charge of a provisional invoice")
        if any(f.startswith(f"{where}:") for f in out):
            continue  # the checks below need well-formed values
        # unit prices: non-negative, and times PricingQuantity the matching cost
        quantity = float(r["PricingQuantity"]) if r["PricingQuantity"] else None
        for price, cost in (
            ("ListUnitPrice", "ListCost"),
            ("ContractedUnitPrice", "ContractedCost"),
        ):
            if r.get(price):
                if float(r[price]) < 0:
                    out.append(f"{where}: {price} is negative")
                if quantity is not None and not _close(float(r[price]) * quantity, float(r[cost])):
                    out.append(
                        f"{where}: {price} {r[price]} x PricingQuantity {r['PricingQuantity']} "
                        f"is not {cost} {r[cost]}"
                    )
        start, end = r["ChargePeriodStart"], r["ChargePeriodEnd"]
        if not (r["BillingPeriodStart"] <= start < end <= r["BillingPeriodEnd"]):
            out.append(f"{where}: charge period {start}..{end} not within its billing period")
        if r.get("SkuPriceId"):
            sku_of[r["SkuPriceId"]].add(r.get("SkuId", ""))
            details_of[r["SkuPriceId"]].add(r.get("SkuPriceDetails", ""))
        if r.get("InvoiceId"):
            key = (r["BillingAccountId"], r["InvoiceIssuerName"], r["BillingPeriodStart"])
            invoice_of[r["InvoiceId"]].add(key)
    # SkuPriceId: "MUST be associated with one and only one SkuId"
    out += [f"SkuPriceId {p} has SkuIds {sorted(s)}" for p, s in sku_of.items() if len(s) > 1]
    # SkuPriceDetails: "MUST be associated with a given SkuPriceId"
    out += [
        f"SkuPriceId {p} has SkuPriceDetails {sorted(d)}"
        for p, d in details_of.items()
        if len(d) > 1
    ]
    # InvoiceId: one invoice of one billing account, issuer and billing period
    out += [f"InvoiceId {i} spans {sorted(k)}" for i, k in invoice_of.items() if len(k) > 1]
    return out


# -- a store priced as the daemon prices it -------------------------------------------------------

H0 = datetime(2026, 3, 31, 22, tzinfo=UTC)  # the period spans a month boundary
START, END = H0, H0 + timedelta(hours=3)
LLAMA = Deployment("llama-8b", "L4", gpus=2, gpu_hour_usd=2.0)  # $4 per hour
BOOK = PriceBook([], [LLAMA], genai=GenaiCatalog())
GPT = {"gen_ai.provider.name": "openai", "gen_ai.request.model": "gpt-4o"}
SONNET = {"gen_ai.provider.name": "anthropic", "gen_ai.request.model": "claude-sonnet-4-5"}
SELF_HOSTED = {
    "gen_ai.provider.name": "vllm",
    "gen_ai.request.model": "meta-llama/Llama-3.1-8B-Instruct",
    "deployment": "llama-8b",
}


def _event(n: int, at: datetime, model: dict[str, str], inp: int, out: int, **more: Any) -> bytes:
    event = {
        "event_id": f"e{n}",
        "ts": at.isoformat(),
        **model,
        "gen_ai.usage.input_tokens": inp,
        "gen_ai.usage.output_tokens": out,
        "tenant": "acme" if n % 2 else "globex",
        "team": "cx",
        **more,
    }
    return json.dumps(event).encode()


CACHE_READ = "gen_ai.usage.cache_read.input_tokens"
CACHE_WRITE = "gen_ai.usage.cache_creation.input_tokens"
WIRE = [
    # token counts whose costs, summed and divided back, do not give the price exactly
    _event(1, H0 + timedelta(minutes=1), GPT, 1_337, 211, **{CACHE_READ: 1_024}),
    _event(2, H0 + timedelta(minutes=2), GPT, 2_917, 433, **{CACHE_READ: 512}),
    _event(3, H0 + timedelta(minutes=3), GPT, 7_001, 1_999, billing_mode="batch"),
    _event(4, H0 + timedelta(minutes=4), SONNET, 5_003, 701, **{CACHE_WRITE: 3_001}),
    _event(5, H0 + timedelta(minutes=5), SONNET, 9_007, 307, **{CACHE_READ: 8_191}),
    _event(6, H0 + timedelta(minutes=6), GPT, 999, 99, cache_hit=True),  # left out
    _event(7, H0 + timedelta(minutes=7), GPT | {"gen_ai.request.model": "no-such-model"}, 9, 9),
    _event(8, H0 + timedelta(minutes=8), SELF_HOSTED, 1_234, 567),
    _event(9, H0 + timedelta(minutes=9), SELF_HOSTED, 4_321, 765),
    _event(10, H0 + timedelta(hours=2, minutes=1), GPT, 3_333, 333),  # April
    _event(11, H0 + timedelta(hours=2, minutes=2), SELF_HOSTED, 777, 77),  # April
]
# the deployment's GPUs reported during H0 + 1h, when it served nothing: an idle hour
GPU_SAMPLES = [
    {"ts": (H0 + timedelta(hours=1, minutes=m)).isoformat(), "host": "gpu-1", "gpu_index": 0,
     "utilization_pct": 2.0, "deployment": "llama-8b"}
    for m in (0, 30)
]  # fmt: skip


def build_store(path: Path, wire: list[bytes] = WIRE) -> Path:
    usage, rejects = BatchDecoder(UsageEvent).decode(wire)
    assert rejects == []
    priced, _stats = BOOK.price(usage)
    samples, rejects = BatchDecoder(GpuSample).decode([json.dumps(s).encode() for s in GPU_SAMPLES])
    assert rejects == []
    with Store(path) as store:
        window = timedelta(hours=1)
        store.append(
            StoreBatch(
                rows={"usage_events": priced, "gpu_samples": samples},
                dedup={
                    "usage_events": (("event_id",), window),
                    "gpu_samples": (GpuSample.dedup_key, window),
                },
            )
        )
        store.write(lambda con: settle_self_hosted(con, [LLAMA], until=END))
    return path


def csv_rows(table: pa.Table) -> tuple[list[str], list[dict[str, str]]]:
    buf = io.StringIO(newline="")
    focus.write_csv(table, buf)
    reader = csv.DictReader(io.StringIO(buf.getvalue(), newline=""))
    rows = list(reader)
    assert reader.fieldnames is not None
    return list(reader.fieldnames), rows


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> pa.Table:
    path = build_store(tmp_path_factory.mktemp("conformance") / "store.duckdb")
    with Store(path, read_only=True) as store:
        return focus.focus_table(store, START, END, prices=BOOK, billing_account="acme-corp")


# -- the checks --------------------------------------------------------------------------------


def test_the_export_meets_focus_1_2(exported: pa.Table) -> None:
    header, rows = csv_rows(exported)
    assert len(rows) > 15
    meters = {r["SkuMeter"] for r in rows}
    assert meters == {
        "input tokens",
        "cached-input tokens",
        "cache-write tokens",
        "output tokens",
        focus.IDLE_METER,
    }
    assert {r["ProviderName"] for r in rows} == {"OpenAI", "Anthropic", "Self-hosted"}
    assert {r["BillingPeriodStart"] for r in rows} == {
        "2026-03-01T00:00:00Z",
        "2026-04-01T00:00:00Z",
    }
    assert focus_violations(header, rows) == []


def test_unit_prices_are_the_catalogs_published_prices(exported: pa.Table) -> None:
    """gpt-4o: 2.5 / 1.25 cached / 10 output; claude-sonnet-4-5: 3 / 0.3 / 3.75 / 15."""
    published = {
        ("openai/gpt-4o", "input tokens"): 2.5,
        ("openai/gpt-4o", "cached-input tokens"): 1.25,
        ("openai/gpt-4o", "output tokens"): 10.0,
        ("anthropic/claude-sonnet-4-5", "input tokens"): 3.0,
        ("anthropic/claude-sonnet-4-5", "cached-input tokens"): 0.3,
        ("anthropic/claude-sonnet-4-5", "cache-write tokens"): 3.75,
        ("anthropic/claude-sonnet-4-5", "output tokens"): 15.0,
    }
    _header, rows = csv_rows(exported)
    seen, noisy = set(), 0
    for r in rows:
        if r["x_PriceSource"] == "self_hosted":
            continue
        key = (r["SkuId"], r["SkuMeter"])
        seen.add(key)
        assert r["ListUnitPrice"] == r["ContractedUnitPrice"] == repr(published[key]), r
        assert r["x_PriceDetails"].startswith("USD per million tokens"), r
        assert "genai-prices" in r["x_PriceDetails"]
        noisy += float(r["ListCost"]) / float(r["PricingQuantity"]) != published[key]
    assert seen == set(published)
    assert noisy > 0  # dividing cost by quantity would not have given these
    assert focus.derived_unit_prices(exported) == {}


def test_self_hosted_unit_prices_are_each_hours_cost_per_token(exported: pa.Table) -> None:
    # hour H0: $4 over e8 + e9's 6,887 tokens; April's first hour: $4 over e11's 854 tokens
    want = {
        "2026-03-31T22:00:00Z": 4.0 * 1e6 / (1_234 + 567 + 4_321 + 765),
        "2026-04-01T00:00:00Z": 4.0 * 1e6 / (777 + 77),
    }
    _header, rows = csv_rows(exported)
    tokens = [
        r for r in rows if r["x_PriceSource"] == "self_hosted" and r["ConsumedUnit"] == "Tokens"
    ]
    assert {r["ChargePeriodStart"] for r in tokens} == set(want)
    for r in tokens:
        assert float(r["ListUnitPrice"]) == pytest.approx(want[r["ChargePeriodStart"]], rel=1e-15)
    idle = [r for r in rows if r["SkuMeter"] == focus.IDLE_METER]
    assert [(r["ChargePeriodStart"], r["ListUnitPrice"], r["PricingQuantity"]) for r in idle] == [
        ("2026-03-31T23:00:00Z", "2.0", "2.0")  # two GPUs for an hour at $2 per GPU-hour
    ]


def test_a_long_context_tier_row_gets_the_tiers_price(tmp_path: Path) -> None:
    """claude-sonnet-4-5 above 200k input tokens: $6 input, $22.50 output, for all tokens."""
    wire = [
        _event(1, H0 + timedelta(minutes=1), SONNET, 200_000, 100),
        _event(2, H0 + timedelta(minutes=2), SONNET, 250_001, 1_001),
    ]
    with Store(build_store(tmp_path / "tier.duckdb", wire), read_only=True) as store:
        table = focus.focus_table(store, START, END, prices=BOOK)
    got = {
        (r["x_PriceId"].endswith(">200000"), r["SkuMeter"]): r["ListUnitPrice"]
        for r in table.to_pylist()
        if r["SkuId"] == "anthropic/claude-sonnet-4-5"
    }
    assert got == {
        (False, "input tokens"): 3.0,
        (False, "output tokens"): 15.0,
        (True, "input tokens"): 6.0,
        (True, "output tokens"): 22.5,
    }
    assert focus.derived_unit_prices(table) == {}
    # a tier is a price of its own: one unit price per SkuPriceId
    sku_prices = {}
    for r in table.to_pylist():
        sku_prices.setdefault(r["SkuPriceId"], set()).add(r["ListUnitPrice"])
    assert all(len(v) == 1 for v in sku_prices.values()), sku_prices
    assert any(k.startswith("anthropic/claude-sonnet-4-5>200000/") for k in sku_prices)


@pytest.mark.parametrize(
    ("column", "value", "fault"),
    [
        ("ConsumedQuantity", "1000", "ConsumedQuantity '1000' is not a decimal"),
        ("ListUnitPrice", "2.5E-1", "ListUnitPrice '2.5E-1' is not a decimal"),
        ("ChargePeriodStart", "2026-03-31 22:00:00", "is not a FOCUS date-time"),
        ("SkuPriceDetails", '{"x_Tiers": [1, 2]}', "a value is an object or an array"),
        ("Tags", '{"team": "a", "team": "b"}', "duplicate keys"),
        ("ChargeFrequency", "Hourly", "ChargeFrequency 'Hourly'"),
        ("InvoiceId", "", "InvoiceId is null"),
        ("SkuPriceId", "", "SkuPriceId is null on a usage row"),
        ("ListUnitPrice", "99.0", "is not ListCost"),
    ],
)
def test_focus_violations_finds_each_fault(
    exported: pa.Table, column: str, value: str, fault: str
) -> None:
    header, rows = csv_rows(exported)
    token_row = next(i for i, r in enumerate(rows) if r["SkuMeter"] == "input tokens")
    rows[token_row][column] = value
    found = focus_violations(header, rows)
    assert any(fault in f for f in found), found


def test_focus_violations_finds_missing_and_unknown_columns(exported: pa.Table) -> None:
    header, rows = csv_rows(exported)
    header = [c for c in header if c != "InvoiceId"] + ["Margin"]
    found = focus_violations(header, rows)
    assert "Recommended column InvoiceId missing" in found
    assert "Margin is not a FOCUS 1.2 column and has no x_ prefix" in found
