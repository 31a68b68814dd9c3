"""waste: money spent on failed requests, bloated contexts, and big models doing small tasks.

Three findings:

- ``waste.errors`` per (tenant, app, feature, model): what the window's failed
  requests (``status = 'error'``) cost, from ``spend_hourly``. Retries are
  requests re-sent with the same ``prompt_hash`` (same tenant and app) within
  ``retry_interval_s`` after an error; the error is then a *retried* error.
  A failed retry is an error and counted as one; a successful retry re-buys
  what the failed attempt should have delivered, so its own cost is not
  counted again. Saving = the retried errors' cost in full (measured: their
  retries bought what they should have) + the other errors' cost x
  ``recoverable_share`` (an assumption: not every error can be avoided, and
  an error nobody retried bought nothing a success would not have cost), per
  hour, projected to a month over the span from the scope's first hour of
  traffic to the last hour observed. No action: the fix (backoff, request
  validation, fewer timeouts) lives in the caller.
- ``waste.context_bloat`` per (app, feature): input tokens per request at
  least ``growth_factor`` x the feature's own mean before it rose, or (mean
  over the last ``recent_days`` days) at least ``peer_factor`` x the median
  of the same app's other features (RAG over-retrieval, an unbounded chat
  history). The rise is the split of the feature's hours in the window that
  explains most of the variance between the means before and after it
  (at least ``min_requests`` on each side); when the mean after it is at
  least ``growth_factor`` x the mean before, the period judged starts there
  (a change 5 days ago is judged on those 5 days, not diluted by a fixed
  window), else it is the last ``recent_days``. Baseline: the larger of the
  baselines that fired (the conservative one). Saving = (input tokens -
  baseline x requests) of each hour of that period x the feature's input
  price per token (list input price of each model it used over the last
  ``recent_days``, batch discount applied; self-hosted: the settled cost per
  token), projected to a month over the hours from the period's start to the
  last hour observed. Action ``gateway.max_tokens`` with a cap at the
  threshold that fired and a RAG top-k scale hint.
- ``waste.finetune`` per (app, feature, model): a high-volume
  (>= ``finetune_min_requests_per_month``), short-answer
  (mean output <= ``finetune_max_output_tokens``) feature on an API model
  whose input list price is >= ``finetune_min_input_per_mtok``. Saving = its
  cost - the same tokens at the small fine-tuned model's prices, per hour,
  projected to a month over the span of its traffic (requests a month too);
  payback = (``finetune_one_off_usd`` + ``eval_one_off_usd``) / saving; a
  finding only when payback <= ``max_payback_months``. Action ``finetune``.

Reads ``spend_hourly``, and ``waste_retries`` / ``waste_retried_errors``: its
own tables of retries and of the errors they retried, kept incrementally with a
watermark on ``usage_events.ingested_at`` in ``rollup_state`` under the name
``waste``. A run looks only at events ingested after the watermark (and, when
errors arrived late, at the stored events up to ``MAX_RETRY_INTERVAL_S`` after
them). Each retry is stored with the gap to the latest error before it, each
retried error with the gap to its first retry, so ``retry_interval_s`` (up to
that maximum) applies when reading, and changing it needs no rebuild. A
retry's or retried error's cost is the one it had when detected: a
self-hosted one not yet settled counts $0 there.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

import duckdb
import numpy as np
from pydantic import Field

from finopsd.analyzers.base import (
    HOURS_PER_MONTH,
    ActionSpec,
    Analyzer,
    Context,
    Finding,
    Options,
    Projection,
    register,
)
from finopsd.pricing import PER_MILLION, SELF_HOSTED

NO_TAG = "(none)"
"""A scope's value for a tag the events do not carry."""

MAX_RETRY_INTERVAL_S = 600
"""Retries are detected up to this long after an error; ``retry_interval_s`` may not exceed it."""

_H_US = MAX_RETRY_INTERVAL_S * 1_000_000

_PAIRS = f"""
    err AS (
        -- each error under the hash of its prompt with its own and the next time bucket:
        -- one integer join key, and a much-repeated prompt pairs only with near errors
        SELECT hash(prompt_hash, epoch_us(ts) // {_H_US} + k) AS key,
               prompt_hash, tenant, app, ts AS ets, event_id AS eid,
               struct_pack(ts := ts, tenant := tenant, app := app, feature := feature,
                           model := request_model, cost_usd := cost_usd) AS e
        FROM usage_events, (VALUES (0), (1)) v(k)
        WHERE status = 'error' AND prompt_hash IS NOT NULL AND ts >= $elo AND ts <= $ehi
    ),
    waste_pairs AS (
    SELECT c.event_id,
           struct_pack(ts := c.ts, tenant := c.tenant, app := c.app, feature := c.feature,
                       model := c.request_model, status := c.status,
                       input_tokens := c.input_tokens, output_tokens := c.output_tokens,
                       cost_usd := c.cost_usd) AS r,
           e.eid, e.e,
           -- same prompt (not just the same hash), tenant and app: checked here, on the
           -- few pairs, since as filters the optimizer would hash them for every event
           CASE WHEN c.prompt_hash = e.prompt_hash
                 AND c.tenant IS NOT DISTINCT FROM e.tenant
                 AND c.app IS NOT DISTINCT FROM e.app
                THEN (epoch_us(c.ts) - epoch_us(e.ets)) / 1e6 END AS gap
    FROM usage_events c JOIN err e
      ON hash(c.prompt_hash, epoch_us(c.ts) // {_H_US}) = e.key
     AND e.ets < c.ts AND c.ts <= e.ets + INTERVAL {MAX_RETRY_INTERVAL_S} SECOND
    WHERE {{where}}
    )
"""
"""CTEs: ``waste_pairs`` is every (later request, earlier error) with the same prompt hash
at most ``MAX_RETRY_INTERVAL_S`` apart, among the requests ``where`` selects; ``gap`` is
NULL unless the prompt, tenant and app are the same. Each statement below aggregates it
as it streams (materialised once at 10 M events, it outgrew the store's memory limit)."""

_RETRIES = """
    INSERT INTO waste_retries (event_id, ts, tenant, app, feature, model, status,
                               input_tokens, output_tokens, cost_usd, gap_s)
    WITH {pairs}, best AS (
        SELECT event_id, any_value(r) AS r, min(gap) AS gap
        FROM waste_pairs GROUP BY event_id HAVING min(gap) IS NOT NULL
    )
    SELECT event_id, r.ts, r.tenant, r.app, r.feature, r.model, r.status, r.input_tokens,
           r.output_tokens, r.cost_usd, gap
    FROM best
    ON CONFLICT (event_id) DO UPDATE SET gap_s = least(gap_s, excluded.gap_s)
"""
"""Each retry, with the gap to the latest error before it."""

_RETRIED = """
    INSERT INTO waste_retried_errors (event_id, ts, tenant, app, feature, model, cost_usd,
                                      gap_s)
    WITH {pairs}, best AS (
        SELECT eid, any_value(e) AS e, min(gap) AS gap
        FROM waste_pairs GROUP BY eid HAVING min(gap) IS NOT NULL
    )
    SELECT eid, e.ts, e.tenant, e.app, e.feature, e.model, e.cost_usd, gap
    FROM best
    ON CONFLICT (event_id) DO UPDATE SET gap_s = least(gap_s, excluded.gap_s)
"""
"""Each retried error, with the gap to the first request re-sending its prompt."""


def refresh(con: duckdb.DuckDBPyConnection) -> int:
    """Bring ``waste_retries`` and ``waste_retried_errors`` up to date with
    ``usage_events``; returns the retries written.

    A retry is an event whose ``prompt_hash``, tenant and app equal those of an
    error at most ``MAX_RETRY_INTERVAL_S`` before it; that error is a retried
    error (stored with the gap to its first retry). Looks at the events
    ingested after the watermark, and at the stored events that follow errors
    ingested after it. Runs in the caller's transaction.
    """
    row = con.execute("SELECT watermark FROM rollup_state WHERE name = 'waste'").fetchone()
    watermark: datetime | None = row[0] if row else None
    top = con.execute("SELECT max(ingested_at) FROM usage_events").fetchone()
    newest: datetime | None = top[0] if top else None
    if newest is None or (watermark is not None and newest <= watermark):
        return 0
    horizon = timedelta(seconds=MAX_RETRY_INTERVAL_S)
    written = 0

    def detect(where: str, params: dict[str, Any], lo: datetime, hi: datetime) -> None:
        """Upsert the retries among the events ``where`` selects, whose ts lie in [lo, hi]."""
        nonlocal written
        pairs = _PAIRS.format(where=where)
        bound = {**params, "elo": lo - horizon, "ehi": hi}
        got = con.execute(_RETRIES.format(pairs=pairs), bound).fetchone()
        written += int(got[0]) if got else 0
        con.execute(_RETRIED.format(pairs=pairs), bound)

    if watermark is None:
        con.execute("DELETE FROM waste_retries")
        con.execute("DELETE FROM waste_retried_errors")
        bounds = con.execute("SELECT min(ts), max(ts) FROM usage_events").fetchone()
        if bounds and bounds[0] is not None:
            detect("TRUE", {}, bounds[0], bounds[1])
    else:
        params = {"w": watermark}
        bounds = con.execute(
            "SELECT min(ts), max(ts) FROM usage_events WHERE ingested_at > $w", params
        ).fetchone()
        if bounds and bounds[0] is not None:
            detect("c.ingested_at > $w", params, bounds[0], bounds[1])
        # errors that arrived late make retries of events stored before them
        late = con.execute(
            "SELECT min(ts), max(ts) FROM usage_events "
            "WHERE ingested_at > $w AND status = 'error' AND prompt_hash IS NOT NULL",
            params,
        ).fetchone()
        if late and late[0] is not None:
            lo, hi = late[0], late[1] + horizon
            detect(
                "c.ingested_at <= $w AND c.ts > $lo AND c.ts <= $hi AND c.prompt_hash IN ("
                "SELECT prompt_hash FROM usage_events WHERE ingested_at > $w "
                "AND status = 'error' AND prompt_hash IS NOT NULL)",
                {**params, "lo": lo, "hi": hi},
                lo,
                hi,
            )
    con.execute("INSERT OR REPLACE INTO rollup_state VALUES ('waste', ?)", [newest])
    return written


class WasteOptions(Options):
    retry_interval_s: float = Field(
        120.0,
        gt=0,
        le=MAX_RETRY_INTERVAL_S,
        description="a request re-sent within this many seconds after an error is a retry",
    )
    recoverable_share: float = Field(
        0.5, gt=0, le=1, description="share of the failed requests' cost that fixing saves"
    )
    min_error_rate: float = Field(
        0.01, ge=0, le=1, description="errors finding: at least this share of requests failed"
    )
    recent_days: int = Field(
        7,
        ge=1,
        description="context bloat: the recent days compared with the peers (and judged, "
        "unless the feature's own rise starts the period)",
    )
    peer_factor: float = Field(
        3.0, gt=1, description="bloat: mean input >= this x the median of the app's other features"
    )
    min_peers: int = Field(
        2, ge=1, description="the peer baseline needs at least this many other features"
    )
    growth_factor: float = Field(
        1.5, gt=1, description="bloat: mean input >= this x the feature's mean before its rise"
    )
    min_requests: int = Field(
        200,
        ge=1,
        description="bloat: a feature needs this many requests in each period compared "
        "(200 know a mean of tokens per request to about 7 %, 1.5x is far beyond that)",
    )
    finetune_min_requests_per_month: float = Field(
        100_000, ge=0, description="fine-tune: at least this many requests a month"
    )
    finetune_max_output_tokens: float = Field(
        50.0, gt=0, description="fine-tune: mean output tokens per request at most this"
    )
    finetune_min_input_per_mtok: float = Field(
        1.0, ge=0, description="fine-tune: on a model whose input list price is at least this"
    )
    small_model: str = Field(
        "openai/gpt-4o-mini", min_length=1, description="the model to fine-tune"
    )
    small_model_input_per_mtok: float = Field(
        0.30, ge=0, description="its fine-tuned input price, USD per 1M tokens"
    )
    small_model_output_per_mtok: float = Field(
        1.20, ge=0, description="its fine-tuned output price, USD per 1M tokens"
    )
    finetune_one_off_usd: float = Field(
        2000.0, ge=0, description="one-off cost of the fine-tune (data, training)"
    )
    eval_one_off_usd: float = Field(
        500.0, ge=0, description="one-off cost of evaluating it against the current model"
    )
    max_payback_months: float = Field(
        3.0, gt=0, description="fine-tune: a finding only when it pays back within this"
    )
    min_monthly_savings_usd: float = Field(
        10.0, ge=0, description="no finding saving less than this per month"
    )


def _tag(value: str | None) -> str:
    return NO_TAG if value is None else value


def recent_start(end: datetime, days: int) -> datetime:
    """Start of the last ``days`` UTC days up to ``end`` (a partial current day counts as one)."""
    end = end.astimezone(UTC)
    day = end.replace(hour=0, minute=0, second=0, microsecond=0)
    if day < end:
        day += timedelta(days=1)
    return day - timedelta(days=days)


@dataclass(frozen=True)
class _Row:
    """One group of ``spend_hourly`` in the window (see ``_SPEND``)."""

    tenant: str | None
    app: str | None
    feature: str | None
    provider: str | None
    model: str
    deployment: str | None
    billing_mode: str
    failed: bool
    recent: bool
    requests: int
    input_tokens: int
    output_tokens: int
    cost_usd: float
    first_h: int  # its first and last hour, epoch hours
    last_h: int


_SPEND = """
    SELECT tenant, app, feature, provider, model, deployment, billing_mode,
           status = 'error' AS failed, hour >= $since AS recent,
           sum(requests), sum(input_tokens), sum(output_tokens), sum(cost_usd),
           min(epoch(hour)::BIGINT // 3600), max(epoch(hour)::BIGINT // 3600)
    FROM spend_hourly
    WHERE hour >= $start AND hour < $end
    GROUP BY ALL
"""
"""The one read of ``spend_hourly`` every sub-analysis works from."""


def _sums(rows: Iterable[_Row]) -> tuple[int, int, int, float]:
    """Requests, input tokens, output tokens and cost of ``rows``."""
    n = i = o = 0
    c = 0.0
    for r in rows:
        n += r.requests
        i += r.input_tokens
        o += r.output_tokens
        c += r.cost_usd
    return n, i, o, c


def _span(rows: Iterable[_Row]) -> list[tuple[int, float]]:
    """The first and last hour of ``rows`` as (hour, 0) pairs: ``dense_hours`` spans them."""
    rows = list(rows)
    return [(min(r.first_h for r in rows), 0.0), (max(r.last_h for r in rows), 0.0)]


def _hourly(
    ctx: Context, where: str, params: dict[str, Any], value: str
) -> list[tuple[int, float]]:
    """(epoch hour, ``value``) of ``spend_hourly`` rows matching ``where`` in the window."""
    return [
        (int(h), float(v or 0.0))
        for h, v in ctx.con.execute(
            f"SELECT epoch(hour)::BIGINT // 3600, {value} FROM spend_hourly "
            f"WHERE hour >= $start AND hour < $end AND {where} GROUP BY ALL",
            {"start": ctx.window.start, "end": ctx.window.end, **params},
        ).fetchall()
    ]


_NO_SERIES = (np.empty(0, np.int64), np.empty(0), np.empty(0))


def _feature_hours(ctx: Context) -> dict[tuple[str, str], tuple[np.ndarray, ...]]:
    """Per (app, feature): its epoch hours in the window with requests (ascending), and
    the requests and input tokens of each."""
    got = ctx.con.execute(
        """
        SELECT app, feature, epoch(hour)::BIGINT // 3600 AS h, sum(requests)::DOUBLE AS n,
               sum(input_tokens)::DOUBLE AS tokens
        FROM spend_hourly
        WHERE hour >= $start AND hour < $end AND app IS NOT NULL AND feature IS NOT NULL
        GROUP BY ALL
        ORDER BY app, feature, h
        """,
        {"start": ctx.window.start, "end": ctx.window.end},
    ).fetchnumpy()
    apps, features = got["app"], got["feature"]
    hours = np.asarray(got["h"], np.int64)
    n, tokens = np.asarray(got["n"], float), np.asarray(got["tokens"], float)
    out: dict[tuple[str, str], tuple[np.ndarray, ...]] = {}
    if len(hours) == 0:
        return out
    new = np.ones(len(hours), bool)
    new[1:] = (apps[1:] != apps[:-1]) | (features[1:] != features[:-1])
    bounds = [*np.flatnonzero(new).tolist(), len(hours)]
    for lo, hi in itertools.pairwise(bounds):
        out[(str(apps[lo]), str(features[lo]))] = (hours[lo:hi], n[lo:hi], tokens[lo:hi])
    return out


def _rise(n: np.ndarray, tokens: np.ndarray, min_requests: int) -> int | None:
    """Where a feature's input tokens per request rose most: the index of the first hour
    after the split of its hours that explains most of the variance between the two
    sides' means (``N1 N2 / N (m2 - m1)^2``, over the splits with ``m2 > m1`` and at least
    ``min_requests`` on each side); None when there is no such split."""
    if len(n) < 2:
        return None
    n1, s1 = np.cumsum(n)[:-1], np.cumsum(tokens)[:-1]
    total_n, total_s = float(n.sum()), float(tokens.sum())
    n2, s2 = total_n - n1, total_s - s1
    valid = (n1 >= min_requests) & (n2 >= min_requests)
    if not valid.any():
        return None
    m1 = s1 / np.maximum(n1, 1.0)
    m2 = s2 / np.maximum(n2, 1.0)
    score = np.where(valid & (m2 > m1), n1 * n2 / total_n * (m2 - m1) ** 2, -1.0)
    k = int(np.argmax(score))
    return k + 1 if score[k] > 0 else None


@register
class Waste(Analyzer):
    name: ClassVar[str] = "waste"
    description: ClassVar[str] = (
        "failed requests and retries, bloated contexts, high-volume narrow tasks on big models"
    )
    Options: ClassVar[type[Options]] = WasteOptions

    def run(self, ctx: Context) -> list[Finding]:
        opts = self.options
        assert isinstance(opts, WasteOptions)
        ctx.write(refresh)
        since = max(recent_start(ctx.window.end, opts.recent_days), ctx.window.start)
        rows = [
            _Row(*r[:9], int(r[9]), int(r[10]), int(r[11]), float(r[12] or 0), *r[13:15])
            for r in ctx.con.execute(
                _SPEND, {"since": since, "start": ctx.window.start, "end": ctx.window.end}
            ).fetchall()
        ]
        findings = [
            *self._errors(ctx, rows),
            *self._bloat(ctx, rows, since),
            *self._finetune(ctx, rows),
        ]
        return [f for f in findings if f.monthly_savings_usd >= opts.min_monthly_savings_usd]

    # -- (a) errors and retries --------------------------------------------------------------

    def _errors(self, ctx: Context, rows: list[_Row]) -> list[Finding]:
        opts = self.options
        assert isinstance(opts, WasteOptions)
        groups: dict[tuple[str | None, ...], list[_Row]] = {}
        for r in rows:
            groups.setdefault((r.tenant, r.app, r.feature, r.model), []).append(r)
        retries = {
            tuple(r[:4]): r[4:]
            for r in ctx.con.execute(
                """
                SELECT tenant, app, feature, model, count(*),
                       count(*) FILTER (WHERE status = 'error'),
                       sum(input_tokens), sum(output_tokens), sum(coalesce(cost_usd, 0))
                FROM waste_retries
                WHERE ts >= $start AND ts < $end AND gap_s <= $gap
                GROUP BY ALL
                """,
                {"start": ctx.window.start, "end": ctx.window.end, "gap": opts.retry_interval_s},
            ).fetchall()
        }
        retried_by_hour: dict[tuple[str | None, ...], dict[int, tuple[int, float]]] = {}
        for tenant, app, feature, model, h, n, c in ctx.con.execute(
            """
            SELECT tenant, app, feature, model, epoch(ts)::BIGINT // 3600, count(*),
                   sum(coalesce(cost_usd, 0))
            FROM waste_retried_errors
            WHERE ts >= $start AND ts < $end AND gap_s <= $gap
            GROUP BY ALL
            """,
            {"start": ctx.window.start, "end": ctx.window.end, "gap": opts.retry_interval_s},
        ).fetchall():
            retried_by_hour.setdefault((tenant, app, feature, model), {})[int(h)] = (
                int(n),
                float(c or 0.0),
            )
        errors_by_hour: dict[tuple[str | None, ...], list[tuple[int, float]]] = {}
        for tenant, app, feature, model, h, c in ctx.con.execute(
            """
            SELECT tenant, app, feature, model, epoch(hour)::BIGINT // 3600, sum(cost_usd)
            FROM spend_hourly
            WHERE hour >= $start AND hour < $end AND status = 'error'
            GROUP BY ALL
            """,
            {"start": ctx.window.start, "end": ctx.window.end},
        ).fetchall():
            errors_by_hour.setdefault((tenant, app, feature, model), []).append(
                (int(h), float(c or 0.0))
            )
        findings = []
        for key, group in groups.items():
            requests, _, _, cost = _sums(group)
            errors, e_in, e_out, e_cost = _sums(r for r in group if r.failed)
            rate = errors / requests if requests else 0.0
            if errors == 0 or rate < opts.min_error_rate:
                continue
            tenant, app, feature, model = key
            assert model is not None
            rt = retries.get(key, (0, 0, 0, 0, 0.0))
            retried = retried_by_hour.get(key, {})
            retried_errors = sum(n for n, _ in retried.values())
            retried_cost = sum(c for _, c in retried.values())
            # a retried error's cost is waste in full (its retry bought what it should
            # have); of the others', the share that fixing the cause would save
            saved_hours = []
            for h, c in errors_by_hour.get(key, []):
                r = retried.get(h, (0, 0.0))[1]
                saved_hours.append((h, r + opts.recoverable_share * max(c - r, 0.0)))
            projection = ctx.project(ctx.hours([*saved_hours, *_span(group)]))
            scope = {
                "tenant": _tag(tenant),
                "app": _tag(app),
                "feature": _tag(feature),
                "model": model,
            }
            findings.append(
                self.finding(
                    ctx,
                    kind="waste.errors",
                    scope=scope,
                    title=(
                        f"{scope['tenant']} / {scope['app']} / {scope['feature']} on {model}: "
                        f"{errors:,} failed requests ({rate:.1%}) cost ${e_cost:,.2f}; "
                        f"{retried_errors:,} of them retried"
                    ),
                    evidence={
                        "requests": requests,
                        "errors": errors,
                        "error_rate": rate,
                        "error_input_tokens": e_in,
                        "error_output_tokens": e_out,
                        "error_cost_usd": e_cost,
                        "cost_usd": cost,
                        "retries": int(rt[0]),
                        "retries_failed": int(rt[1]),
                        "retry_input_tokens": int(rt[2] or 0),
                        "retry_output_tokens": int(rt[3] or 0),
                        "retry_cost_usd": float(rt[4] or 0),
                        "retried_errors": retried_errors,
                        "retried_error_cost_usd": retried_cost,
                        "unretried_error_cost_usd": max(e_cost - retried_cost, 0.0),
                        "retry_interval_s": opts.retry_interval_s,
                        "recoverable_share": opts.recoverable_share,
                    },
                    projection=projection,
                    requests=requests,
                    savings_method=(
                        "cost of the failed requests that were retried within "
                        f"{opts.retry_interval_s:g} s (each retry re-bought what the failed "
                        "attempt should have delivered: all of it is waste; a failed retry is "
                        "itself a failed request) + the cost of the other failed requests x "
                        f"recoverable share {opts.recoverable_share:g}, per hour, projected "
                        "to a month over the scope's hours from its first request to the "
                        "last hour observed"
                    ),
                    confidence=0.5,
                    risk="low",
                    action=None,
                )
            )
        return findings

    # -- (b) context bloat -------------------------------------------------------------------

    def _input_price(self, ctx: Context, rows: Iterable[_Row]) -> float:
        """Input price per token of ``rows`` (one feature's recent traffic), by its models' mix.

        API models: the list input price in effect at the window's end (batch
        discount for batch-billed traffic); self-hosted: its settled cost per
        token; unpriced: 0.
        """
        paid = tokens = 0.0
        for r in rows:
            key = ctx.prices.resolve(r.provider, r.model, r.model, r.deployment)
            unit = 0.0
            if key is not None and key.startswith(f"{SELF_HOSTED}/"):
                both = r.input_tokens + r.output_tokens
                unit = r.cost_usd / both if both else 0.0
            elif key is not None:
                price = ctx.prices.price_at(key, ctx.window.end.date())
                if price is not None:
                    discount = price.batch_discount if r.billing_mode == "batch" else 0.0
                    unit = price.input_per_mtok / PER_MILLION * (1 - discount)
            paid += r.input_tokens * unit
            tokens += r.input_tokens
        return paid / tokens if tokens else 0.0

    def _bloat(self, ctx: Context, rows: list[_Row], since: datetime) -> list[Finding]:
        opts = self.options
        assert isinstance(opts, WasteOptions)
        current: dict[tuple[str, str], list[_Row]] = {}  # the last recent_days, by feature
        for r in rows:
            if r.app is not None and r.feature is not None and r.recent:
                current.setdefault((r.app, r.feature), []).append(r)
        series = _feature_hours(ctx)
        recent: dict[tuple[str, str], tuple[int, float]] = {}  # the last recent_days
        for key, group in current.items():
            requests, inp, _, _ = _sums(group)
            if requests >= opts.min_requests:
                recent[key] = (requests, inp / requests)
        findings = []
        for (app, feature), (recent_requests, recent_mean) in sorted(recent.items()):
            hours, n, tokens = series.get((app, feature), _NO_SERIES)
            peers = [m for (a, f), (_n, m) in recent.items() if a == app and f != feature]
            peer_median = statistics.median(peers) if len(peers) >= opts.min_peers else None
            # its own past: the mean before its most significant rise, when the mean after
            # it is at least growth_factor x that; the rise starts the period judged
            split = _rise(n, tokens, opts.min_requests)
            earlier_mean = earlier_requests = None
            first = int(np.searchsorted(hours, math.floor(since.timestamp() / 3600)))
            mean, requests = recent_mean, recent_requests
            fired: dict[str, tuple[float, float]] = {}  # baseline name -> (baseline, factor)
            if split is not None:
                before = float(tokens[:split].sum() / n[:split].sum())
                after = float(tokens[split:].sum() / n[split:].sum())
                earlier_mean, earlier_requests = before, int(n[:split].sum())
                if after >= opts.growth_factor * before:
                    fired["history"] = (before, opts.growth_factor)
                    first, mean, requests = split, after, int(n[split:].sum())
            if peer_median is not None and mean >= opts.peer_factor * peer_median:
                fired["peers"] = (peer_median, opts.peer_factor)
            if not fired:
                continue
            used = max(fired, key=lambda k: fired[k][0])
            baseline, factor = fired[used]
            unit = self._input_price(ctx, current[(app, feature)])
            excess_tokens = float(tokens[first:].sum() - baseline * n[first:].sum())
            excess_cost = excess_tokens * unit
            per_hour = (tokens[first:] - baseline * n[first:]) * unit
            projection = ctx.project(
                ctx.hours(zip(hours[first:].tolist(), per_hour.tolist(), strict=True))
            )
            recent_from = datetime.fromtimestamp(int(hours[first]) * 3600, UTC)
            findings.append(
                self.finding(
                    ctx,
                    kind="waste.context_bloat",
                    scope={"app": app, "feature": feature},
                    title=(
                        f"{app} / {feature}: {mean:,.0f} input tokens per request, "
                        f"{mean / baseline:.1f}x its {'peers' if used == 'peers' else 'own past'} "
                        f"({baseline:,.0f})"
                    ),
                    evidence={
                        "requests": requests,
                        "mean_input_tokens": mean,
                        "peer_median_input_tokens": peer_median,
                        "peers": len(peers),
                        "earlier_mean_input_tokens": earlier_mean,
                        "earlier_requests": earlier_requests or 0,
                        "baselines_exceeded": sorted(fired),
                        "baseline": used,
                        "baseline_input_tokens": baseline,
                        "excess_input_tokens": excess_tokens,
                        "input_usd_per_mtok": unit * PER_MILLION,
                        "excess_cost_usd": excess_cost,
                        "recent_since": recent_from.isoformat(),
                    },
                    projection=projection,
                    requests=requests,
                    savings_method=(
                        "(input tokens - baseline x requests) x the feature's input price per "
                        "token, per hour since the rise (or, against its peers only, of the "
                        "recent days), projected to a month over the hours from then to the "
                        "last hour observed"
                    ),
                    confidence=0.6 if "history" in fired else 0.4,
                    risk="medium" if "history" in fired else "high",
                    action=ActionSpec(
                        "gateway.max_tokens",
                        {
                            "app": app,
                            "feature": feature,
                            "max_input_tokens": math.ceil(baseline * factor),
                            "rag_top_k_scale": round(baseline / mean, 3),
                        },
                    ),
                )
            )
        return findings

    # -- (c) fine-tune a small model ---------------------------------------------------------

    def _finetune(self, ctx: Context, rows: list[_Row]) -> list[Finding]:
        opts = self.options
        assert isinstance(opts, WasteOptions)
        groups: dict[tuple[str, str, str | None, str], list[_Row]] = {}
        for r in rows:
            if r.deployment is None and r.app is not None and r.feature is not None:
                groups.setdefault((r.app, r.feature, r.provider, r.model), []).append(r)
        one_off = opts.finetune_one_off_usd + opts.eval_one_off_usd
        findings = []
        for (app, feature, provider, model), group in groups.items():
            requests, inp, out, cost = _sums(group)
            span = _span(group)
            span_hours = float(
                max(span[1][0], ctx.last_hour or 0) - ctx.span_start(int(span[0][0])) + 1
            )
            per_span = HOURS_PER_MONTH / max(span_hours, ctx.min_evidence_hours)
            per_month = requests * per_span
            mean_out = out / requests
            if per_month < opts.finetune_min_requests_per_month:
                continue
            if mean_out > opts.finetune_max_output_tokens:
                continue
            key = ctx.prices.resolve(provider, model, model)
            price = ctx.prices.price_at(key, ctx.window.end.date()) if key else None
            if price is None or price.input_per_mtok < opts.finetune_min_input_per_mtok:
                continue
            small_cost = (
                inp * opts.small_model_input_per_mtok + out * opts.small_model_output_per_mtok
            ) / PER_MILLION
            small_in = opts.small_model_input_per_mtok / PER_MILLION
            small_out = opts.small_model_output_per_mtok / PER_MILLION
            projection: Projection = ctx.project(
                ctx.hours(
                    [
                        *_hourly(
                            ctx,
                            "app = $app AND feature = $feature AND model = $model "
                            "AND provider IS NOT DISTINCT FROM $provider AND deployment IS NULL",
                            {"app": app, "feature": feature, "model": model, "provider": provider},
                            f"sum(cost_usd) - sum(input_tokens) * {small_in!r} "
                            f"- sum(output_tokens) * {small_out!r}",
                        ),
                        *span,
                    ]
                )
            )
            savings = projection.monthly_usd
            if savings <= 0:
                continue
            payback = one_off / savings
            if payback > opts.max_payback_months:
                continue
            evidence: dict[str, Any] = {
                "requests": requests,
                "requests_per_month": per_month,
                "mean_input_tokens": inp / requests,
                "mean_output_tokens": mean_out,
                "model_input_usd_per_mtok": price.input_per_mtok,
                "cost_usd": cost,
                "small_model": opts.small_model,
                "small_model_cost_usd": small_cost,
                "current_monthly_usd": cost * per_span,
                "small_model_monthly_usd": small_cost * per_span,
                "one_off_usd": one_off,
                "payback_months": payback,
            }
            findings.append(
                self.finding(
                    ctx,
                    kind="waste.finetune",
                    scope={"app": app, "feature": feature, "model": model},
                    title=(
                        f"{app} / {feature}: {per_month:,.0f} short answers a month on "
                        f"{price.key}; a fine-tuned {opts.small_model} pays back in "
                        f"{payback:.1f} months"
                    ),
                    evidence=evidence,
                    projection=projection,
                    requests=requests,
                    savings_method=(
                        "cost on the current model - the same input and output tokens at the "
                        "fine-tuned small model's prices, per hour, projected to a month over "
                        "the span of its traffic; payback = (fine-tune + eval one-off) / that"
                    ),
                    confidence=0.4,
                    risk="medium",
                    action=ActionSpec(
                        "finetune",
                        {
                            "app": app,
                            "feature": feature,
                            "from_model": price.key,
                            "base_model": opts.small_model,
                            "training_examples": requests,
                        },
                    ),
                )
            )
        return findings
