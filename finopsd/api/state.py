"""``ServiceState``: what the HTTP API may see and ask of the running daemon.

(``Check`` is ``finopsd.service.supervisor.Check``, here for the API's handlers.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from finopsd.config import Settings
from finopsd.ingest.pipeline import IngestStats
from finopsd.pricing import PriceBook
from finopsd.service.supervisor import Check
from finopsd.store import Store


@dataclass
class ServiceState:
    """The daemon's parts the API reads; every callable is safe to call from any thread.

    ``liveness()``: the process's threads are alive. ``readiness()``: it can do its
    job (broker, partitions, store, lag). ``lag()``: records behind per (topic,
    partition), None where unknown. ``analyze(only, window_days)``: run analyzers
    now (one at a time with the schedule's runs) and return their ``AnalyzerRun``s.
    ``controller``: the action controller (its methods take its own lock).
    """

    store: Store
    settings: Settings
    prices: PriceBook
    stats: IngestStats
    liveness: Callable[[], list[Check]]
    readiness: Callable[[], list[Check]]
    lag: Callable[[], dict[tuple[str, int], int | None]]
    analyze: Callable[[list[str] | None, float | None], list[Any]]
    started_at: float = 0.0
    controller: Any = None  # finopsd.actions.controller.Controller; None: actions disabled
    extra: dict[str, Any] = field(default_factory=dict)


__all__ = ["Check", "ServiceState"]
