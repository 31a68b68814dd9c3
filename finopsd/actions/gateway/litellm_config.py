"""Edits of a LiteLLM proxy ``config.yaml``, as pure functions of its text.

Every edit takes the file's text and returns a ``ConfigEdit``: the old text, the
new text, a unified diff and a one-line description. Nothing is read or written;
``finopsd.actions.gateway.backends`` makes a new text live. An edit is idempotent:
applied to its own output it returns the same text and an empty diff.

**What stays as it was.** The file is parsed with ruamel.yaml (round-trip mode) only
to find where things are; the change is then spliced into the text, so every byte
outside the changed nodes is kept: comments, blank lines, key order, quoting,
indentation (also where it differs from one block to the next), flow style. A
changed scalar keeps its trailing comment; a changed flow collection is rewritten
as JSON (which YAML reads), a block one in the file's block style. After each
splice the new text is parsed again and its data compared, type for type, with the
data the edit intends; a mismatch raises ``ConfigEditError`` instead of returning a
text LiteLLM would read differently. Nodes behind YAML anchors, aliases or merge
keys (``<<``) are shared with other places and are not edited.

**LiteLLM's keys, as its documentation and code have them** (litellm 1.108+,
docs.litellm.ai and BerriAI/litellm):

- ``model_list``: deployments; entries sharing a ``model_name`` form a model group,
  ``litellm_params.model`` is what each calls (/docs/proxy/configs).
- ``litellm_params.weight``: the weighted pick of the default routing strategy,
  ``simple-shuffle`` (/docs/routing, "Weight-based shuffling";
  ``litellm/router_strategy/simple_shuffle.py``). The router reads the first healthy
  deployment's ``weight``; if set, every deployment's ``weight`` counts and a missing
  one counts 0 (so finopsd sets it on every deployment of the group). Weights do
  nothing under other strategies: ``set_weights`` raises ``NotExpressible`` there.
- ``router_settings.fallbacks``: ``[{group: [fallback groups]}]``, tried in order
  after a group fails (num_retries); ``litellm_settings.fallbacks`` is the module-level
  form, used when the router has none (``self.fallbacks = fallbacks or
  litellm.fallbacks``) (/docs/proxy/reliability). Fallbacks fire on errors, not on
  answer quality.
- ``litellm_settings.cache`` + ``litellm_settings.cache_params``: ``type`` (``local``
  is in-process memory, one per worker), ``ttl``, ``supported_call_types`` (which
  call types are cached), ``mode: default_off`` (opt-in per request)
  (/docs/proxy/caching). The response cache is proxy-wide: no key limits it to
  model groups, so ``enable_response_cache(model_groups=...)`` raises
  ``NotExpressible`` unless the groups are all of them.
- ``litellm_params.cache_control_injection_points``: a list of
  ``{location: message, role: system|user|assistant, index?, control?}`` (and
  ``{location: tool_config}`` for Bedrock) for providers that cache a prompt only
  where ``cache_control`` marks it (/docs/tutorials/prompt_caching;
  ``litellm/types/integrations/anthropic_cache_control_hook.py``).
- ``litellm_params.max_tokens``: a *default*, not a cap. The router calls the
  provider with ``{**litellm_params, ..., **kwargs}`` (``Router._acompletion``), so a
  request's own ``max_tokens`` wins; the config cannot cap it. ``set_max_tokens``
  raises ``NotExpressible`` for a cap and writes the default only when asked to.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import YAMLError

__all__ = [
    "CACHE_CALL_TYPES",
    "CACHE_TYPES",
    "DEFAULT_INJECTION_POINTS",
    "CacheState",
    "ConfigEdit",
    "ConfigEditError",
    "Deployment",
    "EditResult",
    "GatewayState",
    "NotExpressible",
    "disable_response_cache",
    "enable_response_cache",
    "load_config",
    "read_state",
    "set_fallbacks",
    "set_max_tokens",
    "set_prompt_caching",
    "set_weights",
    "shares_to_weights",
    "unified_diff",
]

# docs.litellm.ai/docs/proxy/caching: cache_params.type and supported_call_types
CACHE_TYPES = frozenset(
    {"local", "redis", "redis-semantic", "valkey-semantic", "qdrant-semantic", "s3", "gcs", "disk"}
)
CACHE_CALL_TYPES = frozenset(
    {
        "completion",
        "acompletion",
        "text_completion",
        "atext_completion",
        "embedding",
        "aembedding",
        "transcription",
        "atranscription",
        "aresponses",
    }
)
CACHE_MODES = frozenset({"default_on", "default_off"})
# docs.litellm.ai/docs/tutorials/prompt_caching: providers that take a cache_control
# marker, and those that cache prompts by themselves (no marker needed)
MARKER_PROVIDERS = frozenset(
    {
        "anthropic",
        "bedrock",
        "vertex_ai",
        "gemini",
        "azure_ai",
        "openrouter",
        "databricks",
        "dashscope",
        "minimax",
        "zai",
    }
)
AUTOMATIC_PROVIDERS = frozenset({"openai", "deepseek", "xai"})
DEFAULT_INJECTION_POINTS: tuple[dict[str, Any], ...] = ({"location": "message", "role": "system"},)
WEIGHT_RESOLUTION = 100  # shares become integer weights in hundredths, reduced by their gcd


class ConfigEditError(ValueError):
    """The edit cannot be made to this file (not valid YAML, unknown model group, a
    shared node, …); the message says what."""


class NotExpressible(ConfigEditError):
    """LiteLLM's config.yaml has no way to say this; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class ConfigEdit:
    """One edit of a config file's text. ``diff`` is empty iff nothing changed."""

    old_text: str
    new_text: str
    diff: str
    description: str

    @property
    def changed(self) -> bool:
        return self.old_text != self.new_text


EditResult = ConfigEdit


# -- reading ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Deployment:
    """One ``model_list`` entry, as LiteLLM reads it."""

    index: int  # position in model_list
    model_name: str  # the model group
    model: str  # litellm_params.model
    weight: float | None = None
    rpm: float | None = None
    tpm: float | None = None
    max_tokens: int | None = None
    cache_control_injection_points: tuple[dict[str, Any], ...] | None = None
    model_id: str | None = None  # model_info.id


@dataclass(frozen=True)
class CacheState:
    """The response cache (``litellm_settings.cache`` and ``cache_params``)."""

    enabled: bool
    type: str | None = None  # None: LiteLLM's default
    ttl: float | None = None
    supported_call_types: tuple[str, ...] | None = None  # None: every call type
    mode: str | None = None  # None: default_on
    params: dict[str, Any] = field(default_factory=dict)  # cache_params as written


@dataclass(frozen=True)
class GatewayState:
    """What a config says the proxy does: its groups, their weights, the fallbacks, the
    cache. ``fallbacks`` is the effective list (router_settings' if it has any, else
    litellm_settings'); ``fallbacks_key`` says where it is written (None: nowhere)."""

    groups: dict[str, tuple[Deployment, ...]]
    routing_strategy: str
    fallbacks: dict[str, tuple[str, ...]]
    fallbacks_key: str | None
    cache: CacheState

    def shares(self, group: str) -> dict[str, float] | None:
        """The share of the group's traffic each ``litellm_params.model`` gets under
        ``simple-shuffle`` with every deployment healthy (weight, else rpm, else tpm,
        else uniform, as ``simple_shuffle.py`` picks); None under another strategy,
        where the config does not fix the shares."""
        deployments = self.groups[group]
        if self.routing_strategy != "simple-shuffle" or not deployments:
            return None
        first = deployments[0]
        for attr in ("weight", "rpm", "tpm"):
            if getattr(first, attr) is not None:
                values = [float(getattr(d, attr) or 0) for d in deployments]
                break
        else:
            values = [1.0] * len(deployments)
        total = sum(values)
        out: dict[str, float] = {}
        for d, v in zip(deployments, values, strict=True):
            out[d.model] = out.get(d.model, 0.0) + (v / total if total > 0 else 0.0)
        return out


def load_config(text: str) -> CommentedMap:
    """Parse a config's text (round-trip: comments and positions kept); the top level
    must be a mapping. Raises ``ConfigEditError``."""
    try:
        data = _yaml().load(text)
    except YAMLError as e:
        raise ConfigEditError(f"not valid YAML: {e}") from e
    if data is None:
        data = CommentedMap()
    if not isinstance(data, CommentedMap):
        raise ConfigEditError("the config's top level is not a mapping")
    return data


def read_state(text: str) -> GatewayState:
    """What ``text`` configures: model groups, weights, fallbacks, response cache."""
    data = _plain(load_config(text))
    groups: dict[str, list[Deployment]] = {}
    for i, entry in enumerate(_model_list(data)):
        params = entry.get("litellm_params") or {}
        info = entry.get("model_info") or {}
        points = params.get("cache_control_injection_points")
        groups.setdefault(str(entry.get("model_name")), []).append(
            Deployment(
                index=i,
                model_name=str(entry.get("model_name")),
                model=str(params.get("model")),
                weight=params.get("weight"),
                rpm=params.get("rpm"),
                tpm=params.get("tpm"),
                max_tokens=params.get("max_tokens"),
                cache_control_injection_points=tuple(points) if points is not None else None,
                model_id=info.get("id") if isinstance(info, dict) else None,
            )
        )
    router = data.get("router_settings") or {}
    litellm = data.get("litellm_settings") or {}
    key, entries = _fallbacks_location(data)
    fallbacks: dict[str, tuple[str, ...]] = {}
    for item in entries:
        for group, targets in (item or {}).items():
            fallbacks.setdefault(str(group), tuple(str(t) for t in targets or ()))
    params = litellm.get("cache_params") or {}
    call_types = params.get("supported_call_types")
    cache = CacheState(
        enabled=bool(litellm.get("cache")),
        type=params.get("type"),
        ttl=params.get("ttl"),
        supported_call_types=tuple(call_types) if call_types is not None else None,
        mode=params.get("mode"),
        params=dict(params),
    )
    return GatewayState(
        groups={g: tuple(ds) for g, ds in groups.items()},
        routing_strategy=str(router.get("routing_strategy") or "simple-shuffle"),
        fallbacks=fallbacks,
        fallbacks_key=key if entries else None,
        cache=cache,
    )


# -- edits --------------------------------------------------------------------------------


def shares_to_weights(shares: Sequence[float], resolution: int = WEIGHT_RESOLUTION) -> list[int]:
    """Integer weights with the given shares' proportions: the shares (any positive
    total) in units of 1/``resolution`` (largest remainders, so they sum to
    ``resolution``; a positive share never rounds to 0), divided by their gcd.
    ``[0.9, 0.1]`` → ``[9, 1]``; ``[0.45, 0.45, 0.1]`` → ``[9, 9, 2]``."""
    values = [float(s) for s in shares]
    if any(not math.isfinite(v) or v < 0 for v in values):
        raise ConfigEditError(f"shares must be finite and non-negative: {values}")
    total = sum(values)
    if total <= 0:
        raise ConfigEditError("shares must not all be zero: a group needs some traffic")
    exact = [v / total * resolution for v in values]
    units = [math.floor(x) for x in exact]
    raised = {i for i, v in enumerate(values) if v > 0 and units[i] == 0}
    for i in raised:
        units[i] = 1
    rest = [i for i in range(len(exact)) if i not in raised]
    order = sorted(rest, key=lambda i: (units[i] - exact[i], i))
    for i in order[: max(resolution - sum(units), 0)]:
        units[i] += 1
    g = math.gcd(*[u for u in units if u]) or 1
    return [u // g for u in units]


def set_weights(
    text: str, group: str, shares: Mapping[str, float], *, filename: str = "config.yaml"
) -> ConfigEdit:
    """Send ``shares`` of ``group``'s traffic to each ``litellm_params.model``.

    ``shares`` maps a model string (as in ``litellm_params.model``) to its share (any
    non-negative numbers; they are normalised). Every deployment of the group gets an
    integer ``litellm_params.weight`` (``shares_to_weights``); deployments of the same
    model split its share evenly; a model of the group missing from ``shares`` gets 0
    (it stays defined and is never picked; should only zero-weight deployments be
    healthy, LiteLLM's weighted pick has no positive weight and the request fails). A model with
    a positive share that the group lacks is added as a deployment of the group right
    after its last one, its ``litellm_params`` copied from the first ``model_list``
    entry that calls that model (credentials, api_base, rpm/tpm limits and all; not its
    ``model_info``). Raises ``NotExpressible`` unless the routing strategy is
    ``simple-shuffle``, ``ConfigEditError`` for an unknown group or model.
    """
    data = _plain(load_config(text))
    entries = _model_list(data)
    members = _group_indices(entries, group)
    strategy = str((data.get("router_settings") or {}).get("routing_strategy") or "simple-shuffle")
    if strategy != "simple-shuffle":
        raise NotExpressible(
            f"litellm_params.weight is read only by the simple-shuffle routing strategy; "
            f"this proxy routes with {strategy!r} (router_settings.routing_strategy)"
        )
    wanted = {str(m): float(s) for m, s in shares.items()}
    present = [str((entries[i].get("litellm_params") or {}).get("model")) for i in members]
    added: list[tuple[str, dict[str, Any]]] = []
    for model, share in wanted.items():
        if share > 0 and model not in present:
            source = next(
                (
                    e.get("litellm_params")
                    for e in entries
                    if (e.get("litellm_params") or {}).get("model") == model
                ),
                None,
            )
            if source is None:
                raise ConfigEditError(
                    f"model {model!r} is not defined anywhere in model_list, so there are no "
                    f"litellm_params (credentials, api_base) to give a new deployment of "
                    f"{group!r}; add it to the config first"
                )
            params = {k: copy.deepcopy(v) for k, v in source.items() if k != "weight"}
            added.append((model, params))
    models = present + [m for m, _ in added]
    counts = {m: models.count(m) for m in models}
    weights = shares_to_weights([wanted.get(m, 0.0) / counts[m] for m in models])
    changes: list[_Change] = []
    for i, w in zip(members, weights, strict=False):
        if _typed((entries[i].get("litellm_params") or {}).get("weight")) != _typed(w):
            changes.append(_Set(("model_list", i, "litellm_params", "weight"), w))
    last = members[-1]
    for k, ((model, params), w) in enumerate(zip(added, weights[len(members) :], strict=True)):
        params["weight"] = w
        source_group = next(
            e.get("model_name")
            for e in entries
            if (e.get("litellm_params") or {}).get("model") == model
        )
        changes.append(
            _Insert(
                ("model_list",),
                last + 1 + k,
                {"model_name": group, "litellm_params": params},
                comment=f"added by finopsd: litellm_params from model group {source_group!r}",
            )
        )
    mix = ", ".join(f"{m}={w}" for m, w in zip(models, weights, strict=True))
    what = f"model group {group!r}: weights {mix}"
    if added:
        what += " (adds a deployment of " + ", ".join(m for m, _ in added) + ")"
    return _edit(text, changes, what, filename)


def set_fallbacks(
    text: str, group: str, fallbacks: Sequence[str], *, filename: str = "config.yaml"
) -> ConfigEdit:
    """Make ``group`` fall back to ``fallbacks`` (model groups, tried in order) when its
    call fails: a cascade that tries the cheap group first and the strong one after.
    An empty ``fallbacks`` removes the group's entry. The list is edited where LiteLLM
    reads it from: ``router_settings.fallbacks`` if it has entries, else
    ``litellm_settings.fallbacks`` if that has, else a new ``router_settings.fallbacks``.
    Other groups' entries are kept, in order."""
    data = _plain(load_config(text))
    entries = _model_list(data)
    names = {str(e.get("model_name")) for e in entries}
    # a fallback may also name one deployment by its model_info.id (/docs/proxy/reliability)
    ids = {str((e.get("model_info") or {}).get("id")) for e in entries if e.get("model_info")}
    for g in (group, *fallbacks):
        if g not in names and not (g != group and g in ids):
            raise ConfigEditError(
                f"{g!r} is not a model group of this config (groups: {sorted(names)})"
            )
    if group in fallbacks:
        raise ConfigEditError(f"{group!r} cannot fall back to itself")
    key, entries = _fallbacks_location(data)
    section = key.split(".")[0]
    new: list[dict[str, list[str]]] = []
    placed = False
    for item in entries:
        if isinstance(item, dict) and group in item:
            if not placed and fallbacks:
                new.append({group: list(fallbacks)})
            placed = True
            rest = {k: v for k, v in item.items() if k != group}
            if rest:
                new.append(rest)
        else:
            new.append(item)
    if not placed and fallbacks:
        new.append({group: list(fallbacks)})
    changes: list[_Change] = []
    exists = "fallbacks" in (data.get(section) or {})
    if new and not _same(new, entries):
        changes.append(_Set((section, "fallbacks"), new))
    elif not new and exists and entries:
        changes.append(_Delete((section, "fallbacks")))
    if fallbacks:
        what = f"{key}: {group!r} falls back to " + ", ".join(repr(f) for f in fallbacks)
    else:
        what = f"{key}: no fallbacks for {group!r}"
    return _edit(text, changes, what, filename)


def enable_response_cache(
    text: str,
    *,
    ttl_s: float | None = None,
    cache_type: str = "local",
    supported_call_types: Sequence[str] | None = None,
    mode: Literal["default_on", "default_off"] | None = None,
    model_groups: Collection[str] | None = None,
    filename: str = "config.yaml",
) -> ConfigEdit:
    """Turn LiteLLM's response cache on: ``litellm_settings.cache: true`` and, in
    ``cache_params``, ``type`` (default ``local``: in-process memory, one cache per
    worker), ``ttl`` (seconds) if given, ``supported_call_types`` if given (only those
    call types are cached), ``mode`` if given (``default_off``: only requests that ask
    for it). Other ``cache_params`` keys are kept. ``model_groups`` must be None or
    every group: LiteLLM's cache is proxy-wide (``NotExpressible`` otherwise)."""
    data = _plain(load_config(text))
    if model_groups is not None:
        groups = {str(e.get("model_name")) for e in _model_list(data)}
        if set(model_groups) != groups:
            raise NotExpressible(
                "LiteLLM's response cache is proxy-wide: litellm_settings.cache_params can "
                "limit it to call types (supported_call_types) or make it opt-in per request "
                "(mode: default_off), but no key limits it to model groups "
                f"(asked for {sorted(model_groups)})"
            )
    if cache_type not in CACHE_TYPES:
        raise ConfigEditError(f"cache type {cache_type!r}; valid: {sorted(CACHE_TYPES)}")
    if supported_call_types is not None:
        unknown = [c for c in supported_call_types if c not in CACHE_CALL_TYPES]
        if unknown:
            raise ConfigEditError(
                f"unknown call types {unknown}; valid: {sorted(CACHE_CALL_TYPES)}"
            )
    if mode is not None and mode not in CACHE_MODES:
        raise ConfigEditError(f"cache mode {mode!r}; valid: {sorted(CACHE_MODES)}")
    if ttl_s is not None and not (math.isfinite(ttl_s) and ttl_s > 0):
        raise ConfigEditError(f"ttl must be a positive number of seconds, not {ttl_s}")
    settings = data.get("litellm_settings") or {}
    params = settings.get("cache_params") or {}
    changes: list[_Change] = []
    if settings.get("cache") is not True:
        changes.append(_Set(("litellm_settings", "cache"), True))
    wanted: dict[str, Any] = {"type": cache_type}
    if ttl_s is not None:
        wanted["ttl"] = int(ttl_s) if float(ttl_s).is_integer() else float(ttl_s)
    if supported_call_types is not None:
        wanted["supported_call_types"] = list(supported_call_types)
    if mode is not None:
        wanted["mode"] = mode
    for key, value in wanted.items():
        if not _same(_typed(params.get(key)), _typed(value)) or key not in params:
            changes.append(_Set(("litellm_settings", "cache_params", key), value))
    parts = [f"type {cache_type}"]
    if ttl_s is not None:
        parts.append(f"ttl {wanted['ttl']}s")
    if supported_call_types is not None:
        parts.append("call types " + ", ".join(supported_call_types))
    if mode is not None:
        parts.append(f"mode {mode}")
    return _edit(text, changes, "response cache on (" + ", ".join(parts) + ")", filename)


def disable_response_cache(text: str, *, filename: str = "config.yaml") -> ConfigEdit:
    """Turn the response cache off (``litellm_settings.cache: false``), keeping
    ``cache_params`` for a later ``enable_response_cache``."""
    data = _plain(load_config(text))
    settings = data.get("litellm_settings") or {}
    changes: list[_Change] = []
    if settings.get("cache"):
        changes.append(_Set(("litellm_settings", "cache"), False))
    return _edit(text, changes, "response cache off", filename)


def set_prompt_caching(
    text: str,
    group: str,
    *,
    enabled: bool = True,
    injection_points: Sequence[Mapping[str, Any]] = DEFAULT_INJECTION_POINTS,
    filename: str = "config.yaml",
) -> ConfigEdit:
    """Have LiteLLM mark prompts of ``group`` for provider prompt caching
    (``litellm_params.cache_control_injection_points``, by default the system
    messages), or stop (``enabled=False`` removes the key).

    Only deployments of providers that cache where ``cache_control`` marks a prompt
    (``MARKER_PROVIDERS``: Anthropic, Bedrock, Vertex AI, …) are changed; those that
    cache by themselves (OpenAI, DeepSeek, xAI) or of unknown provider are left as
    they are and named in the description. ``NotExpressible`` when no deployment of the
    group takes the marker."""
    points = [_check_injection_point(p) for p in injection_points]
    data = _plain(load_config(text))
    entries = _model_list(data)
    members = _group_indices(entries, group)
    targets: list[int] = []
    skipped: list[str] = []
    for i in members:
        params = entries[i].get("litellm_params") or {}
        provider = _provider(params)
        if provider in MARKER_PROVIDERS:
            if any(p.get("location") == "tool_config" for p in points) and provider != "bedrock":
                raise NotExpressible(
                    f"{params.get('model')}: location tool_config applies to Bedrock only"
                )
            targets.append(i)
        else:
            why = "caches prompts by itself" if provider in AUTOMATIC_PROVIDERS else "unknown"
            skipped.append(f"{params.get('model')} (provider {provider or '?'}: {why})")
    if not targets:
        raise NotExpressible(
            f"no deployment of {group!r} is on a provider that takes cache_control markers "
            f"({', '.join(skipped)}); LiteLLM's cache_control_injection_points would do nothing"
        )
    changes: list[_Change] = []
    for i in targets:
        params = entries[i].get("litellm_params") or {}
        path = ("model_list", i, "litellm_params", "cache_control_injection_points")
        current = params.get("cache_control_injection_points")
        if enabled and not _same(current, points):
            changes.append(_Set(path, points))
        elif not enabled and "cache_control_injection_points" in params:
            changes.append(_Delete(path))
    models = ", ".join(str(entries[i]["litellm_params"].get("model")) for i in targets)
    if enabled:
        where = "; ".join(
            ", ".join(f"{k}={v}" for k, v in p.items() if k != "location") or p["location"]
            for p in points
        )
        what = f"model group {group!r}: prompt-cache markers at {where} for {models}"
    else:
        what = f"model group {group!r}: no prompt-cache markers for {models}"
    if skipped:
        what += " (left as is: " + ", ".join(skipped) + ")"
    return _edit(text, changes, what, filename)


def set_max_tokens(
    text: str,
    group: str,
    max_tokens: int | None,
    *,
    hard_cap: bool = True,
    filename: str = "config.yaml",
) -> ConfigEdit:
    """Limit the output tokens of ``group``'s calls.

    A hard cap is not expressible (``NotExpressible``): ``litellm_params.max_tokens``
    only fills in a request that sends none, because LiteLLM's router passes the
    request's own parameters over the deployment's. With ``hard_cap=False`` this sets
    that default on every deployment of the group (``None`` removes it)."""
    if hard_cap:
        raise NotExpressible(
            "LiteLLM's config cannot cap max_tokens: litellm_params.max_tokens is a default "
            "that the router overrides with the request's own max_tokens "
            "({**litellm_params, ..., **kwargs} in Router._acompletion)"
        )
    if max_tokens is not None and (isinstance(max_tokens, bool) or max_tokens <= 0):
        raise ConfigEditError(f"max_tokens must be a positive integer, not {max_tokens!r}")
    data = _plain(load_config(text))
    entries = _model_list(data)
    changes: list[_Change] = []
    for i in _group_indices(entries, group):
        params = entries[i].get("litellm_params") or {}
        path = ("model_list", i, "litellm_params", "max_tokens")
        if max_tokens is None:
            if "max_tokens" in params:
                changes.append(_Delete(path))
        elif not _same(_typed(params.get("max_tokens")), int(max_tokens)):
            changes.append(_Set(path, int(max_tokens)))
    what = (
        f"model group {group!r}: default max_tokens {max_tokens} (requests may ask for more)"
        if max_tokens is not None
        else f"model group {group!r}: no default max_tokens"
    )
    return _edit(text, changes, what, filename)


def unified_diff(old: str, new: str, filename: str = "config.yaml") -> str:
    """``diff -u`` of two texts ('' when equal), marking a missing final newline."""
    if old == new:
        return ""
    out: list[str] = []
    for line in difflib.unified_diff(
        old.splitlines(keepends=True),
        new.splitlines(keepends=True),
        fromfile=f"a/{filename}",
        tofile=f"b/{filename}",
    ):
        if line.endswith("\n"):
            out.append(line)
        else:
            out.append(line + "\n\\ No newline at end of file\n")
    return "".join(out)


# -- the logical changes and their expected effect on the data ------------------------------

Path = tuple[str | int, ...]


@dataclass(frozen=True)
class _Set:
    path: Path
    value: Any


@dataclass(frozen=True)
class _Delete:
    path: Path


@dataclass(frozen=True)
class _Insert:
    seq: Path
    index: int
    value: Any
    comment: str = ""


_Change = _Set | _Delete | _Insert


def _edit(text: str, changes: Iterable[_Change], description: str, filename: str) -> ConfigEdit:
    expected = _plain(load_config(text))
    new = text
    for change in changes:
        expected = _apply_plain(expected, change)
        new = _splice(new, change)
        got = _plain(load_config(new))
        if not _same(got, expected):
            raise ConfigEditError(
                f"internal error: the edit {change} would not read back as intended; "
                "the config was left as it is"
            )
    return ConfigEdit(text, new, unified_diff(text, new, filename), description)


def _apply_plain(data: Any, change: _Change) -> Any:
    data = copy.deepcopy(data)
    if isinstance(change, _Insert):
        seq = _walk(data, change.seq)
        seq.insert(change.index, copy.deepcopy(change.value))
        return data
    *parents, last = change.path
    node = data
    for key in parents:
        if isinstance(node, dict) and not isinstance(node.get(key), dict | list):
            if isinstance(change, _Delete):
                return data
            node[key] = {}
        node = node[key]
    if isinstance(change, _Set):
        node[last] = copy.deepcopy(change.value)
    elif last in node:
        del node[last]
    return data


def _walk(data: Any, path: Path) -> Any:
    for key in path:
        data = data[key]
    return data


# -- splicing a change into the text --------------------------------------------------------


def _splice(text: str, change: _Change) -> str:
    doc = _Text(text)
    if isinstance(change, _Insert):
        seq = doc.node(change.seq)
        if not isinstance(seq, CommentedSeq):
            raise ConfigEditError(f"{_dotted(change.seq)} is not a list")
        return doc.insert_item(seq, change.index, _plain_value(change.value), change.comment)
    *parents, last = change.path
    node: Any = doc.data
    for depth, key in enumerate(parents):
        doc.check_own(node, change.path[:depth])
        child = node[key] if _has(node, key) else None
        if not isinstance(child, CommentedMap | CommentedSeq):
            # the rest of the path does not exist yet: set it as one nested value
            value: Any = _plain_value(change.value) if isinstance(change, _Set) else None
            if isinstance(change, _Delete):
                return text
            for k in reversed(change.path[depth + 1 :]):
                value = {k: value}
            return doc.set_key(node, key, value)
        node = child
    doc.check_own(node, tuple(parents))
    if _has(node, last) and isinstance(node[last], CommentedMap | CommentedSeq):
        doc.check_own(node[last], change.path)
    if isinstance(change, _Delete):
        return doc.delete_key(node, last) if _has(node, last) else text
    return doc.set_key(node, last, _plain_value(change.value))


class _Text:
    """A config's text and its parse: splices that change one node each."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.data = load_config(text)
        self.lines = text.splitlines(keepends=True)
        self.nl = "\r\n" if "\r\n" in text else "\n"

    # locating

    def node(self, path: Path) -> Any:
        node: Any = self.data
        for depth, key in enumerate(path):
            self.check_own(node, path[:depth])
            node = node[key]
        self.check_own(node, path)
        return node

    def check_own(self, node: Any, path: Path) -> None:
        """Refuse nodes that are shared through anchors or merge keys."""
        anchor = getattr(node, "anchor", None)
        if anchor is not None and anchor.value is not None:
            raise ConfigEditError(
                f"{_dotted(path) or 'the top level'} has a YAML anchor (&{anchor.value}): "
                "it may be used elsewhere, so finopsd does not edit it"
            )
        if isinstance(node, CommentedMap) and getattr(node, "merge", None):
            raise ConfigEditError(
                f"{_dotted(path) or 'the top level'} uses a merge key (<<): finopsd does not "
                "edit mappings that take keys from elsewhere"
            )

    # the splices

    def set_key(self, m: CommentedMap, key: Any, value: Any) -> str:
        if key not in m:
            if _is_flow(m):
                return self._replace_flow(m, {**_plain(m), key: value})
            return self._insert_key(m, key, value)
        old = m[key]
        if isinstance(old, CommentedMap | CommentedSeq):
            if _is_flow(old):
                return self._replace_flow(old, value)
            return self._replace_block_value(m, key, value)
        if _is_flow(m) and not _is_scalar(value):
            return self._replace_flow(m, {**_plain(m), key: value})
        return self._replace_scalar(m, key, old, value)

    def delete_key(self, m: CommentedMap, key: Any) -> str:
        if _is_flow(m):
            return self._replace_flow(m, {k: v for k, v in _plain(m).items() if k != key})
        if len(m) == 1:
            raise ConfigEditError(f"deleting {key!r} would leave an empty mapping")
        line, col = m.lc.key(key)
        if self.lines[line][:col].strip():
            raise ConfigEditError(f"{key!r} opens a list item; finopsd does not delete it")
        end = self._end(line, col, item=False)
        return self._join(self.lines[:line] + self.lines[end:])

    def insert_item(self, seq: CommentedSeq, index: int, value: Any, comment: str) -> str:
        if _is_flow(seq) or len(seq) == 0:
            items = _plain(seq)
            items.insert(index, value)
            return self._replace_flow(seq, items)
        dash_col = seq.lc.col
        ref = max(index - 1, 0)
        line, item_col = seq.lc.item(ref)
        offset = max(item_col - dash_col, 2)
        step = self._step_in(seq[ref]) if isinstance(seq[ref], CommentedMap) else 2
        rendered = _render_item(value, dash_col, offset, step, comment)
        at = self._end(line, dash_col, item=True) if index > 0 else line
        return self._insert_lines(at, rendered)

    def _insert_key(self, m: CommentedMap, key: Any, value: Any) -> str:
        keys = list(m)
        if not keys:
            raise ConfigEditError("cannot add a key to an empty block mapping")
        line, col = m.lc.key(keys[-1])
        at = self._end(line, col, item=False)
        lines = _render_entry(key, value, col, self._step_in(m))
        if m is self.data:
            lines = ["", *lines]  # a blank line before a new top-level section
        return self._insert_lines(at, lines)

    def _replace_scalar(self, m: CommentedMap, key: Any, old: Any, value: Any) -> str:
        kline, kcol = m.lc.key(key)
        code, comment = _split_comment(self.lines[kline])
        if not _is_scalar(value):
            # a scalar (or null) becomes a block collection below the key
            if old is not None and not code.rstrip().endswith(":"):
                vline, vcol = m.lc.value(key)
                if vline != kline:
                    raise ConfigEditError(f"{key!r}: a multi-line scalar; not edited")
                end = _scalar_end(self.lines[vline], vcol, flow=False)
                code = self.lines[vline][:vcol].rstrip()
                comment = _split_comment(self.lines[vline][end:])[1]
            head = code.rstrip() + comment.rstrip("\r\n") + self.nl
            body = _render_block(value, kcol + self._step_in(m), self._step_in(m))
            end = self._end(kline, kcol, item=False)
            return self._join(
                self.lines[:kline] + [head] + [x + self.nl for x in body] + self.lines[end:]
            )
        like = _token_at(self.lines, m, key) if isinstance(old, bool) else None
        rendered = _scalar(value, flow=_is_flow(m), like=like)
        if old is None and code.rstrip().endswith(":"):
            line = code.rstrip() + " " + rendered + comment
            return self._replace_lines(kline, kline + 1, [_ensure_nl(line, self.nl)])
        vline, vcol = m.lc.value(key)
        text = self.lines[vline]
        end = _scalar_end(text, vcol, flow=_is_flow(m))
        if _continues(self.lines, vline, kcol, _is_flow(m)):
            raise ConfigEditError(f"{key!r}: a multi-line scalar; not edited")
        new = text[:vcol] + rendered + text[end:]
        return self._replace_lines(vline, vline + 1, [new])

    def _replace_block_value(self, m: CommentedMap, key: Any, value: Any) -> str:
        kline, kcol = m.lc.key(key)
        end = self._end(kline, kcol, item=False)
        body_lines = [
            ln for ln in self.lines[kline + 1 : end] if ln.strip() and not _is_comment(ln)
        ]
        if _is_scalar(value) or value in ({}, []):
            code, comment = _split_comment(self.lines[kline])
            head = code.rstrip() + " " + _inline(value) + comment
            return self._replace_lines(kline, end, [_ensure_nl(head, self.nl)])
        indent = _indent(body_lines[0]) if body_lines else kcol + 2
        step = self._step_in(m[key]) if isinstance(m[key], CommentedMap) else self._step_in(m)
        body = [x + self.nl for x in _render_block(value, indent, step)]
        return self._join(self.lines[: kline + 1] + body + self.lines[end:])

    def _replace_flow(self, node: CommentedMap | CommentedSeq, value: Any) -> str:
        line, col = node.lc.line, node.lc.col
        end_line, end_col = _flow_end(self.lines, line, col)
        inline = _inline(value)
        new = self.lines[line][:col] + inline + self.lines[end_line][end_col:]
        return self._replace_lines(line, end_line + 1, [new])

    # layout helpers

    def _end(self, start: int, col: int, *, item: bool) -> int:
        """The line after the block that starts at ``start`` (a key at ``col``, or a list
        item whose dash is at ``col``), less the blank lines and the comments not indented
        past ``col`` that end it (they belong to what follows)."""
        i = start + 1
        n = len(self.lines)
        while i < n:
            ln = self.lines[i]
            if not ln.strip() or _is_comment(ln):
                i += 1
                continue
            ind = _indent(ln)
            stripped = ln.lstrip(" ")
            if ind > col or (
                not item and ind == col and (stripped.startswith("- ") or stripped.strip() == "-")
            ):
                i += 1
                continue
            break
        while i - 1 > start and (
            not self.lines[i - 1].strip()
            or (_is_comment(self.lines[i - 1]) and _indent(self.lines[i - 1]) <= col)
        ):
            i -= 1
        return i

    def _step_in(self, m: CommentedMap) -> int:
        """How far this mapping's nested mappings indent their keys (2 if none does)."""
        for key in m:
            child = m[key]
            if isinstance(child, CommentedMap) and not _is_flow(child) and len(child):
                step = child.lc.key(next(iter(child)))[1] - m.lc.key(key)[1]
                if step > 0:
                    return step
        return 2

    def _insert_lines(self, at: int, new_lines: list[str]) -> str:
        lines = list(self.lines)
        if at > 0 and at == len(lines) and not lines[-1].endswith(("\n", "\r")):
            lines[-1] += self.nl
        return self._join(lines[:at] + [x + self.nl for x in new_lines] + lines[at:])

    def _replace_lines(self, start: int, end: int, new: list[str]) -> str:
        return "".join([*self.lines[:start], *new, *self.lines[end:]])

    @staticmethod
    def _join(lines: list[str]) -> str:
        return "".join(lines)


# -- rendering ----------------------------------------------------------------------------

_PLAIN = re.compile(r"[A-Za-z_][A-Za-z0-9_./@+-]*(?::[A-Za-z0-9_./@+-]+)*\Z")
_YAML11_WORDS = {"y", "n", "yes", "no", "on", "off", "true", "false", "null", "nan", "inf"}


def _scalar(value: Any, *, flow: bool = False, like: str | None = None) -> str:
    """A scalar as YAML that YAML 1.1 (PyYAML, which LiteLLM uses) and 1.2 read alike;
    ``like`` is the token it replaces (a boolean keeps its spelling's case)."""
    if isinstance(value, bool):
        word = "true" if value else "false"
        if like and like.lower() in ("true", "false"):
            if like.isupper():
                return word.upper()
            if like[0].isupper():
                return word.capitalize()
        return word
    if value is None:
        return "null"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigEditError(f"not a finite number: {value}")
        return repr(value)
    s = str(value)
    if not flow and _PLAIN.match(s) and s.lower() not in _YAML11_WORDS:
        return s
    return json.dumps(s, ensure_ascii=False)


def _inline(value: Any) -> str:
    if _is_scalar(value):
        return _scalar(value, flow=True)
    return json.dumps(value, ensure_ascii=False)


def _block_inline(value: Any) -> str:
    """A value on one line in block context: plain scalars where safe, else JSON."""
    return _scalar(value) if _is_scalar(value) else _inline(value)


def _is_scalar(value: Any) -> bool:
    return not isinstance(value, dict | list)


def _is_inline(value: Any) -> bool:
    """Rendered on the key's line: scalars, empty collections, lists of scalars."""
    if _is_scalar(value) or value in ({}, []):
        return True
    return isinstance(value, list) and all(_is_scalar(v) for v in value)


def _render_entry(key: Any, value: Any, indent: int, step: int, comment: str = "") -> list[str]:
    k = _scalar(key)
    tail = f" # {comment}" if comment else ""
    if _is_inline(value):
        return [f"{' ' * indent}{k}: {_block_inline(value)}{tail}"]
    return [f"{' ' * indent}{k}:{tail}", *_render_block(value, indent + step, step)]


def _render_block(value: Any, indent: int, step: int) -> list[str]:
    """A collection in block style, its keys (or dashes) at ``indent``."""
    lines: list[str] = []
    if isinstance(value, dict):
        for k, v in value.items():
            lines += _render_entry(k, v, indent, step)
        return lines
    for item in value:
        lines += _render_item(item, indent, 2, step)
    return lines


def _render_item(value: Any, dash: int, offset: int, step: int, comment: str = "") -> list[str]:
    """One list item: ``- `` at ``dash``, its content at ``dash + offset``."""
    pad = " " * dash + "-" + " " * (offset - 1)
    tail = f" # {comment}" if comment else ""
    if _is_inline(value) or not isinstance(value, dict):
        return [pad + _block_inline(value) + tail]
    entries = list(value.items())
    first = _render_entry(*entries[0], dash + offset, step, comment)
    first[0] = pad + first[0][dash + offset :]
    lines = first
    for k, v in entries[1:]:
        lines += _render_entry(k, v, dash + offset, step)
    return lines


# -- text scanning --------------------------------------------------------------------------


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _is_comment(line: str) -> bool:
    return line.lstrip().startswith("#")


def _ensure_nl(line: str, nl: str) -> str:
    return line if line.endswith(("\n", "\r")) else line + nl


def _split_comment(line: str) -> tuple[str, str]:
    """(code, comment with its leading spaces and the line end)."""
    body = line.rstrip("\r\n")
    end = line[len(body) :]
    quote: str | None = None
    i = 0
    while i < len(body):
        ch = body[i]
        if quote:
            if ch == "\\" and quote == '"':
                i += 2
                continue
            if ch == quote:
                if quote == "'" and body[i + 1 : i + 2] == "'":
                    i += 2
                    continue
                quote = None
        elif ch in "\"'" and (i == 0 or body[i - 1] in " \t[{,:"):
            quote = ch
        elif ch == "#" and (i == 0 or body[i - 1] in " \t"):
            code = body[:i].rstrip(" \t")
            return code, body[len(code) :] + end
        i += 1
    return body, end


def _scalar_end(line: str, col: int, *, flow: bool) -> int:
    """Where the scalar token starting at ``col`` ends (exclusive)."""
    body = line.rstrip("\r\n")
    if col < len(body) and body[col] in "\"'":
        quote = body[col]
        i = col + 1
        while i < len(body):
            if quote == '"' and body[i] == "\\":
                i += 2
                continue
            if body[i] == quote:
                if quote == "'" and body[i + 1 : i + 2] == "'":
                    i += 2
                    continue
                return i + 1
            i += 1
        raise ConfigEditError("a quoted scalar that runs over lines; not edited")
    i = col
    while i < len(body):
        ch = body[i]
        if ch == "#" and i > col and body[i - 1] in " \t":
            break
        if flow and ch in ",]}":
            break
        i += 1
    return col + len(body[col:i].rstrip(" \t"))


def _continues(lines: list[str], vline: int, kcol: int, flow: bool) -> bool:
    """Whether a plain scalar on ``vline`` goes on to the next line."""
    if flow:
        return False
    for ln in lines[vline + 1 :]:
        if not ln.strip() or _is_comment(ln):
            continue
        stripped = ln.strip()
        return _indent(ln) > kcol and not stripped.startswith(("- ", "#")) and ":" not in stripped
    return False


def _flow_end(lines: list[str], line: int, col: int) -> tuple[int, int]:
    """(line, column after) of the flow collection that opens at (``line``, ``col``)."""
    depth = 0
    quote: str | None = None
    i, j = line, col
    while i < len(lines):
        body = lines[i].rstrip("\r\n")
        while j < len(body):
            ch = body[j]
            if quote:
                if quote == '"' and ch == "\\":
                    j += 2
                    continue
                if ch == quote:
                    if quote == "'" and body[j + 1 : j + 2] == "'":
                        j += 2
                        continue
                    quote = None
            elif ch in "\"'":
                quote = ch
            elif ch == "#" and j > 0 and body[j - 1] in " \t":
                break
            elif ch in "[{":
                depth += 1
            elif ch in "]}":
                depth -= 1
                if depth == 0:
                    return i, j + 1
            j += 1
        i, j = i + 1, 0
    raise ConfigEditError("a flow collection that does not close")


def _token_at(lines: list[str], m: CommentedMap, key: Any) -> str | None:
    try:
        vline, vcol = m.lc.value(key)
    except (KeyError, TypeError):
        return None
    if vline >= len(lines):
        return None
    end = _scalar_end(lines[vline], vcol, flow=_is_flow(m))
    return lines[vline][vcol:end] or None


# -- data helpers ---------------------------------------------------------------------------


def _yaml() -> YAML:
    y = YAML(typ="rt")
    y.preserve_quotes = True
    return y


def _is_flow(node: Any) -> bool:
    return isinstance(node, CommentedMap | CommentedSeq) and bool(node.fa.flow_style())


def _has(node: Any, key: Any) -> bool:
    if isinstance(node, CommentedMap):
        return key in node
    return isinstance(node, CommentedSeq) and isinstance(key, int) and 0 <= key < len(node)


def _plain(node: Any) -> Any:
    """ruamel's round-trip objects as plain dicts, lists and scalars."""
    if isinstance(node, dict):
        return {_plain(k): _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    if isinstance(node, bool) or node is None:
        return node
    if isinstance(node, int):
        return int(node)
    if isinstance(node, float):
        return float(node)
    if isinstance(node, str):
        return str(node)
    return node


def _plain_value(value: Any) -> Any:
    return _plain(copy.deepcopy(value))


def _typed(value: Any) -> Any:
    """Numbers compared by value (a weight of 9.0 is a weight of 9)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _same(a: Any, b: Any) -> bool:
    """Equal and of the same types throughout (True is not 1)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _dotted(path: Path) -> str:
    return ".".join(str(p) for p in path)


def _model_list(data: dict[str, Any]) -> list[dict[str, Any]]:
    entries = data.get("model_list") or []
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ConfigEditError("model_list is not a list of deployments")
    return entries


def _group_indices(entries: list[dict[str, Any]], group: str) -> list[int]:
    members = [i for i, e in enumerate(entries) if e.get("model_name") == group]
    if not members:
        names = sorted({str(e.get("model_name")) for e in entries})
        raise ConfigEditError(f"no model group {group!r} in model_list (groups: {names})")
    return members


def _fallbacks_location(data: dict[str, Any]) -> tuple[str, list[Any]]:
    """Where LiteLLM takes fallbacks from, and the entries there."""
    for section in ("router_settings", "litellm_settings"):
        entries = (data.get(section) or {}).get("fallbacks")
        if entries:
            if not isinstance(entries, list):
                raise ConfigEditError(f"{section}.fallbacks is not a list")
            return f"{section}.fallbacks", list(entries)
    return "router_settings.fallbacks", []


def _provider(params: Mapping[str, Any]) -> str | None:
    if params.get("custom_llm_provider"):
        return str(params["custom_llm_provider"])
    model = str(params.get("model") or "")
    if "/" in model:
        return model.split("/", 1)[0]
    if model.startswith("claude"):
        return "anthropic"  # LiteLLM maps bare claude-* names to Anthropic
    return None


def _check_injection_point(point: Mapping[str, Any]) -> dict[str, Any]:
    p = dict(point)
    location = p.get("location")
    allowed = {
        "message": {"location", "role", "index", "control"},
        "tool_config": {"location", "control"},
    }
    if location not in allowed:
        raise ConfigEditError(f"injection point location {location!r}; valid: message, tool_config")
    extra = set(p) - allowed[location]
    if extra:
        raise ConfigEditError(f"injection point keys {sorted(extra)} are not LiteLLM's")
    if p.get("role") not in (None, "user", "system", "assistant"):
        raise ConfigEditError(f"injection point role {p['role']!r}; valid: user, system, assistant")
    return p
