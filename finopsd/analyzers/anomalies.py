"""anomalies: hourly spend spikes per tenant and model, against a robust seasonal baseline.

For every (tenant, model) series of ``spend_hourly`` in the window, and every
hour of it (the current, partial hour included: spend only grows within an
hour, and only spikes are flagged):

- the **expected** spend is the median of the same hour-of-week in the
  previous weeks of the window (``h - 7 d``, ``h - 14 d``, ...), when at least
  ``min_weeks`` such hours lie inside the series' history; otherwise (less
  than two weeks of history, by default) the median of the same hour-of-day
  on the previous days (``h - 1 d``, ``h - 2 d``, ...), when at least
  ``min_days`` exist; otherwise the hour is not evaluated;
- the **spread** is the MAD of those same hours around their median, scaled
  by 1.4826 (``sigma``: the standard deviation of normal noise);
- the hour is **anomalous** when ``actual > expected + sigmas * sigma`` AND
  ``actual - expected > min_excess_usd``.

A series' history starts at its first hour in the window with a row; hours
after that without a row spent $0. One finding per (tenant, model) with at
least one anomalous hour in the last ``recent_hours``; its evidence lists the
latest ``max_listed`` anomalous hours.

A spike is not a recurring saving: ``monthly_savings_usd`` (and its interval)
is 0. What the spikes cost is the **excess** (actual - expected) of the
anomalous hours, in the evidence as ``window_excess_usd`` (every anomalous
hour in the window) and ``recent_excess_usd`` (those of the last
``recent_hours``); ``monthly_usd_if_it_persists`` is that window excess as a
rate over the evaluated hours times a month, labelled as what the spikes
would cost if they kept recurring at the frequency observed, never counted as
a saving. ``evidence_hours`` is the series' history in the window (its first
hour to now), ``evidence_requests`` its requests; the baseline's own minimums
(``min_weeks``, ``min_days``) judge whether an hour can be evaluated at all, so
there is no request minimum (``min_evidence_requests`` 0). The suggested action is a
gateway rate limit / budget alert at the hourly spend above which those hours
were anomalous.

Reads ``spend_hourly`` only (one aggregate query); the statistics are numpy.
It keeps no table of its own: a run costs the same after one more hour.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar

import numpy as np
from pydantic import Field

from finopsd.analyzers.base import (
    HOURS_PER_MONTH,
    ActionSpec,
    Analyzer,
    Context,
    Finding,
    Options,
    register,
)

MAD_SCALE = 1.4826
"""MAD times this estimates the standard deviation of normally distributed noise."""
HOURS_PER_WEEK = 168
NO_TENANT = "(none)"
"""The scope's tenant for spend without a tenant tag."""


class AnomaliesOptions(Options):
    sigmas: float = Field(
        4.0, gt=0, description="an hour is a spike above expected + sigmas x 1.4826 x MAD"
    )
    min_excess_usd: float = Field(
        5.0, ge=0, description="and only when its spend exceeds the expected by more than this"
    )
    recent_hours: int = Field(
        24, ge=1, description="a finding needs an anomalous hour within the last this many hours"
    )
    max_listed: int = Field(10, ge=1, description="the latest this many anomalous hours are listed")
    min_weeks: int = Field(
        2, ge=1, description="same hour-of-week baseline needs this many previous weeks of history"
    )
    min_days: int = Field(
        7, ge=1, description="else same hour-of-day baseline needs this many previous days"
    )


@dataclass(frozen=True)
class _Baseline:
    """Expected spend and spread of every hour of every series (NaN: not evaluated)."""

    expected: np.ndarray  # S x H
    mad: np.ndarray  # S x H
    points: np.ndarray  # S x H, how many baseline hours
    weekly: np.ndarray  # S x H, bool: hour-of-week baseline (else hour-of-day)


def _nanmedian(stack: np.ndarray, count: np.ndarray) -> np.ndarray:
    """Median over the last axis ignoring NaN, given the count of non-NaN values (NaN if none).

    A sort (NaN sorts last) and two gathers: far faster than ``np.nanmedian`` here.
    """
    ordered = np.sort(stack, axis=-1)
    lo = (np.maximum(count, 1) - 1) // 2
    hi = np.maximum(count, 1) // 2
    lo_v = np.take_along_axis(ordered, lo[..., None], axis=-1)[..., 0]
    hi_v = np.take_along_axis(ordered, hi[..., None], axis=-1)[..., 0]
    return np.where(count > 0, (lo_v + hi_v) / 2, np.nan)


def _lagged_median_mad(x: np.ndarray, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Median, MAD and count of ``x[:, h - k*step]`` for k >= 1 (NaN where none)."""
    s, h = x.shape
    lags = (h - 1) // step
    if lags < 1:
        nan = np.full((s, h), np.nan)
        return nan, nan.copy(), np.zeros((s, h), dtype=np.int64)
    stack = np.full((s, h, lags), np.nan)
    for k in range(1, lags + 1):
        stack[:, k * step :, k - 1] = x[:, : h - k * step]
    count = np.sum(~np.isnan(stack), axis=-1)
    median = _nanmedian(stack, count)
    mad = _nanmedian(np.abs(stack - median[..., None]), count)
    return median, mad, count


def baseline(x: np.ndarray, min_weeks: int, min_days: int) -> _Baseline:
    """The seasonal baseline of each hour of each row of ``x`` (S x H, NaN before history)."""
    w_med, w_mad, w_n = _lagged_median_mad(x, HOURS_PER_WEEK)
    # hour-of-day medians only where some series lacks the weeks (lags only look back,
    # so the leading columns alone give the same numbers)
    short = np.flatnonzero((w_n < min_weeks).any(axis=0))
    upto = int(short[-1]) + 1 if len(short) else 0
    d_med = np.full(x.shape, np.nan)
    d_mad = np.full(x.shape, np.nan)
    d_n = np.zeros(x.shape, dtype=np.int64)
    if upto:
        d_med[:, :upto], d_mad[:, :upto], d_n[:, :upto] = _lagged_median_mad(x[:, :upto], 24)
    weekly = w_n >= min_weeks
    daily = ~weekly & (d_n >= min_days)
    expected = np.where(weekly, w_med, np.where(daily, d_med, np.nan))
    mad = np.where(weekly, w_mad, np.where(daily, d_mad, np.nan))
    points = np.where(weekly, w_n, np.where(daily, d_n, 0))
    return _Baseline(expected, mad, points, weekly)


@register
class Anomalies(Analyzer):
    name: ClassVar[str] = "anomalies"
    description: ClassVar[str] = (
        "hourly spend spikes per tenant and model against a same-hour-of-week median/MAD baseline"
    )
    Options: ClassVar[type[Options]] = AnomaliesOptions
    min_evidence_requests: ClassVar[int] = 0

    def run(self, ctx: Context) -> list[Finding]:
        opts = self.options
        assert isinstance(opts, AnomaliesOptions)
        start_s = ctx.window.start.timestamp()
        now_s = ctx.now.timestamp()
        h0 = math.ceil(start_s / 3600)  # the first whole hour of the window
        n_hours = math.ceil(now_s / 3600) - h0  # through the current (partial) hour
        if n_hours <= 0:
            return []
        rows = ctx.con.execute(
            """
            WITH agg AS (
                SELECT coalesce(tenant, $none) AS tenant, model, hour, sum(cost_usd) AS cost,
                       sum(requests) AS requests
                FROM spend_hourly
                WHERE hour >= $start AND hour < $now
                GROUP BY ALL
            )
            SELECT dense_rank() OVER (ORDER BY tenant, model) - 1 AS s, tenant, model,
                   epoch(hour)::BIGINT // 3600 - $h0 AS h, cost, requests
            FROM agg
            """,
            {"none": NO_TENANT, "h0": h0, "start": ctx.window.start, "now": ctx.now},
        ).fetchnumpy()
        if len(rows["h"]) == 0:
            return []
        idx = np.asarray(rows["s"], dtype=np.int64)
        hours = np.asarray(rows["h"], dtype=np.int64)
        _, at = np.unique(idx, return_index=True)
        series = {(str(rows["tenant"][i]), str(rows["model"][i])): int(idx[i]) for i in at.tolist()}
        x = np.zeros((len(series), n_hours))
        x[idx, hours] = np.asarray(rows["cost"], dtype=float)
        first = np.full(len(series), n_hours, dtype=np.int64)
        np.minimum.at(first, idx, hours)
        requests = np.zeros(len(series), dtype=np.int64)
        np.add.at(requests, idx, np.asarray(rows["requests"], dtype=np.int64))
        span_hours = (n_hours - first).astype(float)  # each series' history, to now
        x[np.arange(n_hours)[None, :] < first[:, None]] = np.nan  # before the series began

        base = baseline(x, opts.min_weeks, opts.min_days)
        sigma = MAD_SCALE * base.mad
        evaluated = ~np.isnan(base.expected) & ~np.isnan(x)
        with np.errstate(invalid="ignore"):
            excess = x - base.expected
            anomalous = (
                evaluated
                & (x > base.expected + opts.sigmas * sigma)
                & (excess > opts.min_excess_usd)
            )
        recent_from = max(0, n_hours - math.ceil(opts.recent_hours))
        recent = anomalous[:, recent_from:].any(axis=1)

        findings = []
        for (tenant, model), s in series.items():
            if not recent[s]:
                continue
            f = self._finding(
                tenant, model, s, h0, recent_from, x, base, sigma, excess, anomalous, evaluated
            )
            f.evidence_hours, f.evidence_requests = float(span_hours[s]), int(requests[s])
            findings.append(f)
        return findings

    def _finding(
        self,
        tenant: str,
        model: str,
        s: int,
        h0: int,
        recent_from: int,
        x: np.ndarray,
        base: _Baseline,
        sigma: np.ndarray,
        excess: np.ndarray,
        anomalous: np.ndarray,
        evaluated: np.ndarray,
    ) -> Finding:
        opts = self.options
        assert isinstance(opts, AnomaliesOptions)
        hits = np.flatnonzero(anomalous[s])
        recent_hits = hits[hits >= recent_from]
        listed = hits[::-1][: opts.max_listed]

        def hour_evidence(h: int) -> dict[str, Any]:
            sd = float(sigma[s, h])
            return {
                "hour": datetime.fromtimestamp((h0 + h) * 3600, UTC).isoformat(),
                "actual_usd": float(x[s, h]),
                "expected_usd": float(base.expected[s, h]),
                "mad_usd": float(base.mad[s, h]),
                "sigma_usd": sd,
                "z": float(excess[s, h]) / sd if sd > 0 else None,
                "excess_usd": float(excess[s, h]),
                "baseline": "hour_of_week" if base.weekly[s, h] else "hour_of_day",
                "baseline_points": int(base.points[s, h]),
            }

        hours = [hour_evidence(int(h)) for h in listed]
        evaluated_hours = int(evaluated[s].sum())
        total_excess = float(excess[s, hits].sum())
        if_it_persists = total_excess / evaluated_hours * HOURS_PER_MONTH
        latest = hours[0]
        # confidence: how far past the threshold the strongest recent spike is, and how much
        # history its baseline had (four weeks of history: full weight)
        zs = [
            float(excess[s, h]) / sigma[s, h] if sigma[s, h] > 0 else math.inf for h in recent_hits
        ]
        strength = min(1.0, max(zs) / (2 * opts.sigmas))
        strongest = int(recent_hits[int(np.argmax(zs))])
        history_days = base.points[s, strongest] * (7 if base.weekly[s, strongest] else 1)
        history = min(1.0, float(history_days) / 28.0)
        confidence = round(min(0.95, strength * (0.5 + 0.5 * history)), 3)
        cap = max(
            float(base.expected[s, h] + max(opts.sigmas * sigma[s, h], opts.min_excess_usd))
            for h in hits
        )
        recent_excess = float(excess[s, recent_hits].sum())
        return Finding(
            kind="anomalies.spend_spike",
            scope={"tenant": tenant, "model": model},
            title=(
                f"{tenant} / {model}: {len(recent_hits)} hourly spend spike(s) in the last "
                f"{opts.recent_hours} h, ${recent_excess:,.2f} above expected (latest "
                f"{latest['hour']}: ${latest['actual_usd']:,.2f} vs "
                f"${latest['expected_usd']:,.2f} expected)"
            ),
            evidence={
                "anomalous_hours": hours,
                "recent_hours": opts.recent_hours,
                "recent_anomalous_hours": len(recent_hits),
                "recent_excess_usd": recent_excess,
                "window_anomalous_hours": len(hits),
                "window_excess_usd": total_excess,
                "evaluated_hours": evaluated_hours,
                "monthly_usd_if_it_persists": if_it_persists,
                "sigmas": opts.sigmas,
                "min_excess_usd": opts.min_excess_usd,
            },
            monthly_savings_usd=0.0,
            savings_method=(
                "none: a spike is not a recurring saving. Its cost is the excess over the "
                "seasonal median of the anomalous hours (window_excess_usd, "
                "recent_excess_usd); monthly_usd_if_it_persists is the window excess per "
                "evaluated hour times a month, if the spikes kept recurring as observed"
            ),
            confidence=confidence,
            risk="low",
            action=ActionSpec(
                "gateway.rate_limit",
                {
                    "tenant": tenant,
                    "model": model,
                    "max_usd_per_hour": round(cap, 2),
                    "alert": True,
                },
            ),
        )
