"""batch: batch-labelled traffic billed at synchronous prices, and recurring off-hours bursts.

Events are built here with known costs; ``m1`` has a 50 % batch discount,
``m2`` none. The chat apps spend $0.01 in every daytime hour (07:00-23:00
UTC) of ten days; ``chat`` also spends $1.00 at 02:00 every one of those
days, ``chat-once`` only on one of them.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from finopsd.analyzers.base import DAYS_PER_MONTH, HOURS_PER_MONTH, Finding
from finopsd.analyzers.runner import build, run_analyzers, stored_findings
from finopsd.pricing import Price, PriceBook
from finopsd.store import Store

NOW = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
DAY0 = datetime(2026, 2, 28, tzinfo=UTC)
BOOK = PriceBook(
    [
        Price("p", "m1", date(2025, 1, 1), 1.0, 2.0, batch_discount=0.5),
        Price("p", "m2", date(2025, 1, 1), 1.0, 2.0, batch_discount=0.0),
    ]
)

Row = dict[str, Any]


def row(
    i: int,
    ts: datetime,
    cost: float,
    *,
    app: str,
    model: str = "m1",
    feature: str = "f",
    latency_class: str = "interactive",
    billing_mode: str = "standard",
) -> Row:
    return {
        "event_id": f"{app}-{i}",
        "ts": ts,
        "provider": "p",
        "request_model": model,
        "input_tokens": 100,
        "output_tokens": 10,
        "tenant": "acme",
        "app": app,
        "feature": feature,
        "status": "ok",
        "latency_class": latency_class,
        "billing_mode": billing_mode,
        "list_cost_usd": cost / (0.5 if billing_mode == "batch" else 1.0),
        "cost_usd": cost,
    }


def insert(store: Store, rows: list[Row]) -> None:
    table = pa.Table.from_pylist(rows)

    def work(con: Any) -> None:
        con.register("new_rows", table)
        con.execute("INSERT INTO usage_events BY NAME SELECT * FROM new_rows")
        con.unregister("new_rows")

    store.write(work)


def sync_batch_rows() -> list[Row]:
    """acme / etl: 10 batch-labelled m1 requests at $0.02 (standard), 10 at $0.01 already
    batch-billed, 10 on m2 (no discount) at $0.05."""
    t = DAY0 + timedelta(hours=12)
    out = []
    for i in range(10):
        ts = t + timedelta(hours=i)
        out.append(row(i, ts, 0.02, app="etl", feature="extract", latency_class="batch"))
        out.append(
            row(
                100 + i,
                ts,
                0.01,
                app="etl",
                feature="nightly",
                latency_class="batch",
                billing_mode="batch",
            )
        )
        out.append(
            row(200 + i, ts, 0.05, app="etl", feature="other", model="m2", latency_class="batch")
        )
    return out


def chat_rows(app: str, burst_days: list[int], days: range = range(10)) -> list[Row]:
    out = []
    for d in days:
        day = DAY0 + timedelta(days=d)
        for h in range(7, 24):
            out.append(row(len(out), day + timedelta(hours=h, minutes=5), 0.01, app=app))
        if d in burst_days:
            out.append(row(len(out), day + timedelta(hours=2, minutes=30), 1.0, app=app))
    return out


def run(store: Store, now: datetime = NOW, **options: Any) -> list[Finding]:
    opts = {"min_monthly_savings_usd": 0.0, **options}
    (result,) = run_analyzers(store, BOOK, build({"batch": opts}, only=["batch"]), now=now)
    assert result.error is None, result.error
    return result.findings


def per_month(saved_usd: float, days: float) -> float:
    """A saving seen over ``days`` of traffic, per month (not over the 30-day window)."""
    return saved_usd / days * DAYS_PER_MONTH


def test_batch_labelled_standard_traffic(tmp_path: Path) -> None:
    with Store(tmp_path / "s.duckdb") as store:
        insert(store, sync_batch_rows())
        findings = run(store)
    # the batch-billed feature and the model without a discount give nothing
    (f,) = findings
    assert f.kind == "batch.latency_tolerant"
    assert f.scope == {
        "tenant": "acme",
        "app": "etl",
        "feature": "extract",
        "provider": "p",
        "model": "m1",
    }
    assert f.evidence["requests"] == 10
    assert f.evidence["cost_usd"] == pytest.approx(0.2)
    assert f.evidence["batch_discount"] == 0.5
    assert f.evidence["window_savings_usd"] == pytest.approx(0.1)
    # 10 requests in 10 hours: provisional, the rate taken over min_evidence_hours (24)
    assert (f.evidence_hours, f.evidence_requests, f.provisional) == (10.0, 10, True)
    assert f.title.endswith("(provisional: 10 h of traffic, 10 requests)")
    assert f.monthly_savings_usd == pytest.approx(0.1 / 24 * HOURS_PER_MONTH)
    assert f.monthly_savings_low_usd == 0.0
    assert f.monthly_savings_high_usd == pytest.approx(0.1 / 10 * HOURS_PER_MONTH)
    assert f.action is not None and f.action.actuator == "provider.batch"
    assert f.action.params["match"] == f.scope and f.risk == "low"


def test_a_week_of_batch_traffic_is_projected_over_the_week(tmp_path: Path) -> None:
    """Seven days of latency-tolerant traffic at synchronous prices, read with the 30-day
    window: the week's saving over 7 days, per month (the window gave 7/30 of it), within
    its interval, and not provisional."""
    start = NOW - timedelta(days=7)
    rows = [
        row(
            i,
            start + timedelta(minutes=10 * i + 3),
            0.02 + 0.01 * (i % 5),
            app="etl",
            feature="extract",
            latency_class="batch",
        )
        for i in range(7 * 24 * 6)
    ]
    saved = sum(r["cost_usd"] for r in rows) * 0.5
    by_hand = saved / 7 * DAYS_PER_MONTH
    with Store(tmp_path / "s.duckdb") as store:
        insert(store, rows)
        (f,) = run(store)
    assert f.monthly_savings_usd == pytest.approx(by_hand, rel=0.02)
    assert f.monthly_savings_low_usd <= by_hand <= f.monthly_savings_high_usd
    assert f.evidence_hours == pytest.approx(7 * 24, abs=1)
    assert f.evidence_requests == len(rows) and not f.provisional
    assert f.eligible_for_action and "provisional" not in f.title


def test_recurring_offhours_burst_found_one_off_not(tmp_path: Path) -> None:
    with Store(tmp_path / "s.duckdb") as store:
        insert(store, chat_rows("chat", burst_days=list(range(10))))
        insert(store, chat_rows("chat-once", burst_days=[4]))
        findings = run(store)
    (f,) = findings
    assert f.kind == "batch.offhours_burst"
    assert f.scope == {"tenant": "acme", "app": "chat"}
    (burst,) = f.evidence["bursts"]
    assert burst["hour_utc"] == 2
    assert (burst["burst_days"], burst["days"]) == (10, 10)
    assert burst["daytime_median_usd"] == pytest.approx(0.01)
    excess = 10 * (1.0 - 0.01)
    assert burst["excess_usd"] == pytest.approx(excess)
    assert burst["batch_discount"] == 0.5
    # ten days of the app's traffic: the saving over ten days, per month
    assert f.evidence_hours == 240.0
    assert f.monthly_savings_usd == pytest.approx(per_month(excess * 0.5, 10))
    assert f.monthly_savings_low_usd <= f.monthly_savings_usd <= f.monthly_savings_high_usd
    assert f.risk == "medium" and f.confidence < 0.9
    assert f.action is not None and f.action.params["hours_utc"] == [2]


def test_offhours_thresholds(tmp_path: Path) -> None:
    with Store(tmp_path / "s.duckdb") as store:
        # bursts on 5 of 10 days: below the default 60 % of days, found at 50 %
        insert(store, chat_rows("chat", burst_days=[0, 2, 4, 6, 8]))
        assert run(store) == []
        (f,) = run(store, min_day_share=0.5)
        assert f.evidence["bursts"][0]["burst_days"] == 5
        # 02:00 outside the off-hours asked for: nothing
        assert run(store, min_day_share=0.5, hours=[0, 1, 3]) == []
        # too few days of traffic to call anything recurring
        assert run(store, min_day_share=0.5, min_days=11) == []
        assert run(store, min_day_share=0.5, offhours=False) == []


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="hours"):
        build({"batch": {"hours": [25]}}, only=["batch"])


def test_ids_stable_second_run_updates(tmp_path: Path) -> None:
    with Store(tmp_path / "s.duckdb") as store:
        insert(store, sync_batch_rows() + chat_rows("chat", burst_days=list(range(10))))
        first = run(store)
        second = run(store, now=NOW + timedelta(hours=1))
        assert sorted(f.id for f in first) == sorted(f.id for f in second)
        assert len(first) == 2
        stored = stored_findings(store.cursor(), analyzer="batch")
        assert {s["id"] for s in stored} == {f.id for f in first}
        assert all(s["times_seen"] == 2 for s in stored)


def _summary(findings: list[Finding]) -> list[tuple[Any, ...]]:
    def rounded(value: Any) -> Any:
        if isinstance(value, float):
            return round(value, 9)
        if isinstance(value, dict):
            return {k: rounded(v) for k, v in value.items()}
        if isinstance(value, list):
            return [rounded(v) for v in value]
        return value

    return sorted(
        (f.id, round(f.monthly_savings_usd, 9), repr(rounded(f.evidence))) for f in findings
    )


def _rows(store: Store) -> list[tuple[Any, ...]]:
    """``batch_hourly``'s rows, sorted, floats rounded (sums may add up in another order)."""
    rows = store.cursor().execute("SELECT * FROM batch_hourly ORDER BY ALL").fetchall()
    return [tuple(round(v, 9) if isinstance(v, float) else v for v in r) for r in rows]


def test_incremental_equals_from_scratch(tmp_path: Path) -> None:
    early = sync_batch_rows() + chat_rows("chat", burst_days=list(range(6)), days=range(6))
    late = chat_rows("chat", burst_days=list(range(6, 10)), days=range(6, 10))
    late = [{**r, "event_id": r["event_id"] + "-late"} for r in late]
    extra = [
        row(
            900,
            DAY0 + timedelta(hours=15),
            0.4,
            app="etl",
            feature="extract",
            latency_class="batch",
        )
    ]  # a late event for an hour already rolled up
    with Store(tmp_path / "inc.duckdb") as inc, Store(tmp_path / "full.duckdb") as full:
        insert(inc, early)
        first = run(inc)
        assert len(first) == 2
        insert(inc, late + extra)
        incremental = run(inc, now=NOW + timedelta(hours=1))
        insert(full, early + late + extra)
        scratch = run(full, now=NOW + timedelta(hours=1))
        assert _rows(inc) == _rows(full)
    assert _summary(incremental) == _summary(scratch)
    latency = next(f for f in incremental if f.kind == "batch.latency_tolerant")
    assert latency.evidence["cost_usd"] == pytest.approx(0.6)


def test_a_nightly_job_is_projected_over_all_the_time_observed(tmp_path: Path) -> None:
    """Observed from 13:00 on day 0 to 12:00 on day 7 (an interactive app's traffic); a
    batch-labelled job runs 01:00-03:00 every night, 7 nights at $0.30 each. Between its
    own first and last hour it spans 6 days 3 hours; it was watched for 7 days: its first
    run came within the first day observed, so the span starts with the observation, and
    it runs to the last hour observed, not to the job's last hour."""
    start = DAY0 + timedelta(hours=13)
    rows = [
        row(i, start + timedelta(hours=i), 0.01, app="web", latency_class="interactive")
        for i in range(7 * 24)
    ]
    for night in range(1, 8):
        for h in range(1, 4):
            ts = DAY0 + timedelta(days=night, hours=h)
            rows.append(row(1000 + night * 10 + h, ts, 0.10, app="etl", latency_class="batch"))
    with Store(tmp_path / "s.duckdb") as store:
        insert(store, rows)
        (f,) = [x for x in run(store) if x.kind == "batch.latency_tolerant"]
    assert f.evidence_hours == 7 * 24
    # 7 x $0.30 at the 50 % batch discount, over 7 days
    assert f.monthly_savings_usd == pytest.approx(per_month(7 * 0.30 * 0.5, 7))
    assert f.monthly_savings_low_usd == pytest.approx(f.monthly_savings_usd)  # every day alike
