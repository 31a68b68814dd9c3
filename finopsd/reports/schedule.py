"""``ReportService``: the weekly report on a schedule, a ``Service`` of the daemon.

Every ``reports.weekday`` at ``reports.hour`` UTC (APScheduler cron), the last
complete ISO week's report is built from the store, written under
``reports.directory`` (Markdown, HTML with its charts, JSON), sent as JSON on
``reports.topic`` and, with ``[slack]`` on and ``reports.slack_summary``, its three
headline numbers are posted to Slack. A failing run is logged and the next one
goes ahead; ingest never waits on it. ``run_now(week)`` does the same at once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from finopsd.config import ReportsSettings
from finopsd.reports import weekly
from finopsd.service.supervisor import Check
from finopsd.store import Store

log = logging.getLogger(__name__)


class ReportService:
    """See the module docstring."""

    name = "reports"

    def __init__(
        self,
        store: Store,
        settings: ReportsSettings,
        out_dir: Path,
        *,
        send: Callable[[str, dict[str, Any]], bool] | None = None,
        announce: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        from apscheduler.schedulers.background import BackgroundScheduler

        self.store = store
        self.settings = settings
        self.out_dir = out_dir
        self.send = send
        self.announce = announce
        self._lock = threading.Lock()
        self.scheduler = BackgroundScheduler(timezone="UTC")
        self.scheduler.add_job(
            self._scheduled,
            "cron",
            day_of_week=settings.weekday,
            hour=settings.hour,
            id="weekly-report",
            max_instances=1,
            coalesce=True,
            misfire_grace_time=3600,
        )
        self.last_error: str | None = None

    def run_now(self, week: weekly.Week | None = None) -> dict[str, Path]:
        """Build, write, send and announce ``week``'s report (default: the last complete)."""
        chosen = week or weekly.Week.last_complete()
        with self._lock:
            report = weekly.build(self.store.cursor(), chosen)
            paths = weekly.write(report, self.out_dir)
        log.info("weekly report %s written to %s", chosen.label, paths["html"])
        if self.send is not None and not self.send(chosen.label, report):
            log.warning("weekly report %s not sent to %s", chosen.label, self.settings.topic)
        if self.announce is not None:
            try:
                self.announce(report)
            except Exception as exc:  # Slack away: the files are written all the same
                log.warning("weekly report %s not announced: %s", chosen.label, exc)
        return paths

    def _scheduled(self) -> None:
        try:
            self.run_now()
            self.last_error = None
        except Exception as exc:  # logged; next week's run goes ahead
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.error("weekly report failed: %s", self.last_error)

    def start(self) -> None:
        self.scheduler.start()

    def stop(self) -> None:
        if self.scheduler.running:
            self.scheduler.shutdown(wait=True)

    def health(self) -> list[Check]:
        running = bool(self.scheduler.running)
        return [Check("reports", running, "" if running else "the report schedule stopped")]


def slack_summary(report: dict[str, Any], api_base_url: str | None) -> dict[str, Any]:
    """The Slack message of a report: its three headline numbers (and a link)."""
    lines = weekly.headline(report)
    text = f"*finopsd weekly report {report['week']}*\n" + "\n".join(f"• {x}" for x in lines)
    if api_base_url:
        url = f"{api_base_url.rstrip('/')}/v1/reports/weekly?week={report['week']}"
        text += f"\n<{url}|the whole report (JSON)>"
    return {
        "text": f"finopsd weekly report {report['week']}: " + "; ".join(lines),
        "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": text}}],
    }
