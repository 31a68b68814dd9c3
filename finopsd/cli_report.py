"""``finopsd report``: the weekly savings report, written as Markdown, HTML (with its PNG
charts) and JSON under ``--out``.

The figures come from the running daemon (``GET /v1/reports/weekly``) when it holds
the store, else from the store file; the files are written here either way, so
the output is the same.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from finopsd.config import Settings

Load = Callable[[argparse.Namespace], Settings]


def cmd_report(args: argparse.Namespace, settings: Settings) -> int:
    from finopsd.client import DaemonClient, DaemonError
    from finopsd.reports import weekly
    from finopsd.store import Store, StoreError

    try:
        week = weekly.Week.parse(args.week) if args.week else weekly.Week.last_complete()
    except weekly.ReportError as exc:
        print(f"finopsd: {exc}", file=sys.stderr)
        return 2
    if not settings.store.path.exists():
        print(f"finopsd: no store at {settings.store.path} (store.path)", file=sys.stderr)
        return 1
    try:
        with Store(settings.store.path, read_only=True) as store:
            report: dict[str, Any] = weekly.build(store.cursor(), week)
    except StoreError as exc:
        if "lock" not in str(exc).lower():
            print(f"finopsd: {exc}", file=sys.stderr)
            return 1
        try:
            report = DaemonClient(settings).get("/v1/reports/weekly", {"week": week.label})
        except DaemonError as err:
            print(f"finopsd: {err}", file=sys.stderr)
            return 1
    paths = weekly.write(report, Path(args.out))
    if args.json:
        print(json.dumps({"report": report, "files": {k: str(v) for k, v in paths.items()}}))
        return 0
    print(f"finopsd weekly report {report['week']} ({report['from'][:10]} to {report['to'][:10]})")
    for line in weekly.headline(report):
        print(f"  {line}")
    print(f"written: {paths['html']}")
    print(f"         {paths['markdown']}")
    print(f"         {paths['json']} (and {len(paths) - 3} PNG charts)")
    return 0


def add_parsers(sub: Any, common: argparse.ArgumentParser, load: Load) -> None:
    p = sub.add_parser(
        "report",
        parents=[common],
        help="the weekly savings report (Markdown, HTML with charts, JSON)",
        description="Spend by tenant, team, model and feature against the week before; "
        "the savings measured on what actions touched (the ledger); the savings open "
        "findings project, kept apart; anomalies, budgets, self-hosted deployments.",
    )
    p.add_argument("--week", metavar="YYYY-Www", help="ISO week (default: the last complete)")
    p.add_argument("--out", default="out", metavar="DIR", help="where to write (default ./out)")
    p.add_argument("--json", action="store_true", help="print the report and the files as JSON")
    p.set_defaults(func=lambda a: cmd_report(a, load(a)))
