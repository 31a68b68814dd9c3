"""Faults an operator meets: a frozen broker, a full disk, a record that trips a bug.

Real parts throughout: the daemon as a subprocess, a Tansu broker of the test's
own (frozen with SIGSTOP, so that every client timeout passes while it holds
the daemon's dead letters), a DuckDB store on a tmpfs of a few MiB that fills
up and is then grown (``mount -o remount,size=``; the tests run as root, as CI
does here). The last tests drive ``IngestWorker`` directly with a decoder
that raises on one record and one that hands the store a row it refuses:
stand-ins for a bug, since no real record should trigger one.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pytest
from conftest import (
    DaemonProcess,
    DaemonSetup,
    Topics,
    consume_all,
    next_offsets,
    produce_messages,
    read_store,
    wait_consumed,
    write_config,
)
from kafka.record.default_records import DefaultRecordBatch
from kafka.record.memory_records import MemoryRecordsBuilder

from finopsd.events import GpuSample, UsageEvent
from finopsd.ingest.broker import EmbeddedBroker, ensure_topics
from finopsd.ingest.decode import BatchDecoder
from finopsd.ingest.loadgen import UsageLoad
from finopsd.ingest.pipeline import Chunk, IngestWorker, Route
from finopsd.ingest.records import RecordBlock
from finopsd.store import Store

Daemons = Callable[..., DaemonProcess]
NOW = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)


def usage_messages(n: int, seed: int) -> list[tuple[bytes, bytes]]:
    return list(itertools.islice(iter(UsageLoad(seed=seed, start=NOW)), n))


def stored_ids(path: Path) -> list[str]:
    return sorted(read_store(path).event_ids)


# -- a broker frozen while dead letters are in flight -----------------------------------------


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[EmbeddedBroker]:
    """A broker for this test alone: freezing it must not stall the session's broker."""
    b = EmbeddedBroker("127.0.0.1", 0, log_file=tmp_path / "tansu.log")
    b.start()
    try:
        yield b
    finally:
        os.kill(b.pid, signal.SIGCONT) if b.pid else None
        b.stop()


def test_broker_frozen_past_every_timeout_while_dead_letters_are_sent(
    own_broker: EmbeddedBroker, tmp_path: Path, daemons: Daemons
) -> None:
    """SIGSTOP the broker after the daemon fetched a batch with bad records and before it
    sends their dead letters; keep it frozen for longer than the request, delivery,
    metadata and session timeouts. The daemon keeps running, says the broker is
    unreachable, and once the broker is back stores every good event once and every bad
    record goes to the dead-letter topic."""
    suffix = uuid.uuid4().hex[:8]
    topics = Topics(
        bootstrap=own_broker.bootstrap,
        usage=f"usage.{suffix}",
        gpu=f"gpu.{suffix}",
        dead_letter=f"dlq.{suffix}",
        group=f"group.{suffix}",
    )
    ensure_topics(topics.bootstrap, {topics.usage: 1, topics.gpu: 1, topics.dead_letter: 1})
    good = usage_messages(300, seed=91)
    bad = [(f"bad-{i}".encode(), b'{"event_id": "x", "ts": "0"}') for i in range(5)]
    stream = good[:100] + bad + good[100:]
    produce_messages(topics.bootstrap, topics.usage, stream, partition=0)
    store = tmp_path / "frozen.duckdb"
    config = write_config(
        tmp_path / "frozen.toml",
        topics,
        store,
        {
            # the batch stays open for 4 s after its first record: the freeze lands
            # between the fetch and the dead-letter send
            "ingest": {"batch_max_age_ms": 4000},
            "kafka": {"request_timeout_ms": 2000},
        },
    )
    daemon = daemons(DaemonSetup(config, store, tmp_path / "frozen.log"))
    daemon.start()
    daemon.wait_ready()
    time.sleep(2.0)  # the fetch of 305 small records is done long before this
    os.kill(own_broker.pid, signal.SIGSTOP)
    try:
        daemon.wait_until(
            lambda: "broker unreachable since" in daemon.log_text(since_start=True),
            timeout=30,
            what="the daemon to report the broker unreachable",
        )
        time.sleep(10)  # request 2 s, delivery 4 s, max block 2 s, session 6 s: all past
        assert daemon.alive, daemon.log_tail()
    finally:
        os.kill(own_broker.pid, signal.SIGCONT)
    daemon.wait_until(
        lambda: "writable again" in daemon.log_text(since_start=True),
        timeout=90,
        what="ingest to resume after the broker came back",
    )
    dead = consume_all(topics.bootstrap, topics.dead_letter, len(bad), timeout=30)
    assert daemon.terminate() == 0, daemon.log_tail()
    assert {r.key for r in dead} == {k for k, _ in bad}  # a resend may hold one twice
    assert stored_ids(store) == sorted(k.decode() for k, _ in good)
    state = read_store(store)
    assert state.counts["dead_letters"] == len(bad)
    assert state.usage_offsets(topics.usage) == {0: len(stream)}


# -- a full disk ------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of 3 MiB at tmp_path/disk; grow it with ``grow(path)``."""
    if os.geteuid() != 0:
        pytest.fail("this test mounts a tmpfs: run it as root (CI does)")
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def grow(mount: Path, size: str = "512m") -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(mount)], check=True)


def test_full_disk_pauses_ingest_and_resumes_when_space_returns(
    topics: Topics, small_disk: Path, tmp_path: Path, daemons: Daemons
) -> None:
    """The store's file system fills up: the daemon keeps running (no crash loop), says
    the store is unavailable, keeps what it stored, and once the disk is grown stores
    the rest by itself. A second fill, then SIGTERM while stalled: exit 0 at once, and a
    restart on a grown disk stores everything exactly once."""
    store = small_disk / "store.duckdb"
    config = write_config(
        tmp_path / "disk.toml", topics, store, {"ingest": {"batch_max_age_ms": 200}}
    )
    daemon = daemons(DaemonSetup(config, store, tmp_path / "disk.log"))
    daemon.start()
    daemon.wait_ready()
    first = usage_messages(60_000, seed=92)
    sent = produce_messages(topics.bootstrap, topics.usage, first)
    daemon.wait_until(
        lambda: "store unavailable since" in daemon.log_text(since_start=True),
        timeout=120,
        what="the store to fill up",
    )
    time.sleep(3)
    assert daemon.alive, daemon.log_tail()
    grow(small_disk)
    daemon.wait_until(
        lambda: "writable again" in daemon.log_text(since_start=True),
        timeout=120,
        what="ingest to resume once the disk grew",
    )
    assert daemon.terminate() == 0, daemon.log_tail()
    wanted = sorted(k.decode() for k, _ in first)
    got = stored_ids(store)
    assert got == wanted or set(got) < set(wanted), "stored something twice or unknown"

    # fill again: a small disk once more, SIGTERM during the stall
    used = int(
        subprocess.run(
            ["du", "-sk", str(small_disk)], capture_output=True, text=True, check=True
        ).stdout.split()[0]
    )
    grow(small_disk, f"{used + 1024}k")
    daemon.start()
    daemon.wait_ready()
    second = usage_messages(60_000, seed=93)
    sent_again = produce_messages(topics.bootstrap, topics.usage, second)
    daemon.wait_until(
        lambda: "store unavailable since" in daemon.log_text(since_start=True),
        timeout=120,
        what="the store to fill up again",
    )
    started = time.monotonic()
    assert daemon.terminate(timeout=30) == 0, daemon.log_tail()
    assert time.monotonic() - started < 20, "SIGTERM during a stall was not honoured promptly"
    assert "read again from Kafka" in daemon.log_text(since_start=True)
    grow(small_disk)
    daemon.start()
    daemon.wait_ready()
    wait_consumed([daemon], topics, next_offsets(sent + sent_again), timeout=180)
    assert daemon.terminate() == 0, daemon.log_tail()
    assert stored_ids(store) == sorted(k.decode() for k, _ in first + second)


# -- a record that trips a bug ----------------------------------------------------------------


def chunk_of(values: list[bytes], topic: str = "usage") -> Chunk:
    """One partition's record batch, as a poll hands it to the worker."""
    builder = MemoryRecordsBuilder(magic=2, compression_type=0, batch_size=1 << 30)
    for i, value in enumerate(values):
        builder.append(1_700_000_000_000 + i, None, value, [])
    builder.close()
    batch = DefaultRecordBatch(bytes(builder.buffer()))
    return Chunk(topic, 0, [RecordBlock(topic, 0, batch, 0)])


class BuggyDecoder(BatchDecoder):
    """The native decoder, but raising on any batch that holds ``BOOM`` (a bug's stand-in)."""

    def decode(self, values):  # type: ignore[no-untyped-def]
        if any(b"BOOM" in (v or b"") for v in values.to_pylist()):
            raise RuntimeError("decoder bug")
        return super().decode(values)


class StoreRefusedDecoder(BatchDecoder):
    """The native decoder, but the row of event ``refuse-me`` loses its NOT NULL status."""

    def decode(self, values):  # type: ignore[no-untyped-def]
        rows, rejects = super().decode(values)
        ids = rows.column("event_id").to_pylist()
        status = [
            None if i == "refuse-me" else s
            for i, s in zip(ids, rows.column("status").to_pylist(), strict=True)
        ]
        index = rows.schema.get_field_index("status")
        return rows.set_column(index, "status", pa.array(status, pa.string())), rejects


def run_worker(store: Store, decoder: BatchDecoder, values: list[bytes]) -> IngestWorker:
    worker = IngestWorker(
        store,
        {"usage": Route(decoder, timedelta(hours=1))},
        dead_letters=None,
        batch_max_events=100_000,
        batch_max_age_s=0.1,
    )
    worker.submit(chunk_of(values))
    worker.flush()
    worker.close()
    return worker


def test_a_record_that_makes_decoding_raise_is_dead_lettered_and_the_rest_stored(
    tmp_path: Path,
) -> None:
    good = [v for _, v in usage_messages(50, seed=94)]
    poison = json.dumps({"event_id": "BOOM", "ts": NOW.isoformat()}).encode()
    with Store(tmp_path / "s.duckdb") as store:
        worker = run_worker(store, BuggyDecoder(UsageEvent), [*good[:20], poison, *good[20:]])
        assert worker.stats.snapshot()["dead_letters"] == {"internal": 1}
        assert store.counts()["usage_events"] == 50
        ((reason, detail, offset),) = (
            store.cursor().execute('SELECT reason, detail, "offset" FROM dead_letters').fetchall()
        )
    assert (reason, offset) == ("internal", 20)
    assert "decoder bug" in detail


def test_a_row_the_store_refuses_is_dead_lettered_and_the_rest_stored(tmp_path: Path) -> None:
    messages = usage_messages(40, seed=95)
    refused = json.loads(messages[7][1])
    refused["event_id"] = "refuse-me"
    values = [v for _, v in messages]
    values[7] = json.dumps(refused).encode()
    with Store(tmp_path / "s.duckdb") as store:
        worker = run_worker(store, StoreRefusedDecoder(UsageEvent), values)
        assert worker.stats.snapshot()["dead_letters"] == {"internal": 1}
        ids = {r[0] for r in store.cursor().execute("SELECT event_id FROM usage_events").fetchall()}
        assert len(ids) == 39 and "refuse-me" not in ids
        ((reason, detail),) = (
            store.cursor().execute("SELECT reason, detail FROM dead_letters").fetchall()
        )
        assert reason == "internal" and "status" in detail
        assert store.stored_offsets() == {("usage", 0): 40}


def test_a_gpu_sample_beyond_int64_is_dead_lettered_not_fatal(tmp_path: Path) -> None:
    """The record that once killed the worker for good: memory_used_bytes = 2**63."""
    ts = NOW.isoformat()
    poison = (
        f'{{"ts":"{ts}","host":"h","gpu_index":0,"utilization_pct":50,'
        f'"memory_used_bytes":9223372036854775808}}'
    ).encode()
    good = [
        json.dumps({"ts": ts, "host": "h", "gpu_index": i, "utilization_pct": 10.0}).encode()
        for i in range(1, 4)
    ]
    worker = IngestWorker(
        Store(tmp_path / "g.duckdb"),
        {"gpu": Route(BatchDecoder(GpuSample), timedelta(hours=1))},
        dead_letters=None,
        batch_max_events=1000,
        batch_max_age_s=0.1,
    )
    worker.submit(chunk_of([good[0], poison, *good[1:]], topic="gpu"))
    worker.flush()
    worker.close()
    assert sum(worker.stats.snapshot()["dead_letters"].values()) == 1
    assert worker.store.counts()["gpu_samples"] == 3
    worker.store.close()


def test_polling_waits_once_queued_record_batches_reach_queue_bytes(tmp_path: Path) -> None:
    """With the store held (its write lock taken, as a long write would), the worker's
    chunk queue fills to ``queue_bytes`` of record batches, not to ``queue_chunks``: the
    submitting thread waits; once the store is free, everything is stored once."""
    import threading

    values = [v for _, v in usage_messages(6000, seed=96)]
    chunks = [chunk_of(values[i : i + 200]) for i in range(0, len(values), 200)]
    size = chunks[0].size_bytes
    with Store(tmp_path / "q.duckdb") as store:
        worker = IngestWorker(
            store,
            {"usage": Route(BatchDecoder(UsageEvent), timedelta(hours=1))},
            dead_letters=None,
            batch_max_events=200,  # every chunk closes a batch, so the store is needed
            batch_max_age_s=0.05,
            queue_chunks=1000,
            queue_bytes=3 * size,
        )
        store._write_lock.acquire()
        submitted: list[int] = []

        def submit_all() -> None:
            for i, chunk in enumerate(chunks):
                worker.submit(chunk)
                submitted.append(i)

        feeder = threading.Thread(target=submit_all, daemon=True)
        feeder.start()
        time.sleep(2.0)
        blocked_at = len(submitted)
        # one batch in the store, one handed over, one being built, three chunks queued
        assert blocked_at < 10, f"{blocked_at} chunks submitted past a 3-chunk byte budget"
        assert worker._queued_bytes <= 3 * size
        store._write_lock.release()
        feeder.join(60)
        assert len(submitted) == len(chunks)
        worker.flush()
        worker.close()
        assert store.counts()["usage_events"] == len(values)
        assert worker.stats.snapshot()["backpressure_s"] > 1.0


def test_lag_skips_partitions_the_consumer_no_longer_holds(topics: Topics) -> None:
    """Between a revocation (a rebalance, close()) and the ingestor's own copy of the
    assignment catching up, lag() — read by the status line and /readyz from other
    threads — answers for the partitions still held instead of raising."""
    from kafka import KafkaConsumer

    from finopsd.ingest.pipeline import Ingestor

    held, revoked = topics.usage_partitions()[:2]
    consumer = KafkaConsumer(bootstrap_servers=topics.bootstrap, group_id=None)
    try:
        consumer.assign([held])
        ingestor = Ingestor(lambda: consumer, None, [topics.usage], max_poll_records=10)  # type: ignore[arg-type]
        ingestor.consumer = consumer
        ingestor.assignment = {held, revoked}
        ingestor.positions[(held.topic, held.partition)] = 0
        lag = ingestor.lag()
        assert set(lag) == {(held.topic, held.partition)}
    finally:
        consumer.close()
