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

from finopsd.analyzers.base import Analyzer, Context, Finding, Window, monthly
from finopsd.analyzers.runner import build, run_analyzers, stored_findings
from finopsd.analyzers.spend import DIMENSIONS, refresh
from finopsd.config import ConfigError, load_settings
from finopsd.pricing import Deployment, PriceBook, settle_self_hosted
from finopsd.store import Store

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
