"""caching: what a response cache and a prompt-prefix cache would have saved.

Two questions, both answered from per-request data (``prompt_hash``,
``prefix_hashes``) that this analyzer folds, once, into its own tables:

**Exact repeats** (``caching.response_repeats``, per tenant × app × feature).
A request is a *repeat* when a request with the same cache key (tenant, app,
feature, requested model, ``prompt_hash``) was answered successfully
(``status = 'ok'``) at most ``response_ttl_s`` before it: a response cache with
that TTL would have served it. (The previous *successful* request counts, so a
burst of repeats keeps hitting as long as each comes within the TTL of the one
before: the TTL is measured from the latest answer.) The saving is the full
cost of the repeats: ``cost_usd`` for API requests; for a self-hosted
deployment, the repeats' input + output tokens at that deployment-hour's cost
per token (``deployment_hours``: self-hosted costs are only known once an hour
is settled). Action: ``gateway.cache`` with ``mode = "response"``.

**Prefix reuse** (``caching.prompt_prefix`` per API provider × model,
``caching.vllm_prefix`` per self-hosted deployment). ``prefix_hashes`` are the
hashes of a prompt's consecutive ``block_tokens``-token blocks. A block is a
*hit* when it and every block before it in the same request were seen earlier
(a prefix cache); its tokens are ``block_tokens``, the last block capped at
the request's ``input_tokens`` (1,300 tokens in 3 blocks: 512 + 512 + 276),
so a request's hit tokens are ``min(leading hit blocks × block_tokens,
input_tokens)``. Caches are per provider × requested model, or per deployment
when the request names one (KV caches are per model). "Earlier" means earlier
in processing order: (ts, event_id) within a run, run after run (below). Two
caches are simulated:

- **unbounded**: every block ever seen stays, without a TTL (an upper bound);
- **bounded LRU** of ``lru_capacity_blocks`` blocks per cache, with the
  cache's **TTL**: a block is held when it is in the cache and, for an API
  model, was last used at most its provider's TTL before (``prefix_ttl_s``,
  ``default_prefix_ttl_s``: Anthropic 5 minutes, OpenAI 5 minutes, the low end
  of its 5-10; self-hosted deployments have none). Every access of a block
  (hit or miss, in request order, block by block) makes it the most recent and
  refreshes its last use, as the providers' caches do; a miss inserts it,
  evicting the least recent block when full. A prefix reused after the TTL is
  a miss: written again, not read.

With caching on, a request writes to the cache the prompt it does not read
from it, up to its cache breakpoint; placed well (after the part of the prompt
that other requests share: a system prompt, a document, the conversation so
far), the breakpoint leaves out the request's unique rest, which no later
request could read. So ``lru_write_tokens`` counts, of the blocks after a
request's LRU hits, those that are **used again**: a block accessed a second
time (by any request of the cache, however much later) is shared, its every
miss is a write, and its first write, when it was first seen, is charged at its
second access (in that access's hour); a block seen only once is never
charged.

Evidence gives ``input_tokens``, ``prefix_hit_tokens_*`` and
``prefix_hit_ratio_*`` (= hit tokens / input tokens) for both, the TTL, the
LRU's writes and the cache writes already billed. The saving uses the LRU's
hits that the request did not already get from a provider cache
(``max(lru hit tokens - cache_read_input_tokens, 0)`` per request) and the
writes it would add (``max(lru write tokens - cache_creation_input_tokens, 0)``,
``premium_write_tokens``): for API models, hits × (input - cached input) -
added writes × (cache write - input) at the model's current price (per meter
as the price book bills it: a meter without a price of its own costs the
input price, so OpenAI's automatic caching has no write premium and
Anthropic's 5-minute writes cost 1.25× input), batch-billed requests at the
batch discount; no finding unless that is positive. For self-hosted
deployments at the deployment-hour's cost per token times ``prefill_share``:
a self-hosted token's cost is the GPU-hour spread evenly over input and
output tokens, but a prefix hit only skips that token's prefill (computing
its KV cache), which costs much less than a decode step; 0.5 is a round,
deliberately conservative share, not a measurement. Action:
``gateway.cache`` with ``mode = "prompt_prefix"`` for API models,
``vllm.prefix_caching`` for deployments.

**Incremental.** Each run processes only the events ingested after its
watermark (``rollup_state`` row ``caching``), in (ts, event_id) order, and
keeps:

- ``caching_response_hourly`` / ``caching_prefix_hourly``: per-hour sums the
  findings are computed from (small: the findings' queries never touch
  ``usage_events``);
- ``caching_prompts``: the latest successful time of each prompt key seen
  within the TTL (older keys are dropped); a key is DuckDB's 64-bit
  ``hash(tenant, app, feature, model, prompt_hash)`` (a collision, about
  n²/2⁶⁵ for n live keys, would count a false repeat);
- ``caching_blocks``: every (cache, block) seen, once (the unbounded cache;
  a cache is named by the 64-bit BLAKE2b of "model=<provider> <model>" or
  "deployment=<name>"); ``caching_shared_blocks``: those seen twice, once;
- ``caching_lru``: (cache, block, access number, its ts) rows appended for the
  blocks each run touched; an LRU cache is the ``lru_capacity_blocks`` blocks
  with the latest numbers, each with its last use (compacted from memory once
  it has grown).

The caches also live in memory between runs of one analyzer instance (the
daemon keeps its instances), tagged with the store and the watermark they
match; a run whose store or watermark differs (a restart, a failed run)
reloads them from the tables first.

**Backfill.** The LRU has to be simulated one block access at a time (an
``OrderedDict``, about 0.5-1 µs an access here), and a from-scratch pass over
a large history is slow anyway (10 M events, 30 M blocks: well over 10 s on
2 cores). So the first run (no watermark) simulates the prefix caches only for
the events at most ``backfill_hours`` (default 6) older than its ``now``
(``0``: the whole history, exact but slow) and never looks at older ones for
them; from then on every new event is simulated. Exact repeats cost one key
lookup a request, so the first run counts them over the whole window's
history (a day at a time, before the backfill's events). A store that
finopsd's own ingest fills is analysed from its first hour anyway: the
backfill only matters when the analyzer is turned on over an existing
history. Prefix findings cover only what was simulated: from the window's
start, or from the first simulated event if later. Every finding's saving is
summed per hour and projected to a month over the hours from the scope's
first to its last hour with traffic (``base.project``; the exact first-to-last
event time when shorter: seconds of traffic are not an hour), with the
interval and the provisional rule of ``base``; ``covered_start`` /
``covered_days`` in the evidence are that span. Every figure, the LRU's
included, is therefore exact over the covered span, not a sample of it.

Limits, stated: an event ingested after later events were processed (late
data) is simulated as if it came after them; the unbounded cache state grows
by one row per distinct block ever seen; changing ``lru_capacity_blocks``
resizes the persisted LRU (shrinking evicts the least recent blocks, growing
starts with what it holds); a changed prefix TTL applies to the accesses
simulated from then on; raising ``response_ttl_s`` cannot recover the prompt
keys already dropped. Providers' minimum cacheable prompt lengths (1,024
tokens and more) and their caches' own capacity are not modelled beyond the
LRU's.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, ClassVar

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from finopsd.analyzers._rollups import utc_floor_us
from finopsd.analyzers.base import (
    ActionSpec,
    Analyzer,
    Context,
    Finding,
    Options,
    Projection,
    Window,
    register,
)
from finopsd.pricing import PER_MILLION, PriceBook
from finopsd.store import utc_floor

NAME = "caching"
SINCE = "caching.since"
"""``rollup_state`` row holding the ts of the first simulated event."""
NONE = "(none)"
"""A scope value for an event without that tag."""
NO_TIME = np.iinfo(np.int64).min
"""No such time (microseconds since the epoch)."""

_HOUR = utc_floor("ts", 3600)

_COVERED_HOURS = f"hour >= {utc_floor('$lo::TIMESTAMPTZ', 3600)} AND hour < $hi"
"""SQL filter: the hourly state rows of the span [$lo, $hi) a finding covers."""

_RATE = """rate AS (
    SELECT deployment, hour, cost_usd / tokens AS usd_per_token
    FROM deployment_hours WHERE tokens > 0 AND hour >= $lo - INTERVAL 1 HOUR AND hour < $hi
)"""
"""SQL CTE ``rate``: each settled deployment-hour's cost per token."""
_SCOPE = (
    "CASE WHEN deployment IS NOT NULL THEN 'deployment=' || deployment "
    "ELSE 'model=' || coalesce(provider, '') || ' ' || request_model END"
)
"""The prefix cache an event's blocks live in: its deployment, else provider and model."""

PrefixTtl = Annotated[float, Field(ge=0, le=366 * 86400)]
PROVIDER_PREFIX_TTL_S: dict[str, float] = {"anthropic": 300.0, "openai": 300.0}
"""How long a provider keeps an unused cached prefix, seconds (``prefix_ttl_s`` default).

Anthropic: 5 minutes, refreshed by every use (``"ttl": "1h"`` buys an hour, its
writes billed at 2x input instead of 1.25x: price them so in ``[[pricing.prices]]``
when you set 3600). OpenAI (in-memory retention): cleared after 5 to 10 minutes
unused, always within an hour of the last use; 300 is the low end (extended
retention, on the models that offer it: 86400). Self-hosted deployments (vLLM)
have no TTL: their caches evict least recently used blocks only."""


class CachingOptions(Options):
    response_ttl_s: float = Field(
        3600.0, gt=0, description="a response cache entry lives this long after its answer"
    )
    block_tokens: int = Field(
        512, ge=1, description="tokens per prefix_hashes block (the producers' block size)"
    )
    lru_capacity_blocks: int = Field(
        100_000,
        ge=1,
        description="blocks each bounded LRU prefix cache (per model/deployment) holds",
    )
    prefix_ttl_s: dict[str, PrefixTtl] = Field(
        default_factory=lambda: dict(PROVIDER_PREFIX_TTL_S),
        description=(
            "API prompt caches by provider: a cached prefix expires this many seconds after "
            "its last use (0: never, LRU only)"
        ),
    )
    default_prefix_ttl_s: PrefixTtl = Field(
        300.0, description="the same, for providers not in prefix_ttl_s"
    )
    prefill_share: float = Field(
        0.5,
        ge=0,
        le=1,
        description="share of a self-hosted token's cost that a prefix hit saves (its prefill)",
    )
    backfill_hours: float = Field(
        6.0,
        ge=0,
        le=24 * 366 * 100,
        description="the first run simulates only events this recent; 0: the whole history",
    )
    min_requests: int = Field(
        20, ge=1, description="a scope needs this many requests in the covered window"
    )
    min_monthly_savings_usd: float = Field(
        10.0, ge=0, description="findings saving less than this per month are not reported"
    )


# -- in-memory caches ------------------------------------------------------------------------


def _sorted_unique(values: np.ndarray) -> np.ndarray:
    """``values`` sorted, without repeats (``np.unique`` is far slower on numpy 2.4 here)."""
    out = np.sort(values)
    return out[np.concatenate([[True], out[1:] != out[:-1]])] if len(out) else out


class _BlockSet:
    """A growing set of int64 block hashes: a sorted array plus a smaller sorted delta."""

    def __init__(self, blocks: np.ndarray | None = None, *, is_sorted: bool = False) -> None:
        """``blocks``: the set's contents (``is_sorted``: already sorted and unique)."""
        empty = np.empty(0, np.int64)
        if blocks is None:
            self.main = empty
        else:
            self.main = np.asarray(blocks, np.int64) if is_sorted else _sorted_unique(blocks)
        self.delta = empty

    def __len__(self) -> int:
        return len(self.main) + len(self.delta)

    @staticmethod
    def _isin(sorted_arr: np.ndarray, keys: np.ndarray) -> np.ndarray:
        if len(sorted_arr) == 0:
            return np.zeros(len(keys), bool)
        idx = np.searchsorted(sorted_arr, keys)
        idx[idx == len(sorted_arr)] = 0
        return sorted_arr[idx] == keys

    def contains(self, keys: np.ndarray) -> np.ndarray:
        """Which of ``keys`` are in the set."""
        return self._isin(self.main, keys) | self._isin(self.delta, keys)

    def add(self, new: np.ndarray) -> None:
        """Add sorted, unique keys that are not in the set yet."""
        if len(new) == 0:
            return
        self.delta = np.insert(self.delta, np.searchsorted(self.delta, new), new)
        if len(self.delta) > max(1 << 16, len(self.main) >> 3):
            self.main = np.insert(self.main, np.searchsorted(self.main, self.delta), self.delta)
            self.delta = np.empty(0, np.int64)


@dataclass
class _Caches:
    """The simulated prefix caches, valid for the (store, watermark) in ``tag``.

    An LRU cache always holds the ``capacity`` most recently accessed distinct
    blocks, so its persisted form is just rows (scope, block, access number),
    appended for the blocks each run touched; it is rewritten from memory when
    it has grown past twice what the caches hold plus one capacity.
    """

    tag: tuple[Any, ...]
    seen: dict[int, _BlockSet] = field(default_factory=dict)  # by scope id
    shared: dict[int, _BlockSet] = field(default_factory=dict)  # seen twice, by scope id
    lru: dict[int, OrderedDict[int, int]] = field(default_factory=dict)  # block -> last use
    seq: int = 0  # the number of the last LRU access
    lru_rows: int = 0  # rows in caching_lru
    prompt_keys: np.ndarray = field(default_factory=lambda: np.empty(0, np.uint64))  # sorted
    prompt_times: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))  # last ok
    prompt_rows: int = 0  # rows in caching_prompts


def _segments(sorted_ids: np.ndarray) -> list[tuple[int, int, int]]:
    """(value, start, end) of each run of equal values in ``sorted_ids``."""
    if len(sorted_ids) == 0:
        return []
    starts = np.flatnonzero(np.concatenate([[True], sorted_ids[1:] != sorted_ids[:-1]]))
    ends = [*starts[1:].tolist(), len(sorted_ids)]
    return [(int(sorted_ids[lo]), int(lo), hi) for lo, hi in zip(starts, ends, strict=True)]


def _load(con: duckdb.DuckDBPyConnection, tag: tuple[Any, ...], capacity: int) -> _Caches:
    """The caches as the tables hold them."""
    caches = _Caches(tag)
    # a block is stored once per cache, when first seen: sorted, these are the sets
    for (scope,) in con.execute("SELECT DISTINCT scope FROM caching_blocks").fetchall():
        seen = con.execute(
            "SELECT block FROM caching_blocks WHERE scope = ? ORDER BY block", [scope]
        ).fetchnumpy()
        caches.seen[int(scope)] = _BlockSet(seen["block"], is_sorted=True)
    for (scope,) in con.execute("SELECT DISTINCT scope FROM caching_shared_blocks").fetchall():
        shared = con.execute(
            "SELECT block FROM caching_shared_blocks WHERE scope = ? ORDER BY block", [scope]
        ).fetchnumpy()
        caches.shared[int(scope)] = _BlockSet(shared["block"], is_sorted=True)
    # an LRU cache holds the `capacity` blocks accessed last, each with its last use
    held = con.execute(
        """
        SELECT scope, block, max(seq) AS seq, arg_max(at_us, seq) AS at_us
        FROM caching_lru GROUP BY scope, block
        QUALIFY row_number() OVER (PARTITION BY scope ORDER BY max(seq) DESC) <= $cap
        ORDER BY scope, seq
        """,
        {"cap": capacity},
    ).fetchnumpy()
    scopes, blocks = np.asarray(held["scope"], np.int64), np.asarray(held["block"], np.int64)
    used = np.asarray(held["at_us"], np.int64)
    for scope, lo, hi in _segments(scopes):
        held_blocks, last_use = blocks[lo:hi].tolist(), used[lo:hi].tolist()
        caches.lru[scope] = OrderedDict(zip(held_blocks, last_use, strict=True))
    row = con.execute("SELECT coalesce(max(seq), 0), count(*) FROM caching_lru").fetchone()
    assert row is not None
    caches.seq, caches.lru_rows = int(row[0]), int(row[1])
    prompts = con.execute(
        "SELECT k, epoch_us(max(last_ok)) AS t, count(*) AS n "
        "FROM caching_prompts GROUP BY k ORDER BY k"
    ).fetchnumpy()
    caches.prompt_keys = np.asarray(prompts["k"], np.uint64)
    caches.prompt_times = np.asarray(prompts["t"], np.int64)
    caches.prompt_rows = int(np.asarray(prompts["n"]).sum())
    return caches


def _scope_id(name: str) -> int:
    """A cache's stable 64-bit id (its name's BLAKE2b), as stored in the caching tables."""
    digest = hashlib.blake2b(name.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def _prefix_ttl_s(opts: CachingOptions, provider: str | None, *, self_hosted: bool) -> float:
    """The TTL of a prefix cache, seconds; 0: none.

    A self-hosted deployment's cache has none (vLLM evicts least recently used
    blocks only); an API model's is its provider's ``prefix_ttl_s``, else
    ``default_prefix_ttl_s``.
    """
    if self_hosted:
        return 0.0
    return opts.prefix_ttl_s.get(provider or "", opts.default_prefix_ttl_s)


def _simulate_lru(
    od: OrderedDict[int, int], keys: list[int], times: list[int], capacity: int, ttl_us: int
) -> np.ndarray:
    """Access ``keys`` at ``times`` (µs) in order on ``od`` (block -> its last use, least
    recent first, at most ``capacity``).

    A block is held, a hit, when it is in ``od`` and, with a TTL (``ttl_us`` > 0),
    was last used at most ``ttl_us`` before; a block unused for longer has expired
    and its access is a miss (written again). Every access makes its block the most
    recent and its time the last use; a miss of a block not in ``od`` inserts it and,
    when the cache is full, evicts the least recent block. (Expired blocks are kept
    until evicted: they are the least recent, so they go first, as a real cache
    frees them first.) Returns whether each block was held just before its access.
    (About 0.5-1 µs an access: this loop is the analyzer's main per-event cost.)
    """
    while len(od) > capacity:
        od.popitem(last=False)
    held: list[bool] = []
    hit, move, pop, last_use = held.append, od.move_to_end, od.popitem, od.get
    size = len(od)
    if ttl_us <= 0:  # LRU only (two loops: this one is the analyzer's hot path)
        for k, t in zip(keys, times, strict=True):
            if k in od:
                move(k)
                od[k] = t
                hit(True)
            else:
                od[k] = t
                hit(False)
                size += 1
                if size > capacity:
                    pop(last=False)
                    size -= 1
        return np.array(held, bool)
    for k, t in zip(keys, times, strict=True):
        last = last_use(k)
        if last is None:
            od[k] = t
            hit(False)
            size += 1
            if size > capacity:
                pop(last=False)
                size -= 1
        else:
            move(k)
            hit(t - last <= ttl_us)
            if t > last:  # (late data keeps the later use)
                od[k] = t
    return np.array(held, bool)


def _leading_hits(flags: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Per request (consecutive segments of ``flags``): how many leading blocks are hits."""
    pos = np.arange(len(flags)) - np.repeat(starts, lengths)
    first_miss = np.minimum.reduceat(np.where(flags, np.iinfo(np.int64).max, pos), starts)
    return np.minimum(first_miss, lengths)


# -- the incremental pass --------------------------------------------------------------------


@dataclass
class _Pass:
    """What one incremental pass did (for tests and logs)."""

    events: int = 0
    prompt_requests: int = 0
    prefix_requests: int = 0
    block_accesses: int = 0


_COLUMNS = {
    "caching_response_hourly": [
        *("hour", "tenant", "app", "feature", "deployment", "requests", "cost_usd", "tokens"),
        *("repeat_requests", "repeat_cost_usd", "repeat_tokens", "repeat_unpriced"),
    ],
    "caching_prompts": ["k", "last_ok"],
    "caching_prefix_hourly": [
        *("hour", "provider", "model", "deployment", "billing_mode", "requests"),
        *("input_tokens", "cache_read_tokens", "unbounded_hit_tokens", "unbounded_extra_tokens"),
        *("lru_hit_tokens", "lru_extra_tokens"),
        *("cache_write_tokens", "lru_write_tokens", "lru_write_extra_tokens"),
    ],
    "caching_blocks": ["scope", "block"],
    "caching_shared_blocks": ["scope", "block"],
    "caching_lru": ["scope", "block", "seq", "at_us"],
}
"""The columns of this analyzer's tables, in their order (see finopsd/store.py)."""


def _insert(con: duckdb.DuckDBPyConnection, table: str, rows: pl.DataFrame | pa.Table) -> None:
    """Append ``rows`` (with at least ``table``'s columns, by name) to ``table``."""
    arrow = rows.to_arrow() if isinstance(rows, pl.DataFrame) else rows
    if arrow.num_rows:
        con.from_arrow(arrow.select(_COLUMNS[table])).insert_into(table)


def _process(
    con: duckdb.DuckDBPyConnection,
    opts: CachingOptions,
    caches: _Caches | None,
    now: datetime,
    window_start: datetime | None = None,
) -> tuple[_Caches, _Pass, datetime | None]:
    """Fold the events ingested since the watermark into the caching tables and caches.

    Runs in the caller's transaction (which holds the store's write lock, so
    no event can be committed behind the new watermark meanwhile). Returns the
    caches, now matching the new watermark, what was done, and the ts of the
    first event ever simulated (None: none yet). On the first run the exact
    repeats of the events from ``window_start`` to the backfill's start are
    counted first (``_repeat_history``): only the prefix caches are backfilled
    no further than ``backfill_hours``.
    """
    done = _Pass()
    row = con.execute(
        f"""
        SELECT (SELECT path FROM duckdb_databases() WHERE database_name = current_database()),
               (SELECT watermark FROM rollup_state WHERE name = '{NAME}'),
               (SELECT watermark FROM rollup_state WHERE name = '{SINCE}')
        """
    ).fetchone()
    assert row is not None
    path, watermark, since = row
    if caches is None or caches.tag != (path, watermark):
        caches = _load(con, (path, watermark), opts.lru_capacity_blocks)
    new = "TRUE" if watermark is None else "ingested_at > $w"
    params: dict[str, Any] = {} if watermark is None else {"w": watermark}
    recent = "TRUE"
    history = 0
    if watermark is None and opts.backfill_hours > 0:
        recent = "ts >= $from"
        params["from"] = now - timedelta(hours=opts.backfill_hours)
        if window_start is not None:
            history = _repeat_history(
                con, opts.response_ttl_s, caches, window_start, params["from"]
            )
    table = con.execute(
        f"""
        SELECT ts, {_HOUR} AS hour, tenant, app, feature, provider, request_model AS model,
               deployment, billing_mode, status = 'ok' AS ok, input_tokens, output_tokens,
               coalesce(cache_read_input_tokens, 0) AS cache_read_tokens,
               coalesce(cache_creation_input_tokens, 0) AS cache_write_tokens, cost_usd,
               CASE WHEN prompt_hash IS NOT NULL
                    THEN hash(tenant, app, feature, request_model, prompt_hash) END AS rk,
               {_SCOPE} AS scope, prefix_hashes,
               (SELECT max(ingested_at) FROM usage_events WHERE {new}) AS newest
        FROM usage_events
        WHERE {new} AND {recent} AND (prompt_hash IS NOT NULL OR len(prefix_hashes) > 0)
        ORDER BY ts, event_id, rowid
        """,
        params,
    ).to_arrow_table()
    done.events = table.num_rows
    if table.num_rows:
        newest = table.column("newest")[0].as_py()
        states = [(NAME, newest)]
        if since is None:
            since = table.column("ts")[0].as_py()
            states.append((SINCE, since))
        _repeats(con, table, opts.response_ttl_s, caches, done)
        _prefixes(con, table, opts, caches, done)
        done.prompt_requests += history
    else:  # nothing to simulate; still move past what was looked at
        top = con.execute(
            f"SELECT max(ingested_at) FROM usage_events WHERE {new}",
            {k: v for k, v in params.items() if k == "w"},
        )
        top_row = top.fetchone()
        newest = top_row[0] if top_row else None
        done.prompt_requests = history
        if newest is None:
            return caches, done, since
        states = [(NAME, newest)]
    con.execute(
        "INSERT OR REPLACE INTO rollup_state VALUES " + ", ".join(["(?, ?)"] * len(states)),
        [v for state in states for v in state],
    )
    caches.tag = (path, newest)
    return caches, done, since


_HISTORY_ROWS = """
    SELECT hash(tenant, app, feature, request_model, prompt_hash) AS rk, epoch_us(ts) AS t,
           status = 'ok' AS ok, rowid AS r
    FROM usage_events
    WHERE prompt_hash IS NOT NULL AND ts >= $lo AND ts < $hi
"""
"""A history chunk's requests, narrow and in no particular order: key, µs, ok, rowid."""
_PROCESSING_ORDER = " ORDER BY ts, event_id, rowid"

_HISTORY_HOURLY = f"""
    INSERT INTO caching_response_hourly ({", ".join(_COLUMNS["caching_response_hourly"])})
    SELECT {utc_floor_us("e.ts", 3600)} AS hour, tenant, app, feature, deployment,
           count(*), coalesce(sum(cost_usd) FILTER (WHERE deployment IS NULL), 0),
           sum(input_tokens + output_tokens), count({{rep}}),
           coalesce(sum(cost_usd) FILTER (WHERE {{rep}} IS NOT NULL AND deployment IS NULL), 0),
           coalesce(sum(input_tokens + output_tokens) FILTER (WHERE {{rep}} IS NOT NULL), 0),
           count(*) FILTER (
               WHERE {{rep}} IS NOT NULL AND deployment IS NULL AND cost_usd IS NULL)
    FROM usage_events e {{join}}
    WHERE prompt_hash IS NOT NULL AND e.ts >= $lo AND e.ts < $hi
    GROUP BY ALL
"""
"""A history chunk's ``caching_response_hourly`` rows: ``{join}`` the repeats' rowids
(``{rep}`` their column, NULL for a request that is no repeat)."""


def _repeat_history(
    con: duckdb.DuckDBPyConnection,
    ttl_s: float,
    caches: _Caches,
    start: datetime,
    end: datetime,
) -> int:
    """First run: exact repeats of the events with a prompt_hash in [start, end), a UTC day
    at a time (memory bounded by a day's events), into ``caching_response_hourly`` and the
    prompt keys, before the backfill's own events. Returns the requests counted.

    The same figures as ``_repeats`` on each day's events in processing order (ts,
    event_id, rowid), cheaper: a day's keys, times and rowids are read unordered and
    sorted by key and time here (a day with two requests of one key at the same
    microsecond, whose order only event_id decides, is read in processing order
    instead); the hourly sums are one aggregate in SQL, the repeats joined by rowid.
    An exact repeat costs one key lookup a request, so all the window's history is
    affordable; only the prefix caches' simulation is limited to ``backfill_hours``.
    """
    counted = 0
    ttl = round(ttl_s * 1_000_000)
    lo = start
    while lo < end:
        hi = min(datetime.fromtimestamp((lo.timestamp() // 86400 + 1) * 86400, lo.tzinfo), end)
        span = {"lo": lo, "hi": hi}
        lo = hi
        rk, t, ok, rowid = _history_rows(con, _HISTORY_ROWS, span)
        if not len(rk):
            continue
        order = _key_time_order(rk, t)
        if order is None:  # a tie only event_id orders: read the day in processing order
            rk, t, ok, rowid = _history_rows(con, _HISTORY_ROWS + _PROCESSING_ORDER, span)
        repeat = _is_repeat(rk, t, ok, caches, ttl, order)
        counted += len(rk)
        if repeat.any():
            con.register("caching_repeat_rows", pa.table({"r": rowid[repeat]}))
            join = "LEFT JOIN caching_repeat_rows rep ON e.rowid = rep.r"
            try:
                con.execute(_HISTORY_HOURLY.format(join=join, rep="rep.r"), span)
            finally:
                con.unregister("caching_repeat_rows")
        else:
            con.execute(_HISTORY_HOURLY.format(join="", rep="NULL"), span)
        _remember(con, rk, t, ok, caches, ttl)
    return counted


def _history_rows(
    con: duckdb.DuckDBPyConnection, sql: str, span: dict[str, datetime]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``_HISTORY_ROWS`` of ``span`` as numpy arrays: key, µs, ok, rowid."""
    day = con.execute(sql, span).to_arrow_table()
    return (
        day.column("rk").to_numpy().astype(np.uint64, copy=False),
        day.column("t").to_numpy().astype(np.int64, copy=False),
        day.column("ok").to_numpy(zero_copy_only=False).astype(bool, copy=False),
        day.column("r").to_numpy().astype(np.int64, copy=False),
    )


def _key_time_order(rk: np.ndarray, t: np.ndarray) -> np.ndarray | None:
    """An order of the requests by key and, within a key, by time; None when two requests
    of one key have the same time (then only their event_id would order them)."""
    order = np.argsort(rk)  # not stable: the keys that occur more than once are re-sorted
    rks = rk[order]
    same = rks[1:] == rks[:-1]
    repeated = np.zeros(len(rks), bool)
    repeated[1:] |= same
    repeated[:-1] |= same
    at = np.flatnonzero(repeated)  # whole runs of equal keys, in key order
    if len(at):
        sub = order[at]
        sub = sub[np.lexsort((t[sub], rk[sub]))]
        if ((rk[sub][1:] == rk[sub][:-1]) & (t[sub][1:] == t[sub][:-1])).any():
            return None
        order[at] = sub
    return order


def _is_repeat(
    rk: np.ndarray,
    t: np.ndarray,
    ok: np.ndarray,
    caches: _Caches,
    ttl: int,
    order: np.ndarray | None = None,
) -> np.ndarray:
    """Which requests are repeats: their key had a good answer at most ``ttl`` µs before,
    earlier in this batch or stored from an earlier one (unless, late data, that answer
    is later than the request).

    ``order`` sorts the requests by key and, within a key, in processing order; by
    default they are given in processing order (a stable sort by key is then that
    order). Within a batch, time never decreases, so the latest earlier good answer is
    also the one with the largest time.
    """
    if order is None:
        order = np.argsort(rk, kind="stable")
    rks = rk[order]
    new_key = np.ones(len(rks), bool)
    new_key[1:] = rks[1:] != rks[:-1]
    starts = np.flatnonzero(new_key)
    lengths = np.diff(np.append(starts, len(rks)))
    # only a key seen more than once in the batch, or stored, can have an earlier answer
    candidate = lengths > 1
    state_k, state_t = caches.prompt_keys, caches.prompt_times
    stored = np.full(len(starts), NO_TIME)
    if len(state_k):  # the stored answer of each of the batch's keys (the state is sorted)
        keys = rks[starts]
        at = np.searchsorted(keys, state_k)
        found = at < len(keys)
        found[found] = keys[at[found]] == state_k[found]
        stored[at[found]] = state_t[found]
        candidate[at[found]] = True
    out = np.zeros(len(rk), bool)
    if not candidate.any():
        return out
    rows = np.repeat(candidate, lengths)  # the candidate keys' requests, in sorted order
    sub = order[rows]
    run = np.repeat(np.arange(int(candidate.sum())), lengths[candidate])  # their key
    first = np.flatnonzero(np.concatenate([[True], run[1:] != run[:-1]]))[run]
    ts = t[sub]
    last_ok = np.maximum.accumulate(np.where(ok[sub], np.arange(len(sub)), -1))
    before = np.concatenate([[-1], last_ok[:-1]])
    prev = np.where(before >= first, ts[np.maximum(before, 0)], NO_TIME)
    stored_t = stored[candidate][run]
    prev = np.maximum(prev, np.where(stored_t <= ts, stored_t, NO_TIME))
    out[sub] = (prev != NO_TIME) & (ts - prev <= ttl)
    return out


def _remember(
    con: duckdb.DuckDBPyConnection,
    rk: np.ndarray,
    t: np.ndarray,
    ok: np.ndarray,
    caches: _Caches,
    ttl: int,
) -> None:
    """Fold a batch's good answers into the prompt keys and ``caching_prompts``: per key
    the latest good answer, only keys that can still be hit (answered at most ``ttl`` µs
    before the latest request seen)."""
    state_k, state_t = caches.prompt_keys, caches.prompt_times
    horizon = max(int(t.max()), int(state_t.max()) if len(state_t) else 0) - ttl
    fresh = ok & (t >= horizon)  # an older answer is dropped whatever else the key has
    keys = np.concatenate([state_k, rk[fresh]])
    times = np.concatenate([state_t, t[fresh]])
    order = np.lexsort((times, keys))
    keys, times = keys[order], times[order]
    last = np.ones(len(keys), bool)
    last[:-1] = keys[1:] != keys[:-1]
    keep = last & (times >= horizon)
    caches.prompt_keys, caches.prompt_times = keys[keep], times[keep]
    # the table: append the keys whose latest answer is in this batch (a key's latest
    # row wins when loaded); drop what can no longer be hit once that is most of it
    answered = keep & (order >= len(state_k))
    stamp = pa.timestamp("us", tz="UTC")
    _insert(
        con,
        "caching_prompts",
        pa.table({"k": keys[answered], "last_ok": pa.array(times[answered], stamp)}),
    )
    caches.prompt_rows += int(answered.sum())
    if caches.prompt_rows > 2 * len(caches.prompt_keys) + 10_000:
        con.execute(
            "DELETE FROM caching_prompts WHERE last_ok < $h",
            {"h": pa.scalar(horizon, stamp).as_py()},
        )
        row = con.execute("SELECT count(*) FROM caching_prompts").fetchone()
        caches.prompt_rows = int(row[0]) if row else 0


def _repeats(
    con: duckdb.DuckDBPyConnection, table: pa.Table, ttl_s: float, caches: _Caches, done: _Pass
) -> None:
    """Exact repeats among the new events into ``caching_response_hourly``; ``caching_prompts``."""
    has_key = pc.is_valid(table.column("rk")).to_numpy(zero_copy_only=False)
    done.prompt_requests = int(has_key.sum())
    if not done.prompt_requests:
        return
    rows = np.flatnonzero(has_key)
    rk = pc.fill_null(table.column("rk"), 0).to_numpy()[rows].astype(np.uint64)
    t = pc.cast(table.column("ts"), pa.int64()).to_numpy()[rows]
    ok = table.column("ok").to_numpy(zero_copy_only=False)[rows].astype(bool)
    ttl = round(ttl_s * 1_000_000)
    repeat = _is_repeat(rk, t, ok, caches, ttl)

    df = pl.from_arrow(
        table.select(["hour", "tenant", "app", "feature", "deployment", "cost_usd"]).take(rows)
    )
    assert isinstance(df, pl.DataFrame)
    tokens = (
        table.column("input_tokens").to_numpy()[rows]
        + table.column("output_tokens").to_numpy()[rows]
    )
    df = df.with_columns(
        pl.Series("tokens", tokens, pl.Int64),
        pl.Series("repeat", repeat),
        pl.col("deployment").is_null().alias("api"),
    )
    repeat_, api, cost = pl.col("repeat"), pl.col("api"), pl.col("cost_usd")
    hourly = df.group_by("hour", "tenant", "app", "feature", "deployment").agg(
        pl.len().alias("requests"),
        cost.filter(api).sum().alias("cost_usd"),
        pl.col("tokens").sum(),
        repeat_.sum().alias("repeat_requests"),
        cost.filter(repeat_ & api).sum().alias("repeat_cost_usd"),
        pl.col("tokens").filter(repeat_).sum().alias("repeat_tokens"),
        (repeat_ & api & cost.is_null()).sum().alias("repeat_unpriced"),
    )
    _insert(con, "caching_response_hourly", hourly)
    _remember(con, rk, t, ok, caches, ttl)


def _prefixes(
    con: duckdb.DuckDBPyConnection,
    table: pa.Table,
    opts: CachingOptions,
    caches: _Caches,
    done: _Pass,
) -> None:
    """Prefix-cache hits of the new events into ``caching_prefix_hourly``; the caches."""
    lists = table.column("prefix_hashes")
    all_lengths = pc.fill_null(pc.list_value_length(lists), 0).to_numpy().astype(np.int64)
    rows = np.flatnonzero(all_lengths)
    if len(rows) == 0:
        return
    lengths = all_lengths[rows]
    blocks = pc.list_flatten(lists).to_numpy().astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    done.prefix_requests, done.block_accesses = len(rows), len(blocks)

    scopes = table.column("scope").combine_chunks().dictionary_encode()
    names = scopes.dictionary.to_pylist()
    scope_of_row = scopes.indices.to_numpy()
    access_scope = np.repeat(scope_of_row[rows], lengths)
    access_us = np.repeat(pc.cast(table.column("ts"), pa.int64()).to_numpy()[rows], lengths)
    a_row = np.zeros(len(names), np.int64)  # a row of each cache (all name its provider)
    a_row[scope_of_row] = np.arange(len(scope_of_row))
    providers = table.column("provider").take(pa.array(a_row)).to_pylist()
    order = np.argsort(access_scope, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(access_scope, minlength=len(names)))])
    seen_flags = np.zeros(len(blocks), bool)
    lru_flags = np.zeros(len(blocks), bool)
    shared_flags = np.zeros(len(blocks), bool)  # the block is used again: a write is charged
    deferred = np.zeros(len(blocks), bool)  # charges the block's first write, made earlier
    new_blocks: list[pa.Table] = []
    new_shared: list[pa.Table] = []
    touched: list[pa.Table] = []
    for i, name in enumerate(names):
        scope = _scope_id(name)
        at = order[bounds[i] : bounds[i + 1]]
        keys = blocks[at]
        by_key = np.argsort(keys, kind="stable")  # equal keys stay in access order
        sorted_keys = keys[by_key]
        starts_k = np.flatnonzero(np.concatenate([[True], sorted_keys[1:] != sorted_keys[:-1]]))
        uniq = sorted_keys[starts_k]
        first_at = by_key[starts_k]
        last_at = by_key[np.concatenate([starts_k[1:], [len(keys)]]) - 1]
        # unbounded: a block was seen if the set has it or it occurred earlier in this batch
        seen = caches.seen.setdefault(scope, _BlockSet())
        fresh = ~seen.contains(uniq)
        flags = np.ones(len(keys), bool)
        flags[first_at[fresh]] = False
        seen_flags[at] = flags
        seen.add(uniq[fresh])
        new_blocks.append(
            pa.table({"scope": pa.repeat(scope, int(fresh.sum())), "block": uniq[fresh]})
        )
        # shared: seen before this access, or seen again later in this batch; a block seen
        # once before and now again has its first write charged here
        again = np.zeros(len(keys), bool)
        again[by_key[:-1]] = sorted_keys[1:] == sorted_keys[:-1]
        shared_flags[at] = flags | again
        shared = caches.shared.setdefault(scope, _BlockSet())
        was_shared = shared.contains(uniq)
        counts = np.diff(np.append(starts_k, len(keys)))
        deferred[at[first_at[~fresh & ~was_shared]]] = True
        now_shared = ~was_shared & (~fresh | (counts > 1))
        shared.add(uniq[now_shared])
        new_shared.append(
            pa.table({"scope": pa.repeat(scope, int(now_shared.sum())), "block": uniq[now_shared]})
        )
        # bounded LRU (with the provider's TTL), one access at a time; each touched
        # block's last access is appended, with its time
        od = caches.lru.setdefault(scope, OrderedDict())
        ttl_s = _prefix_ttl_s(opts, providers[i], self_hosted=name.startswith("deployment="))
        ttl_us = round(ttl_s * 1_000_000)
        used = access_us[at]
        lru_flags[at] = _simulate_lru(
            od, keys.tolist(), used.tolist(), opts.lru_capacity_blocks, ttl_us
        )
        used_last = zip(uniq.tolist(), used[last_at].tolist(), strict=True)  # evicted: not in od
        touched.append(
            pa.table(
                {
                    "scope": pa.repeat(scope, len(uniq)),
                    "block": uniq,
                    "seq": caches.seq + 1 + last_at,
                    "at_us": np.fromiter((od.get(k, t) for k, t in used_last), np.int64, len(uniq)),
                }
            )
        )
        caches.seq += len(keys)

    inp = table.column("input_tokens").to_numpy()[rows].astype(np.int64)
    cache_read = table.column("cache_read_tokens").to_numpy()[rows].astype(np.int64)
    unb = np.minimum(_leading_hits(seen_flags, starts, lengths) * opts.block_tokens, inp)
    lru = np.minimum(_leading_hits(lru_flags, starts, lengths) * opts.block_tokens, inp)
    # with caching on, a request writes the blocks after its hits; charged: those used
    # again (and, at a block's second access, its first write)
    cache_write = table.column("cache_write_tokens").to_numpy()[rows].astype(np.int64)
    pos = np.arange(len(blocks)) - np.repeat(starts, lengths)
    block_tokens = np.clip(np.repeat(inp, lengths) - pos * opts.block_tokens, 0, opts.block_tokens)
    after_hits = pos * opts.block_tokens >= np.repeat(lru, lengths)
    charged = block_tokens * ((after_hits & shared_flags).astype(np.int64) + deferred)
    written = np.add.reduceat(charged, starts)
    df = pl.from_arrow(
        table.select(["hour", "provider", "model", "deployment", "billing_mode"]).take(rows)
    )
    assert isinstance(df, pl.DataFrame)
    df = df.with_columns(
        pl.Series("input_tokens", inp),
        pl.Series("cache_read_tokens", cache_read),
        pl.Series("unbounded_hit_tokens", unb),
        pl.Series("unbounded_extra_tokens", np.maximum(unb - cache_read, 0)),
        pl.Series("lru_hit_tokens", lru),
        pl.Series("lru_extra_tokens", np.maximum(lru - cache_read, 0)),
        pl.Series("cache_write_tokens", cache_write),
        pl.Series("lru_write_tokens", written),
        pl.Series("lru_write_extra_tokens", np.maximum(written - cache_write, 0)),
    )
    sums = [
        "input_tokens",
        "cache_read_tokens",
        "unbounded_hit_tokens",
        "unbounded_extra_tokens",
        "lru_hit_tokens",
        "lru_extra_tokens",
        "cache_write_tokens",
        "lru_write_tokens",
        "lru_write_extra_tokens",
    ]
    hourly = df.group_by("hour", "provider", "model", "deployment", "billing_mode").agg(
        pl.len().alias("requests"), *(pl.col(c).sum() for c in sums)
    )
    _insert(con, "caching_prefix_hourly", hourly)
    _insert(con, "caching_blocks", pa.concat_tables(new_blocks))
    _insert(con, "caching_shared_blocks", pa.concat_tables(new_shared))
    held = sum(len(od) for od in caches.lru.values())
    rows = pa.concat_tables(touched)
    if caches.lru_rows + rows.num_rows > 2 * held + opts.lru_capacity_blocks:
        con.execute("DELETE FROM caching_lru")  # rewrite: just what the caches hold
        rows = pa.concat_tables(
            pa.table(
                {
                    "scope": pa.repeat(scope, len(od)),
                    "block": np.fromiter(od, np.int64, len(od)),
                    "seq": caches.seq - len(od) + 1 + np.arange(len(od), dtype=np.int64),
                    "at_us": np.fromiter(od.values(), np.int64, len(od)),
                }
            )
            for scope, od in caches.lru.items()
        )
        caches.lru_rows = 0
    _insert(con, "caching_lru", rows)
    caches.lru_rows += rows.num_rows


# -- findings --------------------------------------------------------------------------------


def _event_span(ctx: Context) -> tuple[datetime | None, datetime | None]:
    """The ts of the first and the latest event in the window (None: no event)."""
    row = ctx.con.execute(
        "SELECT min(ts), max(ts) FROM usage_events WHERE ts >= $lo AND ts < $hi",
        {"lo": ctx.window.start, "hi": ctx.window.end},
    ).fetchone()
    return (row[0], row[1]) if row else (None, None)


def _project(
    ctx: Context,
    per_hour: dict[int, float],
    covered: Window,
    events: tuple[datetime | None, datetime | None],
) -> Projection:
    """A scope's saving per hour (epoch hour -> USD, every hour it had traffic present),
    projected over the hours from its first (``ctx.span_start``) to the last hour
    observed (``ctx.hours``);
    when the exact time from the first to the latest event (no earlier than the covered
    start) is shorter, that is the span (seconds of traffic are not an hour of it)."""
    hours = ctx.hours(per_hour.items())
    span = float(len(hours))
    first, last = events
    if hours and first is not None and last is not None:
        first_h = ctx.span_start(min(per_hour))
        start = max(datetime.fromtimestamp(first_h * 3600, UTC), covered.start, first)
        end = min(datetime.fromtimestamp((first_h + len(hours)) * 3600, UTC), last)
        span = min(span, max(0.0, (end - start) / timedelta(hours=1)))
    return ctx.project(hours, span_hours=span)


def _covered(since: datetime | None, window: Window) -> Window | None:
    """The part of ``window`` that was simulated (from ``since`` on); None if none was."""
    if since is None:
        return None
    start = max(window.start, since)
    return Window(start, window.end) if start < window.end else None


def _current_price(prices: PriceBook, provider: str | None, model: str, at: datetime) -> Any:
    """The list price of ``provider``/``model`` in effect on ``at``'s day; None: unknown."""
    key = prices.resolve(provider, model, model)
    return None if key is None else prices.price_at(key, at.date())


def _meters(prices: PriceBook, price: Any) -> tuple[float, float, float, float]:
    """(input, cached input, cache write, batch discount) of ``price``, USD per Mtok: the
    price book's unit prices for its id (what each meter is billed), else its own
    fields (a meter without a price costs the input price)."""
    unit = prices.unit_prices(price.price_id)
    if unit is not None:
        return unit.input, unit.cached_input, unit.cache_write, unit.batch_discount
    p_in = float(price.input_per_mtok)
    cached, written = price.cached_input_per_mtok, price.cache_write_per_mtok
    return (
        p_in,
        p_in if cached is None else float(cached),
        p_in if written is None else float(written),
        float(price.batch_discount),
    )


def _worth(monthly_usd: float, opts: CachingOptions) -> bool:
    """A finding is reported when it saves something, and at least the configured minimum."""
    return monthly_usd > 0 and monthly_usd >= opts.min_monthly_savings_usd


def _ratio(part: float, whole: float) -> float:
    return part / whole if whole else 0.0


@register
class Caching(Analyzer):
    name: ClassVar[str] = NAME
    description: ClassVar[str] = (
        "exact prompt repeats (response cache) and prompt-prefix reuse (prefix cache, "
        "unbounded and LRU)"
    )
    Options: ClassVar[type[Options]] = CachingOptions

    def __init__(self, options: Options | None = None) -> None:
        super().__init__(options)
        self._caches: _Caches | None = None
        self.last_pass: _Pass | None = None

    @property
    def opts(self) -> CachingOptions:
        assert isinstance(self.options, CachingOptions)
        return self.options

    def run(self, ctx: Context) -> list[Finding]:
        caches, self._caches = self._caches, None  # invalid until the pass commits

        def work(con: duckdb.DuckDBPyConnection) -> tuple[_Caches, _Pass, datetime | None]:
            return _process(con, self.opts, caches, ctx.now, ctx.window.start)

        self._caches, self.last_pass, since = ctx.write(work)
        events = _event_span(ctx)
        # exact repeats cover the whole window (the first run counts its history); the
        # prefix caches what was simulated
        out = self._response_findings(ctx, ctx.window, events)
        covered = _covered(since, ctx.window)
        if covered is not None:
            out += self._prefix_findings(ctx, covered, events)
        return out

    # -- exact repeats ---------------------------------------------------------------------

    def _response_findings(
        self, ctx: Context, covered: Window, events: tuple[datetime | None, datetime | None]
    ) -> list[Finding]:
        opts = self.opts
        rows = ctx.con.execute(
            f"""
            WITH r AS (SELECT * FROM caching_response_hourly WHERE {_COVERED_HOURS}),
            {_RATE}
            SELECT tenant, app, feature, epoch(r.hour)::BIGINT // 3600 AS h,
                   sum(requests)::BIGINT AS requests, sum(repeat_requests)::BIGINT AS repeats,
                   sum(CASE WHEN r.deployment IS NULL THEN r.cost_usd
                            ELSE r.tokens * rate.usd_per_token END) AS cost,
                   sum(CASE WHEN r.deployment IS NULL THEN r.repeat_cost_usd
                            ELSE r.repeat_tokens * rate.usd_per_token END) AS repeat_cost,
                   sum(CASE WHEN r.deployment IS NULL THEN r.repeat_unpriced
                            WHEN rate.usd_per_token IS NULL THEN r.repeat_requests
                            ELSE 0 END)::BIGINT AS unpriced
            FROM r LEFT JOIN rate ON r.deployment = rate.deployment AND r.hour = rate.hour
            GROUP BY ALL
            ORDER BY ALL
            """,
            {"lo": covered.start, "hi": covered.end},
        ).to_arrow_table()
        # per scope (consecutive rows: ordered by scope, then hour), its sums in hour order
        # (a cost without a rate counts 0) and its repeats' cost per hour
        keys = list(
            zip(*(rows.column(c).to_pylist() for c in ("tenant", "app", "feature")), strict=True)
        )
        bounds = [i for i in range(len(keys)) if i == 0 or keys[i] != keys[i - 1]]
        hours = rows.column("h").to_numpy()
        columns = {
            c: pc.fill_null(rows.column(c), 0).to_numpy()
            for c in ("requests", "repeats", "cost", "repeat_cost", "unpriced")
        }
        out = []
        for lo, hi in zip(bounds, [*bounds[1:], len(keys)][: len(bounds)], strict=True):
            tenant, app, feature = keys[lo]
            requests, repeats, unpriced = (
                int(columns[c][lo:hi].sum()) for c in ("requests", "repeats", "unpriced")
            )
            if requests < opts.min_requests:
                continue
            # float sums added up hour by hour (cumsum is sequential), as they always were
            cost, repeat_cost = (
                float(np.cumsum(columns[c][lo:hi])[-1]) for c in ("cost", "repeat_cost")
            )
            by_hour = dict(
                zip(hours[lo:hi].tolist(), columns["repeat_cost"][lo:hi].tolist(), strict=True)
            )
            projection = _project(ctx, by_hour, covered, events)
            saving = projection.monthly_usd
            if not _worth(saving, opts):
                continue
            scope = {"tenant": tenant or NONE, "app": app or NONE, "feature": feature or NONE}
            ratio = _ratio(repeats, requests)
            first = datetime.fromtimestamp(min(by_hour) * 3600, UTC)
            out.append(
                self.finding(
                    ctx,
                    kind="caching.response_repeats",
                    scope=scope,
                    title=(
                        f"{ratio:.0%} of {scope['app']}/{scope['feature']} requests "
                        f"({scope['tenant']}) repeat a prompt answered within "
                        f"{opts.response_ttl_s:g}s: a response cache saves "
                        f"${saving:,.0f}/month"
                    ),
                    evidence={
                        "requests": int(requests),
                        "repeat_requests": int(repeats),
                        "response_hit_ratio": ratio,
                        "cost_usd": float(cost or 0.0),
                        "repeat_cost_usd": repeat_cost,
                        "repeat_unpriced_requests": int(unpriced or 0),
                        "ttl_s": opts.response_ttl_s,
                        "covered_start": max(first, covered.start).isoformat(),
                        "covered_days": projection.evidence_hours / 24,
                    },
                    projection=projection,
                    requests=int(requests),
                    savings_method=(
                        "full cost of the requests a response cache would have served (same "
                        "tenant, app, feature, model and prompt_hash answered ok within the "
                        "TTL; self-hosted at the deployment-hour's cost per token), per hour, "
                        "projected to a month over the span from the scope's first to its "
                        "last request in the window"
                    ),
                    confidence=0.7,
                    risk="medium",
                    action=ActionSpec(
                        "gateway.cache",
                        {"mode": "response", "ttl_s": opts.response_ttl_s, "scope": scope},
                    ),
                )
            )
        return out

    # -- prefix reuse ----------------------------------------------------------------------

    def _prefix_findings(
        self, ctx: Context, covered: Window, events: tuple[datetime | None, datetime | None]
    ) -> list[Finding]:
        opts = self.opts
        rows = ctx.con.execute(
            f"""
            WITH p AS (SELECT * FROM caching_prefix_hourly WHERE {_COVERED_HOURS}),
            {_RATE}
            SELECT CASE WHEN p.deployment IS NULL THEN p.provider END AS provider,
                   CASE WHEN p.deployment IS NULL THEN p.model END AS model,
                   p.deployment, billing_mode, epoch(p.hour)::BIGINT // 3600 AS h,
                   sum(requests), sum(input_tokens), sum(cache_read_tokens),
                   sum(unbounded_hit_tokens), sum(lru_hit_tokens), sum(lru_extra_tokens),
                   sum(p.lru_extra_tokens * rate.usd_per_token),
                   sum(p.lru_extra_tokens) FILTER (WHERE rate.usd_per_token IS NULL),
                   sum(cache_write_tokens), sum(lru_write_tokens), sum(lru_write_extra_tokens)
            FROM p LEFT JOIN rate ON p.deployment = rate.deployment AND p.hour = rate.hour
            GROUP BY ALL
            ORDER BY ALL
            """,
            {"lo": covered.start, "hi": covered.end},
        ).fetchall()
        scopes: dict[tuple[str | None, str | None, str | None], dict[str, Any]] = {}
        for provider, model, deployment, billing_mode, h, *values in rows:
            sums = [v or 0 for v in values]
            acc = scopes.setdefault(
                (provider, model, deployment),
                {"by_mode": {}, "by_hour": {}, "sums": [0] * len(sums)},
            )
            before = acc["by_mode"].get(billing_mode, [0] * len(sums))
            acc["by_mode"][billing_mode] = [a + v for a, v in zip(before, sums, strict=True)]
            acc["by_hour"].setdefault(int(h), {})[billing_mode] = sums  # hour: mode -> sums
            acc["sums"] = [a + v for a, v in zip(acc["sums"], sums, strict=True)]
        out = []
        for (provider, model, deployment), acc in scopes.items():
            requests, inp, cache_read, unb, lru, extra, _usd, _unpriced, *writes = acc["sums"]
            if requests < opts.min_requests:
                continue
            evidence: dict[str, Any] = {
                "requests": int(requests),
                "input_tokens": int(inp),
                "cache_read_tokens": int(cache_read),
                "prefix_hit_tokens_unbounded": int(unb),
                "prefix_hit_ratio_unbounded": _ratio(unb, inp),
                "prefix_hit_tokens_lru": int(lru),
                "prefix_hit_ratio_lru": _ratio(lru, inp),
                "lru_capacity_blocks": opts.lru_capacity_blocks,
                "block_tokens": opts.block_tokens,
                "savable_tokens": int(extra),
                "prefix_ttl_s": _prefix_ttl_s(opts, provider, self_hosted=deployment is not None),
                "cache_write_tokens": int(writes[0]),
                "lru_write_tokens": int(writes[1]),
                "premium_write_tokens": int(writes[2]),
                "covered_start": covered.start.isoformat(),
                "covered_days": covered.days,
            }
            first = datetime.fromtimestamp(min(acc["by_hour"]) * 3600, UTC)
            evidence["covered_start"] = max(first, covered.start).isoformat()
            if deployment is None:
                finding = self._api_prefix(ctx, covered, events, provider, model, acc, evidence)
            else:
                finding = self._vllm_prefix(ctx, covered, events, deployment, acc, evidence)
            if finding is not None and _worth(finding.monthly_savings_usd, opts):
                out.append(finding)
        return out

    def _api_prefix(
        self,
        ctx: Context,
        covered: Window,
        events: tuple[datetime | None, datetime | None],
        provider: str | None,
        model: str | None,
        acc: dict[str, Any],
        evidence: dict[str, Any],
    ) -> Finding | None:
        assert model is not None
        price = _current_price(ctx.prices, provider, model, ctx.now)
        if price is None:
            return None
        p_in, p_cached, p_write, batch_discount = _meters(ctx.prices, price)
        if p_in - p_cached <= 0:
            return None  # no cheaper cache reads: nothing for prompt caching to save

        # hits not yet billed as cache reads save (input - cached input); what caching
        # writes beyond today's cache writes costs (cache write - input) more
        def hit_and_premium(by_mode: dict[str, list[Any]]) -> tuple[float, float]:
            hit_usd = premium_usd = 0.0
            for mode, sums in by_mode.items():
                discount = batch_discount if mode == "batch" else 0.0
                hit_usd += (sums[5] or 0) * (p_in - p_cached) / PER_MILLION * (1 - discount)
                premium_usd += (sums[10] or 0) * (p_write - p_in) / PER_MILLION * (1 - discount)
            return hit_usd, premium_usd

        hit_usd, premium_usd = hit_and_premium(acc["by_mode"])
        saved = hit_usd - premium_usd
        per_hour = {h: float(np.subtract(*hit_and_premium(m))) for h, m in acc["by_hour"].items()}
        projection = _project(ctx, per_hour, covered, events)
        saving = projection.monthly_usd
        scope = {"provider": provider or NONE, "model": model}
        evidence |= {
            "price_id": price.price_id,
            "input_per_mtok": p_in,
            "cached_input_per_mtok": p_cached,
            "cache_write_per_mtok": p_write,
            "hit_savings_usd": hit_usd,
            "write_premium_usd": premium_usd,
            "saved_usd": saved,
            "covered_days": projection.evidence_hours / 24,
        }
        return self.finding(
            ctx,
            kind="caching.prompt_prefix",
            scope=scope,
            title=(
                f"{evidence['prefix_hit_ratio_lru']:.0%} of {model} input tokens repeat an "
                f"earlier prompt prefix: prompt caching saves ${saving:,.0f}/month"
            ),
            evidence=evidence,
            projection=projection,
            requests=evidence["requests"],
            savings_method=(
                "LRU prefix-cache hit tokens (within the provider's cache TTL) not already "
                "billed as cache reads times (input - cached input), less the tokens it "
                "writes beyond today's cache writes times (cache write - input), at the "
                "model's current price (batch discount applied), per hour, projected to a "
                "month over the span of the simulated hours from its first to its last request"
            ),
            confidence=0.6,
            risk="low",
            action=ActionSpec(
                "gateway.cache",
                {
                    "mode": "prompt_prefix",
                    "provider": scope["provider"],
                    "model": model,
                    "min_prefix_tokens": self.opts.block_tokens,
                },
            ),
        )

    def _vllm_prefix(
        self,
        ctx: Context,
        covered: Window,
        events: tuple[datetime | None, datetime | None],
        deployment: str,
        acc: dict[str, Any],
        evidence: dict[str, Any],
    ) -> Finding | None:
        opts = self.opts
        priced_usd, unpriced_tokens = acc["sums"][6], acc["sums"][7]
        saved = float(priced_usd or 0.0) * opts.prefill_share
        per_hour = {
            h: sum(float(v[6] or 0.0) for v in m.values()) * opts.prefill_share
            for h, m in acc["by_hour"].items()
        }
        projection = _project(ctx, per_hour, covered, events)
        saving = projection.monthly_usd
        evidence |= {
            "prefill_share": opts.prefill_share,
            "savable_cost_usd": float(priced_usd or 0.0),
            "saved_usd": saved,
            "unpriced_savable_tokens": int(unpriced_tokens or 0),
            "covered_days": projection.evidence_hours / 24,
        }
        if not math.isfinite(saving):
            return None
        return self.finding(
            ctx,
            kind="caching.vllm_prefix",
            scope={"deployment": deployment},
            title=(
                f"{evidence['prefix_hit_ratio_lru']:.0%} of {deployment}'s prompt tokens repeat "
                f"an earlier prefix: prefix caching saves ${saving:,.0f}/month of prefill"
            ),
            evidence=evidence,
            projection=projection,
            requests=evidence["requests"],
            savings_method=(
                "LRU prefix-cache hit tokens not already served from cache, times the "
                "deployment-hour's cost per token, times prefill_share, per hour, projected "
                "to a month over the span of the simulated hours from its first to its last "
                "request"
            ),
            confidence=0.5,
            risk="low",
            action=ActionSpec(
                "vllm.prefix_caching",
                {
                    "deployment": deployment,
                    "enable_prefix_caching": True,
                    "cache_blocks": opts.lru_capacity_blocks,
                    "block_tokens": opts.block_tokens,
                },
            ),
        )
