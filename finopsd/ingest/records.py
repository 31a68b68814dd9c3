"""Kafka record batches read whole: offsets and values without a Python object per record.

kafka-python opens every fetched record into Python objects on the consumer's
polling thread (a ``DefaultRecord``, then a ``ConsumerRecord``: about 10 µs a
record), and the polling thread is what bounds a Kafka consumer in Python.
finopsd needs, of each record, its offset and its value.

``install(consumer)`` makes ``poll()`` return, per partition, one
``RecordBlock`` per record batch instead of one ``ConsumerRecord`` per record:
the batch is checked on the polling thread as kafka-python checks it (CRC,
control batches, aborted transactions, a fetch that starts inside a batch) but
not opened. ``read_blocks(blocks)``, called on a worker thread, decompresses
the batches and finds every record: a short Python walk over the record
lengths, numpy over the fields, and one Arrow array over the batch bytes for
the values (no copy per record).

Contract: ``read_blocks`` yields exactly the offsets and values that
kafka-python's own iteration yields for the same batches from the fetch
position on (a null value reads as empty bytes, as the pipeline always took
it); ``Records.record(i)`` gives key and headers too, for the dead-letter
topic. A batch whose layout the fast reader cannot prove is read by
kafka-python's parser instead, which raises ``CorruptRecordError`` where the
batch is corrupt. The hook relies on kafka-python's fetcher internals, so
pyproject pins kafka-python to a minor version and ``install`` refuses a
consumer that lacks them.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
from kafka import KafkaConsumer
from kafka.consumer.fetcher import Fetcher, IsolationLevel
from kafka.errors import CorruptRecordError
from kafka.record.util import decode_varint

_VARINT_MAX_BYTES = 10
_EMPTY_OFFSETS = np.zeros(0, dtype=np.int64)


class FetchedRecord(NamedTuple):
    """One record, opened: what the dead-letter topic keeps of it."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes | None]]


class RecordBlock:
    """One fetched record batch of one partition, checked but not opened.

    ``first_offset``: records below it are left out (a fetch can start inside
    a batch). ``next_offset``: where the partition's position is once the
    block is consumed. ``count_hint``: how many records it holds from
    ``first_offset`` on, exact unless compaction left gaps in its offsets.
    """

    __slots__ = ("batch", "first_offset", "next_offset", "partition", "topic")

    def __init__(self, topic: str, partition: int, batch: Any, first_offset: int) -> None:
        self.topic = topic
        self.partition = partition
        self.batch = batch  # kafka.record DefaultRecordBatch, or a list of opened records
        self.first_offset = first_offset
        if isinstance(batch, list):  # never empty
            self.next_offset = batch[-1].offset + 1
        else:
            self.next_offset = batch.next_offset

    @property
    def size_bytes(self) -> int:
        """Bytes the block holds in memory (a compressed batch: once decompressed)."""
        if isinstance(self.batch, list):
            return sum(len(r.value or b"") + len(r.key or b"") for r in self.batch)
        buffer = getattr(self.batch, "_buffer", None)  # decompressed, if it was compressed
        return len(buffer) if buffer is not None else int(self.batch.size_in_bytes)

    @property
    def count_hint(self) -> int:
        if isinstance(self.batch, list):
            return len(self.batch)
        skipped = max(0, self.first_offset - self.batch.base_offset)
        return max(0, self.batch.records_count - skipped)


@dataclass(frozen=True, eq=False)
class Records:
    """The records of some blocks of one partition, in offset order.

    ``offsets`` (int64) and ``values`` (large_binary, never null) line up;
    ``record(i)`` opens record ``i`` whole.
    """

    topic: str
    partition: int
    offsets: np.ndarray
    values: pa.LargeBinaryArray
    next_offset: int
    _buffer: Any = None  # fast path: the joined record bytes and each record's body span
    _spans: np.ndarray | None = None
    _opened: Sequence[Any] | None = None  # slow path: kafka-python's records

    def __len__(self) -> int:
        return len(self.offsets)

    def record(self, i: int) -> FetchedRecord:
        offset = int(self.offsets[i])
        if self._opened is not None:
            r = self._opened[i]
            return FetchedRecord(
                self.topic, self.partition, offset, r.key, r.value, list(r.headers or [])
            )
        assert self._spans is not None
        start, end = (int(x) for x in self._spans[i])
        key, value, headers = _open_record(self._buffer, start, end)
        return FetchedRecord(self.topic, self.partition, offset, key, value, headers)


def read_blocks(blocks: Sequence[RecordBlock]) -> Records:
    """Open ``blocks`` (one partition's, in offset order) into offsets and values."""
    if not blocks:
        raise ValueError("read_blocks needs at least one block")
    topic, partition = blocks[0].topic, blocks[0].partition
    next_offset = blocks[-1].next_offset
    if all(not isinstance(b.batch, list) and b.batch.magic == 2 for b in blocks):
        try:
            return _read_fast(blocks, topic, partition, next_offset)
        except _Unproven:
            pass
    return _read_slow(blocks, topic, partition, next_offset)


class _Unproven(Exception):
    """The fast reader cannot vouch for this layout; kafka-python's parser decides."""


def _records_section(batch: Any) -> memoryview:
    batch._maybe_uncompress()  # kafka-python: in place; a no-op once done
    return memoryview(batch._buffer)[batch._pos :]


def _read_fast(
    blocks: Sequence[RecordBlock], topic: str, partition: int, next_offset: int
) -> Records:
    sections = [_records_section(b.batch) for b in blocks]
    counts = [b.batch.records_count for b in blocks]
    buffer: bytes | memoryview = sections[0] if len(sections) == 1 else b"".join(sections)
    ends_expected = list(itertools.accumulate(len(s) for s in sections))
    bodies, ends = _walk(buffer, counts, ends_expected)
    n = len(bodies)
    if n == 0:
        return Records(topic, partition, _EMPTY_OFFSETS, _empty_values(), next_offset)
    data = np.frombuffer(buffer, dtype=np.uint8)
    starts = np.asarray(bodies, dtype=np.int64)
    stops = np.asarray(ends, dtype=np.int64)
    if (stops - starts < 6).any():  # the smallest record body has six bytes
        raise _Unproven
    if (data[starts] >= 0x80).any():  # attributes: one byte, as the spec has it
        raise _Unproven
    pos = starts + 1
    _, pos = _varints(data, pos, stops)  # timestamp delta
    offset_delta, pos = _varints(data, pos, stops)
    key_len, pos = _varints(data, pos, stops)
    pos = pos + np.maximum(key_len, 0)
    value_len, pos = _varints(data, pos, stops)
    value_len = np.maximum(value_len, 0)  # null reads as empty
    value_end = pos + value_len
    if (value_end >= stops).any():  # the header count follows the value
        raise _Unproven
    no_headers = data[value_end] == 0
    if (value_end[no_headers] + 1 != stops[no_headers]).any():
        raise _Unproven
    for at, stop in zip(value_end[~no_headers].tolist(), stops[~no_headers].tolist(), strict=True):
        try:
            if _read_headers(buffer, at)[1] != stop:
                raise _Unproven
        except (IndexError, ValueError, UnicodeDecodeError) as exc:
            raise _Unproven from exc
    base = np.repeat(np.asarray([b.batch.base_offset for b in blocks], dtype=np.int64), counts)
    offsets = base + offset_delta
    values = _views(data, buffer, pos, value_len)
    spans = np.stack([starts, stops], axis=1)
    first = blocks[0].first_offset
    if offsets[0] < first:  # the fetch started inside the first batch
        keep = offsets >= first
        offsets, spans = offsets[keep], spans[keep]
        values = values.filter(pa.array(keep))
    return Records(topic, partition, offsets, values, next_offset, _buffer=buffer, _spans=spans)


def _walk(buffer: Any, counts: list[int], ends_expected: list[int]) -> tuple[list[int], list[int]]:
    """Each record's body span from the chain of record lengths; blocks must end where expected."""
    bodies: list[int] = []
    ends: list[int] = []
    pos = 0
    try:
        for count, block_end in zip(counts, ends_expected, strict=True):
            for _ in range(count):
                b = buffer[pos]
                if b < 0x80:  # the usual one-byte length, read inline
                    length = (b >> 1) ^ -(b & 1)
                    pos += 1
                else:
                    length, pos = decode_varint(buffer, pos)
                bodies.append(pos)
                pos += length
                ends.append(pos)
            if pos != block_end:
                raise _Unproven
    except (IndexError, ValueError) as exc:
        raise _Unproven from exc
    return bodies, ends


def _varints(data: np.ndarray, pos: np.ndarray, stops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Zigzag varints at ``pos``, one per record and inside it: values, next positions."""
    raw = np.zeros(len(pos), dtype=np.uint64)
    pos = pos.copy()
    active = np.ones(len(pos), dtype=bool)
    last = len(data) - 1
    for step in range(_VARINT_MAX_BYTES):
        if (pos[active] >= stops[active]).any():
            raise _Unproven
        b = data[np.minimum(pos, last)].astype(np.uint64)
        raw |= np.where(active, (b & 0x7F) << np.uint64(7 * step), np.uint64(0))
        pos += active
        active &= b >= 0x80
        if not active.any():
            break
    else:
        raise _Unproven
    value = (raw >> np.uint64(1)).astype(np.int64) ^ -(raw & np.uint64(1)).astype(np.int64)
    return value, pos


def _views(data: np.ndarray, buffer: Any, starts: np.ndarray, lengths: np.ndarray) -> pa.Array:
    """Values as one large_binary array: Arrow views over ``buffer``, then one copy in C++."""
    n = len(starts)
    if len(data) >= 1 << 31:
        raise _Unproven  # views address their buffer with int32
    views = np.zeros((n, 16), dtype=np.uint8)
    words = views.view(np.int32)
    words[:, 0] = lengths
    width = np.arange(12)
    inline = data[np.minimum(starts[:, None] + width, len(data) - 1)]
    inline[width[None, :] >= lengths[:, None]] = 0
    views[:, 4:16] = inline  # a short value lives in its view; a long one keeps a prefix
    long = lengths > 12
    words[long, 2] = 0  # buffer index
    words[long, 3] = starts[long]
    array = pa.Array.from_buffers(
        pa.binary_view(), n, [None, pa.py_buffer(views), pa.py_buffer(buffer)]
    )
    return array.cast(pa.large_binary())


def _empty_values() -> pa.LargeBinaryArray:
    return pa.array([], type=pa.large_binary())


def _read_slow(
    blocks: Sequence[RecordBlock], topic: str, partition: int, next_offset: int
) -> Records:
    opened: list[Any] = []
    for block in blocks:
        if isinstance(block.batch, list):
            opened.extend(block.batch)
            continue
        try:  # the fast reader only decompressed it: kafka-python reads it from the start
            opened.extend(r for r in block.batch if r.offset >= block.first_offset)
        except (ValueError, IndexError) as exc:
            raise CorruptRecordError(f"invalid record structure: {exc!r}") from exc
    offsets = np.fromiter((r.offset for r in opened), dtype=np.int64, count=len(opened))
    values = pa.array([r.value or b"" for r in opened], type=pa.large_binary())
    return Records(topic, partition, offsets, values, next_offset, _opened=opened)


def _read_headers(buffer: Any, pos: int) -> tuple[list[tuple[str, bytes | None]], int]:
    """The headers that start at ``pos``, and where they end."""
    count, pos = decode_varint(buffer, pos)
    if count < 0:
        raise ValueError(f"negative header count {count}")
    headers: list[tuple[str, bytes | None]] = []
    for _ in range(count):
        name_len, pos = decode_varint(buffer, pos)
        if name_len < 0:
            raise ValueError(f"negative header name length {name_len}")
        name, pos = bytes(buffer[pos : pos + name_len]).decode("utf-8"), pos + name_len
        value_len, pos = decode_varint(buffer, pos)
        value = None
        if value_len >= 0:
            value, pos = bytes(buffer[pos : pos + value_len]), pos + value_len
        headers.append((name, value))
    return headers, pos


def _open_record(buffer: Any, start: int, end: int) -> tuple[bytes | None, bytes | None, list]:
    """Key, value and headers of the record whose body spans ``buffer[start:end]``."""
    pos = start + 1  # attributes
    _, pos = decode_varint(buffer, pos)  # timestamp delta
    _, pos = decode_varint(buffer, pos)  # offset delta
    key_len, pos = decode_varint(buffer, pos)
    key = None
    if key_len >= 0:
        key, pos = bytes(buffer[pos : pos + key_len]), pos + key_len
    value_len, pos = decode_varint(buffer, pos)
    value = None
    if value_len >= 0:
        value, pos = bytes(buffer[pos : pos + value_len]), pos + value_len
    headers, pos = _read_headers(buffer, pos)
    if pos != end:
        raise CorruptRecordError(f"record body of {end - start} bytes read as {pos - start}")
    return key, value, headers


class BlockPartitionRecords(Fetcher.PartitionRecords):
    """kafka-python's per-partition fetch result, yielding ``RecordBlock`` per batch.

    Batch-level handling follows kafka-python's ``_unpack_records``: CRC check,
    leader epoch, aborted transactions under read_committed, control batches
    skipped, and the position after a consumed batch is its next offset.
    """

    def _maybe_skip_record(self, record: Any) -> bool:
        return False  # blocks trim themselves: RecordBlock.first_offset

    def _unpack_records(
        self, tp: Any, records: Any, key_deserializer: Any, value_deserializer: Any
    ) -> Iterator[RecordBlock]:
        try:
            batch = records.next_batch()
            last_batch = None
            while batch is not None:
                last_batch = batch
                if self.check_crcs and not batch.validate_crc():
                    raise CorruptRecordError(
                        f"Record batch for partition {self.topic_partition} at offset "
                        f"{batch.base_offset} failed crc check"
                    )
                if batch.magic == 2:
                    self.leader_epoch = batch.leader_epoch
                    if self._skip_v2(batch):
                        self.next_fetch_offset = batch.next_offset
                        batch = records.next_batch()
                        continue
                    if batch.last_offset >= self.fetch_offset and batch.records_count:
                        block = RecordBlock(tp.topic, tp.partition, batch, self.fetch_offset)
                        self.records_read += block.count_hint
                        self.bytes_read += batch.size_in_bytes
                        self.next_fetch_offset = batch.next_offset
                        yield block
                    else:
                        self.next_fetch_offset = max(self.next_fetch_offset, batch.next_offset)
                else:  # message format v0/v1: opened by kafka-python, record by record
                    opened = []
                    for record in batch:
                        if self.check_crcs and not record.validate_crc():
                            raise CorruptRecordError(
                                f"Record for partition {self.topic_partition} at offset "
                                f"{record.offset} failed crc check"
                            )
                        if record.offset >= self.fetch_offset:
                            opened.append(record)
                            self.bytes_read += record.size_in_bytes
                    if opened:
                        block = RecordBlock(tp.topic, tp.partition, opened, self.fetch_offset)
                        self.records_read += len(opened)
                        self.next_fetch_offset = block.next_offset
                        yield block
                batch = records.next_batch()
            else:
                if last_batch is not None and last_batch.magic == 2:
                    self.next_fetch_offset = last_batch.next_offset
                self.drain()
        except StopIteration as exc:  # a generator would swallow it
            raise RuntimeError("StopIteration raised unpacking record batches") from exc

    def _skip_v2(self, batch: Any) -> bool:
        """Control batches, and batches of aborted transactions under read_committed."""
        if self.isolation_level == IsolationLevel.READ_COMMITTED and batch.has_producer_id():
            self._consume_aborted_transactions_up_to(batch.last_offset)
            if self._contains_abort_marker(batch):
                self.aborted_producer_ids.discard(batch.producer_id)
            elif self._is_batch_aborted(batch):
                return True
        return bool(batch.is_control_batch)


def install(consumer: KafkaConsumer) -> None:
    """Make ``consumer.poll()`` return ``RecordBlock`` lists; call before its first poll.

    Raises ``RuntimeError`` when this kafka-python lacks the fetcher hook or the
    consumer has deserializers (blocks carry raw bytes).
    """
    fetcher = getattr(consumer, "_fetcher", None)
    if fetcher is None or not hasattr(fetcher, "PartitionRecords"):
        raise RuntimeError("this kafka-python has no Fetcher.PartitionRecords to read blocks with")
    if consumer.config.get("key_deserializer") or consumer.config.get("value_deserializer"):
        raise RuntimeError("block reading needs a consumer without deserializers")
    fetcher.PartitionRecords = BlockPartitionRecords
