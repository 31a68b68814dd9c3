"""Runs analyzers and keeps their findings: one row per finding id, updated, never repeated.

``run_analyzers(store, ...)`` runs each enabled analyzer on the window, in
turn; an analyzer that fails is reported and the others still run. Its
findings are upserted by id in one transaction (first_seen kept, last_seen and
times_seen advanced); a finding of that analyzer not found again is marked
``resolved``. Every run is recorded in ``analyzer_runs``.

Before a finding is stored it is judged on its evidence (``base.judge_evidence``
with ``min_evidence_hours`` and the analyzer's ``min_evidence_requests``): the
``provisional`` column says whether the actions layer may act on it
(only ``provisional = false`` rows are eligible).
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import pkgutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import duckdb
import pyarrow as pa
from pydantic import ValidationError

from finopsd.analyzers.base import (
    ANALYZERS,
    MIN_EVIDENCE_HOURS,
    Analyzer,
    Context,
    Finding,
    Options,
    Window,
    judge_evidence,
)
from finopsd.pricing import PriceBook
from finopsd.store import Store

log = logging.getLogger(__name__)

_INTERNAL = {"base", "runner"}


def discover() -> dict[str, type[Analyzer]]:
    """Import every analyzer module of this package; the registry by name."""
    import finopsd.analyzers as package

    for module in pkgutil.iter_modules(package.__path__):
        if module.name not in _INTERNAL and not module.name.startswith("_"):
            importlib.import_module(f"{package.__name__}.{module.name}")
    return dict(sorted(ANALYZERS.items()))


def build(
    options: Mapping[str, Mapping[str, Any]], only: Sequence[str] | None = None
) -> list[Analyzer]:
    """Analyzer instances from ``[analyzers.<name>]`` options; ``only`` limits them by name.

    Raises ``ValueError`` naming the unknown analyzer or the bad option key.
    """
    known = discover()
    for name in [*options, *(only or [])]:
        if name not in known:
            raise ValueError(f"unknown analyzer {name!r}; valid: {', '.join(known)}")
    out = []
    for name, cls in known.items():
        try:
            opts: Options = cls.Options.model_validate(dict(options.get(name, {})))
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ValueError(f"analyzers.{name}.{where}: {first['msg']}") from None
        if only is not None and name not in only:
            continue
        if only is None and not opts.enabled:
            continue
        out.append(cls(opts))
    return sorted(out, key=lambda a: (a.order, a.name))


@dataclass
class AnalyzerRun:
    """What one analyzer's run produced."""

    name: str
    seconds: float
    findings: list[Finding] = field(default_factory=list)
    error: str | None = None


def run_analyzers(
    store: Store,
    prices: PriceBook,
    analyzers: Sequence[Analyzer],
    *,
    window_days: float = 30.0,
    now: datetime | None = None,
    min_evidence_hours: float = MIN_EVIDENCE_HOURS,
) -> list[AnalyzerRun]:
    """Run ``analyzers`` over the last ``window_days`` before ``now`` and store their findings.

    ``min_evidence_hours`` (``analyzers.min_evidence_hours``): a finding whose
    evidence spans less is provisional.
    """
    now = (now or datetime.now(UTC)).astimezone(UTC)
    window = Window(now - timedelta(days=window_days), now)
    runs = []
    if not any(a.name == "spend" for a in analyzers):
        from finopsd.analyzers.spend import refresh

        store.write(refresh)  # the rollups every other analyzer reads
    first_hour, last_hour = observed_hours(store, window)
    for analyzer in analyzers:
        started = time.perf_counter()
        ctx = Context(
            store.cursor(),
            window,
            now,
            prices,
            store.write,
            min_evidence_hours,
            last_hour,
            first_hour,
        )
        try:
            findings = analyzer.run(ctx)
            for f in findings:
                judge_evidence(f, min_evidence_hours, analyzer.required_requests)
            error = None
        except Exception as exc:  # one analyzer's failure never stops the others
            log.error("analyzer %s failed: %s", analyzer.name, exc, exc_info=log.isEnabledFor(10))
            findings, error = [], f"{type(exc).__name__}: {exc}"
        seconds = time.perf_counter() - started
        run = AnalyzerRun(analyzer.name, seconds, findings, error)
        store.write(lambda con, run=run: _record(con, run, window, now))
        runs.append(run)
    return runs


def observed_hours(store: Store, window: Window) -> tuple[int | None, int | None]:
    """The epoch hours of the earliest and the latest usage event or GPU sample in
    ``window``: where what has been observed begins and ends (None: nothing)."""
    query = """
        WITH u AS (SELECT min(ts) AS lo, max(ts) AS hi FROM usage_events
                   WHERE ts >= $start AND ts < $end),
             g AS (SELECT min(ts) AS lo, max(ts) AS hi FROM gpu_samples
                   WHERE ts >= $start AND ts < $end)
        SELECT least(u.lo, g.lo), greatest(u.hi, g.hi) FROM u, g
    """
    cur = store.cursor()
    row = cur.execute(query, {"start": window.start, "end": window.end}).fetchone()
    if row is None or row[0] is None:
        return None, None
    return math.floor(row[0].timestamp() / 3600), math.floor(row[1].timestamp() / 3600)


def _record(
    con: duckdb.DuckDBPyConnection, run: AnalyzerRun, window: Window, now: datetime
) -> None:
    con.execute(
        "INSERT INTO analyzer_runs VALUES (?, ?, ?, ?, ?)",
        [run.name, now, run.seconds, len(run.findings), run.error],
    )
    if run.error is not None:
        return  # a failed run says nothing about whether earlier findings still hold
    unique = {f.id: f for f in run.findings}  # one row per id, the last one found wins
    if unique:
        found = list(unique.values())
        rows = pa.table(
            {
                "id": [f.id for f in found],
                "kind": [f.kind for f in found],
                "scope": [json.dumps(f.scope, sort_keys=True) for f in found],
                "title": [f.title for f in found],
                "evidence": [
                    json.dumps(
                        {**f.evidence, "window": window.as_dict()}, sort_keys=True, default=str
                    )
                    for f in found
                ],
                "monthly_savings_usd": pa.array(
                    [float(f.monthly_savings_usd) for f in found], pa.float64()
                ),
                "savings_method": [f.savings_method for f in found],
                "confidence": pa.array([float(f.confidence) for f in found], pa.float64()),
                "risk": [f.risk for f in found],
                "action": pa.array(
                    [json.dumps(f.action.as_dict()) if f.action else None for f in found],
                    pa.string(),
                ),
                "low": pa.array(
                    [float(f.monthly_savings_low_usd or 0.0) for f in found], pa.float64()
                ),
                "high": pa.array(
                    [float(f.monthly_savings_high_usd or 0.0) for f in found], pa.float64()
                ),
                "hours": pa.array([float(f.evidence_hours) for f in found], pa.float64()),
                "requests": pa.array([int(f.evidence_requests) for f in found], pa.int64()),
                "provisional": pa.array([bool(f.provisional) for f in found], pa.bool_()),
            }
        )
        con.register("findings_found", rows)
        try:  # one statement for all of them (a query each cost ~0.4 ms)
            con.execute(
                """
                INSERT INTO findings (
                    id, analyzer, kind, scope, title, evidence, window_start, window_end,
                    monthly_savings_usd, savings_method, confidence, risk, action,
                    first_seen, last_seen, times_seen, status,
                    monthly_savings_low_usd, monthly_savings_high_usd,
                    evidence_hours, evidence_requests, provisional
                )
                SELECT id, $analyzer, kind, scope, title, evidence, $start, $end,
                       monthly_savings_usd, savings_method, confidence, risk, action,
                       $now, $now, 1, 'open', low, high, hours, requests, provisional
                FROM findings_found
                ON CONFLICT (id) DO UPDATE SET
                    title = excluded.title, evidence = excluded.evidence,
                    window_start = excluded.window_start, window_end = excluded.window_end,
                    monthly_savings_usd = excluded.monthly_savings_usd,
                    savings_method = excluded.savings_method,
                    confidence = excluded.confidence,
                    risk = excluded.risk, action = excluded.action,
                    last_seen = excluded.last_seen, times_seen = findings.times_seen + 1,
                    status = 'open',
                    monthly_savings_low_usd = excluded.monthly_savings_low_usd,
                    monthly_savings_high_usd = excluded.monthly_savings_high_usd,
                    evidence_hours = excluded.evidence_hours,
                    evidence_requests = excluded.evidence_requests,
                    provisional = excluded.provisional
                """,
                {
                    "analyzer": run.name,
                    "start": window.start,
                    "end": window.end,
                    "now": now,
                },
            )
        finally:
            con.unregister("findings_found")
    seen = [f.id for f in run.findings]
    con.execute(
        "UPDATE findings SET status = 'resolved' WHERE analyzer = ? AND status = 'open' "
        "AND NOT list_contains(?, id)",
        [run.name, seen],
    )


def stored_findings(
    con: duckdb.DuckDBPyConnection, *, analyzer: str | None = None, status: str = "open"
) -> list[dict[str, Any]]:
    """Findings as dicts (every column of ``findings``), the largest monthly saving first.

    ``eligible_for_action`` is added: an action and not provisional."""
    sql = "SELECT * FROM findings WHERE status = ?"
    params: list[Any] = [status]
    if analyzer is not None:
        sql += " AND analyzer = ?"
        params.append(analyzer)
    cur = con.execute(sql + " ORDER BY monthly_savings_usd DESC, id", params)
    names = [d[0] for d in cur.description or []]
    out = []
    for row in cur.fetchall():
        item = dict(zip(names, row, strict=True))
        for key in ("scope", "evidence", "action"):
            if isinstance(item[key], str):
                item[key] = json.loads(item[key])
        item["eligible_for_action"] = item["action"] is not None and not item["provisional"]
        out.append(item)
    return out
