"""routing: traffic on an expensive model where a cheaper mix of models meets the quality bar.

**Window.** Whole UTC days: the run's window extended back to the start of
its first day.

**Scopes.** One scope per tenant × app × feature × (requested) model with at
least ``min_requests`` requests in the window. Traffic without a feature tag
is skipped: "the same feature" is what makes models comparable.

**Candidates** for a scope are judged within its own tenant × app × feature:
the models seen serving that tenant's app's feature in the window, plus the
models named in the ``candidates`` option; the scope's own model is always
one. Feature names recur across tenants and apps (``chat``), so nothing that
another tenant's or app's traffic shows (its quality, latency or failures)
enters a scope's estimates. Each candidate has:

- a **quality**: from ``model_evaluations`` (offline evaluation results, one
  row per tenant × app × feature × model, matched exactly: a row without a
  tenant or app is for traffic without that tag, not for any; the newest row
  wins) when there is one, else the mean ``quality_score`` of that model's
  requests in this tenant's app's feature in the window (``quality_sum /
  quality_n`` of ``spend_hourly``). It needs ``min_samples`` scored requests
  there (or evaluation samples; an evaluation without a sample count is
  trusted). A model without a usable quality is no candidate; a scope whose
  own model has none is skipped. So a model the scope has never used is a
  candidate only through an evaluation for that scope (and ``candidates``).
- a **p95 latency**, estimated from ``routing_stats``: a histogram per UTC day
  × tenant × app × feature × model of ``latency_ms`` in log buckets 5 % wide
  (the value of a bucket is its geometric middle, so the estimate is within
  2.5 %), over the days the window touches. Only needed when
  ``latency_slo_ms`` is set; then a model without one (fewer than
  ``min_samples`` latencies in the scope) is no candidate.
- a **cost per request at this scope's token mix**: the scope's mean input,
  output, cache-read and cache-write tokens per request priced with the
  model's list price in effect at ``now`` (``PriceBook``), times the scope's
  billed/list ratio (so batch-billed traffic stays batch-billed). A
  self-hosted model costs its observed $ per token (GPU-hours spread over
  input and output tokens) over the window's fully priced hours: the
  deployment's rate, whoever sent the tokens, as a list price is the same for
  every tenant. A model with neither is no candidate. The same tokens are
  assumed on every model.

**The mix (linear programming).** Traffic shares ``x_m`` minimise
``Σ x_m·cost_m`` subject to ``Σ x_m·quality_m ≥ T``, ``Σ x_m = 1``,
``0 ≤ x_m ≤ max_share`` for every model but the scope's own (which may keep
all of it), and, when ``latency_slo_ms`` is set, ``Σ x_m·p95_m ≤ S``. A model
whose own quality in the scope is below ``T`` takes no share: mixing it in
would meet the bar on average while every request it answers misses it (the
cascade below may still use it, escalating what fails). The
quality bar ``T`` is ``quality_target``, or the scope's current quality when
that is lower: a change never lowers quality below the target, nor below what
the traffic gets today. Likewise ``S`` is the SLO, or the scope's current
p95 when that is higher. So keeping all traffic where it is is always
feasible and a mix is proposed only when it is cheaper. The latency bound is
linear in the shares: the share-weighted mean of the models' p95s, an
approximation (the p95 of a mixture is not the mean of the p95s; a model
much slower than the SLO can still take a small share). All scopes' LPs are
solved as one block-diagonal LP (one ``scipy.optimize.linprog`` HiGHS call);
should that fail, each scope is solved on its own.

**The cascade.** Alternatively, try the cheapest candidate first and escalate
to the scope's model when the answer fails. The escalation rate ``e`` is the
share of the cheap model's requests in the scope's tenant × app × feature
(window days) whose outcome is known (``status = 'error'``, or a quality score)
that failed: errored, or scored below ``T`` (scores are kept in 0.01 buckets;
a bucket straddling ``T`` counts as failed). Cost per request:
``cheap + e·current``. With an SLO, its latency, ``p95_cheap + e·p95_current``
(the same linear approximation), must meet ``S``.

**Finding** ``routing.model_mix`` per scope whose better option (LP or
cascade) saves at least ``min_monthly_savings_usd`` a month: the saving on
each UTC day = ``(current − option) cost per request × the scope's requests
that day``, projected to a month over the span from the scope's first to its
last hour with requests (``routing_daily`` keeps each day's first and last
hour), with an interval (``base.project``: a bootstrap over the days, each an
equal share of the span); ``evidence_hours`` is that span,
``evidence_requests`` the scope's requests. Under ``analyzers.min_evidence_hours``
or ``min_evidence_requests`` the finding is provisional (never acted on
automatically, its rate not extrapolated from the short span). Evidence:
the candidates (quality and its source, samples, requests, p95, cost per
request), the LP shares and the cascade numbers (shown even when the
cascade would cost more). Action ``gateway.route {"weights": ...}`` or
``gateway.cascade {...}``. Confidence grows with the samples behind the
chosen option's quality (or outcome) estimates, ``0.3 + 0.5·min(1, n/1000)``;
risk is medium (answers and latency change).

**Incremental.** Two tables of its own, kept with one watermark in
``rollup_state`` (name ``routing``; it follows ``spend_hourly``'s):
``routing_daily``, ``spend_hourly`` per UTC day × tenant × app × feature ×
model × provider × deployment, whose days that changed since (events
ingested, self-hosted hours settled) are recomputed; and ``routing_stats``,
the latency and outcome histograms per day × tenant × app × feature × model
(events with a feature tag only), to which a run adds only the events
ingested since. The first run builds ``routing_stats`` from the events of the
window's days; above ``sample_events`` events it reads a system sample of
about that many (whole vectors of rows) and scales the counts up, so the
first run on a large store costs a fraction of a full scan (the estimates
then rest on that sample until new days replace it). Its days older than a
week before the window are dropped.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any, ClassVar

import duckdb
import numpy as np
from pydantic import Field
from scipy import sparse
from scipy.optimize import linprog

from finopsd.analyzers._rollups import (
    DAY,
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
    Window,
    register,
)
from finopsd.pricing import PER_MILLION, SELF_HOSTED, PriceBook
from finopsd.store import utc_floor

NAME = "routing"
LATENCY_SCALE = 20
"""Latency bucket = floor(ln(ms) × this): buckets ``e^(1/20)`` ≈ 5.1 % wide."""
QUALITY_SCALE = 100
"""Quality bucket = floor(score × this); bucket -1 holds errored requests."""
KEEP_DAYS = 7
"""``routing_stats`` keeps this many days before the window start."""

_DAY = utc_floor("ts", 86400)
_LATENCY_BUCKET = f"floor(ln(greatest(latency_ms, 1.0)) * {LATENCY_SCALE})::INTEGER"
_QUALITY_BUCKET = (
    "CASE WHEN status = 'error' THEN -1 "
    f"ELSE least(floor(quality_score * {QUALITY_SCALE} + 1e-9), {QUALITY_SCALE})::INTEGER END"
)


def _aggregate(source: str, where: str, weight: float) -> str:
    """SQL: ``routing_stats`` rows (day, tenant, app, feature, model, metric, bucket, n) for
    the events of ``source`` that carry a feature tag."""
    return f"""
        SELECT {_DAY} AS day, tenant, app, feature, request_model AS model,
               'latency' AS metric, {_LATENCY_BUCKET} AS bucket, count(*) * {weight!r} AS n
        FROM {source} WHERE {where} AND feature IS NOT NULL AND latency_ms IS NOT NULL
        GROUP BY ALL
        UNION ALL
        SELECT {_DAY} AS day, tenant, app, feature, request_model AS model,
               'quality' AS metric, {_QUALITY_BUCKET} AS bucket, count(*) * {weight!r} AS n
        FROM {source}
        WHERE {where} AND feature IS NOT NULL AND (status = 'error' OR quality_score IS NOT NULL)
        GROUP BY ALL
    """


def _cost_fn(
    prices: PriceBook,
    per_token: dict[str, float],
    provider: str | None,
    model: str,
    deployment: str | None,
    on: date,
) -> Callable[[tuple[float, ...]], float] | None:
    """$ per request of ``model`` as a function of the mean (input, output, cache-read,
    cache-write) tokens: its list price in effect ``on``, or for a self-hosted
    deployment its observed $ per token (``per_token``); None when neither is known."""
    key = prices.resolve(provider, None, model, deployment)
    if key is not None and key.startswith(f"{SELF_HOSTED}/"):
        rate = per_token.get(model)
        if rate is None:
            return None
        return lambda mix: (mix[0] + mix[1]) * rate
    price = price_now(prices, provider, model, deployment, on)
    if price is None:
        return None
    p_in, p_out = price.input_per_mtok, price.output_per_mtok
    cached, written = price.cached_input_per_mtok, price.cache_write_per_mtok
    p_cached = p_in if cached is None else cached
    p_write = p_in if written is None else written

    def cost(mix: tuple[float, ...]) -> float:
        inp, out, read, wrote = mix
        uncached = max(inp - read - wrote, 0.0)
        return (uncached * p_in + read * p_cached + wrote * p_write + out * p_out) / PER_MILLION

    return cost


def _day_floor(t: datetime) -> datetime:
    seconds = math.floor(t.timestamp() / 86400) * 86400
    return datetime.fromtimestamp(seconds, UTC)


_DAILY = f"""
    SELECT {utc_floor("hour", 86400)} AS day,
           tenant, app, feature, model, provider, deployment,
           sum(requests), sum(input_tokens), sum(output_tokens), sum(cache_read_tokens),
           sum(cache_write_tokens), sum(cost_usd), sum(list_cost_usd),
           sum(quality_sum), sum(quality_n),
           coalesce(sum(cost_usd) FILTER (WHERE unpriced_requests = 0), 0),
           coalesce(sum(input_tokens + output_tokens) FILTER (WHERE unpriced_requests = 0), 0),
           min(hour), max(hour)
    FROM spend_hourly
    WHERE feature IS NOT NULL AND {{where}}
    GROUP BY ALL
"""
"""``routing_daily``: ``spend_hourly`` per UTC day × tenant × app × feature × model."""


def refresh(con: duckdb.DuckDBPyConnection, window: Window, sample_events: int = 0) -> None:
    """Bring ``routing_daily`` and ``routing_stats`` up to date.

    ``routing_daily`` follows ``spend_hourly`` (the days that changed since the
    watermark). ``routing_stats`` without a watermark (first run) is built
    from the events of the window's days, from a system sample of about
    ``sample_events`` when there are more (0: never sample); then only events
    ingested after the watermark are added, merged into the days they fall
    on. The watermark is ``spend_hourly``'s: events ingested after the spend
    rollup's refresh wait for the next run, so none counts twice. Runs in the
    caller's transaction.
    """
    since = watermark(con, NAME)
    newest = newest_change(con)
    if newest is None or (since is not None and newest <= since):
        return
    refresh_rollup(con, "routing_daily", _DAILY, DAY, since)
    first_day = _day_floor(window.start)
    if since is None:
        con.execute("DELETE FROM routing_stats")
        count = con.execute(
            "SELECT count(*) FROM usage_events WHERE ts >= ? AND ingested_at <= ?",
            [first_day, newest],
        )
        row = count.fetchone()
        events = int(row[0]) if row else 0
        rate = 1.0
        if sample_events and events > sample_events:
            rate = sample_events / events
        source = "usage_events"
        if rate < 1.0:
            source += f" TABLESAMPLE {rate * 100:.6f}% (system)"
        con.execute(
            "INSERT INTO routing_stats "
            + _aggregate(source, "ts >= $day AND ingested_at <= $newest", 1.0 / rate),
            {"day": first_day, "newest": newest},
        )
    else:  # counts add up: merge the new events' histograms into their days
        new = _aggregate("usage_events", "ingested_at > $w AND ingested_at <= $newest", 1.0)
        con.execute(
            f"""
            MERGE INTO routing_stats AS t
            USING ({new}) AS s
            ON t.day = s.day AND t.tenant IS NOT DISTINCT FROM s.tenant
               AND t.app IS NOT DISTINCT FROM s.app AND t.feature = s.feature
               AND t.model = s.model AND t.metric = s.metric AND t.bucket = s.bucket
            WHEN MATCHED THEN UPDATE SET n = t.n + s.n
            WHEN NOT MATCHED THEN INSERT VALUES
                (s.day, s.tenant, s.app, s.feature, s.model, s.metric, s.bucket, s.n)
            """,
            {"w": since, "newest": newest},
        )
    con.execute("DELETE FROM routing_stats WHERE day < ?", [first_day - timedelta(days=KEEP_DAYS)])
    con.execute("INSERT OR REPLACE INTO rollup_state VALUES (?, ?)", [NAME, newest])


# -- the linear programme ------------------------------------------------------------------


@dataclass
class MixProblem:
    """One scope's LP: shares over ``costs`` (index 0: the scope's current model)."""

    costs: np.ndarray
    qualities: np.ndarray
    target: float
    upper: np.ndarray
    p95: np.ndarray | None = None  # with ``slo``: the latency bound applies
    slo: float | None = None


def _blocks(problems: list[MixProblem]) -> tuple[Any, ...]:
    """The block-diagonal LP of ``problems`` (costs scaled so each block's are O(1))."""
    c_parts, ub_rows, ub_cols, ub_vals, b_ub = [], [], [], [], []
    eq_rows, eq_cols, bounds = [], [], []
    offset = row = 0
    for k, p in enumerate(problems):
        n = len(p.costs)
        cols = np.arange(offset, offset + n)
        scale = float(np.max(np.abs(p.costs))) or 1.0
        c_parts.append(p.costs / scale)
        ub_rows += [row] * n
        ub_cols += cols.tolist()
        ub_vals += (-p.qualities).tolist()
        b_ub.append(-p.target)
        row += 1
        if p.slo is not None and p.p95 is not None:
            ub_rows += [row] * n
            ub_cols += cols.tolist()
            ub_vals += (p.p95 / p.slo).tolist()
            b_ub.append(1.0)
            row += 1
        eq_rows += [k] * n
        eq_cols += cols.tolist()
        bounds += [(0.0, float(u)) for u in p.upper]
        offset += n
    a_ub = sparse.csr_array((ub_vals, (ub_rows, ub_cols)), shape=(row, offset))
    a_eq = sparse.csr_array(
        (np.ones(len(eq_rows)), (eq_rows, eq_cols)), shape=(len(problems), offset)
    )
    return np.concatenate(c_parts), a_ub, np.array(b_ub), a_eq, np.ones(len(problems)), bounds


def solve_mixes(problems: list[MixProblem]) -> list[np.ndarray | None]:
    """The cost-minimal shares of each problem; None where it is infeasible.

    All problems are solved as one block-diagonal LP (the blocks share no
    variable, so its optimum is each block's optimum); if that fails, each is
    solved alone so one infeasible block does not hide the others.
    """
    if not problems:
        return []
    c, a_ub, b_ub, a_eq, b_eq, bounds = _blocks(problems)
    res = linprog(c, A_ub=a_ub, b_ub=b_ub, A_eq=a_eq, b_eq=b_eq, bounds=bounds, method="highs")
    if res.status == 0:
        out: list[np.ndarray | None] = []
        offset = 0
        for p in problems:
            out.append(_clean(res.x[offset : offset + len(p.costs)]))
            offset += len(p.costs)
        return out
    if len(problems) == 1:
        return [None]
    return [solve_mixes([p])[0] for p in problems]


def _clean(x: np.ndarray) -> np.ndarray:
    x = np.where(x < 1e-9, 0.0, x)
    total = x.sum()
    return x / total if total > 0 else x


# -- reading the store ---------------------------------------------------------------------


@dataclass
class ModelFeature:
    """What the window says about one model serving one feature."""

    provider: str | None = None
    deployment: str | None = None
    requests: int = 0
    quality_sum: float = 0.0
    quality_n: int = 0
    latency_n: float = 0.0  # latencies in the histogram
    p95_bucket: int | None = None  # the first bucket where 95 % of them are reached
    outcomes: np.ndarray = field(  # index bucket + 1 -> n; index 0: errors
        default_factory=lambda: np.zeros(QUALITY_SCALE + 2)
    )

    def p95(self, min_samples: int) -> float | None:
        """The p95 latency (its bucket's geometric middle); None under ``min_samples``."""
        if self.latency_n < min_samples or self.latency_n <= 0 or self.p95_bucket is None:
            return None
        return math.exp((self.p95_bucket + 0.5) / LATENCY_SCALE)

    def escalation(self, target: float) -> tuple[float, float]:
        """(share failed at ``target``, outcomes known): errored or scored below it."""
        known = float(self.outcomes.sum())
        if known <= 0:
            return 0.0, 0.0
        below = math.ceil(target * QUALITY_SCALE - 1e-9)  # buckets < this start below target
        failed = float(self.outcomes[: max(0, min(below, QUALITY_SCALE + 1)) + 1].sum())
        return failed / known, known


@dataclass(frozen=True)
class _Traffic:
    """A scope's requests per UTC day (epoch days, ascending) and its first and last epoch
    hour with requests."""

    days: np.ndarray
    requests: np.ndarray
    first_hour: int
    last_hour: int


ScopeKey = tuple[str | None, str | None, str]
"""(tenant, app, feature) as stored (None: the tag was missing): where candidates are judged."""


@dataclass
class Candidate:
    model: str
    provider: str | None
    deployment: str | None
    quality: float | None
    quality_source: str | None
    quality_samples: float | None
    p95_ms: float | None
    stats: ModelFeature | None


class RoutingOptions(Options):
    quality_target: float = Field(
        0.85,
        ge=0,
        le=1,
        description="mean quality a new mix must reach (or the current one's, when lower)",
    )
    latency_slo_ms: float | None = Field(
        None, gt=0, description="bound on the share-weighted p95 latency (unset: no bound)"
    )
    max_share: float = Field(
        1.0, gt=0, le=1, description="at most this share of a scope's traffic to any other model"
    )
    candidates: list[str] = Field(
        default_factory=list,
        description='models ("model" or "provider/model") to consider for every feature',
    )
    cascade: bool = Field(True, description="also consider cheap-first with escalation")
    min_requests: int = Field(100, ge=1, description="scopes with fewer requests are skipped")
    min_samples: int = Field(
        30, ge=1, description="quality, p95 and escalation estimates need this many samples"
    )
    min_monthly_savings_usd: float = Field(
        1.0, ge=0, description="no finding whose projected monthly saving is below this"
    )
    sample_events: int = Field(
        100_000,
        ge=0,
        description="first run: build latency/outcome histograms from a sample this big (0: all)",
    )


@register
class Routing(Analyzer):
    name: ClassVar[str] = NAME
    description: ClassVar[str] = (
        "cheaper model mixes (LP) or cheap-first cascades meeting a quality target and latency SLO"
    )
    Options: ClassVar[type[Options]] = RoutingOptions

    def run(self, ctx: Context) -> list[Finding]:
        opts = self.options
        assert isinstance(opts, RoutingOptions)
        ctx.write(lambda con: refresh(con, ctx.window, opts.sample_events))
        # whole UTC days: the window, extended back to the start of its first day
        window = Window(_day_floor(ctx.window.start), ctx.window.end)
        params = {"start": window.start, "end": window.end}
        scopes = ctx.con.execute(
            """
            SELECT tenant, app, feature, model,
                   arg_max(provider, requests), arg_max(deployment, requests),
                   sum(requests)::BIGINT AS requests, sum(input_tokens)::DOUBLE,
                   sum(output_tokens)::DOUBLE, sum(cache_read_tokens)::DOUBLE,
                   sum(cache_write_tokens)::DOUBLE, sum(cost_usd), sum(list_cost_usd)
            FROM routing_daily
            WHERE day >= $start AND day < $end
            GROUP BY tenant, app, feature, model
            HAVING sum(requests) >= $min
            ORDER BY tenant, app, feature, model
            """,
            {**params, "min": opts.min_requests},
        ).fetchall()
        if not scopes:
            return []
        stats, per_token = self._model_features(ctx, window)
        evaluations = self._evaluations(ctx)
        today = ctx.now.astimezone(UTC).date()
        extra = self._extra_candidates(ctx.prices, opts.candidates)

        pricing: dict[tuple[str | None, str, str | None], Any] = {}

        def cost_fn(provider: str | None, model: str, deployment: str | None) -> Any:
            """A function of a token mix to $ per request for this model; None: unknown."""
            memo = (provider, model, deployment)
            if memo not in pricing:
                pricing[memo] = _cost_fn(ctx.prices, per_token, provider, model, deployment, today)
            return pricing[memo]

        scope_candidates: dict[ScopeKey, list[Candidate]] = {}
        pending: list[dict[str, Any]] = []
        for row in scopes:
            tenant, app, feature, model, provider, deployment, requests = row[:7]
            tokens = [float(v) for v in row[7:11]]
            cost_usd, list_usd = float(row[11]), float(row[12])
            where: ScopeKey = (tenant, app, feature)
            if where not in scope_candidates:
                scope_candidates[where] = self._candidates(where, stats, evaluations, extra, opts)
            cands = scope_candidates[where]
            current = next((c for c in cands if c.model == model), None)
            if current is None or current.quality is None:
                continue
            mix = tuple(t / requests for t in tokens)
            billed = cost_usd / list_usd if list_usd > 0 else 1.0
            priced: list[tuple[Candidate, float]] = []
            for cand in cands:
                if cand.model == model:  # priced as this scope's traffic is served
                    fn = cost_fn(provider, model, deployment)
                else:
                    fn = cost_fn(cand.provider, cand.model, cand.deployment)
                if fn is not None:
                    priced.append((cand, fn(mix) * billed))
            by_model = {c.model: cost for c, cost in priced}
            if model not in by_model or by_model[model] <= 0:
                continue
            current_cost = by_model[model]
            if not any(cost < current_cost for _, cost in priced):
                continue
            pending.append(
                {
                    "key": (tag(tenant), tag(app), feature, model),
                    "raw": (tenant, app, feature, model),
                    "requests": int(requests),
                    "cost_usd": cost_usd,
                    "mix": mix,
                    "billed": billed,
                    "current": current,
                    "current_cost": current_cost,
                    "priced": priced,
                }
            )
        return self._decide(ctx, window, opts, pending)

    # -- the two options per scope ---------------------------------------------------------

    def _decide(
        self, ctx: Context, window: Window, opts: RoutingOptions, pending: list[dict[str, Any]]
    ) -> list[Finding]:
        problems: list[MixProblem] = []
        for item in pending:
            current: Candidate = item["current"]
            target = min(opts.quality_target, float(current.quality or 0.0))
            slo = None
            if opts.latency_slo_ms is not None:
                slo = max(opts.latency_slo_ms, current.p95_ms or 0.0)
            # the current model first; others need a quality (and a p95 under an SLO)
            lp = [(current, item["current_cost"])] + [
                (c, cost)
                for c, cost in item["priced"]
                if c.model != current.model
                and c.quality is not None
                and c.quality >= target  # a model that misses the bar is no candidate
                and (slo is None or c.p95_ms is not None)
            ]
            item["target"], item["slo"], item["lp_members"] = target, slo, lp
            p95 = None
            if slo is not None:
                p95 = np.array([slo if c.p95_ms is None else c.p95_ms for c, _ in lp])
            upper = np.array([1.0] + [opts.max_share] * (len(lp) - 1))
            problems.append(
                MixProblem(
                    costs=np.array([cost for _, cost in lp]),
                    qualities=np.array([float(c.quality or 0.0) for c, _ in lp]),
                    target=target,
                    upper=upper,
                    p95=p95,
                    slo=slo,
                )
            )
        solutions = solve_mixes(problems)
        traffic = self._daily_requests(ctx, window) if pending else {}
        findings = []
        for item, problem, x in zip(pending, problems, solutions, strict=True):
            finding = self._finding(ctx, opts, item, problem, x, traffic.get(item["raw"]))
            if finding is not None:
                findings.append(finding)
        return findings

    def _cascade(self, opts: RoutingOptions, item: dict[str, Any]) -> dict[str, Any] | None:
        current: Candidate = item["current"]
        current_cost = item["current_cost"]
        target, slo = item["target"], item["slo"]
        cheaper = sorted(
            (
                (cost, c)
                for c, cost in item["priced"]
                if c.model != current.model and cost < current_cost and c.stats is not None
            ),
            key=lambda pair: (pair[0], pair[1].model),
        )
        for cost, cand in cheaper:
            assert cand.stats is not None
            rate, known = cand.stats.escalation(target)
            if known < opts.min_samples:
                continue
            latency = None
            if slo is not None:
                if cand.p95_ms is None:
                    continue
                latency = cand.p95_ms + rate * (current.p95_ms or slo)
                if latency > slo:
                    continue
            per_request = cost + rate * current_cost
            return {
                "first": cand.model,
                "escalate_to": current.model,
                "escalation_rate": rate,
                "outcomes": known,
                "first_cost_per_request_usd": cost,
                "cost_per_request_usd": per_request,
                "savings_per_request_usd": current_cost - per_request,
                "p95_ms_weighted": latency,
            }
        return None

    def _finding(
        self,
        ctx: Context,
        opts: RoutingOptions,
        item: dict[str, Any],
        problem: MixProblem,
        x: np.ndarray | None,
        traffic: _Traffic | None,
    ) -> Finding | None:
        current: Candidate = item["current"]
        current_cost: float = item["current_cost"]
        lp_members: list[tuple[Candidate, float]] = item["lp_members"]
        lp: dict[str, Any] | None = None
        if x is not None:
            lp_cost = float(x @ problem.costs)
            shares = {c.model: float(s) for (c, _), s in zip(lp_members, x, strict=True) if s > 0}
            lp = {
                "shares": shares,
                "cost_per_request_usd": lp_cost,
                "quality": float(x @ problem.qualities),
                "p95_ms_weighted": float(x @ problem.p95) if problem.p95 is not None else None,
                "savings_per_request_usd": current_cost - lp_cost,
            }
        cascade = self._cascade(opts, item) if opts.cascade else None
        options = [
            (o["savings_per_request_usd"], name, o)
            for name, o in (("lp", lp), ("cascade", cascade))
            if o is not None and o["savings_per_request_usd"] > current_cost * 1e-6
        ]
        if not options:
            return None
        per_request, chosen, best = max(options, key=lambda t: (t[0], t[1] == "lp"))
        requests = item["requests"]
        window_savings = per_request * requests
        # the saving per day of the scope's traffic (0 on its days without any), over
        # the span from its first hour with requests (ctx.span_start) to the last hour
        # observed; each day counts as an equal share of that span (the first and last
        # may be partial)
        per_day, span_hours = np.zeros(1), 0.0
        if traffic is not None and len(traffic.days):
            first_hour = ctx.span_start(traffic.first_hour)
            last_hour = max(traffic.last_hour, ctx.last_hour or 0)
            first_day = min(int(traffic.days[0]), first_hour // 24)
            per_day = np.zeros(last_hour // 24 - first_day + 1)
            per_day[traffic.days - first_day] = traffic.requests * per_request
            span_hours = float(last_hour - first_hour + 1)
        projection = ctx.project(
            per_day, max(span_hours, 1.0) / len(per_day), span_hours=span_hours
        )
        monthly_usd = projection.monthly_usd
        if monthly_usd < opts.min_monthly_savings_usd:
            return None
        tenant, app, feature, model = item["key"]
        scope = {"tenant": tenant, "app": app, "feature": feature, "model": model}
        if chosen == "lp":
            used = [c for c, _ in lp_members if best["shares"].get(c.model, 0) > 0]
            samples = min(
                (c.quality_samples if c.quality_samples is not None else math.inf) for c in used
            )
            action = ActionSpec("gateway.route", {"match": scope, "weights": best["shares"]})
            what = "route " + ", ".join(
                f"{share:.0%} to {m}" for m, share in sorted(best["shares"].items())
            )
        else:
            samples = best["outcomes"]
            action = ActionSpec(
                "gateway.cascade",
                {
                    "match": scope,
                    "first": best["first"],
                    "escalate_to": best["escalate_to"],
                    "quality_threshold": item["target"],
                    "escalate_on": ["error", "quality_below_threshold"],
                },
            )
            what = f"try {best['first']} first, escalate to {model} on failure"
        confidence = round(0.3 + 0.5 * min(1.0, float(samples) / 1000.0), 3)
        mix = item["mix"]
        evidence = {
            "requests": requests,
            "cost_usd": item["cost_usd"],
            "tokens_per_request": {
                "input": mix[0],
                "output": mix[1],
                "cache_read": mix[2],
                "cache_write": mix[3],
            },
            "billed_to_list_ratio": item["billed"],
            "quality_target": item["target"],
            "quality_target_option": opts.quality_target,
            "latency_slo_ms": item["slo"],
            "current": {
                "model": model,
                "quality": current.quality,
                "p95_ms": current.p95_ms,
                "cost_per_request_usd": current_cost,
            },
            "candidates": [
                {
                    "model": c.model,
                    "provider": c.provider,
                    "quality": c.quality,
                    "quality_source": c.quality_source,
                    "quality_samples": c.quality_samples,
                    "requests": c.stats.requests if c.stats is not None else 0,
                    "p95_ms": c.p95_ms,
                    "cost_per_request_usd": cost,
                }
                for c, cost in item["priced"]
            ],
            "lp": lp,
            "cascade": cascade,
            "chosen": chosen,
            "window_savings_usd": window_savings,
        }
        return self.finding(
            ctx,
            kind="routing.model_mix",
            scope=scope,
            title=(
                f"{tenant} / {app} / {feature}: {model} traffic could {what} "
                f"(quality >= {item['target']:.2f}; ${monthly_usd:,.2f}/month)"
            ),
            evidence=evidence,
            projection=projection,
            requests=requests,
            savings_method=(
                "(current - proposed) cost per request at the scope's token mix and current list "
                f"prices ({'LP model mix' if chosen == 'lp' else 'cheap-first cascade'}), times "
                "the scope's requests each day, projected to a month over the span from its "
                "first to its last hour of traffic (interval: bootstrap over its days)"
            ),
            confidence=confidence,
            risk="medium",
            action=action,
        )

    # -- inputs ----------------------------------------------------------------------------

    def _candidates(
        self,
        where: ScopeKey,
        stats: dict[tuple[str | None, str | None, str, str], ModelFeature],
        evaluations: dict[tuple[str | None, str | None, str, str], tuple[float, float | None]],
        extra: list[tuple[str | None, str]],
        opts: RoutingOptions,
    ) -> list[Candidate]:
        """The candidates of one tenant × app × feature: the models that served it in the
        window, and ``extra``; every estimate from that scope's own traffic or evaluations."""
        seen: dict[str, tuple[str | None, str | None]] = {
            key[3]: (s.provider, s.deployment) for key, s in stats.items() if key[:3] == where
        }
        for provider, model in extra:
            if model not in seen:
                seen[model] = (provider, None)
        out = []
        for model, (provider, deployment) in sorted(seen.items()):
            s = stats.get((*where, model))
            quality = source = samples = None
            if (*where, model) in evaluations:
                q, n = evaluations[(*where, model)]
                if n is None or n >= opts.min_samples:
                    quality, source, samples = q, "evaluation", n
            if quality is None and s is not None and s.quality_n >= opts.min_samples:
                quality, source, samples = s.quality_sum / s.quality_n, "events", s.quality_n
            out.append(
                Candidate(
                    model=model,
                    provider=provider,
                    deployment=deployment,
                    quality=quality,
                    quality_source=source,
                    quality_samples=samples,
                    p95_ms=s.p95(opts.min_samples) if s is not None else None,
                    stats=s,
                )
            )
        return out

    @staticmethod
    def _model_features(
        ctx: Context, window: Window
    ) -> tuple[dict[tuple[str | None, str | None, str, str], ModelFeature], dict[str, float]]:
        """Per tenant × app × feature × model: volume, quality, latency and outcome
        histograms; and per model its observed $ per (input + output) token over fully
        priced hours (a self-hosted deployment's rate, whoever sent the tokens)."""
        out: dict[tuple[str | None, str | None, str, str], ModelFeature] = {}
        priced: dict[str, list[float]] = {}
        params = {"start": window.start, "end": window.end}
        for row in ctx.con.execute(
            """
            SELECT tenant, app, feature, model,
                   arg_max(provider, requests), arg_max(deployment, requests),
                   sum(requests)::BIGINT, sum(quality_sum), sum(quality_n)::BIGINT,
                   sum(priced_cost_usd), sum(priced_tokens)::DOUBLE
            FROM routing_daily
            WHERE day >= $start AND day < $end
            GROUP BY tenant, app, feature, model
            """,
            params,
        ).fetchall():
            tenant, app, feature, model, provider, deployment, requests, q_sum, q_n = row[:9]
            out[(tenant, app, feature, model)] = ModelFeature(
                provider, deployment, int(requests), float(q_sum), int(q_n)
            )
            acc = priced.setdefault(model, [0.0, 0.0])
            acc[0] += float(row[9])
            acc[1] += float(row[10])
        # per scope and model: the latency histogram's total and p95 bucket, in SQL (one
        # row each), and the outcome histogram as two lists
        for tenant, app, feature, model, total, p95_bucket in ctx.con.execute(
            """
            WITH h AS (
                SELECT tenant, app, feature, model, bucket, sum(n) AS n
                FROM routing_stats
                WHERE metric = 'latency' AND day >= $start AND day < $end
                GROUP BY ALL
            ), c AS (
                SELECT *, sum(n) OVER (PARTITION BY tenant, app, feature, model ORDER BY bucket)
                              AS cum,
                          sum(n) OVER (PARTITION BY tenant, app, feature, model) AS total
                FROM h
            )
            SELECT tenant, app, feature, model, any_value(total),
                   coalesce(min(bucket) FILTER (WHERE cum >= 0.95 * total * (1 - 1e-12)),
                            max(bucket))
            FROM c GROUP BY ALL
            """,
            params,
        ).fetchall():
            s = out.get((tenant, app, feature, model))
            if s is not None:  # else: no traffic in the window's rollup, not a candidate
                s.latency_n, s.p95_bucket = float(total), int(p95_bucket)
        for tenant, app, feature, model, buckets, ns in ctx.con.execute(
            """
            SELECT tenant, app, feature, model, list(bucket), list(n)
            FROM (
                SELECT tenant, app, feature, model, bucket, sum(n) AS n
                FROM routing_stats
                WHERE metric = 'quality' AND day >= $start AND day < $end
                GROUP BY ALL
            )
            GROUP BY ALL
            """,
            params,
        ).fetchall():
            s = out.get((tenant, app, feature, model))
            if s is not None:
                at = np.minimum(np.asarray(buckets, np.int64), QUALITY_SCALE) + 1
                np.add.at(s.outcomes, at, np.asarray(ns, np.float64))
        per_token = {m: c / t for m, (c, t) in priced.items() if c > 0 and t > 0}
        return out, per_token

    @staticmethod
    def _daily_requests(
        ctx: Context, window: Window
    ) -> dict[tuple[str | None, str | None, str, str], _Traffic]:
        """Per tenant × app × feature × model: its requests per UTC day of the window and
        its first and last hour with requests (``routing_daily``)."""
        table = ctx.con.execute(
            """
            SELECT tenant, app, feature, model, list(d ORDER BY d), list(n ORDER BY d),
                   min(first_h), max(last_h)
            FROM (
                SELECT tenant, app, feature, model, epoch(day)::BIGINT // 86400 AS d,
                       sum(requests)::BIGINT AS n,
                       min(epoch(first_hour)::BIGINT // 3600) AS first_h,
                       max(epoch(last_hour)::BIGINT // 3600) AS last_h
                FROM routing_daily
                WHERE day >= $start AND day < $end
                GROUP BY ALL
            )
            GROUP BY ALL
            """,
            {"start": window.start, "end": window.end},
        ).fetchall()
        return {
            (t, a, f, m): _Traffic(
                np.asarray(days, np.int64), np.asarray(ns, np.float64), int(lo), int(hi)
            )
            for t, a, f, m, days, ns, lo, hi in table
        }

    @staticmethod
    def _evaluations(
        ctx: Context,
    ) -> dict[tuple[str | None, str | None, str, str], tuple[float, float | None]]:
        """The newest evaluation per tenant × app × feature × model: (quality, samples)."""
        rows = ctx.con.execute(
            """
            SELECT tenant, app, feature, model,
                   arg_max(quality, updated_at), arg_max(samples, updated_at)
            FROM model_evaluations
            WHERE feature IS NOT NULL AND quality IS NOT NULL
            GROUP BY tenant, app, feature, model
            """
        ).fetchall()
        return {
            (t, a, f, m): (float(q), None if n is None else float(n)) for t, a, f, m, q, n in rows
        }

    @staticmethod
    def _extra_candidates(prices: PriceBook, names: list[str]) -> list[tuple[str | None, str]]:
        """``candidates`` option entries as (provider or None, model)."""
        providers = {p.provider for p in prices.prices}
        out: list[tuple[str | None, str]] = []
        for name in names:
            head, _, tail = name.partition("/")
            if tail and head in providers:
                out.append((head, tail))
            else:
                out.append((None, name))
        return out


__all__ = ["MixProblem", "Routing", "RoutingOptions", "refresh", "solve_mixes"]
