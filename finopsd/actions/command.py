"""Kafka commands: changes finopsd asks an external controller to make.

For what finopsd cannot change itself (moving traffic to a provider's Batch API, a
change in a system only its owner may touch), the action is published as a command
event on ``actions.command.topic`` (key: the action id)::

    {"command_id": "a-1b2c3d4e5f6a/apply/1", "op": "apply" | "rollback",
     "action_id": "a-1b2c3d4e5f6a", "finding_id": "...", "kind": "provider.batch",
     "params": {...}, "scope": {...}, "what": "send ... through ...'s Batch API"}

and the step is live once the controller's acknowledgement (``finopsd.actions.acks``)
says ``done``; ``failed`` rolls the action back (a ``rollback`` command, not waited
for), and so does no acknowledgement within ``actions.command.timeout_s``.
``command_id`` is the same each time the same step is sent (after a crash, say): the
external controller must treat a repeat as the one command it already has.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from finopsd.actions.acks import AckReader
from finopsd.actions.base import Actuator, ActuatorError, Live, Plan, PlanContext, register
from finopsd.actions.suggestion import todo
from finopsd.analyzers.base import ActionSpec

Send = Callable[[str, dict[str, Any]], bool]  # (key, event) -> delivered


@register
class KafkaCommand(Actuator):
    """See the module docstring."""

    name = "kafka_command"
    kinds = ()

    def __init__(self, send: Send, acks: AckReader, topic: str) -> None:
        self.send = send
        self.acks = acks
        self.topic = topic

    def plan(self, spec: ActionSpec, share: float | None, context: PlanContext) -> Plan:
        what = todo(spec)
        command = {
            "kind": spec.actuator,
            "params": spec.params,
            "scope": context.scope,
            "finding_id": context.finding_id,
            "what": what,
        }
        text = json.dumps(command, indent=2, sort_keys=True, default=str)
        return Plan(
            backend=self.name,
            spec=spec.as_dict(),
            expressible=True,
            description=f"ask the external controller (topic {self.topic}) to {what}",
            diff="".join(f"+{line}\n" for line in text.splitlines()),
            share=share,
            target={"command": command},
        )

    def _command_id(self, action_id: str, op: str, plan: Plan) -> str:
        return f"{action_id}/{op}/{plan.detail.get('step', 1)}"

    def _publish(self, op: str, plan: Plan, action_id: str) -> dict[str, Any]:
        command_id = self._command_id(action_id, op, plan)
        event = {"command_id": command_id, "op": op, "action_id": action_id}
        event.update(plan.target["command"])
        if not self.send(action_id, event):
            raise ActuatorError(f"command {command_id} not delivered to {self.topic}")
        return {"command_id": command_id, "topic": self.topic}

    def apply(self, plan: Plan, action_id: str) -> dict[str, Any]:
        return self._publish("apply", plan, action_id)

    def observe(self, plan: Plan, action_id: str) -> Live:
        ack = self.acks.get(self._command_id(action_id, "apply", plan))
        if ack is None:
            return "pending"
        return "target" if ack["status"] == "done" else "refused"

    def rollback(self, plan: Plan, action_id: str) -> dict[str, Any]:
        return self._publish("rollback", plan, action_id)
