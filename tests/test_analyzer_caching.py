"""The caching analyzer against answers computed here, independently.

Prefix reuse is checked on the real Mooncake trace (FAST'25 release,
``shared/data/mooncake_synthetic_trace.jsonl``: 3,993 requests with the hashes
of their 512-token blocks): the analyzer's unbounded and LRU prefix-cache hit
tokens must equal a plain-Python simulation written below (a set; an
``OrderedDict`` LRU), and the unbounded ratio the data README's 65.1 %. Exact
repeats and the savings are checked on small hand-built traffic whose answer
is worked out in the comments.
"""

from __future__ import annotations

import json
from collections import Counter, OrderedDict
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from finopsd.analyzers.base import DAYS_PER_MONTH, HOURS_PER_MONTH
from finopsd.analyzers.caching import Caching
from finopsd.analyzers.runner import build, run_analyzers, stored_findings
from finopsd.pricing import PriceBook
from finopsd.store import Store

DATA = Path(__file__).absolute().parents[2] / "shared" / "data"
MOONCAKE = DATA / "mooncake_synthetic_trace.jsonl"
PRICES = PriceBook.shipped()
NOW = datetime(2026, 3, 30, tzinfo=UTC)
T0 = datetime(2026, 3, 29, 20, 0, tzinfo=UTC)  # the hand-built traffic starts here
GPT4O_IN, GPT4O_CACHED, GPT4O_BATCH = 2.50, 1.25, 0.5  # the catalog's current gpt-4o price
SONNET_IN, SONNET_CACHED, SONNET_WRITE = 3.00, 0.30, 3.75  # claude-sonnet-4-5 (5-minute write)
LOOSE = {"min_requests": 1, "min_monthly_savings_usd": 0.0}


# -- helpers ---------------------------------------------------------------------------------


def insert(store: Store, rows: Iterable[dict[str, Any]], ingested: datetime) -> None:
    """Usage events (store columns; the NOT NULL ones defaulted), all ingested at ``ingested``."""
    base = {
        "provider": "openai",
        "request_model": "gpt-4o",
        "output_tokens": 10,
        "status": "ok",
        "latency_class": "interactive",
        "billing_mode": "standard",
    }
    full = [{**base, **row, "ingested_at": ingested} for row in rows]
    schema = pa.schema(
        [
            ("event_id", pa.string()),
            ("ts", pa.timestamp("us", tz="UTC")),
            ("ingested_at", pa.timestamp("us", tz="UTC")),
            ("provider", pa.string()),
            ("request_model", pa.string()),
            ("deployment", pa.string()),
            ("tenant", pa.string()),
            ("app", pa.string()),
            ("feature", pa.string()),
            ("input_tokens", pa.int64()),
            ("output_tokens", pa.int64()),
            ("cache_read_input_tokens", pa.int64()),
            ("cache_creation_input_tokens", pa.int64()),
            ("status", pa.string()),
            ("latency_class", pa.string()),
            ("billing_mode", pa.string()),
            ("prompt_hash", pa.string()),
            ("prefix_hashes", pa.list_(pa.int64())),
            ("cost_usd", pa.float64()),
        ]
    )
    table = pa.Table.from_pylist(full, schema=schema)
    con = store.cursor()
    con.from_arrow(table).create_view("test_rows")
    con.execute("INSERT INTO usage_events BY NAME SELECT * FROM test_rows")
    con.execute("DROP VIEW test_rows")


def run(
    store: Store, options: dict[str, Any] | None = None, now: datetime = NOW
) -> tuple[list[Any], Caching]:
    (analyzer,) = build({"caching": {**LOOSE, **(options or {})}}, only=["caching"])
    assert isinstance(analyzer, Caching)
    (result,) = run_analyzers(store, PRICES, [analyzer], now=now)
    assert result.error is None, result.error
    return result.findings, analyzer


def by_kind(findings: list[Any], kind: str) -> dict[str, Any]:
    return {json.dumps(f.scope, sort_keys=True): f for f in findings if f.kind == kind}


def monthly_over(amount: float, start: datetime, end: datetime = NOW) -> float:
    """``amount`` seen over traffic within [start, end], per month as the analyzers project
    it: a span under analyzers.min_evidence_hours (24) is taken as 24 hours (provisional)."""
    return amount / max((end - start) / timedelta(hours=1), 24.0) * HOURS_PER_MONTH


# -- the Mooncake trace, simulated independently ---------------------------------------------


def mooncake() -> list[dict[str, Any]]:
    if not MOONCAKE.is_file():
        pytest.fail(
            f"the Mooncake trace is missing: expected {MOONCAKE} (the shared data directory "
            "next to this checkout, see shared/data/README.md)"
        )
    return [json.loads(line) for line in MOONCAKE.read_text().splitlines() if line.strip()]


def mooncake_rows(trace: list[dict[str, Any]], first: int = 0) -> list[dict[str, Any]]:
    return [
        {
            "event_id": f"mc-{first + i:05d}",
            "ts": T0 + timedelta(milliseconds=r["timestamp"]),
            "input_tokens": r["input_length"],
            "output_tokens": r["output_length"],
            "prefix_hashes": r["hash_ids"],
        }
        for i, r in enumerate(trace, start=0)
    ]


def block_tokens(input_tokens: int, j: int, size: int = 512) -> int:
    """Tokens of block j of a request: ``size``, the last one capped at its input."""
    return max(0, min(size, input_tokens - j * size))


def simulate_unbounded(trace: list[dict[str, Any]]) -> int:
    seen: set[int] = set()
    hit = 0
    for r in trace:
        prefix = True
        for j, b in enumerate(r["hash_ids"]):
            prefix = prefix and b in seen
            if prefix:
                hit += block_tokens(r["input_length"], j)
        seen.update(r["hash_ids"])
    return hit


def simulate_lru(trace: list[dict[str, Any]], capacity: int, ttl_s: float = 0) -> int:
    """LRU hit tokens; with ``ttl_s``, a block unused for longer than that is a miss."""
    return simulate_lru_writes(trace, capacity, ttl_s)[0]


def simulate_lru_writes(
    trace: list[dict[str, Any]], capacity: int, ttl_s: float = 0
) -> tuple[int, int, int]:
    """(hit tokens, written tokens, tokens of blocks used once): a request writes the
    blocks after its hits that the trace uses more than once; a block used once is
    never written (a breakpoint after the shared part of the prompt leaves it out)."""
    uses = Counter(b for r in trace for b in r["hash_ids"])
    cache: OrderedDict[int, int] = OrderedDict()  # block -> last use, ms
    hit = written = once = 0
    for r in trace:
        t, prefix = r["timestamp"], True
        for j, b in enumerate(r["hash_ids"]):
            fresh = b in cache and (ttl_s == 0 or t - cache[b] <= ttl_s * 1000)
            prefix = prefix and fresh
            if prefix:
                hit += block_tokens(r["input_length"], j)
            elif uses[b] > 1:
                written += block_tokens(r["input_length"], j)
            else:
                once += block_tokens(r["input_length"], j)
            if b in cache:
                cache.move_to_end(b)
            cache[b] = t
            if len(cache) > capacity:
                cache.popitem(last=False)
    return hit, written, once


def prefix_evidence(findings: list[Any]) -> dict[str, Any]:
    (finding,) = [f for f in findings if f.kind == "caching.prompt_prefix"]
    assert finding.scope == {"provider": "openai", "model": "gpt-4o"}
    return finding.evidence


def test_mooncake_unbounded_prefix_reuse_is_exact_and_the_readmes(tmp_path: Path) -> None:
    trace = mooncake()
    assert len(trace) == 3993
    expected = simulate_unbounded(trace)
    input_tokens = sum(r["input_length"] for r in trace)
    with Store(tmp_path / "s.duckdb") as store:
        insert(store, mooncake_rows(trace), NOW)
        findings, _ = run(store, {"backfill_hours": 0})
        ev = prefix_evidence(findings)
    assert ev["requests"] == 3993
    assert ev["input_tokens"] == input_tokens
    assert ev["prefix_hit_tokens_unbounded"] == expected
    assert ev["prefix_hit_ratio_unbounded"] == expected / input_tokens
    assert round(100 * ev["prefix_hit_ratio_unbounded"], 1) == 65.1  # shared/data/README.md
    # the default LRU (100,000 blocks) holds all 43,924 distinct blocks: nothing is evicted,
    # but OpenAI's cache forgets a prefix unused for 5 minutes (the trace spans 17)
    lru, written, once = simulate_lru_writes(trace, 100_000, ttl_s=300)
    assert lru == simulate_lru(trace, 100_000, ttl_s=300) < expected
    assert simulate_lru(trace, 100_000) == expected
    assert ev["prefix_ttl_s"] == 300
    assert ev["prefix_hit_tokens_lru"] == lru
    assert ev["lru_write_tokens"] == written
    # every prefix token is read, written, or in a block no other request uses
    assert lru + written + once == input_tokens and 0 < once < written


@pytest.mark.parametrize(("capacity", "ttl_s"), [(2_000, 300), (20_000, 300), (20_000, 0)])
def test_mooncake_lru_prefix_reuse_is_exact(tmp_path: Path, capacity: int, ttl_s: float) -> None:
    trace = mooncake()
    expected = simulate_lru(trace, capacity, ttl_s)
    input_tokens = sum(r["input_length"] for r in trace)
    options = {"backfill_hours": 0, "lru_capacity_blocks": capacity, "prefix_ttl_s": {}}
    with Store(tmp_path / "s.duckdb") as store:
        insert(store, mooncake_rows(trace), NOW)
        findings, _ = run(store, {**options, "default_prefix_ttl_s": ttl_s})
    ev = prefix_evidence(findings)
    assert ev["prefix_hit_tokens_lru"] == expected
    assert ev["prefix_hit_ratio_lru"] == expected / input_tokens
    assert ev["lru_capacity_blocks"] == capacity
    assert expected < simulate_unbounded(trace)  # the bound bites
    # savings: hits (no cache reads were billed) x (input - cached input) of gpt-4o, per month
    saved = expected * (GPT4O_IN - GPT4O_CACHED) / 1e6
    (finding,) = [f for f in findings if f.kind == "caching.prompt_prefix"]
    assert finding.monthly_savings_usd == pytest.approx(monthly_over(saved, T0))
    assert finding.action is not None
    assert finding.action.actuator == "gateway.cache"
    assert finding.action.params["mode"] == "prompt_prefix"


def test_mooncake_incremental_equals_one_pass(tmp_path: Path) -> None:
    """The trace ingested in 7 parts, one run after each: same numbers as one run on it all.

    A fresh analyzer instance for some runs makes them reload the caches from the
    store; with 2,000 blocks the persisted LRU is also compacted along the way.
    """
    trace = mooncake()
    capacity = 2_000
    options = {"backfill_hours": 0, "lru_capacity_blocks": capacity}
    parts = [trace[i : i + 600] for i in range(0, len(trace), 600)]
    with Store(tmp_path / "s.duckdb") as store:
        analyzers = build({"caching": {**LOOSE, **options}}, only=["caching"])
        done = 0
        for n, part in enumerate(parts):
            insert(store, mooncake_rows(part, first=done), NOW + timedelta(seconds=n))
            done += len(part)
            if n in (2, 5):  # as after a restart
                analyzers = build({"caching": {**LOOSE, **options}}, only=["caching"])
            (analyzer,) = analyzers
            assert isinstance(analyzer, Caching)
            (result,) = run_analyzers(store, PRICES, analyzers, now=NOW)
            assert result.error is None, result.error
            assert analyzer.last_pass is not None
            assert analyzer.last_pass.prefix_requests == len(part)  # only the new events
            assert analyzer.last_pass.block_accesses == sum(len(r["hash_ids"]) for r in part)
        ev = prefix_evidence(result.findings)
        rows = store.cursor().execute("SELECT count(*) FROM caching_lru").fetchone()
        assert rows is not None and rows[0] <= 3 * capacity  # compacted, not grown with accesses
    assert ev["prefix_hit_tokens_unbounded"] == simulate_unbounded(trace)
    assert ev["prefix_hit_tokens_lru"] == simulate_lru(trace, capacity, ttl_s=300)
    # a block's first write is charged when it is used again, in whichever part
    assert ev["lru_write_tokens"] == simulate_lru_writes(trace, capacity, ttl_s=300)[1]
    assert ev["requests"] == len(trace)


# -- exact repeats ---------------------------------------------------------------------------


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def repeat_traffic() -> list[dict[str, Any]]:
    """acme/bot/answer on gpt-4o unless said; costs chosen so each repeat is identifiable.

    Response TTL 3600 s. Repeats (served by a response cache):
      A at 20:30 (20:00 answered, 30 min before)   $0.20
      A at 21:20 (20:30 answered, 50 min before)   $0.30  (the TTL runs from the latest answer)
      B at 20:15 (20:10 answered)                  $0.07  (20:05 failed: not an answer)
      C at 23:00 (22:00 answered, exactly 3600 s)  $0.12
    Not repeats: A at 23:00 (100 min after 21:20), B on gpt-4o-mini (another model's
    answer), A for tenant globex (another tenant), the first of each.
    acme/bot/answer: 10 requests, $0.69 of repeats, $1.86 in all.
    """
    acme = {"tenant": "acme", "app": "bot", "feature": "answer"}
    spec = [
        ("a1", 0, "A", "ok", "gpt-4o", 0.10),
        ("a2", 30, "A", "ok", "gpt-4o", 0.20),
        ("a3", 80, "A", "ok", "gpt-4o", 0.30),
        ("a4", 180, "A", "ok", "gpt-4o", 0.40),
        ("b1", 5, "B", "error", "gpt-4o", 0.05),
        ("b2", 10, "B", "ok", "gpt-4o", 0.06),
        ("b3", 15, "B", "ok", "gpt-4o", 0.07),
        ("b4", 20, "B", "ok", "gpt-4o-mini", 0.01),
        ("c1", 120, "C", "ok", "gpt-4o", 0.55),
        ("c2", 180, "C", "ok", "gpt-4o", 0.12),
    ]
    rows = [
        {
            **acme,
            "event_id": eid,
            "ts": at(minute),
            "prompt_hash": prompt,
            "status": status,
            "request_model": model,
            "input_tokens": 1000,
            "cost_usd": cost,
        }
        for eid, minute, prompt, status, model, cost in spec
    ]
    rows.append(
        {
            "tenant": "globex",
            "app": "bot",
            "feature": "answer",
            "event_id": "g1",
            "ts": at(40),
            "prompt_hash": "A",
            "input_tokens": 1000,
            "cost_usd": 0.10,
        }
    )
    return rows


def check_repeats(findings: list[Any]) -> None:
    found = by_kind(findings, "caching.response_repeats")
    scope = {"tenant": "acme", "app": "bot", "feature": "answer"}
    assert list(found) == [json.dumps(scope, sort_keys=True)]  # globex: no repeats
    (f,) = found.values()
    ev = f.evidence
    assert ev["requests"] == 10
    assert ev["repeat_requests"] == 4
    assert ev["response_hit_ratio"] == pytest.approx(0.4)
    assert ev["repeat_cost_usd"] == pytest.approx(0.69)
    assert ev["cost_usd"] == pytest.approx(1.86)
    assert f.monthly_savings_usd == pytest.approx(monthly_over(0.69, T0))
    assert f.action is not None
    assert f.action.actuator == "gateway.cache"
    assert f.action.params == {"mode": "response", "ttl_s": 3600.0, "scope": scope}


def test_exact_repeats_within_the_ttl_and_stable_ids(tmp_path: Path) -> None:
    with Store(tmp_path / "s.duckdb") as store:
        insert(store, repeat_traffic(), NOW)
        first, _ = run(store)
        check_repeats(first)
        again, _ = run(store)  # nothing new: same findings, same ids
        check_repeats(again)
        assert {f.id for f in again} == {f.id for f in first}
        stored = stored_findings(store.cursor(), analyzer="caching")
    assert {s["times_seen"] for s in stored} == {2}
    assert {s["id"] for s in stored} == {f.id for f in first}
    assert all("window" in s["evidence"] for s in stored)


def test_exact_repeats_incremental_equals_one_pass(tmp_path: Path) -> None:
    rows = repeat_traffic()
    early = [r for r in rows if r["ts"] < at(25)]
    late = [r for r in rows if r["ts"] >= at(25)]
    with Store(tmp_path / "s.duckdb") as store:
        insert(store, early, NOW - timedelta(hours=1))
        run(store)
        insert(store, late, NOW)
        findings, analyzer = run(store)
        assert analyzer.last_pass is not None
        assert analyzer.last_pass.prompt_requests == len(late)
    check_repeats(findings)


def test_a_shorter_ttl_finds_fewer_repeats(tmp_path: Path) -> None:
    """TTL 40 min: A at 21:20 (50 min after) and C at 23:00 (60 min) are no longer served."""
    with Store(tmp_path / "s.duckdb") as store:
        insert(store, repeat_traffic(), NOW)
        findings, _ = run(store, {"response_ttl_s": 2400})
    (f,) = by_kind(findings, "caching.response_repeats").values()
    assert f.evidence["repeat_requests"] == 2
    assert f.evidence["repeat_cost_usd"] == pytest.approx(0.27)
    assert f.action is not None and f.action.params["ttl_s"] == 2400


# -- prefix savings by hand ------------------------------------------------------------------


def test_api_prefix_savings_by_hand(tmp_path: Path) -> None:
    """gpt-4o: $2.50 input, $1.25 cached input, batch 50 % off.

    r1 [10, 11], 1024 tokens: no hit. r2 [10, 11], 1024 tokens of which 300 were
    already billed as cache reads: 1024 hit, 724 more to save. r3 (batch) [10, 12],
    600 tokens: block 10 (512 tokens) hits, 12 is new. r4 [10, 12, 13], 1300 tokens:
    blocks 512 + 512 hit, the last (276) is new.
    """
    rows = [
        {"event_id": "r1", "ts": at(0), "input_tokens": 1024, "prefix_hashes": [10, 11]},
        {
            "event_id": "r2",
            "ts": at(1),
            "input_tokens": 1024,
            "prefix_hashes": [10, 11],
            "cache_read_input_tokens": 300,
        },
        {
            "event_id": "r3",
            "ts": at(2),
            "input_tokens": 600,
            "prefix_hashes": [10, 12],
            "billing_mode": "batch",
        },
        {"event_id": "r4", "ts": at(3), "input_tokens": 1300, "prefix_hashes": [10, 12, 13]},
    ]
    with Store(tmp_path / "s.duckdb") as store:
        insert(store, rows, NOW)
        findings, _ = run(store)
    (f,) = by_kind(findings, "caching.prompt_prefix").values()
    ev = f.evidence
    assert ev["requests"] == 4
    assert ev["input_tokens"] == 1024 + 1024 + 600 + 1300
    assert ev["cache_read_tokens"] == 300
    assert ev["prefix_hit_tokens_unbounded"] == 1024 + 512 + 1024
    assert ev["prefix_hit_tokens_lru"] == 1024 + 512 + 1024
    assert ev["savable_tokens"] == 724 + 512 + 1024
    per_token = (GPT4O_IN - GPT4O_CACHED) / 1e6
    saved = (724 + 1024) * per_token + 512 * per_token * (1 - GPT4O_BATCH)
    assert ev["saved_usd"] == pytest.approx(saved)
    assert f.monthly_savings_usd == pytest.approx(monthly_over(saved, at(0)))


def sonnet_requests(minutes: list[float], **extra: Any) -> list[dict[str, Any]]:
    """claude-sonnet-4-5 requests of 1,224 input tokens: a shared two-block prefix
    (blocks 1, 2: 1,024 tokens) and a block of their own (200 tokens)."""
    return [
        {
            "event_id": f"s{i:02d}",
            "ts": at(m),
            "provider": "anthropic",
            "request_model": "claude-sonnet-4-5",
            "input_tokens": 1224,
            "prefix_hashes": [1, 2, 100 + i],
            **extra,
        }
        for i, m in enumerate(minutes)
    ]


def test_prefixes_reused_only_after_the_ttl_save_nothing(tmp_path: Path) -> None:
    """Every 10 minutes, the same prefix: Anthropic's cache (5 minutes) has forgotten it
    each time, so caching would only write, at 1.25x input: no finding. Without the TTL
    the same traffic would have looked like a saving."""
    rows = sonnet_requests([10 * i for i in range(10)])
    with Store(tmp_path / "s.duckdb") as store:
        insert(store, rows, NOW)
        findings, _ = run(store)
    assert by_kind(findings, "caching.prompt_prefix") == {}
    with Store(tmp_path / "lru.duckdb") as store:  # (a TTL applies to what is simulated next)
        insert(store, rows, NOW)
        lru_only, _ = run(store, {"prefix_ttl_s": {"anthropic": 0}})
    (f,) = by_kind(lru_only, "caching.prompt_prefix").values()
    assert f.evidence["prefix_hit_tokens_unbounded"] == 9 * 1024
    assert f.evidence["prefix_hit_tokens_lru"] == 9 * 1024
    hits = 9 * 1024 * (SONNET_IN - SONNET_CACHED) / 1e6
    # written: the shared prefix, once; each request's own block is used only once
    assert f.evidence["lru_write_tokens"] == 1024
    premium = 1024 * (SONNET_WRITE - SONNET_IN) / 1e6
    assert f.evidence["saved_usd"] == pytest.approx(hits - premium)
    # OpenAI's caches have no write premium, but forget just the same: no hit, no saving
    openai = [{**r, "provider": "openai", "request_model": "gpt-4o"} for r in rows]
    with Store(tmp_path / "o.duckdb") as store:
        insert(store, openai, NOW)
        findings, _ = run(store)
    assert by_kind(findings, "caching.prompt_prefix") == {}


def test_frequent_reuse_saves_net_of_the_write_premium(tmp_path: Path) -> None:
    """Requests at minutes 0, 4, 8, 12, 16, 30, 34; Anthropic TTL 5 minutes, refreshed by
    every use. 0 writes the shared prefix (1,024 tokens; its own 200-token block no
    other request uses, so a breakpoint after the prefix leaves it out); 4, 8, 12 and
    16 read the prefix (16 is 16 minutes after the first write, 4 after the last use);
    30 comes 14 minutes after 16: expired, the prefix is written again; 34 reads it.
    Hits 5 x 1,024 = 5,120; writes 2 x 1,024 = 2,048; the first request's 1,224 are
    billed as cache writes already (more than it would write): 1,024 more pay the
    premium. Saving = 5,120 x (3.00 - 0.30) - 1,024 x (3.75 - 3.00), per million:
    $0.013056."""
    rows = sonnet_requests([0, 4, 8, 12, 16, 30, 34])
    rows[0]["cache_creation_input_tokens"] = 1224
    with Store(tmp_path / "s.duckdb") as store:
        insert(store, rows, NOW)
        findings, _ = run(store)
    (f,) = by_kind(findings, "caching.prompt_prefix").values()
    assert f.scope == {"provider": "anthropic", "model": "claude-sonnet-4-5"}
    ev = f.evidence
    assert ev["prefix_ttl_s"] == 300
    assert ev["prefix_hit_tokens_unbounded"] == 6 * 1024  # no TTL: the upper bound
    assert ev["prefix_hit_tokens_lru"] == 5 * 1024
    assert ev["lru_write_tokens"] == 2048
    assert ev["cache_write_tokens"] == 1224
    assert ev["premium_write_tokens"] == 1024
    assert (ev["input_per_mtok"], ev["cached_input_per_mtok"], ev["cache_write_per_mtok"]) == (
        SONNET_IN,
        SONNET_CACHED,
        SONNET_WRITE,
    )
    hits = 5120 * (SONNET_IN - SONNET_CACHED) / 1e6
    premium = 1024 * (SONNET_WRITE - SONNET_IN) / 1e6
    assert hits - premium == pytest.approx(0.013056)
    assert ev["hit_savings_usd"] == pytest.approx(hits)
    assert ev["write_premium_usd"] == pytest.approx(premium)
    assert ev["saved_usd"] == pytest.approx(0.013056)
    assert f.monthly_savings_usd == pytest.approx(monthly_over(0.013056, at(0)))


@pytest.mark.parametrize("migration", ["caching: prefix", "caching: a cache write"])
def test_upgraded_store_simulates_prefix_caches_again(tmp_path: Path, migration: str) -> None:
    """A store simulated before TTLs and cache writes were (or before writes were charged
    only on blocks used again): its caching state is dropped, and the next run simulates
    the events again, as on a fresh store."""
    import duckdb

    from finopsd.store import MIGRATIONS

    ttl = next(i for i, (d, _) in enumerate(MIGRATIONS) if d.startswith(migration))
    path = tmp_path / "old.duckdb"
    con = duckdb.connect(str(path))
    con.execute(
        "CREATE TABLE schema_version (version INTEGER PRIMARY KEY, "
        "applied_at TIMESTAMPTZ NOT NULL, description VARCHAR NOT NULL)"
    )
    for version, (description, sql) in enumerate(MIGRATIONS[:ttl], start=1):
        con.execute(sql)
        con.execute("INSERT INTO schema_version VALUES (?, now(), ?)", [version, description])
    # what the old simulation left: LRU rows without times, a watermark past everything
    timed = migration != "caching: prefix"  # LRU rows carry their last use from then on
    con.execute(f"INSERT INTO caching_lru VALUES (1, 2, 3{', 0' if timed else ''})")
    con.execute("INSERT INTO caching_blocks VALUES (1, 2)")
    con.execute(
        "INSERT INTO rollup_state VALUES ('caching', ?), ('caching.since', ?)",
        [NOW + timedelta(days=1), T0],
    )
    con.close()
    rows = sonnet_requests([0, 4, 8, 12, 16, 30, 34])
    with Store(path) as old, Store(tmp_path / "fresh.duckdb") as fresh:
        assert old.schema_version() == len(MIGRATIONS)
        for store in (old, fresh):
            insert(store, rows, NOW)
        (upgraded,) = by_kind(run(old)[0], "caching.prompt_prefix").values()
        (scratch,) = by_kind(run(fresh)[0], "caching.prompt_prefix").values()
    assert upgraded.evidence["saved_usd"] == pytest.approx(scratch.evidence["saved_usd"])
    assert upgraded.evidence["lru_write_tokens"] == 2048


def test_lru_of_one_block_by_hand(tmp_path: Path) -> None:
    """Capacity 2: r1 [1, 2], r2 [1, 2] hits both; r3 [3, 4] evicts them; r4 [1, 2] misses."""
    rows = [
        {"event_id": f"r{i}", "ts": at(i), "input_tokens": 1024, "prefix_hashes": blocks}
        for i, blocks in enumerate([[1, 2], [1, 2], [3, 4], [1, 2]], start=1)
    ]
    with Store(tmp_path / "s.duckdb") as store:
        insert(store, rows, NOW)
        findings, _ = run(store, {"lru_capacity_blocks": 2})
    ev = prefix_evidence(findings)
    assert ev["prefix_hit_tokens_unbounded"] == 2048
    assert ev["prefix_hit_tokens_lru"] == 1024
    assert ev["prefix_hit_ratio_lru"] == 1024 / 4096


def test_self_hosted_prefix_and_repeats_priced_from_deployment_hours(tmp_path: Path) -> None:
    """llama-8b cost $8 for 80,000 tokens in the 20:00 hour: $0.0001 a token.

    Prefix hits: r2 1024, r3 512, r4 1024 = 2560 tokens; saved = 2560 x 0.0001 x 0.5
    (prefill share). r2 repeats r1's prompt 10 minutes later: a response cache
    saves its 1024 + 10 tokens = $0.1034.
    """
    base = {
        "provider": "vllm",
        "request_model": "llama",
        "deployment": "llama-8b",
        "tenant": "acme",
        "app": "bot",
        "feature": "answer",
    }
    specs = [
        ("r1", 0, [1, 2], 1024, "P"),
        ("r2", 10, [1, 2], 1024, "P"),
        ("r3", 20, [1, 3], 700, "Q"),
        ("r4", 30, [1, 3, 4], 1300, "R"),
    ]
    rows = [
        {
            **base,
            "event_id": e,
            "ts": at(m),
            "prefix_hashes": b,
            "input_tokens": n,
            "prompt_hash": p,
        }
        for e, m, b, n, p in specs
    ]
    with Store(tmp_path / "s.duckdb") as store:
        insert(store, rows, NOW)
        store.cursor().execute(
            "INSERT INTO deployment_hours VALUES ('llama-8b', ?, 'L4', 2, 4.0, 8.0, 4, 80000, ?)",
            [T0, NOW],
        )
        findings, _ = run(store)
    (prefix,) = by_kind(findings, "caching.vllm_prefix").values()
    assert prefix.scope == {"deployment": "llama-8b"}
    assert prefix.evidence["prefix_hit_tokens_lru"] == 2560
    assert prefix.evidence["saved_usd"] == pytest.approx(2560 * 1e-4 * 0.5)
    assert prefix.monthly_savings_usd == pytest.approx(monthly_over(2560 * 1e-4 * 0.5, T0))
    assert prefix.action is not None and prefix.action.actuator == "vllm.prefix_caching"
    (repeats,) = by_kind(findings, "caching.response_repeats").values()
    assert repeats.evidence["repeat_cost_usd"] == pytest.approx(1034 * 1e-4)
    assert repeats.monthly_savings_usd == pytest.approx(monthly_over(1034 * 1e-4, T0))


# -- no waste, thresholds, backfill ----------------------------------------------------------


def test_no_finding_without_reuse(tmp_path: Path) -> None:
    rows = [
        {
            "event_id": f"u{i}",
            "ts": at(i),
            "tenant": "acme",
            "app": "bot",
            "feature": "answer",
            "prompt_hash": f"p{i}",
            "prefix_hashes": [1000 + 2 * i, 1001 + 2 * i],
            "input_tokens": 1024,
            "cost_usd": 0.5,
        }
        for i in range(50)
    ]
    with Store(tmp_path / "s.duckdb") as store:
        insert(store, rows, NOW)
        findings, _ = run(store)
        assert findings == []
        assert stored_findings(store.cursor(), analyzer="caching") == []


def test_defaults_hold_back_small_findings(tmp_path: Path) -> None:
    """The hand-built repeats are 10 requests and cents: below min_requests and min savings."""
    with Store(tmp_path / "s.duckdb") as store:
        insert(store, repeat_traffic(), NOW)
        (analyzer,) = build({}, only=["caching"])
        (result,) = run_analyzers(store, PRICES, [analyzer], now=NOW)
    assert result.error is None
    assert result.findings == []


def test_seconds_of_traffic_make_a_provisional_finding(tmp_path: Path) -> None:
    """2,000 requests in 30 seconds sharing a long prompt prefix: a finding, but provisional
    (0.0083 h of traffic), never eligible for an action, and its monthly figure the saving
    seen taken as a whole day's (not 2,880 x it, as 30 s extrapolated to a month)."""
    start = NOW - timedelta(minutes=5)
    rows = [
        {
            "event_id": f"burst{i}",
            "ts": start + timedelta(milliseconds=15 * i),
            "input_tokens": 4096,
            "prefix_hashes": [11, 12, 13, 14, 15, 16, 17, 100 + i],
        }
        for i in range(2000)
    ]
    with Store(tmp_path / "s.duckdb") as store:
        insert(store, rows, NOW)
        findings, _ = run(store)
        (f,) = [x for x in findings if x.kind == "caching.prompt_prefix"]
        (row,) = stored_findings(store.cursor(), analyzer="caching")
    seen = f.evidence["saved_usd"]
    span_h = 15 * 1999 / 1000 / 3600
    assert seen > 0
    assert f.evidence_hours == pytest.approx(span_h)
    assert f.evidence_requests == 2000
    assert f.provisional and not f.eligible_for_action
    assert "(provisional: 0.0083 h of traffic)" in f.title
    assert f.monthly_savings_usd == pytest.approx(seen / 24 * HOURS_PER_MONTH)
    assert f.monthly_savings_low_usd == 0.0
    assert f.monthly_savings_high_usd == pytest.approx(seen / span_h * HOURS_PER_MONTH)
    assert row["provisional"] is True and row["eligible_for_action"] is False
    assert row["evidence_hours"] == pytest.approx(span_h)


def test_exact_repeats_count_the_whole_window_on_the_first_run(tmp_path: Path) -> None:
    """Seven days of traffic, every prompt asked twice 10 minutes apart: the first run
    (backfill_hours 6 by default, for the prefix caches) counts all 2,100 repeats of the
    week, and projects the week's repeat cost over 7 days."""
    start = NOW - timedelta(days=7, minutes=20)  # the last repeat 10 minutes before NOW
    rows = []
    for k in range(2100):
        t = start + timedelta(minutes=4.8 * k)
        for n, dt in enumerate((0, 10)):
            rows.append(
                {
                    "event_id": f"w{k}-{n}",
                    "ts": t + timedelta(minutes=dt),
                    "tenant": "acme",
                    "app": "bot",
                    "feature": "faq",
                    "prompt_hash": f"q{k}",
                    "input_tokens": 800,
                    "cost_usd": 0.01 + 0.001 * (k % 7),
                }
            )
    repeat_cost = sum(r["cost_usd"] for r in rows if r["event_id"].endswith("-1"))
    by_hand = repeat_cost / 7 * DAYS_PER_MONTH
    with Store(tmp_path / "s.duckdb") as store:
        insert(store, rows, NOW)
        findings, analyzer = run(store)
    (f,) = by_kind(findings, "caching.response_repeats").values()
    assert analyzer.last_pass is not None and analyzer.last_pass.prompt_requests == 4200
    assert f.evidence["requests"] == 4200
    assert f.evidence["repeat_requests"] == 2100
    assert f.evidence["repeat_cost_usd"] == pytest.approx(repeat_cost)
    assert f.monthly_savings_usd == pytest.approx(by_hand, rel=0.02)
    assert f.monthly_savings_low_usd <= by_hand <= f.monthly_savings_high_usd
    assert f.evidence_hours == pytest.approx(7 * 24, abs=1) and not f.provisional


def history_traffic() -> list[dict[str, Any]]:
    """Four days of mixed traffic for the first run's history: two tenants, a self-hosted
    deployment, errors, unpriced requests, requests without a prompt_hash, repeats at
    the TTL (600 s) and just past it, and on the second day two pairs of requests of one
    key at the same microsecond, stored against their event_id order, so that only the
    processing order (ts, event_id) says which one was answered first."""
    start = NOW - timedelta(days=4)
    rows: list[dict[str, Any]] = []
    for i in range(3000):
        ts = start + timedelta(seconds=97 * i)
        key = i % 37 if i % 3 else i % 11
        row: dict[str, Any] = {
            "event_id": f"h{i:05d}",
            "ts": ts,
            "tenant": ("acme", "globex")[i % 2],
            "app": "bot",
            "feature": ("faq", "chat")[i % 5 == 0],
            "prompt_hash": None if i % 13 == 0 else f"p{key}",
            "status": "error" if i % 17 == 0 else "ok",
            "input_tokens": 100 + i % 50,
            "cost_usd": None if i % 19 == 0 else 0.001 * (1 + i % 7),
        }
        if i % 23 == 0:
            row |= {"provider": "vllm", "request_model": "llama", "deployment": "llama-8b"}
            row["cost_usd"] = None
        rows.append(row)
    for j, gap in enumerate((599, 600, 601)):  # the TTL is inclusive
        t = start + timedelta(hours=30 + j)
        for n, dt in enumerate((0, gap)):
            rows.append(
                {
                    "event_id": f"g{j}-{n}",
                    "ts": t + timedelta(seconds=dt),
                    "tenant": "acme",
                    "app": "bot",
                    "feature": "ttl",
                    "prompt_hash": f"gap{j}",
                    "input_tokens": 10,
                    "cost_usd": 0.5,
                }
            )
    tie = start + timedelta(days=1, hours=5, microseconds=7)
    # stored b before a; processed a before b: each b repeats its a (in stored order, the
    # first b errs and its a is no repeat, the second a would repeat its b: 1 repeat, $0.40)
    for eid, status, cost in (("t1-b", "error", 0.3), ("t1-a", "ok", 0.2)):
        rows.append(
            {
                "event_id": eid,
                "ts": tie,
                "tenant": "acme",
                "app": "bot",
                "feature": "tie",
                "prompt_hash": "tie1",
                "status": status,
                "input_tokens": 10,
                "cost_usd": cost,
            }
        )
    for eid, cost in (("t2-b", 0.7), ("t2-a", 0.4)):
        rows.append(
            {
                "event_id": eid,
                "ts": tie + timedelta(minutes=1),
                "tenant": "acme",
                "app": "bot",
                "feature": "tie",
                "prompt_hash": "tie2",
                "input_tokens": 10,
                "cost_usd": cost,
            }
        )
    return rows


def test_first_run_history_equals_one_pass(tmp_path: Path) -> None:
    """The first run's exact-repeat history (read a day at a time, unordered, sorted here)
    gives the same hourly rows, prompt keys and findings as one pass over all events in
    processing order (backfill_hours 0), and so does the next run after more traffic."""
    rows = history_traffic()
    later = [
        {**r, "event_id": f"n{i}", "ts": r["ts"] + timedelta(days=4)}
        for i, r in enumerate(rows)
        if r["ts"] >= NOW - timedelta(hours=2)
    ]
    hourly = """
        SELECT hour, tenant, app, feature, deployment, sum(requests), sum(cost_usd),
               sum(tokens), sum(repeat_requests), sum(repeat_cost_usd), sum(repeat_tokens),
               sum(repeat_unpriced)
        FROM caching_response_hourly GROUP BY ALL ORDER BY ALL
    """
    options = {"response_ttl_s": 600, "prefix_ttl_s": {}}
    results = []
    for backfill in (6, 0):
        with Store(tmp_path / f"s{backfill}.duckdb") as store:
            insert(store, rows, NOW)
            first, analyzer = run(store, {**options, "backfill_hours": backfill})
            keys = analyzer._caches.prompt_keys.tolist() if analyzer._caches else None
            table = store.cursor().execute(hourly).fetchall()
            insert(store, later, NOW + timedelta(seconds=1))
            second, _ = run(store, {**options, "backfill_hours": backfill}, NOW + timedelta(days=4))
            results.append((by_kind(first, "caching.response_repeats"), keys, table, second))
    (one, keys_h, table_h, second_h), (other, keys_1, table_1, second_1) = results
    assert keys_h == keys_1 and keys_h
    assert len(table_h) == len(table_1)
    for got, want in zip(table_h, table_1, strict=True):
        assert got[:6] == want[:6] and got[7:9] == want[7:9] and got[10:] == want[10:]
        assert got[6] == pytest.approx(want[6]) and got[9] == pytest.approx(want[9])
    assert set(one) == set(other) and len(one) >= 4
    for scope, f in one.items():
        g = other[scope]
        for key in ("requests", "repeat_requests", "repeat_unpriced_requests"):
            assert f.evidence[key] == g.evidence[key], (scope, key)
        assert f.evidence["repeat_cost_usd"] == pytest.approx(g.evidence["repeat_cost_usd"])
        assert f.monthly_savings_usd == pytest.approx(g.monthly_savings_usd)
    tie = one[json.dumps({"app": "bot", "feature": "tie", "tenant": "acme"}, sort_keys=True)]
    assert tie.evidence["repeat_requests"] == 2
    assert tie.evidence["repeat_cost_usd"] == pytest.approx(0.3 + 0.7)
    ttl = one[json.dumps({"app": "bot", "feature": "ttl", "tenant": "acme"}, sort_keys=True)]
    assert ttl.evidence["repeat_requests"] == 2  # 599 s and 600 s, not 601 s
    assert {f.id: f.evidence["repeat_requests"] for f in second_h} == {
        f.id: f.evidence["repeat_requests"] for f in second_1
    }


def test_first_run_backfills_only_recent_events(tmp_path: Path) -> None:
    """backfill_hours 6: the events 10 h old are never simulated; the covered span starts
    at the first one that is; later runs take every new event."""
    old = [
        {"event_id": "o1", "ts": NOW - timedelta(hours=10), "input_tokens": 512},
        {"event_id": "o2", "ts": NOW - timedelta(hours=10, minutes=-1), "input_tokens": 512},
    ]
    for r in old:
        r["prefix_hashes"] = [7]
    recent = [
        {"event_id": "n1", "ts": NOW - timedelta(hours=2), "input_tokens": 512},
        {"event_id": "n2", "ts": NOW - timedelta(hours=1), "input_tokens": 512},
    ]
    for r in recent:
        r["prefix_hashes"] = [7]
    lru_only = {"backfill_hours": 6, "prefix_ttl_s": {"openai": 0}}  # n2 comes 1 h after n1
    with Store(tmp_path / "s.duckdb") as store:
        insert(store, old + recent, NOW)
        findings, analyzer = run(store, lru_only)
        assert analyzer.last_pass is not None and analyzer.last_pass.prefix_requests == 2
        ev = prefix_evidence(findings)
        assert ev["requests"] == 2
        assert ev["prefix_hit_tokens_unbounded"] == 512  # n2 hits n1's block; o1, o2 unseen
        assert ev["covered_start"] == (NOW - timedelta(hours=2)).isoformat()
        late = [{"event_id": "n3", "ts": NOW - timedelta(hours=9), "input_tokens": 512}]
        late[0]["prefix_hashes"] = [7]
        insert(store, late, NOW + timedelta(seconds=1))
        _, analyzer = run(store, lru_only)
        assert analyzer.last_pass is not None and analyzer.last_pass.prefix_requests == 1
