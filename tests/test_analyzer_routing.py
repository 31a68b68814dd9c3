"""routing: cheaper model mixes by LP and cheap-first cascades, on traffic built here.

Three models serve the feature "answer" of acme / bot (provider "p"), every
request 1,000 input and 100 output tokens, so a request costs $0.010 on
``big``, $0.006 on ``mid`` and $0.001 on ``small``. ``big`` (quality 0.95,
1,000 ms) carries the scope under test (200 requests); ``mid`` (0.88,
1,000 ms) and ``small`` (0.70, 4,000 ms) serve the same tenant, app and
feature with too few requests to be scopes of their own. The right answers are worked out by hand
from those numbers (and the bucketed p95 the analyzer reports, checked against
the true latency).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from finopsd.analyzers import routing, spend
from finopsd.analyzers.base import HOURS_PER_MONTH, Finding, Window
from finopsd.analyzers.routing import MixProblem, solve_mixes
from finopsd.analyzers.runner import build, run_analyzers, stored_findings
from finopsd.pricing import Deployment, Price, PriceBook
from finopsd.store import Store

NOW = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
DAY0 = datetime(2026, 3, 5, tzinfo=UTC)
IN_TOKENS, OUT_TOKENS = 1000, 100
PRICES = {  # $/Mtok input, output
    "big": (5.0, 50.0),
    "mid": (3.0, 30.0),
    "small": (0.5, 5.0),
    "tiny": (0.2, 2.0),
    "gpt-4o": (2.5, 10.0),
    "gpt-4o-mini": (0.15, 0.6),
}
BOOK = PriceBook(
    [Price("p", m, date(2025, 1, 1), i, o, batch_discount=0.5) for m, (i, o) in PRICES.items()]
)


LLAMA_PER_TOKEN = 2e-6  # the self-hosted "llama": its settled GPU cost per token
SELF_HOSTED_BOOK = PriceBook(BOOK.prices, [Deployment("llama-dep", "L4", 1, 1.0)])


def cost(model: str) -> float:
    if model == "llama":
        return (IN_TOKENS + OUT_TOKENS) * LLAMA_PER_TOKEN
    i, o = PRICES[model]
    return (IN_TOKENS * i + OUT_TOKENS * o) / 1e6


def scope_hours(store: Store, tenant: str, app: str, model: str) -> int:
    """Hours from the scope's first hour with a request to the last hour observed (the
    latest event in the store), both included."""
    row = (
        store.cursor()
        .execute(
            "SELECT (SELECT max(epoch(ts)::BIGINT // 3600) FROM usage_events) "
            "- min(epoch(ts)::BIGINT // 3600) + 1 "
            "FROM usage_events WHERE tenant = ? AND app = ? AND request_model = ?",
            [tenant, app, model],
        )
        .fetchone()
    )
    assert row is not None
    return int(row[0])


def per_month(saved: float, hours: float) -> float:
    """A saving seen over the scope's ``hours`` of traffic, per month (under 24 hours,
    analyzers.min_evidence_hours, taken as the saving of 24)."""
    return saved / max(hours, 24.0) * HOURS_PER_MONTH


Event = tuple[str, str, str, float | None, float, str]  # tenant, app, model, quality, ms, status


def events(
    tenant: str,
    app: str,
    model: str,
    n: int,
    *,
    quality: float | None,
    latency: float = 1000.0,
    status: str = "ok",
) -> list[Event]:
    return [(tenant, app, model, quality, latency, status)] * n


def standard() -> list[Event]:
    return [
        *events("acme", "bot", "big", 200, quality=0.95),
        *events("acme", "bot", "mid", 50, quality=0.88),
        *events("acme", "bot", "small", 50, quality=0.70, latency=4000.0),
    ]


def insert(
    store: Store,
    specs: Iterable[Event],
    *,
    start: int = 0,
    day: int = 0,
    feature: str = "answer",
    days: int = 4,
    minutes: int = 600,
) -> None:
    """Events spread over ``days`` days from DAY0 + ``day`` (and over the first ``minutes``
    of each), ids from ``start``."""
    rows = []
    for i, (tenant, app, model, quality, ms, status) in enumerate(specs):
        c = cost(model)
        rows.append(
            {
                "event_id": f"e{start + i}",
                "ts": DAY0
                + timedelta(days=day + (start + i) % days, minutes=(start + i) % minutes),
                "provider": "vllm" if model == "llama" else "p",
                "deployment": "llama-dep" if model == "llama" else None,
                "request_model": model,
                "input_tokens": IN_TOKENS,
                "output_tokens": OUT_TOKENS,
                "tenant": tenant,
                "app": app,
                "feature": feature,
                "latency_ms": ms,
                "status": status,
                "latency_class": "interactive",
                "billing_mode": "standard",
                "quality_score": quality,
                "list_cost_usd": c,
                "cost_usd": c,
            }
        )
    table = pa.Table.from_pylist(rows)

    def work(con: Any) -> None:
        con.register("new_rows", table)
        con.execute("INSERT INTO usage_events BY NAME SELECT * FROM new_rows")
        con.unregister("new_rows")

    store.write(work)


def run(store: Store, now: datetime = NOW, book: PriceBook = BOOK, **options: Any) -> list[Finding]:
    opts = {"min_monthly_savings_usd": 0.0, **options}
    (result,) = run_analyzers(store, book, build({"routing": opts}, only=["routing"]), now=now)
    assert result.error is None, result.error
    return result.findings


def only_finding(findings: list[Finding]) -> Finding:
    assert [f.scope for f in findings] == [
        {"tenant": "acme", "app": "bot", "feature": "answer", "model": "big"}
    ]
    return findings[0]


def p95_bucket(ms: float) -> float:
    """The analyzer's estimate: the geometric middle of the 5 % log bucket holding ``ms``."""
    return math.exp((math.floor(math.log(ms) * 20) + 0.5) / 20)


def test_lp_takes_the_cheapest_models_that_meet_the_bar(tmp_path: Path) -> None:
    with Store(tmp_path / "s.duckdb") as store:
        insert(store, standard())
        f = only_finding(run(store))
        hours = scope_hours(store, "acme", "bot", "big")
    assert hours == 3 * 24 + 5  # day 0 00:00 to day 3 04:xx (the store's latest request)
    # by hand: small (0.70) misses the 0.85 bar on every answer, so it takes no share
    # (mixed in, 83 % mid + 17 % small would meet it on average); mid alone (0.88) is
    # the cheapest model that meets it
    lp_cost = cost("mid")
    ev = f.evidence
    assert ev["chosen"] == "lp"
    assert ev["lp"]["shares"] == pytest.approx({"mid": 1.0}, abs=1e-6)
    assert ev["lp"]["cost_per_request_usd"] == pytest.approx(lp_cost, rel=1e-6)
    assert ev["lp"]["quality"] == pytest.approx(0.88, abs=1e-6)
    assert ev["quality_target"] == 0.85
    assert ev["current"]["cost_per_request_usd"] == pytest.approx(cost("big"))
    cands = {c["model"]: c for c in ev["candidates"]}
    assert set(cands) == {"big", "mid", "small"}
    for model, q, ms in (("big", 0.95, 1000.0), ("mid", 0.88, 1000.0), ("small", 0.70, 4000.0)):
        assert cands[model]["quality"] == pytest.approx(q)
        assert cands[model]["quality_source"] == "events"
        assert cands[model]["cost_per_request_usd"] == pytest.approx(cost(model))
        assert cands[model]["p95_ms"] == pytest.approx(p95_bucket(ms))
        assert cands[model]["p95_ms"] == pytest.approx(ms, rel=0.026)
    # every small answer scores 0.70 < 0.85: the cascade would always escalate, costing more
    assert ev["cascade"]["escalation_rate"] == 1.0
    assert ev["cascade"]["savings_per_request_usd"] == pytest.approx(-cost("small"))
    saved = (cost("big") - lp_cost) * 200
    assert ev["window_savings_usd"] == pytest.approx(saved)
    assert f.monthly_savings_usd == pytest.approx(per_month(saved, hours))
    assert (f.evidence_hours, f.evidence_requests, f.provisional) == (hours, 200, False)
    assert f.evidence["projection"]["observed_savings_usd"] == pytest.approx(saved)
    # four days of 50 requests each: every day saves the same, the interval is the point
    assert f.monthly_savings_low_usd == pytest.approx(f.monthly_savings_usd)
    assert f.monthly_savings_high_usd == pytest.approx(f.monthly_savings_usd)
    assert f.action is not None and f.action.actuator == "gateway.route"
    assert f.action.params["weights"] == pytest.approx(ev["lp"]["shares"])
    assert f.kind == "routing.model_mix" and f.risk == "medium"


def test_uneven_days_widen_the_interval_not_the_point(tmp_path: Path) -> None:
    """Day 0 carries 100 of big's 200 requests, days 1-3 the rest: the point is still the
    saving over the scope's hours; the days' spread gives an interval around it."""
    with Store(tmp_path / "s.duckdb") as store:
        specs = standard()
        insert(store, specs[:100], days=1, minutes=300)  # big, all on day 0
        insert(store, specs[100:200], start=100, day=1, days=3)  # big, days 1-3
        insert(store, specs[200:], start=200)
        f = only_finding(run(store))
        hours = scope_hours(store, "acme", "bot", "big")
    saved = f.evidence["window_savings_usd"]
    assert f.evidence_requests == 200
    assert f.monthly_savings_usd == pytest.approx(per_month(saved, hours))
    assert f.monthly_savings_low_usd < f.monthly_savings_usd < f.monthly_savings_high_usd
    assert f.evidence["projection"]["periods"] == 4 and not f.provisional


def test_two_hours_of_traffic_give_a_provisional_finding(tmp_path: Path) -> None:
    """The same traffic within two hours: a saving seen over 2 h is not a monthly rate.
    Taken as the saving of analyzers.min_evidence_hours (24 h), its interval from 0, the
    finding is provisional and not eligible for an automatic action."""
    with Store(tmp_path / "s.duckdb") as store:
        insert(store, standard(), days=1, minutes=120)
        f = only_finding(run(store))
        assert scope_hours(store, "acme", "bot", "big") == 2
    saved = f.evidence["window_savings_usd"]
    assert saved > 0
    assert (f.evidence_hours, f.provisional, f.eligible_for_action) == (2.0, True, False)
    assert f.monthly_savings_usd == pytest.approx(saved / 24 * HOURS_PER_MONTH)
    assert f.monthly_savings_low_usd == 0.0
    assert f.monthly_savings_high_usd == pytest.approx(saved / 2 * HOURS_PER_MONTH)
    assert f.evidence["projection"]["capped"] is True
    assert "provisional" in f.title


def test_latency_slo_excludes_the_slow_model_and_bounds_its_share(tmp_path: Path) -> None:
    with Store(tmp_path / "s.duckdb") as store:
        insert(store, standard())
        # SLO below every p95: relaxed to the current model's own p95, which leaves small
        # (p95 ~4,000 ms) no share at all; mid alone (0.88) meets the quality target
        f = only_finding(run(store, latency_slo_ms=900))
        assert f.evidence["latency_slo_ms"] == pytest.approx(p95_bucket(1000))
        assert f.evidence["lp"]["shares"] == pytest.approx({"mid": 1.0})
        assert f.evidence["lp"]["savings_per_request_usd"] == pytest.approx(
            cost("big") - cost("mid")
        )
    with Store(tmp_path / "fast.duckdb") as store:
        # small fast enough for the bar (0.86) but slow: a looser SLO bounds its share
        insert(
            store,
            [
                *events("acme", "bot", "big", 200, quality=0.95),
                *events("acme", "bot", "mid", 50, quality=0.88),
                *events("acme", "bot", "small", 50, quality=0.86, latency=4000.0),
            ],
        )
        f = only_finding(run(store, latency_slo_ms=1300))
    p_mid, p_small = p95_bucket(1000), p95_bucket(4000)
    x_small = (1300 - p_mid) / (p_small - p_mid)
    shares = f.evidence["lp"]["shares"]
    assert shares == pytest.approx({"mid": 1 - x_small, "small": x_small}, abs=1e-6)
    assert f.evidence["lp"]["p95_ms_weighted"] == pytest.approx(1300, rel=1e-6)


def test_infeasible_or_unknown_quality_gives_no_finding(tmp_path: Path) -> None:
    # the LP itself: no mix reaches 0.99; one infeasible block does not hide another
    bad = MixProblem(np.array([1.0, 0.1]), np.array([0.9, 0.7]), 0.99, np.array([1.0, 1.0]))
    good = MixProblem(np.array([1.0, 0.1]), np.array([0.9, 0.7]), 0.8, np.array([1.0, 1.0]))
    bad_x, good_x = solve_mixes([bad, good])
    assert bad_x is None
    assert good_x is not None and good_x == pytest.approx([0.5, 0.5])
    with Store(tmp_path / "s.duckdb") as store:
        insert(store, standard())
        # a target above every model's quality: relaxed to big's own 0.95, which only big meets
        assert run(store, quality_target=0.99) == []
    with Store(tmp_path / "q.duckdb") as store:
        # no quality scores for the current model: nothing to hold a new mix to
        insert(
            store,
            [
                *events("acme", "bot", "big", 200, quality=None),
                *events("acme", "bot", "small", 50, quality=0.9),
            ],
        )
        assert run(store) == []
    with Store(tmp_path / "c.duckdb") as store:
        # the cheapest model already: nothing cheaper to move to
        insert(store, [*events("acme", "bot", "small", 200, quality=0.9), *standard()[:200]])
        assert [f.scope["model"] for f in run(store)] == ["big"]


def test_cascade_formula(tmp_path: Path) -> None:
    # small: 40 answers at 0.86 (pass), 5 at 0.2 (fail), 5 errors (fail): e = 10 / 50
    small = [
        *events("acme", "bot", "small", 40, quality=0.86),
        *events("acme", "bot", "small", 5, quality=0.2),
        *events("acme", "bot", "small", 5, quality=None, status="error"),
    ]
    specs = [*events("acme", "bot", "big", 200, quality=0.95), *small]
    with Store(tmp_path / "s.duckdb") as store:
        insert(store, specs)
        f = only_finding(run(store))
        rate = 10 / 50
        cascade_cost = cost("small") + rate * cost("big")
        ev = f.evidence
        assert ev["cascade"]["escalation_rate"] == pytest.approx(rate)
        assert ev["cascade"]["outcomes"] == 50
        assert ev["cascade"]["cost_per_request_usd"] == pytest.approx(cascade_cost)
        assert ev["cascade"]["savings_per_request_usd"] == pytest.approx(cost("big") - cascade_cost)
        # small's mean over its 45 scores (0.79) misses the bar: no share of an LP mix
        assert ev["lp"] is None or not ev["lp"]["shares"].get("small")
        assert ev["chosen"] == "cascade"
        assert f.monthly_savings_usd == pytest.approx(
            per_month((cost("big") - cascade_cost) * 200, scope_hours(store, "acme", "bot", "big"))
        )
        assert f.action is not None and f.action.actuator == "gateway.cascade"
        assert f.action.params["first"] == "small" and f.action.params["escalate_to"] == "big"
        assert f.action.params["quality_threshold"] == 0.85
        # a stricter bar fails the 0.86 answers too: every answer would escalate, and no
        # mix meets it: no finding; nor without the cascade
        assert run(store, quality_target=0.9) == []
        assert run(store, cascade=False) == []


def test_evaluations_take_precedence_and_max_share_caps(tmp_path: Path) -> None:
    with Store(tmp_path / "s.duckdb") as store:
        insert(store, standard())
        store.write(
            lambda con: con.execute(
                "INSERT INTO model_evaluations BY NAME SELECT * FROM (VALUES "
                "('acme', 'bot', 'answer', 'small', 0.80, 500, ?::TIMESTAMPTZ), "
                "('acme', 'bot', 'answer', 'small', 0.90, 800, ?::TIMESTAMPTZ)) "
                "AS t(tenant, app, feature, model, quality, samples, updated_at)",
                [NOW - timedelta(days=2), NOW - timedelta(days=1)],  # the newest wins
            )
        )
        f = only_finding(run(store))
        small = next(c for c in f.evidence["candidates"] if c["model"] == "small")
        assert (small["quality"], small["quality_source"], small["quality_samples"]) == (
            0.90,
            "evaluation",
            800,
        )
        assert f.evidence["lp"]["shares"] == pytest.approx({"small": 1.0})
        # at most half to any other model: the rest to the cheapest that keeps 0.85
        f = only_finding(run(store, max_share=0.5))
        assert f.evidence["lp"]["shares"] == pytest.approx({"small": 0.5, "mid": 0.5})
        assert f.evidence["lp"]["cost_per_request_usd"] == pytest.approx(
            0.5 * cost("small") + 0.5 * cost("mid")
        )


def test_candidates_option_adds_an_evaluated_model(tmp_path: Path) -> None:
    with Store(tmp_path / "s.duckdb") as store:
        insert(store, standard())
        store.write(
            lambda con: con.execute(
                "INSERT INTO model_evaluations (tenant, app, feature, model, quality, updated_at) "
                "VALUES ('acme', 'bot', 'answer', 'tiny', 0.9, ?)",
                [NOW],
            )
        )
        f = only_finding(run(store))
        assert "tiny" not in {c["model"] for c in f.evidence["candidates"]}  # never seen
        f = only_finding(run(store, candidates=["p/tiny"]))
    tiny = next(c for c in f.evidence["candidates"] if c["model"] == "tiny")
    assert tiny["provider"] == "p" and tiny["cost_per_request_usd"] == pytest.approx(cost("tiny"))
    assert f.evidence["lp"]["shares"] == pytest.approx({"tiny": 1.0})


def test_self_hosted_candidate_costs_its_observed_rate(tmp_path: Path) -> None:
    with Store(tmp_path / "s.duckdb") as store:
        insert(store, [*standard(), *events("acme", "bot", "llama", 50, quality=0.9)])
        f = only_finding(run(store, book=SELF_HOSTED_BOOK))
    llama = next(c for c in f.evidence["candidates"] if c["model"] == "llama")
    assert llama["cost_per_request_usd"] == pytest.approx(cost("llama"))
    # llama (0.90) meets the bar and is cheaper than mid; small (0.70) does not
    assert f.evidence["lp"]["shares"] == pytest.approx({"llama": 1.0}, abs=1e-6)
    assert f.evidence["lp"]["cost_per_request_usd"] == pytest.approx(cost("llama"))


def test_ids_stable_second_run_updates(tmp_path: Path) -> None:
    with Store(tmp_path / "s.duckdb") as store:
        insert(store, standard())
        first = only_finding(run(store))
        second = only_finding(run(store, now=NOW + timedelta(hours=1)))
        assert first.id == second.id
        (stored,) = stored_findings(store.cursor(), analyzer="routing")
        assert stored["id"] == first.id and stored["times_seen"] == 2
        assert stored["monthly_savings_usd"] == pytest.approx(second.monthly_savings_usd)
        assert stored["action"]["actuator"] == "gateway.route"


def _summary(findings: list[Finding]) -> list[tuple[Any, ...]]:
    return sorted(
        (
            f.id,
            round(f.monthly_savings_usd, 9),
            f.evidence["chosen"],
            tuple(sorted((m, round(s, 6)) for m, s in f.evidence["lp"]["shares"].items())),
            tuple(sorted((c["model"], round(c["p95_ms"], 6)) for c in f.evidence["candidates"])),
        )
        for f in findings
    )


def _rows(store: Store, table: str) -> list[tuple[Any, ...]]:
    """A table's rows, sorted, floats rounded (sums may add up in another order)."""
    rows = store.cursor().execute(f"SELECT * FROM {table} ORDER BY ALL").fetchall()
    return [tuple(round(v, 9) if isinstance(v, float) else v for v in r) for r in rows]


def test_incremental_equals_from_scratch(tmp_path: Path) -> None:
    specs = standard()
    more = [
        *events("acme", "bot", "big", 80, quality=0.93, latency=1500.0),
        *events("acme", "bot", "mid", 30, quality=0.9, latency=800.0),
        *events("acme", "bot", "small", 40, quality=0.75, status="error"),
    ]
    later = NOW + timedelta(hours=2)
    with Store(tmp_path / "inc.duckdb") as inc:
        insert(inc, specs)
        run(inc, latency_slo_ms=2000)
        # new events, some on days already seen (merged into them), some on a new day
        insert(inc, more, start=len(specs), day=2)
        incremental = run(inc, now=later, latency_slo_ms=2000)
        with Store(tmp_path / "full.duckdb") as full:
            insert(full, specs)
            insert(full, more, start=len(specs), day=2)
            scratch = run(full, now=later, latency_slo_ms=2000)
            assert _rows(inc, "routing_stats") == _rows(full, "routing_stats")
            assert _rows(inc, "routing_daily") == _rows(full, "routing_daily")
    assert incremental and _summary(incremental) == _summary(scratch)


def test_events_ingested_after_the_spend_refresh_count_once(tmp_path: Path) -> None:
    window = Window(NOW - timedelta(days=30), NOW)
    first, second = standard()[:150], standard()[150:]
    with Store(tmp_path / "inc.duckdb") as inc, Store(tmp_path / "full.duckdb") as full:
        insert(inc, first)
        inc.write(spend.refresh)
        insert(inc, second, start=len(first))  # after the spend rollup, before routing
        inc.write(lambda con: routing.refresh(con, window))
        inc.write(spend.refresh)
        inc.write(lambda con: routing.refresh(con, window))
        insert(full, standard())
        full.write(spend.refresh)
        full.write(lambda con: routing.refresh(con, window))
        assert _rows(inc, "routing_stats") == _rows(full, "routing_stats")
        assert _rows(inc, "routing_daily") == _rows(full, "routing_daily")


# -- scopes: one tenant's figures never decide another's routing ---------------------------

FOUR, MINI = 3390, 810  # per tenant: 80 % of "f" on gpt-4o (0.90), 20 % on gpt-4o-mini


def shared_feature() -> list[Event]:
    """Two tenants' apps with a feature named "f"; acme's mini scores 0.88, globex's 0.60;
    initech's "f" has never been served by mini."""
    return [
        *events("acme", "support", "gpt-4o", FOUR, quality=0.90),
        *events("acme", "support", "gpt-4o-mini", MINI, quality=0.88),
        *events("globex", "helpdesk", "gpt-4o", FOUR, quality=0.90),
        *events("globex", "helpdesk", "gpt-4o-mini", MINI, quality=0.60),
        *events("initech", "chat", "gpt-4o", 400, quality=0.90),
    ]


def by_tenant(findings: list[Finding]) -> dict[str, Finding]:
    out = {f.scope["tenant"]: f for f in findings}
    assert len(out) == len(findings)
    return out


def test_a_feature_name_shared_by_tenants_is_judged_per_tenant_and_app(tmp_path: Path) -> None:
    with Store(tmp_path / "s.duckdb") as store:
        insert(store, shared_feature(), feature="f")
        found = by_tenant(run(store))
        hours = {
            t: scope_hours(store, t, a, "gpt-4o")
            for t, a in (("acme", "support"), ("globex", "helpdesk"))
        }
    # one finding: acme's mini (0.88) clears the 0.85 bar on its own figures. globex's
    # (0.60) misses it: no share of the mix (pooled, 0.74 gave it 0.3125 of the traffic),
    # and every mini answer would escalate. initech has no mini samples of its own.
    assert sorted(found) == ["acme"]
    f = found["acme"]
    assert f.scope == {"tenant": "acme", "app": "support", "feature": "f", "model": "gpt-4o"}
    cands = {c["model"]: c for c in f.evidence["candidates"]}
    assert set(cands) == {"gpt-4o", "gpt-4o-mini"}
    # acme's own figures and sample counts (pooled: mini 0.74 on 1,620, 4o on 7,180)
    assert cands["gpt-4o"]["quality"] == pytest.approx(0.90)
    assert cands["gpt-4o"]["quality_samples"] == FOUR
    assert cands["gpt-4o"]["requests"] == FOUR
    assert cands["gpt-4o-mini"]["quality"] == pytest.approx(0.88)
    assert cands["gpt-4o-mini"]["quality_samples"] == MINI
    assert cands["gpt-4o-mini"]["requests"] == MINI
    assert f.evidence["requests"] == FOUR
    assert f.evidence["lp"]["shares"] == pytest.approx({"gpt-4o-mini": 1.0})
    assert f.monthly_savings_usd == pytest.approx(
        per_month((cost("gpt-4o") - cost("gpt-4o-mini")) * FOUR, hours["acme"])
    )
    assert f.evidence_requests == FOUR


def test_a_cheaper_model_below_the_bar_takes_no_share_of_the_mix(tmp_path: Path) -> None:
    """Mixing a 0.60 model into 0.90 traffic meets a 0.85 bar on average; no request does."""
    with Store(tmp_path / "s.duckdb") as store:
        insert(
            store,
            [
                *events("globex", "helpdesk", "gpt-4o", FOUR, quality=0.90),
                *events("globex", "helpdesk", "gpt-4o-mini", MINI, quality=0.60),
            ],
            feature="f",
        )
        assert run(store) == []


def test_evaluations_are_keyed_by_tenant_app_feature_and_model(tmp_path: Path) -> None:
    with Store(tmp_path / "s.duckdb") as store:
        insert(store, shared_feature(), feature="f")

        def evaluate(tenant: str, app: str, quality: float) -> None:
            store.write(
                lambda con: con.execute(
                    "INSERT INTO model_evaluations (tenant, app, feature, model, quality, "
                    "samples, updated_at) VALUES (?, ?, 'f', 'gpt-4o-mini', ?, 500, ?)",
                    [tenant, app, quality, NOW],
                )
            )

        # acme's evaluation of mini on its "f" says nothing about initech's "f"
        evaluate("acme", "support", 0.95)
        found = by_tenant(run(store, candidates=["p/gpt-4o-mini"]))
        assert sorted(found) == ["acme"]  # globex's own mini (0.60, events) misses the bar
        mini = next(c for c in found["acme"].evidence["candidates"] if c["model"] == "gpt-4o-mini")
        assert (mini["quality"], mini["quality_source"]) == (0.95, "evaluation")
        # nor does an evaluation of another app of the same tenant
        evaluate("initech", "search", 0.95)
        assert "initech" not in by_tenant(run(store, candidates=["p/gpt-4o-mini"]))
        # initech's own evaluation makes mini a candidate there (named by `candidates`)
        evaluate("initech", "chat", 0.95)
        found = by_tenant(run(store, candidates=["p/gpt-4o-mini"]))
    initech = found["initech"].evidence
    assert initech["lp"]["shares"] == pytest.approx({"gpt-4o-mini": 1.0})
    mini = next(c for c in initech["candidates"] if c["model"] == "gpt-4o-mini")
    assert (mini["quality"], mini["quality_source"], mini["requests"]) == (0.95, "evaluation", 0)


def test_upgraded_store_rebuilds_routing_per_tenant(tmp_path: Path) -> None:
    """A store from before routing was scoped: its pooled histograms and watermark are
    dropped, its evaluations kept (tenant and app unset), and the next run sees each
    tenant's own figures, as on a fresh store."""
    import duckdb

    from finopsd.store import MIGRATIONS

    scoped = next(i for i, (d, _) in enumerate(MIGRATIONS) if d.startswith("routing: histograms"))
    path = tmp_path / "old.duckdb"
    con = duckdb.connect(str(path))
    con.execute(
        "CREATE TABLE schema_version (version INTEGER PRIMARY KEY, "
        "applied_at TIMESTAMPTZ NOT NULL, description VARCHAR NOT NULL)"
    )
    for version, (description, sql) in enumerate(MIGRATIONS[:scoped], start=1):
        con.execute(sql)
        con.execute("INSERT INTO schema_version VALUES (?, now(), ?)", [version, description])
    # a routing run of the old code: pooled rows, a watermark past everything
    con.execute("INSERT INTO rollup_state VALUES ('routing', ?)", [NOW + timedelta(days=1)])
    con.execute(
        "INSERT INTO routing_stats VALUES (?, 'gpt-4o-mini', 'f', 'latency', 138, 1620)", [DAY0]
    )
    con.execute("INSERT INTO model_evaluations VALUES ('gpt-4o-mini', 'f', 0.7, 100, ?)", [NOW])
    con.close()
    with Store(path) as old, Store(tmp_path / "fresh.duckdb") as fresh:
        assert old.schema_version() == len(MIGRATIONS)
        assert old.cursor().execute(
            "SELECT tenant, app, feature, model, quality, samples FROM model_evaluations"
        ).fetchall() == [(None, None, "f", "gpt-4o-mini", 0.7, 100)]
        for store in (old, fresh):
            insert(store, shared_feature(), feature="f")
        upgraded, scratch = run(old), run(fresh)
        assert _rows(old, "routing_stats") == _rows(fresh, "routing_stats")
    assert sorted(by_tenant(upgraded)) == ["acme"]
    assert _summary(upgraded) == _summary(scratch)
