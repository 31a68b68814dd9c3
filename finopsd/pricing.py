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
import hashlib
import logging
import threading
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import polars as pl
import pyarrow as pa

from finopsd.catalog import (
    GenaiCatalog,
    ModelPricing,
    merge,
    midnight,
    rules_from_prices,
    shipped_csv_catalog,
)
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
        pa.field("price_catalog", pa.string()),
    ]
)
"""Columns ``PriceBook.price`` adds to a batch of usage events (and the store keeps).

Per-meter costs are at list price; ``cost_usd = list_cost_usd * (1 - discount_rate)``
is what is billed (batch prices for batch traffic: ``discount_rate`` is then what they
take off list). ``price_source``: catalog | config | self_hosted | cache_hit (a
gateway's response-cache hit: costs 0) | NULL (unpriced, every cost NULL).
``price_id``: ``provider/model@<effective date or "list">``, with ``~HHMM-HHMMZ`` for
a time-of-day price and ``>N`` for the tier above N input tokens, or
``self_hosted/<deployment>``. ``price_catalog``: what priced it — ``genai-prices
<version>``, ``prices.csv <sha>``, ``config`` — so a later catalog can re-price."""

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
    reference: str = ""  # where the price is published (the CSV's source column)

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
        text, _label = shipped_csv_catalog()
        return load_catalog_text(text, name="finopsd/data/prices.csv")
    try:
        text = path.read_text()
    except OSError as exc:
        raise PricingError(f"price catalog {path}: {exc.strerror or exc}") from None
    return load_catalog_text(text, name=str(path))


def load_catalog_text(text: str, *, name: str) -> list[Price]:
    """Prices from the text of a catalog CSV; errors name ``name``, the line and the field."""
    reader = csv.DictReader(text.splitlines())
    absent = [f for f in _PRICE_FIELDS if f not in (reader.fieldnames or [])]
    if absent:
        raise PricingError(f"price catalog {name}: missing column(s) {', '.join(absent)}")
    prices = []
    for line, row in enumerate(reader, start=2):
        price = price_from_mapping(row, where=f"price catalog {name} line {line}", source="catalog")
        prices.append(replace(price, reference=str(row.get("source") or "")))
    return prices


@dataclass
class PricingStats:
    """What pricing one batch found worth counting."""

    unpriced: Counter[str] = field(default_factory=Counter)  # "provider/model" -> events
    disagreements: int = 0  # events where the gateway's cost and ours disagree


class PriceBook:
    """Prices usage events: config entries, the CSV catalog, genai-prices, self-hosting.

    ``resolve`` names the price of an event (a ``provider/model`` key); ``price(rows)``
    prices a decoded batch (pure, safe to call from a worker thread); ``price_at``
    and ``unit_prices`` say what a key or a stored ``price_id`` charges. See
    ``finopsd.catalog`` for precedence and the rules.
    """

    def __init__(
        self,
        prices: Iterable[Price] = (),
        deployments: Iterable[Deployment] = (),
        *,
        disagreement_tolerance: float = 0.01,
        genai: GenaiCatalog | None = None,
        catalog_label: str = "prices.csv",
    ) -> None:
        merged: dict[tuple[str, str, date], Price] = {}
        for price in prices:  # later entries (config) replace earlier ones (catalog)
            merged[(price.provider, price.model, price.effective_from)] = price
        self.prices = sorted(merged.values(), key=lambda p: (p.key, p.effective_from))
        self.deployments = {d.name: d for d in deployments}
        self.disagreement_tolerance = disagreement_tolerance
        self.genai = genai
        self.catalog_label = catalog_label
        self._explicit = rules_from_prices(self.prices, catalog=catalog_label)
        self._models: dict[str, set[str]] = {}
        for p in self.prices:
            self._models.setdefault(p.provider, set()).add(p.model)
        self._resolved: dict[tuple[str | None, str | None, str | None, str | None], str | None]
        self._resolved = {}
        self._pricing: dict[str, ModelPricing | None] = {}
        self._segments: dict[str, pl.DataFrame] = {}
        self._warned: set[str] = set()
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Any) -> PriceBook:
        """The price book that ``[pricing]`` in config.toml describes (a ``PricingSettings``)."""
        if settings.catalog is None:
            text, label = shipped_csv_catalog()
            prices = load_catalog_text(text, name="finopsd/data/prices.csv")
        else:
            prices = load_catalog(settings.catalog)
            label = f"{settings.catalog.name} {_sha8(settings.catalog)}"
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
        return cls(
            prices,
            deployments,
            disagreement_tolerance=settings.disagreement_tolerance,
            genai=GenaiCatalog(),
            catalog_label=label,
        )

    @classmethod
    def shipped(cls, deployments: Iterable[Deployment] = ()) -> PriceBook:
        """The shipped catalogs only (genai-prices and ``prices.csv``), no config."""
        text, label = shipped_csv_catalog()
        prices = load_catalog_text(text, name="finopsd/data/prices.csv")
        return cls(prices, deployments, genai=GenaiCatalog(), catalog_label=label)

    # -- matching ---------------------------------------------------------------------

    def resolve(
        self,
        provider: str | None,
        response_model: str | None,
        request_model: str | None,
        deployment: str | None = None,
    ) -> str | None:
        """The price key for an event: ``self_hosted/<deployment>``, ``provider/model``, or None.

        The model that answered is preferred to the one asked for. A config or CSV
        entry matches by its exact name (``openai/gpt-4o`` as gateways write it
        too); otherwise genai-prices resolves the name by the provider's rules
        (dated snapshots and aliases: ``gpt-4o-2024-08-06`` is ``gpt-4o``). With no
        provider, a model name only one provider prices is enough. Never a guess by
        prefix: a name nobody knows stays unpriced (None).
        """
        memo = (provider, response_model, request_model, deployment)
        if memo in self._resolved:
            return self._resolved[memo]
        key: str | None = None
        if deployment is not None and deployment in self.deployments:
            key = f"{SELF_HOSTED}/{deployment}"
        else:
            for model in (response_model, request_model):
                if not model:
                    continue
                key = self._match_explicit(provider, model)
                if key is None and self.genai is not None:
                    key = self.genai.find(provider, model)
                if key is not None:
                    break
        self._resolved[memo] = key
        return key

    def _match_explicit(self, provider: str | None, model: str) -> str | None:
        providers = [provider] if provider else sorted(self._models)
        found = set()
        for p in providers:
            models = self._models.get(p, set())
            if model in models:
                found.add(f"{p}/{model}")
            elif "/" in model and model.split("/", 1)[0] == p and model.split("/", 1)[1] in models:
                found.add(f"{p}/{model.split('/', 1)[1]}")  # "openai/gpt-4o"
        return found.pop() if len(found) == 1 else None

    def pricing(self, key: str) -> ModelPricing | None:
        """Every rule that prices ``key`` (genai-prices' with config and CSV ones over them)."""
        if key not in self._pricing:
            base = self.genai.pricing(key) if self.genai is not None else None
            self._pricing[key] = merge(base, self._explicit.get(key))
        return self._pricing[key]

    def price_at(self, key: str, on: date) -> Price | None:
        """What ``key`` charges on ``on`` (at noon UTC; the lowest tier); None if unpriced.

        For analyzers' what-if figures; events themselves are priced by ``price``.
        """
        pricing = self.pricing(key) if not key.startswith(f"{SELF_HOSTED}/") else None
        rule = pricing.rule_at(midnight(on) + timedelta(hours=12)) if pricing else None
        if rule is None:
            return None
        tier = rule.tiers[0]
        provider, _, model = key.partition("/")
        return Price(
            provider,
            model,
            (rule.effective_from or midnight(date(1970, 1, 1))).date(),
            tier.list.input,
            tier.list.output,
            tier.list.cached_input,
            tier.list.cache_write,
            rule.batch_discount,
            source=rule.source,
        )

    def unit_prices(self, price_id: str) -> UnitPrices | None:
        """The per-meter list prices behind a stored ``price_id``; None if unknown."""
        key = price_id.split("@", 1)[0]
        pricing = None if key.startswith(f"{SELF_HOSTED}/") else self.pricing(key)
        for rule in pricing.rules if pricing else ():
            for tier in rule.tiers:
                if rule.tier_id(tier) != price_id:
                    continue
                m = tier.list
                above = (
                    f" for requests over {tier.above_input_tokens:,} input tokens"
                    if tier.above_input_tokens >= 0
                    else ""
                )
                return UnitPrices(
                    price_id=price_id,
                    input=m.input,
                    cached_input=m.cached_input,
                    cache_write=m.cache_write,
                    output=m.output,
                    batch_discount=rule.batch_discount,
                    source=rule.catalog,
                    details=(
                        f"USD per million tokens{above}: input {m.input:g}, cached input "
                        f"{m.cached_input:g}, cache write {m.cache_write:g}, output "
                        f"{m.output:g} ({rule.catalog}; {rule.reference})"
                    ),
                )
        return None

    # -- pricing ----------------------------------------------------------------------

    def _segments_of(self, key: str) -> pl.DataFrame:
        """``key``'s rules as a timeline: per time-of-day slot, the tiers from each date on."""
        with self._lock:
            if key in self._segments:
                return self._segments[key]
        pricing = self.pricing(key)
        rows: list[dict[str, Any]] = []
        if pricing is not None:
            starts = sorted({r.effective_from for r in pricing.rules if r.effective_from})
            edges = sorted({0, *(m for r in pricing.rules if r.time_of_day for m in r.time_of_day)})
            edges = [e for e in edges if e < MINUTES_PER_DAY]
            for minute in edges:
                for start in [EARLIEST, *starts]:
                    rule = pricing.rule_at(start + timedelta(minutes=minute))
                    row: dict[str, Any] = {
                        "price_key": key,
                        "slot_start": minute,
                        "seg_start": start,
                        "s_source": rule.source if rule else None,
                        "s_catalog": rule.catalog if rule else None,
                    }
                    for t in range(MAX_TIERS):
                        tier = rule.tiers[t] if rule and t < len(rule.tiers) else None
                        row[f"above{t}"] = tier.above_input_tokens if tier else NEVER
                        row[f"id{t}"] = rule.tier_id(tier) if rule and tier else None
                        for meter in ("input", "cached_input", "cache_write", "output"):
                            row[f"l_{meter}{t}"] = getattr(tier.list, meter) if tier else None
                            row[f"b_{meter}{t}"] = getattr(tier.batch, meter) if tier else None
                    rows.append(row)
        frame = pl.DataFrame(rows, schema=_SEGMENT_SCHEMA)
        with self._lock:
            self._segments[key] = frame
        return frame

    def price(self, rows: pa.Table) -> tuple[pa.Table, PricingStats]:
        """``rows`` (usage events, store columns) with ``COST_SCHEMA`` columns appended.

        Per event: the rule in effect at its ``ts`` (date and UTC time of day), the
        tier its input tokens fall in, list prices for the four meters and, for
        ``billing_mode = "batch"``, the batch prices. A response-cache hit
        (``cache_hit``) costs nothing: its price is kept (``price_id``), its costs
        are 0 and ``price_source`` is ``cache_hit``.
        """
        stats = PricingStats()
        if rows.num_rows == 0:
            return _append(rows, COST_SCHEMA.empty_table()), stats
        names = ["provider", "response_model", "request_model", "deployment"]
        wanted = [
            *names,
            "ts",
            "billing_mode",
            "input_tokens",
            "output_tokens",
            "cache_read_input_tokens",
            "cache_creation_input_tokens",
            "gateway_cost_usd",
        ]
        frame = pl.DataFrame(rows.select(wanted)).with_row_index("__row")
        # the store hands back "Etc/UTC" and may use another unit: one type for the joins
        frame = frame.with_columns(
            pl.col("ts").dt.convert_time_zone("UTC").dt.cast_time_unit("us").alias("ts")
        )
        if "cache_hit" in rows.column_names:
            frame = frame.with_columns(pl.Series("cache_hit", rows.column("cache_hit")))
        else:
            frame = frame.with_columns(pl.lit(False).alias("cache_hit"))
        combos = frame.select(names).unique()
        keys = [self.resolve(*combo) for combo in combos.iter_rows()]
        combos = combos.with_columns(pl.Series("price_key", keys, dtype=pl.String))
        frame = frame.join(combos, on=names, how="left", nulls_equal=True)
        api_keys = sorted({k for k in keys if k and not k.startswith(f"{SELF_HOSTED}/")})
        segments = pl.concat(
            [_SEGMENT_SCHEMA_FRAME, *(self._segments_of(k) for k in api_keys)], how="vertical"
        )
        slots = segments.select("price_key", "slot_start").unique()
        if slots.height == 0 or slots.get_column("slot_start").max() == 0:
            frame = frame.with_columns(pl.lit(0, pl.Int32).alias("slot_start"))
        else:  # a time-of-day price: each key's slot is the last start at or before the minute
            minute = pl.col("ts").dt.hour().cast(pl.Int32) * 60 + pl.col("ts").dt.minute().cast(
                pl.Int32
            )
            frame = (
                frame.with_columns(minute.alias("__minute"))
                .sort("__minute")
                .join_asof(
                    slots.sort("slot_start"),
                    left_on="__minute",
                    right_on="slot_start",
                    by="price_key",
                    strategy="backward",
                    check_sortedness=False,
                )
            )
        tiers = 1  # tier columns worth reading: those some key in the batch has
        for t in range(1, MAX_TIERS):
            if segments.height and segments.get_column(f"above{t}").min() != NEVER:
                tiers = t + 1
        segments = segments.select(
            pl.exclude([c for c in segments.columns if c[-1].isdigit() and int(c[-1]) >= tiers])
        )
        frame = (
            frame.sort("ts")
            .join_asof(
                segments.sort("seg_start"),
                left_on="ts",
                right_on="seg_start",
                by=["price_key", "slot_start"],
                strategy="backward",
                check_sortedness=False,  # both sides are sorted by time just above
            )
            .sort("__row")
        )

        def tiered(column: str) -> pl.Expr:
            expr = pl.col(f"{column}0")
            for t in range(1, tiers):
                expr = (
                    pl.when(pl.col("input_tokens") > pl.col(f"above{t}"))
                    .then(pl.col(f"{column}{t}"))
                    .otherwise(expr)
                )
            return expr

        batch = pl.col("billing_mode") == "batch"
        meters = ("input", "cached_input", "cache_write", "output")
        frame = frame.with_columns(
            *(tiered(f"l_{m}").alias(f"p_{m}") for m in meters),
            *(
                pl.when(batch).then(tiered(f"b_{m}")).otherwise(tiered(f"l_{m}")).alias(f"q_{m}")
                for m in meters
            ),
            tiered("id").alias("p_id"),
        )
        cache_read = pl.col("cache_read_input_tokens").fill_null(0)
        cache_write = pl.col("cache_creation_input_tokens").fill_null(0)
        uncached = pl.max_horizontal(pl.col("input_tokens") - cache_read - cache_write, pl.lit(0))
        tokens = {
            "input": uncached,
            "cached_input": cache_read,
            "cache_write": cache_write,
            "output": pl.col("output_tokens"),
        }
        self_hosted = pl.col("price_key").str.starts_with(f"{SELF_HOSTED}/").fill_null(False)
        hit = pl.col("cache_hit").fill_null(False) & (pl.col("p_id").is_not_null() | self_hosted)
        zero_if_hit = {
            m: pl.when(hit).then(0.0).otherwise(tokens[m] * pl.col(f"p_{m}") / PER_MILLION)
            for m in meters
        }
        billed = [
            pl.when(hit).then(0.0).otherwise(tokens[m] * pl.col(f"q_{m}") / PER_MILLION)
            for m in meters
        ]
        out = frame.select(
            zero_if_hit["input"].alias("input_cost_usd"),
            zero_if_hit["cached_input"].alias("cached_input_cost_usd"),
            zero_if_hit["cache_write"].alias("cache_write_cost_usd"),
            zero_if_hit["output"].alias("output_cost_usd"),
            (billed[0] + billed[1] + billed[2] + billed[3]).alias("__billed"),
            pl.when(self_hosted & hit)
            .then(pl.lit(CACHE_HIT))
            .when(self_hosted)
            .then(pl.lit(SELF_HOSTED))
            .when(pl.col("p_id").is_null())
            .then(None)
            .when(hit)
            .then(pl.lit(CACHE_HIT))
            .otherwise(pl.col("s_source"))
            .alias("price_source"),
            pl.when(self_hosted)
            .then(pl.col("price_key"))
            .otherwise(pl.col("p_id"))
            .alias("price_id"),
            pl.when(self_hosted)
            .then(pl.lit("config"))
            .when(pl.col("p_id").is_null())
            .then(None)
            .otherwise(pl.col("s_catalog"))
            .alias("price_catalog"),
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
            pl.col("__billed").alias("cost_usd"),
            pl.when(list_cost.is_null())
            .then(None)
            .when(list_cost > 0)
            .then(1 - pl.col("__billed") / list_cost)
            .otherwise(0.0)
            .alias("discount_rate"),
        )
        unpriced = out.filter(pl.col("price_source").is_null())
        if unpriced.height:
            for provider, model, n in unpriced.group_by("provider", "request_model").len().rows():
                name = f"{provider or '?'}/{model}"
                stats.unpriced[name] += n
                if name not in self._warned:
                    self._warned.add(name)
                    log.warning(
                        "no price for %s: no catalog knows it, so its events are stored "
                        "unpriced; add it with [[pricing.prices]] (or "
                        "[[pricing.deployments]] if self-hosted)",
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


MAX_TIERS = 3
"""Tiers a segment carries (genai-prices has at most two per model today)."""
NEVER = 1 << 62  # the threshold of a tier that does not exist
MINUTES_PER_DAY = 24 * 60
EARLIEST = datetime(1, 1, 1, tzinfo=UTC)
CACHE_HIT = "cache_hit"

_SEGMENT_SCHEMA: dict[str, Any] = {
    "price_key": pl.String,
    "slot_start": pl.Int32,
    "seg_start": pl.Datetime("us", "UTC"),
    "s_source": pl.String,
    "s_catalog": pl.String,
}
for _t in range(MAX_TIERS):
    _SEGMENT_SCHEMA[f"above{_t}"] = pl.Int64
    _SEGMENT_SCHEMA[f"id{_t}"] = pl.String
    for _m in ("input", "cached_input", "cache_write", "output"):
        _SEGMENT_SCHEMA[f"l_{_m}{_t}"] = pl.Float64
        _SEGMENT_SCHEMA[f"b_{_m}{_t}"] = pl.Float64
_SEGMENT_SCHEMA_FRAME = pl.DataFrame(schema=_SEGMENT_SCHEMA)


def _sha8(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:8]


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
) -> int:
    """Price the completed hours of each deployment that end by ``until``; returns hours settled.

    An hour counts when the deployment served an event in it or reported a GPU
    sample for it (``gpu_samples.deployment``): that is when its GPUs were up.
    Each hour's cost (GPUs × GPU-hour price) goes to ``deployment_hours`` and is
    spread over that hour's input and output tokens in ``usage_events`` (response-
    cache hits, served without the GPUs, cost 0). An hour is settled when it has
    events not priced yet or GPU samples but no ``deployment_hours`` row, however
    old: a backfill, a replay or a daemon catching up after days down is priced
    like live traffic. Idempotent: settling an hour again (late events) recomputes
    it. The caller owns the transaction.
    """
    end = until.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    now = datetime.now(UTC)
    settled = 0
    hour = utc_floor("ts", 3600)
    for d in deployments:
        con.execute(
            f"""
            CREATE OR REPLACE TEMP TABLE settle_todo AS
            SELECT DISTINCT {hour} AS hour FROM usage_events
            WHERE deployment = $name AND ts < $end AND cost_usd IS NULL AND NOT cache_hit
            UNION (
                SELECT DISTINCT {hour} AS hour FROM gpu_samples
                WHERE deployment = $name AND ts < $end
                EXCEPT
                SELECT hour FROM deployment_hours WHERE deployment = $name
            )
            """,
            {"name": d.name, "end": end},
        )
        rows = con.execute(
            f"""
            WITH served AS (
                SELECT {hour} AS hour, count(*) AS requests,
                       sum(input_tokens + output_tokens) AS tokens
                FROM usage_events
                WHERE deployment = $name AND ts < $end AND NOT cache_hit
                  AND {hour} IN (SELECT hour FROM settle_todo)
                GROUP BY 1
            )
            INSERT OR REPLACE INTO deployment_hours
            SELECT $name, h.hour, $gpu_type, $gpus, $rate, $gpus * $rate,
                   coalesce(s.requests, 0), coalesce(s.tokens, 0), $now
            FROM settle_todo h LEFT JOIN served s USING (hour)
            """,
            {
                "name": d.name,
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
                price_id = '{SELF_HOSTED}/' || $name,
                price_catalog = 'config'
            FROM deployment_hours h
            WHERE e.deployment = $name AND h.deployment = $name AND NOT e.cache_hit
              AND e.ts < $end AND h.hour IN (SELECT hour FROM settle_todo)
              AND h.hour = {utc_floor("e.ts", 3600)} AND h.tokens > 0
            """,
            {"name": d.name, "end": end},
        )
        con.execute("DROP TABLE settle_todo")
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
