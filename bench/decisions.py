"""Decision quality: does each analyzer find the waste a scenario holds, at its size?

Each scenario is days of synthetic traffic (native usage events, and GPU samples for
the self-hosted ones) ending at the last whole hour, with **one kind of waste
injected at a known size**, or none (a **negative control**). Every scenario knows
its **oracle**: the monthly saving of removing that waste, computed here from the
generated events themselves by plain arithmetic that states the waste's definition,
with the shipped prices (``PriceBook.shipped()``: genai-prices, the events priced
with ``PriceBook.price`` as ingest prices them, what-if copies priced the same way)
— never with the analyzers' code. Monthly = per day of the scenario's traffic ×
30.4375.

The waste scenarios (each also as a deployment only 7 days old, ``NAME-7d``):

- ``repeats`` — a FAQ feature whose prompts repeat. Oracle: the cost of the requests
  a response cache with a 1-hour TTL would have served. Such a cache stores an
  answer when the model answered it (ok) and serves the same tenant, app, feature,
  model and prompt until an hour after it stored it (a served repeat does not
  extend the entry).
- ``prefix-ttl`` — a feature on claude-sonnet-4-5 whose prompts all start with the
  same 2,048-token system prompt, at a rate that leaves gaps above Anthropic's
  5-minute cache TTL at night. Oracle: prompt caching with its breakpoint after the
  shared prefix: a request within 5 minutes of the previous one reads the prefix
  from the cache, any other writes it (at the cache-write price); the unique rest
  of the prompt is neither read nor written. Saving = the actual cost − the cost of
  the same events with those cache reads and writes.
- ``routing`` — a feature sending 90 % of its traffic to gpt-4o (mean quality 0.91)
  and 10 % to gpt-4o-mini (mean 0.89, above the 0.85 bar). Oracle: the gpt-4o
  requests' cost − the same tokens on gpt-4o-mini.
- ``batch`` — a nightly job labelled ``latency_class = batch`` but billed at
  synchronous prices. Oracle: its cost − the same events billed through the batch
  API (``billing_mode = batch``).
- ``gpu-idle`` — 8 H100s (at $2.49 a GPU-hour) whose busiest hour uses 20 % of them.
  Oracle: GPUs freed = 8 − ⌈8 × the busiest hour's mean utilisation / 70 %⌉, × the
  GPU-hour price × 24 hours a day.
- ``gpu-saturated`` — 4 H100s at 96 % in the busy hours, memory 93 % used. Oracle:
  an FP8 variant assumed to give 1.6× the throughput (the scenario's premise) serves
  the same load at the same busiest-hour utilisation on ⌈4 × that utilisation /
  1.6⌉ GPUs; the rest are freed, priced as above.
- ``retries`` — a feature whose upstream times out on 15 % of first attempts, each
  failure retried within a minute (a retry fails again 30 % of the time, at most 3
  attempts). Oracle: what the failed attempts cost (a successful first attempt
  would not have bought them).
- ``context-bloat`` — a RAG feature whose prompts grew by 6,000 tokens 5 days before
  the end (a retrieval change). Oracle: the cost of those 6,000 extra input tokens
  per request since then − the same requests without them, per day since the change.

Negative controls (oracle $0; every finding above $1/month is false): ``clean``
(background traffic only), ``cheap-misses-bar`` (a feature's gpt-4o-mini share
scores 0.66 on average, every answer below the 0.85 bar) and ``short-burst`` (two
hours at 600 requests an hour of legitimate interactive traffic, ending 6 hours
before the end).

Every scenario carries the same background: four tenants' apps and features on
gpt-4o, gpt-4o-mini, gpt-4.1, gpt-4.1-mini and claude-sonnet-4-5 with a daily and
weekly rhythm, unique prompts and prompt blocks, 0.3 % errors that nobody retries,
one model per feature.

The harness: one embedded broker for the whole run; per scenario its own topics,
consumer group, store and config (defaults, except: ``analyzers.caching.backfill_hours
= 0``, so that the caching analyzer's first run covers the replayed history as it
covers live traffic, and the deployments' GPU prices), a ``finopsd run`` subprocess,
``finopsd replay --format native`` of the scenario's events (GPU samples produced to
the gpu topic), a wait until the group's committed offsets reach the end of every
partition, SIGTERM (the daemon settles the self-hosted hours as it stops),
``finopsd stats --json`` (every event stored, no dead letter), then ``finopsd analyze
--json``. FINOPSD_* variables are not passed on: this measures the defaults.

Per scenario it prints the oracle, the saving found by the findings of the kinds
that measure that waste in its scope, their ratio, the findings' interval
(``monthly_savings_low_usd`` .. ``_high_usd``) and whether it holds the oracle, and
whether they are provisional; other findings above $1/month in a waste scenario are
listed under it; for a control, its findings above $1/month (false findings). Goal:
every waste scenario within ±15 % of its oracle, no finding above $1/month on a
control.

    python bench/decisions.py [--only NAME[,NAME]] [--json] [--keep DIR] [--list]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

REPO = Path(__file__).resolve().parents[1]
DAYS_PER_MONTH = 30.4375
"""Average days in a month: a monthly figure is a daily rate times this."""
TOLERANCE = 0.15
"""Goal: a waste scenario's saving found within ±15 % of its oracle."""
CONTROL_LIMIT_USD = 1.0
"""Goal: no finding above $1/month on a negative control."""
SEED = 20261203
BLOCK_TOKENS = 512
"""Tokens per ``prefix_hashes`` block (``analyzers.caching.block_tokens``)."""
RESPONSE_TTL_S = 3600.0
"""The response cache's TTL (``analyzers.caching.response_ttl_s``)."""
ANTHROPIC_TTL_S = 300.0
"""Anthropic's prompt cache forgets a prefix unused for 5 minutes; every use refreshes it."""
H100_USD = 2.49
"""The GPU-hour price the self-hosted scenarios configure."""
TARGET_UTIL = 0.70
"""Right-sizing rule: the busiest hour at 70 % of the GPUs kept."""
FP8_GAIN = 1.6
"""The saturated scenario's premise: an FP8 variant serves 1.6x the throughput."""
QUALITY_BAR = 0.85
"""The quality a feature's answers must reach (``analyzers.routing.quality_target``)."""


# -- traffic ------------------------------------------------------------------------------


def iso(t: datetime) -> str:
    """``t`` as the RFC 3339 string every event carries (UTC, milliseconds, ``Z``)."""
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def parse_ts(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def diurnal(hour: datetime) -> float:
    """Relative request rate in ``hour`` (UTC): 0.3 at night, 1.0 at 14:00 on weekdays;
    weekends 0.6 of that."""
    h = hour.hour + 0.5
    day = max(0.0, math.sin(math.pi * (h - 7) / 14)) if 7 <= h <= 21 else 0.0
    rate = 0.3 + 0.7 * day
    return rate * (0.6 if hour.weekday() >= 5 else 1.0)


def hours(start: datetime, end: datetime) -> Iterable[datetime]:
    t = start
    while t < end:
        yield t
        t += timedelta(hours=1)


@dataclass(frozen=True)
class Stream:
    """One feature's traffic on one model: who sends it and how big its requests are."""

    tenant: str
    team: str
    app: str
    feature: str
    provider: str | None
    model: str
    peak_per_hour: float
    input_tokens: int
    output_tokens: int
    error_rate: float = 0.003
    deployment: str | None = None


BACKGROUND = (
    Stream("acme", "cx", "support-bot", "answer", "openai", "gpt-4o", 20, 1600, 220),
    Stream("acme", "cx", "support-bot", "classify", "openai", "gpt-4o-mini", 20, 900, 10),
    Stream("acme", "cx", "support-bot", "summarize-ticket", "openai", "gpt-4o-mini", 20, 2200, 180),
    Stream("acme", "cx", "support-bot", "triage", "openai", "gpt-4.1-mini", 20, 1400, 60),
    Stream("globex", "search", "docs", "search", "anthropic", "claude-sonnet-4-5", 5, 2500, 300),
    Stream("globex", "search", "docs", "summarize", "openai", "gpt-4o", 4, 3000, 400),
    Stream("initech", "dev", "code-assist", "complete", "openai", "gpt-4.1", 6, 1800, 150),
)
"""Every scenario's background: one model per feature, unique prompts, 0.3 % errors."""


class Gen:
    """A scenario's deterministic generator: its random state and its events."""

    def __init__(self, name: str, start: datetime, end: datetime) -> None:
        self.name = name
        self.start, self.end = start, end
        self.rng = np.random.default_rng([SEED, zlib.crc32(name.encode())])
        self.n = 0
        self.events: list[dict[str, Any]] = []
        self.gpu: list[dict[str, Any]] = []

    def arrivals(
        self,
        peak_per_hour: float,
        profile: Callable[[datetime], float] = diurnal,
        start: datetime | None = None,
        end: datetime | None = None,
    ) -> list[datetime]:
        """Poisson arrivals at ``peak_per_hour`` × ``profile(hour)``, in time order."""
        out: list[datetime] = []
        for hour in hours(start or self.start, end or self.end):
            n = int(self.rng.poisson(peak_per_hour * profile(hour)))
            offsets = np.sort(self.rng.uniform(0.0, 3600.0, n))
            out += [hour + timedelta(seconds=float(s)) for s in offsets]
        return out

    def tokens(self, mean: int, sigma: float = 0.35) -> int:
        """A request size around ``mean`` (log-normal, at least 1)."""
        return max(1, round(float(self.rng.lognormal(math.log(mean) - sigma**2 / 2, sigma))))

    def blocks(self, n: int) -> list[int]:
        """``n`` fresh prompt-block hashes (signed 64-bit)."""
        return [int(x) for x in self.rng.integers(-(2**63), 2**63 - 1, n, dtype=np.int64)]

    def prompt(self) -> str:
        return f"{int(self.rng.integers(0, 2**63)):016x}"

    def event(
        self,
        s: Stream,
        ts: datetime,
        *,
        input_tokens: int | None = None,
        output_tokens: int | None = None,
        status: str | None = None,
        prompt_hash: str | None = None,
        prefix_hashes: list[int] | None = None,
        model: str | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """One native usage event of stream ``s`` at ``ts`` (unique prompt unless given)."""
        inp = input_tokens if input_tokens is not None else self.tokens(s.input_tokens)
        out = output_tokens if output_tokens is not None else self.tokens(s.output_tokens)
        if status is None:
            status = "error" if self.rng.random() < s.error_rate else "ok"
        if status == "error" and output_tokens is None:
            out = 0
        self.n += 1
        e: dict[str, Any] = {
            "event_id": f"dq-{self.name}-{self.n:07d}",
            "ts": iso(ts),
            "gen_ai.request.model": model or s.model,
            "gen_ai.response.model": model or s.model,
            "gen_ai.usage.input_tokens": inp,
            "gen_ai.usage.output_tokens": out,
            "tenant": s.tenant,
            "team": s.team,
            "app": s.app,
            "feature": s.feature,
            "latency_ms": round(30000.0 if status == "error" else 250.0 + 18.0 * out, 1),
            "ttft_ms": round(150.0 + inp / 20.0, 1),
            "status": status,
            "prompt_hash": prompt_hash or self.prompt(),
            "prefix_hashes": (
                prefix_hashes
                if prefix_hashes is not None
                else self.blocks(math.ceil(inp / BLOCK_TOKENS))
            ),
        }
        if s.provider is not None:
            e["gen_ai.provider.name"] = s.provider
        if s.deployment is not None:
            e["deployment"] = s.deployment
        e.update(extra)
        self.events.append(e)
        return e

    def stream(self, s: Stream, profile: Callable[[datetime], float] = diurnal) -> None:
        """``s``'s traffic over the scenario, every prompt unique."""
        for ts in self.arrivals(s.peak_per_hour, profile):
            self.event(s, ts)

    def background(self) -> None:
        for s in BACKGROUND:
            self.stream(s)

    def gpu_fleet(
        self,
        deployment: str,
        gpus: int,
        util: Callable[[datetime], float],
        memory_ratio: float,
        *,
        every_s: int = 600,
    ) -> None:
        """GPU samples every ``every_s`` seconds per GPU: ``util(hour)`` ± 2 points."""
        total = 80 * 2**30
        for hour in hours(self.start, self.end):
            level = util(hour)
            for k in range(3600 // every_s):
                ts = iso(hour + timedelta(seconds=k * every_s))
                noise = self.rng.normal(0.0, 2.0, gpus)
                for g in range(gpus):
                    u = float(min(100.0, max(0.0, level + noise[g])))
                    self.gpu.append(
                        {
                            "ts": ts,
                            "host": f"{deployment}-node",
                            "gpu_index": g,
                            "gpu_model": "NVIDIA H100 80GB HBM3",
                            "utilization_pct": round(u, 2),
                            "memory_used_bytes": int(total * memory_ratio),
                            "memory_total_bytes": total,
                            "power_watts": round(90.0 + 6.0 * u, 1),
                            "deployment": deployment,
                        }
                    )


# -- oracles: the waste's definition, in plain arithmetic -----------------------------------


def price_table(events: Sequence[dict[str, Any]]) -> pa.Table:
    """``events`` as the store columns ``PriceBook.price`` reads."""

    def col(key: str) -> list[Any]:
        return [e.get(key) for e in events]

    return pa.table(
        {
            "provider": pa.array(col("gen_ai.provider.name"), pa.string()),
            "response_model": pa.array(col("gen_ai.response.model"), pa.string()),
            "request_model": pa.array(col("gen_ai.request.model"), pa.string()),
            "deployment": pa.array(col("deployment"), pa.string()),
            "ts": pa.array([parse_ts(e["ts"]) for e in events], pa.timestamp("us", tz="UTC")),
            "billing_mode": pa.array([e.get("billing_mode", "standard") for e in events]),
            "input_tokens": pa.array(col("gen_ai.usage.input_tokens"), pa.int64()),
            "output_tokens": pa.array(col("gen_ai.usage.output_tokens"), pa.int64()),
            "cache_read_input_tokens": pa.array(
                col("gen_ai.usage.cache_read.input_tokens"), pa.int64()
            ),
            "cache_creation_input_tokens": pa.array(
                col("gen_ai.usage.cache_creation.input_tokens"), pa.int64()
            ),
            "gateway_cost_usd": pa.array([None] * len(events), pa.float64()),
            "cache_hit": pa.array([bool(e.get("cache_hit", False)) for e in events]),
        }
    )


def costs(book: Any, events: Sequence[dict[str, Any]]) -> np.ndarray:
    """What each event is billed (``PriceBook.price``, as ingest prices it); API models only."""
    if not events:
        return np.zeros(0)
    priced, _ = book.price(price_table(events))
    out = priced.column("cost_usd").to_numpy(zero_copy_only=False)
    if np.isnan(out.astype(float)).any():
        raise ValueError("an oracle needs every event priced; one is not")
    return out.astype(float)


def monthly(total_usd: float, days: float) -> float:
    """``total_usd`` spent over ``days`` of traffic, per month."""
    return total_usd / days * DAYS_PER_MONTH


def response_cache_hits(events: Sequence[dict[str, Any]], ttl_s: float) -> list[int]:
    """Indices of the events a response cache with ``ttl_s`` would have served.

    In time order: a request whose key (tenant, app, feature, model, prompt_hash) has
    an entry stored at most ``ttl_s`` before is served from the cache; any other is
    sent to the model, and its answer, if ok, is stored (for ``ttl_s`` from then;
    serving an entry does not extend it).
    """
    order = sorted(range(len(events)), key=lambda i: events[i]["ts"])
    stored: dict[tuple[Any, ...], float] = {}
    hits = []
    for i in order:
        e = events[i]
        key = (e.get("tenant"), e.get("app"), e.get("feature"), e["gen_ai.request.model"])
        key += (e.get("prompt_hash"),)
        t = parse_ts(e["ts"]).timestamp()
        if e.get("prompt_hash") is None:
            continue
        if key in stored and t - stored[key] <= ttl_s:
            hits.append(i)
        elif e.get("status", "ok") == "ok":
            stored[key] = t
    return hits


def with_prefix_cache(
    events: Sequence[dict[str, Any]], prefix_tokens: int, ttl_s: float
) -> list[dict[str, Any]]:
    """``events`` (one shared prefix, in any order) as prompt caching would bill them.

    In time order: a request within ``ttl_s`` of the previous one reads the
    ``prefix_tokens`` from the cache (every use refreshes it); any other writes them.
    """
    out = []
    last: float | None = None
    for e in sorted(events, key=lambda e: e["ts"]):
        t = parse_ts(e["ts"]).timestamp()
        hit = last is not None and t - last <= ttl_s
        last = t
        meter = "cache_read" if hit else "cache_creation"
        out.append({**e, f"gen_ai.usage.{meter}.input_tokens": prefix_tokens})
    return out


def hourly_utilization(samples: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Per UTC hour (its ISO prefix), the mean utilisation (%) over every sample in it."""
    sums: dict[str, list[float]] = {}
    for s in samples:
        acc = sums.setdefault(s["ts"][:13], [0.0, 0.0])
        acc[0] += s["utilization_pct"]
        acc[1] += 1
    return {h: total / n for h, (total, n) in sums.items()}


def gpus_freed(gpus: int, busiest_util_pct: float, capacity: float, target: float) -> int:
    """GPUs not needed: ``gpus`` − ⌈gpus × busiest utilisation / capacity / target⌉ (≥ 1 kept)."""
    needed = max(1, math.ceil(gpus * busiest_util_pct / 100.0 / capacity / target - 1e-9))
    return max(0, gpus - needed)


# -- scenarios ----------------------------------------------------------------------------


@dataclass
class Scenario:
    """Traffic with one kind of waste of known size (or none), and the findings that measure it."""

    name: str
    waste: str
    days: float
    kinds: tuple[str, ...]
    """Finding kinds that measure this waste (none: a negative control)."""
    scope: dict[str, str]
    """What a matching finding's scope holds."""
    oracle_usd: float
    oracle_method: str
    events: list[dict[str, Any]]
    gpu: list[dict[str, Any]] = field(default_factory=list)
    config: str = ""
    """Extra config.toml (the deployments' prices)."""

    @property
    def control(self) -> bool:
        return not self.kinds


def _repeats(g: Gen, book: Any, days: float) -> Scenario:
    g.background()
    faq = Stream("acme", "cx", "support-bot", "faq", "openai", "gpt-4o", 50, 2500, 250)
    popular = []
    for _ in range(12):
        n = g.tokens(faq.input_tokens)
        popular.append((g.prompt(), n, g.blocks(math.ceil(n / BLOCK_TOKENS))))
    recent: list[tuple[datetime, dict[str, Any]]] = []
    for ts in g.arrivals(faq.peak_per_hour):
        recent = [(t, e) for t, e in recent if ts - t <= timedelta(minutes=50)]
        draw = g.rng.random()
        if draw < 0.15:  # a templated question, asked all day
            h, n, blocks = popular[int(g.rng.integers(len(popular)))]
            g.event(faq, ts, prompt_hash=h, input_tokens=n, prefix_hashes=blocks)
        elif draw < 0.45 and recent:  # the same question again, within 50 minutes
            _, e = recent[int(g.rng.integers(len(recent)))]
            g.event(
                faq,
                ts,
                prompt_hash=e["prompt_hash"],
                input_tokens=e["gen_ai.usage.input_tokens"],
                prefix_hashes=e["prefix_hashes"],
            )
        else:
            recent.append((ts, g.event(faq, ts)))
    served = response_cache_hits(g.events, RESPONSE_TTL_S)
    price = costs(book, [g.events[i] for i in served])
    return Scenario(
        g.name,
        "repeated prompts",
        days,
        ("caching.response_repeats",),
        {"tenant": "acme", "app": "support-bot", "feature": "faq"},
        monthly(float(price.sum()), days),
        f"cost of the {len(served):,} requests a response cache (TTL {RESPONSE_TTL_S:g}s from "
        "the answer it stored) would have served, per day x 30.4375",
        g.events,
    )


def _prefix_ttl(g: Gen, book: Any, days: float) -> Scenario:
    g.background()
    ask = Stream("globex", "search", "docs", "ask", "anthropic", "claude-sonnet-4-5", 60, 0, 300)
    shared = g.blocks(4)
    prefix_tokens = len(shared) * BLOCK_TOKENS
    mine = []
    for ts in g.arrivals(ask.peak_per_hour):
        tail = int(g.rng.integers(300, 1400))
        mine.append(
            g.event(
                ask,
                ts,
                input_tokens=prefix_tokens + tail,
                prefix_hashes=shared + g.blocks(math.ceil(tail / BLOCK_TOKENS)),
            )
        )
    cached = with_prefix_cache(mine, prefix_tokens, ANTHROPIC_TTL_S)
    saved = float(costs(book, mine).sum() - costs(book, cached).sum())
    reads = sum(1 for e in cached if "gen_ai.usage.cache_read.input_tokens" in e)
    return Scenario(
        g.name,
        "shared prefix, 5-min TTL",
        days,
        ("caching.prompt_prefix",),
        {"provider": "anthropic", "model": "claude-sonnet-4-5"},
        monthly(saved, days),
        f"cost - cost with a cache breakpoint after the shared {prefix_tokens:,}-token prefix "
        f"({reads:,} reads within {ANTHROPIC_TTL_S:g}s of the previous use, "
        f"{len(cached) - reads:,} writes), per day x 30.4375",
        g.events,
    )


def _quality(g: Gen, mean: float, sd: float, top: float) -> float:
    return round(float(min(top, max(0.0, g.rng.normal(mean, sd)))), 3)


def _routing_feature(g: Gen, cheap_mean: float, cheap_top: float) -> list[dict[str, Any]]:
    """initech/reports/summarize: 90 % on gpt-4o (quality 0.91), 10 % on gpt-4o-mini."""
    s = Stream("initech", "dev", "reports", "summarize", "openai", "gpt-4o", 40, 2000, 300)
    expensive = []
    for ts in g.arrivals(s.peak_per_hour):
        if g.rng.random() < 0.10:
            q = _quality(g, cheap_mean, 0.05, cheap_top)
            g.event(s, ts, model="gpt-4o-mini", quality_score=q)
        else:
            expensive.append(g.event(s, ts, quality_score=_quality(g, 0.91, 0.04, 1.0)))
    return expensive


def _routing(g: Gen, book: Any, days: float) -> Scenario:
    g.background()
    expensive = _routing_feature(g, 0.89, 1.0)
    cheaper = [
        {**e, "gen_ai.request.model": "gpt-4o-mini", "gen_ai.response.model": "gpt-4o-mini"}
        for e in expensive
    ]
    saved = float(costs(book, expensive).sum() - costs(book, cheaper).sum())
    return Scenario(
        g.name,
        "cheaper model meets bar",
        days,
        ("routing.model_mix",),
        {"tenant": "initech", "app": "reports", "feature": "summarize", "model": "gpt-4o"},
        monthly(saved, days),
        f"cost of the {len(expensive):,} gpt-4o requests - the same tokens on gpt-4o-mini "
        f"(its answers score 0.89 >= {QUALITY_BAR}), per day x 30.4375",
        g.events,
    )


def _nightly(hour: datetime) -> float:
    return 1.0 if 1 <= hour.hour < 4 else 0.0


def _batch(g: Gen, book: Any, days: float) -> Scenario:
    g.background()
    job = Stream("acme", "data", "analytics", "nightly-report", "openai", "gpt-4o", 200, 3000, 600)
    mine = [g.event(job, ts, latency_class="batch") for ts in g.arrivals(200, _nightly)]
    as_batch = [{**e, "billing_mode": "batch"} for e in mine]
    saved = float(costs(book, mine).sum() - costs(book, as_batch).sum())
    return Scenario(
        g.name,
        "latency-tolerant, sync",
        days,
        ("batch.latency_tolerant",),
        {"tenant": "acme", "app": "analytics", "feature": "nightly-report"},
        monthly(saved, days),
        f"cost of the {len(mine):,} batch-labelled requests - the same billed through the "
        "batch API, per day x 30.4375",
        g.events,
    )


def _deployment_config(name: str, gpus: int) -> str:
    return (
        f"[pricing]\ngpu_hour_usd = {{ H100 = {H100_USD} }}\n"
        f'[[pricing.deployments]]\nname = "{name}"\ngpu_type = "H100"\ngpus = {gpus}\n'
    )


def _gpu_idle(g: Gen, book: Any, days: float) -> Scenario:
    g.background()
    name, gpus = "llama-70b", 8

    def busy(hour: datetime) -> bool:
        return hour.weekday() < 5 and 9 <= hour.hour < 17

    def util(hour: datetime) -> float:
        return 19.0 if busy(hour) else (6.0 if hour.weekday() >= 5 else 4.0)

    g.gpu_fleet(name, gpus, util, 0.9)
    chat = Stream(
        "acme", "it", "internal-chat", "chat", None, "llama-3.3-70b-instruct", 40, 1500, 300
    )
    chat = replace(chat, deployment=name)
    g.stream(chat, lambda h: 1.0 if busy(h) else 0.2)
    busiest = max(hourly_utilization(g.gpu).values())
    freed = gpus_freed(gpus, busiest, 1.0, TARGET_UTIL)
    return Scenario(
        g.name,
        "idle GPUs",
        days,
        ("gpu.underused",),
        {"deployment": name},
        freed * H100_USD * 24 * DAYS_PER_MONTH,
        f"{freed} of {gpus} GPUs freed (busiest hour {busiest:.1f}% on {gpus}, kept at "
        f"<= {TARGET_UTIL:.0%}) x ${H100_USD}/GPU-hour x 24 h x 30.4375",
        g.events,
        g.gpu,
        config=_deployment_config(name, gpus),
    )


def _gpu_saturated(g: Gen, book: Any, days: float) -> Scenario:
    g.background()
    name, gpus = "qwen-32b", 4

    def busy(hour: datetime) -> bool:
        return 8 <= hour.hour < 22

    g.gpu_fleet(name, gpus, lambda h: 96.0 if busy(h) else 72.0, 0.93)
    chat = Stream(
        "globex", "search", "docs", "rag-answer", None, "qwen2.5-32b-instruct", 30, 4000, 400
    )
    chat = replace(chat, deployment=name)
    for ts in g.arrivals(chat.peak_per_hour, lambda h: 1.0 if busy(h) else 0.5):
        out = g.tokens(chat.output_tokens)
        per_token = 60.0 if busy(ts.replace(minute=0, second=0, microsecond=0)) else 33.0
        g.event(chat, ts, output_tokens=out, latency_ms=round(200.0 + per_token * out, 1))
    busiest = max(hourly_utilization(g.gpu).values())
    freed = gpus_freed(gpus, busiest, FP8_GAIN, 1.0)
    return Scenario(
        g.name,
        "saturated GPUs",
        days,
        ("gpu.saturated",),
        {"deployment": name},
        freed * H100_USD * 24 * DAYS_PER_MONTH,
        f"{freed} of {gpus} GPUs freed by an FP8 variant at {FP8_GAIN}x throughput serving the "
        f"busiest hour ({busiest:.1f}%) as today x ${H100_USD}/GPU-hour x 24 h x 30.4375",
        g.events,
        g.gpu,
        config=_deployment_config(name, gpus),
    )


def _retries(g: Gen, book: Any, days: float) -> Scenario:
    g.background()
    review = Stream("initech", "dev", "code-assist", "review", "openai", "gpt-4o", 45, 6000, 400)
    failed = []
    for ts in g.arrivals(review.peak_per_hour):
        inp, out = g.tokens(review.input_tokens), g.tokens(review.output_tokens)
        prompt, blocks = g.prompt(), g.blocks(math.ceil(inp / BLOCK_TOKENS))
        fail_p, t = 0.15, ts
        for _attempt in range(3):
            error = g.rng.random() < fail_p
            e = g.event(
                review,
                t,
                input_tokens=inp,
                output_tokens=int(out * g.rng.uniform(0.0, 0.3)) if error else out,
                status="error" if error else "ok",
                prompt_hash=prompt,
                prefix_hashes=blocks,
            )
            if not error:
                break
            failed.append(e)
            fail_p, t = 0.30, t + timedelta(seconds=30 + float(g.rng.uniform(2, 60)))
    return Scenario(
        g.name,
        "retries after errors",
        days,
        ("waste.errors",),
        {"tenant": "initech", "app": "code-assist", "feature": "review", "model": "gpt-4o"},
        monthly(float(costs(book, failed).sum()), days),
        f"cost of the {len(failed):,} failed attempts (up to 3 per request), per day x 30.4375",
        g.events,
    )


BLOAT_TOKENS = 6000
BLOAT_DAYS = 5


def _context_bloat(g: Gen, book: Any, days: float) -> Scenario:
    g.background()
    since = iso(g.end - timedelta(days=BLOAT_DAYS))
    bloated, lean = [], []
    for e in g.events:
        if e["feature"] == "answer" and e["ts"] >= since:
            lean.append(dict(e))
            e["gen_ai.usage.input_tokens"] += BLOAT_TOKENS
            e["prefix_hashes"] = e["prefix_hashes"] + g.blocks(BLOAT_TOKENS // BLOCK_TOKENS)
            bloated.append(e)
    saved = float(costs(book, bloated).sum() - costs(book, lean).sum())
    return Scenario(
        g.name,
        "context bloat",
        days,
        ("waste.context_bloat",),
        {"app": "support-bot", "feature": "answer"},
        monthly(saved, BLOAT_DAYS),
        f"cost of the {BLOAT_TOKENS:,} extra input tokens of the {len(bloated):,} answer "
        f"requests of the last {BLOAT_DAYS} days, per day since the change x 30.4375",
        g.events,
    )


def _clean(g: Gen, book: Any, days: float) -> Scenario:
    g.background()
    return Scenario(g.name, "none (background)", days, (), {}, 0.0, "no waste injected", g.events)


def _cheap_misses_bar(g: Gen, book: Any, days: float) -> Scenario:
    g.background()
    _routing_feature(g, 0.66, QUALITY_BAR - 0.01)
    return Scenario(
        g.name,
        "cheaper model below bar",
        days,
        (),
        {},
        0.0,
        f"gpt-4o-mini's answers all score below {QUALITY_BAR}: no request may move to it",
        g.events,
    )


def _short_burst(g: Gen, book: Any, days: float) -> Scenario:
    g.background()
    s = next(b for b in BACKGROUND if b.feature == "summarize")
    end = g.end - timedelta(hours=6)
    for ts in g.arrivals(600, lambda h: 1.0, end - timedelta(hours=2), end):
        g.event(s, ts)
    return Scenario(
        g.name,
        "none (a 2-hour burst)",
        days,
        (),
        {},
        0.0,
        "a one-off burst of legitimate traffic is no recurring waste",
        g.events,
    )


BUILDERS: dict[str, tuple[Callable[[Gen, Any, float], Scenario], float]] = {
    "repeats": (_repeats, 28),
    "prefix-ttl": (_prefix_ttl, 21),
    "routing": (_routing, 28),
    "batch": (_batch, 14),
    "gpu-idle": (_gpu_idle, 21),
    "gpu-saturated": (_gpu_saturated, 14),
    "retries": (_retries, 21),
    "context-bloat": (_context_bloat, 28),
}
CONTROLS: dict[str, tuple[Callable[[Gen, Any, float], Scenario], float]] = {
    "clean": (_clean, 28),
    "cheap-misses-bar": (_cheap_misses_bar, 21),
    "short-burst": (_short_burst, 14),
}
YOUNG_DAYS = 7


def scenario_names() -> list[str]:
    """Every scenario: each waste scenario, its 7-day-old variant, then the controls."""
    return [*BUILDERS, *(f"{n}-7d" for n in BUILDERS), *CONTROLS]


def build(name: str, end: datetime, book: Any) -> Scenario:
    """Scenario ``name`` with traffic ending at ``end`` (deterministic for a given end)."""
    base, young = (name[:-3], True) if name.endswith("-7d") else (name, False)
    table = BUILDERS if base in BUILDERS else CONTROLS
    if base not in table or (young and base not in BUILDERS):
        raise KeyError(f"unknown scenario {name!r}; known: {', '.join(scenario_names())}")
    builder, days = table[base]
    days = YOUNG_DAYS if young else days
    g = Gen(name, end - timedelta(days=days), end)
    sc = builder(g, book, days)
    sc.events.sort(key=lambda e: e["ts"])
    return sc


# -- the harness --------------------------------------------------------------------------


def _env() -> dict[str, str]:
    """This environment without FINOPSD_* settings (the defaults are measured)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FINOPSD_")}
    if "FINOPSD_TANSU_BIN" in os.environ:
        env["FINOPSD_TANSU_BIN"] = os.environ["FINOPSD_TANSU_BIN"]
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    return env


def _finopsd(*args: str, config: Path, timeout: float = 300, ok: tuple[int, ...] = (0,)) -> Any:
    """``finopsd ARGS --config CONFIG --json``: its JSON output (a failure says why).

    An exit status in ``ok`` with JSON on stdout is an answer (``analyze`` exits 1
    when an analyzer failed, and still reports the others)."""
    cmd = [sys.executable, "-m", "finopsd", *args, "--config", str(config), "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env())
    if done.returncode not in ok or not done.stdout.strip():
        raise RuntimeError(f"finopsd {args[0]} exited {done.returncode}: {done.stderr[-2000:]}")
    return json.loads(done.stdout)


def _stored_all(bootstrap: str, group: str, topics: dict[str, int], sent: int) -> bool:
    """The group's committed offsets cover the ``sent`` records of fresh ``topics``, and the
    end of every partition (the broker's end offsets can lag a batch behind: both count)."""
    from kafka import KafkaConsumer, TopicPartition

    parts = [TopicPartition(t, p) for t, n in topics.items() for p in range(n)]
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        ends = consumer.end_offsets(parts)
        committed = {tp: consumer.committed(tp) or 0 for tp in parts}
        return sum(committed.values()) >= sent and all(committed[tp] >= ends[tp] for tp in parts)
    finally:
        consumer.close(autocommit=False)


def ingest(sc: Scenario, bootstrap: str, work: Path, timeout: float) -> Path:
    """Replay ``sc`` through a ``finopsd run`` of its own; the config of its filled store."""
    from finopsd.ingest.broker import ensure_topics
    from finopsd.ingest.loadgen import produce

    work.mkdir(parents=True, exist_ok=True)
    usage, gpu, dlq = f"dq.{sc.name}.usage", f"dq.{sc.name}.gpu", f"dq.{sc.name}.dlq"
    group = f"dq-{sc.name}-{time.time_ns()}"
    partitions = {usage: 2, gpu: 1}
    ensure_topics(bootstrap, {**partitions, dlq: 1})
    events = work / "events.ndjson"
    with events.open("w") as f:
        for e in sc.events:
            f.write(json.dumps(e, separators=(",", ":")) + "\n")
    config = work / "config.toml"
    config.write_text(
        "[kafka]\n"
        f'bootstrap_servers = "{bootstrap}"\ngroup_id = "{group}"\n'
        f'usage_topic = "{usage}"\ngpu_topic = "{gpu}"\ndead_letter_topic = "{dlq}"\n'
        "session_timeout_ms = 6000\nheartbeat_interval_ms = 1000\n"
        "[ingest]\nbatch_max_age_ms = 200\n"
        f'[store]\npath = "{work / "finopsd.duckdb"}"\n[api]\nport = 0\n'
        "[analyzers]\nfirst_run_delay_s = 86400\n"  # analysed after ingest, by `analyze`
        "[analyzers.caching]\nbackfill_hours = 0\n" + sc.config
    )
    log = (work / "daemon.log").open("wb")
    daemon = subprocess.Popen(
        [sys.executable, "-m", "finopsd", "run", "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=_env(),
    )
    try:
        replayed = _finopsd(
            "replay",
            str(events),
            "--format",
            "native",
            "--bootstrap",
            bootstrap,
            "--topic",
            usage,
            config=config,
        )
        if replayed["sent"] != len(sc.events) or replayed["skipped"]:
            raise RuntimeError(f"replay sent {replayed['sent']}, skipped {replayed['skipped']}")
        if sc.gpu:
            messages = (
                (
                    f"{s['host']}/{s['gpu_index']}/{s['ts']}".encode(),
                    json.dumps(s, separators=(",", ":")).encode(),
                )
                for s in sc.gpu
            )
            if produce(bootstrap, gpu, messages, len(sc.gpu)) != len(sc.gpu):
                raise RuntimeError("not every GPU sample was acknowledged")
        deadline = time.monotonic() + timeout
        while not _stored_all(bootstrap, group, partitions, len(sc.events) + len(sc.gpu)):
            if daemon.poll() is not None:
                raise RuntimeError(f"finopsd run exited {daemon.returncode}; see {log.name}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"not all events stored after {timeout:.0f}s; see {log.name}")
            time.sleep(0.5)
    finally:
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
        code = daemon.wait(120)
        log.close()
    if code != 0:
        raise RuntimeError(f"finopsd run exited {code} on SIGTERM; see {log.name}")
    stats = _finopsd("stats", config=config)
    if stats["usage_events"] != len(sc.events) or stats["gpu_samples"] != len(sc.gpu):
        raise RuntimeError(
            f"stored {stats['usage_events']} usage events and {stats['gpu_samples']} GPU "
            f"samples of {len(sc.events)} and {len(sc.gpu)}"
        )
    if stats["dead_letters"]:
        raise RuntimeError(f"dead letters: {stats['dead_letters_by_reason']}")
    return config


def judge(sc: Scenario, findings: list[dict[str, Any]]) -> dict[str, Any]:
    """The findings of ``sc`` against its oracle."""
    target = [
        f
        for f in findings
        if f["kind"] in sc.kinds and all(f["scope"].get(k) == v for k, v in sc.scope.items())
    ]
    others = [
        {"kind": f["kind"], "scope": f["scope"], "monthly_savings_usd": f["monthly_savings_usd"]}
        for f in findings
        if f not in target and f["monthly_savings_usd"] > CONTROL_LIMIT_USD
    ]
    found = sum(float(f["monthly_savings_usd"]) for f in target)
    lows = [f.get("monthly_savings_low_usd") for f in target]
    highs = [f.get("monthly_savings_high_usd") for f in target]
    known = target and None not in lows and None not in highs
    low = sum(float(x) for x in lows) if known else None
    high = sum(float(x) for x in highs) if known else None
    result: dict[str, Any] = {
        "scenario": sc.name,
        "waste": sc.waste,
        "control": sc.control,
        "days": sc.days,
        "events": len(sc.events),
        "gpu_samples": len(sc.gpu),
        "oracle_monthly_usd": round(sc.oracle_usd, 4),
        "oracle_method": sc.oracle_method,
        "kinds": list(sc.kinds),
        "found_monthly_usd": round(found, 4),
        "findings": len(target),
        "interval_usd": [low, high] if known else None,
        "oracle_inside": (low <= sc.oracle_usd <= high) if known else None,  # type: ignore[operator]
        "provisional": any(bool(f.get("provisional")) for f in target) if target else None,
        "evidence_hours": [f.get("evidence_hours") for f in target],
        "other_findings": others,
    }
    if sc.control:
        result["largest_false_usd"] = max((o["monthly_savings_usd"] for o in others), default=0.0)
    else:
        result["ratio"] = found / sc.oracle_usd if sc.oracle_usd else None
        result["within_tolerance"] = (
            abs(found / sc.oracle_usd - 1) <= TOLERANCE if sc.oracle_usd else None
        )
    return result


def run(name: str, end: datetime, book: Any, bootstrap: str, work: Path, timeout: float) -> Any:
    began = time.perf_counter()
    sc = build(name, end, book)
    config = ingest(sc, bootstrap, work / name, timeout)
    analyzed = _finopsd("analyze", config=config, ok=(0, 1))
    result = judge(sc, analyzed["findings"])
    result["analyzer_errors"] = {r["analyzer"]: r["error"] for r in analyzed["runs"] if r["error"]}
    result["analyzer_failed"] = any(k.split(".")[0] in result["analyzer_errors"] for k in sc.kinds)
    result["seconds"] = round(time.perf_counter() - began, 1)
    return result


# -- output -------------------------------------------------------------------------------


def usd(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.2f}"


def _row(r: dict[str, Any]) -> str:
    if r.get("analyzer_failed"):
        oracle = usd(r["oracle_monthly_usd"])
        return f"{r['scenario']:<17}{r['days']:>4g} {oracle:>9}  (the analyzer failed)"
    ratio = f"{r['ratio']:.2f}" if r.get("ratio") is not None else "-"
    iv = r["interval_usd"]
    interval = f"[{usd(iv[0])}, {usd(iv[1])}]" if iv else "-"
    inside = {True: "yes", False: "no", None: "-"}[r["oracle_inside"]]
    prov = {True: "yes", False: "no", None: "-"}[r["provisional"]]
    return (
        f"{r['scenario']:<17}{r['days']:>4g} {usd(r['oracle_monthly_usd']):>9} "
        f"{usd(r['found_monthly_usd']):>9} {ratio:>5} {interval:>19} {inside:>4} {prov:>4}"
    )


def _other(o: dict[str, Any]) -> str:
    scope = "/".join(str(v) for v in o["scope"].values())
    return f"    {o['kind']} {scope}"[:66] + f" {usd(o['monthly_savings_usd']):>10}/mo"


def summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    waste = [r for r in results if not r["control"]]
    controls = [r for r in results if r["control"]]
    ratios = [r["ratio"] for r in waste if r.get("ratio") is not None]
    worst = max(controls, key=lambda r: r["largest_false_usd"], default=None)
    return {
        "waste_scenarios": len(waste),
        "within_tolerance": sum(1 for r in waste if r.get("within_tolerance")),
        "oracle_inside_interval": sum(1 for r in waste if r["oracle_inside"]),
        "provisional": sum(1 for r in waste if r["provisional"]),
        "ratio_median": float(np.median(ratios)) if ratios else None,
        "ratio_min": min(ratios) if ratios else None,
        "ratio_max": max(ratios) if ratios else None,
        "controls": len(controls),
        "controls_clean": sum(1 for r in controls if r["largest_false_usd"] <= CONTROL_LIMIT_USD),
        "largest_false_usd": worst["largest_false_usd"] if worst else None,
        "largest_false_in": worst["scenario"] if worst else None,
    }


def print_table(results: list[dict[str, Any]], s: dict[str, Any]) -> None:
    waste = [r for r in results if not r["control"]]
    controls = [r for r in results if r["control"]]
    if waste:
        print(
            f"{'waste scenario':<17}days {'oracle':>9} {'found':>9} {'ratio':>5} "
            f"{'interval $/mo':>19} {'in?':>4} {'prov':>4}"
        )
        for r in waste:
            print(_row(r))
            for o in r["other_findings"]:
                print(_other(o))
    if controls:
        print(f"{'control':<17}days {'false findings > $1/month':<44}{'largest $/mo':>13}")
        for r in controls:
            kinds = ", ".join(sorted({o["kind"] for o in r["other_findings"]})) or "none"
            print(
                f"{r['scenario']:<17}{r['days']:>4g} {kinds[:44]:<44}"
                f"{usd(r['largest_false_usd']):>13}"
            )
    if waste and s["ratio_median"] is not None:
        print(
            f"waste: {s['within_tolerance']}/{s['waste_scenarios']} within ±{TOLERANCE:.0%} of "
            f"the oracle; found/oracle median {s['ratio_median']:.2f}, range "
            f"{s['ratio_min']:.2f}-{s['ratio_max']:.2f}\n"
            f"       oracle inside the interval: {s['oracle_inside_interval']}/"
            f"{s['waste_scenarios']}; provisional: {s['provisional']}/{s['waste_scenarios']}"
        )
    if controls:
        print(
            f"controls: {s['controls_clean']}/{s['controls']} without a finding above "
            f"${CONTROL_LIMIT_USD:g}/month; largest false finding\n"
            f"       ${s['largest_false_usd']:,.2f}/month ({s['largest_false_in']})"
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", metavar="NAME[,NAME]", help="run only these scenarios")
    parser.add_argument("--json", action="store_true", help="print JSON, no table")
    parser.add_argument("--keep", type=Path, help="keep each scenario's files (store, log) here")
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds to ingest one")
    args = parser.parse_args(argv)
    names = scenario_names()
    if args.list:
        print("\n".join(names))
        return 0
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in names]
        if unknown:
            print(f"unknown scenario {', '.join(unknown)}; known: {', '.join(names)}")
            return 2
        names = wanted

    from finopsd.ingest.broker import EmbeddedBroker
    from finopsd.pricing import PriceBook

    book = PriceBook.shipped()
    end = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    began = time.perf_counter()
    results: list[dict[str, Any]] = []
    failures: list[str] = []
    work = Path(tempfile.mkdtemp(prefix="finopsd-decisions-"))
    try:
        with EmbeddedBroker("127.0.0.1", 0) as broker:
            for name in names:
                try:
                    r = run(name, end, book, broker.bootstrap, work, args.timeout)
                except (RuntimeError, subprocess.TimeoutExpired) as exc:
                    print(f"{name}: {exc}", file=sys.stderr)
                    failures.append(name)
                    continue
                for analyzer, error in r["analyzer_errors"].items():
                    print(f"{name}: analyzer {analyzer} failed: {error}", file=sys.stderr)
                results.append(r)
                if not args.json:
                    print(
                        f"  {name}: {r['events']:,} events, {r['gpu_samples']:,} GPU samples, "
                        f"{r['seconds']:.0f}s",
                        file=sys.stderr,
                        flush=True,
                    )
    finally:
        if args.keep:
            shutil.copytree(work, args.keep, dirs_exist_ok=True)
        shutil.rmtree(work, ignore_errors=True)
    s = summary(results)
    s["seconds"] = round(time.perf_counter() - began, 1)
    s["failed_scenarios"] = failures
    s["analyzer_errors"] = sorted({a for r in results for a in r["analyzer_errors"]})
    if args.json:
        print(json.dumps({"end": end.isoformat(), "summary": s, "scenarios": results}, indent=1))
    else:
        print_table(results, s)
        print(f"({len(results)} scenarios in {s['seconds']:.0f}s; traffic ending {iso(end)})")
        if failures or s["analyzer_errors"]:
            print(f"failed: scenarios {failures or 'none'}; analyzers {s['analyzer_errors']}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
