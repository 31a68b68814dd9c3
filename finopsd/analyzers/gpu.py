"""gpu: self-hosted deployments that are under-used, saturated, or dearer than an API.

Three findings per self-hosted deployment (one named in ``[[pricing.deployments]]``
or settled in ``deployment_hours``, which give its GPU count and GPU-hour price):

- ``gpu.underused`` — the deployment's hourly utilisation (the mean, over its
  GPUs, of each GPU's mean ``utilization_pct`` in the hour) was below
  ``underused_util_pct`` in at least ``underused_hours_share`` of its hours.
  GPUs needed = ceil(gpus x p95 hourly utilisation / ``target_util_pct``)
  (rounded up to the deployment's ``gpu_multiple``, at least one replica);
  saving = (gpus - needed) x GPU-hour price in every hour the deployment was
  up, projected to a month over the span from its first to its last hour up
  (``base.project``). Action ``vllm.scale {deployment, gpus}``.
- ``gpu.saturated`` — p95 hourly utilisation >= ``saturation_util_pct`` and,
  in those busy hours, either mean memory use (used / total) >=
  ``saturation_memory_ratio`` or the deployment's latency per output token
  (``spend_hourly``: latency_ms_sum / output_tokens) >= ``latency_growth`` x
  its latency in the other hours. A quantised variant (FP8 by default) is
  assumed to serve ``capacity_gain`` x the throughput, so the same load needs
  ceil(gpus / capacity_gain) GPUs; saving = the GPUs it frees x price in
  every hour up, projected like the above (no finding when it frees none). Action ``vllm.quantize``.
  KV-cache usage, preemptions and queue depth (vLLM's
  ``vllm:gpu_cache_usage_perc``, ``vllm:num_preemptions_total``,
  ``vllm:num_requests_waiting``) are not in ``gpu_samples`` yet: memory use
  and latency growth in busy hours are their proxies. Memory is a weak one (vLLM
  pre-allocates ``gpu_memory_utilization`` = 90 % of the memory for its
  KV cache whatever the load), which is why rising latency also counts.
- ``gpu.api_cheaper`` — the deployment's real $/1M tokens over the window
  (``finopsd.pricing.cost_per_million_tokens``: all its settled GPU-hours,
  idle ones included, over the tokens they served) is above the cheapest
  API equivalent's $/1M tokens at the same token mix (its input, cache-read
  and output tokens from ``spend_hourly``, at the API's list prices in effect
  at the window's end, standard billing). Candidates per deployment:
  ``api_equivalents[deployment]``, else ``default_api_equivalents``. Saving
  per settled hour = its GPU cost - the API's $/1M x the tokens it served
  (summed: (self-hosted - API) $/1M x tokens served), projected to a month
  over the span of its settled hours. Evidence gives the
  break-even: tokens per hour at which the GPU-hours would cost what the API
  does, and the utilisation that would take (assuming throughput scales
  linearly with utilisation). Action ``gateway.route`` to that API model.

Reads ``gpu_hourly`` (its own rollup of ``gpu_samples``: one row per
deployment, hour and GPU, maintained incrementally with a watermark on
``gpu_samples.ingested_at`` in ``rollup_state`` under the name ``gpu``: a run
recomputes only the hours that got new samples), ``deployment_hours`` and
``spend_hourly``. Samples without a ``deployment`` are ignored.

GPU findings stand on hours of samples (``min_hours``, ``analyzers.
min_evidence_hours``), not on request counts: an idle deployment is the waste
itself, so ``min_evidence_requests`` is 0 here; ``evidence_requests`` is what the
deployment served in the window.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated, Any, ClassVar

import duckdb
import numpy as np
from pydantic import Field, field_validator

from finopsd.analyzers.base import (
    ActionSpec,
    Analyzer,
    Context,
    Finding,
    Options,
    Projection,
    register,
)
from finopsd.pricing import PER_MILLION, PriceBook, cost_per_million_tokens
from finopsd.store import utc_floor

log = logging.getLogger(__name__)

_HOUR = utc_floor("ts", 3600)

_ROLLUP = f"""
    SELECT deployment, {_HOUR} AS hour, host, gpu_index,
           count(*) AS samples,
           sum(utilization_pct) AS utilization_sum,
           count(*) FILTER (WHERE memory_total_bytes > 0 AND memory_used_bytes IS NOT NULL)
               AS memory_samples,
           coalesce(sum(memory_used_bytes / memory_total_bytes)
               FILTER (WHERE memory_total_bytes > 0 AND memory_used_bytes IS NOT NULL), 0)
               AS memory_ratio_sum
    FROM gpu_samples
    WHERE deployment IS NOT NULL
"""


def refresh(con: duckdb.DuckDBPyConnection) -> int:
    """Bring ``gpu_hourly`` up to date with ``gpu_samples``; returns the hours recomputed.

    First run: built from every sample. Later runs: the hours that got samples
    ingested after the watermark are deleted and recomputed from all their
    samples. Runs in the caller's transaction.
    """
    row = con.execute("SELECT watermark FROM rollup_state WHERE name = 'gpu'").fetchone()
    watermark: datetime | None = row[0] if row else None
    top = con.execute("SELECT max(ingested_at) FROM gpu_samples").fetchone()
    newest: datetime | None = top[0] if top else None
    if newest is None or (watermark is not None and newest <= watermark):
        return 0
    if watermark is None:
        con.execute("DELETE FROM gpu_hourly")
        con.execute(f"INSERT INTO gpu_hourly BY NAME {_ROLLUP} GROUP BY ALL")
        got = con.execute("SELECT count(DISTINCT hour) FROM gpu_hourly").fetchone()
    else:
        con.execute(
            f"""
            CREATE OR REPLACE TEMP TABLE gpu_changed_hours AS
            SELECT DISTINCT {_HOUR} AS hour FROM gpu_samples
            WHERE ingested_at > $w AND deployment IS NOT NULL
            """,
            {"w": watermark},
        )
        got = con.execute("SELECT count(*), min(hour), max(hour) FROM gpu_changed_hours").fetchone()
        if got and got[0]:
            con.execute("DELETE FROM gpu_hourly WHERE hour IN (SELECT hour FROM gpu_changed_hours)")
            con.execute(
                f"""
                INSERT INTO gpu_hourly BY NAME {_ROLLUP}
                  AND ts >= $lo AND ts < $hi + INTERVAL 1 HOUR
                  AND {_HOUR} IN (SELECT hour FROM gpu_changed_hours)
                GROUP BY ALL
                """,
                {"lo": got[1], "hi": got[2]},
            )
        con.execute("DROP TABLE gpu_changed_hours")
    con.execute("INSERT OR REPLACE INTO rollup_state VALUES ('gpu', ?)", [newest])
    return int(got[0]) if got and got[0] else 0


class GpuOptions(Options):
    underused_util_pct: float = Field(
        30.0, gt=0, le=100, description="an hour is under-used below this mean utilisation (%)"
    )
    underused_hours_share: float = Field(
        0.7, gt=0, le=1, description="under-used: at least this share of the hours are below it"
    )
    target_util_pct: float = Field(
        70.0, gt=0, le=100, description="scale down to run the p95 hour at this utilisation (%)"
    )
    min_hours: int = Field(
        24, ge=1, description="no under-used/saturated finding with fewer hours of samples"
    )
    gpu_multiple: dict[str, Annotated[int, Field(ge=1)]] = Field(
        default_factory=dict,
        description="deployment -> GPUs per replica (tensor parallel size); "
        "suggested GPU counts are rounded up to a multiple of it (default 1)",
    )
    saturation_util_pct: float = Field(
        90.0, gt=0, le=100, description="saturated: p95 hourly utilisation at least this (%)"
    )
    saturation_memory_ratio: float = Field(
        0.9, gt=0, le=1, description="and busy-hour memory used / total at least this"
    )
    latency_growth: float = Field(
        1.5, gt=1, description="or busy-hour latency per output token this many times the rest's"
    )
    capacity_gain: float = Field(
        1.6, gt=1, description="throughput of the quantised variant relative to the current one"
    )
    quantization: str = Field("fp8", min_length=1, description="the suggested quantisation")
    quantized_variants: dict[str, str] = Field(
        default_factory=dict,
        description="deployment -> the quantised model to deploy instead (optional)",
    )
    quantized_pattern: str = Field(
        r"(?i)fp8|int8|int4|w8a8|w4a16|awq|gptq",
        description="deployments whose name matches this are already quantised: not suggested",
    )
    api_equivalents: dict[str, list[str]] = Field(
        default_factory=dict,
        description='deployment -> API models ("provider/model") it could be replaced with',
    )
    default_api_equivalents: list[str] = Field(
        default_factory=lambda: ["openai/gpt-4o-mini"],
        description="what a deployment not in api_equivalents is compared with ([]: nothing)",
    )
    min_monthly_savings_usd: float = Field(
        10.0, ge=0, description="no finding saving less than this per month"
    )

    @field_validator("quantized_pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a regular expression: {exc}") from None
        return value


@dataclass
class _Deployment:
    """What the window says about one deployment."""

    name: str
    gpus: int
    gpu_hour_usd: float
    hours_up: int = 0
    up_hours: list[int] = field(default_factory=list)  # epoch hours up (samples or settled)
    requests: int = 0  # served in the window (spend_hourly)
    util: np.ndarray = field(default_factory=lambda: np.zeros(0))  # hourly, in hour order
    memory: np.ndarray = field(default_factory=lambda: np.zeros(0))  # NaN: not reported
    hours: list[datetime] = field(default_factory=list)
    gpus_seen: int = 0


def _round_up(n: float, multiple: int) -> int:
    """``n`` rounded up to a whole multiple of ``multiple``, at least one multiple."""
    units = max(1, math.ceil(n / multiple - 1e-9))
    return units * multiple


@register
class Gpu(Analyzer):
    name: ClassVar[str] = "gpu"
    description: ClassVar[str] = (
        "self-hosted GPU deployments: under-used (scale down), saturated (quantise), "
        "dearer per token than an API model"
    )
    Options: ClassVar[type[Options]] = GpuOptions
    min_evidence_requests: ClassVar[int] = 0

    def run(self, ctx: Context) -> list[Finding]:
        opts = self.options
        assert isinstance(opts, GpuOptions)
        ctx.write(refresh)
        deployments = self._deployments(ctx)
        findings: list[Finding] = []
        for d in deployments.values():
            if len(d.util) >= opts.min_hours:
                findings.extend(self._underused(ctx, d))
                findings.extend(self._saturated(ctx, d))
        findings.extend(self._api_cheaper(ctx, deployments))
        return [f for f in findings if f.monthly_savings_usd >= opts.min_monthly_savings_usd]

    # -- data ---------------------------------------------------------------------------------

    def _deployments(self, ctx: Context) -> dict[str, _Deployment]:
        """Priced deployments seen in the window: GPUs, price, hours up, hourly utilisation."""
        params = {"start": ctx.window.start, "end": ctx.window.end}
        settled = {
            name: (int(gpus), float(rate))
            for name, gpus, rate in ctx.con.execute(
                "SELECT deployment, arg_max(gpus, hour), arg_max(gpu_hour_usd, hour) "
                "FROM deployment_hours GROUP BY deployment"
            ).fetchall()
        }
        out: dict[str, _Deployment] = {}
        up = ctx.con.execute(
            """
            SELECT deployment, list(epoch(hour)::BIGINT // 3600 ORDER BY hour) FROM (
                SELECT DISTINCT deployment, hour FROM gpu_hourly
                WHERE hour >= $start AND hour < $end
                UNION
                SELECT deployment, hour FROM deployment_hours
                WHERE hour >= $start AND hour < $end
            ) GROUP BY deployment
            """,
            params,
        ).fetchall()
        served = dict(
            ctx.con.execute(
                "SELECT deployment, sum(requests)::BIGINT FROM spend_hourly "
                "WHERE deployment IS NOT NULL AND hour >= $start AND hour < $end "
                "GROUP BY deployment",
                params,
            ).fetchall()
        )
        for name, up_hours in up:
            configured = ctx.prices.deployments.get(name)
            if configured is not None:
                gpus, rate = configured.gpus, configured.gpu_hour_usd
            elif name in settled:
                gpus, rate = settled[name]
            else:
                log.debug("gpu: deployment %s has no GPU price; skipped", name)
                continue
            out[name] = _Deployment(
                name,
                gpus,
                rate,
                len(up_hours),
                [int(h) for h in up_hours],
                int(served.get(name) or 0),
            )
        rows = ctx.con.execute(
            """
            SELECT deployment, hour, avg(utilization_sum / samples) AS util,
                   sum(memory_ratio_sum) / nullif(sum(memory_samples), 0) AS memory,
                   count(*) AS gpus_seen
            FROM gpu_hourly
            WHERE hour >= $start AND hour < $end
            GROUP BY ALL
            ORDER BY deployment, hour
            """,
            params,
        ).fetchall()
        by_name: dict[str, list[tuple[Any, ...]]] = {}
        for row in rows:
            by_name.setdefault(row[0], []).append(row)
        for name, series in by_name.items():
            if name not in out:
                continue
            d = out[name]
            d.hours = [r[1] for r in series]
            d.util = np.array([float(r[2]) for r in series])
            d.memory = np.array([np.nan if r[3] is None else float(r[3]) for r in series])
            d.gpus_seen = max(int(r[4]) for r in series)
        return out

    def _latency(self, ctx: Context, name: str) -> dict[datetime, tuple[float, float]]:
        """Hour -> (latency_ms_sum, output_tokens) of the deployment's requests (spend_hourly)."""
        rows = ctx.con.execute(
            """
            SELECT hour, sum(latency_ms_sum), sum(output_tokens)
            FROM spend_hourly
            WHERE deployment = $d AND hour >= $start AND hour < $end
            GROUP BY hour
            """,
            {"d": name, "start": ctx.window.start, "end": ctx.window.end},
        ).fetchall()
        return {hour: (float(lat or 0), float(tokens or 0)) for hour, lat, tokens in rows}

    @staticmethod
    def _per_hour_up(ctx: Context, d: _Deployment, usd_per_hour: float) -> Projection:
        """``usd_per_hour`` saved in every hour the deployment was up, projected to a month
        over the span from its first to its last hour up."""
        return ctx.project(ctx.hours((h, usd_per_hour) for h in d.up_hours))

    # -- (a) under-used ----------------------------------------------------------------------

    def _underused(self, ctx: Context, d: _Deployment) -> list[Finding]:
        opts = self.options
        assert isinstance(opts, GpuOptions)
        n = len(d.util)
        below = int(np.sum(d.util < opts.underused_util_pct))
        share = below / n
        if share < opts.underused_hours_share:
            return []
        p95 = float(np.percentile(d.util, 95))
        multiple = opts.gpu_multiple.get(d.name, 1)
        needed = _round_up(d.gpus * p95 / opts.target_util_pct, multiple)
        if needed >= d.gpus:
            return []
        freed = d.gpus - needed
        projection = self._per_hour_up(ctx, d, freed * d.gpu_hour_usd)
        confidence = round(min(0.9, 0.5 + 0.4 * share * min(1.0, n / 168)), 3)
        return [
            self.finding(
                ctx,
                kind="gpu.underused",
                scope={"deployment": d.name},
                title=(
                    f"{d.name}: {d.gpus} GPUs below {opts.underused_util_pct:g}% utilisation "
                    f"{share:.0%} of the time; {needed} would carry its p95 hour at "
                    f"{opts.target_util_pct:g}%"
                ),
                evidence={
                    "gpus": d.gpus,
                    "gpus_needed": needed,
                    "gpus_seen_in_samples": d.gpus_seen,
                    "gpu_hour_usd": d.gpu_hour_usd,
                    "mean_utilization_pct": float(np.mean(d.util)),
                    "p95_utilization_pct": p95,
                    "max_utilization_pct": float(np.max(d.util)),
                    "p95_utilization_after_pct": d.gpus * p95 / needed,
                    "hours_sampled": n,
                    "hours_below_threshold": below,
                    "threshold_pct": opts.underused_util_pct,
                    "target_util_pct": opts.target_util_pct,
                    "hours_up": d.hours_up,
                },
                projection=projection,
                requests=d.requests,
                savings_method=(
                    "(GPUs - ceil(GPUs x p95 hourly utilisation / target utilisation)) x "
                    "GPU-hour price in each hour up, projected to a month over the span from "
                    "its first to its last hour up"
                ),
                confidence=confidence,
                risk="medium",
                action=ActionSpec("vllm.scale", {"deployment": d.name, "gpus": needed}),
            )
        ]

    # -- (b) saturated -----------------------------------------------------------------------

    def _saturated(self, ctx: Context, d: _Deployment) -> list[Finding]:
        opts = self.options
        assert isinstance(opts, GpuOptions)
        if re.search(opts.quantized_pattern, d.name):
            return []
        p95 = float(np.percentile(d.util, 95))
        if p95 < opts.saturation_util_pct:
            return []
        busy = d.util >= opts.saturation_util_pct
        mem = d.memory[busy]
        mem = mem[~np.isnan(mem)]
        busy_memory = float(np.mean(mem)) if len(mem) else None
        ratio = None
        latency = self._latency(ctx, d.name)
        if latency:
            sums = {True: [0.0, 0.0], False: [0.0, 0.0]}
            for hour, is_busy in zip(d.hours, busy.tolist(), strict=True):
                lat, tokens = latency.get(hour, (0.0, 0.0))
                if lat > 0 and tokens > 0:
                    sums[is_busy][0] += lat
                    sums[is_busy][1] += tokens
            if sums[True][1] > 0 and sums[False][1] > 0 and sums[False][0] > 0:
                ratio = (sums[True][0] / sums[True][1]) / (sums[False][0] / sums[False][1])
        memory_high = busy_memory is not None and busy_memory >= opts.saturation_memory_ratio
        latency_high = ratio is not None and ratio >= opts.latency_growth
        if not (memory_high or latency_high):
            return []
        multiple = opts.gpu_multiple.get(d.name, 1)
        needed = _round_up(d.gpus / opts.capacity_gain, multiple)
        freed = d.gpus - needed
        if freed < 1:
            return []
        projection = self._per_hour_up(ctx, d, freed * d.gpu_hour_usd)
        variant = opts.quantized_variants.get(d.name)
        signals = [s for s, on in (("memory", memory_high), ("latency", latency_high)) if on]
        return [
            self.finding(
                ctx,
                kind="gpu.saturated",
                scope={"deployment": d.name},
                title=(
                    f"{d.name}: saturated (p95 utilisation {p95:.0f}%, {' and '.join(signals)} "
                    f"high); an {opts.quantization.upper()} variant would serve it on {needed} "
                    f"of {d.gpus} GPUs"
                ),
                evidence={
                    "gpus": d.gpus,
                    "gpus_needed": needed,
                    "gpu_hour_usd": d.gpu_hour_usd,
                    "p95_utilization_pct": p95,
                    "mean_utilization_pct": float(np.mean(d.util)),
                    "busy_hours": int(np.sum(busy)),
                    "hours_sampled": len(d.util),
                    "busy_memory_ratio": busy_memory,
                    "busy_latency_ratio": ratio,
                    "signals": signals,
                    "capacity_gain": opts.capacity_gain,
                    "hours_up": d.hours_up,
                    "proxy": (
                        "KV-cache usage, preemptions and queue depth are not in gpu_samples: "
                        "busy-hour memory use and latency per output token stand in for them"
                    ),
                },
                projection=projection,
                requests=d.requests,
                savings_method=(
                    f"GPUs freed by a quantised variant with {opts.capacity_gain:g}x throughput "
                    "(GPUs - ceil(GPUs / gain)) x GPU-hour price in each hour up, projected to "
                    "a month over the span from its first to its last hour up"
                ),
                confidence=0.6 if len(signals) == 2 else 0.5,
                risk="medium",
                action=ActionSpec(
                    "vllm.quantize",
                    {
                        "deployment": d.name,
                        "quantization": opts.quantization,
                        "variant": variant,
                        "gpus": needed,
                    },
                ),
            )
        ]

    # -- (c) an API is cheaper ---------------------------------------------------------------

    def _api_cheaper(self, ctx: Context, deployments: dict[str, _Deployment]) -> list[Finding]:
        opts = self.options
        assert isinstance(opts, GpuOptions)
        start, end = ctx.window.start, ctx.window.end
        settled = ctx.con.execute(
            """
            SELECT deployment, count(*), sum(cost_usd), sum(tokens),
                   count(*) FILTER (WHERE tokens = 0)
            FROM deployment_hours WHERE hour >= $start AND hour < $end
            GROUP BY deployment HAVING sum(tokens) > 0
            """,
            {"start": start, "end": end},
        ).fetchall()
        findings = []
        for name, hours, cost, tokens, idle_hours in settled:
            explicit = name in opts.api_equivalents
            candidates = opts.api_equivalents.get(name, opts.default_api_equivalents)
            if not candidates:
                continue
            mix = ctx.con.execute(
                """
                SELECT sum(input_tokens), sum(cache_read_tokens), sum(output_tokens),
                       arg_max(model, input_tokens + output_tokens)
                FROM (SELECT model, sum(input_tokens) AS input_tokens,
                             sum(cache_read_tokens) AS cache_read_tokens,
                             sum(output_tokens) AS output_tokens
                      FROM spend_hourly
                      WHERE deployment = $d AND hour >= $start AND hour < $end
                      GROUP BY model)
                """,
                {"d": name, "start": start, "end": end},
            ).fetchone()
            if mix is None or (not mix[0] and not mix[2]):
                continue
            inp, cached, out = float(mix[0] or 0), float(mix[1] or 0), float(mix[2] or 0)
            served_model = mix[3]
            self_per_m = cost_per_million_tokens(ctx.con, name, start, end)
            if self_per_m is None:
                continue
            quotes: dict[str, float] = {}
            for candidate in candidates:
                per_m = _api_per_million(ctx.prices, candidate, end, inp, cached, out)
                if per_m is None:
                    log.warning("gpu: no price for API equivalent %r of %s", candidate, name)
                    continue
                quotes[candidate] = per_m
            if not quotes:
                continue
            best = min(quotes, key=lambda k: (quotes[k], k))
            api_per_m = quotes[best]
            if api_per_m >= self_per_m:
                continue
            per_hour = ctx.con.execute(
                "SELECT epoch(hour)::BIGINT // 3600, cost_usd, tokens FROM deployment_hours "
                "WHERE deployment = $d AND hour >= $start AND hour < $end",
                {"d": name, "start": start, "end": end},
            ).fetchall()
            projection = ctx.project(
                ctx.hours(
                    (int(h), float(c) - api_per_m * float(t) / PER_MILLION) for h, c, t in per_hour
                )
            )
            hour_cost = float(cost) / hours
            tokens_per_hour = float(tokens) / hours
            break_even_tph = hour_cost / (api_per_m / PER_MILLION) if api_per_m > 0 else None
            d = deployments.get(name)
            mean_util = float(np.mean(d.util)) if d is not None and len(d.util) else None
            break_even_util = (
                mean_util * break_even_tph / tokens_per_hour
                if mean_util is not None and break_even_tph is not None and tokens_per_hour > 0
                else None
            )
            provider, _, model = best.rpartition("/")
            findings.append(
                self.finding(
                    ctx,
                    kind="gpu.api_cheaper",
                    scope={"deployment": name},
                    title=(
                        f"{name}: ${self_per_m:,.2f} per 1M tokens self-hosted vs "
                        f"${api_per_m:,.2f} on {best} at the same token mix"
                    ),
                    evidence={
                        "self_hosted_usd_per_mtok": self_per_m,
                        "api_usd_per_mtok": quotes,
                        "cheapest_api": best,
                        "self_hosted_cost_usd": float(cost),
                        "api_cost_usd": api_per_m * float(tokens) / PER_MILLION,
                        "tokens": int(tokens),
                        "input_tokens": int(inp),
                        "cache_read_tokens": int(cached),
                        "output_tokens": int(out),
                        "served_model": served_model,
                        "hours_settled": int(hours),
                        "idle_hours": int(idle_hours),
                        "tokens_per_hour": tokens_per_hour,
                        "break_even_tokens_per_hour": break_even_tph,
                        "mean_utilization_pct": mean_util,
                        "break_even_utilization_pct": break_even_util,
                        "compared_with": "api_equivalents" if explicit else "default",
                    },
                    projection=projection,
                    requests=d.requests if d is not None else 0,
                    savings_method=(
                        "(self-hosted $/1M tokens over its settled GPU-hours, idle included - "
                        "cheapest API equivalent's $/1M at the same input/cache-read/output "
                        "mix, list price) x tokens served, per settled hour, projected to a "
                        "month over the span of its settled hours"
                    ),
                    confidence=0.6 if explicit else 0.4,
                    risk="medium" if explicit else "high",
                    action=ActionSpec(
                        "gateway.route",
                        {
                            "deployment": name,
                            "model": served_model,
                            "to_provider": provider or None,
                            "to_model": model,
                        },
                    ),
                )
            )
        return findings


def _api_per_million(
    prices: PriceBook, candidate: str, at: datetime, inp: float, cached: float, out: float
) -> float | None:
    """$/1M tokens of ``candidate`` ("provider/model") for this input/cache-read/output mix."""
    provider, _, model = candidate.partition("/")
    if not model:
        provider, model = "", candidate
    key = prices.resolve(provider or None, model, model)
    price = prices.price_at(key, at.date()) if key else None
    if price is None or inp + out <= 0:
        return None
    cached_rate = (
        price.input_per_mtok if price.cached_input_per_mtok is None else price.cached_input_per_mtok
    )
    cost = (
        max(inp - cached, 0.0) * price.input_per_mtok
        + cached * cached_rate
        + out * price.output_per_mtok
    )
    return cost / (inp + out)
