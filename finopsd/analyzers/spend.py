"""spend: hourly spend rollups, maintained incrementally; what the other analyzers read.

``spend_hourly`` holds one row per UTC hour × tenant × team × app × feature ×
provider × model × deployment × latency_class × billing_mode × status, with
request, token and cost sums. A run recomputes only the hours that changed
since the last run: hours with events ingested after the watermark, and hours
whose self-hosted cost was settled after it. So a run costs in proportion to
new data. ``spend_daily`` is a view over it.

It finds no waste itself; it returns no findings.
"""

from __future__ import annotations

from datetime import datetime
from typing import ClassVar

import duckdb

from finopsd.analyzers._rollups import utc_floor_us
from finopsd.analyzers.base import Analyzer, Context, Finding, register

DIMENSIONS = (
    "tenant",
    "team",
    "app",
    "feature",
    "provider",
    "model",
    "deployment",
    "latency_class",
    "billing_mode",
    "status",
)
"""The rollup's grouping columns besides ``hour`` (``model`` is the requested model)."""

_HOUR = utc_floor_us("ts", 3600)
"""An event's UTC hour (``store.utc_floor``'s instants, in integer arithmetic: cheaper
over the whole table on a first run)."""

_SELECT = f"""
    SELECT {_HOUR} AS hour, tenant, team, app, feature, provider, request_model AS model,
           deployment, latency_class, billing_mode, status,
           count(*) AS requests,
           sum(input_tokens) AS input_tokens,
           sum(output_tokens) AS output_tokens,
           coalesce(sum(cache_read_input_tokens), 0) AS cache_read_tokens,
           coalesce(sum(cache_creation_input_tokens), 0) AS cache_write_tokens,
           coalesce(sum(cost_usd), 0) AS cost_usd,
           coalesce(sum(list_cost_usd), 0) AS list_cost_usd,
           count(*) - count(cost_usd) AS unpriced_requests,
           coalesce(sum(latency_ms), 0) AS latency_ms_sum,
           coalesce(sum(quality_score), 0) AS quality_sum,
           count(quality_score) AS quality_n
    FROM usage_events
"""
_GROUP = " GROUP BY ALL"
"""(A missing count or cost adds 0: ``coalesce(sum(x), 0)``, the same sums as summing
``coalesce(x, 0)``, without a coalesce per event.)"""


def refresh(con: duckdb.DuckDBPyConnection) -> int:
    """Bring ``spend_hourly`` up to date; returns how many hours were recomputed.

    Runs in the caller's transaction.
    """
    row = con.execute("SELECT watermark FROM rollup_state WHERE name = 'spend_hourly'").fetchone()
    watermark: datetime | None = row[0] if row else None
    top = con.execute("SELECT max(ingested_at) FROM usage_events").fetchone()
    newest: datetime | None = top[0] if top else None
    if newest is None:
        return 0
    if watermark is None:
        con.execute("DELETE FROM spend_hourly")
        con.execute(f"INSERT INTO spend_hourly {_SELECT} {_GROUP}")
        hours = con.execute("SELECT count(DISTINCT hour) FROM spend_hourly").fetchone()
        recomputed = int(hours[0]) if hours else 0
    else:
        con.execute(
            f"""
            CREATE OR REPLACE TEMP TABLE changed_hours AS
            SELECT DISTINCT {_HOUR} AS hour FROM usage_events WHERE ingested_at > $w
            UNION
            SELECT DISTINCT hour FROM deployment_hours WHERE settled_at > $w
            """,
            {"w": watermark},
        )
        recomputed_row = con.execute("SELECT count(*) FROM changed_hours").fetchone()
        recomputed = int(recomputed_row[0]) if recomputed_row else 0
        if recomputed:
            bounds = con.execute("SELECT min(hour), max(hour) FROM changed_hours").fetchone()
            assert bounds is not None
            con.execute("DELETE FROM spend_hourly WHERE hour IN (SELECT hour FROM changed_hours)")
            con.execute(
                f"""
                INSERT INTO spend_hourly {_SELECT}
                WHERE ts >= $lo AND ts < $hi + INTERVAL 1 HOUR
                  AND {_HOUR} IN (SELECT hour FROM changed_hours)
                {_GROUP}
                """,
                {"lo": bounds[0], "hi": bounds[1]},
            )
        con.execute("DROP TABLE changed_hours")
    settled = con.execute("SELECT max(settled_at) FROM deployment_hours").fetchone()
    mark = max(t for t in (newest, settled[0] if settled else None) if t is not None)
    con.execute("INSERT OR REPLACE INTO rollup_state VALUES ('spend_hourly', ?)", [mark])
    return recomputed


@register
class Spend(Analyzer):
    name: ClassVar[str] = "spend"
    description: ClassVar[str] = "hourly and daily spend rollups (tenant, app, feature, model)"
    order: ClassVar[int] = 0

    def run(self, ctx: Context) -> list[Finding]:
        ctx.write(refresh)
        return []
