"""A real LiteLLM proxy (tests/gateway_harness.py) logging to Kafka through finopsd's callback.

One proxy serves the whole module (a start or a restart takes 5-10 s), on the
session broker, with four local upstreams:

- ``chat-small``: one deployment, upstream ``gpt-4o-mini`` (7 completion tokens);
- ``chat-split``: two deployments, upstreams ``gpt-4o`` and ``gpt-4.1-mini``;
- ``chat-flaky``: upstream ``gpt-4.1-nano``, told to fail by the test that needs it.

The response cache is on (``cache_params.type: local``) and the router does not
retry (``num_retries: 0``, so that a failed request is one upstream call). Every
test marks its requests with a run id of its own (in the prompt and the request
metadata) and reads only those records back, so tests do not depend on each
other's traffic or order.
"""

from __future__ import annotations

import json
import math
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest
from kafka import TopicPartition

from finopsd.store import Store

# before the import, so that its asserts are rewritten too; pytest_plugins gives this
# module the harness's fixtures (upstreams, litellm_proxy)
pytest.register_assert_rewrite("gateway_harness")
pytest_plugins = ("gateway_harness",)

from conftest import DaemonProcess, DaemonSetup, Topics, committed_offsets  # noqa: E402
from gateway_harness import (  # noqa: E402
    LiteLLMProxy,
    LoggedCall,
    Upstream,
    decode_calls,
    deployment,
    read_calls,
    send,
)

SMALL_COMPLETION_TOKENS = 7


@dataclass
class Gateway:
    """The module's proxy and the upstreams behind each of its model groups."""

    proxy: LiteLLMProxy
    small: Upstream
    split_a: Upstream
    split_b: Upstream
    flaky: Upstream

    def calls(self, run: str, count: int, timeout: float = 30.0) -> list[LoggedCall]:
        """The records of requests sent with ``metadata.run == run`` (at least ``count``)."""
        return read_calls(
            self.proxy.bootstrap,
            self.proxy.topic,
            count,
            where=lambda c: c.requester_metadata.get("run") == run,
            timeout=timeout,
        )


@pytest.fixture(scope="module")
def gateway(
    upstreams: Callable[..., Upstream], litellm_proxy: Callable[..., LiteLLMProxy]
) -> Iterator[Gateway]:
    small = upstreams("gpt-4o-mini", completion_tokens=SMALL_COMPLETION_TOKENS)
    split_a = upstreams("gpt-4o", completion_tokens=11)
    split_b = upstreams("gpt-4.1-mini", completion_tokens=5)
    flaky = upstreams("gpt-4.1-nano")
    proxy = litellm_proxy(
        {
            "model_list": [
                deployment("chat-small", small),
                deployment("chat-split", split_a),
                deployment("chat-split", split_b),
                deployment("chat-flaky", flaky),
            ],
            "litellm_settings": {"cache": True, "cache_params": {"type": "local"}},
            "router_settings": {"num_retries": 0},
        }
    )
    yield Gateway(proxy, small, split_a, split_b, flaky)


def new_run() -> str:
    return uuid.uuid4().hex[:10]


def test_requests_reach_upstream_and_kafka_as_usage_events(gateway: Gateway) -> None:
    """40 requests with tenant/app/feature tags: each is served once by its upstream, and
    its record decodes (finopsd's litellm decoder) to a usage event with the upstream's
    token counts, the deployment's model and the request's tags."""
    run = new_run()
    tenants, apps, features = ("acme", "globex"), ("web", "batch-jobs"), ("chat", "summarize")
    sent: dict[str, dict[str, str]] = {}
    for i in range(40):
        prompt = f"run {run} request {i}: " + "tell me more " * (i % 9)
        tags = {
            "tenant": tenants[i % 2],
            "app": apps[(i // 2) % 2],
            "feature": features[(i // 4) % 2],
        }
        response = send(
            gateway.proxy,
            "chat-small",
            prompt,
            tags=tags,
            metadata={"run": run},
            quality_score=round(0.5 + i / 100, 2),
        )
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == SMALL_COMPLETION_TOKENS
        sent[prompt] = tags
    assert gateway.small.count(f"run {run} ") == 40

    calls = gateway.calls(run, 40)
    assert len(calls) == 40, "one record per request, no more"
    events = decode_calls(calls)
    assert len(events) == 40
    for call, event in zip(calls, events, strict=True):
        prompt = call.payload["messages"][0]["content"]
        (served,) = gateway.small.served_for(prompt)
        assert call.key == event.event_id.encode()
        assert call.payload["model_group"] == "chat-small"
        # asked for: the model group; answered by: the deployment (LiteLLM writes the
        # group as response.model, the deployment as model)
        assert (event.provider, event.request_model) == ("openai", "chat-small")
        assert event.response_model == "gpt-4o-mini"
        assert (event.input_tokens, event.output_tokens) == (
            served.prompt_tokens,
            SMALL_COMPLETION_TOKENS,
        )
        tags = sent[prompt]
        assert (event.tenant, event.app, event.feature, event.team) == (
            tags["tenant"],
            tags["app"],
            tags["feature"],
            None,
        )
        assert (event.status, event.cache_hit) == ("ok", False)
        assert event.gateway_cost_usd is not None and event.gateway_cost_usd > 0
        assert event.latency_ms is not None and event.latency_ms > 0
        # the eval pipeline's score arrives beside the tags (finopsd's decoder ignores it)
        assert 0.5 <= call.requester_metadata["quality_score"] <= 0.9
    assert {e.event_id for e in events} == {c.payload["id"] for c in calls}
    assert len({e.event_id for e in events}) == 40


def test_slow_upstream_shows_in_latency(gateway: Gateway) -> None:
    """An upstream told to answer slowly: the record's latency includes the delay."""
    run = new_run()
    gateway.small.slow(0.4)
    try:
        response = send(gateway.proxy, "chat-small", f"run {run} slow", metadata={"run": run})
    finally:
        gateway.small.heal()
    assert response.status_code == 200, response.text
    (event,) = decode_calls(gateway.calls(run, 1))
    assert event.latency_ms is not None and event.latency_ms >= 400


def test_weights_split_traffic_after_restart(gateway: Gateway) -> None:
    """Weights 3:1 on chat-split's deployments, applied by a restart: the upstreams'
    counts split about 3:1 (within four binomial standard deviations), and the records
    name the model of the deployment that served each request."""
    proxy = gateway.proxy
    for entry in proxy.config["model_list"]:
        if entry["model_name"] == "chat-split":
            is_a = entry["litellm_params"]["api_base"] == gateway.split_a.url
            entry["litellm_params"]["weight"] = 3 if is_a else 1
    proxy.restart()

    run = new_run()
    n = 200

    def one(i: int) -> int:
        return send(proxy, "chat-split", f"run {run} split {i}", metadata={"run": run}).status_code

    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(one, range(n)))
    assert statuses == [200] * n
    a, b = gateway.split_a.count(f"run {run} "), gateway.split_b.count(f"run {run} ")
    assert a + b == n
    p = 3 / 4
    tolerance = 4 * math.sqrt(n * p * (1 - p))  # ~24.5 of 200
    assert abs(a - n * p) <= tolerance, f"{a}:{b} is not about 3:1"
    assert abs(a - n / 2) > tolerance, f"{a}:{b} looks like the unweighted 1:1"

    events = decode_calls(gateway.calls(run, n))
    assert Counter(e.response_model for e in events) == {"gpt-4o": a, "gpt-4.1-mini": b}
    assert {e.request_model for e in events} == {"chat-split"}
    tokens = {e.response_model: e.output_tokens for e in events}
    assert tokens == {"gpt-4o": 11, "gpt-4.1-mini": 5}


def test_repeated_request_is_served_from_the_proxy_cache(gateway: Gateway) -> None:
    """The same request twice: the upstream answers the first only; the second's record
    is a cache hit (its own event id, no gateway cost) with the same tokens."""
    run = new_run()
    prompt = f"run {run} cache me"
    tags = {"tenant": "acme", "app": "web", "feature": "faq"}
    first = send(gateway.proxy, "chat-small", prompt, tags=tags, metadata={"run": run})
    assert first.status_code == 200, first.text
    assert gateway.small.count(prompt) == 1
    second = send(gateway.proxy, "chat-small", prompt, tags=tags, metadata={"run": run})
    assert second.status_code == 200, second.text
    assert gateway.small.count(prompt) == 1, "the repeat reached the upstream"
    assert second.headers.get("x-litellm-cache-key")
    assert second.json()["choices"] == first.json()["choices"]

    calls = gateway.calls(run, 2)
    events = decode_calls(calls)
    assert [c.payload.get("cache_hit") for c in calls] == [None, True]
    miss, hit = events
    assert (miss.cache_hit, hit.cache_hit) == (False, True)
    assert hit.event_id != miss.event_id and hit.event_id.startswith(miss.event_id)
    assert (hit.input_tokens, hit.output_tokens) == (miss.input_tokens, miss.output_tokens)
    assert hit.gateway_cost_usd == 0.0 and miss.gateway_cost_usd
    assert (hit.tenant, hit.app, hit.feature) == ("acme", "web", "faq")


def test_failing_upstream_gives_failure_records(gateway: Gateway) -> None:
    """An upstream answering 500, then 429: each request fails at the client with that
    status after one upstream call (no retries), and its record decodes to an error
    event with no tokens, the deployment's model and the request's tags."""
    run = new_run()
    tags = {"tenant": "globex", "app": "batch-jobs", "feature": "extract"}
    statuses = []
    try:
        for status, count in ((500, 3), (429, 2)):
            gateway.flaky.fail(status)
            for i in range(count):
                prompt = f"run {run} fail {status} {i}"
                response = send(
                    gateway.proxy, "chat-flaky", prompt, tags=tags, metadata={"run": run}
                )
                statuses.append(response.status_code)
    finally:
        gateway.flaky.heal()
    assert statuses == [500, 500, 500, 429, 429]
    assert gateway.flaky.count(f"run {run} ", status=None) == 5
    assert gateway.flaky.count(f"run {run} ") == 0

    calls = gateway.calls(run, 5)
    assert len(calls) == 5
    assert {c.payload["status"] for c in calls} == {"failure"}
    for event in decode_calls(calls):
        assert (event.status, event.input_tokens, event.output_tokens) == ("error", 0, 0)
        assert (event.provider, event.request_model) == ("openai", "chat-flaky")
        assert event.response_model == "gpt-4.1-nano"
        assert (event.tenant, event.app, event.feature) == ("globex", "batch-jobs", "extract")
        assert event.ttft_ms is None

    # healed: the next request succeeds again
    ok = send(gateway.proxy, "chat-flaky", f"run {run} healed", metadata={"run": run})
    assert ok.status_code == 200, ok.text


def test_daemon_ingests_the_proxy_topic(
    gateway: Gateway,
    topics: Topics,
    make_config: Callable[..., DaemonSetup],
    daemons: Callable[..., DaemonProcess],
) -> None:
    """finopsd run with the proxy's topic in ingest.formats as litellm: everything on the
    topic is stored, this test's requests with their tags and the upstream's tokens."""
    run = new_run()
    for i in range(10):
        tags = {"tenant": "initech", "app": "crm", "feature": f"f{i % 3}"}
        response = send(
            gateway.proxy, "chat-small", f"run {run} daemon {i}", tags=tags, metadata={"run": run}
        )
        assert response.status_code == 200, response.text
    mine = gateway.calls(run, 10)
    everything = read_calls(gateway.proxy.bootstrap, gateway.proxy.topic, len(mine))
    assert {c.offset for c in mine} <= {c.offset for c in everything}
    end = max(c.offset for c in everything) + 1

    setup = make_config("gateway")
    with setup.config.open("a") as config:
        config.write(f'\n[ingest.formats]\n"{gateway.proxy.topic}" = "litellm"\n')
    daemon = daemons(setup)
    daemon.start()
    daemon.wait_ready()
    partition = TopicPartition(gateway.proxy.topic, 0)
    daemon.wait_until(
        lambda: committed_offsets(topics.bootstrap, topics.group, [partition]).get(0, 0) >= end,
        timeout=60,
        what="the proxy's topic to be committed",
        interval=0.3,
    )
    assert not daemon.logged_error(), daemon.log_tail()
    assert daemon.terminate() == 0, daemon.log_tail()

    with Store(setup.store, read_only=True) as store:
        cursor = store.cursor().execute(
            "SELECT event_id, response_model, tenant, app, feature, input_tokens, "
            "output_tokens, status FROM usage_events"
        )
        stored = {r[0]: r[1:] for r in cursor.fetchall()}
        dead = store.counts()["dead_letters"]
    assert dead == 0
    assert len(stored) == len({c.payload["id"] for c in everything})
    for call in mine:
        prompt = call.payload["messages"][0]["content"]
        (served,) = gateway.small.served_for(prompt)
        meta: dict[str, Any] = call.requester_metadata
        assert stored[call.payload["id"]] == (
            "gpt-4o-mini",
            "initech",
            "crm",
            meta["feature"],
            served.prompt_tokens,
            SMALL_COMPLETION_TOKENS,
            "ok",
        )
    assert json.loads(mine[0].value)["model_group"] == "chat-small"
