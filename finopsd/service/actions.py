"""``ControllerService``: the action controller's loop in the daemon, a ``Service``.

Its first tick runs at start (reconciling what a previous process left in flight),
then one every ``actions.interval_s``. A failing tick is logged and the next goes
ahead; ingest never waits on it. Transitions are published to ``actions.topic``
through ``KafkaEvents`` (the audit table is the outbox: what the broker did not
take is sent on a later tick).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from kafka import KafkaProducer

from finopsd.actions.controller import Controller
from finopsd.service.supervisor import Check

log = logging.getLogger(__name__)


class KafkaEvents:
    """Sends JSON events to one topic; ``send`` is True once the broker has the event."""

    def __init__(self, producer_factory: Callable[[], KafkaProducer], topic: str, timeout_s: float):
        self._factory = producer_factory
        self._producer: KafkaProducer | None = None
        self.topic = topic
        self.timeout_s = timeout_s

    def send(self, key: str, value: dict[str, Any]) -> bool:
        try:
            if self._producer is None:
                self._producer = self._factory()
            future = self._producer.send(
                self.topic, key=key.encode(), value=json.dumps(value, default=str).encode()
            )
            future.get(timeout=self.timeout_s)
            return True
        except Exception as exc:  # kept in the outbox; sent on a later tick
            log.warning("event for %s not sent to %s: %s", key, self.topic, exc)
            return False

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close(timeout=self.timeout_s)
            self._producer = None


class ControllerService:
    """See the module docstring."""

    name = "actions"

    def __init__(self, controller: Controller, interval_s: float, closers: list[Any]) -> None:
        self.controller = controller
        self.interval_s = interval_s
        self._closers = closers
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_tick: float | None = None
        self.last_error: str | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="actions", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            try:
                done = self.controller.tick()
                self.last_error = None
                if done.get("proposed") or done.get("advanced"):
                    log.info(
                        "actions: %d proposed, %d advanced, %d event(s) published",
                        done["proposed"],
                        done["advanced"],
                        done.get("published", 0),
                    )
            except Exception as exc:  # logged; the next tick tries again
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.error("actions tick failed: %s", self.last_error)
            self.last_tick = time.monotonic()
            if self._stop.wait(self.interval_s):
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        for closer in self._closers:
            try:
                closer.close()
            except Exception as exc:
                log.warning("closing %s: %s", type(closer).__name__, exc)

    def health(self) -> list[Check]:
        alive = self._thread is not None and self._thread.is_alive()
        return [Check("actions", alive, "" if alive else "the controller's thread ended")]
