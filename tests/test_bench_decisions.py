"""bench/decisions.py: its scenarios hold what they claim, its oracles' arithmetic is
right, and the analyzers meet its goals.

The generators and oracles are checked on small hand-checkable cases priced with the
shipped catalog; ``test_the_analyzers_meet_the_goals`` runs the whole benchmark (every
scenario through a real daemon and broker: about 5 minutes on 2 cores).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from finopsd.events import UsageEvent
from finopsd.pricing import PriceBook

END = datetime(2026, 11, 20, 6, tzinfo=UTC)
T0 = END - timedelta(days=2)


def _load() -> ModuleType:
    path = Path(__file__).resolve().parents[1] / "bench" / "decisions.py"
    spec = importlib.util.spec_from_file_location("bench_decisions", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


d = _load()


@pytest.fixture(scope="module")
def book() -> PriceBook:
    return PriceBook.shipped()


def _event(
    at_s: float,
    *,
    model: str = "gpt-4o",
    provider: str = "openai",
    prompt: str = "a",
    feature: str = "faq",
    status: str = "ok",
    inp: int = 1000,
    out: int = 100,
) -> dict[str, Any]:
    return {
        "event_id": f"e{at_s}-{prompt}-{feature}",
        "ts": d.iso(T0 + timedelta(seconds=at_s)),
        "gen_ai.provider.name": provider,
        "gen_ai.request.model": model,
        "gen_ai.response.model": model,
        "gen_ai.usage.input_tokens": inp,
        "gen_ai.usage.output_tokens": out,
        "tenant": "t",
        "app": "a",
        "feature": feature,
        "status": status,
        "prompt_hash": prompt,
    }


def test_response_cache_serves_a_stored_answer_until_its_ttl_and_never_an_error(
    book: PriceBook,
) -> None:
    events = [  # given out of order
        _event(62 * 60),  # served: the answer stored at 61 min
        _event(0),  # sent; its answer stored until 60 min
        _event(10 * 60, out=300),  # served
        _event(61 * 60),  # sent: the entry expired at 60 min (serving it did not extend it)
        _event(5 * 60, prompt="b", status="error"),  # an error is never stored
        _event(6 * 60, prompt="b"),  # so this is sent
        _event(7 * 60, prompt="a", feature="other"),  # another feature's cache key
    ]
    assert d.response_cache_hits(events, 3600.0) == [2, 0]

    price = book.price_at("openai/gpt-4o", T0.date())
    assert price is not None
    by_hand = (
        2 * 1000 * price.input_per_mtok + (300 + 100) * price.output_per_mtok
    ) / 1e6  # the two served: 300 and 100 output tokens
    served = [events[i] for i in d.response_cache_hits(events, 3600.0)]
    assert d.costs(book, served).sum() == pytest.approx(by_hand, rel=1e-12)
    assert d.monthly(by_hand, 2.0) == pytest.approx(by_hand / 2 * 30.4375)


def test_prefix_cache_reads_within_the_ttl_of_the_last_use_and_writes_otherwise(
    book: PriceBook,
) -> None:
    shared = 2048
    claude = {"model": "claude-sonnet-4-5", "provider": "anthropic", "inp": shared + 500}
    # gaps 200 s (read), 400 s (expired: written again), 250 s (read); given out of order
    events = [_event(t, prompt=str(t), **claude) for t in (600, 0, 850, 200)]
    cached = d.with_prefix_cache(events, shared, 300.0)
    reads = [e.get("gen_ai.usage.cache_read.input_tokens") for e in cached]
    writes = [e.get("gen_ai.usage.cache_creation.input_tokens") for e in cached]
    assert reads == [None, shared, None, shared]
    assert writes == [shared, None, shared, None]

    p = book.price_at("anthropic/claude-sonnet-4-5", T0.date())
    assert p is not None and p.cached_input_per_mtok is not None
    assert p.cache_write_per_mtok is not None
    # two reads save (input - cached input), two writes cost (cache write - input) more
    by_hand = (
        2 * shared * (p.input_per_mtok - p.cached_input_per_mtok)
        - 2 * shared * (p.cache_write_per_mtok - p.input_per_mtok)
    ) / 1e6
    saved = d.costs(book, events).sum() - d.costs(book, cached).sum()
    assert saved == pytest.approx(by_hand, rel=1e-9)
    assert by_hand > 0


def test_gpus_freed_keep_the_busiest_hour_within_the_target() -> None:
    assert d.gpus_freed(8, 19.7, 1.0, 0.70) == 5  # 8 x 0.197 / 0.7 = 2.25 -> 3 kept
    assert d.gpus_freed(8, 35.0, 1.0, 0.70) == 4  # exactly 4.0 needed: 4 kept, not 5
    assert d.gpus_freed(4, 97.3, 1.6, 1.0) == 1  # 4 x 0.973 / 1.6 = 2.43 -> 3 kept
    assert d.gpus_freed(2, 100.0, 1.0, 0.70) == 0  # busy: nothing to free
    assert d.gpus_freed(1, 1.0, 1.0, 0.70) == 0  # one GPU is always kept
    samples = [
        {"ts": "2026-11-20T01:00:00.000Z", "utilization_pct": 10.0},
        {"ts": "2026-11-20T01:30:00.000Z", "utilization_pct": 30.0},
        {"ts": "2026-11-20T02:10:00.000Z", "utilization_pct": 50.0},
    ]
    assert d.hourly_utilization(samples) == {"2026-11-20T01": 20.0, "2026-11-20T02": 50.0}


def test_retries_scenario_retries_every_failure_and_its_oracle_is_their_cost(
    book: PriceBook,
) -> None:
    sc = d.build("retries-7d", END, book)
    again = d.build("retries-7d", END, book)
    assert sc.events == again.events and sc.oracle_usd == again.oracle_usd  # deterministic
    assert sc.events[0]["ts"] >= d.iso(END - timedelta(days=7))
    assert sc.events[-1]["ts"] < d.iso(END)
    for e in sc.events:
        UsageEvent.model_validate(e)  # what replay --format native sends
    review = [e for e in sc.events if e["feature"] == "review"]
    failed = [e for e in review if e["status"] == "error"]
    assert 0.15 < len(failed) / len(review) < 0.25
    later = {(e["prompt_hash"], e["ts"]) for e in review}
    for e in failed:  # each failure is re-sent, same prompt, within two minutes (or gave up)
        t = d.parse_ts(e["ts"])
        retried = any(
            h == e["prompt_hash"] and t < d.parse_ts(ts) <= t + timedelta(minutes=2)
            for h, ts in later
        )
        attempts = sum(1 for h, _ in later if h == e["prompt_hash"])
        assert retried or attempts == 3
    by_hand = d.costs(book, failed).sum() / 7 * 30.4375
    assert sc.oracle_usd == pytest.approx(by_hand, rel=1e-12)
    assert sc.kinds == ("waste.errors",) and not sc.control


def test_clean_control_holds_no_waste(book: PriceBook) -> None:
    sc = d.build("clean", END, book)
    assert sc.control and sc.oracle_usd == 0.0
    assert sc.events[0]["ts"] >= d.iso(END - timedelta(days=28))
    ok = [e["prompt_hash"] for e in sc.events if e["status"] == "ok"]
    assert len(set(ok)) == len(ok)  # nothing a response cache could serve
    assert d.response_cache_hits(sc.events, 3600.0) == []
    blocks = [b for e in sc.events for b in e["prefix_hashes"]]
    assert len(set(blocks)) == len(blocks)  # no prompt prefix shared
    errors = sum(1 for e in sc.events if e["status"] == "error")
    assert errors / len(sc.events) < 0.01
    assert all(e.get("latency_class", "interactive") == "interactive" for e in sc.events)
    per_feature: dict[tuple[str, str], set[str]] = {}
    for e in sc.events:
        per_feature.setdefault((e["app"], e["feature"]), set()).add(e["gen_ai.request.model"])
    assert all(len(models) == 1 for models in per_feature.values())


def test_judge_counts_the_findings_of_the_scenarios_kind_and_scope() -> None:
    sc = d.Scenario("x", "w", 7, ("gpu.underused",), {"deployment": "a"}, 100.0, "m", events=[])

    def finding(kind: str, scope: dict[str, str], usd: float, low: float, high: float) -> Any:
        return {
            "kind": kind,
            "scope": scope,
            "monthly_savings_usd": usd,
            "monthly_savings_low_usd": low,
            "monthly_savings_high_usd": high,
            "provisional": False,
        }

    r = d.judge(
        sc,
        [
            finding("gpu.underused", {"deployment": "a"}, 90.0, 80.0, 99.0),
            finding("gpu.underused", {"deployment": "b"}, 50.0, 40.0, 60.0),
            finding("gpu.api_cheaper", {"deployment": "a"}, 0.5, 0.5, 0.5),
        ],
    )
    assert r["found_monthly_usd"] == 90.0 and r["ratio"] == pytest.approx(0.9)
    assert r["within_tolerance"] and r["oracle_inside"] is False  # 100 > 99
    assert [o["scope"] for o in r["other_findings"]] == [{"deployment": "b"}]  # > $1 only


@pytest.mark.timeout(2400)
def test_the_analyzers_meet_the_goals() -> None:
    """Every waste scenario's saving within ±15 % of its oracle, its interval holding the
    oracle, none provisional; no control with a finding above $1/month; no analyzer error.
    (The traffic ends at the last whole hour: this holds whatever hour it runs at.)"""
    bench = Path(__file__).resolve().parents[1] / "bench" / "decisions.py"
    done = subprocess.run(
        [sys.executable, str(bench), "--json"],
        capture_output=True,
        text=True,
        timeout=2400,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout)
    assert report["summary"]["failed_scenarios"] == []
    assert report["summary"]["analyzer_errors"] == []
    assert len(report["scenarios"]) == len(d.scenario_names())
    for r in report["scenarios"]:
        what = (r["scenario"], r["oracle_monthly_usd"], r["found_monthly_usd"], r["interval_usd"])
        if r["control"]:
            assert r["largest_false_usd"] <= d.CONTROL_LIMIT_USD, (what, r["other_findings"])
        else:
            assert r["within_tolerance"], what
            assert r["oracle_inside"], what
            assert r["provisional"] is False, what
