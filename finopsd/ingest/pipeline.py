"""The ingest pipeline: Kafka poll → decode → batch → store, exactly once.

Two threads, each a small step with one contract:

``IngestWorker`` (a decode thread and a store thread) takes polled chunks of
record batches, opens and decodes them (numpy and Arrow, without a Python
object per record), batches them by count or age, prices them, sends rejects
to the dead-letter topic, and stores each batch — rows, dead letters and next
offsets in one DuckDB transaction.

``Ingestor`` (the calling thread) owns the Kafka consumer, which is not
thread-safe: it polls record batches unopened (``records.install``), submits
chunks of them to the worker, commits the offsets the
worker has stored back to Kafka (``commit_async``; Kafka's copy is advisory,
the store's is the truth), and handles rebalances: before partitions are
revoked it waits until the worker has stored everything in flight; on
assignment it seeks each partition to the larger of the store's offset and
the group's committed offset.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import json
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import polars as pl
import pyarrow as pa
from kafka import KafkaConsumer, KafkaProducer
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.errors import IllegalStateError, KafkaError, MessageSizeTooLargeError
from kafka.structs import OffsetAndMetadata, TopicPartition

from finopsd.events import UsageEvent, _Event
from finopsd.ingest.decode import Reject, store_schema
from finopsd.ingest.formats import Decoder
from finopsd.ingest.records import FetchedRecord, RecordBlock, Records, install, read_blocks
from finopsd.pricing import PriceBook, PricingStats
from finopsd.store import AppendResult, DeadLetterRow, Store, StoreBatch, StoreUnavailable

log = logging.getLogger(__name__)

DECODE_PIECE = 16384
"""Records decoded together as they arrive, so a closing batch has little left to decode."""

HEADER_PREFIX = "finopsd-"
"""Dead-letter headers: finopsd-reason, finopsd-detail, finopsd-source-{topic,partition,offset}."""


RETRY_FIRST_S = 0.5
"""First wait before a write is tried again while the store or the broker is unavailable."""
RETRY_MAX_S = 10.0
"""Longest wait between tries."""
STALL_REPORT_S = 30.0
"""While a stall lasts, it is logged again this often."""


class WorkerFailed(RuntimeError):
    """The worker thread stopped on an error; nothing after its last stored batch is lost."""


class BrokerUnavailable(RuntimeError):
    """Dead letters could not be handed to Kafka; ``pending`` are the ones still to send."""

    def __init__(self, message: str, pending: list[tuple[FetchedRecord, Reject]]) -> None:
        super().__init__(message)
        self.pending = pending


@dataclass(frozen=True, slots=True)
class Stall:
    """Why ingest is waiting: ``cause`` is "store" or "broker", since ``since`` (epoch s)."""

    cause: str
    since: float
    detail: str
    records: int

    def describe(self) -> str:
        when = datetime.fromtimestamp(self.since, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        what = "store unavailable" if self.cause == "store" else "broker unreachable"
        return f"{what} since {when}, {self.records} record(s) waiting: {self.detail}"


class _Abandoned(Exception):
    """Stop was requested while a write could not be made: the batch stays unstored."""


@dataclass(frozen=True, slots=True)
class Chunk:
    """Record batches of one partition from one poll, in offset order, not yet opened."""

    topic: str
    partition: int
    blocks: list[RecordBlock]

    @property
    def size_bytes(self) -> int:
        """Bytes the chunk's record batches hold in memory."""
        return sum(b.size_bytes for b in self.blocks)


@dataclass(slots=True)
class _Flush:
    done: threading.Event = field(default_factory=threading.Event)


_STOP = object()


APPEND_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Upper bounds (seconds) of the store-append latency histogram's buckets."""


@dataclass
class IngestStats:
    """Counters since start; read them with ``snapshot()``."""

    stored: Counter[str] = field(default_factory=Counter)
    duplicates: Counter[str] = field(default_factory=Counter)
    dead_letters: Counter[str] = field(default_factory=Counter)
    batches: int = 0
    records: int = 0
    backpressure_s: float = 0.0  # time polling waited for the worker
    unpriced: Counter[str] = field(default_factory=Counter)  # "provider/model" -> events
    cost_disagreements: int = 0  # events where the gateway's cost and ours disagree
    last_batch_at: float | None = None
    stall: Stall | None = None  # set while the store or the broker cannot be written
    dead_letters_by_topic: Counter[tuple[str, str]] = field(default_factory=Counter)
    append_seconds: list[int] = field(default_factory=lambda: [0] * (len(APPEND_BUCKETS_S) + 1))
    append_seconds_sum: float = 0.0  # store appends: counts per APPEND_BUCKETS_S bucket, +Inf
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add_batch(
        self,
        records: int,
        inserted: Mapping[str, int],
        received: Mapping[str, int],
        dead_letters: Counter[str],
    ) -> None:
        """Count one stored batch: rows received per table, rows inserted, rejects by reason."""
        with self._lock:
            self.batches += 1
            self.records += records
            self.stored.update(inserted)
            self.duplicates.update({t: received[t] - n for t, n in inserted.items()})
            self.dead_letters.update(dead_letters)
            self.last_batch_at = time.time()

    def add_dead_letter_topics(self, topic_reasons: Counter[tuple[str, str]]) -> None:
        """Count dead letters by (source topic, reason)."""
        with self._lock:
            self.dead_letters_by_topic.update(topic_reasons)

    def add_append(self, seconds: float) -> None:
        """Count one store append (a batch's transaction) and how long it took."""
        with self._lock:
            self.append_seconds[bisect.bisect_left(APPEND_BUCKETS_S, seconds)] += 1
            self.append_seconds_sum += seconds

    def add_pricing(self, pricing: PricingStats) -> None:
        with self._lock:
            self.unpriced.update(pricing.unpriced)
            self.cost_disagreements += pricing.disagreements

    def add_backpressure(self, seconds: float) -> None:
        with self._lock:
            self.backpressure_s += seconds

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "records": self.records,
                "batches": self.batches,
                "stored": dict(self.stored),
                "duplicates": dict(self.duplicates),
                "dead_letters": dict(self.dead_letters),
                "last_batch_at": self.last_batch_at,
                "backpressure_s": round(self.backpressure_s, 3),
                "unpriced": dict(self.unpriced),
                "cost_disagreements": self.cost_disagreements,
                "stalled": None
                if self.stall is None
                else {
                    "cause": self.stall.cause,
                    "since": self.stall.since,
                    "records": self.stall.records,
                    "detail": self.stall.detail,
                },
            }


@dataclass(frozen=True)
class Route:
    """How records of one topic are decoded and stored."""

    decoder: Decoder
    dedup_window: timedelta

    @property
    def model(self) -> type[_Event]:
        return self.decoder.model


class _Batch:
    """Decoded rows, rejects and next offsets waiting to be stored together."""

    def __init__(self) -> None:
        self.pending: dict[str, list[Records]] = {}  # topic -> opened chunks, not decoded yet
        self.frames: dict[str, list[pa.Table]] = {}  # table -> decoded rows
        self.dead: list[tuple[FetchedRecord, Reject]] = []
        self.offsets: dict[tuple[str, int], int] = {}
        self.count = 0
        self.opened = time.monotonic()


class IngestWorker:
    """Decode, batch and store chunks, on two threads of its own.

    The decode thread opens each chunk (``records.read_blocks``), decodes and
    prices every ``DECODE_PIECE`` records of a topic as they gather, and
    closes the batch by count or age; the store thread deduplicates and
    writes closed batches, so gathering and decoding go on while a batch
    commits.

    ``submit(chunk)`` blocks while ``queue_chunks`` chunks, or ``queue_bytes`` of
    record batches, wait (backpressure; a chunk larger than the budget waits alone)
    and raises ``WorkerFailed`` once a thread has died. ``flush()`` returns
    when every chunk submitted before it is stored. ``take_stored_offsets()``
    returns the offsets stored since the last call. ``close()`` flushes and
    joins.

    Nothing a record holds stops the worker: an unexpected error while decoding
    or pricing is retried record by record, and while storing by halving the
    rows, and the record (or row) that raises is dead-lettered with reason
    ``internal``. A store or broker that cannot be written (a full disk, an
    outage) holds the batch: it is tried again with backoff, the stall is in
    ``stats.stall`` and in the log, and ingest resumes by itself.
    ``request_stop()`` during a stall abandons the unstored batches: their
    offsets were not stored, so they are read again on restart.
    """

    def __init__(
        self,
        store: Store,
        routes: Mapping[str, Route],
        *,
        dead_letters: DeadLetterSink | None,
        batch_max_events: int,
        batch_max_age_s: float,
        queue_chunks: int = 8,
        queue_bytes: int = 64 << 20,
        stats: IngestStats | None = None,
        prices: PriceBook | None = None,
    ) -> None:
        self.store = store
        self.prices = prices
        self.routes = dict(routes)
        self.dead_letters = dead_letters
        self.batch_max_events = batch_max_events
        self.batch_max_age_s = batch_max_age_s
        self.stats = stats or IngestStats()
        self._chunks: queue.Queue[object] = queue.Queue(maxsize=queue_chunks)
        self.queue_bytes = queue_bytes
        self._queued_bytes = 0  # record-batch bytes of the chunks in _chunks
        self._queued = threading.Condition()
        # a closed batch is handed to the store thread only when it has taken the one
        # before: at most two batches live (one stored, one gathered). A deeper queue
        # holds a third (~50 MiB at 131,072 events) and a stop has to wait for it.
        self._batches: queue.Queue[object] = queue.Queue(maxsize=1)
        self._handed = threading.Event()  # set when the store thread takes a batch
        self._stored: dict[tuple[str, int], int] = {}
        self._stored_lock = threading.Lock()
        self._error: BaseException | None = None
        self._stopping = threading.Event()
        self._abandoned = threading.Event()
        self._beats = {"decode": time.monotonic(), "store": time.monotonic()}
        self.backpressured = False  # the polling thread waits in submit() for room
        self._threads = [
            threading.Thread(target=self._guard, args=(self._decode_loop,), name="ingest-decode"),
            threading.Thread(target=self._guard, args=(self._store_loop,), name="ingest-store"),
        ]
        for thread in self._threads:
            thread.daemon = True
            thread.start()

    def alive(self) -> bool:
        """Whether the decode and store threads still run (any thread may ask)."""
        return all(t.is_alive() for t in self._threads)

    def wedged(self, max_s: float) -> str | None:
        """The thread ("decode" or "store") that has not come round its loop for more than
        ``max_s`` seconds, or None. Waiting out an outage (``stats.stall``) counts as
        coming round: the wait is by design. Any thread may ask."""
        now = time.monotonic()
        for name, beat in self._beats.items():
            if now - beat > max_s:
                return name
        return None

    # -- called from the polling thread ---------------------------------------------

    def submit(self, chunk: Chunk) -> None:
        self._put(chunk)

    def flush(self) -> None:
        marker = _Flush()
        self._put(marker)
        while not marker.done.wait(0.1):
            self._check()
            if self._abandoned.is_set():
                return
        self._check()

    def close(self) -> None:
        if all(t.is_alive() for t in self._threads):
            self._put(_STOP)
            for thread in self._threads:
                thread.join()
        self._check()

    def request_stop(self) -> None:
        """Stop soon: if a write is stalled, abandon what is not stored (it is read again)."""
        self._stopping.set()
        if self.stats.stall is not None:
            self._abandoned.set()

    @property
    def abandoned(self) -> bool:
        """True once unstored batches were given up at stop (the store or broker was down)."""
        return self._abandoned.is_set()

    def take_stored_offsets(self) -> dict[tuple[str, int], int]:
        with self._stored_lock:
            stored, self._stored = self._stored, {}
        return stored

    def check(self) -> None:
        """Raise ``WorkerFailed`` if a worker thread has died."""
        self._check()

    def _put(self, item: object) -> None:
        self.backpressured = True
        try:
            self._put_waiting(item)
        finally:
            self.backpressured = False

    def _put_waiting(self, item: object) -> None:
        size = item.size_bytes if isinstance(item, Chunk) else 0
        waited_from: float | None = None
        with self._queued:
            while (
                size
                and self._queued_bytes
                and self._queued_bytes + size > self.queue_bytes
                and not self._abandoned.is_set()
            ):
                waited_from = waited_from or time.monotonic()
                self._check()
                self._queued.wait(0.1)
            self._queued_bytes += size
        try:
            self._chunks.put_nowait(item)
        except queue.Full:
            waited_from = waited_from or time.monotonic()
            while not self._abandoned.is_set():
                self._check()
                try:
                    self._chunks.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
        if waited_from is not None:
            self.stats.add_backpressure(time.monotonic() - waited_from)

    def _taken(self, chunk: Chunk) -> None:
        """The decode thread took ``chunk`` off the queue: its bytes leave the budget."""
        with self._queued:
            self._queued_bytes -= chunk.size_bytes
            self._queued.notify()

    def _check(self) -> None:
        if self._error is not None:
            raise WorkerFailed(f"ingest worker stopped: {self._error}") from self._error

    # -- the worker threads ------------------------------------------------------------

    def _guard(self, loop: Callable[[], None]) -> None:
        try:
            loop()
        except BaseException as exc:  # surfaced to the polling thread by _check()
            log.error("ingest worker failed: %s", exc, exc_info=log.isEnabledFor(logging.DEBUG))
            self._error = exc

    def _hand_over(self, item: object) -> None:
        """Pass ``item`` to the store thread; return once that thread has taken it."""
        self._handed.clear()
        while self._error is None and not self._abandoned.is_set():
            self._beats["decode"] = time.monotonic()  # waiting for the store thread (its own beat)
            try:
                self._batches.put(item, timeout=0.1)
                break
            except queue.Full:
                continue
        while self._error is None and not self._abandoned.is_set():
            self._beats["decode"] = time.monotonic()
            if self._handed.wait(0.1):
                return

    def _decode_loop(self) -> None:
        batch = _Batch()
        while self._error is None and not self._abandoned.is_set():
            self._beats["decode"] = time.monotonic()
            timeout = 0.1
            if batch.count:
                timeout = min(timeout, batch.opened + self.batch_max_age_s - time.monotonic())
            try:
                item = self._chunks.get(timeout=max(0.0, timeout))
            except queue.Empty:
                if batch.count and time.monotonic() >= batch.opened + self.batch_max_age_s:
                    batch = self._close(batch)
                continue
            if isinstance(item, Chunk):
                self._taken(item)
                self._add(batch, item)
                if batch.count >= self.batch_max_events:
                    batch = self._close(batch)
            else:  # _Flush or _STOP: the batch so far goes first
                if batch.count:
                    batch = self._close(batch)
                self._hand_over(item)
                if item is _STOP:
                    return

    def _add(self, batch: _Batch, chunk: Chunk) -> None:
        if not chunk.blocks:
            return
        records = read_blocks(chunk.blocks)
        if not batch.count:
            batch.opened = time.monotonic()
        batch.offsets[(chunk.topic, chunk.partition)] = records.next_offset
        batch.count += len(records)
        if len(records):
            pending = batch.pending.setdefault(chunk.topic, [])
            pending.append(records)
            if sum(len(r) for r in pending) >= DECODE_PIECE:
                self._decode(batch, chunk.topic)

    def _close(self, batch: _Batch) -> _Batch:
        """Decode what is left of the batch, pass it to the store thread, return a fresh one."""
        for topic in list(batch.pending):
            self._decode(batch, topic)
        self._hand_over(batch)
        return _Batch()

    def _decode(self, batch: _Batch, topic: str) -> None:
        """Decode the topic's pending records in one pass (Arrow, without the GIL)."""
        chunks = batch.pending.pop(topic)
        route = self.routes[topic]
        values = (
            chunks[0].values if len(chunks) == 1 else pa.concat_arrays([c.values for c in chunks])
        )
        try:
            rows, rejects = self._decode_values(route, values)
        except Exception as exc:  # a bug a record triggers: find that record, keep the rest
            log.error(
                "decoding %d record(s) of %s failed (%s: %s); decoding them one by one",
                len(values),
                topic,
                type(exc).__name__,
                exc,
            )
            rows, rejects = self._decode_each(route, values)
        if rows.num_rows:
            batch.frames.setdefault(route.model.table, []).append(rows)
        if rejects:
            starts = list(itertools.accumulate((len(c) for c in chunks), initial=0))
            for r in rejects:
                k = bisect.bisect_right(starts, r.index) - 1
                batch.dead.append((chunks[k].record(r.index - starts[k]), r))

    def _decode_values(self, route: Route, values: pa.LargeBinaryArray) -> tuple[pa.Table, list]:
        """Rows (priced, for usage events) and rejects of ``values``."""
        rows, rejects = route.decoder.decode(values)
        if rows.num_rows and self.prices is not None and route.model is UsageEvent:
            rows, pricing = self.prices.price(rows)
            self.stats.add_pricing(pricing)
        return rows, rejects

    def _decode_each(self, route: Route, values: pa.LargeBinaryArray) -> tuple[pa.Table, list]:
        """``_decode_values`` one record at a time; a record that raises is rejected as
        ``internal`` with the error."""
        frames: list[pa.Table] = []
        rejects: list[Reject] = []
        for i in range(len(values)):
            try:
                rows, refused = self._decode_values(route, values.slice(i, 1))
            except Exception as exc:
                rejects.append(Reject(i, "internal", f"{type(exc).__name__}: {exc}"))
                continue
            if rows.num_rows:
                frames.append(rows)
            rejects.extend(Reject(i, r.reason, r.detail) for r in refused)
        if not frames:
            return store_schema(route.model).empty_table(), rejects
        return pa.concat_tables(frames), rejects

    def _store_loop(self) -> None:
        while self._error is None and not self._abandoned.is_set():
            self._beats["store"] = time.monotonic()
            try:
                item = self._batches.get(timeout=0.1)
            except queue.Empty:
                continue
            self._handed.set()
            if isinstance(item, _Batch):
                try:
                    self._store(item)
                except _Abandoned:
                    log.warning(
                        "stopping with %d record(s) not stored (%s); they are read again "
                        "from Kafka on the next start",
                        item.count,
                        "store or broker unavailable",
                    )
                    return
            elif isinstance(item, _Flush):
                item.done.set()
            elif item is _STOP:
                return

    def _store(self, batch: _Batch) -> None:
        out = StoreBatch(offsets=batch.offsets)
        received: Counter[str] = Counter()
        # several topics may feed one table (formats): one entry per table
        tables = {route.model.table: route for route in self.routes.values()}
        for table, route in tables.items():
            frames = batch.frames.get(table)
            if not frames:
                continue
            rows = pa.concat_tables(frames) if len(frames) > 1 else frames[0]
            received[table] = rows.num_rows
            out.rows[table] = first_of_each_key(rows, route.model.dedup_key)
            out.dedup[table] = (route.model.dedup_key, route.dedup_window)
        out.dead_letters = [
            DeadLetterRow(
                record.topic,
                record.partition,
                record.offset,
                reject.reason,
                reject.detail,
                len(record.value or b""),
            )
            for record, reject in batch.dead
        ]
        if batch.dead and self.dead_letters is not None:
            self._send_dead_letters(batch.dead, batch.count)
        began = time.monotonic()
        result = self._retry(lambda: self._append(out), batch.count)
        self.stats.add_append(time.monotonic() - began)
        reasons = Counter(r.reason for _, r in batch.dead)
        if batch.dead:
            self.stats.add_dead_letter_topics(
                Counter((rec.topic, r.reason) for rec, r in batch.dead)
            )
        reasons.update("internal" for _ in range(len(out.dead_letters) - len(batch.dead)))
        self.stats.add_batch(batch.count, result.inserted, received, reasons)
        with self._stored_lock:
            self._stored.update(batch.offsets)
        if reasons:
            log.warning(
                "%d record(s) sent to the dead-letter topic: %s",
                len(batch.dead),
                ", ".join(f"{k}={v}" for k, v in reasons.items()),
            )

    def _send_dead_letters(self, dead: list[tuple[FetchedRecord, Reject]], records: int) -> None:
        assert self.dead_letters is not None
        sink = self.dead_letters
        pending = list(dead)

        def attempt() -> None:
            nonlocal pending
            try:
                sink.send(pending)
            except BrokerUnavailable as exc:
                pending = exc.pending
                raise

        self._retry(attempt, records)

    def _append(self, out: StoreBatch) -> AppendResult:
        """``store.append(out)``; rows the store refuses are found and dead-lettered."""
        self.store.recover()
        try:
            return self.store.append(out)
        except StoreUnavailable:
            raise
        except Exception as exc:  # the data: a bug a row triggers, not the disk
            return self._append_isolating(out, exc)

    def _append_isolating(self, out: StoreBatch, error: Exception) -> AppendResult:
        """Store ``out`` in halves until the rows the store refuses are alone; dead-letter
        each of them (reason ``internal``, the row as JSON), then store the offsets.

        Parts stored before the offsets are safe to store again: rows are deduplicated.
        """
        log.error(
            "the store refused a batch (%s: %s); storing it in parts to find the rows",
            type(error).__name__,
            error,
        )
        inserted: Counter[str] = Counter()
        refused: list[tuple[FetchedRecord, Reject]] = []
        for table, rows in out.rows.items():
            parts = [rows]
            while parts:
                part = parts.pop()
                try:
                    result = self.store.append(
                        StoreBatch(rows={table: part}, dedup={table: out.dedup[table]})
                    )
                    inserted[table] += result.inserted.get(table, 0)
                except StoreUnavailable:
                    raise
                except Exception as exc:
                    if part.num_rows > 1:
                        half = part.num_rows // 2
                        parts += [part.slice(half), part.slice(0, half)]
                        continue
                    row = part.to_pylist()[0]
                    value = json.dumps(row, default=str).encode()
                    record = FetchedRecord(f"store:{table}", -1, -1, None, value, [])
                    refused.append((record, Reject(-1, "internal", f"{type(exc).__name__}: {exc}")))
        if refused and self.dead_letters is not None:
            self.dead_letters.send(refused)  # an outage here retries the whole batch
        final = StoreBatch(
            offsets=out.offsets,
            dead_letters=out.dead_letters
            + [
                DeadLetterRow(rec.topic, -1, -1, rej.reason, rej.detail, len(rec.value or b""))
                for rec, rej in refused
            ],
        )
        self.store.append(final)
        out.dead_letters = final.dead_letters
        return AppendResult(dict(inserted), {})

    def _retry(self, attempt: Callable[[], Any], records: int) -> Any:
        """``attempt()`` until it returns, waiting out ``StoreUnavailable`` and
        ``BrokerUnavailable`` with backoff; raises ``_Abandoned`` if stop is requested."""
        delay = RETRY_FIRST_S
        stall: Stall | None = None
        reported = 0.0
        while True:
            try:
                result = attempt()
            except (StoreUnavailable, BrokerUnavailable) as exc:
                now = time.time()
                cause = "store" if isinstance(exc, StoreUnavailable) else "broker"
                since = now if stall is None else stall.since
                stall = self.stats.stall = Stall(cause, since, str(exc), records)
                if now - reported >= STALL_REPORT_S:
                    log.error("%s; ingest paused, retrying", stall.describe())
                    reported = now
                self._beats["store"] = time.monotonic()  # waiting, by design: not wedged
                if self._stopping.is_set() or self._stopping.wait(delay):
                    self._abandoned.set()
                    raise _Abandoned from exc
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            if stall is not None:
                self.stats.stall = None
                log.info(
                    "%s writable again after %.0fs; ingest resumed",
                    "store" if stall.cause == "store" else "broker",
                    time.time() - stall.since,
                )
            return result


class DeadLetterSink:
    """Sends refused records to the dead-letter topic, and waits until Kafka has them.

    The original key, value and headers are kept; finopsd adds headers naming
    the reason and the source topic, partition and offset. A value too large
    for the dead-letter topic is left out, and a ``finopsd-value-omitted``
    header gives its size. A crash after
    ``send`` but before the batch is stored sends those records again on
    restart: consumers of the dead-letter topic should expect duplicates and
    may use the source headers to drop them.
    """

    def __init__(
        self, make_producer: Callable[[], KafkaProducer], topic: str, *, timeout_s: float = 30.0
    ) -> None:
        self._make_producer = make_producer
        self._producer: KafkaProducer | None = None
        self.topic = topic
        self.timeout_s = timeout_s

    @property
    def producer(self) -> KafkaProducer:
        if self._producer is None:
            self._producer = self._make_producer()
        return self._producer

    def close(self, timeout_s: float = 10.0) -> None:
        """Close the producer; what it could not deliver is logged, never raised."""
        producer, self._producer = self._producer, None
        if producer is None:
            return
        try:
            producer.close(timeout=timeout_s)
        except KafkaError as exc:
            log.warning("dead-letter producer closed with records undelivered: %s", exc)
            _force_close(producer)

    def send(self, items: list[tuple[FetchedRecord, Reject]]) -> None:
        """Send ``items`` and wait for Kafka's acknowledgement of each.

        Raises ``BrokerUnavailable`` with the items not acknowledged within
        ``timeout_s`` (send those again; Kafka may still get some of them, which
        the dead-letter topic then holds twice).
        """
        futures = []
        pending: list[tuple[FetchedRecord, Reject]] = []
        failure: BaseException | None = None
        for record, reject in items:
            headers = list(record.headers or [])
            headers += [
                (HEADER_PREFIX + "reason", reject.reason.encode()),
                (HEADER_PREFIX + "detail", reject.detail.encode()[:4096]),
                (HEADER_PREFIX + "source-topic", record.topic.encode()),
                (HEADER_PREFIX + "source-partition", str(record.partition).encode()),
                (HEADER_PREFIX + "source-offset", str(record.offset).encode()),
            ]
            try:
                try:
                    future = self.producer.send(
                        self.topic, key=record.key, value=record.value, headers=headers
                    )
                except MessageSizeTooLargeError:
                    future = self._send_without_value(record, headers)
            except KafkaError as exc:  # no metadata within max_block_ms: the broker is away
                failure = exc
                pending.append((record, reject))
                continue
            futures.append((record, reject, headers, future))
        deadline = time.monotonic() + self.timeout_s
        with contextlib.suppress(KafkaError):
            self.producer.flush(timeout=self.timeout_s)
        for record, reject, headers, future in futures:
            try:
                try:
                    # raises if Kafka did not take it
                    future.get(timeout=max(0.0, deadline - time.monotonic()))
                except MessageSizeTooLargeError:  # the broker's limit is lower than ours
                    self._send_without_value(record, headers).get(
                        timeout=max(0.1, deadline - time.monotonic())
                    )
            except KafkaError as exc:
                failure = exc
                pending.append((record, reject))
        if pending:
            # kafka-python's producer can stay stuck after a broker stopped answering
            # (a batch left in flight keeps its partition muted): the next try gets a new one
            self.close(timeout_s=0)
            raise BrokerUnavailable(
                f"{len(pending)} dead letter(s) not acknowledged by Kafka within "
                f"{self.timeout_s:.0f}s: {type(failure).__name__}: {failure}",
                pending,
            )

    def _send_without_value(self, record: FetchedRecord, headers: list) -> Any:
        """The record is too large for the dead-letter topic: send its headers, no value."""
        size = len(record.value or b"")
        log.warning(
            "dead letter from %s[%d]@%d is %d bytes, over the topic's limit: "
            "sent without its value",
            record.topic,
            record.partition,
            record.offset,
            size,
        )
        headers = [*headers, (HEADER_PREFIX + "value-omitted", str(size).encode())]
        return self.producer.send(self.topic, key=record.key, value=None, headers=headers)


def _force_close(producer: KafkaProducer) -> None:
    """Finish what ``KafkaProducer.close`` leaves undone when its flush times out.

    kafka-python 3.0 raises out of ``close()`` before stopping its sender thread,
    and then again from ``__del__``; stop the thread and mark it closed (internals
    of the pinned 3.0.x, like ``records.install``).
    """
    sender = getattr(producer, "_sender", None)
    if sender is not None:
        sender.force_close()
        sender.join(1.0)
    producer._closed = True  # type: ignore[attr-defined]


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, ingestor: Ingestor) -> None:
        self.ingestor = ingestor

    def on_partitions_revoked(self, revoked: Any) -> None:
        if revoked:
            self.ingestor._on_revoked(list(revoked))

    def on_partitions_assigned(self, assigned: Any) -> None:
        self.ingestor._on_assigned(list(assigned))


class Ingestor:
    """Polls Kafka and feeds an ``IngestWorker`` until ``stop()``.

    ``run()`` blocks; it returns after the final batch is stored and its
    offsets committed, or raises ``WorkerFailed``.
    """

    def __init__(
        self,
        consumer_factory: Callable[[], KafkaConsumer],
        worker: IngestWorker,
        topics: list[str],
        *,
        max_poll_records: int,
        on_poll: Callable[[], None] | None = None,
    ) -> None:
        self._consumer_factory = consumer_factory
        self.worker = worker
        self.topics = topics
        self.max_poll_records = max_poll_records
        self.on_poll = on_poll
        self._stop = threading.Event()
        self._closing = False
        self.polled = 0
        self.last_poll_at: float | None = None  # time.monotonic() of the latest poll
        self.positions: dict[tuple[str, int], int] = {}  # next offset stored, by partition
        self.consumer: KafkaConsumer | None = None
        self.assignment: set[TopicPartition] = set()
        self._unsettled: set[TopicPartition] = set()
        # the rebalance listener runs on kafka-python's network thread
        self._assignment_lock = threading.Lock()

    def stop(self) -> None:
        self._stop.set()
        self.worker.request_stop()

    def run(self) -> None:
        consumer = self.consumer = self._consumer_factory()
        install(consumer)  # poll() returns record batches, opened by the worker
        consumer.subscribe(self.topics, listener=_Rebalance(self))
        try:
            while not self._stop.is_set():
                polled = consumer.poll(timeout_ms=200, max_records=self.max_poll_records)
                self.last_poll_at = time.monotonic()
                self._settle_positions()
                for tp, blocks in polled.items():
                    self.worker.submit(Chunk(tp.topic, tp.partition, blocks))
                    self.polled += sum(b.count_hint for b in blocks)
                self._commit(self.worker.take_stored_offsets())
                self.worker.check()
                if self.on_poll is not None:
                    self.on_poll()
            self.worker.flush()
            self._commit(self.worker.take_stored_offsets(), sync=True)
        finally:
            self._closing = True  # close() revokes partitions; nothing is in flight by then
            try:
                consumer.close(autocommit=False)
            finally:
                self.worker.close()

    def lag(self) -> dict[tuple[str, int], int | None]:
        """Records behind, per assigned partition: the broker's high watermark (as of the
        latest fetch) - the next offset stored; None until both are known. Any thread."""
        consumer = self.consumer
        with self._assignment_lock:
            assigned = sorted(self.assignment)
        out: dict[tuple[str, int], int | None] = {}
        for tp in assigned:
            try:
                high = consumer.highwater(tp) if consumer is not None else None
            except IllegalStateError:  # revoked since the copy above (a rebalance, close())
                continue
            stored = self.positions.get((tp.topic, tp.partition))
            out[(tp.topic, tp.partition)] = (
                None if high is None or stored is None else max(0, high - stored)
            )
        return out

    def _commit(self, offsets: dict[tuple[str, int], int], *, sync: bool = False) -> None:
        self.positions.update(offsets)
        if not offsets or self.consumer is None:
            return
        payload = {
            TopicPartition(t, p): OffsetAndMetadata(o, "", -1) for (t, p), o in offsets.items()
        }
        if sync:
            try:
                self.consumer.commit(payload)
            except Exception as exc:  # the store holds the truth; Kafka's copy is advisory
                log.warning("could not commit offsets to Kafka: %s", exc)
        else:
            self.consumer.commit_async(payload, callback=_log_commit_failure)

    def _on_revoked(self, revoked: list[TopicPartition]) -> None:
        if self._closing:
            with self._assignment_lock:
                self.assignment -= set(revoked)
            return
        self.worker.flush()
        self._commit(self.worker.take_stored_offsets())
        with self._assignment_lock:
            self.assignment -= set(revoked)
        log.info("partitions revoked: %s", _names(revoked))

    def _on_assigned(self, assigned: list[TopicPartition]) -> None:
        # Runs on kafka-python's IO thread, where blocking calls (committed(), commit())
        # raise: pause the partitions and settle their positions on the polling thread.
        assert self.consumer is not None
        with self._assignment_lock:
            self.assignment |= set(assigned)
            self._unsettled |= set(assigned)
        if assigned:
            self.consumer.pause(*assigned)
        log.info("partitions assigned: %s", _names(assigned))

    def _settle_positions(self) -> None:
        """Seek new partitions to max(store, group); bring the group up to the store."""
        assert self.consumer is not None
        with self._assignment_lock:
            tps, self._unsettled = self._unsettled & self.assignment, set()
        if not tps:
            return
        stored = self.worker.store.stored_offsets({tp.topic for tp in tps})
        behind: dict[tuple[str, int], int] = {}
        for tp in tps:
            position = stored.get((tp.topic, tp.partition))
            try:
                committed = self.consumer.committed(tp)
            except Exception as exc:  # coordinator moving: stay paused, try on the next poll
                log.warning("committed offset of %s unavailable (%s); retrying", _names([tp]), exc)
                with self._assignment_lock:
                    self._unsettled.add(tp)
                continue
            if committed is not None and (position is None or committed > position):
                position = committed
            elif position is not None and committed != position:
                behind[(tp.topic, tp.partition)] = position
            if position is not None:
                self.consumer.seek(tp, position)
                self.positions[(tp.topic, tp.partition)] = position
        self._commit(behind, sync=True)
        with self._assignment_lock:
            settled = tps - self._unsettled
        if settled:
            self.consumer.resume(*settled)


def first_of_each_key(rows: pa.Table, key: tuple[str, ...]) -> pa.Table:
    """``rows`` without the repeats of a key already seen earlier in it (order kept)."""
    keys = pl.DataFrame(rows.select(list(key)))
    if keys.n_unique() == keys.height:
        return rows  # the usual case: no key repeats, and no copy
    if len(key) == 1:
        first = keys.to_series().is_first_distinct()
    else:
        first = keys.select(pl.struct(pl.all()).is_first_distinct()).to_series()
    return rows.filter(first.to_arrow())


def _names(tps: list[TopicPartition]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(tps)) or "none"


def _log_commit_failure(offsets: Any, response: Any) -> None:
    if isinstance(response, Exception):
        log.debug("async offset commit failed (the store keeps the truth): %s", response)
