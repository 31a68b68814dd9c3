"""batch: latency-tolerant traffic billed at synchronous prices that a batch API would discount.

Two kinds of finding, read from ``batch_hourly``: standard-billed
``spend_hourly`` per hour (batch-labelled traffic per tenant × app × feature ×
provider × model, interactive traffic per tenant × app), kept incrementally
with a watermark in ``rollup_state`` (name ``batch``): a run recomputes only
the hours with events ingested or self-hosted hours settled since the last.

- ``batch.latency_tolerant`` — traffic its producer labelled
  ``latency_class = 'batch'`` but sent to the synchronous API
  (``billing_mode = 'standard'``), per tenant × app × feature × provider ×
  model, on a model whose current price (the one in effect at the run's
  ``now``) has a ``batch_discount``. The saving is that traffic's cost times
  the discount, per hour, projected to a month over the span from the scope's
  first to its last hour of such traffic (``base.project``): what the same
  requests would have cost through the provider's batch API. Self-hosted or
  unpriced models have no discount and give no finding.
- ``batch.offhours_burst`` — a recurring off-hours burst of
  ``interactive``-labelled, standard-billed traffic: per tenant × app, an
  hour of day in ``hours`` (UTC) whose spend exceeds ``burst_ratio`` × the
  app's daytime median hourly spend on at least ``min_day_share`` of the days
  the app had traffic (at least ``min_days`` such days). The daytime median
  is over every hour of day outside ``hours`` of those days, hours without
  traffic counting as $0. Such a burst is likely a scheduled job that does not
  need an answer within seconds. The saving is the bursts' excess over the
  daytime median (the scheduled part; the median is taken to be genuine
  interactive use), summed over the burst days, times the batch discount
  weighted by the models that hour's traffic used, per day, projected to a
  month over the days from the app's first to its last day with traffic. The
  label says interactive, so confidence is lower and the risk medium. (Which
  models a burst hour used is read from ``spend_hourly``, only for the tenants
  and apps with a recurring burst.)
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from datetime import UTC
from typing import Any, ClassVar

import duckdb
import numpy as np
from pydantic import Field, field_validator

from finopsd.analyzers._rollups import (
    HOUR,
    NO_TAG,
    newest_change,
    price_now,
    refresh_rollup,
    tag,
    watermark,
)
from finopsd.analyzers.base import (
    ActionSpec,
    Analyzer,
    Context,
    Finding,
    Options,
    register,
)

NAME = "batch"

_HOURLY = """
    SELECT hour, tenant, app,
           CASE WHEN latency_class = 'interactive' THEN NULL ELSE feature END,
           CASE WHEN latency_class = 'interactive' THEN NULL ELSE provider END,
           CASE WHEN latency_class = 'interactive' THEN NULL ELSE model END,
           CASE WHEN latency_class = 'interactive' THEN NULL ELSE deployment END,
           latency_class, sum(requests), sum(cost_usd), sum(unpriced_requests)
    FROM spend_hourly
    WHERE billing_mode = 'standard' AND {where}
    GROUP BY ALL
"""
"""``batch_hourly``: standard-billed spend per hour; interactive traffic per tenant x app only."""


def refresh(con: duckdb.DuckDBPyConnection) -> None:
    """Bring ``batch_hourly`` up to date with ``spend_hourly``; runs in the caller's transaction."""
    since = watermark(con, NAME)
    newest = newest_change(con)
    if newest is None or (since is not None and newest <= since):
        return
    refresh_rollup(con, "batch_hourly", _HOURLY, HOUR, since)
    con.execute("INSERT OR REPLACE INTO rollup_state VALUES (?, ?)", [NAME, newest])


class BatchOptions(Options):
    min_monthly_savings_usd: float = Field(
        1.0, ge=0, description="no finding whose projected monthly saving is below this"
    )
    hours: list[int] = Field(
        default_factory=lambda: list(range(7)),
        description="off-hours: the UTC hours of day (0-23) where a recurring burst is looked for",
    )
    burst_ratio: float = Field(
        3.0, gt=0, description="an off-hours hour is a burst above this times the daytime median"
    )
    min_day_share: float = Field(
        0.6,
        gt=0,
        le=1,
        description="recurring: a burst at that hour on at least this share of the days",
    )
    min_days: int = Field(
        5, ge=1, description="recurring needs at least this many days with traffic in the window"
    )
    offhours: bool = Field(True, description="look for recurring off-hours bursts at all")

    @field_validator("hours")
    @classmethod
    def _hours_of_day(cls, value: list[int]) -> list[int]:
        bad = [h for h in value if not 0 <= h <= 23]
        if bad:
            raise ValueError(f"hours of day are 0..23, got {bad}")
        if len(set(value)) >= 24:
            raise ValueError("every hour is off-hours: no daytime left to compare with")
        return sorted(set(value))


@register
class Batch(Analyzer):
    name: ClassVar[str] = NAME
    description: ClassVar[str] = (
        "batch-labelled traffic billed at synchronous prices, and recurring off-hours bursts"
    )
    Options: ClassVar[type[Options]] = BatchOptions

    def run(self, ctx: Context) -> list[Finding]:
        opts = self.options
        assert isinstance(opts, BatchOptions)
        ctx.write(refresh)
        findings = self._latency_tolerant(ctx, opts)
        if opts.offhours and opts.hours:
            findings += self._offhours(ctx, opts)
        return findings

    # -- batch-labelled, standard-billed ---------------------------------------------------

    def _latency_tolerant(self, ctx: Context, opts: BatchOptions) -> list[Finding]:
        rows = ctx.con.execute(
            """
            SELECT tenant, app, feature, provider, model, deployment,
                   epoch(hour)::BIGINT // 3600 AS h,
                   sum(requests)::BIGINT, sum(cost_usd), sum(unpriced_requests)::BIGINT
            FROM batch_hourly
            WHERE hour >= $start AND hour < $end AND latency_class = 'batch'
            GROUP BY ALL
            """,
            {"start": ctx.window.start, "end": ctx.window.end},
        ).to_arrow_table()
        columns = [rows.column(i).to_pylist() for i in range(rows.num_columns)]
        today = ctx.now.astimezone(UTC).date()
        prices: dict[tuple[str | None, str, str | None], Any] = {}  # one lookup per model
        merged: dict[tuple[str, ...], dict[str, Any]] = {}
        for tenant, app, feature, provider, model, deployment, h, requests, cost, unpriced in zip(
            *columns, strict=True
        ):
            model_key = (provider, model, deployment)
            price = prices.get(model_key, prices)  # (prices itself: not looked up yet)
            if price is prices:
                price = prices[model_key] = price_now(
                    ctx.prices, provider, model, deployment, today
                )
            if price is None or price.batch_discount <= 0:
                continue
            key = (tag(tenant), tag(app), tag(feature), tag(provider), model)
            acc = merged.get(key)
            if acc is None:
                acc = merged[key] = {
                    "requests": 0,
                    "cost": 0.0,
                    "unpriced": 0,
                    "price": price,
                    "hours": [],
                }
            cost = float(cost)
            acc["requests"] += requests
            acc["cost"] += cost
            acc["unpriced"] += unpriced
            acc["hours"].append((h, cost))
        findings = []
        for (tenant, app, feature, provider, model), acc in sorted(merged.items()):
            price = acc["price"]
            saved = acc["cost"] * price.batch_discount
            projection = ctx.project(
                [c * price.batch_discount for c in ctx.hours(acc["hours"])], 1.0
            )
            monthly_usd = projection.monthly_usd
            if monthly_usd <= 0 or monthly_usd < opts.min_monthly_savings_usd:
                continue
            scope = {
                "tenant": tenant,
                "app": app,
                "feature": feature,
                "provider": provider,
                "model": model,
            }
            findings.append(
                self.finding(
                    ctx,
                    kind="batch.latency_tolerant",
                    scope=scope,
                    title=(
                        f"{tenant} / {app} / {feature}: batch-labelled {model} traffic billed "
                        f"at synchronous prices; the batch API would save "
                        f"{price.batch_discount:.0%} (${monthly_usd:,.2f}/month)"
                    ),
                    evidence={
                        "requests": acc["requests"],
                        "cost_usd": acc["cost"],
                        "unpriced_requests": acc["unpriced"],
                        "batch_discount": price.batch_discount,
                        "price_id": price.price_id,
                        "window_savings_usd": saved,
                    },
                    projection=projection,
                    requests=acc["requests"],
                    savings_method=(
                        "cost of batch-labelled, standard-billed traffic times the model's "
                        "current batch discount, per hour, projected to a month over the hours "
                        "from its first to its last such request"
                    ),
                    confidence=0.9,
                    risk="low",
                    action=ActionSpec(
                        "provider.batch",
                        {
                            "match": scope,
                            "provider": provider,
                            "model": model,
                            "batch_discount": price.batch_discount,
                        },
                    ),
                )
            )
        return findings

    # -- recurring off-hours bursts of interactive traffic ---------------------------------

    def _offhours(self, ctx: Context, opts: BatchOptions) -> list[Finding]:
        params = {"start": ctx.window.start, "end": ctx.window.end, "none": NO_TAG}
        data = ctx.con.execute(
            """
            SELECT coalesce(tenant, $none) AS tenant, coalesce(app, $none) AS app,
                   epoch(hour)::BIGINT // 3600 AS h, sum(cost_usd) AS cost,
                   sum(requests)::BIGINT AS requests
            FROM batch_hourly
            WHERE hour >= $start AND hour < $end AND latency_class = 'interactive'
            GROUP BY ALL
            ORDER BY tenant, app, h
            """,
            params,
        ).fetchnumpy()
        if len(data["h"]) == 0:
            return []
        first_h = math.ceil(ctx.window.start.timestamp() / 3600)  # first whole hour in window
        end_h = math.ceil(ctx.window.end.timestamp() / 3600)  # hours < this are in the window
        day0 = first_h // 24
        n_days = (end_h - 1) // 24 - day0 + 1
        slot = np.arange(n_days * 24) + day0 * 24  # absolute hour of each (day, hour) slot
        in_window = ((slot >= first_h) & (slot < end_h)).reshape(n_days, 24)
        off = np.zeros(24, dtype=bool)
        off[opts.hours] = True

        tenants = data["tenant"].astype(str)
        apps = data["app"].astype(str)
        hours = np.asarray(data["h"], dtype=np.int64)
        costs = np.asarray(data["cost"], dtype=float)
        requests = np.asarray(data["requests"], dtype=np.int64)
        keys = np.char.add(np.char.add(tenants, "\x00"), apps)
        _, starts = np.unique(keys, return_index=True)
        bounds = [*sorted(starts.tolist()), len(keys)]

        # (tenant, app, bursts, per burst (hour of day, excess per day over the days from the
        # app's first to its last day with traffic), the app's requests)
        candidates: list[
            tuple[str, str, list[dict[str, Any]], list[tuple[int, np.ndarray]], int]
        ] = []
        for lo, hi in itertools.pairwise(bounds):
            grid = np.zeros((n_days, 24))
            h = hours[lo:hi]
            np.add.at(grid, ((h // 24) - day0, h % 24), costs[lo:hi])
            active = grid.sum(axis=1) > 0  # days the app had traffic
            if int(active.sum()) < opts.min_days:
                continue
            usable = in_window & active[:, None]
            first_day = int(np.argmax(active))
            last_day = n_days - 1 - int(np.argmax(active[::-1]))
            daily = []
            daytime = grid[:, ~off][usable[:, ~off]]
            median = float(np.median(daytime)) if daytime.size else 0.0
            bursts = []
            for hod in opts.hours:
                days = usable[:, hod]
                n = int(days.sum())
                if n < opts.min_days:
                    continue
                values = grid[days, hod]
                hit = (values > opts.burst_ratio * median) & (values > 0)
                share = float(hit.sum()) / n
                if share < opts.min_day_share:
                    continue
                excess = np.zeros(n_days)
                excess[np.flatnonzero(days)[hit]] = values[hit] - median
                daily.append((hod, excess[first_day : last_day + 1]))
                bursts.append(
                    {
                        "hour_utc": hod,
                        "burst_days": int(hit.sum()),
                        "days": n,
                        "share": share,
                        "median_burst_usd": float(np.median(values[hit])),
                        "excess_usd": float((values[hit] - median).sum()),
                        "daytime_median_usd": median,
                    }
                )
            if bursts:
                n_requests = int(requests[lo:hi].sum())
                candidates.append((str(tenants[lo]), str(apps[lo]), bursts, daily, n_requests))
        if not candidates:
            return []
        discounts = self._hour_discounts(ctx, opts, {(c[0], c[1]) for c in candidates})
        findings = []
        for tenant, app, bursts, daily, requests in candidates:
            saved = 0.0
            per_day = np.zeros_like(daily[0][1])
            for b, (hod, excess) in zip(bursts, daily, strict=True):
                b["batch_discount"] = discounts.get((tenant, app, hod), 0.0)
                saved += b["excess_usd"] * b["batch_discount"]
                per_day += excess * b["batch_discount"]
            projection = ctx.project(per_day.tolist(), 24.0)
            monthly_usd = projection.monthly_usd
            if monthly_usd <= 0 or monthly_usd < opts.min_monthly_savings_usd:
                continue
            hours_utc = [b["hour_utc"] for b in bursts]
            mean_share = sum(b["share"] for b in bursts) / len(bursts)
            findings.append(
                self.finding(
                    ctx,
                    kind="batch.offhours_burst",
                    scope={"tenant": tenant, "app": app},
                    title=(
                        f"{tenant} / {app}: recurring off-hours burst of interactive traffic at "
                        f"{', '.join(f'{h:02d}:00' for h in hours_utc)} UTC; a batch API would "
                        f"save about ${monthly_usd:,.2f}/month"
                    ),
                    evidence={
                        "bursts": bursts,
                        "daytime_median_hourly_usd": bursts[0]["daytime_median_usd"],
                        "offhours_utc": opts.hours,
                        "burst_ratio": opts.burst_ratio,
                        "min_day_share": opts.min_day_share,
                        "window_savings_usd": saved,
                    },
                    projection=projection,
                    requests=requests,
                    savings_method=(
                        "excess of each recurring off-hours burst over the app's daytime median "
                        "hourly spend, times the spend-weighted batch discount of that hour's "
                        "models, per day, projected to a month over the days from the app's "
                        "first to its last day with traffic"
                    ),
                    confidence=round(0.3 + 0.3 * mean_share, 3),
                    risk="medium",
                    action=ActionSpec(
                        "provider.batch",
                        {
                            "match": {"tenant": tenant, "app": app, "latency_class": "interactive"},
                            "hours_utc": hours_utc,
                            "reason": "recurring off-hours burst",
                        },
                    ),
                )
            )
        return findings

    @staticmethod
    def _hour_discounts(
        ctx: Context, opts: BatchOptions, series: set[tuple[str, str]]
    ) -> dict[tuple[str, str, int], float]:
        """(tenant, app, hour of day) -> batch discount weighted by that hour's spend per model."""
        rows = ctx.con.execute(
            """
            SELECT coalesce(tenant, $none), coalesce(app, $none),
                   (epoch(hour)::BIGINT // 3600) % 24 AS hod, provider, model, deployment,
                   sum(cost_usd)
            FROM spend_hourly
            WHERE hour >= $start AND hour < $end
              AND latency_class = 'interactive' AND billing_mode = 'standard'
              AND list_contains($hours, (epoch(hour)::BIGINT // 3600) % 24)
            GROUP BY ALL
            """,
            {
                "start": ctx.window.start,
                "end": ctx.window.end,
                "none": NO_TAG,
                "hours": opts.hours,
            },
        ).fetchall()
        today = ctx.now.astimezone(UTC).date()
        acc: dict[tuple[str, str, int], list[float]] = defaultdict(lambda: [0.0, 0.0])
        for tenant, app, hod, provider, model, deployment, cost in rows:
            if (tenant, app) not in series or not cost:
                continue
            price = price_now(ctx.prices, provider, model, deployment, today)
            pair = acc[(tenant, app, int(hod))]
            pair[0] += float(cost) * (price.batch_discount if price else 0.0)
            pair[1] += float(cost)
        return {k: (v[0] / v[1] if v[1] > 0 else 0.0) for k, v in acc.items()}


__all__ = ["Batch", "BatchOptions", "refresh"]
