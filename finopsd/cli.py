"""The ``finopsd`` command line.

Exit status: 0 success, 1 runtime failure, 2 bad configuration or usage.
Errors are one or a few lines on stderr, never a traceback (``--debug`` shows it).
"""

from __future__ import annotations

import argparse
import faulthandler
import itertools
import json
import logging
import secrets
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from finopsd import __version__
from finopsd.config import ConfigError, Settings, load_settings
from finopsd.logctx import REQUEST_ID

log = logging.getLogger("finopsd")


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = REQUEST_ID.get()
        if request_id is not None:  # a line written while serving an API request
            out["request_id"] = request_id
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(settings: Settings | None, debug: bool = False) -> None:
    level = "debug" if debug else (settings.log.level if settings else "info")
    handler = logging.StreamHandler(sys.stderr)
    if settings is not None and settings.log.format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("finopsd").setLevel(level.upper())
    # kafka-python is chatty at INFO; its warnings still show
    logging.getLogger("kafka").setLevel(logging.DEBUG if debug else logging.WARNING)


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(Path(args.config) if args.config else None)


# -- commands ---------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from finopsd.daemon import Daemon, StartupInterrupted

    settings = _settings(args)
    setup_logging(settings, args.debug)
    # systemd's watchdog kills with SIGABRT: every thread's stack then goes to stderr
    faulthandler.enable()
    daemon = Daemon(settings)
    daemon.install_signal_handlers()
    try:
        return daemon.run()
    except StartupInterrupted:
        log.info("stopped before ingest started")
        return 0


def cmd_broker(args: argparse.Namespace) -> int:
    from finopsd.ingest.broker import EmbeddedBroker, ensure_topics

    settings = _settings(args)
    setup_logging(settings, args.debug)
    eb = settings.embedded_broker
    port = eb.port if args.port is None else args.port
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):  # stop the broker, then exit 0
        signal.signal(signum, lambda *_: stop.set())
    with EmbeddedBroker(eb.host, port, log_file=eb.log_file) as broker:
        k = settings.kafka
        ensure_topics(
            broker.bootstrap,
            dict.fromkeys([k.usage_topic, k.gpu_topic, k.dead_letter_topic], eb.partitions),
        )
        print(f"embedded broker on {broker.bootstrap} (memory only); Ctrl-C stops it", flush=True)
        while not stop.wait(1.0):
            pass
        return 0


def _bootstrap(args: argparse.Namespace, settings: Settings) -> str:
    if args.bootstrap:
        return str(args.bootstrap)
    if not settings.kafka.embedded:
        return settings.kafka.bootstrap_servers
    eb = settings.embedded_broker
    if eb.port == 0:
        raise ConfigError("embedded_broker.port is 0 (random); pass --bootstrap HOST:PORT")
    return f"{eb.host}:{eb.port}"


def cmd_produce(args: argparse.Namespace) -> int:
    from finopsd.ingest.loadgen import UsageLoad, produce

    settings = _settings(args)
    setup_logging(settings, args.debug)
    bootstrap = _bootstrap(args, settings)
    topic = args.topic or settings.kafka.usage_topic
    seed = args.seed if args.seed is not None else secrets.randbits(32)
    load = UsageLoad(
        seed=seed,
        repeat_share=args.repeat_share,
        duplicate_share=args.duplicate_share,
        invalid_share=args.invalid_share,
    )
    started = time.perf_counter()
    messages = itertools.islice(iter(load), args.events)
    if args.json or not sys.stderr.isatty():
        sent = produce(
            bootstrap, topic, messages, args.events, producer_config=_producer_auth(settings, args)
        )
    else:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

        with Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            transient=False,
        ) as progress:
            task = progress.add_task(f"producing to {topic}", total=args.events)
            sent = produce(
                bootstrap,
                topic,
                messages,
                args.events,
                producer_config=_producer_auth(settings, args),
                on_progress=lambda n: progress.advance(task, n),
            )
    elapsed = time.perf_counter() - started
    summary = {
        "topic": topic,
        "bootstrap": bootstrap,
        "seed": seed,
        "run_id": load.run_id,
        "sent": sent,
        "seconds": round(elapsed, 3),
        "events_per_second": round(sent / elapsed) if elapsed else None,
        **{f"{k}_messages": v for k, v in load.counts.items()},
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"sent {sent:,} messages to {topic} on {bootstrap} in {elapsed:.1f}s "
            f"({summary['events_per_second']:,}/s): {load.counts['valid']:,} valid "
            f"({load.counts['repeat']:,} repeated prompts), {load.counts['duplicate']:,} resends, "
            f"{load.counts['invalid']:,} invalid; --seed {seed} sends the same again"
        )
    return 0


def _producer_auth(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    return {} if args.bootstrap or settings.kafka.embedded else settings.kafka.client_config()


def cmd_replay(args: argparse.Namespace) -> int:
    """Publish a trace file to Kafka as native usage events; see ``finopsd.ingest.replay``."""
    from datetime import UTC, datetime

    from kafka.errors import KafkaError

    from finopsd.ingest import replay as rp

    settings = _settings(args)
    setup_logging(settings, args.debug)
    path = Path(args.file)
    plan: rp.Plan | None = None
    if args.format == "native":
        flags = ("tenants", "models", "run_id", "start", "seed")
        given = [f"--{f.replace('_', '-')}" for f in flags if getattr(args, f) is not None]
        if given:
            print(
                f"finopsd: {', '.join(given)}: not for --format native, whose lines are sent "
                "as they are (own event_id, ts, tenant and model)",
                file=sys.stderr,
            )
            return 2
    else:
        plan = rp.Plan(
            run_id=args.run_id or rp.new_run_id(),
            start=args.start or datetime.now(UTC).replace(microsecond=0),
            tenants=args.tenants or rp.DEFAULT_TENANTS,
            models=args.models or rp.DEFAULT_MODELS,
            seed=args.seed or 0,
        )
    try:
        items = rp.read_trace(path, args.format, plan)
    except rp.ReplayInputError as exc:
        print(f"finopsd: {exc}", file=sys.stderr)
        return 2
    bootstrap = _bootstrap(args, settings)
    topic = args.topic or settings.kafka.usage_topic
    run = {
        "file": str(path),
        "format": args.format,
        "topic": topic,
        "bootstrap": bootstrap,
        "run_id": plan.run_id if plan else None,
        "start": plan.start.isoformat().replace("+00:00", "Z") if plan else None,
        "speed": args.speed,
        "limit": args.limit,
    }
    max_reported = 20
    bad_lines = 0
    bar: Any = None  # (rich Progress, task id) while a progress bar shows

    def advance(n: int) -> None:
        if bar is not None:
            bar[0].advance(bar[1], n)

    def on_bad_line(bad: rp.BadLine) -> None:
        nonlocal bad_lines
        bad_lines += 1
        advance(1)  # the bar counts lines read
        if bad_lines <= max_reported:
            message = f"finopsd: skipped {bad}"
        elif bad_lines == max_reported + 1:
            message = f"finopsd: more bad lines skipped; only the first {max_reported} are shown"
        else:
            return
        if bar is None:
            print(message, file=sys.stderr)
        else:
            from rich.text import Text

            bar[0].console.print(Text(message))

    def publish() -> rp.ReplayStats:
        return rp.publish(
            bootstrap,
            topic,
            items,
            speed=args.speed,
            limit=args.limit,
            producer_config=_producer_auth(settings, args),
            on_progress=advance,
            on_bad_line=on_bad_line,
            max_reported=max_reported,
        )

    try:
        if args.json or not sys.stderr.isatty():
            stats = publish()
        else:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

            total = rp.count_lines(path) - (args.format == "azure")
            if args.limit is not None:
                total = min(total, args.limit)
            with Progress(
                "[progress.description]{task.description}",
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
            ) as progress:
                bar = (
                    progress,
                    progress.add_task(f"replaying {path.name} to {topic}", total=total),
                )
                stats = publish()
    except KafkaError as exc:
        print(f"finopsd: Kafka at {bootstrap}: {exc}", file=sys.stderr)
        return 1
    summary = {**run, **stats.as_dict()}
    if args.json:
        print(json.dumps(summary))
        return 0
    pace = f"paced at {args.speed:g}x" if args.speed else "unpaced"
    print(
        f"replayed {stats.sent:,} events from {path} to {topic} on {bootstrap} in "
        f"{stats.seconds:.1f}s ({summary['events_per_second'] or 0:,}/s, {pace}; the trace "
        f"spans {stats.trace_seconds:,.1f}s); {stats.skipped:,} bad lines skipped"
    )
    if stats.sent:
        print(
            f"ts {summary['first_ts']} .. {summary['last_ts']}; tokens {stats.input_tokens:,} "
            f"in, {stats.output_tokens:,} out"
        )
    if plan is not None:
        print(
            f"run id {plan.run_id}: --run-id {plan.run_id} --start {run['start']} sends the "
            "same events again (finopsd stores them once)"
        )
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if args.action == "show" or args.json:
        data = settings.redacted()
        print(
            json.dumps(data, indent=2, default=str) if args.json or args.action == "show" else data
        )
    else:
        print("configuration is valid")
    return 0


def _held(exc: Exception) -> bool:
    """The store could not be opened because a running finopsd holds it."""
    return "lock" in str(exc).lower()


def cmd_analyze(args: argparse.Namespace) -> int:
    from finopsd import views
    from finopsd.analyzers.base import finding_from_dict
    from finopsd.analyzers.runner import AnalyzerRun, build, run_analyzers
    from finopsd.client import DaemonClient, DaemonError
    from finopsd.pricing import PriceBook
    from finopsd.store import Store, StoreError

    settings = _settings(args)
    setup_logging(settings, args.debug)
    only = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else None
    try:
        analyzers = build(settings.analyzers.options(), only)
    except ValueError as exc:
        print(f"finopsd: {exc}", file=sys.stderr)
        return 2
    window_days = args.window_days or settings.analyzers.window_days
    if not settings.store.path.exists():
        print(
            f"finopsd: no store at {settings.store.path} (store.path): run the daemon first",
            file=sys.stderr,
        )
        return 1
    try:
        with Store(settings.store.path) as store:
            runs = run_analyzers(
                store,
                PriceBook.from_settings(settings.pricing),
                analyzers,
                window_days=window_days,
                min_evidence_hours=settings.analyzers.min_evidence_hours,
            )
        result = views.analysis(runs, window_days)
    except StoreError as exc:
        if not _held(exc):
            print(f"finopsd: {exc}", file=sys.stderr)
            return 1
        try:  # the running daemon runs them, on its own analyzer instances
            result = DaemonClient(settings).post(
                "/v1/analyze", {"only": only, "window_days": args.window_days}
            )
        except DaemonError as err:
            print(f"finopsd: {err}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps(result))
    else:
        _print_findings(
            [finding_from_dict(f) for f in result["findings"]],
            [
                AnalyzerRun(r["analyzer"], r["seconds"], [None] * r["findings"], r["error"])
                for r in result["runs"]
            ],
        )
    return 1 if any(r["error"] for r in result["runs"]) else 0


def _print_findings(findings: list[Any], runs: list[Any]) -> None:
    """Blocks in a narrow terminal, a table in a wide one: ``finopsd.reports.findings_text``."""
    from finopsd.reports import findings_text

    encoding = (getattr(sys.stdout, "encoding", None) or "").lower().replace("-", "")
    text = findings_text.render(
        findings, runs, findings_text.terminal_width(), ascii_only=encoding != "utf8"
    )
    sys.stdout.write(text)
    sys.stdout.flush()


def cmd_stats(args: argparse.Namespace) -> int:
    from finopsd import views
    from finopsd.client import DaemonClient, DaemonError
    from finopsd.store import Store, StoreError

    settings = _settings(args)
    try:
        with Store(settings.store.path, read_only=True) as store:
            out = views.stats(store, store.cursor(), settings.pricing.disagreement_tolerance)
    except StoreError as exc:
        if not _held(exc):
            print(f"finopsd: {exc}", file=sys.stderr)
            return 1
        try:
            out = DaemonClient(settings).get("/v1/stats")
        except DaemonError as err:
            print(f"finopsd: {err}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps(out))
    else:
        for key, value in out.items():
            print(f"{key}: {value}")
    return 0


def _export_through_daemon(
    settings: Settings, args: argparse.Namespace, output: str, to_stdout: bool
) -> dict[str, Any]:
    """``GET /v1/export/focus`` into ``output`` (atomically) or stdout; its summary."""
    import os
    import tempfile

    from finopsd.client import DaemonClient
    from finopsd.reports import focus

    client = DaemonClient(settings)
    params = {
        "from": focus.format_instant(args.start),
        "to": focus.format_instant(args.end),
        "format": args.format,
        "billing_account": args.billing_account,
    }
    if to_stdout:
        sys.stdout.flush()
        headers = client.download("/v1/export/focus", params, sys.stdout.buffer)
        sys.stdout.buffer.flush()
    else:
        target = Path(output)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent or ".")
        try:
            with os.fdopen(fd, "wb") as f:
                headers = client.download("/v1/export/focus", params, f)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return json.loads(headers.get("x-finopsd-export", "{}"))


def cmd_export_focus(args: argparse.Namespace) -> int:
    """``export focus``: write a FOCUS 1.2 file of [--from, --to); see ``finopsd.reports.focus``.

    While a daemon holds the store, it writes the file (``GET /v1/export/focus``)."""
    from finopsd.client import DaemonError
    from finopsd.pricing import PriceBook
    from finopsd.reports import focus
    from finopsd.store import Store, StoreError

    settings = _settings(args)
    start, end = args.start, args.end
    if end <= start:
        print(
            f"finopsd: --to ({focus.format_instant(end)}) must be after --from "
            f"({focus.format_instant(start)})",
            file=sys.stderr,
        )
        return 2
    to_stdout = args.output == "-"
    if to_stdout and args.format != "csv":
        print("finopsd: --output -: only --format csv can go to stdout", file=sys.stderr)
        return 2
    output = args.output or focus.default_output_name(start, end, args.format)
    path = settings.store.path
    if not Path(path).exists():
        print(f"finopsd: no store at {path}", file=sys.stderr)
        return 1
    try:
        with Store(path, read_only=True) as store:
            if store.schema_version() < 2:  # no cost columns yet
                print(
                    f"finopsd: the store {path} predates pricing (schema version "
                    f"{store.schema_version()}); start the daemon once to migrate it",
                    file=sys.stderr,
                )
                return 1
            table = focus.focus_table(
                store,
                start,
                end,
                prices=PriceBook.from_settings(settings.pricing),
                billing_account=args.billing_account,
            )
            skipped = focus.skipped_events(store, start, end)
    except StoreError as exc:
        if not _held(exc):
            print(f"finopsd: {exc}", file=sys.stderr)
            return 1
        try:  # the running daemon exports it
            summary = _export_through_daemon(settings, args, output, to_stdout)
        except DaemonError as err:
            print(f"finopsd: {err}", file=sys.stderr)
            return 1
        except OSError as err:
            print(f"finopsd: cannot write {output}: {err.strerror or err}", file=sys.stderr)
            return 1
    else:
        summary = focus.export_summary(table, skipped, start, end, args.format)
        try:
            if to_stdout:
                focus.write_csv_stdout(table)
            elif args.format == "csv":
                focus.write_csv(table, output)
            else:
                focus.write_parquet(table, output)
        except OSError as exc:
            print(f"finopsd: cannot write {output}: {exc.strerror or exc}", file=sys.stderr)
            return 1
    out = {"output": output, **summary}
    if args.json:
        print(json.dumps(out), file=sys.stderr if to_stdout else sys.stdout)
        return 0
    where = "stdout" if to_stdout else output
    unpriced, unsettled = out["unpriced"], out["unsettled"]
    derived = out["derived_unit_prices"]
    lines = [
        f"wrote {out['rows']:,} FOCUS {out['focus_version']} rows to {where} for "
        f"{out['from']} .. {out['to']}: billed {out['billed_cost_usd']:,.4f} USD (list "
        f"{out['list_cost_usd']:,.4f}) from {out['exported_events']:,} priced events and "
        f"{out['idle_deployment_hours']:,} idle deployment-hours "
        f"({out['idle_cost_usd']:,.4f} USD)"
    ]
    if unpriced["events"]:
        models = ", ".join(f"{m} ({n:,})" for m, n in unpriced["models"].items())
        lines.append(
            f"left out {unpriced['events']:,} unpriced events: {models}; add prices "
            "with [[pricing.prices]] or [[pricing.deployments]]"
        )
    if unsettled["events"]:
        deps = ", ".join(f"{d} ({n:,})" for d, n in unsettled["deployments"].items())
        lines.append(
            f"left out {unsettled['events']:,} self-hosted events whose hour is not "
            f"settled yet: {deps}"
        )
    if out["cache_hits"]["events"]:
        lines.append(
            f"left out {out['cache_hits']['events']:,} events answered from a gateway's "
            "response cache (no provider bills them)"
        )
    if derived:
        ids = ", ".join(f"{p} ({n:,} rows)" for p, n in derived.items())
        lines.append(
            f"unit prices derived from the stored cost (x_PriceDetails says why) for: {ids}; "
            "'finopsd prices reprice' prices the events again with the current price book"
        )
    for line in lines:
        print(f"finopsd: {line}", file=sys.stderr)
    return 0


# -- parser ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-c",
        "--config",
        metavar="PATH",
        help="config file (default: $FINOPSD_CONFIG, else ./config.toml if present)",
    )
    common.add_argument("--debug", action="store_true", help="verbose logs and tracebacks")

    parser = argparse.ArgumentParser(
        prog="finopsd",
        description="FinOps daemon for AI: ingests LLM usage and GPU samples from Kafka into "
        "DuckDB, exactly once, to find and fix waste.",
        epilog="Every setting lives in config.toml and can be overridden with "
        "FINOPSD_<SECTION>__<KEY> environment variables.",
    )
    parser.add_argument("--version", action="version", version=f"finopsd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "run",
        parents=[common],
        help="run the daemon (Ctrl-C or SIGTERM stops it cleanly)",
        description="Consume usage events and GPU samples and store them exactly once. With "
        'kafka.bootstrap_servers = "embedded" it also runs a local broker on 127.0.0.1.',
    )
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "produce",
        parents=[common],
        help="send realistic usage events to a topic (load generator)",
        description="Generate usage events (several tenants, apps and models; request sizes "
        "from the Azure LLM trace 2023) and send them to Kafka.",
    )
    p.add_argument(
        "-n", "--events", type=int, default=10_000, help="messages to send (default 10000)"
    )
    p.add_argument("--topic", help="topic (default: kafka.usage_topic)")
    p.add_argument("--bootstrap", metavar="HOST:PORT", help="broker (default: from config)")
    p.add_argument(
        "--seed",
        type=int,
        help="random seed: the same seed sends the same events (and event ids) again, which "
        "finopsd then stores once; default: a fresh seed each run (printed in the summary)",
    )
    p.add_argument("--repeat-share", type=_share, default=0.15, help="share of repeated prompts")
    p.add_argument("--duplicate-share", type=_share, default=0.0, help="share of producer resends")
    p.add_argument("--invalid-share", type=_share, default=0.0, help="share of invalid payloads")
    p.add_argument("--json", action="store_true", help="print a JSON summary, no progress bar")
    p.set_defaults(func=cmd_produce)

    from finopsd.ingest import replay as replay_args

    p = sub.add_parser(
        "replay",
        parents=[common],
        help="publish a real trace file (Azure, Mooncake, native NDJSON) as usage events",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
Publish a trace to Kafka as native usage events (one JSON object per message,
keyed by event_id), keeping the trace's inter-arrival gaps.

formats:
  azure     Azure LLM inference trace 2023 CSV: TIMESTAMP, ContextTokens,
            GeneratedTokens -> input and output tokens
  mooncake  Mooncake trace JSONL: timestamp (ms), input_length, output_length,
            hash_ids (512-token block hashes) -> prefix_hashes; prompt_hash
            is a hash of the whole hash_ids list
  native    NDJSON usage events, each validated and sent as it is (its own
            event_id, ts, tenant and model; the flags marked * do not apply)

Event ts = --start + (the request's trace time - the file's first trace time).
Tenants and models are drawn per line, uniformly, from a hash of (--seed,
line number): the same seed assigns the same, whatever --limit.
event_id = replay-RUNID-FILETAG-LINE (FILETAG: a hash of the file's name), so
replaying a file again with the same --run-id (and, beyond
ingest.dedup_window_hours, the same --start) is stored once by finopsd, and
another run id adds new events.

A bad line is reported as FILE:LINE and skipped; a missing file or one that is
not in --format exits 2.""",
        epilog="example (an hour of the Azure coding trace in a minute):\n"
        "  finopsd replay azure_llm_2023_code.csv --format azure --speed 60 \\\n"
        "      --tenants acme,globex --models openai/gpt-4o,openai/gpt-4o-mini",
    )
    p.add_argument("file", metavar="FILE", help="the trace file")
    p.add_argument(
        "--format", required=True, choices=["azure", "mooncake", "native"], help="its format"
    )
    p.add_argument(
        "--speed",
        type=replay_args.speed_arg,
        metavar="X",
        help="time compression: wait the trace's gaps divided by X (60: an hour in a "
        "minute); default: no pacing, as fast as the broker takes them",
    )
    p.add_argument(
        "--tenants",
        type=replay_args.tenants_arg,
        metavar="A,B,...",
        help="* tenants to assign (default: "
        + ",".join(replay_args.DEFAULT_TENANTS).replace("%", "%%")
        + ")",
    )
    p.add_argument(
        "--models",
        type=replay_args.models_arg,
        metavar="PROVIDER/MODEL,...",
        help="* models to assign; split at the first / (default: "
        + ",".join(f"{p}/{m}" for p, m in replay_args.DEFAULT_MODELS).replace("%", "%%")
        + ")",
    )
    p.add_argument("--seed", type=int, help="* seed of the tenant and model draw (default 0)")
    p.add_argument(
        "--run-id",
        type=replay_args.run_id_arg,
        metavar="ID",
        help="* part of every event_id (default: random, printed in the summary)",
    )
    p.add_argument(
        "--start",
        type=replay_args.start_arg,
        metavar="ISO-8601",
        help="* ts of the trace's first request (default: now; no offset means UTC)",
    )
    p.add_argument("--limit", type=replay_args.limit_arg, metavar="N", help="send at most N events")
    p.add_argument("--topic", help="topic (default: kafka.usage_topic)")
    p.add_argument("--bootstrap", metavar="HOST:PORT", help="broker (default: from config)")
    p.add_argument(
        "--json", action="store_true", help="print a JSON summary on stdout, no progress bar"
    )
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser(
        "broker",
        parents=[common],
        help="run only the embedded broker, in the foreground",
        description="Run the embedded Tansu broker (memory only) on embedded_broker.host:port "
        "and create finopsd's topics.",
    )
    p.add_argument("--port", type=int, help="port (default: embedded_broker.port)")
    p.set_defaults(func=cmd_broker)

    p = sub.add_parser(
        "config",
        parents=[common],
        help="check or show the effective configuration",
        description="Validate config.toml plus environment overrides; 'show' prints the result "
        "with secrets hidden.",
    )
    p.add_argument("action", choices=["check", "show"], nargs="?", default="check")
    p.add_argument("--json", action="store_true", help="print the effective settings as JSON")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser(
        "stats",
        parents=[common],
        help="row counts, dead letters by reason and stored offsets (daemon stopped)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser(
        "analyze",
        parents=[common],
        help="run the analyzers now and show their findings (daemon stopped)",
        description="Run the analyzers over the last analyzers.window_days of the store, keep "
        "their findings (updated by id, never repeated) and show them, the largest monthly "
        "saving first. The daemon runs them on a schedule; this runs them on demand.",
    )
    p.add_argument("--only", metavar="NAME[,NAME]", help="run only these analyzers")
    p.add_argument(
        "--window-days",
        type=_window_days,
        help="days to look back, at most 366 (default: analyzers.window_days)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser(
        "export",
        help="export cost and usage data (FOCUS 1.2)",
        description="Export what the store knows in a standard format.",
    )
    export = p.add_subparsers(dest="export_format", required=True, metavar="KIND")
    p = export.add_parser(
        "focus",
        parents=[common],
        help="FOCUS 1.2 cost and usage file (CSV or Parquet) of a period",
        description="Write the priced usage of [--from, --to) as a FOCUS 1.2 cost and usage "
        "dataset: one row per UTC hour, tenant, team/app/feature, provider, model, price and "
        "meter (input, cached-input, cache-write, output tokens), plus the idle GPU-hours of "
        "self-hosted deployments. Unpriced events are left out and counted. Reads the store "
        "directly: stop the daemon first.",
    )
    p.add_argument(
        "--from",
        dest="start",
        required=True,
        type=_period_bound,
        metavar="DATE",
        help="first hour, inclusive: YYYY-MM-DD or an ISO 8601 date-time on a whole hour "
        "(no offset means UTC)",
    )
    p.add_argument(
        "--to", dest="end", required=True, type=_period_bound, metavar="DATE", help="end, exclusive"
    )
    p.add_argument("--format", required=True, choices=["csv", "parquet"], help="file format")
    p.add_argument(
        "-o",
        "--output",
        metavar="PATH",
        help="file to write (default: focus_<from>_<to>.<format> here); - is stdout (csv only)",
    )
    p.add_argument(
        "--billing-account",
        default="default",
        metavar="NAME",
        help="BillingAccountId and BillingAccountName of every row (default: default)",
    )
    p.add_argument(
        "--json", action="store_true", help="print the summary as JSON (stderr when -o -)"
    )
    p.set_defaults(func=cmd_export_focus)

    from finopsd.cli_prices import add_parsers as add_prices_parsers

    add_prices_parsers(sub, common, _settings)
    from finopsd.cli_actions import add_parsers as add_actions_parsers

    add_actions_parsers(sub, common, _settings)
    from finopsd.cli_report import add_parsers as add_report_parsers

    add_report_parsers(sub, common, _settings)
    return parser


def _period_bound(text: str) -> Any:
    from finopsd.reports.focus import PeriodError, parse_bound

    try:
        return parse_bound(text)
    except PeriodError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _window_days(text: str) -> float:
    """As analyzers.window_days: more than 0, at most 366."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= 366:
        raise argparse.ArgumentTypeError(f"{text} is not more than 0 and at most 366")
    return value


def _share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 1")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(
            f"finopsd: configuration error:\n  {str(exc).replace(chr(10), chr(10) + '  ')}",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if getattr(args, "debug", False):
            raise
        print(f"finopsd: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
