"""Reads the acknowledgements external controllers publish for finopsd's commands.

An acknowledgement is a JSON object on ``actions.command.ack_topic``::

    {"command_id": "a-1b2c3d4e5f6a/apply/1", "status": "done" | "failed",
     "detail": "what happened (optional)"}

``AckReader`` reads the whole topic from its start (acknowledgements are few and
small) and then what arrives, keeping the latest acknowledgement per command id.
It only reads: ``finopsd.actions.command`` publishes the commands.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from kafka import KafkaConsumer
from kafka.structs import TopicPartition

log = logging.getLogger(__name__)


class AckReader:
    """The latest acknowledgement per command id; ``get`` polls what is new first."""

    def __init__(self, consumer_factory: Callable[[], KafkaConsumer], topic: str) -> None:
        self._factory = consumer_factory
        self.topic = topic
        self._consumer: KafkaConsumer | None = None
        self._acks: dict[str, dict[str, Any]] = {}

    def _poll(self) -> None:
        if self._consumer is None:
            consumer = self._factory()
            partitions = consumer.partitions_for_topic(self.topic) or set()
            tps = [TopicPartition(self.topic, p) for p in sorted(partitions)]
            if not tps:
                consumer.close()
                return  # no topic yet: nobody has acknowledged anything
            consumer.assign(tps)
            consumer.seek_to_beginning(*tps)
            self._consumer = consumer
        for records in self._consumer.poll(timeout_ms=200, max_records=10_000).values():
            for record in records:
                try:
                    ack = json.loads(record.value)
                    command_id = str(ack["command_id"])
                    if ack.get("status") not in ("done", "failed"):
                        raise ValueError(f"status {ack.get('status')!r}")
                except (ValueError, KeyError, TypeError) as exc:
                    log.warning(
                        "%s[%d]@%d: not an acknowledgement (%s); ignored",
                        record.topic,
                        record.partition,
                        record.offset,
                        exc,
                    )
                    continue
                self._acks[command_id] = ack

    def get(self, command_id: str) -> dict[str, Any] | None:
        """The latest acknowledgement of ``command_id``, None if none has arrived."""
        try:
            self._poll()
        except Exception as exc:  # the broker away: what was read still counts
            log.warning("acknowledgements not read: %s", exc)
        return self._acks.get(command_id)

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None
