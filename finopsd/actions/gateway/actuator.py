"""The LiteLLM gateway actuator: findings carried out by editing the proxy's config.yaml.

What each ActionSpec kind becomes (``litellm_config`` makes the edit, a
``backends`` backend makes it live, ``wait_healthy`` says when it is):

- ``gateway.route`` (``match``, ``weights``): the ``litellm_params.weight`` of every
  deployment of the model group that serves ``match.model``, adding deployments of
  models the group lacks (copied from the config's own entry for that model).
  Weights belong to a model group, so the change is expressible only when the scope
  is (nearly) all of that group's traffic: ``min_scope_share`` of its recent requests.
- ``gateway.cache`` mode ``response``: ``litellm_settings.cache`` (type local, the
  finding's TTL). LiteLLM's response cache is proxy-wide, so only when the scope is
  ``min_scope_share`` of all recent traffic.
- ``gateway.cache`` mode ``prompt_prefix``: ``cache_control_injection_points`` on the
  group's deployments of providers that need the marker (Anthropic, Bedrock, …);
  the others cache by themselves. It changes cost, not answers: any scope.
- ``gateway.cascade``: not expressible — LiteLLM's fallbacks escalate on errors, not
  on a low quality score; the application must escalate (a suggestion).
- ``gateway.max_tokens``: not expressible — the spec asks for shorter prompts
  (retrieval's top-k); a gateway cannot shorten a prompt (a suggestion).

Models in specs are named as the usage events name them (LiteLLM logs
``litellm_params.model`` without its provider prefix): ``gpt-4o-mini`` matches a
deployment of ``openai/gpt-4o-mini``.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from finopsd.actions.base import Actuator, ActuatorError, Live, Plan, PlanContext, register
from finopsd.actions.gateway import backends, litellm_config
from finopsd.actions.gateway.litellm_config import (
    ConfigEdit,
    ConfigEditError,
    GatewayState,
    NotExpressible,
)
from finopsd.actions.suggestion import todo
from finopsd.analyzers.base import ActionSpec
from finopsd.config import GatewaySettings

log = logging.getLogger(__name__)

MIN_SCOPE_SHARE = 0.99


@register
class LiteLLMActuator(Actuator):
    """See the module docstring."""

    name = "litellm"
    kinds = ("gateway.cache", "gateway.route", "gateway.cascade", "gateway.max_tokens")

    def __init__(
        self,
        backend: backends.ConfigBackend,
        *,
        proxy_url: str | None = None,
        master_key: str | None = None,
        health_timeout_s: float = 120.0,
        min_scope_share: float = MIN_SCOPE_SHARE,
        filename: str = "config.yaml",
    ) -> None:
        self.backend = backend
        self.proxy_url = proxy_url
        self.master_key = master_key
        self.health_timeout_s = health_timeout_s
        self.min_scope_share = min_scope_share
        self.filename = filename

    @classmethod
    def from_settings(cls, g: GatewaySettings) -> LiteLLMActuator:
        assert g.config_path is not None
        backend: backends.ConfigBackend
        if g.backend == "git":
            assert g.git_repo is not None
            backend = backends.GitBackend(
                g.git_repo,
                str(g.config_path.resolve().relative_to(g.git_repo.resolve())),
                branch=g.git_branch,
                remote=g.git_remote,
                reload_command=g.reload_command,
                timeout_s=g.reload_timeout_s,
            )
        else:
            backend = backends.FileReloadBackend(
                g.config_path, g.reload_command, timeout_s=g.reload_timeout_s
            )
        key = (
            g.master_key_file.read_text().strip()
            if g.master_key_file is not None
            else os.environ.get("LITELLM_MASTER_KEY")
        )
        return cls(
            backend,
            proxy_url=g.proxy_url,
            master_key=key,
            health_timeout_s=g.health_timeout_s,
            filename=g.config_path.name,
        )

    # -- plan ------------------------------------------------------------------------------

    def plan(self, spec: ActionSpec, share: float | None, context: PlanContext) -> Plan:
        try:
            base = self.backend.current()
        except backends.BackendError as exc:
            raise ActuatorError(str(exc)) from None
        try:
            edit = self._edit(base, spec, context)
        except NotExpressible as exc:
            return self._suggestion(spec, exc.reason)
        except ConfigEditError as exc:
            return self._suggestion(spec, f"the gateway's config cannot take it: {exc}")
        state = litellm_config.read_state(edit.new_text)
        detail: dict[str, Any] = {"groups": sorted(state.groups)}
        if spec.actuator == "gateway.route":  # how events will name each model's answers
            detail["served_as"] = {
                m: _short(_deployment_model(state, m)) for m in spec.params.get("weights") or {}
            }
        return Plan(
            backend=self.name,
            spec=spec.as_dict(),
            expressible=True,
            description=edit.description,
            diff=edit.diff,
            share=share,
            base={"text": base},
            target={"text": edit.new_text},
            detail=detail,
        )

    def _suggestion(self, spec: ActionSpec, why: str) -> Plan:
        return Plan(
            backend=self.name,
            spec=spec.as_dict(),
            expressible=False,
            description=todo(spec),
            reason=why,
        )

    def _edit(self, text: str, spec: ActionSpec, context: PlanContext) -> ConfigEdit:
        p = spec.params
        kind = spec.actuator
        state = litellm_config.read_state(text)
        if kind == "gateway.route":
            model = (p.get("match") or {}).get("model")
            if not model:
                raise NotExpressible("the route names no model: no model group to change")
            group = _group_of(state, model)
            models = [d.model for d in state.groups[group]]
            self._exclusive(context, [_short(m) for m in models], f"model group {group!r}")
            shares = {_deployment_model(state, m): float(w) for m, w in p["weights"].items()}
            return litellm_config.set_weights(text, group, shares, filename=self.filename)
        if kind == "gateway.cache" and p.get("mode") == "response":
            self._exclusive(context, None, "this proxy (its response cache is proxy-wide)")
            ttl = p.get("ttl_s")
            return litellm_config.enable_response_cache(
                text, ttl_s=float(ttl) if ttl is not None else None, filename=self.filename
            )
        if kind == "gateway.cache":
            group = _group_of(state, str(p.get("model")))
            return litellm_config.set_prompt_caching(text, group, filename=self.filename)
        if kind == "gateway.cascade":
            raise NotExpressible(
                "LiteLLM's fallbacks escalate on errors, not on a low quality score: the "
                f"application must try {p.get('first')} first and escalate to "
                f"{p.get('escalate_to')} below {p.get('quality_threshold')}"
            )
        if kind == "gateway.max_tokens":
            raise NotExpressible(
                "a gateway cannot shorten prompts: the application's retrieval must send "
                "fewer tokens (top-k x "
                f"{p.get('rag_top_k_scale')}, at most {p.get('max_input_tokens')} input tokens)"
            )
        raise NotExpressible(f"{kind} is not something the gateway's config holds")

    def _exclusive(self, context: PlanContext, models: list[str] | None, what: str) -> None:
        share = context.scope_share(models)
        if share is not None and share < self.min_scope_share:
            raise NotExpressible(
                f"only {share:.0%} of the recent requests to {what} are in the finding's "
                f"scope {_scope_text(context.scope)}: the change would move the others too "
                f"(give the scope a model group of its own, e.g. with a key alias, first)"
            )

    # -- apply, observe, rollback -----------------------------------------------------------

    def apply(self, plan: Plan, action_id: str) -> dict[str, Any]:
        return self._put(plan, action_id, plan.target["text"], plan.base["text"], "apply")

    def rollback(self, plan: Plan, action_id: str) -> dict[str, Any]:
        return self._put(plan, action_id, plan.base["text"], None, "rollback")

    def _put(
        self, plan: Plan, action_id: str, text: str, expect: str | None, step: str
    ) -> dict[str, Any]:
        call = self.backend.apply if step == "apply" else self.backend.rollback
        try:
            change = call(text, action_id=action_id, description=plan.description, expect=expect)
        except backends.BackendError as exc:
            raise ActuatorError(str(exc)) from None
        out: dict[str, Any] = change.as_dict()
        if self.proxy_url:
            groups = set(litellm_config.read_state(text).groups)
            try:
                backends.wait_healthy(
                    self.proxy_url, self.master_key, groups, timeout_s=self.health_timeout_s
                )
            except backends.BackendError as exc:
                raise ActuatorError(f"after the reload: {exc}") from None
            out["healthy"] = True
        return out

    def observe(self, plan: Plan, action_id: str) -> Live:
        try:
            live = self.backend.current()
        except backends.BackendError as exc:
            raise ActuatorError(str(exc)) from None
        if live == plan.target.get("text"):
            return "target"
        return "base" if live == plan.base.get("text") else "other"


def _short(model: str) -> str:
    """``openai/gpt-4o-mini`` as LiteLLM logs it: ``gpt-4o-mini``."""
    return model.split("/", 1)[1] if "/" in model else model


def _matches(deployment_model: str, name: str) -> bool:
    return deployment_model == name or _short(deployment_model) == name


def _group_of(state: GatewayState, model: str) -> str:
    """The model group that serves ``model`` (a group of that name first)."""
    if model in state.groups:
        return model
    found = [g for g, ds in state.groups.items() if any(_matches(d.model, model) for d in ds)]
    if len(found) == 1:
        return found[0]
    if not found:
        raise NotExpressible(f"no model group of the gateway serves {model!r}")
    raise NotExpressible(f"{model!r} is served by several model groups ({', '.join(found)})")


def _deployment_model(state: GatewayState, model: str) -> str:
    """The ``litellm_params.model`` string of ``model`` in this config."""
    for deployments in state.groups.values():
        for d in deployments:
            if _matches(d.model, model):
                return d.model
    if state.groups.get(model):
        return state.groups[model][0].model
    raise NotExpressible(
        f"the gateway has no deployment of {model!r} to send traffic to (add one to "
        "model_list first)"
    )


def _scope_text(scope: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in scope.items() if k != "model") or "(all)"
