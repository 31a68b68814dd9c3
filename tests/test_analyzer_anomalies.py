"""The anomalies analyzer on hourly spend whose right answer the test computes itself.

Spend follows a daily shape (a 14:00 peak, three times the base), a weekly
one (weekends at half) and small seeded noise; spikes are injected at known
hours. The expected value of every hour is recomputed here with the
``statistics`` module (median of the same hour-of-week in previous weeks, or
of the same hour-of-day on previous days when fewer than two weeks of history
exist; MAD scaled by 1.4826) and the analyzer's findings are checked against
it: which hours, the numbers, the projected saving.
"""

from __future__ import annotations

import random
import statistics
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest

from finopsd.analyzers.base import DAYS_PER_MONTH, Finding
from finopsd.analyzers.runner import build, run_analyzers, stored_findings
from finopsd.pricing import PriceBook
from finopsd.store import Store

NOW = datetime(2026, 3, 30, tzinfo=UTC)  # the window is the 30 days (720 hours) before
START = NOW - timedelta(days=30)
HOURS = 720
SIGMAS = 4.0
MIN_EXCESS = 5.0
MIN_DAYS = 7
PRICES = PriceBook.shipped()

Spend = dict[tuple[str, str], dict[int, float]]
"""(tenant, model) to hourly spend by hour index from START."""


def shape(h: int, *, weekly: bool = True) -> float:
    """Spend of hour ``h`` after START without noise: $10, $30 at 14:00, half on weekends."""
    at = START + timedelta(hours=h)
    usd = 30.0 if at.hour == 14 else 10.0
    if weekly and at.weekday() >= 5:
        usd /= 2
    return usd


def series(seed: int, first: int = 0, *, weekly: bool = True) -> dict[int, float]:
    """Hourly spend from hour ``first`` to the last hour, with +-4 % seeded noise."""
    rng = random.Random(seed)
    return {
        h: shape(h, weekly=weekly) * (1 + rng.uniform(-0.04, 0.04)) for h in range(first, HOURS)
    }


def insert(
    store: Store, spend: dict[tuple[str, str], dict[int, float]], ingested: datetime
) -> None:
    """One priced usage event per (tenant, model, hour) carrying that hour's spend."""
    cols: dict[str, list[object]] = {
        k: [] for k in ("event_id", "ts", "tenant", "request_model", "cost_usd", "list_cost_usd")
    }
    for (tenant, model), hours in spend.items():
        for h, usd in hours.items():
            cols["event_id"].append(f"{tenant}-{model}-{h}")
            cols["ts"].append(START + timedelta(hours=h, minutes=30))
            cols["tenant"].append(tenant)
            cols["request_model"].append(model)
            cols["cost_usd"].append(usd)
            cols["list_cost_usd"].append(usd)
    n = len(cols["event_id"])
    table = pa.table(
        {
            **cols,
            "ts": pa.array(cols["ts"], pa.timestamp("us", tz="UTC")),
            "provider": ["openai"] * n,
            "input_tokens": [1000] * n,
            "output_tokens": [100] * n,
            "status": ["ok"] * n,
            "latency_class": ["interactive"] * n,
            "billing_mode": ["standard"] * n,
            "ingested_at": pa.array([ingested] * n, pa.timestamp("us", tz="UTC")),
        }
    )

    def write(con: duckdb.DuckDBPyConnection) -> None:
        con.register("new_events", table)
        con.execute("INSERT INTO usage_events BY NAME SELECT * FROM new_events")
        con.unregister("new_events")

    store.write(write)


def expected_hours(values: dict[int, float], upto: int) -> dict[int, dict[str, float | str]]:
    """Independently: every evaluated hour < ``upto`` with its baseline, and whether anomalous."""
    first = min(values)
    out: dict[int, dict[str, float | str]] = {}
    for h in range(first, upto):
        weeks = [values.get(h - 168 * k, 0.0) for k in range(1, 6) if h - 168 * k >= first]
        days = [values.get(h - 24 * k, 0.0) for k in range(1, 31) if h - 24 * k >= first]
        if len(weeks) >= 2:
            points, kind = weeks, "hour_of_week"
        elif len(days) >= MIN_DAYS:
            points, kind = days, "hour_of_day"
        else:
            continue
        med = statistics.median(points)
        mad = statistics.median(abs(p - med) for p in points)
        sigma = 1.4826 * mad
        actual = values.get(h, 0.0)
        out[h] = {
            "actual": actual,
            "expected": med,
            "mad": mad,
            "sigma": sigma,
            "baseline": kind,
            "points": len(points),
            "anomalous": actual > med + SIGMAS * sigma and actual - med > MIN_EXCESS,
        }
    return out


def run(store: Store, now: datetime = NOW, **options: object) -> list[Finding]:
    analyzers = build({"anomalies": options}, only=["anomalies"])
    (result,) = run_analyzers(store, PRICES, analyzers, now=now)
    assert result.error is None, result.error
    return result.findings


@pytest.fixture
def data() -> Spend:
    """acme/gpt-4o: three spikes (two in the last day); globex: the same shape, none;
    initech: ten days of history only, one spike in the last day."""
    acme = series(1)
    spikes = {HOURS - 3: 120.0, HOURS - 10: 60.0, 20 * 24 + 5: 80.0}
    for h, extra in spikes.items():
        acme[h] += extra
    initech = series(3, first=HOURS - 240, weekly=False)
    initech[HOURS - 2] += 50.0
    return {
        ("acme", "gpt-4o"): acme,
        ("globex", "gpt-4o-mini"): series(2),
        ("initech", "claude-haiku-4-5"): initech,
    }


def test_spikes_found_against_seasonal_baseline(tmp_path: Path, data: Spend) -> None:
    with Store(tmp_path / "s.duckdb") as store:
        insert(store, data, START)
        findings = {(f.scope["tenant"], f.scope["model"]): f for f in run(store)}
        assert set(findings) == {("acme", "gpt-4o"), ("initech", "claude-haiku-4-5")}

        for key, f in findings.items():
            truth = expected_hours(data[key], HOURS)
            hits = sorted(h for h, t in truth.items() if t["anomalous"])
            assert f.kind == "anomalies.spend_spike"
            assert f.scope == {"tenant": key[0], "model": key[1]}
            listed = f.evidence["anomalous_hours"]
            assert [e["hour"] for e in listed] == [
                (START + timedelta(hours=h)).isoformat() for h in reversed(hits)
            ]
            for e, h in zip(listed, reversed(hits), strict=True):
                t = truth[h]
                assert e["actual_usd"] == pytest.approx(t["actual"])
                assert e["expected_usd"] == pytest.approx(t["expected"])
                assert e["mad_usd"] == pytest.approx(t["mad"])
                assert e["z"] == pytest.approx((t["actual"] - t["expected"]) / t["sigma"])
                assert e["excess_usd"] == pytest.approx(t["actual"] - t["expected"])
                assert e["baseline"] == t["baseline"]
                assert e["baseline_points"] == t["points"]
            excess = sum(truth[h]["actual"] - truth[h]["expected"] for h in hits)
            evaluated = len(truth)
            assert f.evidence["window_anomalous_hours"] == len(hits)
            assert f.evidence["evaluated_hours"] == evaluated
            # a spike is not a recurring saving: its excess is evidence, and what it would
            # cost a month if it persisted is labelled so, never a monthly saving
            assert f.monthly_savings_usd == 0.0
            assert f.monthly_savings_low_usd == f.monthly_savings_high_usd == 0.0
            assert f.evidence["window_excess_usd"] == pytest.approx(excess)
            recent = [h for h in hits if h >= HOURS - 24]
            assert f.evidence["recent_excess_usd"] == pytest.approx(
                sum(truth[h]["actual"] - truth[h]["expected"] for h in recent)
            )
            assert f.evidence["monthly_usd_if_it_persists"] == pytest.approx(
                excess / (evaluated / 24) * DAYS_PER_MONTH
            )
            assert f"${f.evidence['recent_excess_usd']:,.2f} above expected" in f.title
            assert f.evidence_hours == HOURS - min(data[key]) and not f.provisional
            assert f.risk == "low"
            assert f.action is not None and f.action.actuator == "gateway.rate_limit"
            assert f.action.params["tenant"] == key[0] and f.action.params["model"] == key[1]
            assert 0 < f.confidence <= 0.95

        # the hand-made truth: exactly the injected spikes, never the daily 14:00 peak
        acme = findings[("acme", "gpt-4o")]
        assert [e["hour"] for e in acme.evidence["anomalous_hours"]] == [
            (START + timedelta(hours=h)).isoformat() for h in (HOURS - 3, HOURS - 10, 485)
        ]
        assert acme.evidence["recent_anomalous_hours"] == 2
        assert all(e["baseline"] == "hour_of_week" for e in acme.evidence["anomalous_hours"])
        initech = findings[("initech", "claude-haiku-4-5")]
        (hour,) = initech.evidence["anomalous_hours"]
        assert hour["hour"] == (START + timedelta(hours=HOURS - 2)).isoformat()
        assert hour["baseline"] == "hour_of_day" and hour["baseline_points"] == 9
        # HOURS - 10 is a 14:00 peak hour with a spike on top: caught; the other peaks are not
        peaks = [h for h in data[("acme", "gpt-4o")] if shape(h) >= 15 and h != HOURS - 10]
        assert len(peaks) == 29
        truth = expected_hours(data[("acme", "gpt-4o")], HOURS)
        assert not any(truth[h]["anomalous"] for h in peaks if h in truth)


def test_no_spike_no_finding_and_peak_not_flagged(tmp_path: Path) -> None:
    flat = {("globex", "gpt-4o-mini"): series(2), ("hooli", "gpt-4o"): series(4)}
    with Store(tmp_path / "s.duckdb") as store:
        insert(store, flat, START)
        assert run(store) == []
        for values in flat.values():
            truth = expected_hours(values, HOURS)
            assert not any(t["anomalous"] for t in truth.values())
            # a non-seasonal baseline would flag every weekday peak: the peak exceeds the
            # median hour by far more than the minimum excess and its spread
            overall = statistics.median(values.values())
            peaks = [v for v in values.values() if v > 20]
            assert len(peaks) == 20 and min(peaks) - overall > 3 * MIN_EXCESS


def test_ids_stable_second_run_updates_then_resolves(tmp_path: Path, data: Spend) -> None:
    with Store(tmp_path / "s.duckdb") as store:
        insert(store, data, START)
        first = run(store)
        second = run(store)
        assert sorted(f.id for f in first) == sorted(f.id for f in second)
        rows = stored_findings(store.cursor(), analyzer="anomalies")
        assert len(rows) == 2 and all(r["times_seen"] == 2 for r in rows)
        assert {r["id"] for r in rows} == {f.id for f in first}
        # two days later with no new spend (hours at $0 are below expected): resolved
        assert run(store, now=NOW + timedelta(days=2)) == []
        resolved = stored_findings(store.cursor(), analyzer="anomalies", status="resolved")
        assert {r["id"] for r in resolved} == {f.id for f in first}


def _rounded(value: object) -> object:
    """``value`` with every float rounded to 9 significant digits, recursively."""
    if isinstance(value, float):
        return float(f"{value:.9g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_rounded(v) for v in value]
    return value


def test_incremental_equals_from_scratch(tmp_path: Path, data: Spend) -> None:
    cut = HOURS - 20
    early = {k: {h: v for h, v in s.items() if h < cut} for k, s in data.items()}
    late = {k: {h: v for h, v in s.items() if h >= cut} for k, s in data.items()}
    with Store(tmp_path / "a.duckdb") as a, Store(tmp_path / "b.duckdb") as b:
        insert(a, early, START)
        before = run(a, now=START + timedelta(hours=cut))
        # at the cut, only the old acme spike (hour 485) lies in the window: not recent
        assert before == []
        insert(a, late, START + timedelta(hours=cut))
        incremental = run(a)
        insert(b, data, START)
        scratch = run(b)
        # DuckDB's parallel sums may differ in the last bits from one grouping to another
        assert _rounded([f.as_dict() for f in incremental]) == _rounded(
            [f.as_dict() for f in scratch]
        )
        assert len(scratch) == 2


def test_options_change_the_rule(tmp_path: Path, data: Spend) -> None:
    with Store(tmp_path / "s.duckdb") as store:
        insert(store, data, START)
        # a minimum excess above every spike: nothing is worth a finding
        assert run(store, min_excess_usd=500.0) == []
        (f,) = run(store, recent_hours=2)  # only the initech spike (hour HOURS - 2) is recent
        assert f.scope == {"tenant": "initech", "model": "claude-haiku-4-5"}
        (acme,) = [x for x in run(store, max_listed=1) if x.scope["tenant"] == "acme"]
        assert len(acme.evidence["anomalous_hours"]) == 1
        assert acme.evidence["window_anomalous_hours"] == 3
