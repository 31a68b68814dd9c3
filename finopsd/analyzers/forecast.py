"""forecast: month-end spend per tenant (and in total), with a prediction interval; budget warnings.

For the UTC calendar month containing ``ctx.now``, per tenant and for the
total (tenant ``"*"``):

- **Fit.** Daily spend (``spend_hourly`` summed per UTC day, days without a
  row spent $0) of the *complete* days from the start of the previous month
  to yesterday is fitted by ordinary least squares on the day index:
  ``spend(d) = a + b·d``. A series starts at the first whole day at or after
  its first hour with spend since the start of the previous month (a store or
  tenant that began mid-way does not count the days before as $0). This reads
  up to two months of ``spend_hourly``, whatever the run's window. Fewer than
  ``min_fit_days`` complete days: no forecast (month-to-date still counts).
- **Point forecast** = month-to-date spend (through ``now``, today's partial
  hours included) + the fitted spend of the rest of today (the fitted day
  times the fraction of the day left: spend is taken as even within a day)
  + the fitted spend of every later day of the month, each clipped at $0.
- **Interval** (``interval`` level, 80 % by default): the OLS prediction
  interval of that weighted sum of future days, ``point ± t(level, n-2)·se``
  with ``se² = s²·(Σw² + vᵀ(XᵀX)⁻¹v)`` (``s`` the residual standard error,
  ``w`` the day weights, ``v = (Σw, Σw·x)``); the low end never goes below
  month-to-date.

Every forecast is kept in ``spend_forecast`` (one row per month and tenant,
replaced each run) for reports. Budgets (``budgets``: tenant → monthly USD,
``"*"`` for the total) make findings: kind ``forecast.budget``, one per
budgeted tenant whose month-to-date or forecast reaches the lowest of
``thresholds`` (fractions of the budget); the evidence says which threshold
was crossed, by the actual month-to-date spend or by the forecast, and the
day the cumulative spend (actual, then forecast) crosses the budget. The
"saving" is the forecast overrun beyond the budget (this month's, not a
rate: nothing is extrapolated beyond the month), with the forecast's interval
less the budget as its interval (``monthly_savings_low_usd``/``_high_usd``,
each at least 0); risk grows as the breach nears. ``evidence_hours`` is the
series' span from its first hour with spend (at most the start of the
previous month) to ``now``, ``evidence_requests`` its requests in it; a
budget is about dollars, so there is no request minimum
(``min_evidence_requests`` 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
from pydantic import Field, field_validator
from scipy import stats

from finopsd.analyzers.base import ActionSpec, Analyzer, Context, Finding, Options, Risk, register

TOTAL = "*"
"""The tenant name of the all-tenant total, in budgets, scopes and ``spend_forecast``."""
NO_TENANT = "(none)"
"""The tenant name of spend without a tenant tag."""
DAY_S = 86400


class ForecastOptions(Options):
    budgets: dict[str, float] = Field(
        default_factory=dict,
        description='monthly budget in USD per tenant; "*" is the total of all tenants',
    )
    thresholds: list[float] = Field(
        default_factory=lambda: [0.8, 0.9, 1.0],
        description="warn when month-to-date or forecast spend reaches these fractions of budget",
    )
    interval: float = Field(
        0.8, gt=0, lt=1, description="coverage of the forecast's prediction interval"
    )
    min_fit_days: int = Field(7, ge=3, description="complete days of history needed for a forecast")
    high_risk_days: int = Field(
        7, ge=0, description="risk is high when the budget is breached within this many days"
    )

    @field_validator("budgets")
    @classmethod
    def _positive_budgets(cls, v: dict[str, float]) -> dict[str, float]:
        for tenant, usd in v.items():
            if not usd > 0:
                raise ValueError(f"budget of {tenant!r} must be > 0")
        return v

    @field_validator("thresholds")
    @classmethod
    def _sorted_thresholds(cls, v: list[float]) -> list[float]:
        if not v or any(not t > 0 for t in v):
            raise ValueError("thresholds must be a non-empty list of fractions > 0")
        return sorted(set(v))


@dataclass(frozen=True)
class MonthForecast:
    """One series' month: actual so far, the forecast (None without enough history)."""

    tenant: str
    month_to_date_usd: float
    daily_actual: np.ndarray  # this month's days so far (today partial)
    forecast_usd: float | None = None
    low_usd: float | None = None
    high_usd: float | None = None
    se_usd: float = 0.0
    df: int = 0
    future_usd: np.ndarray | None = None  # fitted spend of today's rest and each later day
    fit_from: date | None = None
    fit_days: int = 0
    slope: float = 0.0
    intercept: float = 0.0
    residual_sd: float = 0.0


def _day(d: int) -> date:
    return date(1970, 1, 1) + timedelta(days=d)


def fit_month(
    tenant: str,
    daily: np.ndarray,
    first_day: int,
    *,
    prev_start: int,
    month_start: int,
    month_end: int,
    now_s: float,
    level: float,
    min_fit_days: int,
) -> MonthForecast:
    """Forecast one series. ``daily[i]`` is the spend of day ``prev_start + i`` up to today.

    Day numbers are days since 1970-01-01 (UTC); ``first_day`` is the series'
    first whole day; ``month_end`` is exclusive.
    """
    today = int(now_s // DAY_S)
    actual = daily[month_start - prev_start : today - prev_start + 1]
    mtd = float(actual.sum())
    start = max(prev_start, first_day)
    n = today - start
    if n < min_fit_days:
        return MonthForecast(tenant, mtd, actual)
    y = daily[start - prev_start : today - prev_start]
    x = np.arange(n, dtype=float)
    x_mean, y_mean = x.mean(), y.mean()
    sxx = float(((x - x_mean) ** 2).sum())
    slope = float(((x - x_mean) * (y - y_mean)).sum() / sxx)
    intercept = float(y_mean - slope * x_mean)
    resid = y - (intercept + slope * x)
    s2 = float((resid**2).sum() / (n - 2))
    # future days: the rest of today (weight: the fraction of it left), then whole days
    future_x = np.arange(today - start, month_end - start, dtype=float)
    w = np.ones_like(future_x)
    w[0] = ((today + 1) * DAY_S - now_s) / DAY_S
    fitted = intercept + slope * future_x
    future = w * np.maximum(fitted, 0.0)
    point = mtd + float(future.sum())
    # Var(sum w_j (y_j - yhat_j)) = s2 (sum w^2 + v' (X'X)^-1 v), v = (sum w, sum w x)
    xtx_inv = np.linalg.inv(np.array([[n, x.sum()], [x.sum(), (x * x).sum()]]))
    v = np.array([w.sum(), (w * future_x).sum()])
    se = math.sqrt(max(0.0, s2 * (float((w * w).sum()) + float(v @ xtx_inv @ v))))
    q = float(stats.t.ppf(0.5 + level / 2, n - 2))
    return MonthForecast(
        tenant,
        mtd,
        actual,
        forecast_usd=point,
        low_usd=max(mtd, point - q * se),
        high_usd=point + q * se,
        se_usd=se,
        df=n - 2,
        future_usd=future,
        fit_from=_day(start),
        fit_days=n,
        slope=slope,
        intercept=intercept,
        residual_sd=math.sqrt(s2),
    )


@register
class Forecast(Analyzer):
    name: ClassVar[str] = "forecast"
    description: ClassVar[str] = (
        "month-end spend forecast per tenant and in total (OLS, prediction interval); "
        "budget warnings"
    )
    Options: ClassVar[type[Options]] = ForecastOptions
    min_evidence_requests: ClassVar[int] = 0

    def run(self, ctx: Context) -> list[Finding]:
        opts = self.options
        assert isinstance(opts, ForecastOptions)
        now = ctx.now.astimezone(UTC)
        now_s = now.timestamp()
        m_start = datetime(now.year, now.month, 1, tzinfo=UTC)
        m_next = datetime(now.year + now.month // 12, now.month % 12 + 1, 1, tzinfo=UTC)
        p_start = datetime(now.year - (now.month == 1), (now.month - 2) % 12 + 1, 1, tzinfo=UTC)
        prev_start, month_start, month_end = (
            int(t.timestamp()) // DAY_S for t in (p_start, m_start, m_next)
        )
        today = int(now_s // DAY_S)
        rows = ctx.con.execute(
            """
            WITH agg AS (
                SELECT coalesce(tenant, $none) AS tenant, hour, sum(cost_usd) AS cost,
                       sum(requests) AS requests
                FROM spend_hourly
                WHERE hour >= $prev AND hour < $now
                GROUP BY ALL
            )
            SELECT tenant, epoch(hour)::BIGINT // 86400 - $d0 AS d, sum(cost) AS cost,
                   min(epoch(hour))::BIGINT AS first_s, sum(requests)::BIGINT AS requests
            FROM agg
            GROUP BY ALL
            """,
            {"none": NO_TENANT, "prev": p_start, "now": now, "d0": prev_start},
        ).fetchnumpy()
        if len(rows["d"]) == 0:
            return []
        tenants = [str(t) for t in rows["tenant"]]
        names = sorted(set(tenants))
        index = {t: i for i, t in enumerate(names)}
        idx = np.fromiter((index[t] for t in tenants), np.int64, len(tenants))
        days = np.asarray(rows["d"], dtype=np.int64)
        daily = np.zeros((len(names) + 1, today - prev_start + 1))
        np.add.at(daily, (idx, days), np.asarray(rows["cost"], dtype=float))
        daily[-1] = daily[:-1].sum(axis=0)
        first_s = np.full(len(names) + 1, np.inf)
        np.minimum.at(first_s, idx, np.asarray(rows["first_s"], dtype=float))
        first_s[-1] = first_s[:-1].min()
        requests = np.zeros(len(names) + 1, dtype=np.int64)
        np.add.at(requests, idx, np.asarray(rows["requests"], dtype=np.int64))
        requests[-1] = requests[:-1].sum()
        forecasts = [
            fit_month(
                tenant,
                daily[i],
                math.ceil(first_s[i] / DAY_S),
                prev_start=prev_start,
                month_start=month_start,
                month_end=month_end,
                now_s=now_s,
                level=opts.interval,
                min_fit_days=opts.min_fit_days,
            )
            for i, tenant in enumerate([*names, TOTAL])
        ]
        month = m_start.date()
        ctx.write(lambda con: _keep(con, month, now, opts.interval, forecasts, opts.budgets))
        findings = []
        for i, f in enumerate(forecasts):
            budget = opts.budgets.get(f.tenant)
            if budget is not None:
                finding = self._budget_finding(f, budget, month, month_start, today, now_s, m_next)
                if finding is not None:
                    finding.evidence_hours = max(0.0, (now_s - float(first_s[i])) / 3600)
                    finding.evidence_requests = int(requests[i])
                    findings.append(finding)
        return findings

    def _budget_finding(
        self,
        f: MonthForecast,
        budget: float,
        month: date,
        month_start: int,
        today: int,
        now_s: float,
        m_next: datetime,
    ) -> Finding | None:
        opts = self.options
        assert isinstance(opts, ForecastOptions)
        mtd = f.month_to_date_usd
        expected = f.forecast_usd if f.forecast_usd is not None else mtd
        by_actual = max((t for t in opts.thresholds if mtd >= t * budget), default=None)
        by_forecast = max((t for t in opts.thresholds if expected >= t * budget), default=None)
        if by_forecast is None:
            return None
        crossed_by = "actual" if by_actual == by_forecast else "forecast"
        breach, breach_by = breach_day(f, budget, month_start, today)
        if mtd >= budget:
            risk: Risk = "high"
        elif breach is not None:
            days_left = (breach - _day(today)).days
            risk = "high" if days_left <= opts.high_risk_days else "medium"
        else:
            risk = "low"
        if crossed_by == "actual":
            confidence = 1.0
        elif f.se_usd > 0:
            gap = (by_forecast * budget - expected) / f.se_usd
            confidence = min(0.99, float(stats.t.sf(gap, f.df)))
        else:
            confidence = 0.99
        remaining_days = (m_next.timestamp() - now_s) / DAY_S
        action = None
        if expected >= budget:
            action = ActionSpec(
                "gateway.rate_limit",
                {
                    "tenant": f.tenant,
                    "budget_usd": budget,
                    "max_usd_per_day": round(max(0.0, budget - mtd) / remaining_days, 2),
                    "alert": True,
                },
            )
        who = "all tenants" if f.tenant == TOTAL else f.tenant
        what = "month-to-date spend" if crossed_by == "actual" else "forecast month-end spend"
        amount = mtd if crossed_by == "actual" else expected
        evidence: dict[str, Any] = {
            "month": month.strftime("%Y-%m"),
            "month_to_date_usd": mtd,
            "forecast_usd": f.forecast_usd,
            "interval": None
            if f.forecast_usd is None
            else {"level": opts.interval, "low_usd": f.low_usd, "high_usd": f.high_usd},
            "budget_usd": budget,
            "month_to_date_percent": mtd / budget * 100,
            "forecast_percent": None if f.forecast_usd is None else f.forecast_usd / budget * 100,
            "threshold_percent": by_forecast * 100,
            "crossed_by": crossed_by,
            "threshold_percent_by_actual": None if by_actual is None else by_actual * 100,
            "breach_date": breach.isoformat() if breach else None,
            "breach_by": breach_by,
            "fit": None
            if f.forecast_usd is None
            else {
                "method": "ols_daily",
                "from": f.fit_from.isoformat() if f.fit_from else None,
                "days": f.fit_days,
                "intercept_usd_per_day": f.intercept,
                "slope_usd_per_day_per_day": f.slope,
                "residual_sd_usd": f.residual_sd,
            },
        }
        return Finding(
            kind="forecast.budget",
            scope={"tenant": f.tenant},
            title=(
                f"{who}: {what} ${amount:,.2f} is {amount / budget:.0%} of the "
                f"${budget:,.2f} budget for {month:%Y-%m}"
                + (f"; breach on {breach.isoformat()}" if breach else "")
            ),
            evidence=evidence,
            monthly_savings_usd=max(0.0, expected - budget),
            monthly_savings_low_usd=max(
                0.0, (f.low_usd if f.low_usd is not None else mtd) - budget
            ),
            monthly_savings_high_usd=max(
                0.0, (f.high_usd if f.high_usd is not None else mtd) - budget
            ),
            savings_method=(
                "this month's forecast overrun beyond budget; interval: the forecast's "
                "prediction interval less the budget"
            ),
            confidence=round(confidence, 3),
            risk=risk,
            action=action,
        )


def breach_day(
    f: MonthForecast, budget: float, month_start: int, today: int
) -> tuple[date | None, str | None]:
    """The day the month's cumulative spend reaches ``budget``, and whether by actual or forecast.

    Actual daily spend first (through today so far), then today's rest and
    each later day at the forecast; ``(None, None)`` if the month ends before.
    """
    if f.month_to_date_usd >= budget:
        actual = np.cumsum(f.daily_actual)
        hit = np.flatnonzero(actual >= budget)
        day = int(hit[0]) if len(hit) else len(actual) - 1  # (rounding: the last day)
        return _day(month_start + day), "actual"
    if f.future_usd is None:
        return None, None
    cum = f.month_to_date_usd + np.cumsum(f.future_usd)
    hit = np.flatnonzero(cum >= budget)
    if len(hit):
        return _day(today + int(hit[0])), "forecast"
    return None, None


def _keep(
    con: Any,
    month: date,
    now: datetime,
    level: float,
    forecasts: list[MonthForecast],
    budgets: dict[str, float],
) -> None:
    """Replace this month's rows of ``spend_forecast`` with ``forecasts``."""
    con.execute("DELETE FROM spend_forecast WHERE month = ?", [month])
    kept = [f for f in forecasts if f.forecast_usd is not None]
    if not kept:
        return
    table = pa.table(
        {
            "month": pa.array([month] * len(kept), pa.date32()),
            "tenant": [f.tenant for f in kept],
            "computed_at": pa.array([now] * len(kept), pa.timestamp("us", tz="UTC")),
            "month_to_date_usd": [f.month_to_date_usd for f in kept],
            "forecast_usd": [f.forecast_usd for f in kept],
            "low_usd": [f.low_usd for f in kept],
            "high_usd": [f.high_usd for f in kept],
            "level": [level] * len(kept),
            "fit_days": pa.array([f.fit_days for f in kept], pa.int32()),
            "slope_usd_per_day": [f.slope for f in kept],
            "budget_usd": pa.array([budgets.get(f.tenant) for f in kept], pa.float64()),
        }
    )
    con.register("forecast_rows", table)
    try:
        con.execute("INSERT INTO spend_forecast BY NAME SELECT * FROM forecast_rows")
    finally:
        con.unregister("forecast_rows")
