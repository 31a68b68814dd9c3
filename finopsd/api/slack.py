"""``POST /v1/slack/interactions``: the Approve / Reject buttons of Slack's messages.

Slack sends a click as a ``POST`` of ``application/x-www-form-urlencoded`` with one field,
``payload``, a JSON ``block_actions`` object (its ``user.id``, ``actions[].action_id`` and
``value``, ``response_url``), signed with the app's signing secret:
``X-Slack-Signature: v0=HMAC-SHA256(secret, "v0:{X-Slack-Request-Timestamp}:{raw body}")``
(https://api.slack.com/authentication/verifying-requests-from-slack,
https://docs.slack.dev/reference/interaction-payloads/block_actions-payload).

This endpoint is authenticated by that signature, not by the API's bearer token: a
request without both headers, with a timestamp that is not a number or is more than five
minutes from now (either way), or whose signature is not the body's, is answered 401 and
changes nothing (``slack_sdk.signature.SignatureVerifier`` on the raw body). A signature
seen before (a replay) is answered 200 and changes nothing.

A click is acknowledged at once (Slack waits 3 seconds); the decision is taken after the
answer is sent (a background task: the controller's lock may be held by a tick that is
applying a change), and its outcome is posted to the payload's ``response_url``:

- a user not on ``slack.approvers``: an ephemeral answer to them alone saying they may
  not; nothing changes;
- an approver's click on an action awaiting approval: ``controller.approve`` (or
  ``reject``) with actor ``slack:<user id>``; the message is replaced
  (``replace_original: true``) by the same one with who decided and when instead of the
  buttons;
- a click on an action already decided, expired or gone: the message is replaced by one
  saying so and that nothing changed.

Every answer is recorded in ``slack_messages`` (``finopsd.actions.slack``).
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from typing import Any
from urllib.parse import parse_qs

from fastapi import APIRouter, BackgroundTasks, HTTPException, Request
from fastapi.responses import Response
from slack_sdk.signature import SignatureVerifier

from finopsd.actions import slack as messages
from finopsd.actions.lifecycle import State
from finopsd.config import SlackSettings

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/slack", tags=["slack"])

MAX_BODY = 1 << 20
"""Bytes of a request read at most (a click's payload carries the message clicked)."""
WINDOW_S = 300
"""How far a request's timestamp may be from now (``SignatureVerifier``'s five minutes)."""
_TIMESTAMP = re.compile(r"^[0-9]{1,12}$")
_SIGNATURE = re.compile(r"^v0=[0-9a-f]{64}$")
_ACTION_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_USER_ID = re.compile(r"^[A-Z0-9]{1,32}$")


class Interactions:
    """What the endpoint needs: the verifier, the replay memory, the approvers."""

    def __init__(self, settings: SlackSettings, signing_secret: str) -> None:
        self.settings = settings
        self.verifier = SignatureVerifier(signing_secret)
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:  # never the secret
        return f"Interactions(approvers={self.settings.approvers})"

    @classmethod
    def from_settings(cls, settings: SlackSettings) -> Interactions | None:
        """None when Slack is off; the signing secret read from its file or the config."""
        if not settings.enabled:
            return None
        secret = settings.signing_secret_value()
        if not secret:
            raise ValueError("slack: no signing secret (slack.signing_secret_file)")
        return cls(settings, secret)

    def authentic(self, body: bytes, timestamp: str | None, signature: str | None) -> bool:
        """Signed by Slack, with a timestamp within ``WINDOW_S`` of now."""
        if not timestamp or not signature:
            return False
        if not _TIMESTAMP.match(timestamp) or not _SIGNATURE.match(signature):
            return False  # SignatureVerifier raises ValueError on a timestamp like "1e9"
        try:
            return self.verifier.is_valid(body=body, timestamp=timestamp, signature=signature)
        except (ValueError, UnicodeDecodeError):  # a body that is not UTF-8
            return False

    def first_time(self, signature: str) -> bool:
        """False for a signature already seen (kept as long as it could be valid)."""
        now = time.monotonic()
        with self._lock:
            for seen, until in list(self._seen.items()):
                if until < now:
                    del self._seen[seen]
            if signature in self._seen:
                return False
            self._seen[signature] = now + 2 * WINDOW_S + 60
            return True

    # -- after the answer -----------------------------------------------------------------

    def answer(
        self, service: Any, verb: str, action_id: str, user: str, response_url: str | None
    ) -> None:
        """Decide (or refuse) and post the outcome to ``response_url``; never raises."""
        try:
            kind, message = self._outcome(service, verb, action_id, user)
        except Exception as exc:  # the store away, a bug: logged, Slack shows nothing new
            log.error("slack: the click of %s on %s failed: %s", user, action_id, exc)
            return
        if not response_url:
            return
        error = messages.post(response_url, message, self.settings.timeout_s)
        if error is not None:
            log.warning("slack: the answer to %s about %s not posted: %s", user, action_id, error)
        try:
            messages.record(service.store, action_id, kind, "response_url", error, slack_user=user)
        except Exception as exc:
            log.warning("slack: the answer to %s not recorded: %s", user, exc)

    def _outcome(
        self, service: Any, verb: str, action_id: str, user: str
    ) -> tuple[str, dict[str, Any]]:
        from finopsd.actions.controller import ActionError, UnknownAction

        if user not in self.settings.approvers:
            log.warning(
                "slack: %s may not decide (not on slack.approvers): %s not changed", user, action_id
            )
            return "refusal", messages.refusal_message(user, self.settings.approvers)
        controller = service.controller
        if controller is None:
            return "refusal", _replacing(
                f"Actions are disabled in finopsd (actions.enabled = false): {action_id} "
                "was not changed."
            )
        actor = f"slack:{user}"
        try:
            # the check and the change in one step, under the lock every tick takes: a click
            # on a message whose action was approved elsewhere meanwhile changes nothing
            with controller._lock:
                action = controller.get(action_id)
                if action["state"] != State.AWAITING_APPROVAL:
                    raise ActionError(f"it is {action['state']}, not awaiting approval")
                if verb == messages.APPROVE:
                    action = controller.approve(action_id, actor)
                else:
                    action = controller.reject(action_id, actor)
            done = "approved" if verb == messages.APPROVE else "rejected"
            log.info("slack: %s %s %s", user, done, action_id)
            decision = messages.decision_text(done, user, controller.clock())
        except UnknownAction:
            return "decision", _replacing(
                f"There is no action {action_id} in this finopsd: nothing changed."
            )
        except ActionError as exc:
            log.info("slack: %s clicked %s on %s: %s", user, verb, action_id, exc)
            action = controller.get(action_id)
            decision = messages.settled_text(action, str(exc))
        message = messages.action_message(
            service.store, action, controller.settings, self.settings, decision=decision
        )
        return "decision", {**message, "replace_original": True}


def _replacing(text: str) -> dict[str, Any]:
    return {
        "replace_original": True,
        "text": text,
        "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": messages.escape(text)}}],
    }


def parse_payload(body: bytes) -> dict[str, Any]:
    """The ``payload`` field of a form-encoded body, as JSON; ValueError when it is not one."""
    fields = parse_qs(body.decode("utf-8"), strict_parsing=True, max_num_fields=20)
    values = fields.get("payload")
    if not values or len(values) != 1:
        raise ValueError("expected one form field 'payload'")
    payload = json.loads(values[0])
    if not isinstance(payload, dict):
        raise ValueError("payload is not a JSON object")
    return payload


def clicks(payload: dict[str, Any]) -> list[tuple[str, str]]:
    """(``APPROVE`` | ``REJECT``, action id) for each of finopsd's buttons clicked."""
    out = []
    for item in payload.get("actions") or []:
        if not isinstance(item, dict):
            continue
        verb, value = item.get("action_id"), item.get("value")
        known = verb in (messages.APPROVE, messages.REJECT)
        if known and isinstance(value, str) and _ACTION_ID.match(value):
            out.append((verb, value))
    return out


async def _body(request: Request) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY:
        raise HTTPException(413, f"at most {MAX_BODY} bytes")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise HTTPException(413, f"at most {MAX_BODY} bytes")
    return body


@router.post(
    "/interactions",
    summary="Slack's Approve / Reject clicks (signed by Slack, no bearer token)",
    response_class=Response,
    responses={
        200: {"description": "acknowledged; the outcome goes to the payload's response_url"},
        401: {"description": "not signed by Slack, or the timestamp is stale or in the future"},
        404: {"description": "Slack approvals are off (slack.enabled = false)"},
    },
)
async def interactions(request: Request, background: BackgroundTasks) -> Response:
    handler: Interactions | None = getattr(request.app.state, "slack", None)
    if handler is None:
        raise HTTPException(404, "Slack approvals are off (slack.enabled = false)")
    body = await _body(request)
    signature = request.headers.get("x-slack-signature")
    if not handler.authentic(body, request.headers.get("x-slack-request-timestamp"), signature):
        log.warning("slack: a request not signed by Slack (or stale) refused")
        raise HTTPException(
            401, "not signed by Slack (X-Slack-Signature, X-Slack-Request-Timestamp)"
        )
    assert signature is not None
    if not handler.first_time(signature):
        log.warning("slack: a request seen before (a replay) ignored")
        return Response(status_code=200)
    try:
        payload = parse_payload(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise HTTPException(400, f"not an interaction payload: {exc}") from None
    if payload.get("type") != "block_actions":
        return Response(status_code=200)  # nothing of finopsd's
    who = payload.get("user")
    user = who.get("id") if isinstance(who, dict) else None
    if not isinstance(user, str) or not _USER_ID.match(user):
        raise HTTPException(400, "payload.user.id: not a Slack user id")
    response_url = payload.get("response_url")
    if not isinstance(response_url, str) or not response_url.startswith(("https://", "http://")):
        response_url = None
    service = request.app.state.service
    for verb, action_id in clicks(payload):
        background.add_task(handler.answer, service, verb, action_id, user, response_url)
    return Response(status_code=200)
