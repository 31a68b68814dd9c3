"""The README's LiteLLM callback (deploy/litellm/finopsd_kafka_logger.py) with Kafka away.

A gateway must keep serving whether or not finopsd's Kafka is up. With the broker
unreachable (a closed port of 127.0.0.1), a real proxy (tests/gateway_harness.py)
starts as fast as ever and answers every request while the records are dropped
(one warning in its log, not one per record); once a broker listens at that
address, records flow again without a restart. Through LiteLLM's SDK (the
``.venv-litellm`` interpreter, in a subprocess), the sync hooks
(``litellm.completion``) and the async ones (``litellm.acompletion``) do the same:
nothing connects at import, calls return at once, records are dropped while Kafka
is away and delivered when it is there.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from finopsd.ingest.broker import EmbeddedBroker, ensure_topics

# before the import, so that its asserts are rewritten too; pytest_plugins gives this
# module the harness's fixtures (upstreams, litellm_proxy)
pytest.register_assert_rewrite("gateway_harness")
pytest_plugins = ("gateway_harness",)

from conftest import wait_for  # noqa: E402
from gateway_harness import (  # noqa: E402
    LITELLM_BIN,
    RECIPE,
    LiteLLMProxy,
    LoggedCall,
    Upstream,
    decode_calls,
    deployment,
    free_port,
    read_calls,
    send,
)

COMPLETION_TOKENS = 6
START_LIMIT_S = 20.0
"""A proxy start takes 5-10 s; the recipe that connected at import failed after 36 s."""
ANSWER_LIMIT_S = 2.0
"""The upstream answers at once; a request must not wait for Kafka."""
DROPPED = "finopsd: dropped "
BACK = "answers again, sending records"


def new_run() -> str:
    return uuid.uuid4().hex[:10]


def is_run(run: str) -> Callable[[LoggedCall], bool]:
    """Whether a record is of a request whose prompt starts with ``run <run> ``."""
    return lambda call: str(call.payload["messages"][0]["content"]).startswith(f"run {run} ")


def test_proxy_serves_while_kafka_is_away_and_delivers_once_it_is_back(
    upstreams: Callable[..., Upstream], tmp_path: Path
) -> None:
    upstream = upstreams("gpt-4o-mini", completion_tokens=COMPLETION_TOKENS)
    port = free_port()  # nothing listens there
    bootstrap, topic = f"127.0.0.1:{port}", f"litellm.{uuid.uuid4().hex[:12]}"
    proxy = LiteLLMProxy(
        tmp_path / "litellm",
        {"model_list": [deployment("chat-small", upstream)]},
        bootstrap=bootstrap,
        topic=topic,
    )
    try:
        proxy.start(timeout=60)
        assert proxy.last_start_s is not None and proxy.last_start_s < START_LIMIT_S

        away = new_run()
        for i in range(6):
            began = time.monotonic()
            response = send(proxy, "chat-small", f"run {away} {i}", metadata={"run": away})
            assert response.status_code == 200, response.text
            assert time.monotonic() - began < ANSWER_LIMIT_S
        assert upstream.count(f"run {away} ") == 6
        wait_for(
            lambda: DROPPED in proxy.log_text(),
            timeout=15,
            what="the recipe's warning about dropped records",
            context=proxy.log_tail,
        )
        time.sleep(1)  # the other records, dropped in the same moment
        assert proxy.log_text().count(DROPPED) == 1, "one warning, not one per record"
        assert "Traceback" not in proxy.log_text(), proxy.log_tail()

        with EmbeddedBroker("127.0.0.1", port, log_file=tmp_path / "tansu.log"):
            ensure_topics(bootstrap, {topic: 1})
            wait_for(
                lambda: BACK in proxy.log_text(),
                timeout=30,
                what="the recipe to connect to the broker",
                context=proxy.log_tail,
            )
            back = new_run()
            for i in range(5):
                response = send(proxy, "chat-small", f"run {back} {i}", metadata={"run": back})
                assert response.status_code == 200, response.text
            calls = read_calls(bootstrap, topic, 5, settle_s=1.0)

        # the broker restarts empty (memory only, as finopsd's embedded one does): the
        # producer's id is unknown there, and the recipe makes itself a new producer
        with EmbeddedBroker("127.0.0.1", port, log_file=tmp_path / "tansu-2.log"):
            ensure_topics(bootstrap, {topic: 1})
            again = new_run()

            def one_delivered() -> bool:
                response = send(proxy, "chat-small", f"run {again} {uuid.uuid4().hex[:6]}")
                assert response.status_code == 200, response.text
                return bool(read_calls(bootstrap, topic, 0, settle_s=0.5, where=is_run(again)))

            wait_for(
                one_delivered,
                timeout=40,
                what="a record through the restarted broker",
                context=proxy.log_tail,
            )
        assert proxy.alive and proxy.starts == 1, "no restart"
    finally:
        proxy.stop()
    assert {c.requester_metadata.get("run") for c in calls} == {back}, "dropped, not late"
    events = decode_calls(calls)
    assert len(events) == 5
    for call, event in zip(calls, events, strict=True):
        (served,) = upstream.served_for(call.payload["messages"][0]["content"])
        assert call.key == event.event_id.encode()
        assert (event.input_tokens, event.output_tokens) == (
            served.prompt_tokens,
            COMPLETION_TOKENS,
        )


def test_first_record_after_a_start_is_delivered(
    upstreams: Callable[..., Upstream], litellm_proxy: Callable[..., LiteLLMProxy]
) -> None:
    """The producer is made on first use: that record waits for it, it is not dropped."""
    upstream = upstreams("gpt-4.1-mini", completion_tokens=COMPLETION_TOKENS)
    proxy = litellm_proxy({"model_list": [deployment("chat-first", upstream)]})
    run = new_run()
    response = send(proxy, "chat-first", f"run {run} first", metadata={"run": run})
    assert response.status_code == 200, response.text
    (call,) = read_calls(proxy.bootstrap, proxy.topic, 1)
    assert call.requester_metadata["run"] == run
    (event,) = decode_calls([call])
    assert (event.request_model, event.output_tokens) == ("chat-first", COMPLETION_TOKENS)
    assert DROPPED not in proxy.log_text()


# -- through LiteLLM's SDK: the sync and the async hooks --------------------------------------

SDK_SCRIPT = """
import asyncio, importlib.util, json, sys, time
import litellm

spec = importlib.util.spec_from_file_location("finopsd_kafka_logger", sys.argv[1])
recipe = importlib.util.module_from_spec(spec)
began = time.monotonic()
spec.loader.exec_module(recipe)
out = {"import_s": time.monotonic() - began}
handler, run, hooked = recipe.handler, sys.argv[2], []
send = handler._send
handler._send = lambda kwargs: (send(kwargs), hooked.append(1))
litellm.callbacks = [handler]
messages = lambda api: [{"role": "user", "content": f"run {run} {api}"}]

began = time.monotonic()
litellm.completion(model="gpt-4o-mini", messages=messages("completion"), mock_response="ok")
out["completion_s"] = time.monotonic() - began


async def main():
    began = time.monotonic()
    await litellm.acompletion(
        model="gpt-4o-mini", messages=messages("acompletion"), mock_response="ok"
    )
    out["acompletion_s"] = time.monotonic() - began
    deadline = time.monotonic() + 30
    while len(hooked) < 2 and time.monotonic() < deadline:  # the hooks run after the calls
        await asyncio.sleep(0.1)


asyncio.run(main())
if handler.producer is not None:
    handler.producer.flush(10)
out.update(hooked=len(hooked), dropped=handler.dropped)
print(json.dumps(out))
"""


def run_sdk(bootstrap: str, topic: str, run: str) -> dict[str, Any]:
    """SDK_SCRIPT in .venv-litellm's interpreter: a completion() and an acompletion()."""
    python = LITELLM_BIN.parent / "python"
    if not python.exists():
        pytest.fail(f"no LiteLLM interpreter at {python}: run `make litellm` (make test does)")
    drop = ("FINOPSD_", "VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "LITELLM_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(
        LITELLM_LOCAL_MODEL_COST_MAP="True",
        FINOPSD_KAFKA_BOOTSTRAP=bootstrap,
        FINOPSD_LITELLM_TOPIC=topic,
    )
    done = subprocess.run(
        [str(python), "-c", SDK_SCRIPT, str(RECIPE), run],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "Traceback" not in done.stderr, done.stderr[-4000:]
    return dict(json.loads(done.stdout.strip().splitlines()[-1]), stderr=done.stderr)


@pytest.mark.parametrize("kafka", ["away", "there"])
def test_sdk_sync_and_async_hooks(kafka: str, broker: EmbeddedBroker) -> None:
    run = new_run()
    topic = f"litellm.{uuid.uuid4().hex[:12]}"
    bootstrap = f"127.0.0.1:{free_port()}" if kafka == "away" else broker.bootstrap
    if kafka == "there":
        ensure_topics(bootstrap, {topic: 1})
    out = run_sdk(bootstrap, topic, run)
    assert out["import_s"] < 1.0, "the import connected"
    assert out["completion_s"] < ANSWER_LIMIT_S and out["acompletion_s"] < ANSWER_LIMIT_S
    assert out["hooked"] == 2
    if kafka == "away":
        assert out["dropped"] == 2
        assert out["stderr"].count(DROPPED) == 1, out["stderr"][-4000:]
        return
    assert out["dropped"] == 0
    calls = read_calls(bootstrap, topic, 2, settle_s=1.0)
    assert sorted(c.payload["call_type"] for c in calls) == ["acompletion", "completion"]
    assert {c.payload["messages"][0]["content"] for c in calls} == {
        f"run {run} completion",
        f"run {run} acompletion",
    }
    assert len(decode_calls(calls)) == 2
