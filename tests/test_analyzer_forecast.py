"""The forecast analyzer on daily spend whose month-end the test works out itself.

Spend is written as one priced usage event per tenant and hour (a day's
spend spread evenly over its 24 hours). Constant tenants have a forecast and
breach day worked out by hand; a linearly growing (noisy) tenant is checked
against ``numpy.polyfit`` and a prediction interval computed here from
polyfit's covariance.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pytest
from scipy import stats

from finopsd.analyzers.base import Finding
from finopsd.analyzers.runner import build, run_analyzers, stored_findings
from finopsd.pricing import PriceBook
from finopsd.store import Store

PREV = datetime(2026, 5, 1, tzinfo=UTC)  # May has 31 days, June 30
JUNE = datetime(2026, 6, 1, tzinfo=UTC)
PRICES = PriceBook([])


def insert(
    store: Store,
    daily: dict[str, Callable[[int], float]],
    start: datetime,
    end: datetime,
    ingested: datetime | None = None,
) -> None:
    """Hourly events in [start, end): tenant's spend on day i (from PREV) is ``daily[t](i)``."""
    cols: dict[str, list[object]] = {k: [] for k in ("event_id", "ts", "tenant", "cost_usd")}
    hour = start
    while hour < end:
        day = (hour - PREV).days
        for tenant, f in daily.items():
            cols["event_id"].append(f"{tenant}-{hour.isoformat()}")
            cols["ts"].append(hour + timedelta(minutes=10))
            cols["tenant"].append(tenant)
            cols["cost_usd"].append(f(day) / 24)
        hour += timedelta(hours=1)
    n = len(cols["event_id"])
    table = pa.table(
        {
            **cols,
            "ts": pa.array(cols["ts"], pa.timestamp("us", tz="UTC")),
            "provider": ["openai"] * n,
            "request_model": ["gpt-4o"] * n,
            "input_tokens": [1000] * n,
            "output_tokens": [100] * n,
            "status": ["ok"] * n,
            "latency_class": ["interactive"] * n,
            "billing_mode": ["standard"] * n,
            "ingested_at": pa.array([ingested or end] * n, pa.timestamp("us", tz="UTC")),
        }
    )

    def write(con: duckdb.DuckDBPyConnection) -> None:
        con.register("new_events", table)
        con.execute("INSERT INTO usage_events BY NAME SELECT * FROM new_events")
        con.unregister("new_events")

    store.write(write)


def run(store: Store, now: datetime, **options: object) -> list[Finding]:
    (result,) = run_analyzers(
        store, PRICES, build({"forecast": options}, only=["forecast"]), now=now
    )
    assert result.error is None, result.error
    return result.findings


def by_tenant(findings: list[Finding]) -> dict[str, Finding]:
    assert all(f.kind == "forecast.budget" for f in findings)
    return {f.scope["tenant"]: f for f in findings}


def forecast_rows(store: Store) -> dict[str, dict[str, object]]:
    cur = store.cursor().execute("SELECT * FROM spend_forecast")
    names = [d[0] for d in cur.description or []]
    rows = [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
    return {str(r["tenant"]): r for r in rows}


def test_constant_spend_breach_day_and_thresholds(tmp_path: Path) -> None:
    # $100 a day; at June 10 12:00, month-to-date = 9 days + half a day = $950, the rest of
    # today is forecast at $50 and the 20 days after at $100: month-end = $3,000.
    now = datetime(2026, 6, 10, 12, tzinfo=UTC)
    tenants = ["breach", "t80", "t90", "t100", "under", "actual", "nobudget"]
    budgets = {
        # cumulative at the end of June 10 = $1,000, then +$100 a day: $2,050 is crossed
        # during June 21 (1,000 + 11 x 100 = 2,100 >= 2,050; June 20 ends at 2,000)
        "breach": 2050.0,
        "t80": 3000 / 0.85,  # forecast 85 % of budget
        "t90": 3000 / 0.95,  # 95 %
        "t100": 2900.0,  # 103 %: crossed during June 29 (1,000 + 19 x 100 = 2,900)
        "under": 3000 / 0.7,  # 70 %: below the lowest threshold
        "actual": 850.0,  # month-to-date $950 is already over: crossed on June 9 ($900)
        "*": 7 * 3000 / 0.88,  # the total: 7 tenants x $3,000, 88 %
    }
    with Store(tmp_path / "s.duckdb") as store:
        insert(store, {t: lambda _d: 100.0 for t in tenants}, PREV, now)
        found = by_tenant(run(store, now, budgets=budgets))
        assert set(found) == {"breach", "t80", "t90", "t100", "actual", "*"}

        b = found["breach"]
        assert b.scope == {"tenant": "breach"}
        ev = b.evidence
        assert ev["month"] == "2026-06"
        assert ev["month_to_date_usd"] == pytest.approx(950.0)
        assert ev["forecast_usd"] == pytest.approx(3000.0)
        assert ev["interval"]["level"] == 0.8
        assert ev["interval"]["low_usd"] == pytest.approx(3000.0)
        assert ev["interval"]["high_usd"] == pytest.approx(3000.0)
        assert ev["budget_usd"] == 2050.0
        assert ev["forecast_percent"] == pytest.approx(3000 / 2050 * 100)
        assert ev["month_to_date_percent"] == pytest.approx(950 / 2050 * 100)
        assert ev["threshold_percent"] == 100.0 and ev["crossed_by"] == "forecast"
        assert ev["breach_date"] == "2026-06-21" and ev["breach_by"] == "forecast"
        assert ev["fit"]["days"] == 40  # May 1 .. June 9
        assert ev["fit"]["slope_usd_per_day_per_day"] == pytest.approx(0.0, abs=1e-9)
        assert b.monthly_savings_usd == pytest.approx(950.0)
        assert b.savings_method.startswith("this month's forecast overrun beyond budget")
        # the interval: the forecast's, less the budget; the evidence: May 1 .. June 10 12:00
        assert b.monthly_savings_low_usd == pytest.approx(950.0)
        assert b.monthly_savings_high_usd == pytest.approx(950.0)
        assert (b.evidence_hours, b.evidence_requests) == (40.5 * 24, 972)
        assert not b.provisional
        assert b.risk == "medium"  # breach 11 days away (> 7)
        assert b.action is not None and b.action.actuator == "gateway.rate_limit"
        # what is left of the budget ($1,100) over the 20.5 days left (June 10 12:00 .. July 1)
        assert b.action.params["max_usd_per_day"] == pytest.approx(1100 / 20.5, abs=0.01)

        for tenant, pct in (("t80", 80.0), ("t90", 90.0)):
            f = found[tenant]
            assert f.evidence["threshold_percent"] == pct
            assert f.evidence["crossed_by"] == "forecast"
            assert f.evidence["breach_date"] is None
            assert f.monthly_savings_usd == 0.0
            assert f.risk == "low" and f.action is None
        t100 = found["t100"]
        assert t100.evidence["threshold_percent"] == 100.0
        assert t100.evidence["breach_date"] == "2026-06-29"
        assert t100.monthly_savings_usd == pytest.approx(100.0)

        act = found["actual"]
        assert act.evidence["crossed_by"] == "actual"
        assert act.evidence["threshold_percent_by_actual"] == 100.0
        assert act.evidence["breach_date"] == "2026-06-09"
        assert act.evidence["breach_by"] == "actual"
        assert act.risk == "high" and act.confidence == 1.0
        assert act.monthly_savings_usd == pytest.approx(3000 - 850)

        total = found["*"]
        assert total.evidence["forecast_usd"] == pytest.approx(7 * 3000)
        assert total.evidence["month_to_date_usd"] == pytest.approx(7 * 950)
        assert total.evidence["threshold_percent"] == 80.0

        # every tenant's forecast is kept, budget or not, and the total as "*"
        rows = forecast_rows(store)
        assert set(rows) == {*tenants, "*"}
        assert rows["nobudget"]["forecast_usd"] == pytest.approx(3000.0)
        assert rows["nobudget"]["budget_usd"] is None
        assert rows["nobudget"]["month"] == date(2026, 6, 1)
        assert rows["breach"]["budget_usd"] == 2050.0

        # ids are stable: a second run updates the same rows
        again = by_tenant(run(store, now, budgets=budgets))
        assert {t: f.id for t, f in again.items()} == {t: f.id for t, f in found.items()}
        stored = stored_findings(store.cursor(), analyzer="forecast")
        assert len(stored) == 6 and all(r["times_seen"] == 2 for r in stored)
        assert len(forecast_rows(store)) == len(tenants) + 1  # replaced, not added


def test_threshold_options_and_no_budget(tmp_path: Path) -> None:
    now = datetime(2026, 6, 10, 12, tzinfo=UTC)
    with Store(tmp_path / "s.duckdb") as store:
        insert(store, {"a": lambda _d: 100.0, "b": lambda _d: 100.0}, PREV, now)
        assert run(store, now) == []  # no budgets: no findings
        assert run(store, now, budgets={"b": 4000.0}) == []  # 75 %: under 80 %
        (f,) = run(store, now, budgets={"b": 4000.0}, thresholds=[0.5, 0.75])
        assert f.scope == {"tenant": "b"} and f.evidence["threshold_percent"] == 75.0


def test_growing_tenant_matches_polyfit(tmp_path: Path) -> None:
    # $50 + $3 a day, plus a repeating wiggle so the fit has residuals; now at midnight
    now = datetime(2026, 6, 15, tzinfo=UTC)
    wiggle = [4.0, -3.0, 1.0, -2.0, 0.5]

    def grow(d: int) -> float:
        return 50.0 + 3.0 * d + wiggle[d % 5]

    with Store(tmp_path / "s.duckdb") as store:
        insert(store, {"grow": grow}, PREV, now)
        # independently: fit May 1 .. June 14 (45 days), predict June 15 .. 30
        x = np.arange(45, dtype=float)
        y = np.array([grow(d) for d in range(45)])
        coef, cov = np.polyfit(x, y, 1, cov="unscaled")
        future = np.arange(45, 61, dtype=float)
        predicted = np.polyval(coef, future)
        mtd = sum(grow(d) for d in range(31, 45))
        point = mtd + predicted.sum()
        resid = y - np.polyval(coef, x)
        s2 = (resid**2).sum() / (45 - 2)
        v = np.array([future.sum(), len(future)])  # polyfit's order: slope, intercept
        se = math.sqrt(s2 * (len(future) + v @ cov @ v))
        q = stats.t.ppf(0.9, 43)
        # a budget the cumulative forecast crosses on the 6th forecast day, June 20
        budget = mtd + predicted[:5].sum() + predicted[5] / 2
        (f,) = run(store, now, budgets={"grow": budget})
        ev = f.evidence
        assert ev["month_to_date_usd"] == pytest.approx(mtd)
        assert ev["forecast_usd"] == pytest.approx(point)
        assert ev["interval"]["low_usd"] == pytest.approx(point - q * se)
        assert ev["interval"]["high_usd"] == pytest.approx(point + q * se)
        assert ev["interval"]["high_usd"] > point + 1  # the wiggle gives it width
        assert ev["fit"]["slope_usd_per_day_per_day"] == pytest.approx(coef[0])
        assert ev["fit"]["intercept_usd_per_day"] == pytest.approx(coef[1])
        assert ev["breach_date"] == "2026-06-20" and ev["breach_by"] == "forecast"
        assert ev["crossed_by"] == "forecast" and ev["threshold_percent"] == 100.0
        assert f.monthly_savings_usd == pytest.approx(point - budget)
        assert f.monthly_savings_low_usd == pytest.approx(max(0.0, point - q * se - budget))
        assert f.monthly_savings_high_usd == pytest.approx(point + q * se - budget)
        assert f.risk == "high"  # 5 days to breach
        # the chance the month ends over budget, from the same t distribution
        assert f.confidence == pytest.approx(
            min(0.99, stats.t.sf((budget - point) / se, 43)), abs=1e-3
        )
        # a 95 % interval is wider
        (wide,) = run(store, now, budgets={"grow": budget}, interval=0.95)
        q95 = stats.t.ppf(0.975, 43)
        assert wide.evidence["interval"]["high_usd"] == pytest.approx(point + q95 * se)


def test_short_history_counts_actual_only(tmp_path: Path) -> None:
    # three days of data (fewer than min_fit_days): no forecast, but the month-to-date
    # spend over budget is still reported
    now = datetime(2026, 6, 5, tzinfo=UTC)  # data on June 2, 3 and 4
    with Store(tmp_path / "s.duckdb") as store:
        insert(store, {"new": lambda _d: 100.0}, JUNE + timedelta(days=1), now)
        (f,) = run(store, now, budgets={"new": 150.0})
        assert f.evidence["forecast_usd"] is None and f.evidence["interval"] is None
        assert f.evidence["month_to_date_usd"] == pytest.approx(300.0)
        assert f.evidence["crossed_by"] == "actual"
        assert f.evidence["breach_date"] == "2026-06-03"  # $100 on June 2, $200 on June 3
        assert f.monthly_savings_usd == pytest.approx(150.0)
        assert forecast_rows(store) == {}
        # the fit starts at the tenant's first day, not at the start of last month
        assert (
            run(store, now, budgets={"new": 150.0}, min_fit_days=3)[0].evidence["fit"]["from"]
            == "2026-06-02"
        )


def _rounded(value: object) -> object:
    """``value`` with every float rounded to 9 significant digits, recursively; below 1e-9
    in size it is 0 (a residual spread of rounding noise, 1e-14 or 6e-15 by summation order)."""
    if isinstance(value, float):
        return float(f"{value:.9g}") if abs(value) >= 1e-9 else 0.0
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_rounded(v) for v in value]
    return value


def test_incremental_equals_from_scratch(tmp_path: Path) -> None:
    mid = datetime(2026, 6, 10, tzinfo=UTC)
    now = datetime(2026, 6, 10, 12, tzinfo=UTC)
    spend = {"a": lambda d: 40.0 + d, "b": lambda _d: 100.0}
    budgets = {"a": 1800.0, "b": 2900.0, "*": 4000.0}
    with Store(tmp_path / "a.duckdb") as a, Store(tmp_path / "b.duckdb") as b:
        insert(a, spend, PREV, mid)
        run(a, mid, budgets=budgets)
        insert(a, spend, mid, now)
        incremental = run(a, now, budgets=budgets)
        insert(b, spend, PREV, now)
        scratch = run(b, now, budgets=budgets)
        assert len(scratch) == 3
        # DuckDB's parallel sums may differ in the last bits from one grouping to another
        assert _rounded([f.as_dict() for f in incremental]) == _rounded(
            [f.as_dict() for f in scratch]
        )
        assert _rounded(forecast_rows(a)) == _rounded(forecast_rows(b))
