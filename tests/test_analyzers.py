"""The analyzer framework: spend rollups kept incrementally, findings kept by id, the CLI.

Each analyzer has its own test module; this one holds what they all rely on.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

import duckdb
import numpy as np
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

from finopsd.analyzers.base import (
    HOURS_PER_MONTH,
    ActionSpec,
    Analyzer,
    Context,
    Finding,
    Window,
    dense_hours,
    monthly,
    project,
)
from finopsd.analyzers.runner import build, run_analyzers, stored_findings
from finopsd.analyzers.spend import DIMENSIONS, refresh
from finopsd.config import ConfigError, load_settings
from finopsd.pricing import Deployment, PriceBook, settle_self_hosted
from finopsd.store import MIGRATIONS, Store

NOW = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
EMPTY = PriceBook([])


def usage_rows(specs: list[tuple[str, datetime, str, str, float]]) -> pa.Table:
    """(event_id, ts, tenant, model, cost) → usage rows with the NOT NULL columns filled."""
    return pa.Table.from_pylist(
        [
            {
                "event_id": event_id,
                "ts": ts,
                "tenant": tenant,
                "request_model": model,
                "provider": "openai",
                "input_tokens": 100,
                "output_tokens": 10,
                "status": "ok",
                "latency_class": "interactive",
                "billing_mode": "standard",
                "cost_usd": cost,
                "list_cost_usd": cost,
            }
            for event_id, ts, tenant, model, cost in specs
        ]
    )


def insert(store: Store, rows: pa.Table) -> None:
    def work(con: Any) -> None:
        con.register("new_rows", rows)
        con.execute("INSERT INTO usage_events BY NAME SELECT * FROM new_rows")
        con.unregister("new_rows")

    store.write(work)


def rollup(store: Store) -> dict[tuple[Any, ...], tuple[int, float]]:
    con = store.cursor()
    keys = ", ".join(["hour", *DIMENSIONS])
    rows = con.execute(f"SELECT {keys}, requests, cost_usd FROM spend_hourly").fetchall()
    return {tuple(r[:-2]): (r[-2], round(r[-1], 9)) for r in rows}


def expected_rollup(store: Store) -> dict[tuple[Any, ...], tuple[int, float]]:
    """The same rollup computed in Python from every stored event."""
    con = store.cursor()
    cols = ["ts", *[c if c != "model" else "request_model" for c in DIMENSIONS], "cost_usd"]
    out: dict[tuple[Any, ...], list[float]] = {}
    for row in con.execute(f"SELECT {', '.join(cols)} FROM usage_events").fetchall():
        ts = row[0].astimezone(UTC).replace(minute=0, second=0, microsecond=0)
        key = (ts, *row[1:-1])
        acc = out.setdefault(key, [0, 0.0])
        acc[0] += 1
        acc[1] += row[-1] or 0.0
    return {k: (int(v[0]), round(v[1], 9)) for k, v in out.items()}


def test_spend_rollup_is_incremental_and_equals_a_full_recount(tmp_path: Path) -> None:
    with Store(tmp_path / "s.duckdb") as store:
        t = NOW - timedelta(hours=5)
        insert(
            store,
            usage_rows(
                [(f"a{i}", t + timedelta(minutes=7 * i), "acme", "gpt-4o", 0.5) for i in range(20)]
            ),
        )
        assert store.write(refresh) > 0
        assert rollup(store) == expected_rollup(store)
        # nothing new: nothing recomputed
        assert store.write(refresh) == 0
        # a late event for an old hour and a new hour: exactly those two hours recomputed
        insert(
            store,
            usage_rows(
                [
                    ("late", t + timedelta(minutes=1), "globex", "gpt-4o", 2.0),
                    ("new", NOW, "acme", "gpt-4o-mini", 0.25),
                ]
            ),
        )
        assert store.write(refresh) == 2
        assert rollup(store) == expected_rollup(store)
        daily = (
            store.cursor()
            .execute("SELECT sum(requests), round(sum(cost_usd), 9) FROM spend_daily")
            .fetchone()
        )
        assert daily == (22, round(20 * 0.5 + 2.0 + 0.25, 9))


def test_settled_self_hosted_costs_reach_the_rollup(tmp_path: Path) -> None:
    llama = Deployment("llama-8b", "L4", gpus=1, gpu_hour_usd=3.0)
    hour = NOW - timedelta(hours=3)
    rows = usage_rows([("s1", hour + timedelta(minutes=5), "acme", "llama", 0.0)])
    rows = rows.drop_columns(["cost_usd", "list_cost_usd"]).append_column(
        "deployment", pa.array(["llama-8b"])
    )
    with Store(tmp_path / "s.duckdb") as store:
        insert(store, rows)
        store.write(refresh)
        assert store.cursor().execute("SELECT sum(cost_usd) FROM spend_hourly").fetchone() == (0.0,)
        store.write(lambda con: settle_self_hosted(con, [llama], until=NOW))
        assert store.write(refresh) == 1
        assert store.cursor().execute("SELECT sum(cost_usd) FROM spend_hourly").fetchone() == (3.0,)


class _Fixed(Analyzer):
    """A test analyzer that returns what it is told to, or fails."""

    name: ClassVar[str] = "fixed"
    description: ClassVar[str] = "test"

    def __init__(self, findings: list[Finding], fail: bool = False) -> None:
        super().__init__()
        self.findings = findings
        self.fail = fail

    def run(self, ctx: Context) -> list[Finding]:
        if self.fail:
            raise RuntimeError("boom")
        return self.findings


def _finding(tenant: str, saving: float) -> Finding:
    return Finding(
        kind="fixed.test",
        scope={"tenant": tenant},
        title=f"waste at {tenant}",
        evidence={"usd": saving},
        monthly_savings_usd=saving,
        savings_method="test",
        confidence=0.5,
        risk="low",
    )


def test_findings_are_updated_by_id_and_resolved_when_gone(tmp_path: Path) -> None:
    with Store(tmp_path / "s.duckdb") as store:
        run_analyzers(store, EMPTY, [_Fixed([_finding("a", 1.0), _finding("b", 2.0)])], now=NOW)
        later = NOW + timedelta(hours=1)
        run_analyzers(store, EMPTY, [_Fixed([_finding("a", 3.0), _finding("b", 2.0)])], now=later)
        rows = {f["scope"]["tenant"]: f for f in stored_findings(store.cursor())}
        assert set(rows) == {"a", "b"}
        assert rows["a"]["times_seen"] == 2 and rows["a"]["monthly_savings_usd"] == 3.0
        assert rows["a"]["first_seen"] == NOW and rows["a"]["last_seen"] == later
        assert rows["a"]["id"] == _finding("a", 0).id  # the id is kind + scope only
        assert rows["a"]["evidence"]["window"]["end"] == later.isoformat()
        # a failed run resolves nothing; a run that no longer finds b resolves b
        (failed,) = run_analyzers(store, EMPTY, [_Fixed([], fail=True)], now=later)
        assert failed.error == "RuntimeError: boom"
        assert len(stored_findings(store.cursor())) == 2
        run_analyzers(store, EMPTY, [_Fixed([_finding("a", 3.0)])], now=later)
        assert [f["scope"]["tenant"] for f in stored_findings(store.cursor())] == ["a"]
        assert [
            f["scope"]["tenant"] for f in stored_findings(store.cursor(), status="resolved")
        ] == ["b"]
        runs = store.cursor().execute("SELECT count(*), count(error) FROM analyzer_runs").fetchone()
        assert runs == (4, 1)


def test_one_failing_analyzer_does_not_stop_the_others(tmp_path: Path) -> None:
    with Store(tmp_path / "s.duckdb") as store:
        runs = run_analyzers(
            store, EMPTY, [_Fixed([], fail=True), _Fixed([_finding("c", 1.0)])], now=NOW
        )
    assert [r.error is None for r in runs] == [False, True]
    assert len(runs[1].findings) == 1


def test_build_checks_names_and_options() -> None:
    names = [a.name for a in build({})]
    assert names[0] == "spend"  # rollups first
    with pytest.raises(ValueError, match=r"unknown analyzer 'nope'; valid: .*spend"):
        build({"nope": {}})
    with pytest.raises(ValueError, match=r"analyzers\.spend\.bogus"):
        build({"spend": {"bogus": 1}})
    assert "spend" not in [a.name for a in build({"spend": {"enabled": False}})]
    assert [a.name for a in build({"spend": {"enabled": False}}, only=["spend"])] == ["spend"]


def test_config_names_a_bad_analyzer(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[analyzers.spendd]\nenabled = true\n")
    with pytest.raises(ConfigError, match="unknown analyzer 'spendd'"):
        load_settings(config, {})


def test_monthly_projects_the_window() -> None:
    window = Window(NOW - timedelta(days=10), NOW)
    assert monthly(10.0, window) == pytest.approx(30.4375)


def test_project_divides_by_the_span_of_the_evidence() -> None:
    """A week of $1/hour is $730.50/month, whatever window it was read from."""
    week = project([1.0] * 168, 1.0)
    assert week.monthly_usd == pytest.approx(HOURS_PER_MONTH)
    assert week.evidence_hours == 168 and week.observed_usd == pytest.approx(168)
    assert week.low_usd == pytest.approx(week.monthly_usd) == pytest.approx(week.high_usd)
    assert not week.capped and week.blocks == 7
    # hours without a saving inside the span count as 0; dense_hours fills them
    hours = dense_hours([(NOW, 2.0), (NOW + timedelta(hours=3), 2.0), (NOW, 1.0)])
    assert hours == [3.0, 0.0, 0.0, 2.0]
    assert project(hours).monthly_usd == pytest.approx(5.0 / 4 * HOURS_PER_MONTH)
    assert project([]).monthly_usd == 0.0


def test_project_of_a_short_span_is_capped_and_wide() -> None:
    """35 seconds of a $25 saving: not $1.9M/month, but at most $25 x 730.5 / 24."""
    short = project([25.0], 1.0, span_hours=35 / 3600, min_span_hours=24)
    assert short.capped
    assert short.monthly_usd == pytest.approx(25.0 * HOURS_PER_MONTH / 24)
    assert short.low_usd == 0.0
    assert short.high_usd == pytest.approx(25.0 / (35 / 3600) * HOURS_PER_MONTH)
    # the same saving spread over two days is not capped
    assert not project([25.0 / 48] * 48, 1.0, min_span_hours=24).capped


def test_project_interval_is_reproducible_and_narrows_with_evidence() -> None:
    rng = np.random.default_rng(1)
    series = rng.gamma(2.0, 0.5, size=24 * 28).tolist()
    first, again = project(series), project(series)
    assert (first.low_usd, first.high_usd) == (again.low_usd, again.high_usd)
    assert first.low_usd < first.monthly_usd < first.high_usd
    four_days = project(series[: 24 * 4])
    assert (four_days.high_usd - four_days.low_usd) > (first.high_usd - first.low_usd)


def test_project_interval_contains_the_true_monthly_figure() -> None:
    """Synthetic traffic: a daily cycle, day-to-day level changes and hourly noise around a
    known mean saving. The 90 % interval of a week holds the true monthly figure in about
    90 % of 200 independent weeks (and the point is unbiased)."""
    rng = np.random.default_rng(7)
    mean_hourly = 0.8
    cycle = 1 + 0.6 * np.sin(np.arange(24) / 24 * 2 * np.pi)  # mean 1
    truth = mean_hourly * HOURS_PER_MONTH
    hits, points = 0, []
    for _ in range(200):
        day_level = rng.lognormal(-0.045, 0.3, size=7)  # mean 1
        hourly = mean_hourly * np.repeat(day_level, 24) * np.tile(cycle, 7)
        noisy = rng.gamma(4.0, hourly / 4.0)  # mean hourly, noise per hour
        p = project(noisy.tolist(), 1.0, min_span_hours=24)
        hits += p.low_usd <= truth <= p.high_usd
        points.append(p.monthly_usd)
    assert 0.8 <= hits / 200 <= 0.98
    assert np.mean(points) == pytest.approx(truth, rel=0.05)


class _Projected(Analyzer):
    """A test analyzer that projects the saving it is given, through Analyzer.finding."""

    name: ClassVar[str] = "projected"
    description: ClassVar[str] = "test"
    min_evidence_requests: ClassVar[int] = 50

    def __init__(self, hours: list[float], requests: int, span_hours: float | None) -> None:
        super().__init__()
        self.hours, self.requests, self.span_hours = hours, requests, span_hours

    def run(self, ctx: Context) -> list[Finding]:
        projection = ctx.project(self.hours, span_hours=self.span_hours)
        return [
            self.finding(
                ctx,
                kind="projected.test",
                scope={"tenant": "acme"},
                title=f"save ${projection.monthly_usd:,.2f}/month",
                evidence={},
                projection=projection,
                requests=self.requests,
                savings_method="test",
                confidence=0.9,
                risk="low",
                action=ActionSpec("gateway.cache", {}),
            )
        ]


def test_provisional_findings_are_stored_and_never_eligible(tmp_path: Path) -> None:
    with Store(tmp_path / "s.duckdb") as store:
        (short,) = run_analyzers(store, EMPTY, [_Projected([40.0], 10_000, 30 / 3600)], now=NOW)[
            0
        ].findings
        assert short.provisional and not short.eligible_for_action
        assert short.title.endswith("(provisional: 0.0083 h of traffic)")
        assert short.monthly_savings_usd == pytest.approx(40.0 * HOURS_PER_MONTH / 24)
        assert short.evidence["projection"]["observed_savings_usd"] == 40.0
        (row,) = stored_findings(store.cursor())
        assert row["provisional"] is True and row["eligible_for_action"] is False
        assert row["evidence_hours"] == pytest.approx(30 / 3600)
        assert row["evidence_requests"] == 10_000
        assert row["monthly_savings_low_usd"] == 0.0
        assert row["monthly_savings_high_usd"] > row["monthly_savings_usd"]

        # two days of evidence on too few requests: provisional, not capped
        (few,) = run_analyzers(store, EMPTY, [_Projected([1.0] * 48, 20, None)], now=NOW)[
            0
        ].findings
        assert few.provisional and few.title.endswith("(provisional: 20 requests)")
        assert few.monthly_savings_usd == pytest.approx(HOURS_PER_MONTH)

        # enough of both: eligible; the row is updated by id
        (good,) = run_analyzers(store, EMPTY, [_Projected([1.0] * 48, 500, None)], now=NOW)[
            0
        ].findings
        assert not good.provisional and good.eligible_for_action
        (row,) = stored_findings(store.cursor())
        assert (row["provisional"], row["eligible_for_action"], row["times_seen"]) == (
            False,
            True,
            3,
        )
        assert row["title"] == "save $730.50/month"
        # analyzers.min_evidence_hours raised above the span: provisional again
        (strict,) = run_analyzers(
            store, EMPTY, [_Projected([1.0] * 48, 500, None)], now=NOW, min_evidence_hours=72
        )[0].findings
        assert strict.provisional


def test_min_evidence_requests_is_an_option_of_every_analyzer() -> None:
    """The class default, overridden by ``[analyzers.<name>] min_evidence_requests``; an
    analyzer's own ``min_requests`` option (waste: context bloat) is a different one."""
    (waste,) = build({}, only=["waste"])
    assert waste.required_requests == 100
    (waste,) = build({"waste": {"min_evidence_requests": 7, "min_requests": 5}}, only=["waste"])
    assert waste.required_requests == 7
    (gpu,) = build({}, only=["gpu"])
    assert gpu.required_requests == 0
    with pytest.raises(ValueError, match=r"analyzers\.batch\.min_evidence_requests"):
        build({"batch": {"min_evidence_requests": -1}})


def test_a_finding_without_evidence_is_provisional(tmp_path: Path) -> None:
    """The runner judges every finding: one built by hand, stating no evidence, is never
    eligible for an action."""
    bare = _finding("a", 5.0)
    bare.action = ActionSpec("gateway.cache", {})
    with Store(tmp_path / "s.duckdb") as store:
        (run,) = run_analyzers(store, EMPTY, [_Fixed([bare])], now=NOW)
        assert run.findings[0].provisional
        assert stored_findings(store.cursor())[0]["provisional"] is True


def test_findings_kept_through_the_evidence_migration(tmp_path: Path) -> None:
    """A store whose findings predate the evidence columns keeps them, provisional (their
    evidence was never recorded), with a point interval."""
    path = tmp_path / "v6.duckdb"
    version = next(i for i, (d, _) in enumerate(MIGRATIONS) if d.startswith("findings: the ev"))
    con = duckdb.connect(str(path))
    con.execute(
        "CREATE TABLE schema_version (version INTEGER PRIMARY KEY, "
        "applied_at TIMESTAMPTZ NOT NULL, description VARCHAR NOT NULL)"
    )
    for i, (_, sql) in enumerate(MIGRATIONS[:version], start=1):
        con.execute(sql)
        con.execute("INSERT INTO schema_version VALUES (?, now(), 'old')", [i])
    con.execute(
        "INSERT INTO findings VALUES ('f1', 'batch', 'batch.x', '{}', 't', '{}', now(), now(), "
        "12.5, 'm', 0.9, 'low', NULL, now(), now(), 3, 'open')"
    )
    con.close()
    with Store(path) as store:
        (row,) = stored_findings(store.cursor())
    assert row["monthly_savings_usd"] == row["monthly_savings_low_usd"] == 12.5
    assert row["provisional"] is True and row["times_seen"] == 3


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "finopsd", *args],
        capture_output=True,
        text=True,
        env=clean_env(),
        cwd=REPO_ROOT,
        timeout=120,
    )


def test_analyze_command(tmp_path: Path) -> None:
    path = tmp_path / "s.duckdb"
    with Store(path) as store:
        insert(
            store,
            usage_rows([("e1", datetime.now(UTC) - timedelta(hours=1), "acme", "gpt-4o", 1.0)]),
        )
    config = tmp_path / "c.toml"
    config.write_text(f"[store]\npath = '{path}'\n")
    done = _cli("analyze", "--only", "spend", "--json", "--config", str(config))
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert [r["analyzer"] for r in out["runs"]] == ["spend"] and out["findings"] == []
    with Store(path, read_only=True) as store:
        assert store.cursor().execute("SELECT sum(requests) FROM spend_hourly").fetchone() == (1,)
    missing = tmp_path / "missing.toml"
    missing.write_text(f"[store]\npath = '{tmp_path / 'none.duckdb'}'\n")
    nothing = _cli("analyze", "--config", str(missing))
    assert nothing.returncode == 1 and "no store at" in nothing.stderr
    assert not (tmp_path / "none.duckdb").exists()
    bad = _cli("analyze", "--only", "nope", "--config", str(config))
    assert bad.returncode == 2 and "unknown analyzer 'nope'" in bad.stderr
    with Store(path):  # a running daemon holds the file like this
        held = _cli("analyze", "--config", str(config))
    assert held.returncode == 1 and "held by a running finopsd" in held.stderr
    assert "Traceback" not in held.stderr


def test_daemon_runs_the_analyzers_on_schedule(
    topics: Topics, make_config: Callable[..., DaemonSetup], daemons: Callable[..., Any]
) -> None:
    """With a short interval, a running daemon runs every enabled analyzer, repeatedly."""
    setup = make_config("scheduled", analyzers={"first_run_delay_s": 0.5, "interval_minutes": 0.05})
    now = datetime.now(UTC)
    messages = [
        (
            f"s{i}".encode(),
            json.dumps(
                {
                    "event_id": f"s{i}",
                    "ts": (now - timedelta(minutes=i)).isoformat(),
                    "gen_ai.provider.name": "openai",
                    "gen_ai.request.model": "gpt-4o",
                    "gen_ai.usage.input_tokens": 1000,
                    "gen_ai.usage.output_tokens": 100,
                }
            ).encode(),
        )
        for i in range(50)
    ]
    sent = produce_messages(topics.bootstrap, topics.usage, messages)
    daemon = daemons(setup)
    daemon.start()
    daemon.wait_ready()
    wait_consumed([daemon], topics, next_offsets(sent))
    # each analyzer logs its runs: wait for two more rounds after the events were stored
    names = [a.name for a in build({})]
    rounds = daemon.log_text().count("analyzer waste:")
    daemon.wait_until(
        lambda: daemon.log_text().count("analyzer waste:") >= rounds + 2,
        timeout=90,
        what="two scheduled rounds of every analyzer",
    )
    assert daemon.terminate() == 0, daemon.log_tail()
    with Store(setup.store, read_only=True) as store:
        runs = dict(
            store.cursor()
            .execute("SELECT analyzer, count(*) FROM analyzer_runs GROUP BY 1")
            .fetchall()
        )
        failed = (
            store.cursor()
            .execute("SELECT analyzer, error FROM analyzer_runs WHERE error IS NOT NULL")
            .fetchall()
        )
        spent = store.cursor().execute("SELECT sum(requests) FROM spend_hourly").fetchone()
    assert set(runs) == set(names) and min(runs.values()) >= rounds + 2, runs
    assert failed == []
    assert spent == (50,)


def test_an_absent_pandas_is_answered_without_a_search() -> None:
    """Where pandas is not installed, importing finopsd's analyzers puts a finder first on
    sys.meta_path that refuses it at once; pandas stays absent for everyone else, and
    DuckDB's Arrow and numpy results, pyarrow and polars work as before."""
    code = """
import importlib.util, sys
absent = importlib.util.find_spec("pandas") is None
import duckdb, polars as pl, pyarrow as pa
import finopsd.analyzers.base as base
finders = [f for f in sys.meta_path if isinstance(f, base._AbsentModule)]
assert len(finders) == (1 if absent else 0), finders
base._skip_absent("pandas")  # once per process
assert len([f for f in sys.meta_path if isinstance(f, base._AbsentModule)]) == len(finders)
if absent:
    try:
        import pandas  # noqa: F401
    except ModuleNotFoundError as exc:
        assert exc.name == "pandas"
    else:
        raise AssertionError("pandas imported")
    assert "pandas" not in sys.modules
    assert importlib.util.find_spec("pandas") is None
con = duckdb.connect()
assert con.execute("SELECT ? + 1 AS a", [41]).fetchone() == (42,)
assert con.execute("SELECT 1 AS a").to_arrow_table().column("a").to_pylist() == [1]
assert con.execute("SELECT 2 AS a").fetchnumpy()["a"].tolist() == [2]
assert pl.from_arrow(pa.table({"a": [3]})).to_dicts() == [{"a": 3}]
print("ok")
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
