"""Slack: actions announced in a channel, approved or rejected there.

Three parts:

- **Messages** — pure functions from an action (and its finding) to a Block Kit message
  (a dict ``{"text": ..., "blocks": [...]}``): ``approval_message`` (what and why in one
  sentence, the evidence, the projected saving and its interval, confidence and risk, the
  first step's diff, the canary plan, **Approve** / **Reject** buttons whose ``value`` is
  the action id, a link to the action in the API); the same message with the buttons
  replaced by who decided and when (``decision=``); ``update_message`` (a short line for a
  later transition: canary live, verified, rolled back and why, expired). Every text is
  escaped and cut to Block Kit's limits (``LIMITS``); ``check_limits`` says what a message
  breaks, and a message that breaks any is posted as its plain ``text`` instead.
- **SlackNotifier** — an observer of the controller's events (``EventSink``: the controller
  publishes every audit row with ``events.send``; ``TeeEvents`` hands each row to the
  notifier and then to Kafka, whose answer alone counts for the outbox). ``send`` only
  queues; one background thread posts through the incoming webhook, so Slack being slow or
  away never holds the controller up: a failed post is logged (never with the URL) and
  recorded, and nothing else happens. Posted: a transition into a state of
  ``slack.post_states``; ``awaiting_approval`` is the approval message, sent only while the
  action still awaits it. An approval or rejection made in Slack is not announced again
  (the clicked message already says it).
- **The record** — ``slack_messages`` (``finopsd.actions.schema.SLACK_TABLES``): one row per
  post, with the audit ``seq`` it announces (a transition the Kafka outbox sends again is
  not posted twice, even after a restart) or the Slack user whose click it answers, and
  whether Slack took it. Incoming-webhook messages cannot be edited later (the webhook
  returns no message id), so an approval that expires gets a new message saying so.

Slack's formats, as documented (checked for this module):

- Block Kit: at most 50 blocks a message
  (https://docs.slack.dev/reference/block-kit/blocks); a section's text 1-3,000 characters,
  at most 10 fields of at most 2,000
  (https://docs.slack.dev/reference/block-kit/blocks/section-block); a header's plain text
  at most 150 (https://docs.slack.dev/reference/block-kit/blocks/header-block); an actions
  block at most 25 elements
  (https://docs.slack.dev/reference/block-kit/blocks/actions-block); a button's text at
  most 75, ``action_id`` 255, ``value`` 2,000, ``url`` 3,000
  (https://docs.slack.dev/reference/block-kit/block-elements/button-element); a
  confirmation dialog's title 100, text 300, confirm and deny 30
  (https://docs.slack.dev/reference/block-kit/composition-objects/confirmation-dialog-object);
  a context block at most 10 elements (slack_sdk's ``ContextBlock``).
- mrkdwn: ``&``, ``<`` and ``>`` are control characters, written ``&amp;``, ``&lt;``,
  ``&gt;`` in text (https://api.slack.com/reference/surfaces/formatting#escaping).
- ``response_url``: a JSON message posted there answers the click; ``replace_original:
  true`` replaces the message clicked, ``response_type: ephemeral`` shows a new one to the
  clicker alone; usable up to 5 times within 30 minutes
  (https://docs.slack.dev/interactivity/handling-user-interaction#message_responses).
- Incoming webhook: a JSON ``{"text", "blocks"}`` POSTed to its URL, answered ``200 ok``
  (https://docs.slack.dev/messaging/sending-messages-using-incoming-webhooks).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from finopsd import views
from finopsd.actions.controller import TRAFFIC_KINDS
from finopsd.actions.lifecycle import State
from finopsd.config import ActionsSettings, SlackSettings
from finopsd.reports.findings_text import usd
from finopsd.store import Store

log = logging.getLogger(__name__)

# slack_sdk's clients log the URL they post to at DEBUG, and connection errors at ERROR:
# theirs stays quiet (a webhook URL is a secret); this module logs what went wrong.
_SDK_LOG = logging.getLogger("finopsd.actions.slack.sdk")
_SDK_LOG.setLevel(logging.CRITICAL + 1)
_SDK_LOG.propagate = False

APPROVE = "finopsd_approve"
"""``action_id`` of the Approve button (its ``value`` is the action's id)."""
REJECT = "finopsd_reject"
"""``action_id`` of the Reject button."""

LIMITS = {
    "blocks": 50,
    "section.text": 3000,
    "section.fields": 10,
    "section.field": 2000,
    "header.text": 150,
    "context.elements": 10,
    "actions.elements": 25,
    "button.text": 75,
    "button.value": 2000,
    "button.action_id": 255,
    "button.url": 3000,
    "confirm.title": 100,
    "confirm.text": 300,
    "confirm.button": 30,
    "block_id": 255,
}
"""Block Kit's limits (see the module docstring for where each is documented)."""
TEXT_MAX = 3000
"""The message's top-level ``text`` (the notification and the fallback) is kept this short."""
QUEUE_MAX = 1000
"""Messages waiting for the poster thread; more are dropped (with a warning)."""

#: what a kind of action does, as a header says it
KIND_LABELS = {
    "gateway.route": "Reroute",
    "gateway.cache": "Cache",
    "gateway.cascade": "Cascade",
    "gateway.max_tokens": "Cap max_tokens",
    "gateway.rate_limit": "Rate limit",
    "provider.batch": "Batch API",
    "finetune": "Fine-tune",
    "vllm.quantize": "Quantize",
    "vllm.scale": "Scale",
    "vllm.prefix_caching": "Prefix caching",
}
#: how a transition into a state is announced: (emoji, label)
STATE_LABELS = {
    State.AWAITING_APPROVAL: (":raised_hand:", "Awaiting approval"),
    State.APPROVED: (":white_check_mark:", "Approved"),
    State.REJECTED: (":x:", "Rejected"),
    State.EXPIRED: (":hourglass:", "Approval expired"),
    State.SUPPRESSED: (":zzz:", "Suppressed"),
    State.PROPOSED: (":bulb:", "Proposed"),
    State.APPLYING: (":gear:", "Applying"),
    State.CANARY: (":hatching_chick:", "Canary live"),
    State.VERIFYING: (":mag:", "Verifying"),
    State.PROMOTED: (":rocket:", "Promoted to the target"),
    State.VERIFIED: (":white_check_mark:", "Verified"),
    State.ROLLING_BACK: (":leftwards_arrow_with_hook:", "Rolling back"),
    State.ROLLED_BACK: (":leftwards_arrow_with_hook:", "Rolled back"),
    State.FAILED: (":rotating_light:", "Failed: a person must look"),
}


# -- text ---------------------------------------------------------------------------------


def escape(text: Any) -> str:
    """``text`` for a mrkdwn field: Slack's three control characters as entities."""
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def cut(text: str, limit: int, tail: str = "…") -> str:
    """``text`` at most ``limit`` characters, ending in ``tail`` when shortened, never in
    the middle of an entity (``&amp;``) ``escape`` made."""
    if len(text) <= limit:
        return text
    head = text[: max(0, limit - len(tail))]
    amp = head.rfind("&")
    if amp != -1 and ";" not in head[amp:]:
        head = head[:amp]
    return head + tail


def when(value: Any) -> str:
    """A time as people read it in a message: ``2026-03-12 12:00 UTC``."""
    if value is None:
        return "never"
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return f"{value.astimezone(UTC):%Y-%m-%d %H:%M} UTC"


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def _number(value: Any, key: str = "") -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if key.endswith("_usd"):
            return usd(value)
        if key.endswith(("share", "rate", "ratio")) and 0 <= value <= 1:
            return f"{value:.0%}" if key.endswith("share") else f"{value:.3g}"
        return f"{value:,.4g}"
    return str(value)


def scope_path(scope: Mapping[str, Any] | None) -> str:
    """``acme / bot / answer / big``: the scope's values, in the order tenant, app, feature,
    model, then the rest."""
    scope = dict(scope or {})
    return " / ".join(str(scope[k]) for k in _scope_keys(scope)) or "everything"


def scope_text(scope: Mapping[str, Any] | None) -> str:
    """``tenant=acme, app=bot, …`` in ``scope_path``'s order."""
    scope = dict(scope or {})
    return ", ".join(f"{k}={scope[k]}" for k in _scope_keys(scope)) or "everything"


def _scope_keys(scope: Mapping[str, Any]) -> list[str]:
    order = ["tenant", "team", "app", "feature", "model", "deployment"]
    return [k for k in order if k in scope] + sorted(k for k in scope if k not in order)


def link(api_base_url: str | None, action_id: str) -> str:
    """Where the action is in the API (mrkdwn), or the CLI command that shows it."""
    if api_base_url:
        return f"<{api_base_url}/v1/actions/{action_id}|{action_id} in the API>"
    return f"`finopsd actions show {action_id}`"


# -- the approval message -------------------------------------------------------------------


def saving_text(action: Mapping[str, Any], finding: Mapping[str, Any] | None) -> str:
    """``$19.48/month projected (90% interval $17.33-$21.63)``."""
    point = float(action["monthly_savings_usd"])
    low, high = action.get("monthly_savings_low_usd"), action.get("monthly_savings_high_usd")
    text = f"{usd(point)}/month"
    projection = ((finding or {}).get("evidence") or {}).get("projection") or {}
    level = projection.get("interval_level")
    label = f"{level:.0%} interval" if isinstance(level, int | float) else "interval"
    if low is not None and high is not None and not (low == high == point):
        text += f" ({label} {usd(float(low))}–{usd(float(high))})"
    return text


def evidence_lines(finding: Mapping[str, Any] | None) -> list[str]:
    """The evidence as short mrkdwn lines: the span and requests, the finding's numbers."""
    if not finding:
        return ["_the finding is no longer stored_"]
    lines = []
    hours = finding.get("evidence_hours")
    requests = finding.get("evidence_requests")
    span = []
    if requests is not None:
        span.append(f"{int(requests):,} requests")
    if hours is not None:
        hours = float(hours)
        span.append(f"over {hours:,.0f} h of traffic" + (f" ({hours / 24:.1f} days)"))
    if span:
        lines.append(" ".join(span))
    evidence = finding.get("evidence") or {}
    current = evidence.get("current")
    chosen = evidence.get(str(evidence.get("chosen"))) if evidence.get("chosen") else None
    if isinstance(current, dict) and isinstance(chosen, dict) and chosen.get("shares"):
        shares = ", ".join(f"{escape(m)} {w:.0%}" for m, w in chosen["shares"].items())
        lines.append(
            f"now {escape(current.get('model'))}: {_per_request(current)} → "
            f"proposed {shares}: {_per_request(chosen)}"
        )
    numbers = [
        f"{escape(k.removesuffix('_usd').replace('_', ' '))} {escape(_number(v, k))}"
        for k, v in evidence.items()
        if isinstance(v, int | float | str)
        and not isinstance(v, bool)
        and not k.endswith("_option")
        and k not in ("chosen", "requests")
        and len(str(v)) <= 40
    ]
    if numbers:
        lines.append(" · ".join(numbers[:8]))
    return lines


def _per_request(model: Mapping[str, Any]) -> str:
    parts = []
    cost = model.get("cost_per_request_usd")
    if isinstance(cost, int | float):
        parts.append(f"${cost:,.4f}/request")
    quality = model.get("quality")
    if isinstance(quality, int | float):
        parts.append(f"quality {quality:.2f}")
    p95 = model.get("p95_ms") or model.get("p95_ms_weighted")
    if isinstance(p95, int | float):
        parts.append(f"p95 {p95:,.0f} ms")
    return ", ".join(parts) or "?"


def canary_plan(action: Mapping[str, Any], settings: ActionsSettings) -> str:
    """How the change is rolled out and judged, as the policy and ``[actions.verify]`` say."""
    v = settings.verify
    rule = settings.rule(action["actuator"], action.get("tenant"))
    judge = (
        f"judged on at least {v.min_requests:,} touched requests against the same scope "
        f"before, at {v.confidence:.0%} confidence (tolerated: error rate "
        f"+{v.max_error_rate_increase * 100:.2g} pt, "
        f"p95 latency +{v.max_p95_latency_increase:.0%}, "
        f"cost per request +{v.max_cost_increase:.0%}, quality −{v.max_quality_drop:.2g})"
    )
    share = first_share(action)
    target = action.get("target_share")
    if action["actuator"] in TRAFFIC_KINDS and share is not None and target is not None:
        step = rule.max_share_step or 1.0
        text = (
            f"Step 1 moves {share:.0%} of the scope's traffic; each step is {judge}; "
            f"a pass moves up to {step:.0%} more, until {target:.0%}"
        )
        if rule.max_steps_per_day is not None:
            text += f" (at most {rule.max_steps_per_day} steps a day)"
        text += f". A step without enough requests in {v.max_wait_hours:,.0f} h is rolled back"
    else:
        text = f"Applied in one step, then {judge}"
    text += ". A regression rolls back by itself and is posted here."
    if action.get("dry_run"):
        text += " _actions.dry_run is on: planned and recorded, nothing is changed._"
    return text


def first_share(action: Mapping[str, Any]) -> float | None:
    """The share of the scope's traffic the planned step moves (None: not a traffic step)."""
    plan = _json(action.get("plan")) or {}
    share = plan.get("share")
    return float(share) if isinstance(share, int | float) else None


def diff_block(diff: str | None, action_id: str, limit: int = LIMITS["section.text"]) -> str:
    """The diff in a code block, whole lines only, cut to ``limit`` characters with a line
    saying how much is left out and where the whole of it is."""
    title = "*The change* (step 1)"
    if not diff:
        return f"{title}\n_no diff: the change is made outside a file finopsd edits_"
    lines = escape(diff.rstrip("\n")).replace("```", "``\u200b`").split("\n")
    more = f"\n_… {{n}} more lines: `finopsd actions show {action_id}`_"
    budget = limit - len(title) - len("\n```\n\n```") - len(more.format(n=len(lines)))
    kept: list[str] = []
    used = 0
    for line in lines:
        line = cut(line, 300)
        if used + len(line) + 1 > budget:
            break
        kept.append(line)
        used += len(line) + 1
    text = f"{title}\n```\n" + "\n".join(kept) + "\n```"
    if len(kept) < len(lines):
        text += more.format(n=len(lines) - len(kept))
    return text


def _section(text: str) -> dict[str, Any]:
    return {"type": "section", "text": {"type": "mrkdwn", "text": cut(text, TEXT_MAX)}}


def _plain(text: str, limit: int) -> dict[str, Any]:
    return {"type": "plain_text", "text": cut(text, limit), "emoji": True}


def approval_message(
    action: Mapping[str, Any],
    finding: Mapping[str, Any] | None,
    *,
    canary: str,
    api_base_url: str | None = None,
    approvers: Sequence[str] = (),
    decision: str | None = None,
) -> dict[str, Any]:
    """The message asking for approval of ``action`` (a row of ``actions``), with its
    ``finding`` (a stored finding, None if gone) and ``canary`` (``canary_plan``'s text).

    With ``decision`` (mrkdwn: who decided and when, or why nothing changed) the buttons
    give way to it: what ``response_url`` gets to replace the clicked message."""
    action_id = str(action["id"])
    kind = str(action["actuator"])
    scope = _json(action.get("scope")) or {}
    label = KIND_LABELS.get(kind, kind)
    title = str((finding or {}).get("title") or action.get("reason") or kind)
    plan = _json(action.get("plan")) or {}
    share = first_share(action)
    first_step = escape(plan.get("description") or kind) + (
        f" ({share:.0%} of the scope's traffic)" if share is not None else ""
    )
    header = ("Decided: " if decision else "Approval needed: ") + f"{label} · {scope_path(scope)}"
    saving = saving_text(action, finding)
    risk = (finding or {}).get("risk") or "unknown"
    method = (finding or {}).get("savings_method")
    numbers = "\n".join(f"• {line}" for line in evidence_lines(finding))
    if method:
        numbers += f"\n_How the saving is estimated:_ {escape(method)}"
    fields = [
        f"*Projected saving*\n{saving}\n_a projection from the finding, not yet measured_",
        f"*Confidence · risk*\n{float(action['confidence']):.2f} · {escape(risk)}",
        f"*Scope*\n{escape(scope_text(scope))}",
        f"*Expires*\n{when(action.get('expires_at'))}",
    ]
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": _plain(header, LIMITS["header.text"])},
        _section(f"*{escape(title)}*\nFirst step: {first_step}"),
        {
            "type": "section",
            "fields": [{"type": "mrkdwn", "text": cut(f, LIMITS["section.field"])} for f in fields],
        },
        _section(f"*Evidence*\n{numbers}"),
        {
            "type": "section",
            "text": {"type": "mrkdwn", "text": diff_block(plan.get("diff"), action_id)},
        },
        _section(f"*Canary plan*\n{canary}"),
    ]
    if decision is None:
        blocks.append(
            {
                "type": "actions",
                "block_id": f"finopsd:{action_id}",
                "elements": [
                    {
                        "type": "button",
                        "action_id": APPROVE,
                        "text": _plain("Approve", LIMITS["button.text"]),
                        "style": "primary",
                        "value": action_id,
                        "confirm": {
                            "title": _plain("Approve this action?", LIMITS["confirm.title"]),
                            "text": _plain(
                                f"finopsd starts {label.lower()} for {scope_path(scope)} "
                                "at its next tick, canary first.",
                                LIMITS["confirm.text"],
                            ),
                            "confirm": _plain("Approve", LIMITS["confirm.button"]),
                            "deny": _plain("Cancel", LIMITS["confirm.button"]),
                        },
                    },
                    {
                        "type": "button",
                        "action_id": REJECT,
                        "text": _plain("Reject", LIMITS["button.text"]),
                        "style": "danger",
                        "value": action_id,
                    },
                ],
            }
        )
    else:
        blocks.append(_section(decision))
    who = ", ".join(f"<@{u}>" for u in approvers)
    context = [
        f"action `{action_id}` · finding `{escape(action.get('finding_id'))}` "
        f"({escape(action.get('finding_kind'))}) · {link(api_base_url, action_id)}"
    ]
    if who and decision is None:
        context.append(f"may decide: {who}")
    blocks.append(
        {
            "type": "context",
            "elements": [{"type": "mrkdwn", "text": cut(c, TEXT_MAX)} for c in context],
        }
    )
    text = ("Decided" if decision else "Approval needed") + f": {label} · {scope_path(scope)}"
    text += f" — {saving} projected ({action_id})"
    return {"text": cut(text, TEXT_MAX), "blocks": blocks}


def action_message(
    store: Store,
    action: Mapping[str, Any],
    actions: ActionsSettings,
    slack: SlackSettings,
    decision: str | None = None,
) -> dict[str, Any]:
    """``approval_message`` for a row of ``actions``, with its stored finding and its
    canary plan as ``actions`` (the controller's settings) has it."""
    return approval_message(
        action,
        views.finding(store.cursor(), str(action["finding_id"])),
        canary=canary_plan(action, actions),
        api_base_url=slack.api_base_url,
        approvers=slack.approvers,
        decision=decision,
    )


def decision_text(verb: str, user: str, at: datetime, *, applied_next: bool = True) -> str:
    """``:white_check_mark: *Approved* by <@U…> at …`` for the replaced message."""
    if verb == "approved":
        after = " The first step is applied at the controller's next tick." if applied_next else ""
        return f":white_check_mark: *Approved* by <@{user}> at {when(at)}.{after}"
    return f":x: *Rejected* by <@{user}> at {when(at)}. Nothing changes."


def settled_text(action: Mapping[str, Any], why: str) -> str:
    """What a click on an action already decided (or expired, or gone) is answered."""
    state = str(action["state"])
    emoji, label = STATE_LABELS.get(State(state), (":information_source:", state))
    by = action.get("approver")
    who = f" by {_person(by)}" if by else ""
    return (
        f"{emoji} *{label}*{who} (updated {when(action.get('updated_at'))}). "
        f"Nothing changed: {escape(why)}"
    )


def _person(actor: str) -> str:
    """``slack:U024BE7LH`` as a mention; any other actor as it is."""
    if actor.startswith("slack:"):
        return f"<@{escape(actor.removeprefix('slack:'))}>"
    return f"`{escape(actor)}`"


def refusal_message(user: str, approvers: Sequence[str]) -> dict[str, Any]:
    """The clicker alone sees it (ephemeral); the message clicked stays as it was."""
    who = ", ".join(f"<@{u}>" for u in approvers) or "no one"
    text = (
        f":no_entry: <@{user}>, you are not on finopsd's `slack.approvers`, so you may not "
        f"approve or reject actions. Nothing changed. Approvers: {who}."
    )
    return {
        "response_type": "ephemeral",
        "replace_original": False,
        "text": cut(text, TEXT_MAX),
        "blocks": [_section(text)],
    }


# -- later transitions ---------------------------------------------------------------------------


def update_message(
    event: Mapping[str, Any], action: Mapping[str, Any] | None, *, api_base_url: str | None
) -> dict[str, Any]:
    """A short message for one transition (an event as the controller publishes it)."""
    action_id = str(event["action_id"])
    to = State(event["to"])
    emoji, label = STATE_LABELS[to]
    scope = scope_path(_json((action or {}).get("scope")))
    kind = KIND_LABELS.get(str(event.get("actuator")), str(event.get("actuator")))
    reason = escape(event.get("reason") or "")
    if to == State.CANARY and action is not None and action.get("share") is not None:
        reason += f": {float(action['share']):.0%} of the scope's traffic"
    if to in (State.APPROVED, State.REJECTED):
        reason += f" ({_person(str(event.get('actor')))})"
    if to == State.EXPIRED:
        reason += (
            ". Nothing changed; if the finding is still open, a new action is proposed "
            "and posted here."
        )
    text = f"{emoji} *{label}* · {escape(kind)} · {escape(scope)}\n{reason}"
    return {
        "text": cut(f"{label}: {kind} · {scope} ({action_id})", TEXT_MAX),
        "blocks": [
            _section(text),
            {
                "type": "context",
                "elements": [
                    {
                        "type": "mrkdwn",
                        "text": f"action `{action_id}` · {when(event.get('at'))} · "
                        f"{link(api_base_url, action_id)}",
                    }
                ],
            },
        ],
    }


# -- limits ---------------------------------------------------------------------------------------


def check_limits(message: Mapping[str, Any]) -> list[str]:
    """What in ``message`` breaks Block Kit's limits (``LIMITS``); empty: nothing."""
    problems: list[str] = []

    def over(what: str, value: Any, key: str, low: int = 0) -> None:
        n = len(value) if value is not None else 0
        if n > LIMITS[key] or n < low:
            problems.append(f"{what}: {n} (limit {low}..{LIMITS[key]})")

    if len(str(message.get("text") or "")) > TEXT_MAX:
        problems.append(f"text: {len(message['text'])} (limit {TEXT_MAX})")
    blocks = message.get("blocks") or []
    over("blocks", blocks, "blocks")
    for i, block in enumerate(blocks):
        where = f"blocks[{i}] ({block.get('type')})"
        if "block_id" in block:
            over(f"{where}.block_id", block["block_id"], "block_id")
        kind = block.get("type")
        if kind == "header":
            over(f"{where}.text", block["text"]["text"], "header.text", 1)
        elif kind == "section":
            if "text" in block:
                over(f"{where}.text", block["text"]["text"], "section.text", 1)
            fields = block.get("fields") or []
            over(f"{where}.fields", fields, "section.fields")
            for j, f in enumerate(fields):
                over(f"{where}.fields[{j}]", f["text"], "section.field", 1)
            if "text" not in block and not fields:
                problems.append(f"{where}: neither text nor fields")
        elif kind == "context":
            over(f"{where}.elements", block["elements"], "context.elements", 1)
        elif kind == "actions":
            over(f"{where}.elements", block["elements"], "actions.elements", 1)
            for j, e in enumerate(block["elements"]):
                at = f"{where}.elements[{j}]"
                over(f"{at}.text", e["text"]["text"], "button.text", 1)
                for key in ("value", "action_id", "url"):
                    if key in e:
                        over(f"{at}.{key}", e[key], f"button.{key}")
                confirm = e.get("confirm")
                if confirm:
                    over(f"{at}.confirm.title", confirm["title"]["text"], "confirm.title", 1)
                    over(f"{at}.confirm.text", confirm["text"]["text"], "confirm.text", 1)
                    for key in ("confirm", "deny"):
                        over(f"{at}.confirm.{key}", confirm[key]["text"], "confirm.button", 1)
    return problems


def postable(message: dict[str, Any]) -> dict[str, Any]:
    """``message``, or its plain text alone where its blocks break a limit (logged)."""
    problems = check_limits(message)
    if not problems:
        return message
    log.warning("slack: message blocks break Block Kit limits (%s): sent as text", problems[0])
    return {k: v for k, v in message.items() if k != "blocks"}


# -- posting and the record ---------------------------------------------------------------------


def post(url: str, message: Mapping[str, Any], timeout_s: float) -> str | None:
    """POST ``message`` to a webhook or ``response_url``; None once Slack took it, else why
    not (never the URL: it is a secret)."""
    from slack_sdk.http_retry import ConnectionErrorRetryHandler, RateLimitErrorRetryHandler
    from slack_sdk.webhook import WebhookClient

    client = WebhookClient(
        url,
        timeout=max(1, round(timeout_s)),
        logger=_SDK_LOG,
        retry_handlers=[
            ConnectionErrorRetryHandler(max_retry_count=2),
            RateLimitErrorRetryHandler(max_retry_count=1),
        ],
    )
    try:
        response = client.send_dict(postable(dict(message)))
    except Exception as exc:  # an outage, a timeout, a refused connection
        return f"{type(exc).__name__}: {exc}".replace(url, "<url>")[:300]
    if response.status_code == 200:
        return None
    return f"HTTP {response.status_code}: {response.body}".replace(url, "<url>")[:300]


def record(
    store: Store,
    action_id: str,
    kind: str,
    via: str,
    error: str | None,
    *,
    audit_seq: int | None = None,
    slack_user: str | None = None,
    at: datetime | None = None,
) -> None:
    """One row of ``slack_messages``: what was posted and whether Slack took it."""
    store.write(
        lambda con: con.execute(
            "INSERT INTO slack_messages VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [
                action_id,
                audit_seq,
                kind,
                via,
                slack_user,
                at or datetime.now(UTC),
                error is None,
                error,
            ],
        )
    )


def posted(store: Store, audit_seq: int) -> bool:
    """Slack took the announcement of this transition already."""
    row = (
        store.cursor()
        .execute("SELECT count(*) FROM slack_messages WHERE audit_seq = ? AND ok", [audit_seq])
        .fetchone()
    )
    return bool(row and row[0])


# -- the observer ---------------------------------------------------------------------------------


class TeeEvents:
    """An ``EventSink`` that hands each event to ``observers`` (whose failures are logged,
    never raised) and then to ``primary``, whose answer is the answer."""

    def __init__(self, primary: Any, *observers: Any) -> None:
        self.primary = primary
        self.observers = observers

    def send(self, key: str, value: dict[str, Any]) -> bool:
        for observer in self.observers:
            try:
                observer.send(key, value)
            except Exception as exc:
                log.warning("event for %s not handed to %s: %s", key, type(observer).__name__, exc)
        return bool(self.primary.send(key, value))


class SlackNotifier:
    """Posts the controller's transitions to Slack (see the module docstring).

    ``attach(controller)`` before the first event: the approval message reads the action
    and the controller's settings. ``close()`` posts what is queued (up to a few
    seconds) and stops the thread.
    """

    def __init__(
        self,
        settings: SlackSettings,
        store: Store,
        *,
        webhook_url: str | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        url = webhook_url or settings.webhook_url_value()
        if not url:
            raise ValueError("slack: no webhook URL (slack.webhook_url_file or webhook_url)")
        self.settings = settings
        self.store = store
        self.clock = clock
        self.controller: Any = None
        self._url = url
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue(QUEUE_MAX)
        self._pending: set[int] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False

    def __repr__(self) -> str:  # never the URL
        return f"SlackNotifier(approvers={self.settings.approvers})"

    def attach(self, controller: Any) -> None:
        self.controller = controller

    # -- EventSink ----------------------------------------------------------------------------

    def send(self, key: str, value: dict[str, Any]) -> bool:
        """Queue the event if it is to be posted; never blocks, never fails."""
        if not self.wants(value):
            return True
        seq = int(value["seq"])
        with self._lock:
            if seq in self._pending or self._closed:
                return True
            self._pending.add(seq)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="slack", daemon=True)
                self._thread.start()
        try:
            self._queue.put_nowait(dict(value))
        except queue.Full:
            with self._lock:
                self._pending.discard(seq)
            log.warning("slack: %d messages waiting; the one about %s is dropped", QUEUE_MAX, key)
        return True

    def wants(self, event: Mapping[str, Any]) -> bool:
        """A transition to be posted: into one of ``post_states``, and not a decision made
        in Slack (the message clicked already shows it)."""
        to = event.get("to")
        if to not in self.settings.post_states or event.get("from") == to:
            return False
        return not (
            to in (State.APPROVED, State.REJECTED) and str(event.get("actor")).startswith("slack:")
        )

    # -- the poster thread ------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            event = self._queue.get()
            if event is None:
                return
            try:
                self.deliver(event)
            except Exception as exc:  # one message's failure never stops the next
                log.warning("slack: the message about %s failed: %s", event.get("action_id"), exc)
            finally:
                with self._lock:
                    self._pending.discard(int(event["seq"]))

    def deliver(self, event: Mapping[str, Any]) -> str | None:
        """Build and post the message for one event (synchronously); returns why it was
        not posted, None once it was (or when there was nothing to post)."""
        seq, action_id = int(event["seq"]), str(event["action_id"])
        if posted(self.store, seq):
            return None
        action = self.controller.get(action_id) if self.controller is not None else None
        if event["to"] == State.AWAITING_APPROVAL:
            if action is None or action["state"] != State.AWAITING_APPROVAL:
                log.info("slack: %s no longer awaits approval: no approval message", action_id)
                return None
            message = self.approval(action)
            kind = "approval"
        else:
            message = update_message(event, action, api_base_url=self.settings.api_base_url)
            kind = "update"
        error = post(self._url, message, self.settings.timeout_s)
        if error is not None:
            log.warning("slack: %s message for %s not posted: %s", kind, action_id, error)
        record(self.store, action_id, kind, "webhook", error, audit_seq=seq, at=self.clock())
        return error

    def approval(self, action: Mapping[str, Any]) -> dict[str, Any]:
        settings = self.controller.settings if self.controller is not None else ActionsSettings()
        return action_message(self.store, action, settings, self.settings)

    def close(self, timeout_s: float | None = None) -> None:
        """Post what is queued (waiting up to ``timeout_s``, default twice ``timeout_s``
        of the settings) and stop."""
        with self._lock:
            self._closed = True
            thread = self._thread
        if thread is None:
            return
        self._queue.put(None)
        thread.join(timeout_s if timeout_s is not None else 2 * self.settings.timeout_s + 1)
        if thread.is_alive():
            log.warning("slack: %d message(s) not posted at stop", self._queue.qsize())

    stop = close
