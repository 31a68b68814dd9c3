"""The shape every actuator has, and what it hands the controller.

An actuator changes one kind of target (a gateway's config, an external
controller through Kafka commands, …). The controller is its only caller and
records every step before and after it; an actuator itself keeps no state
between calls — everything it needs again is in the ``Plan`` (stored with the
action), so a restarted process can ``observe`` and finish what a killed one began.

- ``plan(spec, share, context)`` — a dry run: what would change, as a diff against
  the live target, with no side effects. ``expressible = False`` (and ``reason``)
  when this actuator cannot carry the spec out; the action then stays a suggestion.
- ``apply(plan, action_id)`` — make the plan live. Idempotent: applying a plan that
  is already live changes nothing; safe to repeat after a crash. Raises
  ``ActuatorError`` (the message says what failed) and leaves the target as it was
  or as the plan says, never half-way.
- ``observe(plan, action_id)`` — what is live now: ``"target"`` (the plan is live), ``"base"``
  (what the plan started from is live), ``"pending"`` (asked for, not confirmed yet:
  an external controller has not acknowledged), ``"refused"`` (it acknowledged a
  failure) or ``"other"`` (someone else changed it).
  The controller observes after every ``apply``: only ``"target"`` makes a step live.
- ``rollback(plan, action_id)`` — put ``plan.base`` back (byte for byte where the
  target is a file). Idempotent.

A new actuator is one module with a subclass of ``Actuator`` decorated with
``@register``; ``finopsd.actions.registry`` builds them from ``[actions]``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Literal, TypeVar

from finopsd.analyzers.base import ActionSpec

Live = Literal["target", "base", "pending", "refused", "other"]


class ActuatorError(RuntimeError):
    """Applying, observing or rolling back failed; the message says what and why."""


@dataclass
class Plan:
    """One step of an action, as data (stored as JSON with the action).

    ``base`` and ``target`` are the actuator's own descriptions of the state before and
    after (e.g. a file's text); ``diff`` is for people; ``share`` is the traffic the
    step moves (None: the change moves none, e.g. enabling a cache).
    """

    backend: str
    spec: dict[str, Any]
    expressible: bool
    description: str
    reason: str = ""
    diff: str = ""
    share: float | None = None
    base: dict[str, Any] = field(default_factory=dict)
    target: dict[str, Any] = field(default_factory=dict)
    detail: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        return cls(**data)

    @property
    def action_spec(self) -> ActionSpec:
        return ActionSpec(self.spec["actuator"], dict(self.spec.get("params") or {}))


@dataclass(frozen=True)
class PlanContext:
    """What a plan may need to know besides the spec: the finding behind it, and
    ``scope_share(models)``: the share of the recent requests to ``models`` (None: to
    any model) that fall in the finding's scope (1.0: a change to those models touches
    nothing else; None when there is no traffic to tell)."""

    finding_id: str
    scope: dict[str, Any]
    evidence: dict[str, Any]
    baseline_shares: dict[str, float] = field(default_factory=dict)
    scope_share: Callable[[Sequence[str] | None], float | None] = lambda models: None


class Actuator:
    """Base class of actuator plug-ins; see the module docstring for the contract."""

    name: ClassVar[str]  # the registry key, e.g. "litellm", "kafka_command", "suggestion"
    kinds: ClassVar[tuple[str, ...]]  # the ActionSpec kinds it can carry out
    moves_traffic: ClassVar[frozenset[str]] = frozenset()  # kinds stepped by canary

    def plan(self, spec: ActionSpec, share: float | None, context: PlanContext) -> Plan:
        raise NotImplementedError

    def apply(self, plan: Plan, action_id: str) -> dict[str, Any]:
        """Make ``plan`` live; returns details to record (e.g. a commit id)."""
        raise NotImplementedError

    def observe(self, plan: Plan, action_id: str) -> Live:
        raise NotImplementedError

    def rollback(self, plan: Plan, action_id: str) -> dict[str, Any]:
        raise NotImplementedError


REGISTRY: dict[str, type[Actuator]] = {}
A = TypeVar("A", bound=type[Actuator])


def register(cls: A) -> A:
    """Class decorator: make an actuator known by its ``name``."""
    REGISTRY[cls.name] = cls
    return cls


def suggestion_plan(spec: ActionSpec, why: str, todo: str) -> Plan:
    """A plan no actuator can carry out: what a person must do, and why finopsd cannot."""
    return Plan(
        backend="suggestion",
        spec=spec.as_dict(),
        expressible=False,
        description=todo,
        reason=why,
    )


Factory = Callable[..., Actuator]
