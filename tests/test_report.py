"""The weekly report over a real store with a live action: the realised figures are the
ledger's, the projections stay apart, the HTML renders with its charts, the CLI writes it."""

from __future__ import annotations

import base64
import html.parser
import json
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import clean_env
from test_actions import NOW, Clock, FileRoutes, Sink, controller, history, serve, settings

from finopsd.actions import ledger
from finopsd.reports import weekly
from finopsd.store import Store

PNG = b"\x89PNG\r\n\x1a\n"


class _Images(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.images.append(dict(attrs).get("src") or "")


@pytest.fixture
def store_with_an_action(tmp_path: Path) -> Path:
    path = tmp_path / "s.duckdb"
    with Store(path) as store:
        history(store)
        routes, clock = FileRoutes(tmp_path / "routes.json"), Clock(NOW)
        c = controller(store, routes, Sink(), clock, settings())
        c.tick()
        clock.now += timedelta(minutes=1)
        serve(store, routes.path, 500, clock.now, mid_quality=0.88, tag="w-")
        clock.now += timedelta(minutes=500)
        c.tick()
    return path


def test_the_report_shows_the_ledger_and_keeps_projections_apart(
    store_with_an_action: Path, tmp_path: Path
) -> None:
    week = weekly.Week.parse("2026-W11")  # NOW (2026-03-09) is its Monday
    with Store(store_with_an_action, read_only=True) as store:
        report = weekly.build(store.cursor(), week)
        (total,) = ledger.totals(store.cursor())
        spent = (
            store.cursor()
            .execute(
                "SELECT sum(cost_usd) FROM usage_events WHERE ts >= ? AND ts < ?",
                [week.start, week.end],
            )
            .fetchone()
        )
    realised = report["realised"]
    assert realised["saved_usd"] == pytest.approx(total["saved_usd"])
    assert realised["saved_usd"] > 0
    assert realised["saved_low_usd"] <= realised["saved_usd"] <= realised["saved_high_usd"]
    (action,) = realised["actions"]
    assert action["requests"] == total["requests"] == 500
    projected = report["projected"]
    assert projected["findings"] == 1 and projected["monthly_usd"] > realised["saved_usd"]
    assert "projections, not savings" in projected["source"]
    assert spent is not None and report["spend"]["total_usd"] == pytest.approx(spent[0])
    assert sum(r["usd"] for r in report["spend"]["by"]["model"]) == pytest.approx(spent[0])
    lines = weekly.headline(report)
    assert "measured" in lines[1] and "projected" in lines[2]

    paths = weekly.write(report, tmp_path / "out")
    page = paths["html"].read_text()
    parser = _Images()
    parser.feed(page)
    assert len(parser.images) == 3
    for src in parser.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG)
    for name in ("spend_by_team.png", "savings.png", "cost_per_million_tokens.png"):
        assert paths[name].read_bytes().startswith(PNG)
    assert weekly._usd(realised["saved_usd"]) in page
    md = paths["markdown"].read_text()
    assert "## Realised savings (measured)" in md and "## Projected savings" in md
    assert json.loads(paths["json"].read_text())["realised"]["saved_usd"] == pytest.approx(
        realised["saved_usd"]
    )


def test_the_cli_writes_the_report_and_refuses_a_bad_week(
    store_with_an_action: Path, tmp_path: Path
) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'[store]\npath = "{store_with_an_action}"\n[api]\nport = 0\n')

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "finopsd", "report", *args, "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=300,
            env=clean_env(),
        )

    out = tmp_path / "out"
    done = run("--week", "2026-W11", "--out", str(out), "--json")
    assert done.returncode == 0, done.stderr
    payload: dict[str, Any] = json.loads(done.stdout)
    assert Path(payload["files"]["html"]).is_file()
    assert payload["report"]["realised"]["saved_usd"] > 0
    text = run("--week", "2026-W11", "--out", str(out))
    assert text.returncode == 0 and "measured" in text.stdout
    assert all(len(line) <= 80 for line in text.stdout.splitlines() if str(out) not in line)
    bad = run("--week", "2026-W99")
    assert bad.returncode == 2 and "2026-W99" in bad.stderr


def test_the_scheduled_run_writes_sends_and_announces(
    store_with_an_action: Path, tmp_path: Path, topics: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``ReportService.run_now`` (what the cron job runs): the files, the report as JSON
    on the reports topic, its three numbers posted to a Slack stand-in."""
    from conftest import consume_all
    from kafka import KafkaProducer
    from test_slack import SlackStandIn

    from finopsd.actions.slack import post
    from finopsd.config import ReportsSettings
    from finopsd.ingest.broker import ensure_topics
    from finopsd.reports.schedule import ReportService, slack_summary
    from finopsd.service.actions import KafkaEvents

    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    topic = f"reports.{topics.group}"
    ensure_topics(topics.bootstrap, {topic: 1})
    events = KafkaEvents(lambda: KafkaProducer(bootstrap_servers=topics.bootstrap), topic, 30)
    slack = SlackStandIn()
    try:

        def announce(report: dict[str, Any]) -> None:
            assert post(f"{slack.url}/hook", slack_summary(report, "https://f.example"), 5) is None

        with Store(store_with_an_action, read_only=True) as store:
            service = ReportService(
                store,
                ReportsSettings(topic=topic),
                tmp_path / "reports",
                send=events.send,
                announce=announce,
            )
            service.start()
            assert service.health()[0].ok
            paths = service.run_now(weekly.Week.parse("2026-W11"))
            service.stop()
        assert paths["html"].is_file() and paths["html"].parent == tmp_path / "reports"
        (record,) = consume_all(topics.bootstrap, topic, 1)
        sent = json.loads(record.value)
        assert record.key == b"2026-W11" and sent["week"] == "2026-W11"
        assert sent["realised"]["saved_usd"] > 0
        (message,) = slack.wait("/hook")
        text = message.body["blocks"][0]["text"]["text"]
        assert "Saved" in text and "measured" in text and "projected" in text
        assert "week=2026-W11" in text
    finally:
        events.close()
        slack.close()
