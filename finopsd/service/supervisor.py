"""Services of one shape under one supervisor.

A ``Service`` has a ``name``, ``start()`` (returns once it runs, or raises naming what
stopped it), ``stop()`` (returns once it has finished; safe to call twice) and
``health()`` (its ``Check``s; any thread may ask). The daemon builds its services
from settings and hands them to a ``Supervisor``, which starts them in order, stops
them in reverse order (ingest, started last, stops first: its final batch is
stored while everything it may need still runs) and reports their health as one
list. Adding a component is one more service in that list.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Check:
    """One health or readiness check: its name, whether it passed, and why not."""

    name: str
    ok: bool
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "detail": self.detail}


class Service(Protocol):
    name: str

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def health(self) -> list[Check]: ...


class Supervisor:
    """Starts ``services`` in order and stops the started ones in reverse."""

    def __init__(self, services: Sequence[Service]) -> None:
        self.services = list(services)
        self._started: list[Service] = []

    def start(self) -> None:
        """Start each service; if one fails, stop those already started, then raise."""
        for service in self.services:
            try:
                service.start()
            except BaseException:
                self.stop()
                raise
            self._started.append(service)

    def stop(self) -> None:
        """Stop the started services, last first; a failing stop is logged, the rest go on."""
        while self._started:
            service = self._started.pop()
            try:
                service.stop()
            except Exception as exc:
                log.error("stopping %s failed: %s", service.name, exc)

    def health(self) -> list[Check]:
        """Every started service's checks, in start order."""
        return [check for service in list(self._started) for check in service.health()]
