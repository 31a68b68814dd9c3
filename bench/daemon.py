"""Resident memory of one `finopsd run` process: ingesting a backlog while the analyzers run.

In one run: a store of N stored events (default 10,000,000 over 30 days, made by
bench/analyze.py's generator, or copied from a store kept with
``bench/analyze.py --keep``), an embedded broker holding a backlog of B usage
events (default 300,000) and, with ``--live-rate``, live traffic sent while it
runs, and `finopsd run` as its own process with the
analyzers' first run at start-up, so that they run while the backlog is ingested
(the worst case). The daemon's VmRSS is sampled every 20 ms until the backlog is
stored and every analyzer has run once; then it is stopped with SIGTERM and its
VmHWM (the kernel's peak) is read just before. The broker is a process of its own
and is not counted.

Prints the peak while ingesting alone, while the analyzers ran, the kernel's
peak, and the ratio of that peak against the goal (600 MiB).

    python bench/daemon.py [--events N] [--backlog B] [--live-rate R]
                           [--start-from PATH | --keep PATH]
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing as mp
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from kafka import KafkaConsumer, TopicPartition

from finopsd.analyzers.runner import build
from finopsd.config import load_settings
from finopsd.ingest.broker import EmbeddedBroker, ensure_topics
from finopsd.ingest.loadgen import UsageLoad, produce

GOAL_MIB = 600
TOPIC = "llm.usage"
PARTITIONS = 4
ANALYZER_LINE = re.compile(r"analyzer (\S+): \d+ finding")


def _status(pid: int, key: str) -> float:
    """A /proc/<pid>/status figure in MiB (0.0 once the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _build(path: Path, events: int, days: float) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from analyze import generate  # the analyzer bench's generator

    from finopsd.store import Store

    now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    with Store(path) as store:
        generate(
            store,
            start=now - timedelta(days=days),
            events=events,
            seconds=days * 86400,
            first_id=0,
        )


def _produce_part(args: tuple[str, int, int]) -> int:
    bootstrap, seed, count = args
    load = UsageLoad(seed=seed, duplicate_share=0.01)
    return produce(bootstrap, TOPIC, itertools.islice(iter(load), count), count)


def _produce_live(bootstrap: str, rate: int, stop: Any) -> None:
    """Send usage events at about ``rate`` per second until ``stop`` is set."""
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, acks=1)
    events = iter(UsageLoad(seed=int(time.time()), duplicate_share=0.01))
    began, sent = time.monotonic(), 0
    while not stop.is_set():
        due = int((time.monotonic() - began) * rate)
        for key, value in itertools.islice(events, max(0, due - sent)):
            producer.send(TOPIC, key=key, value=value)
            sent += 1
        time.sleep(0.05)
    producer.flush()
    producer.close()


def _stored_all(bootstrap: str, group: str) -> bool:
    """Whether the group's committed offsets have reached the end of every partition."""
    parts = [TopicPartition(TOPIC, p) for p in range(PARTITIONS)]
    # a consumer that names the group but never subscribes reads its offsets without joining
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        ends = consumer.end_offsets(parts)
        return all((consumer.committed(tp) or 0) >= ends[tp] for tp in parts)
    finally:
        consumer.close(autocommit=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=10_000_000, help="stored events")
    parser.add_argument("--days", type=float, default=30.0)
    parser.add_argument("--backlog", type=int, default=300_000, help="events waiting in Kafka")
    parser.add_argument("--start-from", type=Path, help="a store kept by --keep (copied)")
    parser.add_argument("--keep", type=Path, help="keep a copy of the generated store here")
    parser.add_argument(
        "--no-analyzers", action="store_true", help="ingest only (the analyzers' first run later)"
    )
    parser.add_argument(
        "--live-rate", type=int, default=0, help="also send live events at this rate per second"
    )
    parser.add_argument(
        "--live-seconds", type=float, default=30.0, help="send live events at least this long"
    )
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds for the daemon")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "finopsd.duckdb"
        began = time.perf_counter()
        if args.start_from:
            shutil.copyfile(args.start_from, store)
            print(f"copied the store from {args.start_from}", flush=True)
        else:
            child = mp.get_context("spawn").Process(
                target=_build, args=(store, args.events, args.days)
            )
            child.start()
            child.join()
            if child.exitcode:
                print(f"generator failed (exit {child.exitcode})")
                return 1
            print(
                f"built {args.events:,} stored events in {time.perf_counter() - began:.0f}s",
                flush=True,
            )
            if args.keep:
                shutil.copyfile(store, args.keep)
        with EmbeddedBroker() as broker:
            ensure_topics(broker.bootstrap, {TOPIC: PARTITIONS})
            if args.backlog:
                share = [args.backlog // 2 + (i < args.backlog % 2) for i in range(2)]
                with mp.get_context("spawn").Pool(2) as pool:
                    jobs = [(broker.bootstrap, 7000 + i, n) for i, n in enumerate(share)]
                    sent = sum(pool.map(_produce_part, jobs))
                print(f"produced a backlog of {sent:,} events", flush=True)
            group = f"bench-{time.time_ns()}"
            config = Path(tmp) / "config.toml"
            config.write_text(
                "[kafka]\n"
                f'bootstrap_servers = "{broker.bootstrap}"\n'
                f'group_id = "{group}"\n'
                "[store]\n"
                f'path = "{store}"\n'
                "[analyzers]\n"
                f"first_run_delay_s = {86400 if args.no_analyzers else 0}\n"
                "[api]\nport = 0\n"
            )
            daemon = subprocess.Popen(
                [sys.executable, "-m", "finopsd", "run", "--config", str(config)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
                env=os.environ,  # FINOPSD_* there tunes the daemon
            )
            ran: dict[str, float] = {}
            log_lines: list[str] = []

            def read_log() -> None:
                assert daemon.stderr is not None
                for line in daemon.stderr:
                    log_lines.append(line)
                    found = ANALYZER_LINE.search(line)
                    if found:
                        ran[found.group(1)] = time.perf_counter()

            reader = threading.Thread(target=read_log, daemon=True)
            reader.start()
            stop_live = mp.get_context("spawn").Event()
            live = None
            if args.live_rate:
                live = mp.get_context("spawn").Process(
                    target=_produce_live, args=(broker.bootstrap, args.live_rate, stop_live)
                )
                live.start()
            started = time.perf_counter()
            peaks = {"analyzers": 0.0, "backlog": 0.0, "after": 0.0}
            stored_at: float | None = None
            expected = (
                0
                if args.no_analyzers
                else len(build(load_settings(config, env={}).analyzers.options()))
            )
            next_check = 0.0
            while daemon.poll() is None:
                rss = _status(daemon.pid, "VmRSS")
                phase = "analyzers" if len(ran) < expected else "backlog"
                peaks["after" if stored_at is not None else phase] = max(
                    peaks["after" if stored_at is not None else phase], rss
                )
                now = time.perf_counter()
                if live is not None and not stop_live.is_set():
                    if len(ran) >= expected and now - started >= args.live_seconds:
                        stop_live.set()  # the live producer stops; the rest is stored
                        live.join()
                elif stored_at is None and now >= next_check:
                    next_check = now + 1.0
                    if _stored_all(broker.bootstrap, group):
                        stored_at = now
                if stored_at is not None and len(ran) >= expected:
                    break
                if now - started > args.timeout:
                    print("timed out", file=sys.stderr)
                    break
                time.sleep(0.02)
            hwm = _status(daemon.pid, "VmHWM")
            daemon.send_signal(signal.SIGTERM)
            code = daemon.wait(60)
            reader.join(5)
            if live is not None and live.is_alive():
                stop_live.set()
                live.join()
    if code != 0 or stored_at is None:
        print(f"daemon exit {code}; last log lines:\n{''.join(log_lines[-15:])}")
        return 1
    order = sorted(ran, key=lambda name: ran[name])
    what = f"backlog of {args.backlog:,}"
    if args.live_rate:
        what += f" and live traffic at {args.live_rate:,}/s for {args.live_seconds:g}s"
    print(
        f"{what} stored {stored_at - started:.1f}s after start"
        + (
            f"; analyzers done {max(ran.values()) - started:.1f}s after start ({', '.join(order)})"
            if ran
            else "; no analyzer ran"
        )
    )
    labels = {
        "analyzers": "while the analyzers ran (ingesting too)",
        "backlog": "ingesting after the analyzers were done",
        "after": "after everything was stored",
    }
    for name, label in labels.items():
        if peaks[name]:
            print(f"  peak RSS {label}: {peaks[name]:,.0f} MiB")
    print(
        f"peak RSS (VmHWM) of the daemon process {hwm:,.0f} MiB: "
        f"goal {GOAL_MIB} MiB, ratio {hwm / GOAL_MIB:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
