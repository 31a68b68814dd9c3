"""The shape every analyzer has, and the Finding it returns.

An analyzer reads the store (DuckDB SQL; polars or scipy where SQL is not
enough) and returns ``Finding``s: waste it found, with the evidence, the money
it would save per month, how sure it is, what could go wrong, and the
``ActionSpec`` that would realise the saving. Analyzers never change the world;
the only thing one may write is its own derived tables (rollups, state) in the
store, through ``Context.write``.

A new analyzer is one module in ``finopsd/analyzers/`` with a subclass of
``Analyzer`` decorated with ``@register``; the runner discovers it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, ClassVar, Literal, TypeVar

import duckdb
from pydantic import BaseModel, ConfigDict, Field

from finopsd.pricing import PriceBook

Risk = Literal["low", "medium", "high"]
T = TypeVar("T")

DAYS_PER_MONTH = 30.4375
"""Average days in a month: monthly figures are daily rates times this."""


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
            "savings_method": self.savings_method,
            "confidence": self.confidence,
            "risk": self.risk,
            "action": self.action.as_dict() if self.action else None,
        }


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


@dataclass
class Context:
    """What an analyzer run may use: a connection to read, the window, prices, the time."""

    con: duckdb.DuckDBPyConnection
    window: Window
    now: datetime
    prices: PriceBook
    write: Callable[[Callable[[duckdb.DuckDBPyConnection], Any]], Any]
    """``write(fn)`` runs ``fn(connection)`` in one store transaction (derived tables only)."""


class Analyzer:
    """Base of every analyzer: ``run(ctx) -> list[Finding]``, reading only."""

    name: ClassVar[str]
    description: ClassVar[str]
    Options: ClassVar[type[Options]] = Options
    order: ClassVar[int] = 100
    """Lower runs first: rollups others read (spend) come before their readers."""

    def __init__(self, options: Options | None = None) -> None:
        self.options = options if options is not None else self.Options()

    def run(self, ctx: Context) -> list[Finding]:
        raise NotImplementedError


ANALYZERS: dict[str, type[Analyzer]] = {}
"""Analyzer classes by name, filled by ``@register``."""


def register(cls: type[Analyzer]) -> type[Analyzer]:
    """Class decorator: make an analyzer known by its ``name``."""
    if cls.name in ANALYZERS and ANALYZERS[cls.name] is not cls:
        raise ValueError(f"two analyzers are named {cls.name!r}")
    ANALYZERS[cls.name] = cls
    return cls


def monthly(amount: float, window: Window) -> float:
    """An amount seen over ``window``, as a monthly rate."""
    return amount / window.days * DAYS_PER_MONTH if window.days > 0 else 0.0
