"""Analyzer run time on a large store: a full run, then an incremental run after one more hour.

In one run: build a store of N usage events (default 10,000,000) spread over
30 days, priced with the shipped catalog, plus GPU samples for the
self-hosted deployment (built in DuckDB SQL: a synthetic mix of tenants, apps,
features, models, sizes, prompt repeats and prefix blocks); time a full run of
all analyzers (the first run, which builds every rollup from scratch); then
add one more hour of events and time the incremental run. Prints both, each
analyzer's share, and the ratios against the targets (full <= 5 s,
incremental <= 0.5 s on the 2-core development machine).

    python bench/analyze.py [--events N] [--days D] [--keep PATH | --start-from PATH]

--keep PATH copies the generated store to PATH before any analyzer runs;
--start-from PATH runs on a copy of such a store instead of generating one
(N and D are then read from it).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import shutil
import sys
import tempfile
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

from rss import RssSampler, current_mib

from finopsd.analyzers.runner import build, run_analyzers
from finopsd.config import load_settings
from finopsd.daemon import bound_allocators, daemon_store
from finopsd.pricing import PriceBook
from finopsd.store import Store

FULL_TARGET_S = 5.0
INCREMENTAL_TARGET_S = 0.5

MODELS = [  # provider, model, deployment, weight
    ("openai", "gpt-4o", None, 30),
    ("openai", "gpt-4o-mini", None, 20),
    ("anthropic", "claude-sonnet-4-5", None, 25),
    ("anthropic", "claude-haiku-4-5", None, 10),
    ("vllm", "meta-llama/Llama-3.1-8B-Instruct", "llama-8b", 15),
]
APPS = [  # app, team, latency_class, billing_mode, features
    ("support-bot", "cx", "interactive", "standard", ["answer", "summarise-ticket"]),
    ("code-assist", "devex", "interactive", "standard", ["complete", "explain", "review"]),
    ("doc-search", "search", "interactive", "standard", ["rerank", "answer"]),
    ("nightly-digest", "data", "batch", "batch", ["digest"]),
    ("ticket-triage", "cx", "batch", "standard", ["classify"]),
]
TENANTS = ["acme", "globex", "initech", "umbrella", "hooli"]


def _case(expr: str, values: list[str], weights: list[int] | None = None) -> str:
    """SQL picking values[i] from a uniform hash ``expr`` in [0, 1), by weight."""
    weights = weights or [1] * len(values)
    total, acc, parts = sum(weights), 0, []
    for value, w in zip(values, weights, strict=True):
        acc += w
        parts.append(f"WHEN {expr} < {acc / total!r} THEN {value}")
    return "CASE " + " ".join(parts) + " END"


def generate(store: Store, *, start: datetime, events: int, seconds: float, first_id: int) -> None:
    """Append ``events`` synthetic, priced usage events spread over ``seconds`` from ``start``."""
    prices = PriceBook.shipped()
    con = store.cursor()
    rows = []
    for provider, model, _dep, _w in MODELS:
        key = prices.resolve(provider, model, model)
        price = prices.price_at(key, date.max) if key else None
        rows.append(
            (
                provider,
                model,
                price.input_per_mtok if price else None,
                (price.cached_input_per_mtok or price.input_per_mtok) if price else None,
                price.output_per_mtok if price else None,
                price.batch_discount if price else 0.0,
                price.price_id if price else None,
            )
        )
    con.execute(
        "CREATE OR REPLACE TABLE bench_prices (provider VARCHAR, model VARCHAR, "
        "p_in DOUBLE, p_cached DOUBLE, p_out DOUBLE, p_batch DOUBLE, price_id VARCHAR)"
    )
    con.executemany("INSERT INTO bench_prices VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
    u = "(hash(i, {k}) % 1000000) / 1000000.0"  # a uniform [0, 1) per event and purpose
    app = _case(u.format(k=1), [str(i) for i in range(len(APPS))])
    model = _case(u.format(k=2), [str(i) for i in range(len(MODELS))], [m[3] for m in MODELS])
    tenant = _case(u.format(k=3), [f"'{t}'" for t in TENANTS], [5, 3, 2, 2, 1])
    store.write(
        lambda c: c.execute(
            f"""
            INSERT INTO usage_events BY NAME
            WITH base AS (
                SELECT i, {app} AS a, {model} AS m, {tenant} AS tenant,
                       {u.format(k=4)} AS r4, {u.format(k=5)} AS r5, {u.format(k=6)} AS r6
                FROM range({first_id}, {first_id + events}) t(i)
            ),
            shaped AS (
                SELECT b.*,
                       $apps[a + 1] AS app_row, $models[m + 1] AS model_row,
                       -- a fifth of prompts repeat one of 5,000 per app: cacheable
                       CASE WHEN r4 < 0.2 THEN 'p' || a || '-' || (hash(i, 7) % 5000)
                            ELSE 'u' || i END AS prompt_hash,
                       (200 + (hash(i, 8) % 3800))::BIGINT AS input_tokens,
                       (20 + (hash(i, 9) % 600))::BIGINT AS output_tokens
                FROM base b
            )
            SELECT 'bench-' || i AS event_id,
                   $start::TIMESTAMPTZ + to_microseconds(
                       ((i - {first_id}) * {seconds * 1e6 / max(events, 1)!r})::BIGINT
                   ) AS ts,
                   model_row.provider AS provider, model_row.model AS request_model,
                   model_row.model AS response_model, input_tokens, output_tokens,
                   CASE WHEN model_row.provider = 'vllm' THEN NULL
                        WHEN r5 < 0.3 THEN input_tokens // 2 ELSE 0 END
                       AS cache_read_input_tokens,
                   tenant, app_row.team AS team, app_row.app AS app,
                   app_row.features[(1 + hash(i, 10) % len(app_row.features))::BIGINT] AS feature,
                   300 + output_tokens * 20.0 AS latency_ms, 80 + input_tokens * 0.04 AS ttft_ms,
                   CASE WHEN r6 < 0.02 THEN 'error' ELSE 'ok' END AS status,
                   prompt_hash,
                   -- a block the app's requests share, then two of the prompt's own
                   [(hash(a, 1) >> 1)::BIGINT, (hash(prompt_hash, 0) >> 1)::BIGINT,
                    (hash(prompt_hash, 2) >> 1)::BIGINT] AS prefix_hashes,
                   app_row.latency_class AS latency_class,
                   CASE WHEN r6 < 0.5 THEN 0.6 + r5 * 0.4 ELSE NULL END AS quality_score,
                   model_row.deployment AS deployment, app_row.billing_mode AS billing_mode
            FROM shaped
            """,
            {
                "start": start,
                "apps": [
                    {"app": a, "team": t, "latency_class": lc, "billing_mode": bm, "features": f}
                    for a, t, lc, bm, f in APPS
                ],
                "models": [{"provider": p, "model": m, "deployment": d} for p, m, d, _w in MODELS],
            },
        )
    )
    store.write(
        lambda c: c.execute(
            f"""
            UPDATE usage_events AS e SET
                input_cost_usd = (e.input_tokens - coalesce(e.cache_read_input_tokens, 0))
                    * p.p_in / 1e6,
                cached_input_cost_usd = coalesce(e.cache_read_input_tokens, 0) * p.p_cached / 1e6,
                cache_write_cost_usd = 0,
                output_cost_usd = e.output_tokens * p.p_out / 1e6,
                list_cost_usd = ((e.input_tokens - coalesce(e.cache_read_input_tokens, 0)) * p.p_in
                    + coalesce(e.cache_read_input_tokens, 0) * p.p_cached
                    + e.output_tokens * p.p_out) / 1e6,
                discount_rate = CASE WHEN e.billing_mode = 'batch' THEN p.p_batch ELSE 0 END,
                price_source = 'catalog', price_id = p.price_id
            FROM bench_prices p
            WHERE e.provider = p.provider AND e.request_model = p.model AND p.p_in IS NOT NULL
              AND e.event_id >= 'bench-{first_id}' AND e.ts >= $start
            """,
            {"start": start},
        )
    )
    store.write(
        lambda c: c.execute(
            "UPDATE usage_events SET cost_usd = list_cost_usd * (1 - discount_rate) "
            "WHERE cost_usd IS NULL AND list_cost_usd IS NOT NULL AND ts >= $start",
            {"start": start},
        )
    )
    con.execute("DROP TABLE bench_prices")
    # GPU samples for the self-hosted deployment, one a minute per GPU, busy by day
    minutes = int(seconds // 60)
    store.write(
        lambda c: c.execute(
            f"""
            INSERT INTO gpu_samples BY NAME
            SELECT $start::TIMESTAMPTZ + to_minutes(m) AS ts, 'gpu-host-1' AS host,
                   g AS gpu_index, 'NVIDIA L4' AS gpu_model,
                   CASE WHEN (m // 60) % 24 BETWEEN 8 AND 19 THEN 55.0 ELSE 8.0 END
                       + (hash(m, g) % 10) AS utilization_pct,
                   'llama-8b' AS deployment
            FROM range(0, {minutes}) a(m), range(0, 2) b(g)
            """,
            {"start": start},
        )
    )


rss = RssSampler()


def _build(path: Path, start: datetime, events: int, days: float) -> None:
    """The bench's own generator, in a process of its own and without a memory limit:
    one 10 M-row INSERT … SELECT does not fit the daemon's, and its leftovers would
    count in the analyzers' resident memory."""
    with Store(path) as store:
        generate(store, start=start, events=events, seconds=days * 86400, first_id=0)


by_analyzer = RssSampler()


def _measure(analyzers: list, label: list[str]) -> None:
    """Sample resident memory during each analyzer's run, as phase "<label[0]> <name>"."""
    for analyzer in analyzers:

        def run(ctx, _run=analyzer.run, _name=analyzer.name):
            with by_analyzer.phase(f"{label[0]} {_name}"):
                return _run(ctx)

        analyzer.run = run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--days", type=float, default=30.0)
    parser.add_argument("--keep", type=Path, help="keep a copy of the generated store here")
    parser.add_argument("--start-from", type=Path, help="a store kept by --keep, used in a copy")
    parser.add_argument(
        "--threads", type=int, help="DuckDB threads for the runs (default: store.daemon_threads)"
    )
    args = parser.parse_args()

    now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    start = now - timedelta(days=args.days)
    # FINOPSD_STORE__* etc. from the environment tune the run, as for the daemon
    settings = load_settings(
        None, env={k: v for k, v in os.environ.items() if k.startswith("FINOPSD_")}
    )
    if args.threads:
        settings.store.daemon_threads = args.threads
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.duckdb"
        if args.start_from:
            shutil.copyfile(args.start_from, path)
            with Store(path, read_only=True) as kept:
                count, first, last = (
                    kept.cursor()
                    .execute("SELECT count(*), min(ts), max(ts) FROM usage_events")
                    .fetchone()
                )
            args.events = count
            now = last.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
            now += timedelta(hours=1)
            args.days = round((now - first).total_seconds() / 86400, 3)
            print(f"copied {count:,} events over {args.days:g} days from {args.start_from}")
        else:
            began = time.perf_counter()
            child = mp.get_context("spawn").Process(
                target=_build, args=(path, start, args.events, args.days)
            )
            child.start()
            child.join()
            if child.exitcode:
                print(f"generator failed (exit {child.exitcode})")
                return 1
            gen_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
            print(
                f"built {args.events:,} events over {args.days:g} days in "
                f"{time.perf_counter() - began:.1f}s "
                f"(generator process peak RSS {gen_peak:,.0f} MiB)",
                flush=True,
            )
            if args.keep:
                shutil.copyfile(path, args.keep)
        # the analyzers run on the store as the daemon opens it: store.memory_limit,
        # store.daemon_threads, store.vacuum_tasks
        bound_allocators()  # as the daemon does
        before = current_mib()
        with daemon_store(settings, path) as store:
            opened = current_mib()
            con = store.cursor()
            limits = dict(
                con.execute(
                    "SELECT name, value FROM duckdb_settings() "
                    "WHERE name IN ('memory_limit', 'threads', 'temp_directory')"
                ).fetchall()
            )
            prices = PriceBook.shipped()
            analyzers = build({})
            label = ["full"]
            _measure(analyzers, label)
            with rss.phase("full run"):
                full = run_analyzers(store, prices, analyzers, window_days=args.days, now=now)
            per_hour = int(args.events / (args.days * 24))
            with rss.phase("add one hour"):
                generate(store, start=now, events=per_hour, seconds=3600, first_id=args.events)
            later = now + timedelta(hours=1)
            label[0] = "incremental"
            with rss.phase("incremental run"):
                incremental = run_analyzers(
                    store, prices, analyzers, window_days=args.days, now=later
                )
            spilled = con.execute(
                "SELECT coalesce(sum(size), 0) FROM duckdb_temporary_files()"
            ).fetchone()
    for label, runs, target in (
        ("full", full, FULL_TARGET_S),
        ("incremental (+1 hour)", incremental, INCREMENTAL_TARGET_S),
    ):
        total = sum(r.seconds for r in runs)
        parts = ", ".join(f"{r.name} {r.seconds:.2f}s" for r in runs)
        errors = [f"{r.name}: {r.error}" for r in runs if r.error]
        print(f"{label}: {total:.2f}s (target {target:g}s, ratio {total / target:.2f}) — {parts}")
        for error in errors:
            print(f"  FAILED {error}")
    print(
        f"DuckDB memory_limit {limits.get('memory_limit')} (store.memory_limit "
        f"{settings.store.memory_limit!r}), threads {limits.get('threads')}, "
        f"temp_directory {limits.get('temp_directory')}; "
        f"temporary files at the end {(spilled[0] if spilled else 0) / 2**20:,.0f} MiB"
    )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"peak RSS {peak:,.0f} MiB (ru_maxrss, analyzer process; {before:,.0f} MiB before "
        f"the store was opened, {opened:,.0f} MiB after); by phase:"
    )
    print(rss.report())
    for run_label in ("full", "incremental"):
        peaks = [
            f"{name.split(' ', 1)[1]} {peak:,.0f} ({peak - begin:+,.0f})"
            for name, (begin, peak) in by_analyzer.phases.items()
            if name.startswith(run_label + " ")
        ]
        print(f"  {run_label} run, peak RSS by analyzer, MiB: {', '.join(peaks)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
