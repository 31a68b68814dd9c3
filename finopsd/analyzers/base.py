"""The shape every analyzer has, and the Finding it returns.

An analyzer reads the store (DuckDB SQL; polars or scipy where SQL is not
enough) and returns ``Finding``s: waste it found, with the evidence, the money
it would save per month, how sure it is, what could go wrong, and the
``ActionSpec`` that would realise the saving. Analyzers never change the world;
the only thing one may write is its own derived tables (rollups, state) in the
store, through ``Context.write``.

Evidence and projections (the contract every analyzer keeps):

- A monthly figure is the saving over the span its evidence covers, divided by
  that span: ``project(per_period_savings, period_hours)``, never a division by
  the query window. The span (``evidence_hours``) runs from the first period
  with relevant traffic to the last hour observed (``Context.last_hour``: the
  latest event or GPU sample stored), whole periods, whatever the window is:
  waste that stopped, or that recurs only now and then (a nightly job), is
  seen over all the time it was watched, not only between its own first and
  last hour. A first period within ``FIRST_DAY_HOURS`` of the first hour
  observed (``Context.first_hour``) starts the span there instead: the first
  day of observation cannot tell traffic that began then from traffic that
  recurs daily (``Context.span_start``; ``Context.hours`` builds the series).
- Every projection carries an interval, ``monthly_savings_low_usd`` ..
  ``monthly_savings_high_usd``: a block bootstrap of the per-period savings
  (see ``project``), with a fixed seed, so the same data gives the same figures.
- A finding is **provisional** when its span is shorter than
  ``analyzers.min_evidence_hours`` or it stands on fewer requests than the
  analyzer's ``min_evidence_requests`` (a class attribute, and an option of
  every analyzer). A provisional finding is shown and stored, its
  title says so, and it is never eligible for an automatic action:
  ``Finding.eligible_for_action`` is false and the ``findings`` table stores
  ``provisional``; the actions layer acts only on rows with ``provisional =
  false``. Its monthly figure is not extrapolated from less than
  ``min_evidence_hours``: the saving seen is taken as the saving of a whole
  ``min_evidence_hours`` (``Projection.capped``), so the point figure is at
  most the saving seen times ``HOURS_PER_MONTH / min_evidence_hours`` (30x at
  the default 24 h); its interval runs from 0 (nothing says the traffic
  recurs) to the rate of the span itself.
- Analyzers build findings with ``Analyzer.finding`` (which applies the
  above); the runner judges every finding again before storing it, so one
  built by hand without evidence is provisional.

A new analyzer is one module in ``finopsd/analyzers/`` with a subclass of
``Analyzer`` decorated with ``@register``; the runner discovers it.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.abc
import importlib.util
import json
import math
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, ClassVar, Literal, TypeVar

import duckdb
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from finopsd.pricing import PriceBook


class _AbsentModule(importlib.abc.MetaPathFinder):
    """Answers an import of a module that is not installed at once, without searching
    ``sys.path`` again.

    DuckDB's Python client tries ``import pandas`` on every query with parameters
    (twice; about 0.15-0.25 ms a query here when pandas is absent, which is most of a
    small query's cost). This finder raises the ``ModuleNotFoundError`` that search
    would end in; it leaves ``sys.modules`` alone, and ``importlib.util.find_spec``
    still answers None, so whoever asks (pyarrow's pandas shim, polars, DuckDB's
    ``fetchdf``) sees pandas absent exactly as before.
    """

    def __init__(self, name: str) -> None:
        self.name = name

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> None:
        if fullname != self.name and not fullname.startswith(self.name + "."):
            return None
        # importlib.util.find_spec (its frame calls importlib's _find_spec, which calls
        # this) answers None for a missing module: let it, the slow way; imports fail now
        if sys._getframe(2).f_code.co_name == "find_spec":
            return None
        raise ModuleNotFoundError(f"No module named {fullname!r}", name=fullname)


def _skip_absent(name: str) -> None:
    """Install ``_AbsentModule(name)`` first on ``sys.meta_path`` if ``name`` is not
    installed (checked once, here); once per process."""
    if any(isinstance(f, _AbsentModule) and f.name == name for f in sys.meta_path):
        return
    if name not in sys.modules and importlib.util.find_spec(name) is None:
        sys.meta_path.insert(0, _AbsentModule(name))


_skip_absent("pandas")

Risk = Literal["low", "medium", "high"]
T = TypeVar("T")

DAYS_PER_MONTH = 30.4375
"""Average days in a month: monthly figures are daily rates times this."""

HOURS_PER_MONTH = DAYS_PER_MONTH * 24
"""730.5: monthly figures are hourly rates times this."""

MIN_EVIDENCE_HOURS = 24.0
"""Default of ``analyzers.min_evidence_hours``: a shorter span makes a finding provisional."""

FIRST_DAY_HOURS = 24
"""Traffic first seen this soon after observation began is taken to have been there from
its start (see ``Context.span_start``)."""

INTERVAL_LEVEL = 0.9
"""The central share of the bootstrap distribution a projection's interval spans."""

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 20240611
"""Fixed: the same per-period savings always give the same interval."""

_PROVISIONAL = "(provisional: "


@dataclass(frozen=True)
class ActionSpec:
    """What would realise a finding: an actuator kind and its parameters (no side effects)."""

    actuator: str  # e.g. "gateway.cache", "gateway.route", "vllm.quantize", "provider.batch"
    params: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"actuator": self.actuator, "params": self.params}


@dataclass(frozen=True)
class Window:
    """The half-open time range [start, end) an analysis looked at, UTC."""

    start: datetime
    end: datetime

    @property
    def days(self) -> float:
        return (self.end - self.start) / timedelta(days=1)

    def as_dict(self) -> dict[str, str]:
        return {"start": self.start.isoformat(), "end": self.end.isoformat()}


@dataclass
class Finding:
    """One piece of waste, with money attached.

    ``id`` is stable: a hash of ``kind`` and ``scope``, so the same waste found
    again updates its row instead of adding one. ``evidence`` holds the numbers
    that support it; the runner adds the query window to it.

    ``evidence_hours`` and ``evidence_requests`` are the span of traffic and the
    requests the figure stands on (0: not stated, which makes it provisional).
    ``monthly_savings_low_usd``/``_high_usd`` bound ``monthly_savings_usd``
    (unset: the point figure, no interval known). ``provisional`` is set by
    ``judge_evidence`` (``Analyzer.finding`` and the runner call it).
    """

    kind: str
    scope: dict[str, str]
    title: str
    evidence: dict[str, Any]
    monthly_savings_usd: float
    savings_method: str
    confidence: float
    risk: Risk
    action: ActionSpec | None = None
    evidence_hours: float = 0.0
    evidence_requests: int = 0
    monthly_savings_low_usd: float | None = None
    monthly_savings_high_usd: float | None = None
    provisional: bool = False

    def __post_init__(self) -> None:
        if self.monthly_savings_low_usd is None:
            self.monthly_savings_low_usd = self.monthly_savings_usd
        if self.monthly_savings_high_usd is None:
            self.monthly_savings_high_usd = self.monthly_savings_usd

    @property
    def eligible_for_action(self) -> bool:
        """Whether the actions layer may act on it automatically: an action, not provisional.

        (Policy, confidence and blast-radius limits are the controller's to add.)
        """
        return self.action is not None and not self.provisional

    @property
    def id(self) -> str:
        key = json.dumps([self.kind, self.scope], sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "scope": self.scope,
            "title": self.title,
            "evidence": self.evidence,
            "monthly_savings_usd": self.monthly_savings_usd,
            "monthly_savings_low_usd": self.monthly_savings_low_usd,
            "monthly_savings_high_usd": self.monthly_savings_high_usd,
            "savings_method": self.savings_method,
            "confidence": self.confidence,
            "risk": self.risk,
            "evidence_hours": self.evidence_hours,
            "evidence_requests": self.evidence_requests,
            "provisional": self.provisional,
            "eligible_for_action": self.eligible_for_action,
            "action": self.action.as_dict() if self.action else None,
        }


def finding_from_dict(data: dict[str, Any]) -> Finding:
    """A ``Finding`` from its ``as_dict()`` form (what the API returns)."""
    action = data.get("action")
    return Finding(
        kind=data["kind"],
        scope=dict(data["scope"]),
        title=data["title"],
        evidence=dict(data.get("evidence") or {}),
        monthly_savings_usd=float(data["monthly_savings_usd"]),
        savings_method=data["savings_method"],
        confidence=float(data["confidence"]),
        risk=data["risk"],
        action=ActionSpec(action["actuator"], dict(action.get("params") or {})) if action else None,
        evidence_hours=float(data.get("evidence_hours") or 0.0),
        evidence_requests=int(data.get("evidence_requests") or 0),
        monthly_savings_low_usd=data.get("monthly_savings_low_usd"),
        monthly_savings_high_usd=data.get("monthly_savings_high_usd"),
        provisional=bool(data.get("provisional")),
    )


def judge_evidence(finding: Finding, min_evidence_hours: float, min_requests: int) -> Finding:
    """Mark ``finding`` provisional when its evidence is short; idempotent, returns it.

    Provisional: ``evidence_hours < min_evidence_hours`` or ``evidence_requests <
    min_requests``, or it was already. The title then ends in "(provisional: …)"
    naming what was short (added once).
    """
    short = []
    if finding.evidence_hours < min_evidence_hours:
        short.append(f"{_hours_text(finding.evidence_hours)} of traffic")
    if finding.evidence_requests < min_requests:
        short.append(f"{finding.evidence_requests:,} requests")
    if short or finding.provisional:
        finding.provisional = True
        if _PROVISIONAL not in finding.title:
            why = ", ".join(short) or "short evidence"
            finding.title = f"{finding.title} {_PROVISIONAL}{why})"
    return finding


def _hours_text(hours: float) -> str:
    if hours < 1:
        return f"{hours:.2g} h" if hours > 0 else "0 h"
    return f"{hours:,.0f} h" if hours >= 10 else f"{hours:.1f} h"


class Options(BaseModel):
    """Options every analyzer has; an analyzer's own ``Options`` subclass adds its keys."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    interval_minutes: float | None = Field(
        None,
        gt=0,
        le=366 * 24 * 60,
        description="how often it runs in the daemon; unset: analyzers.interval_minutes",
    )
    min_evidence_requests: int | None = Field(
        None,
        ge=0,
        le=10**12,
        description="a finding on fewer requests is provisional; unset: the analyzer's own minimum",
    )


@dataclass
class Context:
    """What an analyzer run may use: a connection to read, the window, prices, the time."""

    con: duckdb.DuckDBPyConnection
    window: Window
    now: datetime
    prices: PriceBook
    write: Callable[[Callable[[duckdb.DuckDBPyConnection], Any]], Any]
    """``write(fn)`` runs ``fn(connection)`` in one store transaction (derived tables only)."""
    min_evidence_hours: float = MIN_EVIDENCE_HOURS
    """``analyzers.min_evidence_hours``: a shorter span makes a finding provisional."""
    last_hour: int | None = None
    """The epoch hour of the latest usage event or GPU sample in the window: where what
    has been observed ends (None: unknown; a span then ends at its own last hour)."""
    first_hour: int | None = None
    """The epoch hour of the earliest usage event or GPU sample in the window: where what
    has been observed begins (None: unknown)."""

    def span_start(self, first: int) -> int:
        """The epoch hour a span whose first relevant hour is ``first`` starts at:
        ``first_hour`` when ``first`` is less than ``FIRST_DAY_HOURS`` after it (a nightly
        job first seen at 01:00 on the first day observed was there from the start), else
        ``first``."""
        if self.first_hour is not None and 0 <= first - self.first_hour < FIRST_DAY_HOURS:
            return self.first_hour
        return first

    def hours(self, pairs: Iterable[tuple[datetime | int, float]]) -> list[float]:
        """The saving per hour from ``span_start`` of the first hour given to the last hour
        observed: ``dense_hours`` with 0s before and after."""
        hours, values = _hours_and_values(pairs)
        if not hours:
            return []
        return _dense(hours, values, since=self.span_start(min(hours)), through=self.last_hour)

    def project(
        self,
        per_period_savings: Sequence[float],
        period_hours: float = 1.0,
        *,
        span_hours: float | None = None,
    ) -> Projection:
        """``project`` with this run's ``min_evidence_hours``."""
        return project(
            per_period_savings,
            period_hours,
            span_hours=span_hours,
            min_span_hours=self.min_evidence_hours,
        )


class Analyzer:
    """Base of every analyzer: ``run(ctx) -> list[Finding]``, reading only."""

    name: ClassVar[str]
    description: ClassVar[str]
    Options: ClassVar[type[Options]] = Options
    order: ClassVar[int] = 100
    """Lower runs first: rollups others read (spend) come before their readers."""
    min_evidence_requests: ClassVar[int] = 100
    """A finding on fewer requests is provisional (the option of the same name overrides it).

    (Not ``min_requests``: several analyzers have an option of that name that
    skips small scopes altogether.)"""

    def __init__(self, options: Options | None = None) -> None:
        self.options = options if options is not None else self.Options()

    @property
    def required_requests(self) -> int:
        """The request count below which this analyzer's findings are provisional."""
        own = self.options.min_evidence_requests
        return type(self).min_evidence_requests if own is None else own

    def run(self, ctx: Context) -> list[Finding]:
        raise NotImplementedError

    def finding(
        self,
        ctx: Context,
        *,
        kind: str,
        scope: dict[str, str],
        title: str,
        evidence: dict[str, Any],
        projection: Projection,
        requests: int,
        savings_method: str,
        confidence: float,
        risk: Risk,
        action: ActionSpec | None = None,
    ) -> Finding:
        """A ``Finding`` whose money is ``projection``, judged on its evidence.

        The evidence dict gains ``projection`` (the saving seen over the span,
        the interval's level and method, whether the rate was capped).
        """
        f = Finding(
            kind=kind,
            scope=scope,
            title=title,
            evidence={**evidence, "projection": projection.as_evidence()},
            monthly_savings_usd=projection.monthly_usd,
            savings_method=savings_method,
            confidence=confidence,
            risk=risk,
            action=action,
            evidence_hours=projection.evidence_hours,
            evidence_requests=int(requests),
            monthly_savings_low_usd=projection.low_usd,
            monthly_savings_high_usd=projection.high_usd,
        )
        return judge_evidence(f, ctx.min_evidence_hours, self.required_requests)


ANALYZERS: dict[str, type[Analyzer]] = {}
"""Analyzer classes by name, filled by ``@register``."""


def register(cls: type[Analyzer]) -> type[Analyzer]:
    """Class decorator: make an analyzer known by its ``name``."""
    if cls.name in ANALYZERS and ANALYZERS[cls.name] is not cls:
        raise ValueError(f"two analyzers are named {cls.name!r}")
    ANALYZERS[cls.name] = cls
    return cls


def monthly(amount: float, window: Window) -> float:
    """An amount seen over ``window``, as a monthly rate.

    Only for amounts that really accrue over the whole window; a saving is
    projected over the span its evidence covers, with ``project``.
    """
    return amount / window.days * DAYS_PER_MONTH if window.days > 0 else 0.0


@dataclass(frozen=True)
class Projection:
    """A monthly figure from a saving seen over ``evidence_hours``, with its interval.

    ``monthly_usd`` is the point figure, ``low_usd``..``high_usd`` the interval
    (``level`` of the bootstrap distribution), ``observed_usd`` the saving
    seen over the span, ``periods`` how many periods it was seen in and
    ``blocks`` how many resampling blocks those made. ``capped``: the span was
    shorter than the minimum and the rate was taken over the minimum instead.
    """

    monthly_usd: float
    low_usd: float
    high_usd: float
    evidence_hours: float
    observed_usd: float
    periods: int
    blocks: int
    capped: bool
    level: float = INTERVAL_LEVEL

    def as_evidence(self) -> dict[str, Any]:
        """What a finding's evidence says about how its money was projected."""
        if self.capped:
            method = (
                "provisional: the saving seen taken as that of the minimum evidence span; "
                "interval from 0 to the span's own rate"
            )
        elif self.blocks > 1:
            method = f"{self.level:.0%} block bootstrap over {self.blocks} blocks of periods"
        else:
            method = "one block: no interval beyond the point"
        return {
            "observed_savings_usd": self.observed_usd,
            "evidence_hours": self.evidence_hours,
            "periods": self.periods,
            "interval_level": self.level,
            "interval_method": method,
            "capped": self.capped,
        }


def project(
    per_period_savings: Sequence[float],
    period_hours: float = 1.0,
    *,
    span_hours: float | None = None,
    min_span_hours: float = 0.0,
    block_hours: float = 24.0,
    level: float = INTERVAL_LEVEL,
    seed: int = BOOTSTRAP_SEED,
    resamples: int = BOOTSTRAP_RESAMPLES,
) -> Projection:
    """The monthly rate of a saving seen per period, with a bootstrap interval.

    ``per_period_savings``: the saving in each consecutive period of
    ``period_hours`` from the first to the last period with relevant traffic,
    periods without any saving included as 0 (``dense_hours`` builds it).
    The span is ``len × period_hours`` unless ``span_hours`` (e.g. the exact
    first-to-last event time) is given. Point figure: the total saving / the
    span × ``HOURS_PER_MONTH``.

    Interval: the periods are cut into consecutive blocks of ``block_hours``
    (a day: daily seasonality stays inside a block) when the span holds at
    least 3 such blocks, else each period is a block; ``resamples`` draws of as
    many blocks with replacement (numpy, fixed ``seed``) give the distribution
    of the rate; its central ``level`` share, widened around the point by
    ``sqrt(k / (k - 1)) * t(k - 1) / z`` for ``k`` blocks (the bootstrap's
    small-sample bias, and Student's t for a spread estimated from few blocks),
    is the interval, never below 0 when no period's saving is. One block: the
    interval is the point.

    ``span_hours < min_span_hours``: ``capped``; the point is the total over
    ``min_span_hours`` (not extrapolated from a shorter span), the interval
    runs from 0 to the span's own rate (the span floored at one second).
    """
    values = np.asarray(list(per_period_savings), dtype=float)
    if period_hours <= 0:
        raise ValueError(f"period_hours must be positive, got {period_hours}")
    n = len(values)
    span = float(span_hours) if span_hours is not None else n * period_hours
    total = float(values.sum()) if n else 0.0
    if n == 0 or (span <= 0 and total == 0):
        return Projection(0.0, 0.0, 0.0, max(span, 0.0), 0.0, n, 0, span < min_span_hours, level)
    nonneg = bool((values >= 0).all())
    if span < min_span_hours:
        own_rate = total / max(span, 1 / 3600) * HOURS_PER_MONTH
        point = total / min_span_hours * HOURS_PER_MONTH
        low, high = sorted((0.0 if nonneg else min(own_rate, 0.0), own_rate))
        return Projection(point, min(low, point), max(high, point), span, total, n, 1, True, level)
    point = total / max(span, 1 / 3600) * HOURS_PER_MONTH
    per_block = max(1, round(block_hours / period_hours))
    if n < 3 * per_block:
        per_block = 1
    k = math.ceil(n / per_block)
    if k < 2:
        return Projection(point, point, point, span, total, n, k, False, level)
    sums = np.add.reduceat(values, np.arange(0, n, per_block))
    lengths = np.diff(np.append(np.arange(0, n, per_block), n)).astype(float)
    idx = _draws(k, resamples, seed)
    rates = sums[idx].sum(axis=1) / (lengths[idx].sum(axis=1) * period_hours) * HOURS_PER_MONTH
    q_low, q_high = np.quantile(rates, [(1 - level) / 2, (1 + level) / 2])
    widen = _widening(k, level)
    low = point - (point - float(q_low)) * widen
    high = point + (float(q_high) - point) * widen
    if nonneg:
        low = max(low, 0.0)
    return Projection(point, min(low, point), max(high, point), span, total, n, k, False, level)


@functools.lru_cache(maxsize=256)
def _draws(blocks: int, resamples: int, seed: int) -> np.ndarray:
    """The bootstrap's block indices: the same for every call with the same arguments."""
    draws = np.random.default_rng(seed).integers(0, blocks, size=(resamples, blocks))
    draws.setflags(write=False)
    return draws


@functools.lru_cache(maxsize=1024)
def _widening(blocks: int, level: float) -> float:
    """``sqrt(k / (k - 1)) * t(k - 1) / z`` for ``k`` blocks (see ``project``)."""
    from scipy import stats  # only here: importing it costs a second

    z = float(stats.norm.ppf((1 + level) / 2))
    return math.sqrt(blocks / (blocks - 1)) * float(stats.t.ppf((1 + level) / 2, blocks - 1)) / z


def _epoch_hour(hour: datetime | int) -> int:
    return hour if isinstance(hour, int) else math.floor(hour.timestamp() / 3600)


def dense_hours(
    pairs: Iterable[tuple[datetime | int, float]],
    *,
    since: int | None = None,
    through: int | None = None,
) -> list[float]:
    """Savings per UTC hour from the first to the last hour given, missing hours 0.

    ``pairs``: (hour, saving), the hour a datetime (floored to its hour) or an
    epoch hour number; the same hour given twice is summed. ``since`` /
    ``through``: epoch hours the series starts at at the latest / runs to at
    least (0s before the first / after the last hour given).
    """
    hours, values = _hours_and_values(pairs)
    if not hours:
        return []
    return _dense(hours, values, since=since, through=through)


def _hours_and_values(
    pairs: Iterable[tuple[datetime | int, float]],
) -> tuple[list[int], list[float]]:
    """``pairs`` as epoch hours and float savings, in their order."""
    hours: list[int] = []
    values: list[float] = []
    add_hour, add_value = hours.append, values.append
    for hour, value in pairs:
        add_hour(hour if isinstance(hour, int) else _epoch_hour(hour))
        add_value(float(value))
    return hours, values


def _dense(
    hours: list[int], values: list[float], *, since: int | None, through: int | None
) -> list[float]:
    """``dense_hours`` of non-empty hours and values: each hour's values summed in the order
    given (``np.add.at`` adds one at a time, from 0.0), 0.0 where none was given."""
    at = np.asarray(hours, np.int64)
    first, last = int(at.min()), int(at.max())
    if since is not None:
        first = min(first, since)
    if through is not None:
        last = max(last, through)
    out = np.zeros(last - first + 1)
    np.add.at(out, at - first, np.asarray(values, np.float64))
    return out.tolist()
