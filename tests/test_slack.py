"""Slack approvals: the messages, the webhook poster and the interactivity endpoint, on real
parts.

Slack is a local HTTP server on 127.0.0.1 (``SlackStandIn``) taking the incoming webhook's
posts and the ``response_url`` answers, as Slack would, and recording them. The API is the
real one (``create_app`` served by ``ApiServer``) over a real store, with a real
``Controller`` holding a real routing finding's action (``test_actions.history``: the
acme / bot / answer scope on ``big``, a reroute to ``mid``) in ``approve`` mode, and the
file actuator of ``test_actions``. A click is a request built exactly as Slack builds it: a
form-encoded ``payload`` field holding a ``block_actions`` JSON object, its
``X-Slack-Request-Timestamp`` and ``X-Slack-Signature: v0=HMAC-SHA256(signing secret,
"v0:{timestamp}:{body}")``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

import httpx
import pytest
from conftest import wait_for
from slack_sdk.models.blocks import Block
from test_actions import BOOK, NOW, Clock, FileRoutes, Sink, history, serve, settings

from finopsd.actions import slack
from finopsd.actions.controller import Controller
from finopsd.actions.lifecycle import State
from finopsd.api.app import create_app
from finopsd.api.server import ApiServer
from finopsd.api.state import Check, ServiceState
from finopsd.config import ConfigError, Settings, load_settings
from finopsd.ingest.pipeline import IngestStats
from finopsd.store import Store

SECRET = "8f742231b10e8888abcd99yyyzzz85a5"  # the documented example's shape
TOKEN = "slack-test-api-token-0123456789"
APPROVER = "U0APPROVER"
OTHER_APPROVER = "W0SECOND1"
STRANGER = "U0STRANGER"
WEBHOOK_PATH = "/services/T0TEAM/B0HOOK/s3cr3tW3bh00kT0k3n"
API_BASE = "https://finopsd.example.com"


# -- Slack, standing in ---------------------------------------------------------------------


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


class SlackStandIn:
    """Takes JSON POSTs on any path and answers ``200 ok`` (``status`` to refuse them)."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.status = 200
        self._cond = threading.Condition()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length)
                with outer._cond:
                    outer.received.append(
                        Received(self.path, dict(self.headers.items()), json.loads(raw))
                    )
                    outer._cond.notify_all()
                answer = b"ok" if outer.status == 200 else b"invalid_blocks"
                self.send_response(outer.status)
                self.send_header("content-type", "text/plain")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def at(self, prefix: str) -> list[Received]:
        with self._cond:
            return [r for r in self.received if r.path.startswith(prefix)]

    def wait(self, prefix: str, n: int = 1, timeout: float = 10) -> list[Received]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while len([r for r in self.received if r.path.startswith(prefix)]) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    got = [r.path for r in self.received]
                    pytest.fail(f"Slack got {got}, not {n} post(s) to {prefix}")
                self._cond.wait(left)
            return [r for r in self.received if r.path.startswith(prefix)]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# -- the world: store, controller, notifier, API ----------------------------------------------


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """slack_sdk sends everything through $HTTPS_PROXY when set (it reads no NO_PROXY):
    the stand-in is on loopback."""
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(name, raising=False)


@dataclass
class World:
    store: Store
    controller: Controller
    routes: FileRoutes
    kafka: Sink
    clock: Clock
    slack: SlackStandIn
    notifier: slack.SlackNotifier
    api: str

    @property
    def webhook(self) -> str:
        return self.slack.url + WEBHOOK_PATH

    def response_url(self, n: int) -> str:
        return f"{self.slack.url}/actions/T0TEAM/{n}/r3sp0ns3"

    def action(self) -> dict[str, Any]:
        (action,) = [a for a in self.controller.list() if a["state"] != State.EXPIRED] or [None]
        assert action is not None
        return action

    def click(
        self, action_id: str, user: str = APPROVER, verb: str = slack.APPROVE, n: int = 1
    ) -> httpx.Response:
        body, headers = signed(click_payload(action_id, user, verb, self.response_url(n)))
        return httpx.post(f"{self.api}/v1/slack/interactions", content=body, headers=headers)


def slack_settings(webhook: str, **extra: Any) -> Settings:
    return Settings.model_validate(
        {
            "slack": {
                "enabled": True,
                "webhook_url": webhook,
                "signing_secret": SECRET,
                "approvers": [APPROVER, OTHER_APPROVER],
                "api_base_url": API_BASE,
                **extra,
            }
        }
    )


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    stand_in = SlackStandIn()
    store = Store(tmp_path / "s.duckdb")
    history(store)
    s = slack_settings(stand_in.url + WEBHOOK_PATH)
    clock = Clock(NOW)
    kafka = Sink()
    notifier = slack.SlackNotifier(s.slack, store, clock=clock)
    routes = FileRoutes(tmp_path / "routes.json")
    controller = Controller(
        store,
        settings(mode="approve"),
        BOOK,
        {"gateway.route": routes},
        events=slack.TeeEvents(kafka, notifier),
        clock=clock,
    )
    notifier.attach(controller)
    state = ServiceState(
        store=store,
        settings=s,
        prices=BOOK,
        stats=IngestStats(),
        liveness=lambda: [Check("api", True)],
        readiness=lambda: [Check("partitions", True)],
        lag=dict,
        analyze=lambda only, days: [],
        controller=controller,
    )
    server = ApiServer(create_app(state, TOKEN), "127.0.0.1", 0)
    server.start()
    try:
        yield World(store, controller, routes, kafka, clock, stand_in, notifier, server.url)
    finally:
        server.stop()
        notifier.close()
        stand_in.close()
        store.close()


def signed(
    payload: dict[str, Any],
    *,
    secret: str = SECRET,
    timestamp: int | str | None = None,
) -> tuple[bytes, dict[str, str]]:
    """The body and headers of Slack's interactivity request for ``payload``."""
    body = urlencode({"payload": json.dumps(payload)})
    ts = str(int(time.time())) if timestamp is None else str(timestamp)
    digest = hmac.new(secret.encode(), f"v0:{ts}:{body}".encode(), hashlib.sha256).hexdigest()
    return body.encode(), {
        "Content-Type": "application/x-www-form-urlencoded",
        "X-Slack-Request-Timestamp": ts,
        "X-Slack-Signature": f"v0={digest}",
        "User-Agent": "Slackbot 1.0 (+https://api.slack.com/robots)",
    }


def click_payload(action_id: str, user: str, verb: str, response_url: str) -> dict[str, Any]:
    """A ``block_actions`` payload as Slack sends it for a button in a webhook's message."""
    return {
        "type": "block_actions",
        "user": {"id": user, "username": "pat", "name": "pat", "team_id": "T0TEAM"},
        "api_app_id": "A0FINOPSD",
        "token": "legacy-verification-token",
        "container": {
            "type": "message",
            "message_ts": "1741521600.000100",
            "channel_id": "C0FINOPS",
            "is_ephemeral": False,
        },
        "trigger_id": "1741521600.0000.abc",
        "team": {"id": "T0TEAM", "domain": "acme"},
        "enterprise": None,
        "is_enterprise_install": False,
        "channel": {"id": "C0FINOPS", "name": "finops"},
        "message": {"type": "message", "ts": "1741521600.000100", "text": "Approval needed"},
        "state": {"values": {}},
        "response_url": response_url,
        "actions": [
            {
                "action_id": verb,
                "block_id": f"finopsd:{action_id}",
                "text": {"type": "plain_text", "text": "Approve", "emoji": True},
                "value": action_id,
                "style": "primary",
                "type": "button",
                "action_ts": "1741521601.123456",
            }
        ],
    }


def awaiting(w: World) -> dict[str, Any]:
    """Tick until the action awaits approval, and its approval message is posted."""
    w.controller.tick()
    action = w.action()
    assert action["state"] == State.AWAITING_APPROVAL
    w.slack.wait(WEBHOOK_PATH)
    return action


def recorded(w: World, n: int, columns: str = "action_id, kind, via, ok, audit_seq") -> list:
    """The rows of ``slack_messages`` once there are ``n`` (a post is recorded after Slack
    answered it)."""

    def rows() -> list:
        got = w.store.cursor().execute(f"SELECT {columns} FROM slack_messages").fetchall()
        return got if len(got) >= n else []

    return wait_for(rows, timeout=10, what=f"{n} rows of slack_messages")


def audit_rows(w: World) -> int:
    row = w.store.cursor().execute("SELECT count(*) FROM action_audit").fetchone()
    return int(row[0]) if row else 0


def assert_block_kit(message: dict[str, Any]) -> None:
    """Within Block Kit's limits, and every block parses as slack_sdk's model of it."""
    assert slack.check_limits(message) == []
    assert message["text"]
    for block in message["blocks"]:
        model = Block.parse(block)
        assert model is not None, block
        model.validate_json()


# -- the approval message ---------------------------------------------------------------------


def test_the_approval_message_says_what_why_and_how_and_fits_block_kit(world: World) -> None:
    action = awaiting(world)
    (got,) = world.slack.at(WEBHOOK_PATH)
    message = got.body
    print(json.dumps(message, indent=2, ensure_ascii=False))  # pytest -s: read it
    assert got.headers["Content-Type"].startswith("application/json")
    assert_block_kit(message)
    kinds = [b["type"] for b in message["blocks"]]
    assert kinds == ["header", *["section"] * 5, "actions", "context"]
    text = json.dumps(message, ensure_ascii=False)
    header = message["blocks"][0]["text"]["text"]
    assert header == "Approval needed: Reroute · acme / bot / answer / big"
    # what and why: the finding's sentence; the first step
    what = message["blocks"][1]["text"]["text"]
    assert "big traffic could route 100% to mid" in what
    assert "10% of the scope's traffic" in what
    assert "&gt;=" in what  # mrkdwn's control characters escaped
    # the saving, labelled a projection, with its interval; confidence and risk
    fields = [f["text"] for f in message["blocks"][2]["fields"]]
    assert fields[0].startswith("*Projected saving*\n$19.48/month (90% interval $17.33–$21.63)")
    assert "a projection" in fields[0]
    assert fields[1] == "*Confidence · risk*\n0.80 · medium"
    assert "2026-03-12 12:00 UTC" in fields[3]  # expires after approval_expiry_hours (72)
    # the evidence: span, requests, the finding's numbers
    evidence = message["blocks"][3]["text"]["text"]
    assert "600 requests over 90 h of traffic (3.8 days)" in evidence
    assert "now big: $0.0100/request, quality 0.95" in evidence
    assert "proposed mid 100%: $0.0060/request, quality 0.88" in evidence
    # the exact diff, in a code block
    diff = message["blocks"][4]["text"]["text"]
    assert diff.endswith(
        '```\n--- routes.json\n+++ routes.json\n@@ -0,0 +1 @@\n+{"big": 0.9, "mid": 0.1}\n```'
    )
    canary = message["blocks"][5]["text"]["text"]
    assert canary.startswith("*Canary plan*\nStep 1 moves 10% of the scope's traffic")
    assert "at least 50 touched requests" in canary and "until 100%" in canary
    approve, reject = message["blocks"][6]["elements"]
    assert (approve["action_id"], approve["value"], approve["style"]) == (
        slack.APPROVE,
        action["id"],
        "primary",
    )
    assert (reject["action_id"], reject["value"], reject["style"]) == (
        slack.REJECT,
        action["id"],
        "danger",
    )
    assert f"<{API_BASE}/v1/actions/{action['id']}|" in text
    assert f"<@{APPROVER}>, <@{OTHER_APPROVER}>" in text
    assert action["id"] in message["text"] and "$19.48/month" in message["text"]
    # recorded, with the transition it announces
    rows = recorded(world, 1)
    seq = max(a["seq"] for a in world.controller.audit(action["id"]))
    assert rows == [(action["id"], "approval", "webhook", True, seq)]
    # the outbox went on as before: Kafka got every transition
    assert [e["to"] for e in world.kafka.events] == ["proposed", "awaiting_approval"]


def test_a_long_diff_is_cut_on_whole_lines_and_says_where_the_rest_is(world: World) -> None:
    action = awaiting(world)
    plan = json.loads(action["plan"])
    plan["diff"] = "".join(f"+  - model_name: big-{i} <&> {'x' * 60}\n" for i in range(2000))
    action = {**action, "plan": json.dumps(plan)}
    message = world.notifier.approval(action)
    assert_block_kit(message)
    block = message["blocks"][4]["text"]["text"]
    assert len(block) <= slack.LIMITS["section.text"]
    body = block.split("```")[1].strip("\n").split("\n")
    assert body[0] == "+  - model_name: big-0 &lt;&amp;&gt; " + "x" * 60
    assert all(line.startswith("+  - model_name: big-") for line in body)  # whole lines
    left = 2000 - len(body)
    assert block.endswith(f"_… {left} more lines: `finopsd actions show {action['id']}`_")


def test_a_message_over_the_limits_is_sent_as_its_text(world: World) -> None:
    message = {
        "text": "plain",
        "blocks": [{"type": "header", "text": {"type": "plain_text", "text": "x" * 151}}],
    }
    assert slack.check_limits(message) == ["blocks[0] (header).text: 151 (limit 1..150)"]
    assert slack.postable(message) == {"text": "plain"}
    assert slack.post(world.webhook, message, 5) is None
    assert world.slack.wait(WEBHOOK_PATH)[-1].body == {"text": "plain"}


# -- clicks -------------------------------------------------------------------------------------


def test_an_approver_approves_from_slack(world: World) -> None:
    action = awaiting(world)
    response = world.click(action["id"])
    assert response.status_code == 200 and response.content == b""
    (answer,) = world.slack.wait("/actions/")
    reply = answer.body
    print(json.dumps(reply, indent=2, ensure_ascii=False))
    assert reply["replace_original"] is True
    assert_block_kit(reply)
    assert not [b for b in reply["blocks"] if b["type"] == "actions"]  # the buttons are gone
    decided = [b["text"]["text"] for b in reply["blocks"] if "Approved" in str(b)]
    assert decided == [
        f":white_check_mark: *Approved* by <@{APPROVER}> at 2026-03-09 12:00 UTC. "
        "The first step is applied at the controller's next tick."
    ]
    assert reply["blocks"][0]["text"]["text"].startswith("Decided: Reroute")
    row = world.controller.get(action["id"])
    assert row["state"] == State.APPROVED and row["approver"] == f"slack:{APPROVER}"
    last = world.controller.audit(action["id"])[-1]
    assert (last["actor"], last["to_state"]) == (f"slack:{APPROVER}", "approved")
    # the next tick applies the canary; Slack hears of it through the webhook (and not of
    # the approval again: the replaced message says it)
    world.controller.tick()
    assert world.controller.get(action["id"])["state"] == State.CANARY
    posts = world.slack.wait(WEBHOOK_PATH, 2)
    update = posts[-1].body
    assert_block_kit(update)
    line = update["blocks"][0]["text"]["text"]
    assert line == (
        ":hatching_chick: *Canary live* · Reroute · acme / bot / answer / big\n"
        "step 1 live: 10% of the scope's traffic"
    )
    assert [e["to"] for e in world.kafka.events][-3:] == ["approved", "applying", "canary"]
    rows = recorded(world, 3, "kind, via, slack_user, ok")
    assert sorted(rows) == sorted(
        [
            ("approval", "webhook", None, True),
            ("decision", "response_url", APPROVER, True),
            ("update", "webhook", None, True),
        ]
    )


def test_an_approver_rejects_from_slack(world: World) -> None:
    action = awaiting(world)
    assert world.click(action["id"], OTHER_APPROVER, slack.REJECT).status_code == 200
    (answer,) = world.slack.wait("/actions/")
    assert answer.body["replace_original"] is True
    assert f":x: *Rejected* by <@{OTHER_APPROVER}> at 2026-03-09 12:00 UTC" in json.dumps(
        answer.body
    )
    row = world.controller.get(action["id"])
    assert row["state"] == State.REJECTED and row["approver"] == f"slack:{OTHER_APPROVER}"
    world.controller.tick()
    assert world.routes.writes == 0
    assert len(world.slack.at(WEBHOOK_PATH)) == 1  # the rejection is not posted twice


def test_someone_not_on_the_approvers_list_changes_nothing(world: World) -> None:
    action = awaiting(world)
    before = audit_rows(world)
    assert world.click(action["id"], STRANGER).status_code == 200
    (answer,) = world.slack.wait("/actions/")
    assert answer.body["response_type"] == "ephemeral"
    assert answer.body["replace_original"] is False
    assert f"<@{STRANGER}>, you are not on finopsd's `slack.approvers`" in answer.body["text"]
    assert "Nothing changed" in answer.body["text"]
    assert world.controller.get(action["id"])["state"] == State.AWAITING_APPROVAL
    assert audit_rows(world) == before
    world.controller.tick()
    assert world.routes.writes == 0


def _tamper(body: bytes, headers: dict[str, str]) -> tuple[bytes, dict[str, str]]:
    return body.replace(b"U0APPROVER", b"U0STRANGER"), headers


def _header(name: str, value: str | None):  # type: ignore[no-untyped-def]
    def change(body: bytes, headers: dict[str, str]) -> tuple[bytes, dict[str, str]]:
        headers = dict(headers)
        if value is None:
            del headers[name]
        else:
            headers[name] = value
        return body, headers

    return change


def _resigned(timestamp: str = "", offset: int = 0, secret: str = SECRET):  # type: ignore[no-untyped-def]
    """Signed again (with ``secret``) at ``timestamp``, or at now + ``offset`` seconds (Slack's
    window is five minutes either way; 310 s is out of it however the second is rounded)."""

    def change(body: bytes, headers: dict[str, str]) -> tuple[bytes, dict[str, str]]:
        payload = json.loads(dict(parse_qsl(body.decode()))["payload"])
        ts = timestamp or str(int(time.time()) + offset)
        return signed(payload, secret=secret, timestamp=ts)

    return change


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(_header("X-Slack-Signature", None), id="no-signature"),
        pytest.param(_header("X-Slack-Request-Timestamp", None), id="no-timestamp"),
        pytest.param(_header("X-Slack-Signature", "v0=" + "0" * 64), id="wrong-signature"),
        pytest.param(_header("X-Slack-Signature", "v1=abc"), id="malformed-signature"),
        pytest.param(_header("X-Slack-Signature", ""), id="empty-signature"),
        pytest.param(_header("X-Slack-Request-Timestamp", "soon"), id="non-numeric-timestamp"),
        pytest.param(_header("X-Slack-Request-Timestamp", "1e9"), id="float-timestamp"),
        pytest.param(_resigned(offset=-310), id="stale"),
        pytest.param(_resigned(offset=310), id="future"),
        pytest.param(_resigned("abc"), id="signed-non-numeric-timestamp"),
        pytest.param(_resigned(f"+{int(time.time())}"), id="signed-plus-timestamp"),
        pytest.param(_resigned("1741521600.5"), id="signed-fractional-timestamp"),
        pytest.param(_resigned(secret="another-secret"), id="other-secret"),
        pytest.param(_tamper, id="tampered-body"),
    ],
)
def test_an_unsigned_stale_or_forged_request_is_refused(world: World, change: Any) -> None:
    action = awaiting(world)
    before = audit_rows(world)
    payload = click_payload(action["id"], APPROVER, slack.APPROVE, world.response_url(1))
    body, headers = change(*signed(payload))
    response = httpx.post(f"{world.api}/v1/slack/interactions", content=body, headers=headers)
    assert response.status_code == 401, response.text
    assert "not signed by Slack" in response.json()["detail"]
    time.sleep(0.3)  # nothing was scheduled, so nothing comes
    assert world.slack.at("/actions/") == []
    assert world.controller.get(action["id"])["state"] == State.AWAITING_APPROVAL
    assert audit_rows(world) == before


def test_a_click_signed_four_minutes_ago_is_still_taken(world: World) -> None:
    action = awaiting(world)
    payload = click_payload(action["id"], APPROVER, slack.APPROVE, world.response_url(1))
    body, headers = signed(payload, timestamp=int(time.time()) - 240)
    response = httpx.post(f"{world.api}/v1/slack/interactions", content=body, headers=headers)
    assert response.status_code == 200
    world.slack.wait("/actions/")
    assert world.controller.get(action["id"])["state"] == State.APPROVED


def test_a_replayed_request_and_a_second_click_change_nothing(world: World) -> None:
    action = awaiting(world)
    body, headers = signed(
        click_payload(action["id"], APPROVER, slack.APPROVE, world.response_url(1))
    )
    url = f"{world.api}/v1/slack/interactions"
    assert httpx.post(url, content=body, headers=headers).status_code == 200
    world.slack.wait("/actions/")
    after_first = audit_rows(world)
    # the same request again, within the five minutes its signature is valid
    assert httpx.post(url, content=body, headers=headers).status_code == 200
    time.sleep(0.3)
    assert len(world.slack.at("/actions/")) == 1
    # a new click (another signature) on the action decided: the message says so
    assert world.click(action["id"], OTHER_APPROVER, slack.REJECT, n=2).status_code == 200
    answers = world.slack.wait("/actions/", 2)
    second = answers[-1].body
    assert second["replace_original"] is True
    said = json.dumps(second, ensure_ascii=False)
    assert f"*Approved* by <@{APPROVER}>" in said
    assert "Nothing changed: it is approved, not awaiting approval" in said
    assert_block_kit(second)
    row = world.controller.get(action["id"])
    assert row["state"] == State.APPROVED and row["approver"] == f"slack:{APPROVER}"
    assert audit_rows(world) == after_first


def test_a_click_is_acknowledged_while_a_tick_holds_the_controller(world: World) -> None:
    """Slack waits 3 s for the answer; a tick applying a change may take longer."""
    action = awaiting(world)
    held = threading.Event()
    release = threading.Event()

    def tick_that_takes_long() -> None:
        with world.controller._lock:
            held.set()
            release.wait(10)

    holder = threading.Thread(target=tick_that_takes_long)
    holder.start()
    held.wait(5)
    try:
        began = time.monotonic()
        assert world.click(action["id"]).status_code == 200
        assert time.monotonic() - began < 1.0
        time.sleep(0.3)
        assert world.controller.get(action["id"])["state"] == State.AWAITING_APPROVAL
    finally:
        release.set()
        holder.join()
    world.slack.wait("/actions/")
    assert world.controller.get(action["id"])["state"] == State.APPROVED


def test_an_expired_approval_is_posted_and_a_late_click_changes_nothing(world: World) -> None:
    action = awaiting(world)
    world.clock.now += timedelta(hours=73)
    world.controller.tick()
    assert world.controller.get(action["id"])["state"] == State.EXPIRED
    posts = world.slack.wait(WEBHOOK_PATH, 2)  # the approval, the expiry
    expired = posts[1].body
    assert_block_kit(expired)
    line = expired["blocks"][0]["text"]["text"]
    assert line.startswith(":hourglass: *Approval expired* · Reroute · acme / bot / answer / big")
    assert "no decision before the approval window ended" in line
    assert "a new action is proposed" in line
    # the finding is still open: the next tick proposes it again, and asks again
    world.controller.tick()
    fresh = world.action()
    assert fresh["id"] != action["id"] and fresh["state"] == State.AWAITING_APPROVAL
    again = world.slack.wait(WEBHOOK_PATH, 3)[2].body
    assert again["blocks"][6]["elements"][0]["value"] == fresh["id"]
    before = audit_rows(world)
    assert world.click(action["id"]).status_code == 200
    (answer,) = world.slack.wait("/actions/")
    assert ":hourglass: *Approval expired*" in json.dumps(answer.body, ensure_ascii=False)
    assert world.controller.get(action["id"])["state"] == State.EXPIRED
    assert audit_rows(world) == before


def test_a_rollback_is_posted_with_its_reason(world: World) -> None:
    action = awaiting(world)
    world.click(action["id"])
    world.slack.wait("/actions/")
    world.controller.tick()  # canary: 10% on mid
    world.clock.now += timedelta(minutes=1)
    serve(world.store, world.routes.path, 600, world.clock.now, mid_quality=0.60, tag="bad-")
    world.clock.now += timedelta(minutes=600)
    world.controller.tick()
    assert world.controller.get(action["id"])["state"] == State.ROLLED_BACK
    posts = [p.body["blocks"][0]["text"]["text"] for p in world.slack.wait(WEBHOOK_PATH, 3)]
    rolled = [p for p in posts if "*Rolled back*" in p]
    assert len(rolled) == 1
    print(rolled[0])
    assert "regression: quality" in rolled[0]
    assert "the configuration before the action is restored" in rolled[0]


# -- Slack away ----------------------------------------------------------------------------------


def test_slack_away_never_holds_the_controller_up_and_the_url_is_never_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    stand_in = SlackStandIn()
    webhook = stand_in.url + WEBHOOK_PATH
    stand_in.close()  # nothing listens there any more
    s = slack_settings(webhook, timeout_s=1)
    with Store(tmp_path / "s.duckdb") as store:
        history(store)
        kafka = Sink()
        notifier = slack.SlackNotifier(s.slack, store, clock=Clock(NOW))
        controller = Controller(
            store,
            settings(mode="approve"),
            BOOK,
            {"gateway.route": FileRoutes(tmp_path / "routes.json")},
            events=slack.TeeEvents(kafka, notifier),
            clock=Clock(NOW),
        )
        notifier.attach(controller)
        caplog.set_level(logging.DEBUG)
        began = time.monotonic()
        done = controller.tick()
        assert time.monotonic() - began < 2.0
        assert done["published"] == 2 and [e["to"] for e in kafka.events][-1] == "awaiting_approval"
        rows = wait_for(
            lambda: store.cursor().execute("SELECT ok, error FROM slack_messages").fetchall(),
            timeout=15,
            what="the failed post recorded",
        )
        notifier.close()
        ((ok, error),) = rows
        assert ok is False and "Connection refused" in error
        assert "s3cr3tW3bh00kT0k3n" not in error
        assert "s3cr3tW3bh00kT0k3n" not in caplog.text
        assert "not posted" in caplog.text
        # a Kafka outage resends the row; Slack is not asked twice once it took it
        assert slack.posted(store, 2) is False


class Refusing(Sink):
    """A broker that takes the first event and refuses the rest while ``down``."""

    def send(self, key: str, value: dict[str, Any]) -> bool:
        if self.down and self.events:
            return False
        self.events.append(value)
        return True


def test_a_transition_the_outbox_sends_again_is_posted_once(world: World) -> None:
    kafka = Refusing()
    world.controller.events = slack.TeeEvents(kafka, world.notifier)
    kafka.down = True
    world.controller.tick()  # proposed taken; awaiting_approval refused: kept in the outbox
    world.slack.wait(WEBHOOK_PATH)
    recorded(world, 1)
    kafka.down = False
    world.controller.tick()  # sent again: to Kafka now, to Slack not again
    time.sleep(0.5)
    assert len(world.slack.at(WEBHOOK_PATH)) == 1
    assert [e["to"] for e in kafka.events] == ["proposed", "awaiting_approval"]


def test_while_kafka_refuses_events_slack_waits_with_the_outbox(world: World) -> None:
    """The controller publishes in order and stops at the first event the broker refuses;
    Slack hears of each transition as it is published (documented in the README)."""
    world.kafka.down = True
    world.controller.tick()
    time.sleep(0.5)
    assert world.slack.at(WEBHOOK_PATH) == []
    world.kafka.down = False
    world.controller.tick()
    assert len(world.slack.wait(WEBHOOK_PATH)) == 1


# -- settings ------------------------------------------------------------------------------------


def test_slack_is_off_by_default_and_its_endpoint_says_so(tmp_path: Path) -> None:
    assert Settings().slack.enabled is False
    with Store(tmp_path / "s.duckdb") as store:
        state = ServiceState(
            store=store,
            settings=Settings(),
            prices=BOOK,
            stats=IngestStats(),
            liveness=lambda: [],
            readiness=lambda: [],
            lag=dict,
            analyze=lambda only, days: [],
        )
        server = ApiServer(create_app(state, TOKEN), "127.0.0.1", 0)
        server.start()
        try:
            body, headers = signed(click_payload("a-1", APPROVER, slack.APPROVE, "http://x"))
            r = httpx.post(f"{server.url}/v1/slack/interactions", content=body, headers=headers)
            assert r.status_code == 404 and "slack.enabled" in r.json()["detail"]
        finally:
            server.stop()


def test_config_check_reads_slacks_files_and_never_shows_the_secrets(tmp_path: Path) -> None:
    hook = tmp_path / "hook"
    secret = tmp_path / "secret"
    hook.write_text("https://hooks.slack.com/services/T0/B0/s3cr3tW3bh00kT0k3n\n")
    secret.write_text(SECRET + "\n")
    config = tmp_path / "config.toml"
    base = '[slack]\nenabled = true\nwebhook_url_file = "hook"\nsigning_secret_file = "secret"\n'
    config.write_text(base + 'approvers = ["U024BE7LH"]\n')
    loaded = load_settings(config, {})
    assert loaded.slack.webhook_url_file == hook
    assert loaded.slack.webhook_url_value().endswith("s3cr3tW3bh00kT0k3n")
    assert loaded.slack.signing_secret_value() == SECRET
    shown = json.dumps(loaded.redacted())
    assert "s3cr3t" not in shown and SECRET not in shown

    def error(text: str, env: dict[str, str] | None = None) -> str:
        config.write_text(text)
        with pytest.raises(ConfigError) as info:
            load_settings(config, env or {})
        message = str(info.value)
        assert "s3cr3t" not in message and SECRET not in message
        return message

    assert "slack.approvers: 'pat' is not a Slack user id" in error(base + 'approvers = ["pat"]\n')
    assert "no one could approve" in error(base)
    secret.unlink()
    assert "slack.signing_secret_file: cannot read" in error(base + 'approvers = ["U024BE7LH"]\n')
    secret.write_text(SECRET)
    hook.write_text("hooks.slack.com/services/T0/B0/s3cr3tW3bh00kT0k3n")
    assert "slack.webhook_url_file: not an http(s) URL" in error(
        base + 'approvers = ["U024BE7LH"]\n'
    )
    # from the environment, never shown either
    env = {
        "FINOPSD_SLACK__WEBHOOK_URL": "https://hooks.slack.com/services/T0/B0/s3cr3tW3bh00kT0k3n",
        "FINOPSD_SLACK__SIGNING_SECRET": SECRET,
        "FINOPSD_SLACK__APPROVERS": "U024BE7LH,W0123ABCD",
    }
    config.write_text("[slack]\nenabled = true\n")
    loaded = load_settings(config, env)
    assert loaded.slack.approvers == ["U024BE7LH", "W0123ABCD"]
    assert "s3cr3t" not in json.dumps(loaded.redacted())
    assert "not both" in error('[slack]\nwebhook_url_file = "hook"\n', env)
    assert "unknown state 'canery'" in error('[slack]\npost_states = ["canery"]\n')
    assert "needs api.enabled" in error("[api]\nenabled = false\n[slack]\nenabled = true\n", env)


def test_the_daemon_tees_the_controllers_events_to_slack(tmp_path: Path) -> None:
    from finopsd.daemon import Daemon

    s = slack_settings("http://127.0.0.1:9/hook")
    with Store(tmp_path / "s.duckdb") as store:
        service = Daemon(s)._make_controller(store, BOOK, "127.0.0.1:9", {})
        assert service is not None
        events = service.controller.events
        assert isinstance(events, slack.TeeEvents)
        (notifier,) = events.observers
        assert (
            isinstance(notifier, slack.SlackNotifier) and notifier.controller is service.controller
        )
        assert notifier in service._closers
        assert "9/hook" not in repr(notifier)
