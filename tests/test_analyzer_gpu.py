"""gpu: under-used, saturated and dearer-than-an-API deployments, on samples built here.

Every number asserted is worked out by hand in the test from the samples and
prices it inserts (numpy's default, linear-interpolated percentile is the p95
the analyzer documents; the data is built so that it is a value we choose).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from finopsd.analyzers.base import HOURS_PER_MONTH, Finding
from finopsd.analyzers.runner import build, run_analyzers, stored_findings
from finopsd.pricing import Deployment, Price, PriceBook, settle_self_hosted
from finopsd.store import Store

NOW = datetime(2026, 3, 31, tzinfo=UTC)
WINDOW_DAYS = 30.0
START = NOW - timedelta(days=WINDOW_DAYS)
GIB = 1024**3

API = [
    Price("openai", "gpt-4o-mini", date(2025, 1, 1), 0.15, 0.60, cached_input_per_mtok=0.075),
    Price("anthropic", "claude-haiku-4-5", date(2025, 1, 1), 1.00, 5.00),
    Price("anthropic", "claude-sonnet-4-5", date(2025, 1, 1), 3.00, 15.00),
]


def per_month(saved: float, hours: float) -> float:
    """A saving over ``hours`` of a deployment's evidence, per month (not over the window);
    under 24 hours (analyzers.min_evidence_hours) the rate is taken over 24."""
    return saved / max(hours, 24.0) * HOURS_PER_MONTH


def book(*deployments: Deployment) -> PriceBook:
    return PriceBook(API, deployments)


def hour(h: int) -> datetime:
    """The start of hour ``h`` of the test (hour 0 is 200 hours before NOW)."""
    return NOW - timedelta(hours=200) + timedelta(hours=h)


def samples(
    deployment: str,
    hours: Iterable[int],
    per_gpu: list[float],
    *,
    memory: float | None = None,
    host: str = "h1",
) -> list[dict[str, Any]]:
    """Six samples an hour per GPU; GPU g averages ``per_gpu[g]`` (samples at +-5 around it)."""
    rows = []
    for h in hours:
        for g, util in enumerate(per_gpu):
            for k in range(6):
                rows.append(
                    {
                        "ts": hour(h) + timedelta(minutes=10 * k),
                        "host": host,
                        "gpu_index": g,
                        "utilization_pct": util + (5.0 if k % 2 else -5.0) if util >= 5 else util,
                        "memory_used_bytes": None if memory is None else int(memory * 80 * GIB),
                        "memory_total_bytes": None if memory is None else 80 * GIB,
                        "deployment": deployment,
                    }
                )
    return rows


GPU_SCHEMA = pa.schema(
    [
        ("ts", pa.timestamp("us", tz="UTC")),
        ("host", pa.string()),
        ("gpu_index", pa.int64()),
        ("utilization_pct", pa.float64()),
        ("memory_used_bytes", pa.int64()),
        ("memory_total_bytes", pa.int64()),
        ("deployment", pa.string()),
    ]
)


def insert(store: Store, table: str, rows: list[dict[str, Any]], schema: pa.Schema) -> None:
    data = pa.Table.from_pylist(rows, schema=schema)

    def work(con: Any) -> None:
        con.register("new_rows", data)
        con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM new_rows")
        con.unregister("new_rows")

    store.write(work)


def insert_samples(store: Store, rows: list[dict[str, Any]]) -> None:
    insert(store, "gpu_samples", rows, GPU_SCHEMA)


EVENT_SCHEMA = pa.schema(
    [
        ("event_id", pa.string()),
        ("ts", pa.timestamp("us", tz="UTC")),
        ("provider", pa.string()),
        ("request_model", pa.string()),
        ("input_tokens", pa.int64()),
        ("output_tokens", pa.int64()),
        ("app", pa.string()),
        ("latency_ms", pa.float64()),
        ("status", pa.string()),
        ("latency_class", pa.string()),
        ("deployment", pa.string()),
        ("billing_mode", pa.string()),
    ]
)


def events(
    deployment: str,
    hours: Iterable[int],
    per_hour: int,
    *,
    input_tokens: int = 1000,
    output_tokens: int = 100,
    latency_ms: float = 1000.0,
    prefix: str = "e",
) -> list[dict[str, Any]]:
    rows = []
    for h in hours:
        for i in range(per_hour):
            rows.append(
                {
                    "event_id": f"{prefix}-{deployment}-{h}-{i}",
                    "ts": hour(h) + timedelta(minutes=i),
                    "provider": "vllm",
                    "request_model": "meta-llama/Llama-3.1-8B-Instruct",
                    "input_tokens": input_tokens,
                    "output_tokens": output_tokens,
                    "app": "bot",
                    "latency_ms": latency_ms,
                    "status": "ok",
                    "latency_class": "interactive",
                    "deployment": deployment,
                    "billing_mode": "standard",
                }
            )
    return rows


def insert_events(store: Store, rows: list[dict[str, Any]]) -> None:
    insert(store, "usage_events", rows, EVENT_SCHEMA)


def run(store: Store, prices: PriceBook, **options: Any) -> list[Finding]:
    (result,) = run_analyzers(store, prices, build({"gpu": options}, only=["gpu"]), now=NOW)
    assert result.error is None, result.error
    return sorted(result.findings, key=lambda f: (f.kind, f.id))


def by_kind(findings: list[Finding], kind: str) -> dict[str, Finding]:
    return {f.scope["deployment"]: f for f in findings if f.kind == kind}


# -- (a) under-used ---------------------------------------------------------------------------

UNDERUSED = Deployment("llama-70b", "H100", 4, 2.0)
BUSY = Deployment("busy-70b", "H100", 4, 2.0)


def underused_samples(hours: range) -> list[dict[str, Any]]:
    """llama-70b: hours 0-79 at 10 % on every GPU, 80-99 at 35 % on average (20/30/40/50)."""
    quiet = [h for h in hours if h < 80]
    peak = [h for h in hours if 80 <= h < 100]
    return [
        *samples("llama-70b", quiet, [10.0] * 4),
        *samples("llama-70b", peak, [20.0, 30.0, 40.0, 50.0]),
    ]


def test_underused_deployment_scales_down(tmp_path: Path) -> None:
    prices = book(UNDERUSED, BUSY, Deployment("idle-unseen", "H100", 8, 2.0))
    with Store(tmp_path / "s.duckdb") as store:
        insert_samples(store, underused_samples(range(100)))
        # a busy one: 60 % on every GPU for 100 hours
        insert_samples(store, samples("busy-70b", range(100), [60.0] * 4))
        # an idle deployment nobody prices: nothing to save that can be stated
        insert_samples(store, samples("unpriced", range(100), [1.0] * 2))
        findings = run(store, prices)
        under = by_kind(findings, "gpu.underused")
        assert set(under) == {"llama-70b"}
        f = under["llama-70b"]
        # hourly utilisation: 80 hours at 10, 20 at 35 -> 80 % of hours below 30 %;
        # p95 (index 0.95 x 99 = 94.05, between two 35s) = 35; needed = ceil(4 x 35 / 70) = 2
        ev = f.evidence
        assert ev["hours_sampled"] == 100
        assert ev["hours_below_threshold"] == 80
        assert ev["p95_utilization_pct"] == pytest.approx(35.0)
        assert ev["mean_utilization_pct"] == pytest.approx((80 * 10 + 20 * 35) / 100)
        assert ev["max_utilization_pct"] == pytest.approx(35.0)
        assert ev["gpus"] == 4 and ev["gpus_needed"] == 2 and ev["gpus_seen_in_samples"] == 4
        assert ev["p95_utilization_after_pct"] == pytest.approx(70.0)
        assert ev["hours_up"] == 100
        # 2 GPUs freed x $2/h in each of 100 hours up, over those 100 hours, per month
        assert f.monthly_savings_usd == pytest.approx(per_month(2 * 2.0 * 100, 100))
        assert f.monthly_savings_usd == pytest.approx(2 * 2.0 * HOURS_PER_MONTH)
        assert (f.evidence_hours, f.provisional) == (100.0, False)
        assert f.monthly_savings_low_usd == f.monthly_savings_high_usd == f.monthly_savings_usd
        assert f.action is not None
        assert f.action.actuator == "vllm.scale"
        assert f.action.params == {"deployment": "llama-70b", "gpus": 2}
        assert f.risk == "medium" and 0 < f.confidence <= 1
        assert not [x for x in findings if x.kind != "gpu.underused"]

        # same finding again: same id, updated in place
        again = run(store, prices)
        assert [x.id for x in again] == [x.id for x in findings]
        (row,) = stored_findings(store.cursor(), analyzer="gpu")
        assert row["id"] == f.id and row["times_seen"] == 2
        assert row["monthly_savings_usd"] == pytest.approx(f.monthly_savings_usd)


def test_underused_threshold_options_and_replica_size(tmp_path: Path) -> None:
    prices = book(UNDERUSED)
    with Store(tmp_path / "s.duckdb") as store:
        insert_samples(store, underused_samples(range(100)))
        # 80 % of the hours below 30 %: not under-used when 90 % must be
        assert run(store, prices, underused_hours_share=0.9) == []
        # replicas of 4 GPUs: 2 rounds up to 4 = what it has, nothing to free
        assert run(store, prices, gpu_multiple={"llama-70b": 4}) == []
        # a 50 % target: ceil(4 x 35 / 50) = 3
        (f,) = run(store, prices, target_util_pct=50.0)
        assert f.evidence["gpus_needed"] == 3
        assert f.monthly_savings_usd == pytest.approx(per_month(1 * 2.0 * 100, 100))
        # fewer hours of samples than min_hours: no judgement
        assert run(store, prices, min_hours=101) == []


def test_gpu_rollup_is_incremental(tmp_path: Path) -> None:
    """Samples arriving in two parts (one late, into an hour already rolled up) = all at once."""
    prices = book(UNDERUSED)
    rows = underused_samples(range(100))
    late = [r for r in rows if r["ts"] == hour(10) + timedelta(minutes=50) and r["gpu_index"] == 0]
    assert len(late) == 1
    first = [r for r in rows if r["ts"] < hour(60) and r is not late[0]]
    second = [r for r in rows if r["ts"] >= hour(60)]
    # the late sample is an outlier: it moves hour 10's mean
    late_row = {**late[0], "utilization_pct": 70.0}

    with Store(tmp_path / "a.duckdb") as a, Store(tmp_path / "b.duckdb") as b:
        insert_samples(a, first)
        run(a, prices)
        insert_samples(a, [*second, late_row])
        got = run(a, prices)
        insert_samples(b, [*first, *second, late_row])
        want = run(b, prices)
        assert [f.id for f in got] == [f.id for f in want]
        for f, w in zip(got, want, strict=True):  # sums in another order: float rounding
            assert {k: v for k, v in f.evidence.items() if k != "projection"} == pytest.approx(
                {k: v for k, v in w.evidence.items() if k != "projection"}
            )
            assert f.evidence["projection"] == pytest.approx(w.evidence["projection"])
            assert f.monthly_savings_usd == pytest.approx(w.monthly_savings_usd)
        query = "SELECT * FROM gpu_hourly ORDER BY deployment, hour, host, gpu_index"
        rows_a, rows_b = (s.cursor().execute(query).fetchall() for s in (a, b))
        assert len(rows_a) == len(rows_b) == 100 * 4
        for x, y in zip(rows_a, rows_b, strict=True):
            assert x[:5] == y[:5] and x[5:] == pytest.approx(y[5:])
        (f,) = got
        # hour 10 of GPU 0 is recomputed from all six of its samples, the late one included
        gpu0 = [
            r["utilization_pct"]
            for r in [*first, late_row]
            if hour(10) <= r["ts"] < hour(11) and r["gpu_index"] == 0
        ]
        assert len(gpu0) == 6 and 70.0 in gpu0
        got_util = (
            a.cursor()
            .execute(
                "SELECT utilization_sum / samples FROM gpu_hourly WHERE hour = ? AND gpu_index = 0",
                [hour(10)],
            )
            .fetchall()
        )
        assert got_util == [(pytest.approx(sum(gpu0) / 6),)]
        assert f.evidence["hours_sampled"] == 100
        assert f.evidence["mean_utilization_pct"] == pytest.approx(
            (80 * 10 + 20 * 35 + (sum(gpu0) / 6 - 10) / 4) / 100
        )


# -- (b) saturated ----------------------------------------------------------------------------


def test_saturated_deployment_suggests_a_quantised_variant(tmp_path: Path) -> None:
    mem = Deployment("qwen-32b", "H100", 4, 3.0)
    lat = Deployment("mixtral", "H100", 8, 2.5)
    cool = Deployment("cool", "H100", 4, 3.0)
    already = Deployment("qwen-32b-fp8", "H100", 4, 3.0)
    prices = book(mem, lat, cool, already)
    with Store(tmp_path / "s.duckdb") as store:
        # qwen-32b: 40 busy hours at 95 % with 95 % memory, 10 at 50 % -> p95 = 95
        insert_samples(store, samples("qwen-32b", range(40), [95.0] * 4, memory=0.95))
        insert_samples(store, samples("qwen-32b", range(40, 50), [50.0] * 4, memory=0.95))
        # mixtral: same utilisation, memory only 50 %, but latency per output token
        # doubles in the busy hours (2,000 ms vs 1,000 ms for 100 tokens)
        insert_samples(store, samples("mixtral", range(40), [95.0] * 8, memory=0.5))
        insert_samples(store, samples("mixtral", range(40, 50), [50.0] * 8, memory=0.5))
        insert_events(store, events("mixtral", range(40), 3, latency_ms=2000.0))
        insert_events(store, events("mixtral", range(40, 50), 3, latency_ms=1000.0))
        # cool: as busy, but neither memory nor latency says it is saturated
        insert_samples(store, samples("cool", range(40), [95.0] * 4, memory=0.5))
        insert_samples(store, samples("cool", range(40, 50), [50.0] * 4, memory=0.5))
        insert_events(store, events("cool", range(50), 3))
        # already quantised
        insert_samples(store, samples("qwen-32b-fp8", range(50), [95.0] * 4, memory=0.95))

        findings = run(
            store,
            prices,
            gpu_multiple={"mixtral": 2},
            quantized_variants={"qwen-32b": "Qwen/Qwen2.5-32B-Instruct-FP8"},
        )
        sat = by_kind(findings, "gpu.saturated")
        assert set(sat) == {"qwen-32b", "mixtral"}

        f = sat["qwen-32b"]
        assert f.evidence["p95_utilization_pct"] == pytest.approx(95.0)
        assert f.evidence["busy_hours"] == 40
        assert f.evidence["busy_memory_ratio"] == pytest.approx(0.95)
        assert f.evidence["signals"] == ["memory"]
        # ceil(4 / 1.6) = 3 GPUs: one freed, $3/h, 50 hours up
        assert f.evidence["gpus_needed"] == 3
        assert f.monthly_savings_usd == pytest.approx(per_month(1 * 3.0 * 50, 50))
        assert f.action is not None and f.action.actuator == "vllm.quantize"
        assert f.action.params == {
            "deployment": "qwen-32b",
            "quantization": "fp8",
            "variant": "Qwen/Qwen2.5-32B-Instruct-FP8",
            "gpus": 3,
        }
        assert "KV-cache" in f.evidence["proxy"]

        g = sat["mixtral"]
        assert g.evidence["signals"] == ["latency"]
        assert g.evidence["busy_latency_ratio"] == pytest.approx(2.0)
        assert g.evidence["busy_memory_ratio"] == pytest.approx(0.5)
        # ceil(8 / 1.6) = 5, in replicas of 2 -> 6: two freed at $2.5/h for 50 hours
        assert g.evidence["gpus_needed"] == 6
        assert g.monthly_savings_usd == pytest.approx(per_month(2 * 2.5 * 50, 50))
        assert g.action is not None and g.action.params["variant"] is None

        # a smaller capacity gain frees nothing on qwen (ceil(4 / 1.2) = 4)
        fewer = by_kind(run(store, prices, capacity_gain=1.2), "gpu.saturated")
        assert "qwen-32b" not in fewer


# -- (c) an API is cheaper --------------------------------------------------------------------


def settle(store: Store, prices: PriceBook) -> None:
    store.write(lambda con: settle_self_hosted(con, prices.deployments.values(), until=NOW))


def test_api_cheaper_than_a_half_idle_deployment(tmp_path: Path) -> None:
    small = Deployment("llama-8b", "L4", 2, 1.0)
    prices = book(small)
    with Store(tmp_path / "s.duckdb") as store:
        # 10 served hours, each 10 requests of 50,000 input + 10,000 output tokens,
        # and 2 idle hours (samples only): 12 GPU-hours x 2 GPUs x $1 = $24 for 6M tokens
        insert_events(
            store, events("llama-8b", range(10), 10, input_tokens=50_000, output_tokens=10_000)
        )
        insert_samples(store, samples("llama-8b", range(12), [40.0, 20.0]))
        settle(store, prices)
        opts = {"api_equivalents": {"llama-8b": ["openai/gpt-4o-mini", "claude-haiku-4-5"]}}
        findings = run(store, prices, **opts)
        (f,) = findings
        assert f.kind == "gpu.api_cheaper" and f.scope == {"deployment": "llama-8b"}
        ev = f.evidence
        assert ev["self_hosted_cost_usd"] == pytest.approx(24.0)
        assert ev["tokens"] == 6_000_000
        assert ev["self_hosted_usd_per_mtok"] == pytest.approx(4.0)
        # gpt-4o-mini: 5M input x $0.15 + 1M output x $0.60 = $1.35 -> $0.225 per 1M
        # claude-haiku-4-5: 5M x $1 + 1M x $5 = $10 -> $1.6667 per 1M
        assert ev["api_usd_per_mtok"] == {
            "openai/gpt-4o-mini": pytest.approx(0.225),
            "claude-haiku-4-5": pytest.approx(10 / 6),
        }
        assert ev["cheapest_api"] == "openai/gpt-4o-mini"
        assert ev["hours_settled"] == 12 and ev["idle_hours"] == 2
        assert ev["tokens_per_hour"] == pytest.approx(500_000)
        # $2 an hour / $0.225 per 1M = 8.889M tokens an hour to break even
        assert ev["break_even_tokens_per_hour"] == pytest.approx(2.0 / 0.225e-6)
        assert ev["mean_utilization_pct"] == pytest.approx(30.0)
        assert ev["break_even_utilization_pct"] == pytest.approx(30.0 * (2.0 / 0.225e-6) / 5e5)
        # 12 settled hours: provisional, the rate taken over 24 hours
        assert f.monthly_savings_usd == pytest.approx(per_month((4.0 - 0.225) * 6, 12))
        assert f.provisional and f.evidence_hours == 12.0 and f.evidence_requests == 100
        assert f.monthly_savings_high_usd == pytest.approx((4.0 - 0.225) * 6 / 12 * 730.5)
        assert f.risk == "medium"
        assert f.action is not None and f.action.actuator == "gateway.route"
        assert f.action.params == {
            "deployment": "llama-8b",
            "model": "meta-llama/Llama-3.1-8B-Instruct",
            "to_provider": "openai",
            "to_model": "gpt-4o-mini",
        }
        # the default comparison (gpt-4o-mini) finds the same, as a riskier claim
        (d,) = run(store, prices)
        assert d.id == f.id and d.risk == "high"
        assert d.monthly_savings_usd == pytest.approx(f.monthly_savings_usd)
        # against a dearer API the deployment wins: $30 / 6M = $5 per 1M > $4
        assert run(store, prices, api_equivalents={"llama-8b": ["claude-sonnet-4-5"]}) == []
        assert run(store, prices, default_api_equivalents=[]) == []
        rows = stored_findings(store.cursor(), analyzer="gpu", status="resolved")
        assert [r["id"] for r in rows] == [f.id]


def test_api_comparison_counts_cache_reads_at_the_cached_price(tmp_path: Path) -> None:
    small = Deployment("llama-8b", "L4", 1, 0.5)
    prices = book(small)
    with Store(tmp_path / "s.duckdb") as store:
        rows = events("llama-8b", range(4), 1, input_tokens=1_000_000, output_tokens=0)
        for r in rows:
            r["cache_read_input_tokens"] = 600_000
        schema = EVENT_SCHEMA.append(pa.field("cache_read_input_tokens", pa.int64()))
        insert(store, "usage_events", rows, schema)
        settle(store, prices)
        # $1.58 over 4 hours, taken over 24 (provisional): $48.09 a month
        assert run(store, prices, min_monthly_savings_usd=50.0) == []
        (f,) = run(store, prices, min_monthly_savings_usd=1.0)
        # 4M input of which 2.4M cached: 1.6 x 0.15 + 2.4 x 0.075 = $0.42 for 4M tokens
        assert f.evidence["api_usd_per_mtok"]["openai/gpt-4o-mini"] == pytest.approx(0.42 / 4)
        # self-hosted: 4 hours x $0.5 = $2 for 4M tokens = $0.5 per 1M
        assert f.evidence["self_hosted_usd_per_mtok"] == pytest.approx(0.5)
        assert f.monthly_savings_usd == pytest.approx(per_month((0.5 - 0.105) * 4, 4))


def test_no_deployments_no_findings(tmp_path: Path) -> None:
    with Store(tmp_path / "s.duckdb") as store:
        assert run(store, book()) == []
        insert_samples(store, samples("llama-70b", range(48), [5.0] * 2))
        assert run(store, book()) == []  # no price: nothing stated
        count = store.cursor().execute("SELECT count(*) FROM gpu_hourly").fetchall()
        assert count == [(48 * 2,)]


def test_bad_options_are_named() -> None:
    with pytest.raises(ValueError, match=r"analyzers\.gpu\.quantized_pattern: .*regular expr"):
        build({"gpu": {"quantized_pattern": "("}})
    with pytest.raises(ValueError, match=r"analyzers\.gpu\.gpu_multiple\.x"):
        build({"gpu": {"gpu_multiple": {"x": 0}}})
