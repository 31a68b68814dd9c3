"""Realistic usage-event load for demos, tests and benchmarks.

``UsageLoad`` yields (key, value) pairs in finopsd's native JSON form: several
tenants, apps, features and models; request sizes drawn from the Azure LLM
inference trace 2023; prompts that share an app's system-prompt blocks; a share
of exact prompt repeats (what a cache would have served); optionally a share of
producer resends (same ``event_id``) and of invalid payloads.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.resources
import itertools
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

BLOCK_TOKENS = 512

# (tenant, weight)
TENANTS = [("acme", 5), ("globex", 3), ("initech", 2), ("umbrella", 2), ("hooli", 1)]


@dataclass(frozen=True)
class App:
    name: str
    team: str
    latency_class: str
    service: str  # which Azure trace the request sizes come from
    features: tuple[str, ...]
    models: tuple[tuple[str, str, int], ...]  # (provider, model, weight)
    system_blocks: int  # leading prompt blocks shared by every request of the app


APPS = [
    App(
        "support-bot",
        "cx",
        "interactive",
        "conv",
        ("answer", "summarise-ticket"),
        (
            ("openai", "gpt-4o", 6),
            ("openai", "gpt-4o-mini", 2),
            ("anthropic", "claude-sonnet-4-5", 2),
        ),
        2,
    ),
    App(
        "code-assist",
        "devex",
        "interactive",
        "code",
        ("complete", "explain", "review"),
        (
            ("anthropic", "claude-sonnet-4-5", 5),
            ("openai", "gpt-4o", 3),
            ("vllm", "meta-llama/Llama-3.1-8B-Instruct", 2),
        ),
        3,
    ),
    App(
        "doc-search",
        "search",
        "interactive",
        "conv",
        ("rerank", "answer"),
        (("openai", "gpt-4o-mini", 5), ("vllm", "meta-llama/Llama-3.1-8B-Instruct", 5)),
        1,
    ),
    App(
        "nightly-digest",
        "data",
        "batch",
        "conv",
        ("digest",),
        (
            ("anthropic", "claude-sonnet-4-5", 4),
            ("openai", "gpt-4o", 4),
            ("anthropic", "claude-haiku-4-5", 2),
        ),
        4,
    ),
    App(
        "ticket-triage",
        "cx",
        "batch",
        "conv",
        ("classify",),
        (("openai", "gpt-4o", 7), ("openai", "gpt-4o-mini", 3)),
        1,
    ),
]

SELF_HOSTED_DEPLOYMENT = "llama-8b"
"""The deployment the generated vLLM traffic names (price it with [[pricing.deployments]])."""

BATCH_API_APPS = frozenset({"nightly-digest"})
"""Apps whose generated traffic goes through the providers' batch APIs (the other batch-class
app, ticket-triage, does not: latency-tolerant traffic billed at the synchronous price)."""

INVALID_KINDS = ("malformed_json", "wrong_type", "missing_field", "negative_tokens", "not_object")


def _stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest()) >> 2


def request_sizes() -> dict[str, list[tuple[int, int]]]:
    """(prompt tokens, generated tokens) pairs per service, from the shipped trace sample."""
    text = (
        importlib.resources.files("finopsd.ingest")
        .joinpath("data", "azure_llm_2023_sizes.csv")
        .read_text()
    )
    sizes: dict[str, list[tuple[int, int]]] = {}
    for row in csv.DictReader(text.splitlines()):
        sizes.setdefault(row["service"], []).append(
            (int(row["context_tokens"]), int(row["generated_tokens"]))
        )
    return sizes


class UsageLoad:
    """An endless, seeded stream of usage events as (key, value) bytes.

    ``repeat_share``: probability that a request repeats an earlier prompt
    exactly. ``duplicate_share``: probability that a message is a resend of an
    earlier message (same bytes, same ``event_id``). ``invalid_share``:
    probability that a message is an invalid payload of one of
    ``INVALID_KINDS``. Timestamps advance evenly from ``start`` by ``step``.
    """

    def __init__(
        self,
        *,
        seed: int = 0,
        repeat_share: float = 0.15,
        duplicate_share: float = 0.0,
        invalid_share: float = 0.0,
        start: datetime | None = None,
        step: timedelta = timedelta(milliseconds=50),
    ) -> None:
        self.rng = random.Random(seed)
        self.repeat_share = repeat_share
        self.duplicate_share = duplicate_share
        self.invalid_share = invalid_share
        self.start = start or datetime.now(UTC).replace(microsecond=0)
        self.step = step
        self.run_id = f"{self.rng.getrandbits(32):08x}"
        self.sizes = request_sizes()
        self._tenants = [t for t, _ in TENANTS]
        self._tenant_cum = list(itertools.accumulate(w for _, w in TENANTS))
        self._model_cum = {
            a.name: list(itertools.accumulate(w for *_, w in a.models)) for a in APPS
        }
        self._system_blocks = {
            a.name: [_stable_hash(f"{a.name}/{j}") for j in range(a.system_blocks)] for a in APPS
        }
        self._recent_prompts: list[tuple[str, list[int], int]] = []
        self._recent_messages: list[tuple[bytes, bytes]] = []
        self.counts = {"valid": 0, "duplicate": 0, "invalid": 0, "repeat": 0}

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        i = 0
        while True:
            yield self.next_message(i)
            i += 1

    def next_message(self, i: int) -> tuple[bytes, bytes]:
        r = self.rng.random()
        if r < self.duplicate_share and self._recent_messages:
            self.counts["duplicate"] += 1
            return self.rng.choice(self._recent_messages)
        if r < self.duplicate_share + self.invalid_share:
            self.counts["invalid"] += 1
            return self._invalid(i)
        event = self.event(i)
        key = event["event_id"].encode()
        value = json.dumps(event, separators=(",", ":")).encode()
        self.counts["valid"] += 1
        if len(self._recent_messages) < 4096:
            self._recent_messages.append((key, value))
        else:
            self._recent_messages[self.rng.randrange(4096)] = (key, value)
        return key, value

    def event(self, i: int) -> dict[str, object]:
        rng = self.rng
        app = rng.choice(APPS)
        tenant = rng.choices(self._tenants, cum_weights=self._tenant_cum)[0]
        provider, model, _ = rng.choices(app.models, cum_weights=self._model_cum[app.name])[0]
        prompt_tokens, generated = rng.choice(self.sizes[app.service])
        if self._recent_prompts and rng.random() < self.repeat_share:
            prompt_hash, blocks, prompt_tokens = rng.choice(self._recent_prompts)
            self.counts["repeat"] += 1
        else:
            n_blocks = max(1, -(-prompt_tokens // BLOCK_TOKENS))
            shared = min(n_blocks, app.system_blocks)
            blocks = self._system_blocks[app.name][:shared]
            blocks += [rng.getrandbits(62) for _ in range(n_blocks - shared)]
            prompt_hash = f"{rng.getrandbits(64):016x}"
            if len(self._recent_prompts) < 2048:
                self._recent_prompts.append((prompt_hash, blocks, prompt_tokens))
            else:
                self._recent_prompts[rng.randrange(2048)] = (prompt_hash, blocks, prompt_tokens)
        ttft = 40.0 + prompt_tokens * 0.04 * rng.uniform(0.7, 1.4)
        ok = rng.random() > 0.02
        event: dict[str, object] = {
            "event_id": f"{self.run_id}-{i:010d}",
            "ts": (self.start + self.step * i).isoformat().replace("+00:00", "Z"),
            "gen_ai.provider.name": provider,
            "gen_ai.request.model": model,
            "gen_ai.response.model": model,
            "gen_ai.usage.input_tokens": prompt_tokens,
            "gen_ai.usage.output_tokens": generated if ok else 0,
            "tenant": tenant,
            "team": app.team,
            "app": app.name,
            "feature": rng.choice(app.features),
            "latency_ms": round(ttft + generated * rng.uniform(12, 30), 1),
            "ttft_ms": round(ttft, 1),
            "status": "ok" if ok else "error",
            "prompt_hash": prompt_hash,
            "prefix_hashes": blocks,
            "latency_class": app.latency_class,
        }
        if provider == "vllm":
            event["deployment"] = SELF_HOSTED_DEPLOYMENT
        else:
            event["gen_ai.usage.cache_read.input_tokens"] = 0
        if app.name in BATCH_API_APPS:
            event["billing_mode"] = "batch"
        return event

    def _invalid(self, i: int) -> tuple[bytes, bytes]:
        kind = self.rng.choice(INVALID_KINDS)
        event = self.event(i)
        key = str(event["event_id"]).encode()
        if kind == "malformed_json":
            return key, json.dumps(event).encode()[:-7]
        if kind == "wrong_type":
            event["gen_ai.usage.input_tokens"] = str(event["gen_ai.usage.input_tokens"])
        elif kind == "missing_field":
            del event["gen_ai.request.model"]
        elif kind == "negative_tokens":
            event["gen_ai.usage.output_tokens"] = -5
        else:
            return key, json.dumps([event["event_id"]]).encode()
        return key, json.dumps(event, separators=(",", ":")).encode()


def produce(
    bootstrap: str,
    topic: str,
    messages: Iterator[tuple[bytes, bytes]],
    count: int,
    *,
    producer_config: dict[str, object] | None = None,
    on_progress: object = None,
) -> int:
    """Send ``count`` messages from ``messages`` to ``topic``; returns how many were acked.

    ``on_progress(n)`` is called with the number of messages sent since the
    previous call.
    """
    from kafka import KafkaProducer

    config: dict[str, object] = {
        "linger_ms": 20,
        "batch_size": 1 << 20,
        "max_request_size": 16 << 20,
        "acks": 1,
        "enable_idempotence": False,  # a load generator trades that for speed
    }
    config.update(producer_config or {})
    producer = KafkaProducer(bootstrap_servers=bootstrap, **config)
    sent = 0
    try:
        for key, value in messages:
            if sent >= count:
                break
            producer.send(topic, key=key, value=value)
            sent += 1
            if on_progress is not None and sent % 5000 == 0:
                on_progress(5000)  # type: ignore[operator]
        producer.flush()
        if on_progress is not None and sent % 5000:
            on_progress(sent % 5000)  # type: ignore[operator]
    finally:
        producer.close()
    return sent
