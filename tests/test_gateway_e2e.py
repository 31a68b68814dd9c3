"""The whole loop on real parts: traffic through a real LiteLLM proxy, finopsd's daemon
ingesting its Kafka records, finding the waste, changing the proxy's config.yaml,
restarting the proxy, verifying the touched traffic, rolling back, measuring.

Each test has its own proxy (its own Kafka topic) in front of local upstreams, its own
daemon and store. The proxy runs under a ``ServiceManager``, the stand-in for
``systemctl restart litellm``: finopsd's ``actions.gateway.reload_command`` asks it to
restart the proxy on the edited config.yaml. Model groups are named as the models
behind them (``gpt-4o``, ``gpt-4o-mini``), priced by the shipped catalog.
"""

from __future__ import annotations

import math
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.register_assert_rewrite("gateway_harness")
pytest_plugins = ("gateway_harness",)

from conftest import DaemonProcess, DaemonSetup, daemon_api, wait_for  # noqa: E402
from gateway_harness import (  # noqa: E402
    RELOAD_CLIENT,
    LiteLLMProxy,
    ServiceManager,
    Upstream,
    deployment,
    send,
)

from finopsd.actions.gateway import litellm_config  # noqa: E402
from finopsd.pricing import PriceBook  # noqa: E402

MakeConfig = Callable[..., DaemonSetup]
Daemons = Callable[..., DaemonProcess]
TAGS = {"tenant": "acme", "app": "support", "feature": "answer"}
COMPLETION_TOKENS = 40
BOOK = PriceBook.shipped()


def list_price(model: str, prompt: int, completion: int) -> float:
    """What the shipped catalog charges, worked out here from its per-token prices."""
    price = BOOK.price_at(f"openai/{model}", datetime.now(UTC).date())
    assert price is not None, model
    return (prompt * price.input_per_mtok + completion * price.output_per_mtok) / 1e6


@dataclass
class Loop:
    proxy: LiteLLMProxy
    strong: Upstream
    cheap: Upstream
    manager: ServiceManager
    setup: DaemonSetup
    daemon: DaemonProcess
    url: str
    auth: dict[str, str]

    def api(self, method: str, path: str, body: Any = None) -> Any:
        with httpx.Client(base_url=self.url, timeout=120, trust_env=False) as c:
            r = c.request(method, path, json=body, headers=self.auth)
        assert r.status_code < 400, f"{method} {path}: {r.status_code} {r.text}"
        return r.json()

    def paused_drive(self, action_id: str, n: int, model: str, tag: str) -> int:
        """``drive`` with the action paused (no step, no restart meanwhile), then resumed."""
        self.api("POST", f"/v1/actions/{action_id}/pause", {"actor": "test", "paused": True})
        try:
            return self.drive(n, model, tag)
        finally:
            self.api("POST", f"/v1/actions/{action_id}/pause", {"actor": "test", "paused": False})

    def stored(self) -> int:
        return int(self.api("GET", "/v1/stats")["usage_events"])

    def actions(self) -> list[dict[str, Any]]:
        return self.api("GET", "/v1/actions")["actions"]

    def action(self, action_id: str) -> dict[str, Any]:
        return self.api("GET", f"/v1/actions/{action_id}")

    def wait_state(self, action_id: str, states: set[str], timeout: float = 120) -> dict[str, Any]:
        def now() -> str:
            a = self.action(action_id)
            return (
                f"now {a['state']}: {a['reason']}\nverdict: {a['verdict']}\n"
                f"served: strong {self.strong.served}, cheap {self.cheap.served} "
                f"({self.cheap.failed} failed)\n{self.daemon.log_tail(2000)}"
            )

        wait_for(
            lambda: self.action(action_id)["state"] in states,
            timeout=timeout,
            what=f"action {action_id} to reach {states}",
            interval=0.5,
            context=now,
        )
        return self.action(action_id)

    def drive(self, n: int, model: str, tag: str, *, quality: float | None = None) -> int:
        """``n`` requests of the scope for ``model``; waits until the daemon stored them."""
        before = self.stored()
        for i in range(n):
            prompt = f"{tag} {i}: " + "please summarise the ticket " * (1 + i % 5)
            for _attempt in range(120):  # the controller may restart the proxy meanwhile
                try:
                    r = send(self.proxy, model, prompt, tags=TAGS, quality_score=quality)
                    break
                except httpx.TransportError:
                    time.sleep(0.5)
            else:
                pytest.fail(f"the proxy did not answer for a minute\n{self.proxy.log_tail()}")
            assert r.status_code in (200, 500), r.text
        wait_for(lambda: self.stored() >= before + n, timeout=60, what="the requests to be stored")
        return n


def make_loop(
    tmp_path: Path,
    upstreams: Callable[..., Upstream],
    litellm_proxy: Callable[..., LiteLLMProxy],
    make_config: MakeConfig,
    daemons: Daemons,
    *,
    policy: dict[str, Any],
    reload_command: Callable[[ServiceManager], list[str]] | None = None,
    router: dict[str, Any] | None = None,
    analyzers: dict[str, Any] | None = None,
) -> Loop:
    strong = upstreams("gpt-4o", completion_tokens=COMPLETION_TOKENS)
    cheap = upstreams("gpt-4o-mini", completion_tokens=COMPLETION_TOKENS)
    proxy = litellm_proxy(
        {
            "model_list": [deployment("gpt-4o", strong), deployment("gpt-4o-mini", cheap)],
            "router_settings": {
                "num_retries": 0,
                "routing_strategy": "simple-shuffle",
                **(router or {}),
            },
        }
    )
    manager = ServiceManager(proxy, tmp_path / "restarts").start()
    key_file = tmp_path / "master-key"
    key_file.write_text(proxy.master_key + "\n")
    setup = make_config(
        "loop",
        ingest={"formats": {proxy.topic: "litellm"}},
        analyzers={
            "first_run_delay_s": 86400,
            "min_evidence_hours": 0,
            "routing": ROUTING,
            **(analyzers or {}),
        },
        actions={
            "interval_s": 1,
            "policy": policy,
            "verify": {
                "canary_share": 0.1,
                "min_requests": 20,
                "max_p95_latency_increase": 5.0,  # loopback latency is noise here
            },
            "gateway": {
                "config_path": str(proxy.config_path),
                "reload_command": (reload_command or (lambda m: m.reload_command()))(manager),
                "proxy_url": proxy.url,
                "master_key_file": str(key_file),
                "health_timeout_s": 60,
            },
        },
    )
    daemon = daemons(setup).start()
    daemon.wait_ready()
    url, auth = daemon_api(setup)
    return Loop(proxy, strong, cheap, manager, setup, daemon, url, auth)


@pytest.fixture
def loop_parts(
    tmp_path: Path,
    upstreams: Callable[..., Upstream],
    litellm_proxy: Callable[..., LiteLLMProxy],
    make_config: MakeConfig,
    daemons: Daemons,
) -> Iterator[Callable[..., Loop]]:
    made: list[Loop] = []

    def make(**kw: Any) -> Loop:
        loop = make_loop(tmp_path, upstreams, litellm_proxy, make_config, daemons, **kw)
        made.append(loop)
        return loop

    yield make
    for loop in made:
        loop.manager.stop()


ROUTE_POLICY = {
    "gateway.route": {
        "mode": "approve",
        "min_confidence": 0.0,
        "min_monthly_usd": 0.0,
        "max_share_step": 0.5,
        "max_steps_per_day": 10,
    }
}
ROUTING = {"min_monthly_savings_usd": 0.0, "min_requests": 50, "min_samples": 30}


def history_and_finding(loop: Loop) -> dict[str, Any]:
    """The scope on gpt-4o (quality 0.95), gpt-4o-mini beside it (0.90): routing finds it."""
    loop.drive(150, "gpt-4o", "history-strong", quality=0.95)
    loop.drive(60, "gpt-4o-mini", "history-cheap", quality=0.90)
    ran = loop.api("POST", "/v1/analyze", {"only": ["routing"]})
    (finding,) = [f for f in ran["findings"] if f["kind"] == "routing.model_mix"]
    assert finding["scope"]["model"] == "gpt-4o" and not finding["provisional"]
    assert finding["action"]["params"]["weights"] == {"gpt-4o-mini": 1.0}
    wait_for(lambda: loop.actions(), timeout=30, what="an action to be proposed")
    (action,) = loop.actions()
    assert action["state"] == "awaiting_approval", action["reason"]
    return action


def test_a_reroute_goes_live_in_steps_and_its_saving_is_measured(
    loop_parts: Callable[..., Loop],
) -> None:
    loop = loop_parts(policy=ROUTE_POLICY)
    action = history_and_finding(loop)
    original = loop.proxy.config_path.read_text()
    loop.api("POST", f"/v1/actions/{action['id']}/approve", {"actor": "U024BE7LH"})
    action = loop.wait_state(action["id"], {"canary"})
    assert loop.manager.restarts == 1
    state = litellm_config.read_state(loop.proxy.config_path.read_text())
    assert state.shares("gpt-4o") == pytest.approx(
        {"openai/gpt-4o": 0.9, "openai/gpt-4o-mini": 0.1}
    )
    # each step's traffic is sent with the action paused, so that no restart drops it
    cheap_before, strong_before = loop.cheap.served, loop.strong.served
    n = loop.paused_drive(action["id"], 400, "gpt-4o", "canary")
    moved = loop.cheap.served - cheap_before
    assert moved + loop.strong.served - strong_before == n
    assert abs(moved - 0.1 * n) <= 4 * math.sqrt(n * 0.1 * 0.9), moved  # the split moved
    wait_for(
        lambda: loop.action(action["id"])["share"] == pytest.approx(0.6),
        timeout=120,
        what="the second step",
    )
    loop.wait_state(action["id"], {"canary"})
    cheap_before = loop.cheap.served
    loop.paused_drive(action["id"], 150, "gpt-4o", "step-2")
    assert loop.cheap.served - cheap_before > 150 * 0.3  # 60 % now
    loop.wait_state(action["id"], {"promoted"})
    assert litellm_config.read_state(loop.proxy.config_path.read_text()).shares("gpt-4o") == {
        "openai/gpt-4o-mini": 1.0,
        "openai/gpt-4o": 0.0,
    }
    loop.paused_drive(action["id"], 60, "gpt-4o", "promoted")
    done = loop.wait_state(action["id"], {"verified"})
    assert [a["to_state"] for a in done["audit"]][-2:] == ["verifying", "verified"]
    assert done["approver"] == "U024BE7LH"
    assert loop.proxy.config_path.read_text() != original

    # the ledger against the same requests worked out here: every request of the scope
    # since the change, priced on gpt-4o (its model before) minus on the model that served
    after_change = [
        s
        for up in (loop.strong, loop.cheap)
        for s in up.log
        if any(s.prompt.startswith(t) for t in ("canary", "step-2", "promoted"))
    ]
    expected = sum(
        list_price("gpt-4o", s.prompt_tokens, COMPLETION_TOKENS)
        - list_price(up.name, s.prompt_tokens, COMPLETION_TOKENS)
        for up in (loop.strong, loop.cheap)
        for s in up.log
        if s in after_change
    )

    def measured() -> dict[str, Any]:
        rows = loop.api("GET", "/v1/actions/savings")["actions"]
        return rows[0] if rows else {"requests": 0}

    wait_for(
        lambda: measured()["requests"] == len(after_change),
        timeout=60,
        what=f"the ledger to count {len(after_change)} requests: {measured()}",
    )
    row = measured()
    assert row["saved_usd"] == pytest.approx(expected, rel=1e-6)
    assert row["saved_low_usd"] <= row["saved_usd"] <= row["saved_high_usd"]
    assert loop.daemon.terminate() == 0


def test_a_failing_cheap_upstream_is_rolled_back_to_the_original_bytes(
    loop_parts: Callable[..., Loop],
) -> None:
    # LiteLLM's cooldowns (on by default) soon take the failing deployment out of its
    # picks: the few requests it served, failing, are enough to roll back
    loop = loop_parts(policy=ROUTE_POLICY)
    action = history_and_finding(loop)
    original = loop.proxy.config_path.read_text()
    loop.api("POST", f"/v1/actions/{action['id']}/approve", {"actor": "U024BE7LH"})
    loop.wait_state(action["id"], {"canary"})
    loop.cheap.fail(500)
    loop.paused_drive(action["id"], 400, "gpt-4o", "after")
    done = loop.wait_state(action["id"], {"rolled_back"})
    assert "regression" in done["reason"] and "error rate" in done["reason"]
    assert loop.proxy.config_path.read_text() == original
    assert loop.manager.restarts == 2  # the change, then the rollback
    loop.cheap.heal()
    cheap_before = loop.cheap.served
    loop.drive(50, "gpt-4o", "rolled-back")
    assert loop.cheap.served == cheap_before  # the proxy routes as before again
    assert loop.daemon.terminate() == 0


KILLING_RELOAD = """
import os, pathlib, signal, sys, time
marker = pathlib.Path(sys.argv.pop(1))
if marker.exists():  # the first reload: the daemon dies after writing config.yaml
    marker.unlink()
    os.kill(os.getppid(), signal.SIGKILL)
    time.sleep(30)
"""


def test_a_daemon_killed_between_writing_and_recording_is_reconciled_once(
    tmp_path: Path, loop_parts: Callable[..., Loop], daemons: Daemons
) -> None:
    marker = tmp_path / "kill-on-reload"
    marker.write_text("")
    code = KILLING_RELOAD + RELOAD_CLIENT  # then as the service manager's client

    def command(manager: ServiceManager) -> list[str]:
        return [sys.executable, "-c", code, str(marker), str(manager.directory), "120"]

    loop = loop_parts(policy=ROUTE_POLICY, reload_command=command)
    action = history_and_finding(loop)
    original = loop.proxy.config_path.read_text()
    loop.api("POST", f"/v1/actions/{action['id']}/approve", {"actor": "U024BE7LH"})
    deadline = time.monotonic() + 60
    while loop.daemon.alive and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not loop.daemon.alive, "the reload command should have killed the daemon"
    assert loop.daemon.returncode == -signal.SIGKILL
    written = loop.proxy.config_path.read_text()
    assert written != original and loop.manager.restarts == 0  # written, not yet live
    again = daemons(loop.setup).start()
    again.wait_ready()
    loop.url, loop.daemon = daemon_api(loop.setup)[0], again
    done = loop.wait_state(action["id"], {"canary"})
    assert loop.manager.restarts == 1  # made live once, by the new process
    assert loop.proxy.config_path.read_text() == written
    prev = Path(str(loop.proxy.config_path) + ".finopsd-prev").read_text()
    assert prev == original  # not overwritten by a second write
    assert [a["to_state"] for a in done["audit"]].count("applying") == 1
    assert again.terminate() == 0


def test_a_response_cache_turned_on_saves_what_its_hits_would_have_cost(
    loop_parts: Callable[..., Loop],
) -> None:
    loop = loop_parts(
        policy={"gateway.cache": {"mode": "auto", "min_confidence": 0.0, "min_monthly_usd": 0.0}},
        analyzers={"caching": {"min_monthly_savings_usd": 0.0}},
    )
    prompts = [f"what is the refund policy for plan {i}?" for i in range(20)]

    def repeat(rounds: int, tag: str) -> None:
        before = loop.stored()
        for _round in range(rounds):
            for p in prompts:
                response = send(loop.proxy, "gpt-4o-mini", p, tags=TAGS, metadata={"r": tag})
                assert response.status_code == 200, response.text
        n = rounds * len(prompts)
        wait_for(lambda: loop.stored() >= before + n, timeout=60, what="stored")

    repeat(5, "before")
    assert loop.cheap.served == 100  # no cache yet: every repeat reached the model
    ran = loop.api("POST", "/v1/analyze", {"only": ["caching"]})
    kinds = [f["kind"] for f in ran["findings"]]
    assert "caching.response_repeats" in kinds, kinds
    wait_for(
        lambda: [a["state"] for a in loop.actions()] == ["promoted"],
        timeout=120,
        what=f"the cache to be turned on: {[a['reason'] for a in loop.actions()]}",
    )
    (action,) = loop.actions()
    state = litellm_config.read_state(loop.proxy.config_path.read_text())
    assert state.cache.enabled and state.cache.type == "local"
    assert loop.manager.restarts == 1
    served_before = loop.cheap.served
    repeat(3, "after")
    assert loop.cheap.served - served_before == len(prompts)  # the first of each only
    loop.wait_state(action["id"], {"verified"})
    tokens = {s.prompt: s.prompt_tokens for s in loop.cheap.log}
    hits = 2 * len(prompts)
    expected = sum(2 * list_price("gpt-4o-mini", tokens[p], COMPLETION_TOKENS) for p in prompts)

    def measured() -> dict[str, Any]:
        rows = loop.api("GET", "/v1/actions/savings")["actions"]
        return rows[0] if rows else {"requests": 0}

    wait_for(
        lambda: measured()["requests"] == hits,
        timeout=60,
        what=f"the ledger to count {hits} cache hits: {measured()}",
    )
    row = measured()
    assert row["actual_usd"] == 0.0
    assert row["saved_usd"] == pytest.approx(expected, rel=1e-6)
    assert row["saved_low_usd"] == row["saved_high_usd"] == pytest.approx(row["saved_usd"])
    assert loop.daemon.terminate() == 0
