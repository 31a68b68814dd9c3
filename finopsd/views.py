"""What the CLI and the HTTP API show: the same payloads, whoever opens the store.

Each function reads the store through the connection it is given (the API passes
a cursor of its own per request, never ingest's) and returns plain data that
``json.dumps`` takes as it is. ``finopsd stats --json`` prints ``stats(...)``
whether it opened the store itself or asked the running daemon's
``GET /v1/stats``.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Literal

import duckdb

from finopsd.pricing import spend_summary
from finopsd.store import Store

FINDING_STATUSES = ("open", "resolved", "dismissed")
SPEND_GROUPS = ("tenant", "team", "app", "feature", "provider", "model", "deployment")
Granularity = Literal["hour", "day", "month"]


def stats(store: Store, con: duckdb.DuckDBPyConnection, tolerance: float) -> dict[str, Any]:
    """Rows per table, the stored offset of every partition, priced spend (``finopsd stats``)."""
    offsets = store.stored_offsets()
    return {
        **store.counts(),
        "offsets": {f"{t}[{p}]": o for (t, p), o in sorted(offsets.items())},
        "spend": spend_summary(con, tolerance),
    }


def findings(
    con: duckdb.DuckDBPyConnection,
    *,
    kind: str | None = None,
    tenant: str | None = None,
    status: str = "open",
    min_savings_usd: float = 0.0,
    limit: int = 100,
    offset: int = 0,
) -> dict[str, Any]:
    """Stored findings, the largest monthly saving first: ``{"total", "findings"}``.

    ``kind`` matches a kind (``caching.prompt_prefix``) or an analyzer's prefix
    (``caching``); ``tenant`` the scope's tenant.
    """
    where = ["status = $status", "monthly_savings_usd >= $min"]
    params: dict[str, Any] = {"status": status, "min": min_savings_usd}
    if kind:
        where.append("(kind = $kind OR kind LIKE $kind || '.%')")
        params["kind"] = kind
    if tenant:
        where.append("json_extract_string(scope, '$.tenant') = $tenant")
        params["tenant"] = tenant
    sql_where = " AND ".join(where)
    total_row = con.execute(f"SELECT count(*) FROM findings WHERE {sql_where}", params).fetchone()
    cur = con.execute(
        f"SELECT * FROM findings WHERE {sql_where} "
        "ORDER BY monthly_savings_usd DESC, id LIMIT $limit OFFSET $offset",
        {**params, "limit": limit, "offset": offset},
    )
    return {
        "total": int(total_row[0]) if total_row else 0,
        "limit": limit,
        "offset": offset,
        "findings": _finding_rows(cur),
    }


def finding(con: duckdb.DuckDBPyConnection, finding_id: str) -> dict[str, Any] | None:
    """One stored finding by id (any status); None: no such finding."""
    rows = _finding_rows(con.execute("SELECT * FROM findings WHERE id = ?", [finding_id]))
    return rows[0] if rows else None


def _finding_rows(cur: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    names = [d[0] for d in cur.description or []]
    out = []
    for row in cur.fetchall():
        item = dict(zip(names, row, strict=True))
        for key in ("scope", "evidence", "action"):
            if isinstance(item[key], str):
                item[key] = json.loads(item[key])
        for key, value in item.items():
            if isinstance(value, datetime):
                item[key] = value.isoformat()
        item["eligible_for_action"] = item["action"] is not None and not item["provisional"]
        out.append(item)
    return out


def spend(
    con: duckdb.DuckDBPyConnection,
    *,
    group_by: list[str],
    start: datetime,
    end: datetime,
    granularity: Granularity = "day",
) -> dict[str, Any]:
    """Priced spend per period and group over [start, end), from ``spend_hourly``.

    Rows: ``period`` (the start of the hour, day or month, UTC), the group columns,
    ``requests``, ``input_tokens``, ``output_tokens``, ``cost_usd`` (unpriced requests
    are counted in ``unpriced_requests``, not in the cost). Reads the rollup as it is:
    callers bring it up to date first (``finopsd.analyzers.spend.refresh``).
    """
    unknown = [g for g in group_by if g not in SPEND_GROUPS]
    if unknown:
        raise ValueError(
            f"group_by: unknown {', '.join(unknown)}; one or more of {', '.join(SPEND_GROUPS)}"
        )
    cols = "".join(f", {g}" for g in group_by)
    cur = con.execute(
        f"""
        SELECT date_trunc('{granularity}', hour AT TIME ZONE 'UTC') AS period{cols},
               sum(requests)::BIGINT AS requests, sum(input_tokens)::BIGINT AS input_tokens,
               sum(output_tokens)::BIGINT AS output_tokens,
               coalesce(sum(cost_usd), 0) AS cost_usd,
               sum(unpriced_requests)::BIGINT AS unpriced_requests
        FROM spend_hourly
        WHERE hour >= $start AND hour < $end
        GROUP BY ALL
        ORDER BY period{cols}
        """,
        {"start": start, "end": end},
    )
    names = [d[0] for d in cur.description or []]
    rows = []
    for row in cur.fetchall():
        item = dict(zip(names, row, strict=True))
        item["period"] = item["period"].isoformat() + "Z"
        item["cost_usd"] = float(item["cost_usd"])
        rows.append(item)
    return {
        "from": start.isoformat(),
        "to": end.isoformat(),
        "granularity": granularity,
        "group_by": group_by,
        "cost_source": "cost_usd of the stored usage events (list prices, or settled "
        "self-hosted GPU-hours), summed per hour in spend_hourly",
        "rows": rows,
    }


def analysis(runs: list[Any], window_days: float) -> dict[str, Any]:
    """What ``finopsd analyze --json`` prints for ``runs`` (``AnalyzerRun``s): every run
    and its findings, the largest monthly saving first."""
    found = sorted((f for r in runs for f in r.findings), key=lambda f: -f.monthly_savings_usd)
    return json.loads(
        json.dumps(
            {
                "window_days": window_days,
                "runs": [
                    {
                        "analyzer": r.name,
                        "seconds": round(r.seconds, 3),
                        "error": r.error,
                        "findings": len(r.findings),
                    }
                    for r in runs
                ],
                "findings": [f.as_dict() for f in found],
            },
            default=str,
        )
    )
