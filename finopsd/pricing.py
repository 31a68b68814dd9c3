"""Where an event gets its price: list prices per provider and model, GPU-hours for self-hosting.

Two ways a usage event is priced:

* **API models** from a price catalog: the one shipped in the package
  (``finopsd/data/prices.csv``) or the file ``pricing.catalog`` names, plus
  ``[[pricing.prices]]`` entries in config.toml that override it. Each price
  has an ``effective_from`` date: an event is priced with the latest price in
  effect at its ``ts``, so a price change applies only from its date. Prices
  are USD per million tokens per meter (input, cached-input read, cache write,
  output) and a batch discount (a fraction of list) that applies to events
  with ``billing_mode = "batch"``. ``PriceBook.price`` prices a decoded batch
  at ingest.
* **Self-hosted deployments** from GPU-hours: ``[[pricing.deployments]]``
  says how many GPUs of which type serve a deployment, and
  ``[pricing.gpu_hour_usd]`` what a GPU-hour of each type costs. An hour's GPU
  cost is spread over the tokens the deployment served in that hour (input and
  output tokens alike), so an hour that is half idle makes its tokens twice as
  dear; an hour with no tokens at all keeps its cost in ``deployment_hours``.
  This can only be known once the hour is over: ``settle_self_hosted`` prices
  completed hours (and again when late events arrive); until then a
  self-hosted event's cost columns are NULL.

Token accounting follows OpenTelemetry GenAI: ``input_tokens`` counts every
input token, cached ones included, so uncached input is ``input_tokens`` minus
cache reads minus cache writes. Reasoning tokens are part of ``output_tokens``.

A gateway may send its own figure (``cost_usd`` on the wire, stored as
``gateway_cost_usd``); finopsd keeps both and counts the events where they
disagree by more than ``pricing.disagreement_tolerance`` (relative).
"""

from __future__ import annotations

import csv
import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any

import duckdb
import polars as pl
import pyarrow as pa

from finopsd.store import utc_floor

log = logging.getLogger(__name__)

PER_MILLION = 1_000_000

COST_SCHEMA = pa.schema(
    [
        pa.field("input_cost_usd", pa.float64()),
        pa.field("cached_input_cost_usd", pa.float64()),
        pa.field("cache_write_cost_usd", pa.float64()),
        pa.field("output_cost_usd", pa.float64()),
        pa.field("list_cost_usd", pa.float64()),
        pa.field("discount_rate", pa.float64()),
        pa.field("cost_usd", pa.float64()),
        pa.field("price_source", pa.string()),
        pa.field("price_id", pa.string()),
    ]
)
"""Columns ``PriceBook.price`` adds to a batch of usage events (and the store keeps).

Per-meter costs are at list price; ``cost_usd = list_cost_usd * (1 - discount_rate)``
is what is billed. ``price_source``: catalog | config | self_hosted | NULL (unpriced,
every cost NULL). ``price_id``: ``provider/model@effective_from`` or
``self_hosted/<deployment>``."""

SELF_HOSTED = "self_hosted"


class PricingError(ValueError):
    """A price catalog or pricing setting that cannot be used; the message names it."""


@dataclass(frozen=True)
class Price:
    """List prices of one model from one date on, in ``currency`` per million tokens."""

    provider: str
    model: str
    effective_from: date
    input_per_mtok: float
    output_per_mtok: float
    cached_input_per_mtok: float | None = None  # None: cache reads cost the input price
    cache_write_per_mtok: float | None = None  # None: cache writes cost the input price
    batch_discount: float = 0.0
    currency: str = "USD"
    source: str = "catalog"

    @property
    def key(self) -> str:
        return f"{self.provider}/{self.model}"

    @property
    def price_id(self) -> str:
        return f"{self.key}@{self.effective_from.isoformat()}"


@dataclass(frozen=True)
class UnitPrices:
    """What one ``price_id`` charges per meter, in USD per million tokens (list price).

    ``cached_input`` and ``cache_write`` are the prices actually applied to those
    meters (the input price where the catalog has none). ``batch_discount`` is the
    fraction of list taken off batch-billed events. ``source`` says where the price
    comes from (catalog name and version, or "config"); ``details`` is a short
    human-readable description of the price (FOCUS ``SkuPriceDetails``).
    """

    price_id: str
    input: float
    cached_input: float
    cache_write: float
    output: float
    batch_discount: float
    source: str
    details: str


@dataclass(frozen=True)
class Deployment:
    """A self-hosted deployment: ``gpus`` GPUs of ``gpu_type`` at ``gpu_hour_usd`` each."""

    name: str
    gpu_type: str
    gpus: int
    gpu_hour_usd: float

    @property
    def hour_cost_usd(self) -> float:
        return self.gpus * self.gpu_hour_usd


_PRICE_FIELDS = (
    "provider",
    "model",
    "effective_from",
    "input_per_mtok",
    "cached_input_per_mtok",
    "cache_write_per_mtok",
    "output_per_mtok",
    "batch_discount",
    "currency",
)


def price_from_mapping(row: Mapping[str, Any], *, where: str, source: str) -> Price:
    """A ``Price`` from a catalog row or a config entry; errors name ``where`` and the field."""
    missing = [k for k in ("provider", "model", "effective_from") if not row.get(k)]
    missing += [k for k in ("input_per_mtok", "output_per_mtok") if row.get(k) in (None, "")]
    if missing:
        raise PricingError(f"{where}: missing {', '.join(missing)}")

    def number(name: str, *, optional: bool) -> float | None:
        value = row.get(name)
        if value in (None, ""):
            if optional:
                return None
            raise PricingError(f"{where}: missing {name}")
        try:
            number = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise PricingError(f"{where}: {name} is not a number: {value!r}") from None
        if not number >= 0:
            raise PricingError(f"{where}: {name} must be >= 0, got {value!r}")
        return number

    effective = row["effective_from"]
    if isinstance(effective, datetime):
        effective = effective.date()
    elif not isinstance(effective, date):
        try:
            effective = date.fromisoformat(str(effective))
        except ValueError:
            raise PricingError(
                f"{where}: effective_from is not a date (YYYY-MM-DD): {effective!r}"
            ) from None
    discount = number("batch_discount", optional=True) or 0.0
    if discount > 1:
        raise PricingError(f"{where}: batch_discount is a fraction of list (0..1), got {discount}")
    currency = str(row.get("currency") or "USD").upper()
    if currency != "USD":
        raise PricingError(f"{where}: currency {currency!r}: only USD prices are supported")
    return Price(
        provider=str(row["provider"]),
        model=str(row["model"]),
        effective_from=effective,
        input_per_mtok=number("input_per_mtok", optional=False) or 0.0,
        output_per_mtok=number("output_per_mtok", optional=False) or 0.0,
        cached_input_per_mtok=number("cached_input_per_mtok", optional=True),
        cache_write_per_mtok=number("cache_write_per_mtok", optional=True),
        batch_discount=discount,
        currency=currency,
        source=source,
    )


def load_catalog(path: Path | None = None) -> list[Price]:
    """Prices from a catalog CSV with the shipped ``prices.csv``'s columns (None: that file)."""
    if path is None:
        text = resources.files("finopsd").joinpath("data/prices.csv").read_text()
        name = "finopsd/data/prices.csv"
    else:
        try:
            text = path.read_text()
        except OSError as exc:
            raise PricingError(f"price catalog {path}: {exc.strerror or exc}") from None
        name = str(path)
    reader = csv.DictReader(text.splitlines())
    absent = [f for f in _PRICE_FIELDS if f not in (reader.fieldnames or [])]
    if absent:
        raise PricingError(f"price catalog {name}: missing column(s) {', '.join(absent)}")
    return [
        price_from_mapping(row, where=f"price catalog {name} line {line}", source="catalog")
        for line, row in enumerate(reader, start=2)
    ]


@dataclass
class PricingStats:
    """What pricing one batch found worth counting."""

    unpriced: Counter[str] = field(default_factory=Counter)  # "provider/model" -> events
    disagreements: int = 0  # events where the gateway's cost and ours disagree


class PriceBook:
    """Prices usage events: the catalog with config overrides, and self-hosted deployments.

    ``price(rows)`` is pure and safe to call from a worker thread.
    """

    def __init__(
        self,
        prices: Iterable[Price],
        deployments: Iterable[Deployment] = (),
        *,
        disagreement_tolerance: float = 0.01,
    ) -> None:
        merged: dict[tuple[str, str, date], Price] = {}
        for price in prices:  # later entries (config) replace earlier ones (catalog)
            merged[(price.provider, price.model, price.effective_from)] = price
        self.prices = sorted(merged.values(), key=lambda p: (p.key, p.effective_from))
        self.deployments = {d.name: d for d in deployments}
        self.disagreement_tolerance = disagreement_tolerance
        self._models: dict[str, set[str]] = {}
        for p in self.prices:
            self._models.setdefault(p.provider, set()).add(p.model)
        self._frame = pl.DataFrame(
            {
                "price_key": [p.key for p in self.prices],
                "effective_from": [
                    datetime.combine(p.effective_from, datetime.min.time(), UTC)
                    for p in self.prices
                ],
                "p_input": [p.input_per_mtok for p in self.prices],
                "p_cached": [
                    p.input_per_mtok if p.cached_input_per_mtok is None else p.cached_input_per_mtok
                    for p in self.prices
                ],
                "p_write": [
                    p.input_per_mtok if p.cache_write_per_mtok is None else p.cache_write_per_mtok
                    for p in self.prices
                ],
                "p_output": [p.output_per_mtok for p in self.prices],
                "p_batch": [p.batch_discount for p in self.prices],
                "p_source": [p.source for p in self.prices],
                "p_id": [p.price_id for p in self.prices],
            },
            schema={
                "price_key": pl.String,
                "effective_from": pl.Datetime("us", "UTC"),
                "p_input": pl.Float64,
                "p_cached": pl.Float64,
                "p_write": pl.Float64,
                "p_output": pl.Float64,
                "p_batch": pl.Float64,
                "p_source": pl.String,
                "p_id": pl.String,
            },
        ).sort("effective_from")
        self._resolved: dict[tuple[str | None, str | None, str | None, str | None], str | None]
        self._resolved = {}
        self._warned: set[str] = set()

    @classmethod
    def from_settings(cls, settings: Any) -> PriceBook:
        """The price book that ``[pricing]`` in config.toml describes (a ``PricingSettings``)."""
        prices = load_catalog(settings.catalog)
        for i, entry in enumerate(settings.prices):
            prices.append(
                price_from_mapping(
                    entry.model_dump(), where=f"pricing.prices[{i}]", source="config"
                )
            )
        # PricingSettings has checked that every deployment's GPU type has a rate
        deployments = [
            Deployment(
                d.name,
                d.gpu_type,
                d.gpus,
                d.gpu_hour_usd if d.gpu_hour_usd is not None else settings.gpu_hour_usd[d.gpu_type],
            )
            for d in settings.deployments
        ]
        return cls(prices, deployments, disagreement_tolerance=settings.disagreement_tolerance)

    # -- matching ---------------------------------------------------------------------

    def price_at(self, key: str, on: date) -> Price | None:
        """The price of ``key`` ("provider/model") in effect on ``on``; None before its first."""
        found = None
        for p in self.prices:  # sorted by key, then effective_from
            if p.key == key and p.effective_from <= on:
                found = p
        return found

    def resolve(
        self,
        provider: str | None,
        response_model: str | None,
        request_model: str | None,
        deployment: str | None = None,
    ) -> str | None:
        """The price key for an event: ``self_hosted/<deployment>``, ``provider/model``, or None.

        The model that answered is preferred to the one asked for. A dated or
        suffixed name (``gpt-4o-2024-08-06``) takes the longest catalog model it
        starts with (``gpt-4o``, not ``gpt-4``). With no provider, a model name
        that only one provider prices is enough.
        """
        memo = (provider, response_model, request_model, deployment)
        if memo in self._resolved:
            return self._resolved[memo]
        key: str | None = None
        if deployment is not None and deployment in self.deployments:
            key = f"{SELF_HOSTED}/{deployment}"
        else:
            providers = [provider] if provider else sorted(self._models)
            for model in (response_model, request_model):
                if not model:
                    continue
                found = {p: m for p in providers if (m := self._match(p, model))}
                if len(found) == 1:
                    ((p, m),) = found.items()
                    key = f"{p}/{m}"
                    break
        self._resolved[memo] = key
        return key

    def _match(self, provider: str, model: str) -> str | None:
        models = self._models.get(provider, set())
        if model in models:
            return model
        # "openai/gpt-4o" as some gateways write it
        if "/" in model and model.split("/", 1)[1] in models and model.startswith(provider):
            return model.split("/", 1)[1]
        best = None
        for m in models:
            longer = best is None or len(m) > len(best)
            if longer and model.startswith(m) and model[len(m) : len(m) + 1] in ("-", "@", ":"):
                best = m
        return best

    def unit_prices(self, price_id: str) -> UnitPrices | None:
        """The per-meter prices behind ``price_id`` (as stored on events); None if unknown."""
        for p in self.prices:
            if p.price_id == price_id:
                cached = (
                    p.input_per_mtok if p.cached_input_per_mtok is None else p.cached_input_per_mtok
                )
                write = (
                    p.input_per_mtok if p.cache_write_per_mtok is None else p.cache_write_per_mtok
                )
                return UnitPrices(
                    price_id=price_id,
                    input=p.input_per_mtok,
                    cached_input=cached,
                    cache_write=write,
                    output=p.output_per_mtok,
                    batch_discount=p.batch_discount,
                    source=p.source,
                    details=f"{p.key} list price from {p.effective_from.isoformat()}",
                )
        return None

    # -- pricing ----------------------------------------------------------------------

    def price(self, rows: pa.Table) -> tuple[pa.Table, PricingStats]:
        """``rows`` (usage events, store columns) with ``COST_SCHEMA`` columns appended."""
        stats = PricingStats()
        if rows.num_rows == 0:
            return _append(rows, COST_SCHEMA.empty_table()), stats
        names = ["provider", "response_model", "request_model", "deployment"]
        frame = pl.DataFrame(
            rows.select(
                [
                    *names,
                    "ts",
                    "billing_mode",
                    "input_tokens",
                    "output_tokens",
                    "cache_read_input_tokens",
                    "cache_creation_input_tokens",
                    "gateway_cost_usd",
                ]
            )
        ).with_row_index("__row")
        combos = frame.select(names).unique()
        keys = [self.resolve(*combo) for combo in combos.iter_rows()]
        combos = combos.with_columns(pl.Series("price_key", keys, dtype=pl.String))
        frame = frame.join(combos, on=names, how="left", nulls_equal=True)
        priced = (
            frame.sort("ts")
            .join_asof(
                self._frame,
                left_on="ts",
                right_on="effective_from",
                by="price_key",
                strategy="backward",
                check_sortedness=False,  # both sides are sorted by time just above
            )
            .sort("__row")
        )
        cache_read = pl.col("cache_read_input_tokens").fill_null(0)
        cache_write = pl.col("cache_creation_input_tokens").fill_null(0)
        uncached = pl.max_horizontal(pl.col("input_tokens") - cache_read - cache_write, pl.lit(0))
        out = priced.select(
            (uncached * pl.col("p_input") / PER_MILLION).alias("input_cost_usd"),
            (cache_read * pl.col("p_cached") / PER_MILLION).alias("cached_input_cost_usd"),
            (cache_write * pl.col("p_write") / PER_MILLION).alias("cache_write_cost_usd"),
            (pl.col("output_tokens") * pl.col("p_output") / PER_MILLION).alias("output_cost_usd"),
            pl.when(pl.col("p_id").is_null())
            .then(None)
            .when(pl.col("billing_mode") == "batch")
            .then(pl.col("p_batch"))
            .otherwise(0.0)
            .alias("discount_rate"),
            pl.when(pl.col("price_key").str.starts_with(f"{SELF_HOSTED}/"))
            .then(pl.lit(SELF_HOSTED))
            .otherwise(pl.col("p_source"))
            .alias("price_source"),
            pl.when(pl.col("price_key").str.starts_with(f"{SELF_HOSTED}/"))
            .then(pl.col("price_key"))
            .otherwise(pl.col("p_id"))
            .alias("price_id"),
            pl.col("gateway_cost_usd"),
            pl.col("provider"),
            pl.col("request_model"),
        )
        # a null meter (no price) makes the sums null too: unpriced, not free
        list_cost = (
            pl.col("input_cost_usd")
            + pl.col("cached_input_cost_usd")
            + pl.col("cache_write_cost_usd")
            + pl.col("output_cost_usd")
        )
        out = out.with_columns(
            list_cost.alias("list_cost_usd"),
            (list_cost * (1 - pl.col("discount_rate"))).alias("cost_usd"),
        )
        unpriced = out.filter(pl.col("price_source").is_null())
        if unpriced.height:
            for provider, model, n in unpriced.group_by("provider", "request_model").len().rows():
                name = f"{provider or '?'}/{model}"
                stats.unpriced[name] += n
                if name not in self._warned:
                    self._warned.add(name)
                    log.warning(
                        "no price for %s: its events are stored unpriced; add it with "
                        "[[pricing.prices]] (or [[pricing.deployments]] if self-hosted)",
                        name,
                    )
        tolerance = self.disagreement_tolerance
        gateway, ours = pl.col("gateway_cost_usd"), pl.col("cost_usd")
        stats.disagreements = out.filter(
            gateway.is_not_null()
            & ours.is_not_null()
            & ((gateway - ours).abs() > pl.max_horizontal(gateway, ours) * tolerance + 1e-9)
        ).height
        costs = out.select(COST_SCHEMA.names).to_arrow()
        return _append(rows, costs.cast(COST_SCHEMA)), stats


def _append(rows: pa.Table, costs: pa.Table) -> pa.Table:
    for name in costs.column_names:
        rows = rows.append_column(costs.schema.field(name), costs.column(name))
    return rows


# -- self-hosted deployments -----------------------------------------------------------------


def settle_self_hosted(
    con: duckdb.DuckDBPyConnection,
    deployments: Iterable[Deployment],
    *,
    until: datetime,
    lookback: timedelta = timedelta(hours=48),
) -> int:
    """Price the completed hours of each deployment that end by ``until``; returns hours settled.

    An hour counts when the deployment served an event in it or reported a GPU
    sample for it (``gpu_samples.deployment``): that is when its GPUs were up.
    Each hour's cost (GPUs × GPU-hour price) goes to ``deployment_hours`` and is
    spread over that hour's input and output tokens in ``usage_events``.
    Idempotent: settling an hour again (late events) recomputes it. The caller
    owns the transaction.
    """
    end = until.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    start = end - lookback
    now = datetime.now(UTC)
    settled = 0
    hour = utc_floor("ts", 3600)
    for d in deployments:
        rows = con.execute(
            f"""
            WITH hours AS (
                SELECT DISTINCT {hour} AS hour FROM usage_events
                WHERE deployment = $name AND ts >= $start AND ts < $end
                UNION
                SELECT DISTINCT {hour} AS hour FROM gpu_samples
                WHERE deployment = $name AND ts >= $start AND ts < $end
            ),
            served AS (
                SELECT {hour} AS hour, count(*) AS requests,
                       sum(input_tokens + output_tokens) AS tokens
                FROM usage_events
                WHERE deployment = $name AND ts >= $start AND ts < $end
                GROUP BY 1
            )
            INSERT OR REPLACE INTO deployment_hours
            SELECT $name, h.hour, $gpu_type, $gpus, $rate, $gpus * $rate,
                   coalesce(s.requests, 0), coalesce(s.tokens, 0), $now
            FROM hours h LEFT JOIN served s USING (hour)
            """,
            {
                "name": d.name,
                "start": start,
                "end": end,
                "gpu_type": d.gpu_type,
                "gpus": d.gpus,
                "rate": d.gpu_hour_usd,
                "now": now,
            },
        ).fetchone()
        settled += int(rows[0]) if rows else 0
        con.execute(
            f"""
            UPDATE usage_events AS e SET
                input_cost_usd = e.input_tokens * h.cost_usd / h.tokens,
                cached_input_cost_usd = 0,
                cache_write_cost_usd = 0,
                output_cost_usd = e.output_tokens * h.cost_usd / h.tokens,
                list_cost_usd = (e.input_tokens + e.output_tokens) * h.cost_usd / h.tokens,
                discount_rate = 0,
                cost_usd = (e.input_tokens + e.output_tokens) * h.cost_usd / h.tokens,
                price_source = '{SELF_HOSTED}',
                price_id = '{SELF_HOSTED}/' || $name
            FROM deployment_hours h
            WHERE e.deployment = $name AND h.deployment = $name
              AND e.ts >= $start AND e.ts < $end
              AND h.hour = {utc_floor("e.ts", 3600)} AND h.tokens > 0
            """,
            {"name": d.name, "start": start, "end": end},
        )
    return settled


def spend_summary(con: duckdb.DuckDBPyConnection, tolerance: float = 0.01) -> dict[str, Any]:
    """Priced spend in the store, what is not priced (yet), and gateway disagreements."""
    row = con.execute(
        """
        SELECT coalesce(sum(cost_usd), 0),
               count(*) FILTER (WHERE price_source IS NULL),
               count(*) FILTER (WHERE price_source = 'self_hosted' AND cost_usd IS NULL),
               count(*) FILTER (WHERE gateway_cost_usd IS NOT NULL AND cost_usd IS NOT NULL
                   AND abs(gateway_cost_usd - cost_usd)
                       > greatest(gateway_cost_usd, cost_usd) * ? + 1e-9)
        FROM usage_events
        """,
        [tolerance],
    ).fetchone()
    idle = con.execute("SELECT coalesce(sum(cost_usd), 0) FROM deployment_hours WHERE tokens = 0")
    idle_row = idle.fetchone()
    assert row is not None and idle_row is not None
    return {
        "cost_usd": float(row[0]),
        "idle_gpu_cost_usd": float(idle_row[0]),
        "unpriced_events": int(row[1]),
        "self_hosted_pending_events": int(row[2]),
        "gateway_disagreements": int(row[3]),
    }


def cost_per_million_tokens(
    con: duckdb.DuckDBPyConnection, deployment: str, start: datetime, end: datetime
) -> float | None:
    """A deployment's real $/1M tokens over [start, end): all its GPU-hours, idle ones too."""
    row = con.execute(
        "SELECT sum(cost_usd), sum(tokens) FROM deployment_hours "
        "WHERE deployment = ? AND hour >= ? AND hour < ?",
        [deployment, start, end],
    ).fetchone()
    if not row or not row[1]:
        return None
    return float(row[0]) / float(row[1]) * PER_MILLION


__all__ = [
    "COST_SCHEMA",
    "Deployment",
    "Price",
    "PriceBook",
    "PricingError",
    "PricingStats",
    "UnitPrices",
    "cost_per_million_tokens",
    "load_catalog",
    "settle_self_hosted",
    "spend_summary",
]
