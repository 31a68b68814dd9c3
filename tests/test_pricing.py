"""Pricing: every figure here is computed by hand from the prices in the test, not by the code.

API models are priced per meter from the catalog (with config overrides and
dated price changes); self-hosted deployments from GPU-hours spread over the
tokens of each hour, idle time included.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from conftest import (
    REPO_ROOT,
    DaemonSetup,
    Topics,
    clean_env,
    next_offsets,
    produce_messages,
    wait_consumed,
)

from finopsd.catalog import GenaiCatalog, genai_prices_version
from finopsd.config import ConfigError, load_settings
from finopsd.events import UsageEvent
from finopsd.ingest.decode import BatchDecoder
from finopsd.pricing import (
    COST_SCHEMA,
    Deployment,
    Price,
    PriceBook,
    PricingError,
    cost_per_million_tokens,
    load_catalog,
    settle_self_hosted,
)
from finopsd.store import Store, StoreBatch

T0 = datetime(2026, 3, 2, 10, 0, tzinfo=UTC)
WINDOW = timedelta(hours=1)

GPT = Price("openai", "gpt-4o", date(2024, 10, 2), 2.50, 10.00, 1.25, None, 0.5)
SONNET = Price("anthropic", "claude-sonnet-4-5", date(2025, 9, 29), 3.00, 15.00, 0.30, 3.75, 0.5)
MINI = Price("openai", "gpt-4o-mini", date(2024, 7, 18), 0.15, 0.60, 0.075, None, 0.5)


def event(n: int, **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "event_id": f"e{n}",
        "ts": (T0 + timedelta(seconds=n)).isoformat(),
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "gpt-4o",
        "gen_ai.usage.input_tokens": 1000,
        "gen_ai.usage.output_tokens": 100,
    }
    base.update(fields)
    return {k: v for k, v in base.items() if v is not None}


def rows_of(*events: dict[str, Any]) -> pa.Table:
    rows, rejects = BatchDecoder(UsageEvent).decode([json.dumps(e).encode() for e in events])
    assert rejects == []
    return rows


def priced(book: PriceBook, *events: dict[str, Any]) -> list[dict[str, Any]]:
    table, _stats = book.price(rows_of(*events))
    return table.to_pylist()


def close(a: float | None, b: float) -> bool:
    return a is not None and math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-15)


# -- API prices -------------------------------------------------------------------------------


def test_cached_input_is_priced_at_the_cached_rate() -> None:
    """10,000 input of which 4,000 cache reads, 1,000 output, gpt-4o at 2.50/1.25/10 per 1M."""
    (row,) = priced(
        PriceBook([GPT]),
        event(
            1,
            **{"gen_ai.usage.input_tokens": 10_000, "gen_ai.usage.cache_read.input_tokens": 4_000},
            **{"gen_ai.usage.output_tokens": 1_000},
        ),
    )
    assert close(row["input_cost_usd"], 6_000 * 2.50 / 1e6)  # 0.015
    assert close(row["cached_input_cost_usd"], 4_000 * 1.25 / 1e6)  # 0.005
    assert close(row["cache_write_cost_usd"], 0.0)
    assert close(row["output_cost_usd"], 1_000 * 10.00 / 1e6)  # 0.01
    assert close(row["list_cost_usd"], 0.03)
    assert close(row["cost_usd"], 0.03)
    assert row["discount_rate"] == 0.0
    assert row["price_source"] == "catalog"
    assert row["price_id"] == "openai/gpt-4o@2024-10-02"


def test_cache_writes_and_reads_each_at_their_own_rate() -> None:
    """Anthropic: 5,000 input = 2,000 uncached + 2,000 cache writes + 1,000 cache reads."""
    (row,) = priced(
        PriceBook([SONNET]),
        event(
            1,
            **{
                "gen_ai.provider.name": "anthropic",
                "gen_ai.request.model": "claude-sonnet-4-5",
                "gen_ai.usage.input_tokens": 5_000,
                "gen_ai.usage.cache_creation.input_tokens": 2_000,
                "gen_ai.usage.cache_read.input_tokens": 1_000,
                "gen_ai.usage.output_tokens": 500,
            },
        ),
    )
    want = {
        "input_cost_usd": 2_000 * 3.00 / 1e6,
        "cache_write_cost_usd": 2_000 * 3.75 / 1e6,
        "cached_input_cost_usd": 1_000 * 0.30 / 1e6,
        "output_cost_usd": 500 * 15.00 / 1e6,
    }
    for column, value in want.items():
        assert close(row[column], value), column
    assert close(row["cost_usd"], 0.006 + 0.0075 + 0.0003 + 0.0075)


def test_batch_api_traffic_gets_the_batch_discount() -> None:
    """gpt-4o-mini, 1M in and 1M out: list 0.75; through the batch API half that."""
    book = PriceBook([MINI])
    sync, batch, batch_class_only = priced(
        book,
        event(1, **{"gen_ai.request.model": "gpt-4o-mini"}, **_million()),
        event(2, **{"gen_ai.request.model": "gpt-4o-mini"}, **_million(), billing_mode="batch"),
        # latency-tolerant traffic sent synchronously pays the full price
        event(3, **{"gen_ai.request.model": "gpt-4o-mini"}, **_million(), latency_class="batch"),
    )
    assert close(sync["cost_usd"], 0.75) and close(sync["list_cost_usd"], 0.75)
    assert close(batch["list_cost_usd"], 0.75)
    assert batch["discount_rate"] == 0.5
    assert close(batch["cost_usd"], 0.375)
    assert close(batch_class_only["cost_usd"], 0.75)


def _million() -> dict[str, int]:
    return {"gen_ai.usage.input_tokens": 1_000_000, "gen_ai.usage.output_tokens": 1_000_000}


def test_a_price_change_applies_from_its_date_only() -> None:
    """Two prices for one model; events on either side of the change and before the first."""
    old = Price("acme", "model-x", date(2026, 1, 1), 1.0, 2.0)
    new = Price("acme", "model-x", date(2026, 1, 15), 3.0, 4.0)
    book = PriceBook([new, old])
    tokens = {
        "gen_ai.provider.name": "acme",
        "gen_ai.request.model": "model-x",
        "gen_ai.usage.input_tokens": 1_000_000,
        "gen_ai.usage.output_tokens": 1_000_000,
    }
    before, last_old, first_new, later = priced(
        book,
        event(1, ts="2025-12-31T23:59:59Z", **tokens),
        event(2, ts="2026-01-14T23:59:59.999999Z", **tokens),
        event(3, ts="2026-01-15T00:00:00Z", **tokens),
        event(4, ts="2026-02-01T09:00:00+02:00", **tokens),
    )
    assert before["cost_usd"] is None and before["price_source"] is None  # no price yet
    assert close(last_old["cost_usd"], 1.0 + 2.0)
    assert last_old["price_id"] == "acme/model-x@2026-01-01"
    assert close(first_new["cost_usd"], 3.0 + 4.0)
    assert close(later["cost_usd"], 3.0 + 4.0)
    assert later["price_id"] == "acme/model-x@2026-01-15"


def test_a_period_total_across_a_price_change() -> None:
    """A month's spend with the change mid-month equals the sum of its two halves."""
    old = Price("acme", "model-x", date(2026, 1, 1), 1.0, 2.0)
    new = Price("acme", "model-x", date(2026, 1, 15), 3.0, 4.0)
    events = [
        event(
            day,
            ts=f"2026-01-{day:02d}T12:00:00Z",
            **{
                "gen_ai.provider.name": "acme",
                "gen_ai.request.model": "model-x",
                "gen_ai.usage.input_tokens": 1_000 * day,
                "gen_ai.usage.output_tokens": 100 * day,
            },
        )
        for day in range(1, 32)
    ]
    total = sum(r["cost_usd"] for r in priced(PriceBook([old, new]), *events))
    want = sum(
        (1_000 * d * (1.0 if d < 15 else 3.0) + 100 * d * (2.0 if d < 15 else 4.0)) / 1e6
        for d in range(1, 32)
    )
    assert math.isclose(total, want, rel_tol=1e-12)


def test_explicit_prices_match_their_exact_name_only() -> None:
    """Config and CSV entries match by name (and ``provider/model``); never by prefix."""
    book = PriceBook([GPT, MINI, SONNET])
    assert book.resolve("openai", "gpt-4o", "gpt-4o") == "openai/gpt-4o"
    assert book.resolve("openai", None, "openai/gpt-4o-mini") == "openai/gpt-4o-mini"
    assert book.resolve(None, "claude-sonnet-4-5", None) == "anthropic/claude-sonnet-4-5"
    assert book.resolve("openai", "gpt-4o-mini-2024-07-18", None) is None
    assert book.resolve("openai", "gpt-4omni", None) is None
    assert book.resolve("azure", "gpt-4o", None) is None  # another provider's price is not ours


GENAI = GenaiCatalog()


def test_catalog_resolves_dated_snapshots_by_the_providers_rules() -> None:
    """genai-prices' matching: a dated snapshot is its model, not the longest prefix."""
    book = PriceBook(genai=GENAI)
    assert book.resolve("openai", "gpt-4o-2024-08-06", None) == "openai/gpt-4o"
    assert book.resolve("openai", "gpt-4o-mini-2024-07-18", None) == "openai/gpt-4o-mini"
    # a prefix match would bill these as o3 (1.8x) and gpt-5
    assert book.resolve("openai", "o3-mini-2025-01-31", None) == "openai/o3-mini"
    assert book.resolve(None, "gpt-5-pro", None) == "openai/gpt-5-pro"
    assert book.resolve("anthropic", "claude-sonnet-4-5-20250929", None) == (
        "anthropic/claude-sonnet-4-5"
    )
    assert book.resolve("openai", "gpt-4o-turbo-deluxe", None) is None
    assert book.resolve("acme-gateway", "gpt-4o", None) is None  # unknown provider


def test_otel_provider_names_and_gateway_prefixes_resolve() -> None:
    """OpenTelemetry's provider names and ``provider/model`` names reach the right price."""
    book = PriceBook(genai=GENAI)
    assert book.resolve("x_ai", "grok-4", None) is not None
    assert book.resolve("gcp.vertex_ai", "gemini-2.5-pro", None) == "google/gemini-2.5-pro"
    assert book.resolve("azure.ai.openai", "gpt-4o", None) == "azure/gpt-4o"
    assert book.resolve("openai", "openai/gpt-4o", None) == "openai/gpt-4o"
    assert book.resolve(None, "anthropic/claude-sonnet-4-5", None) == (
        "anthropic/claude-sonnet-4-5"
    )
    # a prefix naming another provider is not this provider's model
    assert book.resolve("openai", "anthropic/claude-sonnet-4-5", None) is None
    assert book.resolve("vllm", "meta-llama/Llama-3.1-8B-Instruct", None) is None


def test_o3_mini_is_billed_at_its_own_price() -> None:
    """1,000,000 in + 100,000 out of o3-mini at $1.10 / $4.40: $1.54 (o3 would be $2.80)."""
    book = PriceBook(genai=GENAI)
    (row,) = priced(
        book,
        event(
            1,
            **{
                "gen_ai.request.model": "o3-mini-2025-01-31",
                "gen_ai.usage.input_tokens": 1_000_000,
                "gen_ai.usage.output_tokens": 100_000,
            },
        ),
    )
    assert close(row["cost_usd"], 1.10 + 0.44)
    assert row["price_source"] == "catalog" and row["price_id"] == "openai/o3-mini@list"
    assert row["price_catalog"] == genai_prices_version()


def test_long_context_tier_prices_all_tokens_at_the_higher_rate() -> None:
    """claude-sonnet-4-5: $3/$15 up to 200k input tokens; above, $6/$22.50 for all of them."""
    book = PriceBook(genai=GENAI)
    sonnet = {"gen_ai.provider.name": "anthropic", "gen_ai.request.model": "claude-sonnet-4-5"}
    short, long = priced(
        book,
        event(1, **sonnet, **{"gen_ai.usage.input_tokens": 200_000}),
        event(2, **sonnet, **{"gen_ai.usage.input_tokens": 200_001}),
    )
    assert close(short["cost_usd"], 200_000 * 3 / 1e6 + 100 * 15 / 1e6)
    assert close(long["cost_usd"], 200_001 * 6 / 1e6 + 100 * 22.5 / 1e6)
    assert long["price_id"] == short["price_id"] + ">200000"
    assert book.unit_prices(long["price_id"]).input == 6.0  # type: ignore[union-attr]


def test_embeddings_are_priced() -> None:
    book = PriceBook(genai=GENAI)
    (row,) = priced(
        book,
        event(
            1,
            **{
                "gen_ai.request.model": "text-embedding-3-small",
                "gen_ai.usage.input_tokens": 1_000_000,
                "gen_ai.usage.output_tokens": 0,
            },
        ),
    )
    assert close(row["cost_usd"], 0.02)


def test_batch_traffic_is_billed_at_the_catalogs_batch_prices() -> None:
    """After genai-prices' batch prices start, batch events cost what genai-prices says."""
    from genai_prices import Usage, calc_price

    book = PriceBook(genai=GENAI)
    ts = datetime(2026, 11, 20, 12, tzinfo=UTC)
    sonnet = {"gen_ai.provider.name": "anthropic", "gen_ai.request.model": "claude-sonnet-4-5"}
    rows = priced(
        book,
        {**event(1, billing_mode="batch", **sonnet), "ts": ts.isoformat()},
        {
            **event(2, billing_mode="batch", **sonnet, **{"gen_ai.usage.input_tokens": 300_000}),
            "ts": ts.isoformat(),
        },
        {**event(3, **sonnet), "ts": ts.isoformat()},
    )
    for row, tokens, context in [
        (rows[0], 1000, {"processing": "batch"}),
        (rows[1], 300_000, {"processing": "batch"}),
        (rows[2], 1000, None),
    ]:
        want = calc_price(
            Usage(input_tokens=tokens, output_tokens=100),
            "claude-sonnet-4-5",
            provider_id="anthropic",
            genai_request_timestamp=ts,
            price_context=context,  # type: ignore[arg-type]
        )
        assert close(row["cost_usd"], float(want.total_price))
    assert close(rows[0]["discount_rate"], 0.5)
    assert close(rows[0]["list_cost_usd"], rows[2]["list_cost_usd"])


def test_batch_before_the_catalogs_batch_prices_takes_the_providers_discount() -> None:
    """OpenAI's Batch API took 50 % off from 2024-04-15 (finopsd/data/batch_discounts.csv)."""
    book = PriceBook(genai=GENAI)
    on = datetime(2025, 6, 1, 12, tzinfo=UTC)
    before = datetime(2024, 3, 1, 12, tzinfo=UTC)
    batch, standard, early = priced(
        book,
        {**event(1, billing_mode="batch"), "ts": on.isoformat()},
        {**event(2), "ts": on.isoformat()},
        {**event(3, billing_mode="batch"), "ts": before.isoformat()},
    )
    assert close(batch["cost_usd"], standard["cost_usd"] * 0.5)
    assert close(early["discount_rate"], 0.0)  # no batch API yet: list price


def test_a_response_cache_hit_costs_nothing_but_keeps_its_price() -> None:
    book = PriceBook(genai=GENAI)
    rows = rows_of(event(1, cache_hit=True), event(2))  # UsageEvent.cache_hit, decoded
    hit, miss = book.price(rows)[0].to_pylist()
    assert hit["cost_usd"] == 0 and hit["list_cost_usd"] == 0
    assert hit["price_source"] == "cache_hit" and hit["price_id"] == miss["price_id"]
    assert miss["cost_usd"] > 0 and miss["price_source"] == "catalog"


def test_off_peak_prices_follow_the_utc_time_of_day() -> None:
    """deepseek-chat: standard 00:30-16:30 UTC, the off-peak price outside it."""
    book = PriceBook(genai=GENAI)
    key = book.resolve("deepseek", "deepseek-chat", None)
    assert key is not None
    pricing = book.pricing(key)
    assert pricing is not None
    day = datetime(2026, 3, 2, tzinfo=UTC)
    peak = pricing.rule_at(day.replace(hour=10))
    off = pricing.rule_at(day.replace(hour=20))
    assert peak is not None and off is not None and peak != off
    deepseek = {"gen_ai.provider.name": "deepseek", "gen_ai.request.model": "deepseek-chat"}
    a, b = priced(
        book,
        {**event(1, **deepseek), "ts": day.replace(hour=10).isoformat()},
        {**event(2, **deepseek), "ts": day.replace(hour=20).isoformat()},
    )
    assert close(a["input_cost_usd"], 1000 * peak.tiers[0].list.input / 1e6)
    assert close(b["input_cost_usd"], 1000 * off.tiers[0].list.input / 1e6)
    assert a["price_id"] != b["price_id"]


def test_prices_follow_the_events_time_in_the_catalog() -> None:
    """Each event gets the price genai-prices itself computes at its ts (tiers, dates, time)."""
    from genai_prices import Usage, calc_price

    book = PriceBook(genai=GENAI)
    models = [
        ("openai", "gpt-4o"),
        ("openai", "o3-mini"),
        ("anthropic", "claude-sonnet-4-5"),
        ("anthropic", "claude-opus-4-1"),
        ("google", "gemini-2.5-pro"),
        ("deepseek", "deepseek-chat"),
    ]
    events = []
    for i, (provider, model) in enumerate(models * 20):
        ts = datetime(2024, 1, 1, tzinfo=UTC) + timedelta(hours=97 * i + i % 24)
        events.append(
            {
                **event(
                    i,
                    **{
                        "gen_ai.provider.name": provider,
                        "gen_ai.request.model": model,
                        "gen_ai.usage.input_tokens": 1000 + 23_000 * i,
                        "gen_ai.usage.output_tokens": 500,
                        "gen_ai.usage.cache_read.input_tokens": 100,
                    },
                ),
                "ts": ts.isoformat(),
            }
        )
    rows = priced(book, *events)
    for e, row in zip(events, rows, strict=True):
        usage = Usage(
            input_tokens=e["gen_ai.usage.input_tokens"], output_tokens=500, cache_read_tokens=100
        )
        want = calc_price(
            usage,
            e["gen_ai.request.model"],
            provider_id=e["gen_ai.provider.name"],
            genai_request_timestamp=datetime.fromisoformat(e["ts"]),
        )
        assert close(row["cost_usd"], float(want.total_price)), (e, row)


def test_unpriced_events_are_counted_not_dropped() -> None:
    book = PriceBook([GPT])
    table, stats = book.price(
        rows_of(event(1), event(2, **{"gen_ai.request.model": "mystery-1"}), event(3))
    )
    assert table.num_rows == 3
    assert table.column("cost_usd").null_count == 1
    assert stats.unpriced == {"openai/mystery-1": 1}


def test_gateway_cost_disagreements_are_counted() -> None:
    """Ours for 1,000 in + 100 out of gpt-4o is 0.0035; the gateway says so, or not."""
    book = PriceBook([GPT])
    table, stats = book.price(
        rows_of(
            event(1, cost_usd=0.0035),
            event(2, cost_usd=0.003501),  # within 1 %
            event(3, cost_usd=0.0050),
            event(4),
        )
    )
    assert stats.disagreements == 1
    assert table.column("gateway_cost_usd").to_pylist() == [0.0035, 0.003501, 0.005, None]
    assert all(close(c, 0.0035) for c in table.column("cost_usd").to_pylist())


def test_cost_columns_have_the_documented_schema() -> None:
    table, _ = PriceBook([GPT]).price(rows_of(event(1)))
    assert table.schema.names[-len(COST_SCHEMA) :] == COST_SCHEMA.names
    empty, _ = PriceBook([GPT]).price(BatchDecoder(UsageEvent).empty())
    assert empty.num_rows == 0 and empty.schema.names[-len(COST_SCHEMA) :] == COST_SCHEMA.names


# -- the catalog and config -------------------------------------------------------------------


def test_shipped_catalog_prices_the_load_generators_api_models() -> None:
    from finopsd.ingest.loadgen import APPS

    book = PriceBook.from_settings(load_settings(None, {}).pricing)
    api = {(p, m) for app in APPS for p, m, _w in app.models if p != "vllm"}
    assert len(api) >= 3
    for provider, model in sorted(api):
        key = book.resolve(provider, model, model)
        assert key is not None and book.price_at(key, date(2026, 3, 2)) is not None, model


def test_config_overrides_the_catalog(tmp_path: Path) -> None:
    """A [[pricing.prices]] entry for the same provider, model and date replaces the catalog's."""
    config = tmp_path / "config.toml"
    config.write_text(
        "[[pricing.prices]]\nprovider = 'openai'\nmodel = 'gpt-4o'\n"
        "effective_from = 2024-10-02\ninput_per_mtok = 1.0\noutput_per_mtok = 2.0\n"
    )
    book = PriceBook.from_settings(load_settings(config, {}).pricing)
    (row,) = priced(book, event(1))
    assert close(row["cost_usd"], (1_000 * 1.0 + 100 * 2.0) / 1e6)
    assert row["price_source"] == "config"


def test_bad_catalog_rows_name_line_and_field(tmp_path: Path) -> None:
    header = "provider,model,effective_from,input_per_mtok,cached_input_per_mtok,"
    header += "cache_write_per_mtok,output_per_mtok,batch_discount,currency\n"
    bad = tmp_path / "prices.csv"
    bad.write_text(
        header + "openai,gpt-4o,2026-01-01,2.5,,,10,0.5,USD\nopenai,x,2026-13-01,1,,,1,0,USD\n"
    )
    with pytest.raises(PricingError, match=r"line 3: effective_from is not a date"):
        load_catalog(bad)
    bad.write_text(header + "openai,gpt-4o,2026-01-01,cheap,,,10,0.5,USD\n")
    with pytest.raises(PricingError, match=r"line 2: input_per_mtok is not a number: 'cheap'"):
        load_catalog(bad)
    bad.write_text("provider,model\nopenai,gpt-4o\n")
    with pytest.raises(PricingError, match="missing column"):
        load_catalog(bad)


def test_bad_pricing_config_stops_start_up_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("[[pricing.deployments]]\nname = 'llama'\ngpu_type = 'H100'\ngpus = 8\n")
    with pytest.raises(ConfigError, match=r"pricing\.gpu_hour_usd\.H100"):
        load_settings(config, {})
    config.write_text("[pricing]\ncatalog = 'missing.csv'\n")
    with pytest.raises(ConfigError, match=r"missing\.csv"):
        load_settings(config, {})
    result = subprocess.run(
        [sys.executable, "-m", "finopsd", "config", "check", "--config", str(config)],
        capture_output=True,
        text=True,
        env=clean_env(),
        cwd=REPO_ROOT,
        timeout=60,
    )
    assert result.returncode == 2
    assert "missing.csv" in result.stderr and "Traceback" not in result.stderr


# -- self-hosted ------------------------------------------------------------------------------

LLAMA = Deployment("llama-8b", "L4", gpus=2, gpu_hour_usd=2.0)  # $4 per hour


def _self_hosted(n: int, ts: datetime, tokens_in: int, tokens_out: int) -> dict[str, Any]:
    return event(
        n,
        ts=ts.isoformat(),
        deployment="llama-8b",
        **{
            "gen_ai.provider.name": "vllm",
            "gen_ai.request.model": "meta-llama/Llama-3.1-8B-Instruct",
            "gen_ai.usage.input_tokens": tokens_in,
            "gen_ai.usage.output_tokens": tokens_out,
        },
    )


def _store_with(store: Store, book: PriceBook, *events: dict[str, Any]) -> None:
    table, _ = book.price(rows_of(*events))
    store.append(
        StoreBatch(rows={"usage_events": table}, dedup={"usage_events": (("event_id",), WINDOW)})
    )


def _gpu_sample(ts: datetime) -> dict[str, Any]:
    return {
        "ts": ts,
        "host": "gpu-1",
        "gpu_index": 0,
        "utilization_pct": 3.0,
        "deployment": "llama-8b",
    }


def test_self_hosted_cost_spreads_each_hour_over_its_tokens_idle_included(tmp_path: Path) -> None:
    """2 GPUs at $2/h. Hour 10: 5,000 tokens. Hour 11: GPUs up, no requests. Hour 12: running."""
    book = PriceBook([GPT], [LLAMA])
    with Store(tmp_path / "s.duckdb") as store:
        _store_with(
            store,
            book,
            _self_hosted(1, T0 + timedelta(minutes=5), 1_000, 500),
            _self_hosted(2, T0 + timedelta(minutes=30), 2_000, 500),
            _self_hosted(3, T0 + timedelta(minutes=59), 500, 500),
            _self_hosted(4, T0 + timedelta(hours=2, minutes=1), 700, 300),
            event(5),  # an API event in the same hour is not touched
        )
        # before settling, self-hosted costs are unknown, not zero
        pending = (
            store.cursor()
            .execute(
                "SELECT count(*) FROM usage_events WHERE price_source = 'self_hosted' "
                "AND cost_usd IS NULL"
            )
            .fetchone()
        )
        assert pending == (4,)
        samples = pa.Table.from_pylist(
            [_gpu_sample(T0 + timedelta(hours=1, minutes=m)) for m in (0, 20, 40)]
        )
        con = store.cursor()
        con.register("samples", samples)
        con.execute("INSERT INTO gpu_samples BY NAME SELECT * FROM samples")
        # hour 12 is still running at 12:30: only hours 10 and 11 are settled
        until = T0 + timedelta(hours=2, minutes=30)
        hours = store.write(lambda con: settle_self_hosted(con, [LLAMA], until=until))
        assert hours == 2
        costs = dict(
            store.cursor()
            .execute("SELECT event_id, cost_usd FROM usage_events WHERE deployment = 'llama-8b'")
            .fetchall()
        )
        per_token = 4.0 / 5_000
        assert close(costs["e1"], 1_500 * per_token)  # 1.2
        assert close(costs["e2"], 2_500 * per_token)  # 2.0
        assert close(costs["e3"], 1_000 * per_token)  # 0.8
        assert costs["e4"] is None  # its hour has not ended
        hour_rows = (
            store.cursor()
            .execute("SELECT hour, cost_usd, tokens, requests FROM deployment_hours ORDER BY hour")
            .fetchall()
        )
        assert [(h, c, t, r) for h, c, t, r in hour_rows] == [
            (T0, 4.0, 5_000, 3),
            (T0 + timedelta(hours=1), 4.0, 0, 0),
        ]
        con = store.cursor()
        # the busy hour alone: $4 over 5,000 tokens; with the idle hour: $8 over the same tokens
        assert close(cost_per_million_tokens(con, "llama-8b", T0, T0 + WINDOW), 800.0)
        two_hours = cost_per_million_tokens(con, "llama-8b", T0, T0 + 2 * WINDOW)
        assert close(two_hours, 1_600.0)
        api = con.execute("SELECT cost_usd FROM usage_events WHERE event_id = 'e5'").fetchone()
        assert api is not None and close(api[0], 0.0035)


def test_late_events_reprice_a_settled_hour(tmp_path: Path) -> None:
    book = PriceBook([], [LLAMA])
    with Store(tmp_path / "s.duckdb") as store:
        _store_with(store, book, _self_hosted(1, T0 + timedelta(minutes=1), 3_000, 1_000))
        until = T0 + 2 * WINDOW
        store.write(lambda con: settle_self_hosted(con, [LLAMA], until=until))
        first = store.cursor().execute("SELECT cost_usd FROM usage_events").fetchone()
        assert first is not None and close(first[0], 4.0)  # the only request carries the hour
        _store_with(store, book, _self_hosted(2, T0 + timedelta(minutes=50), 3_000, 1_000))
        store.write(lambda con: settle_self_hosted(con, [LLAMA], until=until))
        rows = store.cursor().execute("SELECT cost_usd FROM usage_events").fetchall()
        both = [c for (c,) in rows]
        assert all(close(c, 2.0) for c in both)
        total = store.cursor().execute("SELECT sum(cost_usd) FROM deployment_hours").fetchone()
        assert total == (4.0,)


def test_hours_older_than_any_lookback_are_priced_once_their_events_arrive(
    tmp_path: Path,
) -> None:
    """A replay of last week: events ten days old are priced at the next settle, not never."""
    book = PriceBook([], [LLAMA])
    old = T0 - timedelta(days=10)
    with Store(tmp_path / "s.duckdb") as store:
        _store_with(store, book, _self_hosted(1, T0 + timedelta(minutes=1), 3_000, 1_000))
        store.write(lambda con: settle_self_hosted(con, [LLAMA], until=T0 + 2 * WINDOW))
        _store_with(
            store,
            book,
            _self_hosted(2, old + timedelta(minutes=10), 1_000, 1_000),
            _self_hosted(3, old + timedelta(minutes=20), 1_000, 1_000),
        )
        settled = store.write(lambda con: settle_self_hosted(con, [LLAMA], until=T0 + 2 * WINDOW))
        assert settled == 1  # the old hour only: the settled one has nothing new
        rows = store.cursor().execute("SELECT event_id, cost_usd FROM usage_events").fetchall()
        costs = dict(rows)
        assert close(costs["e2"], 2.0) and close(costs["e3"], 2.0)  # $4 hour over 4,000 tokens
        assert close(costs["e1"], 4.0)


def test_stats_reports_spend(tmp_path: Path) -> None:
    """`finopsd stats --json` shows priced spend and unpriced events from the store."""
    path = tmp_path / "s.duckdb"
    with Store(path) as store:
        _store_with(
            store,
            PriceBook([GPT]),
            event(1),
            event(2, **{"gen_ai.request.model": "mystery-1"}),
            event(3, cost_usd=0.01),
        )
    config = tmp_path / "config.toml"
    config.write_text(f"[store]\npath = '{path}'\n")
    result = subprocess.run(
        [sys.executable, "-m", "finopsd", "stats", "--json", "--config", str(config)],
        capture_output=True,
        text=True,
        env=clean_env(),
        cwd=REPO_ROOT,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    spend = json.loads(result.stdout)["spend"]
    assert close(spend["cost_usd"], 2 * 0.0035)
    assert spend["unpriced_events"] == 1
    assert spend["gateway_disagreements"] == 1


# -- end to end: priced at ingest, settled by the daemon ----------------------------------------


def test_daemon_prices_events_at_ingest_and_settles_self_hosted_hours(
    topics: Topics, make_config: Callable[..., DaemonSetup], daemons: Callable[..., Any]
) -> None:
    """Through Kafka: API events carry their cost when stored; completed self-hosted hours are
    priced by the time a cleanly stopped daemon exits."""
    setup = make_config("priced")
    with setup.config.open("a") as f:
        f.write(
            "\n[pricing]\nsettle_interval_s = 3600\n"
            "gpu_hour_usd = { L4 = 2.0 }\n"
            "[[pricing.deployments]]\nname = 'llama-8b'\ngpu_type = 'L4'\ngpus = 2\n"
        )
    past = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=3)
    events = [
        event(
            1,
            ts=past.isoformat(),
            **{"gen_ai.usage.input_tokens": 10_000, "gen_ai.usage.cache_read.input_tokens": 4_000},
            **{"gen_ai.usage.output_tokens": 1_000},
        ),
        event(2, ts=past.isoformat(), billing_mode="batch", cost_usd=0.5),
        _self_hosted(3, past + timedelta(minutes=10), 3_000, 1_000),
        _self_hosted(4, past + timedelta(minutes=20), 1_000, 0),
    ]
    sent = produce_messages(
        topics.bootstrap,
        topics.usage,
        [(e["event_id"].encode(), json.dumps(e).encode()) for e in events],
    )
    daemon = daemons(setup)
    daemon.start()
    daemon.wait_ready()
    wait_consumed([daemon], topics, next_offsets(sent))
    assert daemon.terminate() == 0, daemon.log_tail()
    with Store(setup.store, read_only=True) as store:
        costs = dict(
            store.cursor().execute("SELECT event_id, cost_usd FROM usage_events").fetchall()
        )
        hours = store.cursor().execute("SELECT cost_usd, tokens FROM deployment_hours").fetchall()
    assert close(costs["e1"], 6_000 * 2.5e-6 + 4_000 * 1.25e-6 + 1_000 * 10e-6)
    assert close(costs["e2"], (1_000 * 2.5e-6 + 100 * 10e-6) * 0.5)  # batch API: half price
    assert close(costs["e3"], 4_000 * 4.0 / 5_000)  # $4 for the hour over its 5,000 tokens
    assert close(costs["e4"], 1_000 * 4.0 / 5_000)
    assert hours == [(4.0, 5_000)]
