"""Which actuator carries out each ActionSpec kind, built from ``[actions]``.

- ``gateway.cache``, ``gateway.route``, ``gateway.cascade``, ``gateway.max_tokens``:
  the LiteLLM actuator when ``actions.gateway.config_path`` is set;
- the kinds listed in ``actions.command.kinds``: Kafka commands to an external
  controller;
- everything else (``vllm.*`` for now, ``finetune``, ``gateway.rate_limit``, and the
  above when nothing is configured): a suggestion that says what a person must do.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from finopsd.actions.base import Actuator
from finopsd.actions.suggestion import WHY, Suggestion
from finopsd.config import Settings

GATEWAY_KINDS = ("gateway.cache", "gateway.route", "gateway.cascade", "gateway.max_tokens")


def build_actuators(
    settings: Settings,
    *,
    send_command: Callable[[str, dict[str, Any]], bool] | None = None,
    ack_reader: Any = None,
) -> dict[str, Actuator]:
    """Actuator per kind (kinds left out get the controller's suggestion fallback)."""
    a = settings.actions
    out: dict[str, Actuator] = {}
    if a.gateway.config_path is not None:
        from finopsd.actions.gateway.actuator import LiteLLMActuator

        gateway = LiteLLMActuator.from_settings(a.gateway)
        for kind in GATEWAY_KINDS:
            out[kind] = gateway
    else:
        for kind in GATEWAY_KINDS:
            out[kind] = Suggestion(WHY["gateway"])
    if a.command.kinds and send_command is not None and ack_reader is not None:
        from finopsd.actions.command import KafkaCommand

        command = KafkaCommand(send_command, ack_reader, a.command.topic)
        for kind in a.command.kinds:
            out[kind] = command
    return out
