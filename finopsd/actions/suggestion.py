"""Suggestions: the ActionSpecs finopsd does not carry out itself, as what a person must do.

Every kind the analyzers emit has a home: those no configured actuator can
change (a vLLM deployment until its actuator exists, a fine-tune, a provider's
Batch API without a command consumer, a spend cap the gateway's file cannot
express) become a plan with ``expressible = False`` whose description says
what to do by hand. The controller keeps such an action ``proposed``.
"""

from __future__ import annotations

from typing import Any

from finopsd.actions.base import Actuator, Live, Plan, PlanContext, register, suggestion_plan
from finopsd.analyzers.base import ActionSpec

WHY = {
    "vllm": "finopsd does not change vLLM deployments yet",
    "finetune": "a fine-tune is a project for people: data, training, evaluation",
    "provider.batch": "no external controller takes batch commands "
    "(list provider.batch in actions.command.kinds once one does)",
    "gateway.rate_limit": "the proxy's config.yaml has no per-tenant spend cap "
    "(LiteLLM keeps budgets in its database)",
    "gateway": "no gateway is configured (actions.gateway.config_path)",
}


def todo(spec: ActionSpec) -> str:
    """What a person would do to carry ``spec`` out, in one sentence."""
    p = spec.params
    kind = spec.actuator
    if kind == "vllm.quantize":
        return (
            f"serve deployment {p.get('deployment')} as {p.get('variant')} "
            f"({p.get('quantization')}) on {p.get('gpus')} GPU(s)"
        )
    if kind == "vllm.scale":
        return f"scale deployment {p.get('deployment')} to {p.get('gpus')} GPU(s)"
    if kind == "vllm.prefix_caching":
        return f"start deployment {p.get('deployment')} with --enable-prefix-caching"
    if kind == "finetune":
        return f"fine-tune a small model on {_scope(p)} and evaluate it before routing to it"
    if kind == "provider.batch":
        where = _scope(p.get("match") or p)
        return f"send {where} through {p.get('provider') or 'the provider'}'s Batch API"
    if kind == "gateway.rate_limit":
        cap = p.get("max_usd_per_hour") or p.get("max_usd_per_day")
        per = "hour" if p.get("max_usd_per_hour") else "day"
        return f"cap {p.get('tenant')}'s spend at ${cap}/{per} in the gateway"
    if kind == "gateway.cache":
        return f"enable the gateway's {p.get('mode')} cache for {_scope(p.get('scope') or p)}"
    if kind == "gateway.route":
        weights = p.get("target_weights") or p.get("weights") or {}
        total = sum(weights.values()) or 1.0
        split = ", ".join(f"{w / total:.0%} to {m}" for m, w in sorted(weights.items()) if w)
        return f"route {_scope(p.get('match') or p)}: {split}"
    if kind == "gateway.cascade":
        return (
            f"for {_scope(p.get('match') or p)}, try {p.get('first')} first and escalate "
            f"to {p.get('escalate_to')} on errors or a quality below "
            f"{p.get('quality_threshold')}"
        )
    if kind == "gateway.max_tokens":
        return (
            f"cap {p.get('app')}/{p.get('feature')} prompts at "
            f"{p.get('max_input_tokens')} input tokens"
        )
    return f"carry out {kind} {p}"


def _scope(p: dict[str, Any]) -> str:
    keys = ("tenant", "app", "feature", "provider", "model")
    parts = [f"{k}={p[k]}" for k in keys if p.get(k)]
    return ", ".join(parts) or "the scope"


@register
class Suggestion(Actuator):
    """The home of every kind nothing else carries out: a plan that is never applied."""

    name = "suggestion"
    kinds = ()

    def __init__(self, why: str | None = None) -> None:
        self.why = why

    def plan(self, spec: ActionSpec, share: float | None, context: PlanContext) -> Plan:
        family = spec.actuator.split(".", 1)[0]
        why = self.why or WHY.get(spec.actuator) or WHY.get(family) or "no actuator for it"
        return suggestion_plan(spec, why, todo(spec))

    def apply(self, plan: Plan, action_id: str) -> dict[str, Any]:
        raise NotImplementedError("a suggestion is never applied")

    def observe(self, plan: Plan, action_id: str) -> Live:
        return "base"

    def rollback(self, plan: Plan, action_id: str) -> dict[str, Any]:
        return {}
