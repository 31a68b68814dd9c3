"""Helpers the routing and batch analyzers share: current prices, and small rollups of
``spend_hourly`` kept up to date incrementally.

A derived rollup here is a table whose rows are an aggregate of ``spend_hourly``
per period (an hour or a UTC day) in its first column. A period changes when an
event whose ``ts`` falls in it is ingested, or when a self-hosted hour in it is
settled (its cost spread over its events); ``changed_periods`` finds those
periods since a watermark, ``rebuild_periods`` recomputes exactly them. So a
run costs in proportion to what changed, like ``spend.refresh`` itself (which
the runner always runs first, so ``spend_hourly`` is current).
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

import duckdb

from finopsd.pricing import SELF_HOSTED, Price, PriceBook

NO_TAG = "(none)"
"""A scope's value for a tag the traffic did not carry."""

HOUR = 3600
DAY = 86400


def utc_floor_us(expr: str, seconds: int) -> str:
    """SQL: the TIMESTAMPTZ ``expr`` floored to a multiple of ``seconds`` since the epoch,
    in integer microseconds: the same instants as ``store.utc_floor`` (whatever the
    connection's TimeZone says, before 1970 too), at about half its cost over many rows."""
    n = seconds * 1_000_000
    return f"make_timestamptz(epoch_us({expr}) - ((epoch_us({expr}) % {n}) + {n}) % {n})"


def tag(value: Any) -> str:
    """A scope value: the tag, or ``NO_TAG`` for a missing one."""
    return NO_TAG if value is None else str(value)


def price_now(
    prices: PriceBook,
    provider: str | None,
    model: str,
    deployment: str | None,
    on: date,
) -> Price | None:
    """The catalog/config price of ``provider``/``model`` in effect on ``on``.

    None for a self-hosted deployment (priced by GPU-hours, not by a list
    price), a model the price book does not know, or one whose first price is
    later than ``on``.
    """
    key = prices.resolve(provider, None, model, deployment)
    if key is None or key.startswith(f"{SELF_HOSTED}/"):
        return None
    return prices.price_at(key, on)


def watermark(con: duckdb.DuckDBPyConnection, name: str) -> datetime | None:
    """The watermark stored under ``name`` in ``rollup_state`` (None: never built)."""
    row = con.execute("SELECT watermark FROM rollup_state WHERE name = ?", [name]).fetchone()
    return row[0] if row else None


def newest_change(con: duckdb.DuckDBPyConnection) -> datetime | None:
    """How far ``spend_hourly`` is up to date: its watermark, the latest ``ingested_at`` or
    ``settled_at`` it has seen (the runner refreshes it before any analyzer runs)."""
    return watermark(con, "spend_hourly")


def changed_periods(con: duckdb.DuckDBPyConnection, since: datetime, period_s: int) -> list[int]:
    """Epoch seconds of the periods with events ingested or hours settled after ``since``."""
    rows = con.execute(
        f"""
        SELECT DISTINCT (floor(epoch(ts) / {period_s}) * {period_s})::BIGINT
        FROM usage_events WHERE ingested_at > $w
        UNION
        SELECT DISTINCT (floor(epoch(hour) / {period_s}) * {period_s})::BIGINT
        FROM deployment_hours WHERE settled_at > $w
        """,
        {"w": since},
    ).fetchall()
    return sorted(int(r[0]) for r in rows)


def rebuild_periods(
    con: duckdb.DuckDBPyConnection,
    table: str,
    select: str,
    periods: list[int] | None,
    period_s: int,
) -> None:
    """Recompute ``table``'s rows for ``periods`` (None: all of them) from ``select``.

    ``table``'s first column is the period start; ``select`` is an aggregate
    of ``spend_hourly`` with a ``{where}`` placeholder for its row filter
    (without ``WHERE``), producing ``table``'s columns in order.
    """
    if periods is None:
        con.execute(f"DELETE FROM {table}")
        con.execute(f"INSERT INTO {table} " + select.format(where="TRUE"))
        return
    if not periods:
        return
    first_col = con.execute(f"SELECT * FROM {table} LIMIT 0").description
    assert first_col is not None
    period_col = first_col[0][0]
    con.execute(
        f"DELETE FROM {table} WHERE list_contains($p, epoch({period_col})::BIGINT)",
        {"p": periods},
    )
    where = (
        "hour >= make_timestamptz($lo::BIGINT * 1000000) "
        "AND hour < make_timestamptz($hi::BIGINT * 1000000) "
        f"AND list_contains($p, (floor(epoch(hour) / {period_s}) * {period_s})::BIGINT)"
    )
    con.execute(
        f"INSERT INTO {table} " + select.format(where=where),
        {"p": periods, "lo": periods[0], "hi": periods[-1] + period_s},
    )


def refresh_rollup(
    con: duckdb.DuckDBPyConnection, table: str, select: str, period_s: int, since: datetime | None
) -> None:
    """Bring one rollup up to date: all of it without a watermark, else its changed periods."""
    if since is None:
        rebuild_periods(con, table, select, None, period_s)
    else:
        rebuild_periods(con, table, select, changed_periods(con, since, period_s), period_s)
