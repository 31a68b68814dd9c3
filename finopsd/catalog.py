"""List prices of API models, compiled into rules the ingest worker applies to whole batches.

Where a price comes from, in order of precedence:

1. ``[[pricing.prices]]`` in config.toml (``source = "config"``): a negotiated or
   missing price, from its ``effective_from`` date on;
2. the CSV catalog (``finopsd/data/prices.csv`` or ``pricing.catalog``): models the
   maintained catalog lacks, with their sources;
3. **genai-prices** (``source = "catalog"``), Pydantic's maintained database of LLM
   API prices, read from the data shipped in the installed package (it is never
   updated at run time): model names resolved by each provider's own matching
   rules (dated snapshots, aliases, ``provider/model`` as gateways write it),
   historic prices (start dates), time-of-day prices (off-peak), long-context
   tiers, cache-read and cache-write prices, and batch prices.

A model none of them knows is unpriced: there is no guess by name prefix.

A model's pricing is a list of ``Rule``s, tried like genai-prices' conditional
prices: the last rule active at the event's ``ts`` wins; when the model comes
from genai-prices and none is active, the first applies. A rule holds tiers: the
tier with the highest ``above_input_tokens`` below the event's input tokens
prices *all* its tokens (the providers' "cliff" model, e.g. Anthropic above 200k
input tokens). Each tier has list prices and the prices billed to events sent
through the provider's batch API (its batch prices, else list less the
provider's batch discount from ``finopsd/data/batch_discounts.csv``, else list).

Meters are the four finopsd stores (input, cached-input read, cache write,
output), USD per million tokens. Prices genai-prices has for other units
(audio, images, web searches, per-request fees) are not applied: usage events
carry no such counts.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from decimal import Decimal
from importlib import resources
from typing import Any

GENAI_PRICES = "genai-prices"


def genai_prices_version() -> str:
    """The installed genai-prices release, e.g. ``genai-prices 0.2.3``."""
    from genai_prices import __version__

    return f"{GENAI_PRICES} {__version__}"


@dataclass(frozen=True)
class Meters:
    """USD per million tokens for each meter."""

    input: float
    cached_input: float
    cache_write: float
    output: float

    def scaled(self, factor: float) -> Meters:
        return Meters(
            self.input * factor,
            self.cached_input * factor,
            self.cache_write * factor,
            self.output * factor,
        )


@dataclass(frozen=True)
class Tier:
    """Prices for requests with more than ``above_input_tokens`` input tokens (-1: all)."""

    above_input_tokens: int
    list: Meters
    batch: Meters  # billed for billing_mode = "batch"


@dataclass(frozen=True)
class Rule:
    """One price of a model and when it applies (all conditions must hold)."""

    price_id: str  # provider/model@<effective date or "list">[~HHMM-HHMMZ]; tiers add >N
    effective_from: datetime | None  # UTC midnight of its start date; None: always
    time_of_day: tuple[int, int] | None  # [start, end) minutes after UTC midnight; may wrap
    tiers: tuple[Tier, ...]  # ascending by above_input_tokens, the first is -1
    batch_discount: float  # nominal fraction of list off batch traffic (0 when none)
    source: str  # "catalog" | "config"
    catalog: str  # "genai-prices 0.2.3", "prices.csv <sha>", "config"
    reference: str  # where the price is published, or the config key
    list_since: datetime | None = None  # when its list prices started (None: always)

    def tier_id(self, tier: Tier) -> str:
        if tier.above_input_tokens < 0:
            return self.price_id
        return f"{self.price_id}>{tier.above_input_tokens}"


@dataclass(frozen=True)
class ModelPricing:
    """All the prices of one ``provider/model`` key, in precedence order (last active wins)."""

    key: str
    rules: tuple[Rule, ...]
    first_is_fallback: bool  # genai-prices: the first rule applies when none is active

    def rule_at(self, ts: datetime) -> Rule | None:
        """The rule that prices an event at ``ts`` (what ``PriceBook.price`` does per row)."""
        ts = ts.astimezone(UTC)
        for rule in reversed(self.rules):
            if _active(rule, ts):
                return rule
        return self.rules[0] if self.first_is_fallback and self.rules else None


def _active(rule: Rule, ts: datetime) -> bool:
    if rule.effective_from is not None and ts < rule.effective_from:
        return False
    if rule.time_of_day is not None:
        minute = ts.hour * 60 + ts.minute
        start, end = rule.time_of_day
        inside = start <= minute < end if start <= end else minute >= start or minute < end
        if not inside:
            return False
    return True


def tier_for(rule: Rule, input_tokens: int) -> Tier:
    """The tier of ``rule`` that prices a request with ``input_tokens`` input tokens."""
    chosen = rule.tiers[0]
    for tier in rule.tiers:
        if input_tokens > tier.above_input_tokens:
            chosen = tier
    return chosen


def midnight(day: date) -> datetime:
    return datetime.combine(day, time.min, UTC)


# -- batch discounts (finopsd/data/batch_discounts.csv) ------------------------------


@dataclass(frozen=True)
class BatchDiscount:
    provider: str
    effective_from: date
    discount: float  # fraction of list
    source: str


def load_batch_discounts() -> list[BatchDiscount]:
    """Providers' batch-API discounts shipped with finopsd, with their sources."""
    text = resources.files("finopsd").joinpath("data/batch_discounts.csv").read_text()
    rows = csv.DictReader(line for line in text.splitlines() if not line.startswith("#"))
    return [
        BatchDiscount(
            r["provider"],
            date.fromisoformat(r["effective_from"]),
            float(r["batch_discount"]),
            r["source"],
        )
        for r in rows
    ]


def shipped_csv_catalog() -> tuple[str, str]:
    """The shipped prices CSV's text and its catalog label (``prices.csv <sha256[:8]>``)."""
    text = resources.files("finopsd").joinpath("data/prices.csv").read_text()
    return text, f"prices.csv {hashlib.sha256(text.encode()).hexdigest()[:8]}"


# -- genai-prices ---------------------------------------------------------------------


def _f(value: Any) -> float | None:
    return None if value is None else float(value)


def _meter_at(value: Any, above: int) -> float | None:
    """A genai-prices meter price (Decimal or TieredPrices) for requests above ``above``."""
    from genai_prices.types import TieredPrices

    if isinstance(value, TieredPrices):
        price: Decimal = value.base
        for tier in value.tiers:
            if above >= tier.start:  # input_tokens > above >= start
                price = tier.price
        return float(price)
    return _f(value)


def _thresholds(model_price: Any) -> list[int]:
    from genai_prices.types import TieredPrices

    starts = {-1}
    for value in model_price.__dict__.values():
        if isinstance(value, TieredPrices):
            starts.update(t.start for t in value.tiers)
    return sorted(starts)


def _meters(model_price: Any, above: int) -> Meters | None:
    """The four meters of a genai-prices ``ModelPrice``; None when it prices no tokens."""
    get = model_price.__dict__.get
    input_ = _meter_at(get("input_mtok"), above)
    output = _meter_at(get("output_mtok"), above)
    if input_ is None and output is None:
        return None
    input_ = input_ or 0.0
    read = _meter_at(get("cache_read_mtok"), above)
    write = _meter_at(get("cache_write_mtok"), above)
    return Meters(
        input_,
        input_ if read is None else read,
        input_ if write is None else write,
        output or 0.0,
    )


def _overlay(standard: Any, variant: Any) -> Any:
    from copy import copy

    merged = copy(standard)
    merged.__dict__.update({k: v for k, v in variant.__dict__.items() if v is not None})
    return merged


def compile_genai_model(provider: Any, model: Any, discounts: list[BatchDiscount]) -> ModelPricing:
    """The rules of one genai-prices model (a ``Provider`` and ``ModelInfo``)."""
    from genai_prices.types import ConditionalPrice, StartDateConstraint, TimeOfDateConstraint

    key = f"{provider.id}/{model.id}"
    version = genai_prices_version()
    reference = (provider.pricing_urls or [""])[0] or f"genai-prices: {key}"
    conditionals = (
        model.prices
        if isinstance(model.prices, list)
        else [ConditionalPrice(constraint=None, prices=model.prices)]
    )
    batch_variants = [v for v in (model.price_variants or []) if v.when == {"processing": "batch"}]
    provider_discounts = sorted(
        (d for d in discounts if d.provider == provider.id), key=lambda d: d.effective_from
    )
    rules: list[Rule] = []
    for conditional in conditionals:
        constraint = conditional.constraint
        start: datetime | None = None
        window: tuple[int, int] | None = None
        if isinstance(constraint, StartDateConstraint):
            start = midnight(constraint.start_date)
        elif isinstance(constraint, TimeOfDateConstraint):
            s, e = _utc_time(constraint.start_time), _utc_time(constraint.end_time)
            window = (s.hour * 60 + s.minute, e.hour * 60 + e.minute)
        standard = conditional.prices
        # batch prices change over time independently of the rule: one rule per
        # change point, each later one taking precedence from its date
        changes: list[tuple[datetime | None, Any, float]] = [(None, None, 0.0)]
        for d in provider_discounts:
            changes.append((midnight(d.effective_from), None, d.discount))
        for v in batch_variants:
            vstart = (
                v.constraint.start_date if isinstance(v.constraint, StartDateConstraint) else None
            )
            changes.append((midnight(vstart) if vstart else None, v.prices, -1.0))
        changes.sort(key=lambda c: c[0] or datetime.min.replace(tzinfo=UTC))
        discount_now = 0.0
        variant_now: Any = None
        base_id = f"{key}@{start.date().isoformat() if start else 'list'}"
        if window:
            base_id += f"~{window[0] // 60:02d}{window[0] % 60:02d}-"
            base_id += f"{window[1] // 60:02d}{window[1] % 60:02d}Z"
        for i, (when, variant, discount) in enumerate(changes):
            if variant is not None:
                variant_now = variant
            elif discount > 0 or i == 0:
                discount_now = discount
            tiers: list[Tier] = []
            for above in _thresholds(standard):
                listed = _meters(standard, above)
                if listed is None:
                    break
                if variant_now is not None:
                    billed = _meters(_overlay(standard, variant_now), above) or listed
                else:
                    billed = listed.scaled(1 - discount_now)
                tiers.append(Tier(above, listed, billed))
            if not tiers:
                break
            nominal = 1 - tiers[0].batch.input / tiers[0].list.input if tiers[0].list.input else 0
            effective = start
            if when is not None and (start is None or when > start):
                effective = when
            rules.append(
                Rule(
                    price_id=base_id,
                    effective_from=effective,
                    time_of_day=window,
                    tiers=tuple(tiers),
                    batch_discount=round(nominal, 6),
                    source="catalog",
                    catalog=version,
                    reference=reference,
                    list_since=start,
                )
            )
    # a change point before the rule's own start adds nothing: keep rules that differ
    return ModelPricing(key, tuple(_dedupe(rules)), first_is_fallback=True)


def _dedupe(rules: Iterable[Rule]) -> list[Rule]:
    out: list[Rule] = []
    for rule in rules:
        if not (out and out[-1] == rule):
            out.append(rule)
    return out


def _utc_time(value: time) -> time:
    if value.tzinfo is None:
        return value
    return datetime.combine(date(1970, 1, 1), value).astimezone(UTC).time()


OTEL_PROVIDERS = {
    # OpenTelemetry GenAI `gen_ai.provider.name` values genai-prices spells otherwise
    "x_ai": "x-ai",
    "gcp.gen_ai": "google",
    "gcp.gemini": "google",
    "gcp.vertex_ai": "google",
    "aws.bedrock": "aws",
    "azure.ai.openai": "azure",
    "azure.ai.inference": "azure",
    "mistral_ai": "mistral",
    # LiteLLM's provider routes genai-prices does not know by that name
    "fireworks_ai": "fireworks",
    "azure_ai": "azure",
    "codestral": "mistral",
    "meta_llama": "meta",
}


class GenaiCatalog:
    """Resolves model names with genai-prices' bundled data; compiles and caches rules.

    Never fetches: only the data shipped in the installed package is read.
    """

    def __init__(self, discounts: list[BatchDiscount] | None = None) -> None:
        from genai_prices import data_snapshot

        self._snapshot = data_snapshot.get_snapshot()
        self.version = genai_prices_version()
        self._discounts = load_batch_discounts() if discounts is None else discounts
        self._compiled: dict[str, ModelPricing | None] = {}
        self._found: dict[tuple[str | None, str], str | None] = {}

    def find(self, provider: str | None, model: str) -> str | None:
        """The ``provider_id/model_id`` genai-prices prices ``model`` as; None if unknown."""
        memo = (provider, model)
        if memo in self._found:
            return self._found[memo]
        key: str | None = None
        provider_id = OTEL_PROVIDERS.get(provider, provider) if provider else None
        p, m = self._lookup(provider_id, model)
        if m is None and "/" in model:  # "openai/gpt-4o", "anthropic/claude-..." as gateways write
            prefix, rest = model.split("/", 1)
            if provider_id is None or OTEL_PROVIDERS.get(prefix, prefix) == provider_id:
                p, m = self._lookup(OTEL_PROVIDERS.get(prefix, prefix), rest)
        if p is not None and m is not None:
            key = f"{p.id}/{m.id}"
            if key not in self._compiled:
                pricing = compile_genai_model(p, m, self._discounts)
                self._compiled[key] = pricing if pricing.rules else None
            if self._compiled[key] is None:
                key = None  # it prices no tokens (e.g. per-image or per-second only)
        self._found[memo] = key
        return key

    def _lookup(self, provider_id: str | None, model: str) -> tuple[Any, Any]:
        try:
            return self._snapshot.find_provider_model(model, None, provider_id, None)
        except LookupError:
            return None, None

    def pricing(self, key: str) -> ModelPricing | None:
        """The compiled rules of ``provider_id/model_id`` (as ``find`` returns it)."""
        if key not in self._compiled:
            provider_id, _, model_id = key.partition("/")
            provider = next((p for p in self._snapshot.providers if p.id == provider_id), None)
            model = (
                next((m for m in provider.models if m.id == model_id), None) if provider else None
            )
            self._compiled[key] = (
                compile_genai_model(provider, model, self._discounts)
                if provider and model
                else None
            )
        return self._compiled[key]


def rules_from_prices(prices: Iterable[Any], *, catalog: str) -> dict[str, ModelPricing]:
    """Rules from ``pricing.Price``s (CSV rows or config entries), by ``provider/model``."""
    by_key: dict[str, list[Any]] = {}
    for price in prices:
        by_key.setdefault(price.key, []).append(price)
    out: dict[str, ModelPricing] = {}
    for key, entries in by_key.items():
        rules = []
        for p in sorted(entries, key=lambda p: p.effective_from):
            cached = (
                p.input_per_mtok if p.cached_input_per_mtok is None else p.cached_input_per_mtok
            )
            write = p.input_per_mtok if p.cache_write_per_mtok is None else p.cache_write_per_mtok
            listed = Meters(p.input_per_mtok, cached, write, p.output_per_mtok)
            rules.append(
                Rule(
                    price_id=p.price_id,
                    effective_from=midnight(p.effective_from),
                    time_of_day=None,
                    tiers=(Tier(-1, listed, listed.scaled(1 - p.batch_discount)),),
                    batch_discount=p.batch_discount,
                    source=p.source,
                    catalog="config" if p.source == "config" else catalog,
                    reference=getattr(p, "reference", "") or p.source,
                    list_since=midnight(p.effective_from),
                )
            )
        out[key] = ModelPricing(key, tuple(rules), first_is_fallback=False)
    return out


def merge(base: ModelPricing | None, overlay: ModelPricing | None) -> ModelPricing | None:
    """``overlay``'s rules take precedence over ``base``'s from their dates on."""
    if base is None or overlay is None:
        return overlay or base
    return ModelPricing(base.key, base.rules + overlay.rules, base.first_is_fallback)


__all__ = [
    "GENAI_PRICES",
    "BatchDiscount",
    "GenaiCatalog",
    "Meters",
    "ModelPricing",
    "Rule",
    "Tier",
    "genai_prices_version",
    "load_batch_discounts",
    "merge",
    "rules_from_prices",
    "shipped_csv_catalog",
    "tier_for",
]
