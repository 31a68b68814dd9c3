"""The daemon's HTTP API over real HTTP on loopback, against a running daemon on the
embedded broker; the CLI the same with the daemon running and stopped."""

from __future__ import annotations

import csv
import io
import itertools
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import (
    DaemonProcess,
    DaemonSetup,
    Topics,
    cli,
    next_offsets,
    produce_messages,
    wait_consumed,
    wait_for,
)
from conftest import (
    daemon_api as api,
)

from finopsd.ingest.loadgen import UsageLoad

MakeConfig = Callable[..., DaemonSetup]
Daemons = Callable[..., DaemonProcess]
N = 3000


@pytest.fixture
def running(
    topics: Topics, make_config: MakeConfig, daemons: Daemons
) -> tuple[DaemonSetup, DaemonProcess, int]:
    """A daemon that has stored N events of the last two hours; (setup, daemon, N)."""
    start = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=2)
    load = UsageLoad(seed=7, start=start)
    sent = produce_messages(topics.bootstrap, topics.usage, itertools.islice(iter(load), N))
    setup = make_config(
        "api", analyzers={"first_run_delay_s": 86400}, log={"format": "json", "level": "info"}
    )
    daemon = daemons(setup).start()
    daemon.wait_ready()
    wait_consumed([daemon], topics, next_offsets(sent))
    return setup, daemon, N


def test_probes_auth_and_reads(running: tuple[DaemonSetup, DaemonProcess, int]) -> None:
    setup, daemon, n = running
    url, auth = api(setup)
    token_file = setup.store.with_name(setup.store.name + ".api-token")
    assert token_file.stat().st_mode & 0o777 == 0o600
    with httpx.Client(base_url=url, timeout=30) as c:
        health = c.get("/healthz")
        assert health.status_code == 200, health.text
        assert {x["name"] for x in health.json()["checks"]} >= {"ingest-threads", "api"}
        wait_for(lambda: c.get("/readyz").status_code == 200, timeout=30, what="ready")
        ready = c.get("/readyz").json()
        assert ready["status"] == "ok"
        assert {x["name"] for x in ready["checks"]} == {"broker", "partitions", "store", "lag"}

        # reads need the token (api.public_reads is false)
        for path in ("/v1/stats", "/v1/findings", "/metrics", "/v1/spend"):
            assert c.get(path).status_code == 401, path
            bad = c.get(path, headers={"Authorization": "Bearer not-the-token-at-all"})
            assert bad.status_code == 401 and bad.headers["www-authenticate"] == "Bearer"
        stats = c.get("/v1/stats", headers=auth)
        assert stats.status_code == 200
        assert stats.json()["usage_events"] == n
        assert stats.headers["x-request-id"]
        mine = c.get("/v1/stats", headers={**auth, "X-Request-ID": "req-42"})
        assert mine.headers["x-request-id"] == "req-42"

        metrics = c.get("/metrics", headers=auth).text
        assert f'finopsd_rows_stored_total{{table="usage_events"}} {float(n)}' in metrics
        assert "finopsd_store_append_seconds_bucket" in metrics
        assert "finopsd_consumer_lag{" in metrics

        spend = c.get(
            "/v1/spend", params={"group_by": "tenant", "granularity": "hour"}, headers=auth
        )
        assert spend.status_code == 200, spend.text
        rows = spend.json()["rows"]
        assert sum(r["requests"] for r in rows) == n
        assert {r["tenant"] for r in rows}
        wrong = c.get("/v1/spend", params={"group_by": "colour"}, headers=auth)
        assert wrong.status_code == 400 and "colour" in wrong.json()["detail"]

        assert c.get("/v1/findings/nope", headers=auth).status_code == 404
        assert c.get("/openapi.json").json()["info"]["title"] == "finopsd"
    log = daemon.log_text(since_start=True)
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    served = [x for x in lines if x.get("request_id") == "req-42"]
    assert served and served[0]["msg"].startswith("GET /v1/stats 200"), served
    assert all("request_id" in x for x in lines if x["logger"] == "finopsd.api")
    token = token_file.read_text().strip()
    assert token not in log


def test_writes_need_the_token_and_change_nothing_without_it(
    running: tuple[DaemonSetup, DaemonProcess, int],
) -> None:
    setup, _daemon, _n = running
    url, auth = api(setup)
    with httpx.Client(base_url=url, timeout=300) as c:
        before = c.get("/metrics", headers=auth).text
        assert "finopsd_analyzer_runs_total{" not in before  # nothing has run yet
        assert c.post("/v1/analyze", json={"only": ["spend"]}).status_code == 401
        refused = c.post(
            "/v1/analyze", json={}, headers={"Authorization": "Bearer wrong-token-0123456789"}
        )
        assert refused.status_code == 401
        assert "finopsd_analyzer_runs_total{" not in c.get("/metrics", headers=auth).text
        unknown = c.post("/v1/analyze", json={"only": ["nope"]}, headers=auth)
        assert unknown.status_code == 400 and "nope" in unknown.json()["detail"]
        done = c.post("/v1/analyze", json={"only": ["spend", "caching"]}, headers=auth)
        assert done.status_code == 200, done.text
        assert [r["analyzer"] for r in done.json()["runs"]] == ["spend", "caching"]
        after = c.get("/metrics", headers=auth).text
        assert 'finopsd_analyzer_runs_total{analyzer="caching"} 1.0' in after
        listed = c.get("/v1/findings", params={"limit": 1}, headers=auth).json()
        assert listed["limit"] == 1 and len(listed["findings"]) <= 1
        for f in listed["findings"]:
            one = c.get(f"/v1/findings/{f['id']}", headers=auth).json()
            assert one["id"] == f["id"] and one["evidence"] == f["evidence"]


def test_the_cli_answers_the_same_with_the_daemon_running_and_stopped(
    running: tuple[DaemonSetup, DaemonProcess, int], tmp_path: Path
) -> None:
    setup, daemon, n = running
    live_stats = cli(setup, "stats", "--json")
    assert live_stats.returncode == 0, live_stats.stderr
    live_analyze = cli(setup, "analyze", "--only", "spend", "--json")
    assert live_analyze.returncode == 0, live_analyze.stderr
    text = cli(setup, "analyze", "--only", "spend")
    assert text.returncode == 0 and "spend" in text.stdout, text.stderr
    day = datetime.now(UTC).date()
    span = ["--from", str(day - timedelta(days=1)), "--to", str(day + timedelta(days=1))]
    span += ["--format", "csv"]
    live_csv = tmp_path / "live.csv"
    live_export = cli(setup, "export", "focus", *span, "-o", str(live_csv), "--json")
    assert live_export.returncode == 0, live_export.stderr
    assert daemon.terminate() == 0

    still = cli(setup, "stats", "--json")
    assert still.returncode == 0, still.stderr
    assert json.loads(still.stdout) == json.loads(live_stats.stdout)
    assert json.loads(still.stdout)["usage_events"] == n
    stopped = cli(setup, "analyze", "--only", "spend", "--json")
    a, b = json.loads(live_analyze.stdout), json.loads(stopped.stdout)
    assert [(r["analyzer"], r["findings"], r["error"]) for r in a["runs"]] == [
        (r["analyzer"], r["findings"], r["error"]) for r in b["runs"]
    ]
    assert a["findings"] == b["findings"] and a["window_days"] == b["window_days"]
    stopped_csv = tmp_path / "stopped.csv"
    stopped_export = cli(setup, "export", "focus", *span, "-o", str(stopped_csv), "--json")
    assert stopped_export.returncode == 0, stopped_export.stderr
    assert live_csv.read_bytes() == stopped_csv.read_bytes()
    live_summary: dict[str, Any] = json.loads(live_export.stdout)
    live_summary["output"] = str(stopped_csv)
    assert live_summary == json.loads(stopped_export.stdout)
    rows = list(csv.DictReader(io.StringIO(live_csv.read_text())))
    assert rows and sum(int(r["x_Requests"]) for r in rows) > 0
