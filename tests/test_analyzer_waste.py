"""waste: failed requests and retries, context bloat, fine-tune candidates, on traffic built here.

Events are priced by a ``PriceBook`` of the prices below (what ingest does), and
every expected number is worked out by hand from them:

* gpt-4o: $2.50 input, $10 output per 1M tokens, batch at half price;
* claude-sonnet-4-5: $3 / $15; gpt-4o-mini: $0.15 / $0.60.
"""

from __future__ import annotations

import math
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from finopsd.analyzers.base import DAYS_PER_MONTH, HOURS_PER_MONTH, Finding
from finopsd.analyzers.runner import build, run_analyzers, stored_findings
from finopsd.analyzers.waste import recent_start
from finopsd.pricing import Price, PriceBook
from finopsd.store import Store

NOW = datetime(2026, 3, 31, tzinfo=UTC)
WINDOW_DAYS = 30.0
START = NOW - timedelta(days=WINDOW_DAYS)
BOOK = PriceBook(
    [
        Price("openai", "gpt-4o", date(2025, 1, 1), 2.50, 10.00, batch_discount=0.5),
        Price("anthropic", "claude-sonnet-4-5", date(2025, 1, 1), 3.00, 15.00),
        Price("openai", "gpt-4o-mini", date(2025, 1, 1), 0.15, 0.60),
    ]
)
PROVIDER = {"gpt-4o": "openai", "gpt-4o-mini": "openai", "claude-sonnet-4-5": "anthropic"}
PRICE = {"gpt-4o": (2.5, 10.0), "gpt-4o-mini": (0.15, 0.60), "claude-sonnet-4-5": (3.0, 15.0)}


def cost(model: str, inp: int, out: int) -> float:
    i, o = PRICE[model]
    return (inp * i + out * o) / 1e6


def per_month(amount: float, days: float = WINDOW_DAYS) -> float:
    return amount / days * DAYS_PER_MONTH


def per_month_over(amount: float, hours: float) -> float:
    """A saving over ``hours`` of evidence, per month; under 24 h (min_evidence_hours) over 24."""
    return amount / max(hours, 24.0) * HOURS_PER_MONTH


SCHEMA = pa.schema(
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
        ("app", pa.string()),
        ("feature", pa.string()),
        ("status", pa.string()),
        ("prompt_hash", pa.string()),
        ("latency_class", pa.string()),
        ("gateway_cost_usd", pa.float64()),
        ("deployment", pa.string()),
        ("billing_mode", pa.string()),
    ]
)


def ev(
    event_id: str,
    ts: datetime,
    *,
    tenant: str = "acme",
    app: str = "support",
    feature: str = "chat",
    model: str = "gpt-4o",
    inp: int = 10_000,
    out: int = 500,
    status: str = "ok",
    prompt_hash: str | None = None,
    billing_mode: str = "standard",
) -> dict[str, Any]:
    return {
        "event_id": event_id,
        "ts": ts,
        "provider": PROVIDER[model],
        "request_model": model,
        "response_model": model,
        "input_tokens": inp,
        "output_tokens": out,
        "cache_read_input_tokens": None,
        "cache_creation_input_tokens": None,
        "tenant": tenant,
        "app": app,
        "feature": feature,
        "status": status,
        "prompt_hash": prompt_hash or event_id,
        "latency_class": "interactive",
        "gateway_cost_usd": None,
        "deployment": None,
        "billing_mode": billing_mode,
    }


def insert(store: Store, rows: list[dict[str, Any]]) -> None:
    """Price ``rows`` as ingest does and store them."""
    priced, _ = BOOK.price(pa.Table.from_pylist(rows, schema=SCHEMA))

    def work(con: Any) -> None:
        con.register("new_rows", priced)
        con.execute("INSERT INTO usage_events BY NAME SELECT * FROM new_rows")
        con.unregister("new_rows")

    store.write(work)


def run(store: Store, **options: Any) -> list[Finding]:
    (result,) = run_analyzers(store, BOOK, build({"waste": options}, only=["waste"]), now=NOW)
    assert result.error is None, result.error
    return sorted(result.findings, key=lambda f: (f.kind, f.id))


def kinds(findings: list[Finding], kind: str) -> list[Finding]:
    return [f for f in findings if f.kind == kind]


# -- (a) errors and retries -------------------------------------------------------------------

T0 = NOW - timedelta(days=10)


def error_traffic() -> list[dict[str, Any]]:
    """acme / support / chat on gpt-4o: 10,000 input tokens a request, 500 output when ok.

    - 900 ordinary requests;
    - 100 first attempts that fail (``h{i}``, one an hour from T0), then:
      i < 50: retried 30 s later, ok; 50 <= i < 60: retried 30 s later and failing again,
      then retried 60 s after the first attempt, ok; 60 <= i < 80: re-sent 300 s later, ok
      (a retry only with a window of 300 s or more); i >= 80: never retried;
    - globex sends h0 10 s after acme's failure (another tenant: not a retry) and has
      1 failure in 300 requests (0.3 %, below min_error_rate).
    """
    rows = [ev(f"n{j}", T0 + timedelta(minutes=j)) for j in range(900)]
    for i in range(100):
        t = T0 + timedelta(hours=i)
        h = f"h{i}"
        rows.append(ev(f"first{i}", t, status="error", out=0, prompt_hash=h))
        if i < 50:
            rows.append(ev(f"retry{i}", t + timedelta(seconds=30), prompt_hash=h))
        elif i < 60:
            rows.append(
                ev(f"retry{i}", t + timedelta(seconds=30), status="error", out=0, prompt_hash=h)
            )
            rows.append(ev(f"again{i}", t + timedelta(seconds=60), prompt_hash=h))
        elif i < 80:
            rows.append(ev(f"later{i}", t + timedelta(seconds=300), prompt_hash=h))
    rows.append(ev("g-h0", T0 + timedelta(seconds=10), tenant="globex", prompt_hash="h0"))
    rows += [ev(f"g{j}", T0 + timedelta(minutes=j), tenant="globex") for j in range(299)]
    rows.append(ev("g-err", T0 + timedelta(minutes=400), tenant="globex", status="error", out=0))
    return rows


def test_failed_requests_and_retries(tmp_path: Path) -> None:
    ok, failed = cost("gpt-4o", 10_000, 500), cost("gpt-4o", 10_000, 0)
    assert (ok, failed) == (pytest.approx(0.03), pytest.approx(0.025))
    with Store(tmp_path / "s.duckdb") as store:
        insert(store, error_traffic())
        findings = run(store, min_monthly_savings_usd=1.0)
        (f,) = findings
        assert f.kind == "waste.errors"
        assert f.scope == {"tenant": "acme", "app": "support", "feature": "chat", "model": "gpt-4o"}
        ev_ = f.evidence
        # 900 + 100 first attempts + 50 ok retries + 10 failed retries + 10 second retries
        # + 20 late re-sends; errors: the 100 first attempts and the 10 failed retries
        assert ev_["requests"] == 1090
        assert ev_["errors"] == 110
        assert ev_["error_rate"] == pytest.approx(110 / 1090)
        assert ev_["error_input_tokens"] == 110 * 10_000
        assert ev_["error_output_tokens"] == 0
        assert ev_["error_cost_usd"] == pytest.approx(110 * failed)
        assert ev_["cost_usd"] == pytest.approx(110 * failed + 980 * ok)
        # retries within 120 s: 50 + 10 (failed) + 10 (second tries)
        assert ev_["retries"] == 70
        assert ev_["retries_failed"] == 10
        assert ev_["retry_input_tokens"] == 70 * 10_000
        assert ev_["retry_output_tokens"] == 60 * 500
        assert ev_["retry_cost_usd"] == pytest.approx(60 * ok + 10 * failed)
        # the scope's traffic spans 100 hours (T0 to the last failure), not the 30-day window
        assert f.evidence_hours == 100.0 and f.evidence_requests == 1090 and not f.provisional
        # retried within 120 s: the 50 + 10 first attempts and the 10 failed retries; their
        # cost is waste in full, the other 40 errors' at the recoverable share
        assert ev_["retried_errors"] == 70
        assert ev_["retried_error_cost_usd"] == pytest.approx(70 * failed)
        assert ev_["unretried_error_cost_usd"] == pytest.approx(40 * failed)
        assert f.monthly_savings_usd == pytest.approx(per_month_over((70 + 0.5 * 40) * failed, 100))
        assert f.monthly_savings_low_usd < f.monthly_savings_usd < f.monthly_savings_high_usd
        assert "recoverable share 0.5" in f.savings_method
        assert "70 of them retried" in f.title
        assert f.action is None and f.risk == "low"

        # a second run updates the same finding
        again = run(store, min_monthly_savings_usd=1.0)
        assert [g.id for g in again] == [f.id]
        (row,) = stored_findings(store.cursor(), analyzer="waste")
        assert row["times_seen"] == 2

        # the re-sends 300 s later count within a 600 s window; the share scales the saving
        (wide,) = run(store, min_monthly_savings_usd=1.0, retry_interval_s=600)
        assert wide.id == f.id
        assert wide.evidence["retries"] == 90
        assert wide.evidence["retry_cost_usd"] == pytest.approx(80 * ok + 10 * failed)
        assert wide.evidence["retried_errors"] == 90
        assert wide.monthly_savings_usd == pytest.approx(
            per_month_over((90 + 0.5 * 20) * failed, 100)
        )
        (most,) = run(store, min_monthly_savings_usd=1.0, recoverable_share=0.8)
        assert most.monthly_savings_usd == pytest.approx(
            per_month_over((70 + 0.8 * 40) * failed, 100)
        )
        # the first attempt's first retry came 30 s after it
        first = store.cursor().execute(
            "SELECT gap_s FROM waste_retried_errors WHERE event_id = 'first50'"
        )
        assert first.fetchall() == [(30.0,)]
        # the second try follows the failed retry by 30 s, not the first attempt by 60 s
        gaps = store.cursor().execute(
            "SELECT event_id, gap_s FROM waste_retries WHERE event_id IN ('again50', 'later60')"
        )
        assert sorted(gaps.fetchall()) == [("again50", 30.0), ("later60", 300.0)]
        # not a retry: another tenant's identical prompt
        found = store.cursor().execute("SELECT count(*) FROM waste_retries WHERE tenant = 'globex'")
        assert found.fetchall() == [(0,)]

        # a 20 % error rate is needed: none
        assert run(store, min_monthly_savings_usd=1.0, min_error_rate=0.2) == []
        # $16.44 a month: none when $16.50 is asked for
        assert f.monthly_savings_usd == pytest.approx(16.44, abs=0.005)
        assert run(store, min_monthly_savings_usd=16.5) == []


def test_retries_are_incremental_and_late_errors_count(tmp_path: Path) -> None:
    """Two parts (some errors arriving after their retries) give what one part gives."""
    rows = error_traffic()
    # an ok re-send 100 s after an error, and a second error 10 s before it that arrives late
    for i in range(5):
        t = T0 + timedelta(hours=i, seconds=5000)
        rows.append(ev(f"x-err{i}", t, status="error", out=0, prompt_hash=f"x{i}"))
        rows.append(ev(f"x-ok{i}", t + timedelta(seconds=100), prompt_hash=f"x{i}"))
    late_ids = {f"first{i}" for i in range(10)} | {f"late-err{i}" for i in range(5)}
    for i in range(5):
        t = T0 + timedelta(hours=i, seconds=5090)
        rows.append(ev(f"late-err{i}", t, status="error", out=0, prompt_hash=f"x{i}"))
    cutoff = T0 + timedelta(hours=50)
    part1 = [r for r in rows if r["event_id"] not in late_ids and r["ts"] < cutoff]
    part2 = [r for r in rows if r["event_id"] in late_ids or r["ts"] >= cutoff]
    assert len(part1) + len(part2) == len(rows)

    with Store(tmp_path / "a.duckdb") as a, Store(tmp_path / "b.duckdb") as b:
        insert(a, part1)
        first = run(a, min_monthly_savings_usd=0.0)
        assert first[0].evidence["retries"] < 70  # the late errors' retries are not known yet
        insert(a, part2)
        got = run(a, min_monthly_savings_usd=0.0)
        insert(b, rows)
        want = run(b, min_monthly_savings_usd=0.0)
        assert [f.id for f in got] == [f.id for f in want]
        for f, w in zip(got, want, strict=True):  # sums in another order: float rounding
            assert {k: v for k, v in f.evidence.items() if k != "projection"} == pytest.approx(
                {k: v for k, v in w.evidence.items() if k != "projection"}
            )
            assert f.evidence["projection"] == pytest.approx(w.evidence["projection"])
            assert f.monthly_savings_usd == pytest.approx(w.monthly_savings_usd)
        for table in ("waste_retries", "waste_retried_errors"):
            query = f"SELECT * FROM {table} ORDER BY event_id"
            assert a.cursor().execute(query).fetchall() == b.cursor().execute(query).fetchall()
        # x-ok: a retry 100 s after x-err, then 10 s after the late error
        gaps = a.cursor().execute(
            "SELECT gap_s FROM waste_retries WHERE event_id LIKE 'x-ok%' ORDER BY event_id"
        )
        assert gaps.fetchall() == [(10.0,)] * 5
        # errors: 110 + 5 x-err + 5 late ones; retries: 70 + 5 x-ok + the 5 late errors
        # (90 s after x-err), which failed
        (f,) = got
        assert f.evidence["errors"] == 120
        assert (f.evidence["retries"], f.evidence["retries_failed"]) == (80, 15)
        # retried: the 70 of before, the x-errs (by the late errors, 90 s on) and the late
        # errors (by x-ok, 10 s on)
        assert f.evidence["retried_errors"] == 80
        late = a.cursor().execute(
            "SELECT gap_s FROM waste_retried_errors WHERE event_id LIKE '%err%' ORDER BY event_id"
        )
        assert late.fetchall() == [(10.0,)] * 5 + [(90.0,)] * 5


# -- (b) context bloat ------------------------------------------------------------------------


def feature_traffic(
    app: str,
    feature: str,
    mean_tokens: int,
    *,
    days_ago: float,
    n: int = 1000,
    model: str = "gpt-4o",
    billing_mode: str = "standard",
    tag: str = "",
) -> list[dict[str, Any]]:
    """``n`` requests of ``mean_tokens`` input tokens each, one a minute from ``days_ago``."""
    t0 = NOW - timedelta(days=days_ago)
    return [
        ev(
            f"{app}-{feature}-{days_ago}-{model}{tag}-{k}",
            t0 + timedelta(minutes=k),
            app=app,
            feature=feature,
            model=model,
            inp=mean_tokens,
            out=100,
            billing_mode=billing_mode,
        )
        for k in range(n)
    ]


def test_context_bloat(tmp_path: Path) -> None:
    assert recent_start(NOW, 7) == NOW - timedelta(days=7)
    rows = []
    # docs: three steady features; "answer" grew from 2,000 to 5,000 input tokens,
    # its recent traffic split between gpt-4o and claude-sonnet-4-5
    for feature, tokens in (("search", 1000), ("summarise", 1200), ("chat", 1100)):
        rows += feature_traffic("docs", feature, tokens, days_ago=20)
        rows += feature_traffic("docs", feature, tokens, days_ago=5)
    rows += feature_traffic("docs", "answer", 2000, days_ago=20)
    rows += feature_traffic("docs", "answer", 5000, days_ago=5, n=500)
    rows += feature_traffic("docs", "answer", 5000, days_ago=4, n=500, model="claude-sonnet-4-5")
    # kb: "t" is new (no history) and 4x its three peers; batch-billed
    for feature in ("q", "r", "s"):
        rows += feature_traffic("kb", feature, 1000, days_ago=20)
        rows += feature_traffic("kb", feature, 1000, days_ago=5)
    rows += feature_traffic("kb", "t", 4000, days_ago=5, billing_mode="batch")
    # tiny: two features, one 5x the other, steady: one peer is too few to judge by
    for feature, tokens in (("a", 1000), ("b", 5000)):
        rows += feature_traffic("tiny", feature, tokens, days_ago=20)
        rows += feature_traffic("tiny", feature, tokens, days_ago=5)

    with Store(tmp_path / "s.duckdb") as store:
        insert(store, rows)
        findings = kinds(run(store), "waste.context_bloat")
        got = {(f.scope["app"], f.scope["feature"]): f for f in findings}
        assert set(got) == {("docs", "answer"), ("kb", "t")}

        f = got[("docs", "answer")]
        ev_ = f.evidence
        assert ev_["requests"] == 1000
        assert ev_["mean_input_tokens"] == pytest.approx(5000)
        assert ev_["peer_median_input_tokens"] == pytest.approx(1100)
        assert ev_["earlier_mean_input_tokens"] == pytest.approx(2000)
        # both baselines exceeded (5000 >= 3 x 1100 and >= 1.5 x 2000); the larger is used
        assert ev_["baselines_exceeded"] == ["history", "peers"]
        assert ev_["baseline"] == "history"
        assert ev_["baseline_input_tokens"] == pytest.approx(2000)
        assert ev_["excess_input_tokens"] == pytest.approx(3000 * 1000)
        # input price: half the tokens at $2.50, half at $3 per 1M
        assert ev_["input_usd_per_mtok"] == pytest.approx(2.75)
        assert ev_["excess_cost_usd"] == pytest.approx(3e6 * 2.75e-6)
        # recent traffic from 5 days ago to 4 days ago + 8 h 20 min: 33 hours
        assert f.evidence_hours == 33.0 and f.evidence_requests == 1000
        assert f.monthly_savings_usd == pytest.approx(per_month_over(3e6 * 2.75e-6, 33))
        assert f.action is not None and f.action.actuator == "gateway.max_tokens"
        assert f.action.params == {
            "app": "docs",
            "feature": "answer",
            "max_input_tokens": 3000,
            "rag_top_k_scale": 0.4,
        }
        assert (f.confidence, f.risk) == (0.6, "medium")

        g = got[("kb", "t")]
        assert g.evidence["baselines_exceeded"] == ["peers"]
        assert g.evidence["earlier_mean_input_tokens"] is None
        assert g.evidence["baseline_input_tokens"] == pytest.approx(1000)
        # batch-billed gpt-4o input: $1.25 per 1M; 3,000 excess tokens x 1,000 requests
        assert g.evidence["input_usd_per_mtok"] == pytest.approx(1.25)
        # 1,000 requests a minute apart from 5 days ago, seen until the store's latest
        # event (docs/answer, 4 days ago + 8 h 20 min): 33 hours
        assert g.evidence_hours == 33.0 and not g.provisional
        assert g.monthly_savings_usd == pytest.approx(per_month_over(3e6 * 1.25e-6, 33))
        assert (g.confidence, g.risk) == (0.4, "high")
        assert g.action is not None and g.action.params["max_input_tokens"] == 3000

        # stricter factors: neither baseline fires for kb/t (4x < 5x); docs/answer still
        # exceeds its history (2.5x)
        strict = kinds(run(store, peer_factor=5.0), "waste.context_bloat")
        assert [(x.scope["app"], x.scope["feature"]) for x in strict] == [("docs", "answer")]
        assert strict[0].evidence["baselines_exceeded"] == ["history"]
        assert run(store, peer_factor=5.0, growth_factor=3.0) == []
        # fewer requests than min_requests in a period: no baseline, no finding
        assert kinds(run(store, min_requests=1001), "waste.context_bloat") == []


def test_context_bloat_is_judged_from_its_rise(tmp_path: Path) -> None:
    """A feature at 1,600 input tokens for 23 days, then 7,600 for the last 5: the period
    judged starts at the rise, so the 2 days at 1,600 inside the last 7 do not dilute it."""
    rise = NOW - timedelta(days=5)
    step = timedelta(minutes=5)
    rows = [
        ev(
            f"rag-{k}",
            t,
            app="kb",
            feature="rag",
            inp=1600 if t < rise else 7600,
            out=100,
        )
        for k in range(int(timedelta(days=28) / step))
        if (t := NOW - timedelta(days=28) + k * step) < NOW
    ]
    with Store(tmp_path / "s.duckdb") as store:
        insert(store, rows)
        (f,) = kinds(run(store), "waste.context_bloat")
    after = int(timedelta(days=5) / step)
    ev_ = f.evidence
    assert ev_["baselines_exceeded"] == ["history"]  # alone in its app: no peers
    assert ev_["earlier_mean_input_tokens"] == pytest.approx(1600)
    assert ev_["earlier_requests"] == len(rows) - after
    assert ev_["mean_input_tokens"] == pytest.approx(7600)
    assert ev_["requests"] == after and f.evidence_requests == after
    assert ev_["recent_since"] == rise.isoformat()
    assert ev_["excess_input_tokens"] == pytest.approx(6000 * after)
    # gpt-4o input at $2.50 per 1M; the rise's 120 hours to the last one observed
    assert f.evidence_hours == 120.0
    assert f.monthly_savings_usd == pytest.approx(per_month_over(6000 * after * 2.5e-6, 120))
    # the interval of 5 equal days is the point
    assert f.monthly_savings_low_usd == pytest.approx(f.monthly_savings_usd)
    assert "7,600 input tokens per request, 4.8x its own past (1,600)" in f.title


# -- (c) fine-tune candidates -----------------------------------------------------------------


def spread(
    name: str, n: int, *, feature: str, model: str, inp: int, out: int, app: str = "triage"
) -> list[dict[str, Any]]:
    """``n`` requests spread evenly over the window."""
    step = timedelta(days=WINDOW_DAYS) / n
    return [
        ev(f"{name}-{k}", START + k * step, app=app, feature=feature, model=model, inp=inp, out=out)
        for k in range(n)
    ]


def test_finetune_candidates(tmp_path: Path) -> None:
    opts = {
        "finetune_min_requests_per_month": 1000,
        "finetune_one_off_usd": 20.0,
        "eval_one_off_usd": 5.0,
    }
    rows = [
        # the candidate: 3,000 classifications (2,000 in, 5 out) on gpt-4o
        *spread("c", 3000, feature="classify", model="gpt-4o", inp=2000, out=5),
        # the same task on a cheap model: nothing to gain
        *spread("m", 3000, feature="classify", model="gpt-4o-mini", inp=2000, out=5),
        # long answers: not a narrow task
        *spread("s", 3000, feature="summarise", model="gpt-4o", inp=2000, out=300),
        # too little money at stake: pays back in about 29 months
        *spread("t", 1200, feature="tag", model="gpt-4o", inp=300, out=5),
        # too few requests a month
        *spread("v", 500, feature="rare", model="gpt-4o", inp=2000, out=5, app="other"),
    ]
    with Store(tmp_path / "s.duckdb") as store:
        insert(store, rows)
        findings = run(store, **opts)
        (f,) = kinds(findings, "waste.finetune")
        assert findings == [f]
        assert f.scope == {"app": "triage", "feature": "classify", "model": "gpt-4o"}
        current = 3000 * cost("gpt-4o", 2000, 5)
        small = 3000 * (2000 * 0.30 + 5 * 1.20) / 1e6
        assert current == pytest.approx(15.15) and small == pytest.approx(1.818)
        savings = per_month(current - small)
        ev_ = f.evidence
        assert ev_["requests"] == 3000
        assert ev_["requests_per_month"] == pytest.approx(per_month(3000))
        assert ev_["mean_output_tokens"] == pytest.approx(5)
        assert ev_["cost_usd"] == pytest.approx(current)
        assert ev_["small_model_cost_usd"] == pytest.approx(small)
        assert ev_["one_off_usd"] == pytest.approx(25.0)
        assert ev_["payback_months"] == pytest.approx(25.0 / savings)
        assert f.monthly_savings_usd == pytest.approx(savings)
        assert f.action is not None and f.action.actuator == "finetune"
        assert f.action.params == {
            "app": "triage",
            "feature": "classify",
            "from_model": "openai/gpt-4o",
            "base_model": "openai/gpt-4o-mini",
            "training_examples": 3000,
        }
        # "tag" really would take long to pay back
        tag_savings = per_month(1200 * (cost("gpt-4o", 300, 5) - (300 * 0.3 + 5 * 1.2) / 1e6))
        assert 25.0 / tag_savings > 3
        # a stricter payback (1.85 months needed) or a pricier one-off: none
        assert math.isclose(ev_["payback_months"], 1.848, rel_tol=1e-3)
        assert kinds(run(store, **opts, max_payback_months=1.5), "waste.finetune") == []
        assert kinds(run(store, **{**opts, "finetune_one_off_usd": 100.0}), "waste.finetune") == []


def test_no_waste_no_findings(tmp_path: Path) -> None:
    """Healthy, steady traffic on a cheap model with long answers: nothing to find."""
    rows = []
    for feature, tokens in (("a", 1000), ("b", 1100), ("c", 1200)):
        rows += spread(feature, 2000, feature=feature, model="gpt-4o-mini", inp=tokens, out=200)
    with Store(tmp_path / "s.duckdb") as store:
        assert run(store) == []
        insert(store, rows)
        assert run(store, min_monthly_savings_usd=0.0) == []
        assert store.cursor().execute("SELECT count(*) FROM waste_retries").fetchall() == [(0,)]


def test_retry_interval_is_bounded_by_what_is_stored() -> None:
    with pytest.raises(ValueError, match=r"analyzers\.waste\.retry_interval_s"):
        build({"waste": {"retry_interval_s": 601}})
