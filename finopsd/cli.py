"""The ``finopsd`` command line.

Exit status: 0 success, 1 runtime failure, 2 bad configuration or usage.
Errors are one or a few lines on stderr, never a traceback (``--debug`` shows it).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from finopsd import __version__
from finopsd.config import ConfigError, Settings, load_settings

log = logging.getLogger("finopsd")


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
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
    from finopsd.daemon import Daemon

    settings = _settings(args)
    setup_logging(settings, args.debug)
    daemon = Daemon(settings)
    daemon.install_signal_handlers()
    return daemon.run()


def cmd_broker(args: argparse.Namespace) -> int:
    from finopsd.ingest.broker import EmbeddedBroker, ensure_topics

    settings = _settings(args)
    setup_logging(settings, args.debug)
    eb = settings.embedded_broker
    port = eb.port if args.port is None else args.port
    with EmbeddedBroker(eb.host, port, log_file=eb.log_file) as broker:
        k = settings.kafka
        ensure_topics(
            broker.bootstrap,
            dict.fromkeys([k.usage_topic, k.gpu_topic, k.dead_letter_topic], eb.partitions),
        )
        print(f"embedded broker on {broker.bootstrap} (memory only); Ctrl-C stops it", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
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
    load = UsageLoad(
        seed=args.seed,
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
            f"{load.counts['invalid']:,} invalid"
        )
    return 0


def _producer_auth(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    return {} if args.bootstrap or settings.kafka.embedded else settings.kafka.client_config()


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


def cmd_stats(args: argparse.Namespace) -> int:
    from finopsd.store import Store, StoreError

    settings = _settings(args)
    try:
        with Store(settings.store.path, read_only=True) as store:
            counts = store.counts()
            offsets = store.stored_offsets()
    except StoreError as exc:
        msg = str(exc)
        if "lock" in msg.lower():
            msg = f"the store {settings.store.path} is held by a running finopsd"
        print(f"finopsd: {msg}", file=sys.stderr)
        return 1
    out = {**counts, "offsets": {f"{t}[{p}]": o for (t, p), o in sorted(offsets.items())}}
    if args.json:
        print(json.dumps(out))
    else:
        for key, value in out.items():
            print(f"{key}: {value}")
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
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--repeat-share", type=_share, default=0.15, help="share of repeated prompts")
    p.add_argument("--duplicate-share", type=_share, default=0.0, help="share of producer resends")
    p.add_argument("--invalid-share", type=_share, default=0.0, help="share of invalid payloads")
    p.add_argument("--json", action="store_true", help="print a JSON summary, no progress bar")
    p.set_defaults(func=cmd_produce)

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
    return parser


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
