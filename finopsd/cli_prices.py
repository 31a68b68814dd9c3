"""``finopsd prices``: what an event would be charged, and re-pricing stored events.

``prices show MODEL`` resolves a model name as ingest does and prints the price
an event would get, where it comes from, its tiers and batch prices.
``prices reprice --from --to`` prices the stored API events of a period again
with the current catalogs and config (after a genai-prices upgrade or a
``[[pricing.prices]]`` change), one UTC day per transaction; ``--dry-run``
shows what would change without writing. Self-hosted events are left to the
daemon's settling of GPU-hours.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

from finopsd.catalog import Tier

_METERS = ("input", "cached_input", "cache_write", "output")
_PRICED_COLUMNS = (
    "input_cost_usd",
    "cached_input_cost_usd",
    "cache_write_cost_usd",
    "output_cost_usd",
    "list_cost_usd",
    "discount_rate",
    "cost_usd",
    "price_source",
    "price_id",
    "price_catalog",
)
_EVENT_COLUMNS = (
    "event_id",
    "ts",
    "provider",
    "request_model",
    "response_model",
    "deployment",
    "billing_mode",
    "input_tokens",
    "output_tokens",
    "cache_read_input_tokens",
    "cache_creation_input_tokens",
    "gateway_cost_usd",
    "cache_hit",
)


def _instant(text: str) -> datetime:
    """An ISO 8601 date or date-time; no offset means UTC."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an ISO 8601 date or date-time (e.g. 2026-11-01 or "
            "2026-11-01T09:30:00Z)"
        ) from None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _tier_json(tier: Tier, price_id: str) -> dict[str, Any]:
    return {
        "price_id": price_id,
        "above_input_tokens": tier.above_input_tokens if tier.above_input_tokens >= 0 else None,
        "list_usd_per_mtok": {m: getattr(tier.list, m) for m in _METERS},
        "batch_usd_per_mtok": {m: getattr(tier.batch, m) for m in _METERS},
    }


def cmd_prices_show(args: argparse.Namespace, settings: Any) -> int:
    from finopsd.pricing import SELF_HOSTED, PriceBook

    book = PriceBook.from_settings(settings.pricing)
    at = args.at or datetime.now(UTC)
    key = book.resolve(args.provider, args.model, args.model, args.deployment)
    who = f"{args.provider + '/' if args.provider else ''}{args.model}"
    if key is None:
        print(
            f"finopsd: no price for {who}: no catalog knows it (genai-prices "
            f"{book.genai.version.split()[-1] if book.genai else '-'}, {book.catalog_label}, "
            "config); its events are stored unpriced. Add it with [[pricing.prices]].",
            file=sys.stderr,
        )
        return 1
    if key.startswith(f"{SELF_HOSTED}/"):
        d = book.deployments[key.split("/", 1)[1]]
        out = {
            "model": args.model,
            "key": key,
            "source": SELF_HOSTED,
            "gpu_type": d.gpu_type,
            "gpus": d.gpus,
            "gpu_hour_usd": d.gpu_hour_usd,
        }
        if args.json:
            print(json.dumps(out))
        else:
            print(f"{who}: self-hosted deployment {d.name}: {d.gpus} x {d.gpu_type} at")
            print(f"  ${d.gpu_hour_usd:g} per GPU-hour, spread over each hour's tokens")
        return 0
    pricing = book.pricing(key)
    rule = pricing.rule_at(at) if pricing else None
    if rule is None:
        print(
            f"finopsd: {who} is {key}, which has no price in effect at {at.isoformat()} "
            "(its first price starts later)",
            file=sys.stderr,
        )
        return 1
    out = {
        "model": args.model,
        "provider": args.provider,
        "at": at.isoformat(),
        "key": key,
        "source": rule.source,
        "catalog": rule.catalog,
        "reference": rule.reference,
        "list_since": rule.list_since.isoformat() if rule.list_since else None,
        "effective_from": rule.effective_from.isoformat() if rule.effective_from else None,
        "time_of_day_utc": (
            [f"{m // 60:02d}:{m % 60:02d}" for m in rule.time_of_day] if rule.time_of_day else None
        ),
        "batch_discount": rule.batch_discount,
        "tiers": [_tier_json(t, rule.tier_id(t)) for t in rule.tiers],
    }
    if args.json:
        print(json.dumps(out))
        return 0
    since = (
        f"since {rule.list_since.date().isoformat()}"
        if rule.list_since
        else "for every date (no start date in the catalog)"
    )
    window = (
        f", {out['time_of_day_utc'][0]}-{out['time_of_day_utc'][1]} UTC" if rule.time_of_day else ""
    )
    print(who)
    print(f"  priced as {key} at {at.strftime('%Y-%m-%d %H:%M')} UTC")
    print(f"  from      {rule.catalog} ({rule.source})")
    print(f"  source    {rule.reference}")
    print(f"  list price in force {since}{window}")
    if rule.effective_from and rule.effective_from != rule.list_since:
        print(f"  batch prices below in force since {rule.effective_from.date().isoformat()}")
    print("  USD per million tokens   input  cached  c.write   output")
    for tier in rule.tiers:
        label = (
            "all requests"
            if tier.above_input_tokens < 0
            else f"> {tier.above_input_tokens:,} input"
        )
        for mode, meters in (("list", tier.list), ("batch", tier.batch)):
            cells = "".join(f"{getattr(meters, m):>8.4g}" for m in _METERS)
            print(f"  {label if mode == 'list' else '':<16} {mode:<6}{cells}")
    example = rule.tiers[0].list
    cost = (1000 * example.input + 100 * example.output) / 1e6
    print(f"  e.g. 1,000 input + 100 output tokens at list: ${cost:.6f}")
    return 0


def cmd_prices_reprice(args: argparse.Namespace, settings: Any) -> int:
    import pyarrow.compute as pc

    from finopsd.pricing import SELF_HOSTED, PriceBook
    from finopsd.store import Store, StoreError

    start, end = args.start, args.end
    if end <= start:
        print("finopsd: --to must be after --from", file=sys.stderr)
        return 2
    book = PriceBook.from_settings(settings.pricing)
    deployments = sorted(book.deployments)
    totals = {"events": 0, "changed": 0, "cost_before_usd": 0.0, "cost_after_usd": 0.0}
    catalogs: dict[str, int] = {}
    try:
        with Store(settings.store.path, read_only=args.dry_run) as store:
            day = start
            while day < end:
                until = min(day + timedelta(days=1), end)
                con = store.cursor()
                rows = con.execute(
                    f"SELECT {', '.join(_EVENT_COLUMNS)}, cost_usd AS __before, "
                    "price_catalog AS __catalog FROM usage_events "
                    "WHERE ts >= $start AND ts < $end "
                    f"AND price_source IS DISTINCT FROM '{SELF_HOSTED}' "
                    "AND (deployment IS NULL OR NOT list_contains($deployments, deployment))",
                    {"start": day, "end": until, "deployments": deployments},
                ).fetch_arrow_table()
                if rows.num_rows:
                    before = rows.column("__before")
                    events = rows.drop(["__before", "__catalog"])
                    priced, _stats = book.price(events)
                    after = priced.column("cost_usd")
                    mask = _changed(before, after)
                    changed = int(pc.sum(mask).as_py() or 0)
                    totals["events"] += rows.num_rows
                    totals["changed"] += changed
                    totals["cost_before_usd"] += float(pc.sum(before).as_py() or 0)
                    totals["cost_after_usd"] += float(pc.sum(after).as_py() or 0)
                    counts = pc.value_counts(pc.fill_null(rows.column("__catalog"), "unpriced"))
                    for item in counts.to_pylist():
                        catalogs[item["values"]] = catalogs.get(item["values"], 0) + item["counts"]
                    if not args.dry_run and changed:
                        update = priced.select(["event_id", *_PRICED_COLUMNS]).filter(mask)
                        store.write(lambda c, u=update, s=day, e=until: _apply(c, u, s, e))
                    if not args.json:
                        print(
                            f"{day.strftime('%Y-%m-%d')}: {rows.num_rows:,} events, "
                            f"{changed:,} {'would change' if args.dry_run else 'changed'}",
                            file=sys.stderr,
                        )
                day = until
    except StoreError as exc:
        msg = str(exc)
        if "lock" in msg.lower():
            msg = f"the store {settings.store.path} is held by a running finopsd: stop it first"
        print(f"finopsd: {msg}", file=sys.stderr)
        return 1
    out = {
        **totals,
        "dry_run": args.dry_run,
        "from": start.isoformat(),
        "to": end.isoformat(),
        "priced_before_by": catalogs,
        "catalog_now": book.genai.version if book.genai else None,
    }
    if args.json:
        print(json.dumps(out))
    else:
        verb = "would re-price" if args.dry_run else "re-priced"
        print(
            f"{verb} {totals['events']:,} events, {totals['changed']:,} changed: "
            f"${totals['cost_before_usd']:,.2f} -> ${totals['cost_after_usd']:,.2f}"
        )
    return 0


def _changed(before: Any, after: Any) -> Any:
    """Per event: the cost went from priced to unpriced or back, or moved by over 1e-12."""
    import pyarrow.compute as pc

    moved = pc.fill_null(pc.greater(pc.abs(pc.subtract(after, before)), 1e-12), False)
    return pc.or_(moved, pc.xor(pc.is_null(before), pc.is_null(after)))


def _apply(con: Any, update: Any, start: datetime, end: datetime) -> None:
    con.register("repriced", update)
    try:
        sets = ", ".join(f"{c} = r.{c}" for c in _PRICED_COLUMNS)
        con.execute(
            f"UPDATE usage_events AS u SET {sets} FROM repriced r "
            "WHERE u.event_id = r.event_id AND u.ts >= $start AND u.ts < $end",
            {"start": start, "end": end},
        )
    finally:
        con.unregister("repriced")


def add_parsers(sub: Any, common: argparse.ArgumentParser, load: Any) -> None:
    """``prices show`` and ``prices reprice`` under ``sub``; ``load(args)`` gives Settings."""
    p = sub.add_parser(
        "prices",
        help="what an event is charged; re-price stored events",
        description="Prices come from [[pricing.prices]] in config.toml, then the CSV "
        "catalog, then genai-prices (the data shipped with the installed package, never "
        "fetched). A model none of them knows is unpriced.",
    )
    prices = p.add_subparsers(dest="prices_command", required=True, metavar="ACTION")
    p = prices.add_parser(
        "show",
        parents=[common],
        help="the price an event of MODEL gets, and where it comes from",
        description="Resolve MODEL as ingest does and print its price at --at (default "
        "now): list and batch USD per million tokens per meter, long-context tiers, "
        "the catalog and version, and the published source.",
    )
    p.add_argument("model", metavar="MODEL", help="model name as events carry it")
    p.add_argument("--provider", metavar="P", help="provider (gen_ai.provider.name)")
    p.add_argument("--deployment", metavar="D", help="self-hosted deployment name")
    p.add_argument("--at", type=_instant, metavar="TS", help="instant (ISO 8601; default now)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=lambda a: cmd_prices_show(a, load(a)))
    p = prices.add_parser(
        "reprice",
        parents=[common],
        help="price the stored API events of [--from, --to) again",
        description="Price the stored API events of [--from, --to) again with the current "
        "catalogs and config, one UTC day per transaction (an interrupted run can be "
        "repeated). Self-hosted events are left to the daemon. Reads and writes the store "
        "directly: stop the daemon first.",
    )
    p.add_argument("--from", dest="start", required=True, type=_instant, metavar="TS")
    p.add_argument("--to", dest="end", required=True, type=_instant, metavar="TS")
    p.add_argument("--dry-run", action="store_true", help="show what would change; write nothing")
    p.add_argument("--json", action="store_true", help="machine-readable summary")
    p.set_defaults(func=lambda a: cmd_prices_reprice(a, load(a)))
