"""Record batches read whole (``finopsd.ingest.records``) against kafka-python's own parser.

The batches are real v2 batch bytes, written by kafka-python's builder (and,
in the last tests, fetched from the real broker); the reference is
kafka-python's record-by-record iteration of the same bytes.
"""

from __future__ import annotations

import itertools
import struct
import time
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.fetcher import IsolationLevel
from kafka.errors import CorruptRecordError
from kafka.record.default_records import DefaultRecordBatch
from kafka.record.memory_records import MemoryRecords, MemoryRecordsBuilder

from finopsd.ingest.broker import ensure_topics
from finopsd.ingest.records import (
    BlockPartitionRecords,
    FetchedRecord,
    RecordBlock,
    install,
    read_blocks,
)

TP = TopicPartition("usage", 3)

_bytes = st.one_of(st.none(), st.binary(max_size=40), st.binary(min_size=100, max_size=400))
_header = st.tuples(st.text(max_size=8), st.one_of(st.none(), st.binary(max_size=20)))
_record = st.tuples(_bytes, _bytes, st.lists(_header, max_size=3), st.integers(0, 2**40))


def build_batch(
    records: list[tuple[bytes | None, bytes | None, list, int]],
    *,
    base_offset: int = 0,
    gzip: bool = False,
    gaps: list[int] | None = None,
) -> bytes:
    """One v2 batch as a broker serves it: ``base_offset`` in its header."""
    builder = MemoryRecordsBuilder(magic=2, compression_type=1 if gzip else 0, batch_size=1 << 30)
    for i, (key, value, headers, ts_delta) in enumerate(records):
        if gaps and gaps[i]:
            builder.skip(gaps[i])
        builder.append(1_700_000_000_000 + ts_delta, key, value, headers)
    builder.close()
    raw = bytearray(builder.buffer())
    struct.pack_into(">q", raw, 0, base_offset)  # not covered by the CRC, as on the wire
    return bytes(raw)


def reference(raw: bytes, first_offset: int) -> list[FetchedRecord]:
    """kafka-python's reading of a batch, from ``first_offset`` on."""
    return [
        FetchedRecord(TP.topic, TP.partition, r.offset, r.key, r.value, list(r.headers))
        for r in DefaultRecordBatch(raw)
        if r.offset >= first_offset
    ]


def block(raw: bytes, first_offset: int = 0) -> RecordBlock:
    return RecordBlock(TP.topic, TP.partition, DefaultRecordBatch(raw), first_offset)


def assert_same(blocks: list[RecordBlock], expected: list[FetchedRecord]) -> None:
    got = read_blocks(blocks)
    assert got.offsets.tolist() == [r.offset for r in expected]
    assert got.values.to_pylist() == [r.value or b"" for r in expected]
    assert [got.record(i) for i in range(len(got))] == expected
    assert got.next_offset == blocks[-1].batch.next_offset


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batches=st.lists(
        st.tuples(
            st.lists(_record, min_size=1, max_size=30),
            st.booleans(),  # gzip
            st.lists(st.integers(0, 3), min_size=30, max_size=30),  # offset gaps (compaction)
        ),
        min_size=1,
        max_size=3,
    ),
    base=st.integers(0, 2**40),
    skip=st.integers(0, 40),
)
def test_blocks_read_as_kafka_python_reads_them(batches, base, skip) -> None:
    raws, expected = [], []
    offset = base
    for records, gzip, gaps in batches:
        raw = build_batch(records, base_offset=offset, gzip=gzip, gaps=gaps)
        raws.append(raw)
        offset = DefaultRecordBatch(raw).next_offset
    first = base + skip  # a fetch that starts inside the first batch
    for raw in raws:
        expected += reference(raw, first)
    blocks = [block(raws[0], first)] + [block(r, first) for r in raws[1:]]
    assert_same(blocks, expected)


def test_short_and_long_values_around_the_inline_limit() -> None:
    records = [(None, b"x" * n, [], n) for n in range(0, 30)] + [(b"k", None, [], 0)]
    raw = build_batch(records, base_offset=7)
    assert_same([block(raw)], reference(raw, 0))


def test_large_batch_with_multibyte_lengths() -> None:
    records = [(str(i).encode(), b"{" + b"a" * (i % 9000) + b"}", [], i * 977) for i in range(500)]
    raw = build_batch(records, base_offset=2**33)
    assert_same([block(raw)], reference(raw, 0))


def test_a_corrupt_record_layout_raises_as_kafka_python_does() -> None:
    raw = bytearray(build_batch([(None, b'{"a":1}', [], 0), (None, b'{"b":2}', [], 1)]))
    # The first record's length says one byte more than it holds.
    raw[61] += 2  # zigzag: +2 is +1 in length
    with pytest.raises(CorruptRecordError):
        list(DefaultRecordBatch(bytes(raw)))
    with pytest.raises(CorruptRecordError):
        read_blocks([block(bytes(raw))])


def test_headers_that_do_not_fill_the_record_fall_back_to_kafka_python() -> None:
    raw = bytearray(build_batch([(None, b'{"a":1}', [("h", b"v")], 0)]))
    # The header count byte (after the value) says two headers where one is written.
    value_at = bytes(raw).index(b'{"a":1}')
    raw[value_at + 7] = 4
    with pytest.raises(CorruptRecordError):
        read_blocks([block(bytes(raw))])


def partition_records(raw: bytes, fetch_offset: int, **kw) -> list:
    records = MemoryRecords(raw)
    part = BlockPartitionRecords(fetch_offset, TP, records, **kw)
    return part.take(), part


def test_partition_records_yield_one_block_per_batch_and_skip_what_is_behind() -> None:
    a = build_batch([(None, b"1", [], 0), (None, b"2", [], 0)], base_offset=10)
    b = build_batch([(None, b"3", [], 0), (None, b"4", [], 0)], base_offset=12)
    blocks, part = partition_records(a + b, 12)
    assert len(blocks) == 1  # the first batch lies wholly behind the fetch position
    assert part.next_fetch_offset == 14
    assert read_blocks(blocks).values.to_pylist() == [b"3", b"4"]
    blocks, part = partition_records(a + b, 11)
    assert [bk.count_hint for bk in blocks] == [1, 2]
    assert read_blocks(blocks).offsets.tolist() == [11, 12, 13]


def test_a_corrupt_batch_fails_its_crc_on_the_polling_thread() -> None:
    raw = bytearray(build_batch([(None, b'{"a":1}', [], 0)]))
    raw[-2] ^= 0xFF
    with pytest.raises(CorruptRecordError, match="crc"):
        partition_records(bytes(raw), 0)


def test_control_batches_are_skipped() -> None:
    builder = MemoryRecordsBuilder(
        magic=2,
        compression_type=0,
        batch_size=1 << 20,
        producer_id=5,
        producer_epoch=0,
        base_sequence=0,
        transactional=True,
    )
    builder.append(0, b"\x00\x00\x00\x00", b"\x00\x00\x00\x00\x00\x00")
    builder.close()
    control = bytearray(builder.buffer())
    attributes_at = 21
    struct.pack_into(">h", control, attributes_at, 0x30)  # transactional + control
    data = build_batch([(None, b"x", [], 0)], base_offset=1)
    # the CRC covers the attributes: recompute it as a broker-written batch has it
    from kafka.record.util import calc_crc32c

    struct.pack_into(">I", control, 17, calc_crc32c(bytes(control[21:])))
    blocks, part = partition_records(
        bytes(control) + data, 0, isolation_level=IsolationLevel.READ_COMMITTED
    )
    assert [bk.batch.base_offset for bk in blocks] == [1]
    assert part.next_fetch_offset == 2


def test_legacy_message_format_is_opened_by_kafka_python() -> None:
    builder = MemoryRecordsBuilder(magic=1, compression_type=0, batch_size=1 << 20, offset=4)
    for v in (b"a", b"b", b"c"):
        builder.append(1_700_000_000_000, None, v)
    builder.close()
    blocks, part = partition_records(bytes(builder.buffer()), 5)
    got = read_blocks(blocks)
    assert got.offsets.tolist() == [5, 6]
    assert got.values.to_pylist() == [b"b", b"c"]
    assert got.record(1).value == b"c"
    assert part.next_fetch_offset == 7


@pytest.mark.parametrize("compression", [None, "gzip"])
def test_a_real_broker_fetch_read_as_blocks(broker, compression) -> None:
    topic = f"records-{uuid.uuid4().hex[:8]}"
    ensure_topics(broker.bootstrap, {topic: 1})
    producer = KafkaProducer(
        bootstrap_servers=broker.bootstrap, compression_type=compression, linger_ms=5
    )
    sent = [(f"k{i}".encode(), f'{{"n":{i}}}'.encode() * (1 + i % 40)) for i in range(3000)]
    for key, value in sent:
        producer.send(
            topic, key=key, value=value, headers=[("h", key)] if key.endswith(b"7") else []
        )
    producer.flush()
    producer.close()

    consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap, enable_auto_commit=False)
    install(consumer)
    tp = TopicPartition(topic, 0)
    consumer.assign([tp])
    consumer.seek(tp, 1234)  # inside a batch
    got = []
    deadline = time.monotonic() + 30
    while sum(len(r) for r in got) < len(sent) - 1234 and time.monotonic() < deadline:
        for blocks in consumer.poll(timeout_ms=500).values():
            got.append(read_blocks(blocks))
    consumer.close()
    offsets = list(itertools.chain.from_iterable(r.offsets.tolist() for r in got))
    values = list(itertools.chain.from_iterable(r.values.to_pylist() for r in got))
    assert offsets == list(range(1234, len(sent)))
    assert values == [v for _, v in sent[1234:]]
    first = got[0].record(3)  # offset 1237: a record with a header
    assert (first.offset, first.key, first.headers) == (1237, b"k1237", [("h", b"k1237")])


@pytest.mark.filterwarnings("ignore:value_deserializer does not implement")
def test_install_refuses_a_consumer_with_deserializers() -> None:
    consumer = KafkaConsumer(value_deserializer=bytes.decode, api_version=(2, 5))
    try:
        with pytest.raises(RuntimeError, match="deserializers"):
            install(consumer)
    finally:
        consumer.close()
