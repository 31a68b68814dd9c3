"""``make demo``: the whole loop on real parts, in a few minutes.

1. An embedded Kafka-protocol broker, two local OpenAI-compatible upstreams
   (``gpt-4o`` and ``gpt-4o-mini``) and a real LiteLLM proxy in front of them,
   logging every call to Kafka through finopsd's callback; a service manager that
   restarts the proxy when asked (as ``systemctl restart litellm`` would).
2. A week of history for one feature (acme / support / answer), its request sizes
   from the Azure LLM inference trace 2023 in ``../shared/data``: on ``gpt-4o``
   (quality 0.95) with some traffic on ``gpt-4o-mini`` (0.90) beside it. The live
   traffic sent through the proxy later takes the trace's next requests' sizes.
3. ``finopsd run``: ingests the history and the proxy's records; routing finds that
   the feature could run on ``gpt-4o-mini``; the controller (policy ``approve``)
   posts the action to Slack — here a local receiver that plays Slack's side of
   the wire and clicks **Approve** with a signed request, as Slack does.
4. The proxy's config.yaml is changed a step at a time (10 %, 60 %, 100 %), the proxy
   restarted, live traffic sent through it, each step verified; the savings ledger
   measures what the change saved.
5. The week's report is written under ``--out`` (default ``./out``).

Every process it starts is stopped at the end, whatever happens.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import hmac
import itertools
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the gateway harness: upstreams, proxy, restarts

from gateway_harness import LiteLLMProxy, ServiceManager, Upstream, deployment, send  # noqa: E402
from kafka import KafkaProducer  # noqa: E402

from finopsd.ingest.broker import EmbeddedBroker, ensure_topics  # noqa: E402
from finopsd.reports import weekly  # noqa: E402

TRACE = ROOT.parent / "shared" / "data" / "azure_llm_2023_conv.csv"
SCOPE = {"tenant": "acme", "team": "support-eng", "app": "support", "feature": "answer"}
APPROVER = "U0DEMOPAT"
SECRET = "demo-signing-secret-" + "x" * 12
STARTED = time.monotonic()


def say(text: str) -> None:
    print(f"[{time.monotonic() - STARTED:5.0f}s] {text}", flush=True)


def wait(condition: Any, what: str, timeout: float = 120.0, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = condition()
        if got:
            return got
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


class SlackSide:
    """Slack's side of the wire: takes the webhook's posts, and clicks Approve on an
    approval message with a request signed as Slack signs it."""

    def __init__(self, interactions_url: Any) -> None:
        self.posts: list[dict[str, Any]] = []
        self.clicked: list[str] = []
        self.interactions_url = interactions_url
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)))
                outer.posts.append({"path": self.path, "body": body})
                self.send_response(200)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"ok")
                if self.path == "/hook":
                    threading.Thread(target=outer.maybe_click, args=(body,), daemon=True).start()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def maybe_click(self, message: dict[str, Any]) -> None:
        for block in message.get("blocks") or []:
            for element in block.get("elements") or []:
                if element.get("action_id") == "finopsd_approve":
                    time.sleep(1.0)  # a person reads it first
                    self.click(element["value"], block.get("block_id", ""))

    def click(self, action_id: str, block_id: str) -> None:
        payload = {
            "type": "block_actions",
            "user": {"id": APPROVER, "username": "pat", "name": "pat", "team_id": "T0DEMO"},
            "api_app_id": "A0FINOPSD",
            "container": {"type": "message", "message_ts": "1.0", "channel_id": "C0FINOPS"},
            "team": {"id": "T0DEMO", "domain": "acme"},
            "channel": {"id": "C0FINOPS", "name": "finops"},
            "message": {"type": "message", "ts": "1.0", "text": "approval"},
            "response_url": f"{self.url}/response",
            "actions": [
                {
                    "action_id": "finopsd_approve",
                    "block_id": block_id,
                    "value": action_id,
                    "type": "button",
                    "action_ts": f"{time.time():.6f}",
                }
            ],
        }
        body = urlencode({"payload": json.dumps(payload)})
        ts = str(int(time.time()))
        sig = hmac.new(SECRET.encode(), f"v0:{ts}:{body}".encode(), hashlib.sha256).hexdigest()
        r = httpx.post(
            self.interactions_url(),
            content=body.encode(),
            headers={
                "Content-Type": "application/x-www-form-urlencoded",
                "X-Slack-Request-Timestamp": ts,
                "X-Slack-Signature": f"v0={sig}",
            },
            timeout=30,
            trust_env=False,
        )
        self.clicked.append(f"{action_id}: HTTP {r.status_code}")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def trace_sizes() -> list[tuple[int, int]]:
    """(context tokens, generated tokens) of each request of the Azure conversation trace."""
    with open(TRACE, newline="") as f:
        return [(int(r["ContextTokens"]), int(r["GeneratedTokens"])) for r in csv.DictReader(f)]


def history(bootstrap: str, topic: str, days: int = 7) -> int:
    """A week of the feature's requests, sizes from the Azure trace, to the usage topic."""
    sizes = trace_sizes()
    rng = random.Random(7)
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    start = now - timedelta(days=days)
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=20)
    n = 0
    for i, (inp, out) in enumerate(itertools.islice(itertools.cycle(sizes), 3000)):
        ts = start + timedelta(seconds=(days * 86400 - 600) * i / 3000)
        mini = i % 4 == 3  # the feature's traffic on gpt-4o-mini: the candidate's evidence
        model = "gpt-4o-mini" if mini else "gpt-4o"
        event = {
            "event_id": f"demo-history-{i}",
            "ts": ts.isoformat(),
            "gen_ai.provider.name": "openai",
            "gen_ai.request.model": model,
            "gen_ai.response.model": model,
            "gen_ai.usage.input_tokens": min(inp, 8000),
            "gen_ai.usage.output_tokens": min(max(out, 1), 1000),
            "latency_ms": round(rng.uniform(400, 1500), 1),
            "status": "ok",
            "quality_score": round(min(1.0, rng.gauss(0.90 if mini else 0.95, 0.02)), 3),
            **SCOPE,
        }
        producer.send(topic, key=event["event_id"].encode(), value=json.dumps(event).encode())
        n += 1
    producer.flush()
    producer.close()
    return n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="out", help="where the report goes (default ./out)")
    parser.add_argument("--json", action="store_true", help="print the outcome as JSON last")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    work = Path(tempfile.mkdtemp(prefix="finopsd-demo-"))
    with contextlib.ExitStack() as stack:
        say(f"working in {work}")
        broker = EmbeddedBroker("127.0.0.1", 0, log_file=work / "broker.log")
        broker.start()
        stack.callback(broker.stop)
        bootstrap = broker.bootstrap
        ensure_topics(bootstrap, {"llm.usage": 2, "llm.litellm": 1, "gpu.metrics": 1})
        say(f"broker on {bootstrap}")

        strong = Upstream("gpt-4o", completion_tokens=120).start()
        cheap = Upstream("gpt-4o-mini", completion_tokens=120).start()
        stack.callback(strong.stop)
        stack.callback(cheap.stop)
        proxy = LiteLLMProxy(
            work / "litellm",
            {
                "model_list": [deployment("gpt-4o", strong), deployment("gpt-4o-mini", cheap)],
                "router_settings": {"num_retries": 0, "routing_strategy": "simple-shuffle"},
            },
            bootstrap=bootstrap,
            topic="llm.litellm",
        )
        stack.callback(proxy.stop)
        proxy.start()
        manager = ServiceManager(proxy, work / "restarts").start()
        stack.callback(manager.stop)
        say(f"LiteLLM proxy on {proxy.url} in front of gpt-4o and gpt-4o-mini")

        n = history(bootstrap, "llm.usage")
        say(f"a week of history: {n:,} requests of acme / support / answer (Azure trace sizes)")

        slack = SlackSide(lambda: f"{api_url}/v1/slack/interactions")
        stack.callback(slack.close)
        (work / "master-key").write_text(proxy.master_key + "\n")
        store = work / "finopsd.duckdb"
        config = work / "finopsd.toml"
        config.write_text(
            f"""
[kafka]
bootstrap_servers = "{bootstrap}"
usage_topic = "llm.usage"
[ingest]
batch_max_age_ms = 200
formats = {{ "llm.litellm" = "litellm" }}
[store]
path = "{store}"
[api]
port = 0
[analyzers]
first_run_delay_s = 86400
[analyzers.routing]
min_monthly_savings_usd = 0.0
[actions]
interval_s = 1
[actions.policy."gateway.route"]
mode = "approve"
min_monthly_usd = 0.0
max_share_step = 0.5
max_steps_per_day = 10
[actions.verify]
canary_share = 0.1
min_requests = 30
max_p95_latency_increase = 5.0
[actions.gateway]
config_path = "{proxy.config_path}"
reload_command = {json.dumps(manager.reload_command())}
proxy_url = "{proxy.url}"
master_key_file = "{work / "master-key"}"
[slack]
enabled = true
webhook_url = "{slack.url}/hook"
signing_secret = "{SECRET}"
approvers = ["{APPROVER}"]
[reports]
out_dir = "{out}"
"""
        )
        log = open(work / "finopsd.log", "ab")  # noqa: SIM115 - closed by the stack
        stack.callback(log.close)
        daemon = subprocess.Popen(
            [sys.executable, "-m", "finopsd", "run", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={k: v for k, v in os.environ.items() if not k.startswith("FINOPSD_")},
        )

        def stop_daemon() -> None:
            if daemon.poll() is None:
                daemon.terminate()
                try:
                    daemon.wait(60)
                except subprocess.TimeoutExpired:
                    daemon.kill()

        stack.callback(stop_daemon)
        address = store.with_name(store.name + ".api")
        wait(lambda: address.exists() or daemon.poll() is not None, "the daemon's API")
        if daemon.poll() is not None:
            raise RuntimeError(f"finopsd exited {daemon.returncode}: see {work / 'finopsd.log'}")
        api_url = json.loads(address.read_text())["url"]
        token = store.with_name(store.name + ".api-token").read_text().strip()
        api = httpx.Client(
            base_url=api_url, headers={"Authorization": f"Bearer {token}"}, timeout=300
        )
        stack.callback(api.close)
        say(f"finopsd running, API on {api_url}")

        def stored() -> int:
            return int(api.get("/v1/stats").json()["usage_events"])

        wait(lambda: stored() >= n, "the history to be stored")
        ran = api.post("/v1/analyze", json={"only": ["routing"]}).json()
        (finding,) = [f for f in ran["findings"] if f["kind"] == "routing.model_mix"]
        say(f"finding: {finding['title']}")

        def action() -> dict[str, Any] | None:
            rows = api.get("/v1/actions").json()["actions"]
            return rows[0] if rows else None

        first = wait(action, "the action")
        action_id = first["id"]
        wait(lambda: slack.clicked, "the approval in Slack")
        say(f"Slack: approval posted; {APPROVER} clicked Approve ({slack.clicked[0]})")

        def state_in(*states: str) -> dict[str, Any] | None:
            a = api.get(f"/v1/actions/{action_id}").json()
            return a if a["state"] in states else None

        live = itertools.cycle([(min(c, 4000), g) for c, g in trace_sizes()[3000:]] or [(500, 100)])

        def drive(count: int, tag: str) -> None:
            api.post(f"/v1/actions/{action_id}/pause", json={"actor": "demo", "paused": True})
            before = stored()
            for i in range(count):  # the trace's next request sizes, through the proxy
                context, _ = next(live)
                words = "the customer asks about a refund for order " * (context // 9 + 1)
                send(proxy, "gpt-4o", f"{tag} ticket {i}: {words}", tags=SCOPE)
            wait(lambda: stored() >= before + count, "the live requests to be stored")
            api.post(f"/v1/actions/{action_id}/pause", json={"actor": "demo", "paused": False})

        a = wait(lambda: state_in("canary"), "the canary")
        while a["state"] in ("canary", "promoted"):
            moved, step = cheap.served, a["step"]
            count = 400 if step == 1 else 150
            drive(count, f"step{step}")
            say(
                f"step {step}: {a['share']:.0%} of the feature's traffic routed to gpt-4o-mini; "
                f"it served {cheap.served - moved} of {count} requests"
            )
            a = wait(
                lambda step=step, state=a["state"]: (
                    (x := state_in("canary", "promoted", "verified", "rolled_back"))
                    and (x["step"] != step or x["state"] != state)
                    and x
                ),
                "the step's verdict",
                timeout=180,
            )
        say(f"action {action_id}: {a['state']} — {a['reason']}")
        savings = wait(
            lambda: (s := api.get("/v1/actions/savings").json())["actions"] and s,
            "the ledger",
        )
        time.sleep(3)  # a tick after the last requests were stored
        savings = api.get("/v1/actions/savings").json()
        report_week = weekly.Week.parse("{}-W{:02d}".format(*datetime.now(UTC).isocalendar()[:2]))
        made = subprocess.run(
            [
                *(sys.executable, "-m", "finopsd", "report", "--week", report_week.label),
                *("--out", str(out), "--json", "--config", str(config)),
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if made.returncode != 0:
            raise RuntimeError(f"finopsd report failed: {made.stderr}")
        result = json.loads(made.stdout)
        report = result["report"]
        say("done. This week's report:")
        for line in weekly.headline(report):
            print(f"    {line}")
        print(f"    {result['files']['html']}")
        print(f"    {result['files']['markdown']}")
        if args.json:
            totals = savings["actions"][0]
            print(
                json.dumps(
                    {
                        "action_id": action_id,
                        "state": a["state"],
                        "ledger": totals,
                        "report_realised_usd": report["realised"]["saved_usd"],
                        "files": result["files"],
                    },
                    default=str,
                )
            )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:
        print(f"demo failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(1)
