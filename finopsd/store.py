"""The DuckDB store: versioned schema, batch append with exactly-once effect.

One process owns the file (DuckDB allows one writer; another process cannot
even open it read-only meanwhile). Threads of that process share it through
``Store.cursor()``.

``append(batch)`` writes a batch's rows, its dead-letter records and the next
Kafka offset of every partition it covers in ONE transaction. Rows whose
dedup key is already stored are skipped, so a producer's resend, or a batch
re-read after a crash, never counts twice.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from finopsd.actions.schema import ACTIONS_TABLES, SLACK_TABLES

log = logging.getLogger(__name__)

T = TypeVar("T")


def utc_floor(expr: str, seconds: int) -> str:
    """SQL: the TIMESTAMPTZ ``expr`` floored to a multiple of ``seconds`` since the epoch
    (3600: its UTC hour), whatever the connection's TimeZone says."""
    return f"to_timestamp(floor(epoch({expr}) / {seconds}) * {seconds})"


MIGRATIONS: list[tuple[str, str]] = [
    (
        "usage events, gpu samples, dead letters, ingest offsets",
        """
        CREATE TABLE usage_events (
            event_id VARCHAR NOT NULL,
            ts TIMESTAMPTZ NOT NULL,
            provider VARCHAR,
            request_model VARCHAR NOT NULL,
            response_model VARCHAR,
            input_tokens BIGINT NOT NULL,
            output_tokens BIGINT NOT NULL,
            cache_read_input_tokens BIGINT,
            cache_creation_input_tokens BIGINT,
            reasoning_output_tokens BIGINT,
            tenant VARCHAR,
            team VARCHAR,
            app VARCHAR,
            feature VARCHAR,
            latency_ms DOUBLE,
            ttft_ms DOUBLE,
            status VARCHAR NOT NULL,
            prompt_hash VARCHAR,
            prefix_hashes BIGINT[],
            latency_class VARCHAR NOT NULL,
            quality_score DOUBLE,
            cost_usd DOUBLE,
            ingested_at TIMESTAMPTZ NOT NULL DEFAULT current_timestamp
        );
        CREATE TABLE gpu_samples (
            ts TIMESTAMPTZ NOT NULL,
            host VARCHAR NOT NULL,
            gpu_index BIGINT NOT NULL,
            gpu_uuid VARCHAR,
            gpu_model VARCHAR,
            utilization_pct DOUBLE NOT NULL,
            memory_used_bytes BIGINT,
            memory_total_bytes BIGINT,
            power_watts DOUBLE,
            deployment VARCHAR,
            tenant VARCHAR,
            team VARCHAR,
            ingested_at TIMESTAMPTZ NOT NULL DEFAULT current_timestamp
        );
        CREATE TABLE dead_letters (
            received_at TIMESTAMPTZ NOT NULL,
            topic VARCHAR NOT NULL,
            "partition" INTEGER NOT NULL,
            "offset" BIGINT NOT NULL,
            reason VARCHAR NOT NULL,
            detail VARCHAR NOT NULL,
            size_bytes BIGINT NOT NULL
        );
        CREATE TABLE ingest_offsets (
            topic VARCHAR NOT NULL,
            "partition" INTEGER NOT NULL,
            next_offset BIGINT NOT NULL,
            updated_at TIMESTAMPTZ NOT NULL,
            PRIMARY KEY (topic, "partition")
        );
        """,
    ),
    (
        "prices: cost columns on usage events, self-hosted deployment hours",
        """
        CREATE TABLE usage_events_v1 AS SELECT * FROM usage_events;
        DROP TABLE usage_events;
        CREATE TABLE usage_events (
            event_id VARCHAR NOT NULL,
            ts TIMESTAMPTZ NOT NULL,
            provider VARCHAR,
            request_model VARCHAR NOT NULL,
            response_model VARCHAR,
            input_tokens BIGINT NOT NULL,
            output_tokens BIGINT NOT NULL,
            cache_read_input_tokens BIGINT,
            cache_creation_input_tokens BIGINT,
            reasoning_output_tokens BIGINT,
            tenant VARCHAR,
            team VARCHAR,
            app VARCHAR,
            feature VARCHAR,
            latency_ms DOUBLE,
            ttft_ms DOUBLE,
            status VARCHAR NOT NULL,
            prompt_hash VARCHAR,
            prefix_hashes BIGINT[],
            latency_class VARCHAR NOT NULL,
            quality_score DOUBLE,
            gateway_cost_usd DOUBLE,
            deployment VARCHAR,
            billing_mode VARCHAR NOT NULL DEFAULT 'standard',
            input_cost_usd DOUBLE,
            cached_input_cost_usd DOUBLE,
            cache_write_cost_usd DOUBLE,
            output_cost_usd DOUBLE,
            list_cost_usd DOUBLE,
            discount_rate DOUBLE,
            cost_usd DOUBLE,
            price_source VARCHAR,
            price_id VARCHAR,
            ingested_at TIMESTAMPTZ NOT NULL DEFAULT current_timestamp
        );
        INSERT INTO usage_events BY NAME
        SELECT * EXCLUDE (cost_usd), cost_usd AS gateway_cost_usd FROM usage_events_v1;
        DROP TABLE usage_events_v1;
        CREATE TABLE deployment_hours (
            deployment VARCHAR NOT NULL,
            hour TIMESTAMPTZ NOT NULL,
            gpu_type VARCHAR NOT NULL,
            gpus INTEGER NOT NULL,
            gpu_hour_usd DOUBLE NOT NULL,
            cost_usd DOUBLE NOT NULL,
            requests BIGINT NOT NULL,
            tokens BIGINT NOT NULL,
            settled_at TIMESTAMPTZ NOT NULL,
            PRIMARY KEY (deployment, hour)
        );
        """,
    ),
    (
        "analyzers: findings, runs, spend rollups",
        """
        CREATE TABLE findings (
            id VARCHAR PRIMARY KEY,
            analyzer VARCHAR NOT NULL,
            kind VARCHAR NOT NULL,
            scope JSON NOT NULL,
            title VARCHAR NOT NULL,
            evidence JSON NOT NULL,
            window_start TIMESTAMPTZ NOT NULL,
            window_end TIMESTAMPTZ NOT NULL,
            monthly_savings_usd DOUBLE NOT NULL,
            savings_method VARCHAR NOT NULL,
            confidence DOUBLE NOT NULL,
            risk VARCHAR NOT NULL,
            action JSON,
            first_seen TIMESTAMPTZ NOT NULL,
            last_seen TIMESTAMPTZ NOT NULL,
            times_seen INTEGER NOT NULL,
            status VARCHAR NOT NULL
        );
        CREATE TABLE analyzer_runs (
            analyzer VARCHAR NOT NULL,
            ran_at TIMESTAMPTZ NOT NULL,
            seconds DOUBLE NOT NULL,
            findings INTEGER NOT NULL,
            error VARCHAR
        );
        CREATE TABLE rollup_state (
            name VARCHAR PRIMARY KEY,
            watermark TIMESTAMPTZ
        );
        CREATE TABLE spend_hourly (
            hour TIMESTAMPTZ NOT NULL,
            tenant VARCHAR,
            team VARCHAR,
            app VARCHAR,
            feature VARCHAR,
            provider VARCHAR,
            model VARCHAR NOT NULL,
            deployment VARCHAR,
            latency_class VARCHAR NOT NULL,
            billing_mode VARCHAR NOT NULL,
            status VARCHAR NOT NULL,
            requests BIGINT NOT NULL,
            input_tokens BIGINT NOT NULL,
            output_tokens BIGINT NOT NULL,
            cache_read_tokens BIGINT NOT NULL,
            cache_write_tokens BIGINT NOT NULL,
            cost_usd DOUBLE NOT NULL,
            list_cost_usd DOUBLE NOT NULL,
            unpriced_requests BIGINT NOT NULL,
            latency_ms_sum DOUBLE NOT NULL,
            quality_sum DOUBLE NOT NULL,
            quality_n BIGINT NOT NULL
        );
        CREATE VIEW spend_daily AS
        SELECT to_timestamp(floor(epoch(hour) / 86400) * 86400) AS day,
               tenant, team, app, feature, provider, model, deployment,
               latency_class, billing_mode, status,
               sum(requests) AS requests, sum(input_tokens) AS input_tokens,
               sum(output_tokens) AS output_tokens, sum(cache_read_tokens) AS cache_read_tokens,
               sum(cache_write_tokens) AS cache_write_tokens, sum(cost_usd) AS cost_usd,
               sum(list_cost_usd) AS list_cost_usd, sum(unpriced_requests) AS unpriced_requests,
               sum(latency_ms_sum) AS latency_ms_sum, sum(quality_sum) AS quality_sum,
               sum(quality_n) AS quality_n
        FROM spend_hourly
        GROUP BY ALL;
        CREATE TABLE spend_forecast (  -- analyzers/forecast.py: month-end forecasts
            month DATE NOT NULL,
            tenant VARCHAR NOT NULL,  -- '*': all tenants
            computed_at TIMESTAMPTZ NOT NULL,
            month_to_date_usd DOUBLE NOT NULL,
            forecast_usd DOUBLE NOT NULL,
            low_usd DOUBLE NOT NULL,
            high_usd DOUBLE NOT NULL,
            level DOUBLE NOT NULL,
            fit_days INTEGER NOT NULL,
            slope_usd_per_day DOUBLE NOT NULL,
            budget_usd DOUBLE,
            PRIMARY KEY (month, tenant)
        );
        CREATE TABLE gpu_hourly (  -- analyzers/gpu.py: gpu_samples per deployment, hour, GPU
            deployment VARCHAR NOT NULL,
            hour TIMESTAMPTZ NOT NULL,
            host VARCHAR NOT NULL,
            gpu_index BIGINT NOT NULL,
            samples BIGINT NOT NULL,
            utilization_sum DOUBLE NOT NULL,
            memory_samples BIGINT NOT NULL,
            memory_ratio_sum DOUBLE NOT NULL
        );
        CREATE TABLE waste_retries (  -- analyzers/waste.py: requests re-sent after an error
            event_id VARCHAR PRIMARY KEY,
            ts TIMESTAMPTZ NOT NULL,
            tenant VARCHAR,
            app VARCHAR,
            feature VARCHAR,
            model VARCHAR NOT NULL,
            status VARCHAR NOT NULL,
            input_tokens BIGINT NOT NULL,
            output_tokens BIGINT NOT NULL,
            cost_usd DOUBLE,
            gap_s DOUBLE NOT NULL  -- seconds since the latest error with the same prompt
        );
        CREATE TABLE model_evaluations (  -- offline eval results; analyzers/routing.py reads
            model VARCHAR NOT NULL,
            feature VARCHAR,
            quality DOUBLE NOT NULL,  -- mean quality score, 0..1
            samples BIGINT,
            updated_at TIMESTAMPTZ NOT NULL
        );
        CREATE TABLE routing_stats (  -- analyzers/routing.py: latency/outcome histograms
            day TIMESTAMPTZ NOT NULL,
            model VARCHAR NOT NULL,
            feature VARCHAR,
            metric VARCHAR NOT NULL,  -- 'latency': floor(ln ms * 20), 'quality': floor(q * 100)
            bucket INTEGER NOT NULL,  -- quality bucket -1: status error
            n DOUBLE NOT NULL  -- events (scaled up when the first build sampled)
        );
        CREATE TABLE routing_daily (  -- analyzers/routing.py: spend_hourly per day and scope
            day TIMESTAMPTZ NOT NULL,
            tenant VARCHAR,
            app VARCHAR,
            feature VARCHAR NOT NULL,
            model VARCHAR NOT NULL,
            provider VARCHAR,
            deployment VARCHAR,
            requests BIGINT NOT NULL,
            input_tokens BIGINT NOT NULL,
            output_tokens BIGINT NOT NULL,
            cache_read_tokens BIGINT NOT NULL,
            cache_write_tokens BIGINT NOT NULL,
            cost_usd DOUBLE NOT NULL,
            list_cost_usd DOUBLE NOT NULL,
            quality_sum DOUBLE NOT NULL,
            quality_n BIGINT NOT NULL,
            priced_cost_usd DOUBLE NOT NULL,  -- over hours without unpriced requests
            priced_tokens BIGINT NOT NULL  -- their input + output tokens
        );
        CREATE TABLE batch_hourly (  -- analyzers/batch.py: standard-billed spend_hourly
            hour TIMESTAMPTZ NOT NULL,
            tenant VARCHAR,
            app VARCHAR,
            feature VARCHAR,  -- feature, provider, model, deployment: NULL for interactive
            provider VARCHAR,
            model VARCHAR,
            deployment VARCHAR,
            latency_class VARCHAR NOT NULL,
            requests BIGINT NOT NULL,
            cost_usd DOUBLE NOT NULL,
            unpriced_requests BIGINT NOT NULL
        );
        CREATE TABLE caching_response_hourly (  -- analyzers/caching.py: exact prompt repeats
            hour TIMESTAMPTZ NOT NULL,
            tenant VARCHAR,
            app VARCHAR,
            feature VARCHAR,
            deployment VARCHAR,  -- set: self-hosted, priced from deployment_hours when read
            requests BIGINT NOT NULL,  -- requests with a prompt_hash
            cost_usd DOUBLE NOT NULL,  -- their known cost (API requests only)
            tokens BIGINT NOT NULL,  -- their input + output tokens
            repeat_requests BIGINT NOT NULL,  -- answered successfully before, within the TTL
            repeat_cost_usd DOUBLE NOT NULL,
            repeat_tokens BIGINT NOT NULL,
            repeat_unpriced BIGINT NOT NULL  -- API repeats without a cost
        );
        CREATE TABLE caching_prompts (  -- analyzers/caching.py: last good answer per prompt key
            k UBIGINT NOT NULL,  -- hash(tenant, app, feature, model, prompt_hash)
            last_ok TIMESTAMPTZ NOT NULL  -- only keys still within the TTL are kept
        );
        CREATE TABLE caching_prefix_hourly (  -- analyzers/caching.py: prefix-cache hit tokens
            hour TIMESTAMPTZ NOT NULL,
            provider VARCHAR,
            model VARCHAR NOT NULL,
            deployment VARCHAR,
            billing_mode VARCHAR NOT NULL,
            requests BIGINT NOT NULL,  -- requests with prefix_hashes
            input_tokens BIGINT NOT NULL,
            cache_read_tokens BIGINT NOT NULL,
            unbounded_hit_tokens BIGINT NOT NULL,
            unbounded_extra_tokens BIGINT NOT NULL,  -- hits beyond the request's cache reads
            lru_hit_tokens BIGINT NOT NULL,
            lru_extra_tokens BIGINT NOT NULL
        );
        CREATE TABLE caching_blocks (  -- analyzers/caching.py: unbounded cache, blocks seen
            scope BIGINT NOT NULL,  -- the cache: 64-bit BLAKE2b of "model=..."/"deployment=..."
            block BIGINT NOT NULL
        );
        CREATE TABLE caching_lru (  -- analyzers/caching.py: LRU caches = top blocks by seq
            scope BIGINT NOT NULL,
            block BIGINT NOT NULL,
            seq BIGINT NOT NULL  -- an access number; a block's latest row is its last access
        );
        """,
    ),
    (
        "usage events: response-cache hits, the price catalog that priced each event",
        """
        CREATE TABLE usage_events_v3 AS SELECT * FROM usage_events;
        DROP TABLE usage_events;
        CREATE TABLE usage_events (
            event_id VARCHAR NOT NULL,
            ts TIMESTAMPTZ NOT NULL,
            provider VARCHAR,
            request_model VARCHAR NOT NULL,
            response_model VARCHAR,
            input_tokens BIGINT NOT NULL,
            output_tokens BIGINT NOT NULL,
            cache_read_input_tokens BIGINT,
            cache_creation_input_tokens BIGINT,
            reasoning_output_tokens BIGINT,
            tenant VARCHAR,
            team VARCHAR,
            app VARCHAR,
            feature VARCHAR,
            latency_ms DOUBLE,
            ttft_ms DOUBLE,
            status VARCHAR NOT NULL,
            prompt_hash VARCHAR,
            prefix_hashes BIGINT[],
            latency_class VARCHAR NOT NULL,
            quality_score DOUBLE,
            gateway_cost_usd DOUBLE,
            deployment VARCHAR,
            billing_mode VARCHAR NOT NULL DEFAULT 'standard',
            cache_hit BOOLEAN NOT NULL DEFAULT false,  -- answered from the gateway's cache
            input_cost_usd DOUBLE,
            cached_input_cost_usd DOUBLE,
            cache_write_cost_usd DOUBLE,
            output_cost_usd DOUBLE,
            list_cost_usd DOUBLE,
            discount_rate DOUBLE,
            cost_usd DOUBLE,
            price_source VARCHAR,
            price_id VARCHAR,
            price_catalog VARCHAR,  -- the catalog (and version) that priced it: reprice
            ingested_at TIMESTAMPTZ NOT NULL DEFAULT current_timestamp
        );
        INSERT INTO usage_events BY NAME SELECT * FROM usage_events_v3;
        DROP TABLE usage_events_v3;
        """,
    ),
    (
        "routing: histograms and evaluations per tenant and app, not pooled across them",
        """
        DROP TABLE routing_stats;
        CREATE TABLE routing_stats (  -- analyzers/routing.py: latency/outcome histograms
            day TIMESTAMPTZ NOT NULL,
            tenant VARCHAR,
            app VARCHAR,
            feature VARCHAR NOT NULL,
            model VARCHAR NOT NULL,
            metric VARCHAR NOT NULL,  -- 'latency': floor(ln ms * 20), 'quality': floor(q * 100)
            bucket INTEGER NOT NULL,  -- quality bucket -1: status error
            n DOUBLE NOT NULL  -- events (scaled up when the first build sampled)
        );
        DELETE FROM rollup_state WHERE name = 'routing';  -- the next run rebuilds both tables
        CREATE TABLE model_evaluations_unscoped AS SELECT * FROM model_evaluations;
        DROP TABLE model_evaluations;
        CREATE TABLE model_evaluations (  -- offline eval results per tenant, app, feature, model
            tenant VARCHAR,  -- NULL: for traffic without a tenant tag (not: any tenant)
            app VARCHAR,
            feature VARCHAR,
            model VARCHAR NOT NULL,
            quality DOUBLE NOT NULL,  -- mean quality score, 0..1
            samples BIGINT,
            updated_at TIMESTAMPTZ NOT NULL
        );
        INSERT INTO model_evaluations BY NAME SELECT * FROM model_evaluations_unscoped;
        DROP TABLE model_evaluations_unscoped;
        """,
    ),
    (
        "caching: prefix caches expire after their provider's TTL and count cache writes; "
        "the caching simulation starts again",
        """
        DROP TABLE caching_prefix_hourly;
        CREATE TABLE caching_prefix_hourly (  -- analyzers/caching.py: prefix-cache hit tokens
            hour TIMESTAMPTZ NOT NULL,
            provider VARCHAR,
            model VARCHAR NOT NULL,
            deployment VARCHAR,
            billing_mode VARCHAR NOT NULL,
            requests BIGINT NOT NULL,  -- requests with prefix_hashes
            input_tokens BIGINT NOT NULL,
            cache_read_tokens BIGINT NOT NULL,
            unbounded_hit_tokens BIGINT NOT NULL,
            unbounded_extra_tokens BIGINT NOT NULL,  -- hits beyond the request's cache reads
            lru_hit_tokens BIGINT NOT NULL,
            lru_extra_tokens BIGINT NOT NULL,
            cache_write_tokens BIGINT NOT NULL,  -- billed as cache writes
            lru_write_tokens BIGINT NOT NULL,  -- the LRU's writes: prefix tokens not hit
            lru_write_extra_tokens BIGINT NOT NULL  -- writes beyond the request's cache writes
        );
        DROP TABLE caching_lru;
        CREATE TABLE caching_lru (  -- analyzers/caching.py: LRU caches = top blocks by seq
            scope BIGINT NOT NULL,
            block BIGINT NOT NULL,
            seq BIGINT NOT NULL,  -- an access number; a block's latest row is its last access
            at_us BIGINT NOT NULL  -- that access's ts, microseconds since the epoch (TTL)
        );
        -- the simulated state without TTLs no longer applies: the next run backfills
        DELETE FROM caching_blocks;
        DELETE FROM caching_response_hourly;
        DELETE FROM caching_prompts;
        DELETE FROM rollup_state WHERE name IN ('caching', 'caching.since');
        """,
    ),
    (
        "findings: the evidence a finding stands on, provisional, the savings interval",
        """
        CREATE TABLE findings_v6 AS SELECT * FROM findings;
        DROP TABLE findings;
        CREATE TABLE findings (
            id VARCHAR PRIMARY KEY,
            analyzer VARCHAR NOT NULL,
            kind VARCHAR NOT NULL,
            scope JSON NOT NULL,
            title VARCHAR NOT NULL,
            evidence JSON NOT NULL,
            window_start TIMESTAMPTZ NOT NULL,
            window_end TIMESTAMPTZ NOT NULL,
            monthly_savings_usd DOUBLE NOT NULL,
            savings_method VARCHAR NOT NULL,
            confidence DOUBLE NOT NULL,
            risk VARCHAR NOT NULL,
            action JSON,
            first_seen TIMESTAMPTZ NOT NULL,
            last_seen TIMESTAMPTZ NOT NULL,
            times_seen INTEGER NOT NULL,
            status VARCHAR NOT NULL,
            monthly_savings_low_usd DOUBLE NOT NULL,  -- the projection's interval
            monthly_savings_high_usd DOUBLE NOT NULL,
            evidence_hours DOUBLE NOT NULL,  -- span of the traffic the figure stands on
            evidence_requests BIGINT NOT NULL,
            provisional BOOLEAN NOT NULL  -- short evidence: shown, never acted on
        );
        INSERT INTO findings BY NAME
        SELECT *, monthly_savings_usd AS monthly_savings_low_usd,
               monthly_savings_usd AS monthly_savings_high_usd,
               0.0 AS evidence_hours, 0 AS evidence_requests, true AS provisional
        FROM findings_v6;  -- evidence not recorded before: provisional until found again
        DROP TABLE findings_v6;
        """,
    ),
    (
        "routing: the first and last hour of each scope's traffic per day (evidence span)",
        """
        DROP TABLE routing_daily;
        CREATE TABLE routing_daily (  -- analyzers/routing.py: spend_hourly per day and scope
            day TIMESTAMPTZ NOT NULL,
            tenant VARCHAR,
            app VARCHAR,
            feature VARCHAR NOT NULL,
            model VARCHAR NOT NULL,
            provider VARCHAR,
            deployment VARCHAR,
            requests BIGINT NOT NULL,
            input_tokens BIGINT NOT NULL,
            output_tokens BIGINT NOT NULL,
            cache_read_tokens BIGINT NOT NULL,
            cache_write_tokens BIGINT NOT NULL,
            cost_usd DOUBLE NOT NULL,
            list_cost_usd DOUBLE NOT NULL,
            quality_sum DOUBLE NOT NULL,
            quality_n BIGINT NOT NULL,
            priced_cost_usd DOUBLE NOT NULL,  -- over hours without unpriced requests
            priced_tokens BIGINT NOT NULL,  -- their input + output tokens
            first_hour TIMESTAMPTZ NOT NULL,  -- the day's first and last hour with requests
            last_hour TIMESTAMPTZ NOT NULL
        );
        DELETE FROM rollup_state WHERE name = 'routing';  -- the next run rebuilds both tables
        """,
    ),
    (
        "waste: the failed requests that were retried, with their cost",
        """
        CREATE TABLE waste_retried_errors (  -- analyzers/waste.py: failed requests re-sent
            event_id VARCHAR PRIMARY KEY,  -- the failed request
            ts TIMESTAMPTZ NOT NULL,
            tenant VARCHAR,
            app VARCHAR,
            feature VARCHAR,
            model VARCHAR NOT NULL,
            cost_usd DOUBLE,
            gap_s DOUBLE NOT NULL  -- seconds to the first request re-sending its prompt
        );
        DELETE FROM waste_retries;
        DELETE FROM rollup_state WHERE name = 'waste';  -- the next run rebuilds both tables
        """,
    ),
    (
        "caching: a cache write is charged only on prompt blocks that are used again; "
        "the caching simulation starts again",
        """
        CREATE TABLE caching_shared_blocks (  -- analyzers/caching.py: blocks seen twice
            scope BIGINT NOT NULL,
            block BIGINT NOT NULL
        );
        DELETE FROM caching_prefix_hourly;
        DELETE FROM caching_lru;
        DELETE FROM caching_blocks;
        DELETE FROM caching_response_hourly;
        DELETE FROM caching_prompts;
        DELETE FROM rollup_state WHERE name IN ('caching', 'caching.since');
        """,
    ),
    ("actions: their state, the audit trail, the savings ledger", ACTIONS_TABLES),
    ("slack: the messages posted about actions", SLACK_TABLES),
]
"""Schema migrations, applied in order; a migration's version is its position + 1.
Never edit a released migration: append a new one.

DuckDB 1.5.5 cannot replay from its WAL an ``ALTER TABLE`` of a table that has a
function default (``ingested_at DEFAULT current_timestamp``): the file no longer
opens after a crash. Change such a table by rebuilding it (copy, drop, create,
insert), never with ALTER; ``migrate`` also checkpoints after migrating."""


class StoreError(RuntimeError):
    """The store file cannot be opened or is from a newer finopsd."""


class StoreUnavailable(StoreError):
    """A write failed for a reason outside the data: a full disk, an I/O error, no memory.

    Nothing of the failed write is stored; the same write may be retried once the
    cause is gone (``Store.recover()`` first).
    """


_UNAVAILABLE_TYPES = (duckdb.IOException, duckdb.FatalException, duckdb.OutOfMemoryException)
_UNAVAILABLE_TEXT = (
    "No space left",
    "Disk quota",
    "Could not write",
    "Could not read",
    "Could not open",
    "Read-only file system",
    "Permission denied",
    "IO Error",
    "I/O error",
    "invalidated",
    "Out of Memory",
)


def is_unavailable(exc: BaseException) -> bool:
    """True if ``exc`` says the store cannot be written now, whatever the data.

    DuckDB reports a full disk as an ``IOException`` on an insert, as a
    ``TransactionException`` ("Failed to commit: Could not write file …") on a
    commit, and, after a failed checkpoint, as a ``FatalException`` that
    invalidates the database until it is opened again.
    """
    if isinstance(exc, (StoreUnavailable, OSError, *_UNAVAILABLE_TYPES)):
        return True
    return isinstance(exc, duckdb.Error) and any(t in str(exc) for t in _UNAVAILABLE_TEXT)


@dataclass(frozen=True, slots=True)
class DeadLetterRow:
    topic: str
    partition: int
    offset: int
    reason: str
    detail: str
    size_bytes: int


@dataclass
class StoreBatch:
    """What one ``Store.append`` writes.

    ``rows``: table name to an Arrow table with that table's columns (no dups
    within it). ``dedup``: table name to (key columns, time window); rows whose
    key is already stored with a ``ts`` within the window of the batch's own
    timestamps are skipped. ``offsets``: (topic, partition) to the next offset
    to read.
    """

    rows: dict[str, pa.Table] = field(default_factory=dict)
    dedup: dict[str, tuple[tuple[str, ...], timedelta]] = field(default_factory=dict)
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    dead_letters: list[DeadLetterRow] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class AppendResult:
    inserted: dict[str, int]
    duplicates: dict[str, int]


class Store:
    """A DuckDB file with finopsd's schema. Thread-safe for one writer at a time."""

    def __init__(
        self,
        path: str | Path,
        *,
        read_only: bool = False,
        threads: int | None = None,
        memory_limit: str | None = None,
        vacuum_tasks: int | None = None,
    ) -> None:
        self.path = Path(path)
        self.read_only = read_only
        config: dict[str, str | int] = {}
        if threads:
            config["threads"] = threads
        if vacuum_tasks is not None:
            config["max_vacuum_tasks"] = vacuum_tasks
        if memory_limit:
            config["memory_limit"] = memory_limit
        self._config = config
        if not read_only:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._con = duckdb.connect(str(self.path), read_only=read_only, config=config)
        except duckdb.Error as exc:
            raise StoreError(f"cannot open store {self.path}: {exc}") from exc
        self._write_lock = threading.Lock()
        self._writer: tuple[str, float] | None = None  # holder's thread name, since
        self._needs_reopen = False
        if not read_only:
            self.migrate()
        else:
            self._check_version()

    # -- schema -------------------------------------------------------------------

    def schema_version(self) -> int:
        con = self._con.cursor()
        exists = con.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_name = 'schema_version'"
        ).fetchone()
        if not exists or not exists[0]:
            return 0
        row = con.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()
        return int(row[0]) if row else 0

    def _check_version(self) -> int:
        version = self.schema_version()
        if version > len(MIGRATIONS):
            raise StoreError(
                f"store {self.path} has schema version {version}; this finopsd knows "
                f"up to {len(MIGRATIONS)}. Upgrade finopsd."
            )
        return version

    def migrate(self) -> int:
        """Apply pending migrations, each in its own transaction; returns the version."""
        con = self._con.cursor()
        con.execute(
            "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, "
            "applied_at TIMESTAMPTZ NOT NULL, description VARCHAR NOT NULL)"
        )
        current = self._check_version()
        migrated = False
        for version, (description, sql) in enumerate(MIGRATIONS, start=1):
            if version <= current:
                continue
            con.execute("BEGIN")
            try:
                con.execute(sql)
                con.execute(
                    "INSERT INTO schema_version VALUES (?, ?, ?)",
                    [version, datetime.now(UTC), description],
                )
                con.execute("COMMIT")
            except Exception:
                con.execute("ROLLBACK")
                raise
            log.info("store %s migrated to version %d: %s", self.path, version, description)
            migrated = True
        if migrated:
            con.execute("CHECKPOINT")  # schema changes out of the WAL (see MIGRATIONS)
        return len(MIGRATIONS)

    # -- writes -------------------------------------------------------------------

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """Hold the write lock, recording which thread holds it since when."""
        with self._write_lock:
            self._writer = (threading.current_thread().name, time.monotonic())
            try:
                yield
            finally:
                self._writer = None

    def writer(self) -> tuple[str, float] | None:
        """The thread that holds the write lock and for how many seconds; None: free."""
        held = self._writer
        return None if held is None else (held[0], time.monotonic() - held[1])

    def append(self, batch: StoreBatch) -> AppendResult:
        """Write the batch's rows, dead letters and offsets atomically."""
        inserted: dict[str, int] = {}
        duplicates: dict[str, int] = {}
        now = datetime.now(UTC)
        with self._writing():
            con = self._con.cursor()
            con.execute("BEGIN")
            try:
                for table, rows in batch.rows.items():
                    if rows.num_rows == 0:
                        continue
                    key, window = batch.dedup[table]
                    inserted[table] = self._insert_new(con, table, rows, key, window)
                    duplicates[table] = rows.num_rows - inserted[table]
                if batch.dead_letters:
                    con.executemany(
                        "INSERT INTO dead_letters VALUES (?, ?, ?, ?, ?, ?, ?)",
                        [
                            [now, d.topic, d.partition, d.offset, d.reason, d.detail, d.size_bytes]
                            for d in batch.dead_letters
                        ],
                    )
                if batch.offsets:
                    con.executemany(
                        "INSERT OR REPLACE INTO ingest_offsets VALUES (?, ?, ?, ?)",
                        [[t, p, o, now] for (t, p), o in batch.offsets.items()],
                    )
                con.execute("COMMIT")
            except Exception as exc:
                self._failed(con, exc)
                raise
        return AppendResult(inserted, duplicates)

    def _failed(self, con: duckdb.DuckDBPyConnection, exc: BaseException) -> None:
        """Roll back after ``exc``; raise ``StoreUnavailable`` if the cause is not the data.

        A failed COMMIT has already ended the transaction, so the ROLLBACK may fail too:
        the original error is the one that counts.
        """
        with contextlib.suppress(duckdb.Error):
            con.execute("ROLLBACK")
        if is_unavailable(exc) and not isinstance(exc, StoreUnavailable):
            if "invalidated" in str(exc) or isinstance(exc, duckdb.FatalException):
                self._needs_reopen = True
            raise StoreUnavailable(f"cannot write store {self.path}: {exc}") from exc

    def recover(self) -> None:
        """Make the store writable again after ``StoreUnavailable``, if it can be.

        Opens the database again when DuckDB has invalidated it (the WAL is
        replayed: what was committed stays); raises ``StoreUnavailable`` while
        that still fails. A no-op otherwise.
        """
        with self._writing():
            if not self._needs_reopen:
                return
            with contextlib.suppress(duckdb.Error):
                self._con.close()
            try:
                self._con = duckdb.connect(str(self.path), config=self._config)
            except duckdb.Error as exc:
                raise StoreUnavailable(f"cannot open store {self.path} again: {exc}") from exc
            self._needs_reopen = False
            log.info("store %s opened again", self.path)

    @staticmethod
    def _insert_new(
        con: duckdb.DuckDBPyConnection,
        table: str,
        rows: pa.Table,
        key: tuple[str, ...],
        window: timedelta,
    ) -> int:
        bounds = pc.min_max(rows.column("ts").cast(pa.int64()))
        slack = int(window.total_seconds() * 1_000_000)
        lo, hi = bounds["min"].as_py() - slack, bounds["max"].as_py() + slack
        # from_arrow scans the table without taking the GIL per batch; register() does not
        con.from_arrow(rows).create_view("batch_rows", replace=True)
        match = " AND ".join(f"t.{k} = b.{k}" for k in key)
        result = con.execute(
            f"INSERT INTO {table} BY NAME SELECT b.* FROM batch_rows b WHERE NOT EXISTS ("
            f"SELECT 1 FROM {table} t WHERE {match} "
            f"AND t.ts BETWEEN make_timestamptz(?::BIGINT) AND make_timestamptz(?::BIGINT))",
            [lo, hi],
        ).fetchone()
        # on failure the caller's ROLLBACK drops the view with everything else
        con.execute("DROP VIEW batch_rows")
        return int(result[0]) if result else 0

    def write(self, work: Callable[[duckdb.DuckDBPyConnection], T]) -> T:
        """Run ``work(connection)`` in one transaction, serialised with ``append``."""
        with self._writing():
            con = self._con.cursor()
            con.execute("BEGIN")
            try:
                result = work(con)
                con.execute("COMMIT")
            except Exception as exc:
                self._failed(con, exc)
                raise
        return result

    # -- reads --------------------------------------------------------------------

    def cursor(self) -> duckdb.DuckDBPyConnection:
        """A connection to the same database for use in the calling thread."""
        return self._con.cursor()

    def stored_offsets(self, topics: Iterable[str] | None = None) -> dict[tuple[str, int], int]:
        """(topic, partition) to the next offset to read, as of the last committed batch."""
        sql = 'SELECT topic, "partition", next_offset FROM ingest_offsets'
        params: list[object] = []
        if topics is not None:
            sql += " WHERE list_contains(?, topic)"
            params.append(list(topics))
        return {(t, int(p)): int(o) for t, p, o in self.cursor().execute(sql, params).fetchall()}

    def counts(self) -> dict[str, object]:
        """Row counts per table and dead letters per reason."""
        con = self.cursor()
        out: dict[str, object] = {}
        for table in ("usage_events", "gpu_samples", "dead_letters"):
            row = con.execute(f"SELECT count(*) FROM {table}").fetchone()
            out[table] = int(row[0]) if row else 0
        out["dead_letters_by_reason"] = dict(
            con.execute(
                "SELECT reason, count(*) FROM dead_letters GROUP BY reason ORDER BY reason"
            ).fetchall()
        )
        return out

    def close(self) -> None:
        self._con.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def table_columns(store: Store, table: str) -> Mapping[str, str]:
    """Column name to DuckDB type of ``table``."""
    rows = (
        store.cursor()
        .execute(
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_name = ? ORDER BY ordinal_position",
            [table],
        )
        .fetchall()
    )
    return dict(rows)
