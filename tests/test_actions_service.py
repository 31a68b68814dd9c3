"""The controller in the running daemon: the API, the CLI, Kafka commands and events.

Real parts: the embedded broker, the daemon as a subprocess, HTTP on loopback, the
CLI as a subprocess. The store starts with the routing finding of
``test_actions.history`` (acme / bot / answer: big → mid). ``gateway.route`` is
sent as a Kafka command here, so the external controller is the test itself: it
reads the command from the command topic and acknowledges it on the ack topic,
as a real one would.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
from conftest import DaemonProcess, DaemonSetup, Topics, cli, consume_all, wait_for
from conftest import daemon_api as api
from kafka import KafkaProducer
from test_actions import history

from finopsd.ingest.broker import ensure_topics
from finopsd.store import Store

MakeConfig = Callable[..., DaemonSetup]
Daemons = Callable[..., DaemonProcess]


def test_approve_a_command_through_the_cli_and_see_every_step_on_kafka(
    topics: Topics, make_config: MakeConfig, daemons: Daemons
) -> None:
    suffix = topics.group.removeprefix("group.")
    events, commands, acks = f"actions.{suffix}", f"commands.{suffix}", f"acks.{suffix}"
    ensure_topics(topics.bootstrap, {events: 1, commands: 1, acks: 1})
    setup = make_config(
        "actions",
        analyzers={"first_run_delay_s": 86400},
        actions={
            "interval_s": 1,
            "topic": events,
            "policy": {"gateway.route": {"mode": "approve"}},
            "command": {"kinds": ["gateway.route"], "topic": commands, "ack_topic": acks},
        },
    )
    with Store(setup.store) as store:
        history(store)
    daemon = daemons(setup).start()
    daemon.wait_ready()
    url, auth = api(setup)
    with httpx.Client(base_url=url, timeout=60) as c:

        def actions() -> list[dict[str, Any]]:
            r = c.get("/v1/actions", headers=auth)
            assert r.status_code == 200, r.text
            return r.json()["actions"]

        wait_for(
            lambda: [a["state"] for a in actions()] == ["awaiting_approval"],
            timeout=60,
            what="the action to await approval",
        )
        (action,) = actions()
        action_id = action["id"]
        assert c.get("/v1/actions").status_code == 401
        refused = c.post(f"/v1/actions/{action_id}/approve", json={"actor": "mallory"})
        assert refused.status_code == 401
        assert actions()[0]["state"] == "awaiting_approval"

        plan = cli(setup, "actions", "plan", action["finding_id"], "--json")
        assert plan.returncode == 0, plan.stderr
        planned = json.loads(plan.stdout)
        assert planned["backend"] == "kafka_command" and planned["share"] == 0.1
        assert planned["spec"]["params"]["weights"] == {"big": 0.9, "mid": 0.1}

        approved = cli(setup, "actions", "approve", action_id, "--actor", "U024BE7LH")
        assert approved.returncode == 0, approved.stderr
        assert "approved" in approved.stdout
        again = cli(setup, "actions", "approve", action_id)
        assert again.returncode == 1 and "not awaiting approval" in again.stderr

        (command,) = consume_all(topics.bootstrap, commands, 1, timeout=60)
        sent = json.loads(command.value)
        assert sent["command_id"] == f"{action_id}/apply/1" and sent["op"] == "apply"
        assert sent["kind"] == "gateway.route"
        assert sent["params"]["weights"] == {"big": 0.9, "mid": 0.1}
        wait_for(
            lambda: actions()[0]["reason"].startswith("waiting for the external"),
            timeout=30,
            what="the controller to wait for the acknowledgement",
        )
        producer = KafkaProducer(bootstrap_servers=topics.bootstrap)
        producer.send(acks, b"not json").get(timeout=30)  # ignored, logged
        ack = {"command_id": sent["command_id"], "status": "done", "detail": "applied"}
        producer.send(acks, json.dumps(ack).encode()).get(timeout=30)
        producer.close()
        wait_for(lambda: actions()[0]["state"] == "canary", timeout=60, what="canary")

        shown = c.get(f"/v1/actions/{action_id}", headers=auth).json()
        assert shown["approver"] == "U024BE7LH"
        assert [a["to_state"] for a in shown["audit"]] == [
            "proposed",
            "awaiting_approval",
            "approved",
            "applying",
            "canary",
        ]
        rolled = c.post(
            f"/v1/actions/{action_id}/rollback",
            json={"actor": "api:ops", "reason": "testing"},
            headers=auth,
        )
        assert rolled.status_code == 200, rolled.text
        assert rolled.json()["state"] == "rolled_back"
        conflict = c.post(
            f"/v1/actions/{action_id}/rollback", json={"actor": "api:ops"}, headers=auth
        )
        assert conflict.status_code == 409

    every = consume_all(topics.bootstrap, commands, 2, timeout=60)
    assert [json.loads(r.value)["op"] for r in every] == ["apply", "rollback"]
    published = [json.loads(r.value) for r in consume_all(topics.bootstrap, events, 7, timeout=60)]
    assert [e["to"] for e in published] == [
        "proposed",
        "awaiting_approval",
        "approved",
        "applying",
        "canary",
        "rolling_back",
        "rolled_back",
    ]
    assert [e["seq"] for e in published] == sorted(e["seq"] for e in published)
    live = cli(setup, "actions", "show", action_id, "--json")
    assert live.returncode == 0, live.stderr
    assert daemon.terminate() == 0
    stopped = cli(setup, "actions", "show", action_id, "--json")
    assert stopped.returncode == 0, stopped.stderr
    assert json.loads(stopped.stdout) == json.loads(live.stdout)
    text = cli(setup, "actions", "list")
    assert text.returncode == 0 and action_id in text.stdout and "rolled_back" in text.stdout
    assert all(len(line) <= 80 for line in text.stdout.splitlines())
