"""Capture what LiteLLM's SDK sends through finopsd's callback recipe, as the tests' fixture.

``deploy/litellm/finopsd_kafka_logger.py`` (the README's recipe) is loaded as
LiteLLM's only callback; real ``litellm.completion`` and ``litellm.acompletion``
calls with ``mock_response`` (no provider is called) produce through it to a
Kafka topic; the records are read back and written, byte for byte, to
``tests/data/litellm_sdk_records.json`` with the scenario that produced each, the
LiteLLM version and the recipe's SHA-256 (``tests/test_formats.py`` checks that
the recipe has not changed since).

litellm is not a test dependency (see tests/data/README.md), so this runs in a
virtual environment of its own, against the embedded broker::

    python3 -m venv /tmp/litellm-capture
    /tmp/litellm-capture/bin/pip install litellm==1.110.2 kafka-python fastapi orjson soundfile
    .venv/bin/finopsd broker --port 19093 &
    export FINOPSD_KAFKA_BOOTSTRAP=127.0.0.1:19093
    /tmp/litellm-capture/bin/python tests/data/capture_litellm.py

(LiteLLM 1.110.2's in-memory response cache imports proxy modules: hence fastapi,
orjson and soundfile.) The script fails, naming the scenario, when a call's
record does not arrive: the sync scenarios arrive only through the recipe's sync
hooks, the async ones only through its async hooks.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # the bundled price map, offline

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "deploy" / "litellm" / "finopsd_kafka_logger.py"
OUT = Path(__file__).resolve().parent / "litellm_sdk_records.json"
TOPIC = f"litellm.capture.{uuid.uuid4().hex[:8]}"
os.environ["FINOPSD_LITELLM_TOPIC"] = TOPIC
BOOTSTRAP = os.environ.get("FINOPSD_KAFKA_BOOTSTRAP", "127.0.0.1:19093")

import litellm  # noqa: E402
from kafka import KafkaConsumer  # noqa: E402
from kafka.admin import KafkaAdminClient, NewTopic  # noqa: E402
from litellm.caching.caching import Cache  # noqa: E402

SCENARIOS: dict[str, tuple[str, str]] = {
    # scenario: (API, what it shows)
    "sync_success": ("completion", "a priced success; LiteLLM drops the provider prefix"),
    "sync_failure": ("completion", "a failed call: the model keeps its 'openai/' prefix"),
    "sync_unpriced": ("completion", "a model LiteLLM has no price for: response_cost 0.0"),
    "sync_cache_miss": ("completion", "the first of two identical calls with caching"),
    "sync_cache_hit": ("completion", "the second: cache_hit true, response_cost 0.0"),
    "async_success": ("acompletion", "a priced success"),
    "async_failure": ("acompletion", "a failed call"),
    "async_cache_miss": ("acompletion", "the first of two identical calls with caching"),
    "async_cache_hit": ("acompletion", "the second"),
}


def messages(scenario: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"finopsd capture: {scenario}"}]


def run_sync() -> None:
    litellm.completion(model="gpt-4o-mini", messages=messages("sync_success"), mock_response="ok")
    with contextlib.suppress(Exception):  # LiteLLM raises it after the failure hooks
        litellm.completion(
            model="openai/gpt-4o",
            messages=messages("sync_failure"),
            mock_response=Exception("upstream unavailable"),
        )
    litellm.completion(
        model="openai/finopsd-unpriced-model",
        messages=messages("sync_unpriced"),
        mock_response="ok",
    )
    for _ in range(2):  # the second is answered from the cache
        litellm.completion(
            model="openai/gpt-4o",
            messages=messages("sync_cache"),
            mock_response="cached answer",
            caching=True,
        )


async def run_async() -> None:
    await litellm.acompletion(
        model="openai/gpt-4o-mini", messages=messages("async_success"), mock_response="ok"
    )
    with contextlib.suppress(Exception):
        await litellm.acompletion(
            model="anthropic/claude-sonnet-4-5",
            messages=messages("async_failure"),
            mock_response=Exception("overloaded"),
        )
    for attempt in range(2):
        await litellm.acompletion(
            model="anthropic/claude-sonnet-4-5",
            messages=messages("async_cache"),
            mock_response="cached answer",
            caching=True,
        )
        if attempt == 0:
            await asyncio.sleep(1)  # the async cache write is a task of its own


def scenario_of(payload: dict[str, Any]) -> str:
    text = payload["messages"][0]["content"].removeprefix("finopsd capture: ")
    if text in ("sync_cache", "async_cache"):
        return f"{text}_{'hit' if payload.get('cache_hit') else 'miss'}"
    return text


def main() -> int:
    spec = importlib.util.spec_from_file_location("finopsd_kafka_logger", RECIPE)
    assert spec is not None and spec.loader is not None
    recipe = importlib.util.module_from_spec(spec)
    admin = KafkaAdminClient(bootstrap_servers=BOOTSTRAP)
    admin.create_topics([NewTopic(TOPIC, 1, 1)])
    admin.close()
    spec.loader.exec_module(recipe)
    litellm.callbacks = [recipe.handler]
    litellm.cache = Cache(type="local")

    consumer = KafkaConsumer(
        TOPIC, bootstrap_servers=BOOTSTRAP, auto_offset_reset="earliest", group_id=None
    )
    records: dict[str, dict[str, Any]] = {}

    async def everything() -> None:
        run_sync()
        await run_async()
        deadline = time.monotonic() + 60  # the loop stays up while the async hooks send
        while set(records) != set(SCENARIOS) and time.monotonic() < deadline:
            if recipe.handler.producer is not None:  # made on the first record's way
                recipe.handler.producer.flush()
            batches = await asyncio.to_thread(consumer.poll, 500)
            for batch in batches.values():
                for record in batch:
                    payload = json.loads(record.value)
                    name = scenario_of(payload)
                    assert name not in records, f"{name}: sent twice"
                    site = str(Path(litellm.__file__).parents[1])
                    value = record.value.decode().replace(site, "<site-packages>")
                    records[name] = {
                        "scenario": name,
                        "api": SCENARIOS[name][0],
                        "shows": SCENARIOS[name][1],
                        "key": record.key.decode() if record.key else None,
                        "value": value,
                    }

    asyncio.run(everything())
    consumer.close()
    missing = sorted(set(SCENARIOS) - set(records))
    if missing:
        print(f"no record for {', '.join(missing)}", file=sys.stderr)
        return 1
    out = {
        "captured_with": {
            "litellm": importlib.metadata.version("litellm"),
            "python": sys.version.split()[0],
            "recipe": str(RECIPE.relative_to(ROOT)),
            "recipe_sha256": hashlib.sha256(RECIPE.read_bytes()).hexdigest(),
            "how": "tests/data/capture_litellm.py",
        },
        "records": [records[name] for name in SCENARIOS],
    }
    OUT.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    print(f"{len(records)} records -> {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
