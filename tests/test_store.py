"""Store: versioned schema, atomic batch append, dedup by key within a ts window."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest

import finopsd
from finopsd.events import GpuSample, UsageEvent, _Event
from finopsd.ingest.decode import BatchDecoder
from finopsd.ingest.loadgen import UsageLoad
from finopsd.store import MIGRATIONS, DeadLetterRow, Store, StoreBatch, StoreError

START = datetime(2025, 6, 1, 8, 0, tzinfo=UTC)
WINDOW = timedelta(hours=168)
TOPIC = "llm.usage"
PACKAGE_ROOT = Path(finopsd.__path__[0]).resolve().parent


# -- helpers ----------------------------------------------------------------------------------


def usage_values(n: int, *, seed: int = 1, start: datetime = START) -> list[bytes]:
    load = UsageLoad(seed=seed, start=start, step=timedelta(seconds=1))
    return [value for _key, value in itertools.islice(load, n)]


def to_table(model: type[_Event], values: list[bytes]) -> pa.Table:
    """Decode values the way the pipeline does and hand over an Arrow table."""
    rows, rejects = BatchDecoder(model).decode(values)
    assert rejects == []
    return rows.combine_chunks()


def usage_table(n: int, *, seed: int = 1, start: datetime = START) -> pa.Table:
    return to_table(UsageEvent, usage_values(n, seed=seed, start=start))


def usage_batch(
    table: pa.Table,
    offsets: dict[tuple[str, int], int] | None = None,
    dead_letters: list[DeadLetterRow] | None = None,
    window: timedelta = WINDOW,
) -> StoreBatch:
    return StoreBatch(
        rows={UsageEvent.table: table},
        dedup={UsageEvent.table: (UsageEvent.dedup_key, window)},
        offsets=offsets or {},
        dead_letters=dead_letters or [],
    )


def count(store: Store, table: str) -> int:
    row = store.cursor().execute(f"SELECT count(*) FROM {table}").fetchone()
    assert row is not None
    return int(row[0])


def with_ids(table: pa.Table, ids: list[str]) -> pa.Table:
    i = table.schema.get_field_index("event_id")
    return table.set_column(i, "event_id", pa.array(ids, table.schema.field(i).type))


def shifted(table: pa.Table, delta: timedelta) -> pa.Table:
    """The same rows (same event ids) with every ts moved by ``delta``."""
    i = table.schema.get_field_index("ts")
    ts = [t + delta for t in table.column("ts").to_pylist()]
    return table.set_column(i, "ts", pa.array(ts, table.schema.field(i).type))


# -- schema -----------------------------------------------------------------------------------


def test_fresh_store_migrates_to_latest(tmp_path: Path) -> None:
    """A new file is created (parents too) at the latest schema version, one row per migration."""
    path = tmp_path / "deep" / "dir" / "s.duckdb"
    with Store(path) as store:
        assert store.schema_version() == len(MIGRATIONS)
        rows = store.cursor().execute("SELECT version, description FROM schema_version").fetchall()
    assert sorted(rows) == [(i + 1, desc) for i, (desc, _sql) in enumerate(MIGRATIONS)]
    assert path.is_file()


def test_reopen_does_not_reapply_migrations(tmp_path: Path) -> None:
    """Reopening keeps data and the schema_version rows; no migration runs twice."""
    path = tmp_path / "s.duckdb"
    with Store(path) as store:
        store.append(usage_batch(usage_table(10), {(TOPIC, 0): 10}))
        applied = store.cursor().execute("SELECT * FROM schema_version").fetchall()
    with Store(path) as store:
        assert store.schema_version() == len(MIGRATIONS)
        assert store.cursor().execute("SELECT * FROM schema_version").fetchall() == applied
        assert count(store, "usage_events") == 10
        assert store.stored_offsets() == {(TOPIC, 0): 10}


def test_newer_schema_version_is_refused(tmp_path: Path) -> None:
    """A file from a newer finopsd raises StoreError naming both versions, read-write or not."""
    path = tmp_path / "s.duckdb"
    future = len(MIGRATIONS) + 1
    with Store(path) as store:
        store.cursor().execute(
            "INSERT INTO schema_version VALUES (?, ?, 'from the future')", [future, START]
        )
    for read_only in (False, True):
        with pytest.raises(StoreError) as info:
            Store(path, read_only=read_only)
        message = str(info.value)
        assert f"schema version {future}" in message
        assert f"up to {len(MIGRATIONS)}" in message
        assert "Upgrade finopsd" in message
    # the refused open left the file untouched
    con = duckdb.connect(str(path), read_only=True)
    try:
        assert con.execute("SELECT max(version) FROM schema_version").fetchone() == (future,)
    finally:
        con.close()


def test_read_only_store_reads(tmp_path: Path) -> None:
    """A read-only Store (as `finopsd stats` opens it) sees counts and offsets."""
    path = tmp_path / "s.duckdb"
    dead = [DeadLetterRow(TOPIC, 1, 4, "invalid_json", "bad", 12)]
    with Store(path) as store:
        store.append(usage_batch(usage_table(7), {(TOPIC, 1): 5}, dead))
    with Store(path, read_only=True) as store:
        counts = store.counts()
        assert counts["usage_events"] == 7
        assert counts["dead_letters_by_reason"] == {"invalid_json": 1}
        assert store.stored_offsets() == {(TOPIC, 1): 5}


# -- append -----------------------------------------------------------------------------------


def test_append_writes_rows_offsets_and_dead_letters(tmp_path: Path) -> None:
    """One append stores the rows with their values, the offsets and the dead letters."""
    values = usage_values(25)
    table = to_table(UsageEvent, values)
    dead = [
        DeadLetterRow(TOPIC, 0, 3, "invalid_json", "<record>: Invalid JSON", 17),
        DeadLetterRow(TOPIC, 2, 9, "wrong_type", "gen_ai.usage.input_tokens: ...", 400),
    ]
    with Store(tmp_path / "s.duckdb") as store:
        result = store.append(usage_batch(table, {(TOPIC, 0): 20, (TOPIC, 2): 10}, dead))
        assert result.inserted == {"usage_events": 25}
        assert result.duplicates == {"usage_events": 0}
        assert store.stored_offsets() == {(TOPIC, 0): 20, (TOPIC, 2): 10}
        stored = (
            store.cursor()
            .execute(
                "SELECT event_id, ts, input_tokens, prefix_hashes, status FROM usage_events "
                "ORDER BY event_id"
            )
            .fetchall()
        )
        letters = (
            store.cursor()
            .execute(
                'SELECT topic, "partition", "offset", reason, detail, size_bytes '
                'FROM dead_letters ORDER BY "offset"'
            )
            .fetchall()
        )
    want = sorted(
        (
            (r["event_id"], r["ts"], r["input_tokens"], r["prefix_hashes"], r["status"])
            for r in (UsageEvent.model_validate_json(v).row() for v in values)
        ),
        key=lambda r: r[0],
    )
    assert stored == want
    assert letters == [
        (d.topic, d.partition, d.offset, d.reason, d.detail, d.size_bytes) for d in dead
    ]


def test_append_empty_batch_only_moves_offsets(tmp_path: Path) -> None:
    """A batch of only refused records still stores its offsets and dead letters."""
    with Store(tmp_path / "s.duckdb") as store:
        result = store.append(
            StoreBatch(
                offsets={(TOPIC, 3): 42},
                dead_letters=[DeadLetterRow(TOPIC, 3, 41, "not_an_object", "x", 2)],
            )
        )
        assert result.inserted == {}
        assert store.stored_offsets() == {(TOPIC, 3): 42}
        assert count(store, "dead_letters") == 1


def test_stored_offsets_are_the_last_written(tmp_path: Path) -> None:
    """stored_offsets: per (topic, partition), the offset of the latest batch that covered it."""
    with Store(tmp_path / "s.duckdb") as store:
        assert store.stored_offsets() == {}
        store.append(usage_batch(usage_table(3), {(TOPIC, 0): 3, (TOPIC, 1): 7}))
        store.append(usage_batch(usage_table(3, seed=2), {(TOPIC, 1): 12, ("gpu.metrics", 0): 5}))
        store.append(StoreBatch(offsets={(TOPIC, 0): 8}))
        assert store.stored_offsets() == {(TOPIC, 0): 8, (TOPIC, 1): 12, ("gpu.metrics", 0): 5}
        assert store.stored_offsets([TOPIC]) == {(TOPIC, 0): 8, (TOPIC, 1): 12}
        assert store.stored_offsets([]) == {}


def _null_request_model(table: pa.Table) -> pa.Table:
    """The table with request_model NULL in its last row (the column is NOT NULL)."""
    i = table.schema.get_field_index("request_model")
    models = table.column("request_model").to_pylist()
    models[-1] = None
    return table.set_column(i, "request_model", pa.array(models, table.schema.field(i).type))


def test_failed_append_leaves_nothing(tmp_path: Path) -> None:
    """If an insert fails mid-transaction, none of the batch is visible: rows, offsets, letters."""
    gpu = to_table(
        GpuSample,
        [
            json.dumps(
                {"ts": "2025-06-01T08:00:00Z", "host": "n1", "gpu_index": i, "utilization_pct": 50}
            ).encode()
            for i in range(4)
        ],
    )
    with Store(tmp_path / "s.duckdb") as store:
        store.append(usage_batch(usage_table(10), {(TOPIC, 0): 10}))
        before = store.counts()
        bad = StoreBatch(
            # gpu rows first: they are inserted before the usage insert fails
            rows={
                GpuSample.table: gpu,
                UsageEvent.table: _null_request_model(usage_table(5, seed=9)),
            },
            dedup={
                GpuSample.table: (GpuSample.dedup_key, WINDOW),
                UsageEvent.table: (UsageEvent.dedup_key, WINDOW),
            },
            offsets={(TOPIC, 0): 15, (TOPIC, 1): 99},
            dead_letters=[DeadLetterRow(TOPIC, 0, 12, "invalid_json", "x", 3)],
        )
        with pytest.raises(duckdb.Error):
            store.append(bad)
        assert store.counts() == before
        assert count(store, "gpu_samples") == 0
        assert store.stored_offsets() == {(TOPIC, 0): 10}
        # the store is still usable, and the same batch goes in once fixed
        fixed = StoreBatch(
            rows={GpuSample.table: gpu, UsageEvent.table: usage_table(5, seed=9)},
            dedup=bad.dedup,
            offsets=bad.offsets,
            dead_letters=bad.dead_letters,
        )
        result = store.append(fixed)
        assert result.inserted == {"gpu_samples": 4, "usage_events": 5}
        assert store.stored_offsets() == {(TOPIC, 0): 15, (TOPIC, 1): 99}


def test_failed_append_reports_the_real_cause(tmp_path: Path) -> None:
    """The exception a failed append raises is the constraint violation, naming the column.

    (Not a follow-on "transaction is aborted" error from cleanup, which says nothing useful.)
    """
    with Store(tmp_path / "s.duckdb") as store:
        with pytest.raises(duckdb.Error) as info:
            store.append(usage_batch(_null_request_model(usage_table(3)), {(TOPIC, 0): 3}))
        assert isinstance(info.value, duckdb.ConstraintException), repr(info.value)
        assert "request_model" in str(info.value)


# -- dedup ------------------------------------------------------------------------------------


def test_same_batch_twice_is_stored_once(tmp_path: Path) -> None:
    """A re-read batch (same event ids, same ts) is skipped and reported as duplicates."""
    table = usage_table(50)
    with Store(tmp_path / "s.duckdb") as store:
        first = store.append(usage_batch(table, {(TOPIC, 0): 50}))
        again = store.append(usage_batch(table, {(TOPIC, 0): 50}))
        assert first.inserted == {"usage_events": 50} and first.duplicates == {"usage_events": 0}
        assert again.inserted == {"usage_events": 0} and again.duplicates == {"usage_events": 50}
        assert count(store, "usage_events") == 50


def test_partial_overlap_inserts_only_new_rows(tmp_path: Path) -> None:
    """A batch half made of resends stores the new half only."""
    table = usage_table(40)
    with Store(tmp_path / "s.duckdb") as store:
        store.append(usage_batch(table.slice(0, 20)))
        result = store.append(usage_batch(table.slice(10, 30)))
        assert result.inserted == {"usage_events": 20}
        assert result.duplicates == {"usage_events": 10}
        ids = [r[0] for r in store.cursor().execute("SELECT event_id FROM usage_events").fetchall()]
    assert sorted(ids) == sorted(table.column("event_id").to_pylist())


@pytest.mark.parametrize(
    ("delta", "window", "stored_again"),
    [
        (timedelta(hours=1), timedelta(hours=2), False),
        (timedelta(hours=-1), timedelta(hours=2), False),
        (timedelta(hours=2), timedelta(hours=2), False),  # the window's edge is inside
        (timedelta(hours=2, microseconds=1), timedelta(hours=2), True),
        (timedelta(hours=-3), timedelta(hours=2), True),
        (timedelta(0), timedelta(0), False),
        (timedelta(microseconds=1), timedelta(0), True),
        (WINDOW + timedelta(seconds=1), WINDOW, True),
    ],
)
def test_dedup_window(
    tmp_path: Path, delta: timedelta, window: timedelta, stored_again: bool
) -> None:
    """A resend (same event_id) whose ts is within the window of the stored copy's is skipped;
    one further away is stored again."""
    table = usage_table(1)
    with Store(tmp_path / "s.duckdb") as store:
        store.append(usage_batch(table, window=window))
        result = store.append(usage_batch(shifted(table, delta), window=window))
        n = count(store, "usage_events")
    assert result.inserted == {"usage_events": 1 if stored_again else 0}
    assert result.duplicates == {"usage_events": 0 if stored_again else 1}
    assert n == (2 if stored_again else 1)


def test_dedup_window_is_measured_from_the_batch_range(tmp_path: Path) -> None:
    """The window extends the batch's own [min ts, max ts]: a stored copy anywhere in that
    range (plus the window) makes a row a duplicate, even if far from that row's own ts.

    This documents StoreBatch's contract ("within the window of the batch's own
    timestamps"); it is wider than a per-row window.
    """
    window = timedelta(hours=1)
    early = usage_table(1, seed=3, start=START)
    with Store(tmp_path / "s.duckdb") as store:
        store.append(usage_batch(early, window=window))
        # the resend of `early` is 10 h later than its first copy: alone, it is new ...
        resend = shifted(early, timedelta(hours=10))
        # ... but in a batch that also holds an event at START, the range covers the first copy
        companion = usage_table(1, seed=4, start=START)
        both = pa.concat_tables([resend, companion])
        result = store.append(usage_batch(both, window=window))
        assert result.inserted == {"usage_events": 1}
        assert result.duplicates == {"usage_events": 1}
        alone = store.append(usage_batch(resend, window=window))
        assert alone.inserted == {"usage_events": 1}


def test_different_ids_same_ts_are_all_stored(tmp_path: Path) -> None:
    """Dedup is by event_id, not by content: new ids with identical ts are new events."""
    table = usage_table(5)
    with Store(tmp_path / "s.duckdb") as store:
        store.append(usage_batch(table))
        result = store.append(usage_batch(with_ids(table, [f"other-{i}" for i in range(5)])))
        assert result.inserted == {"usage_events": 5}
        assert count(store, "usage_events") == 10


def _gpu(host: str, index: int, ts: str, util: float = 10.0) -> bytes:
    return json.dumps(
        {"ts": ts, "host": host, "gpu_index": index, "utilization_pct": util}
    ).encode()


def test_gpu_samples_dedup_on_host_index_ts(tmp_path: Path) -> None:
    """A GPU sample is a duplicate only when host, gpu_index and ts all match."""
    t0, t1 = "2025-06-01T08:00:00Z", "2025-06-01T08:00:01Z"
    first = [_gpu("n1", 0, t0), _gpu("n1", 1, t0)]
    second = [
        _gpu("n1", 0, t0, util=99.0),  # same key, other value: a duplicate
        _gpu("n2", 0, t0),  # other host
        _gpu("n1", 2, t0),  # other gpu
        _gpu("n1", 0, t1),  # other ts
        _gpu("n1", 1, "2025-06-01T10:00:00+02:00"),  # same instant, other offset: a duplicate
    ]
    dedup = {GpuSample.table: (GpuSample.dedup_key, timedelta(hours=1))}
    with Store(tmp_path / "s.duckdb") as store:
        store.append(StoreBatch(rows={"gpu_samples": to_table(GpuSample, first)}, dedup=dedup))
        result = store.append(
            StoreBatch(rows={"gpu_samples": to_table(GpuSample, second)}, dedup=dedup)
        )
        assert result.inserted == {"gpu_samples": 3}
        assert result.duplicates == {"gpu_samples": 2}
        rows = (
            store.cursor()
            .execute(
                "SELECT host, gpu_index, utilization_pct FROM gpu_samples "
                "WHERE host = 'n1' AND gpu_index = 0 ORDER BY ts"
            )
            .fetchall()
        )
    assert rows == [("n1", 0, 10.0), ("n1", 0, 10.0)]  # the first copy's value is kept


# -- one process owns the file ----------------------------------------------------------------


def test_second_process_cannot_open_held_store(tmp_path: Path) -> None:
    """While this process holds the store, another process's read-only open raises StoreError."""
    path = tmp_path / "s.duckdb"
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(PACKAGE_ROOT)!r})
        from finopsd.store import Store, StoreError
        try:
            Store({str(path)!r}, read_only=True)
        except StoreError as exc:
            print("StoreError:", exc)
            sys.exit(3)
        print("opened")
        """
    )
    with Store(path) as store:
        store.append(usage_batch(usage_table(2)))
        held = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
        )
    assert held.returncode == 3, held.stdout + held.stderr
    assert str(path) in held.stdout
    assert "Traceback" not in held.stderr
    # once released, the other process can open it
    free = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert free.returncode == 0, free.stdout + free.stderr
    assert "opened" in free.stdout


_V1_THEN_CRASH = """
import os, sys
import duckdb
from finopsd.store import MIGRATIONS, Store
path = sys.argv[1]
con = duckdb.connect(path)
con.execute(
    "CREATE TABLE schema_version (version INTEGER PRIMARY KEY, "
    "applied_at TIMESTAMPTZ NOT NULL, description VARCHAR NOT NULL)"
)
con.execute(MIGRATIONS[0][1])
con.execute("INSERT INTO schema_version VALUES (1, now(), 'v1')")
con.execute(
    "INSERT INTO usage_events (event_id, ts, request_model, input_tokens, output_tokens, "
    "status, latency_class, cost_usd) VALUES ('old', now(), 'm', 1, 2, 'ok', 'interactive', 0.5)"
)
con.close()
store = Store(path)  # migrates to the current version
store.cursor().execute(
    "INSERT INTO usage_events (event_id, ts, request_model, input_tokens, output_tokens, "
    "status, latency_class) VALUES ('new', now(), 'm', 1, 2, 'ok', 'interactive')"
)
os._exit(0)  # no clean close: what follows the migration is only in the WAL
"""


def test_upgrade_from_version_1_survives_a_crash(tmp_path: Path) -> None:
    """A version-1 store with rows migrates (the gateway's cost_usd becomes gateway_cost_usd);
    a process killed right after still leaves a store that opens, with every committed row."""
    path = tmp_path / "v1.duckdb"
    done = subprocess.run(
        [sys.executable, "-c", _V1_THEN_CRASH, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    with Store(path) as store:
        assert store.schema_version() == len(MIGRATIONS)
        rows = (
            store.cursor()
            .execute(
                "SELECT event_id, gateway_cost_usd, billing_mode, cost_usd FROM usage_events "
                "ORDER BY event_id"
            )
            .fetchall()
        )
    assert rows == [("new", None, "standard", None), ("old", 0.5, "standard", None)]


def test_store_settings_reach_duckdb(tmp_path: Path) -> None:
    with Store(tmp_path / "s.duckdb", threads=1, vacuum_tasks=0) as store:
        settings = dict(
            store.cursor()
            .execute(
                "SELECT name, value FROM duckdb_settings() "
                "WHERE name IN ('threads', 'max_vacuum_tasks')"
            )
            .fetchall()
        )
    assert settings == {"threads": "1", "max_vacuum_tasks": "0"}
