"""Ingest throughput against its anchor: plain kafka-python consumption of the same topic.

In one run: start the embedded broker, produce N usage events (default
1,000,000; 1 % producer resends), then alternate, for several rounds,

  (a) a plain kafka-python consumer reading the topic (no decode, no store), and
  (b) finopsd's ingest of the same topic into a fresh DuckDB file: decode and
      validate, price, dedup, dead-letter handling, rows and offsets in one
      transaction per batch, offsets committed back to Kafka.

Each is timed from its first non-empty poll to its last record (for (b): to
the final batch stored and committed). Prints each rate, each pair's ratio
b/a, and the median ratio last. The machine's speed drifts run to run, which
is why the anchor is measured in the same run, alternating.

With ``--api-load`` each round also runs (c): (b) with the daemon's HTTP API
served from the ingesting process over the same store (``ApiServer``, as the
daemon serves it) while a second process polls ``/v1/stats``, ``/v1/findings``
and ``/metrics`` in turn, one request every ``--api-interval`` seconds; it prints
c/a beside b/a, and the requests served with their latency.

    python bench/ingest.py [--events N] [--rounds R] [--partitions P] [--api-load]
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing as mp
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from kafka import KafkaConsumer, TopicPartition
from rss import RssSampler

from finopsd.config import Settings, load_settings
from finopsd.daemon import bound_allocators, consumer_config, daemon_store
from finopsd.events import UsageEvent
from finopsd.ingest.broker import EmbeddedBroker, ensure_topics
from finopsd.ingest.decode import BatchDecoder
from finopsd.ingest.loadgen import UsageLoad, produce
from finopsd.ingest.pipeline import Ingestor, IngestWorker, Route
from finopsd.pricing import PriceBook

TOPIC = "bench.usage"


def _produce_part(args: tuple[str, int, int]) -> int:
    bootstrap, seed, count = args
    load = UsageLoad(seed=seed, duplicate_share=0.01)
    return produce(bootstrap, TOPIC, itertools.islice(iter(load), count), count)


def produce_all(bootstrap: str, events: int, procs: int) -> float:
    started = time.perf_counter()
    share = [events // procs + (i < events % procs) for i in range(procs)]
    with mp.get_context("spawn").Pool(procs) as pool:
        sent = sum(pool.map(_produce_part, [(bootstrap, 1000 + i, n) for i, n in enumerate(share)]))
    assert sent == events, (sent, events)
    return time.perf_counter() - started


class ThreadCpu:
    """CPU seconds per thread of this process since construction (Linux /proc; else nothing).

    Threads that have ended by the time of ``report`` are not counted; threads
    Python did not start are named by their OS name (DuckDB, Arrow pools).
    """

    def __init__(self) -> None:
        self.start = self._sample()
        self.last: dict[int, tuple[str, float]] = dict(self.start)

    @staticmethod
    def _sample() -> dict[int, tuple[str, float]]:
        names = {t.native_id: t.name for t in threading.enumerate()}
        out: dict[int, tuple[str, float]] = {}
        try:
            tids = os.listdir("/proc/self/task")
        except OSError:
            return out
        tick = os.sysconf("SC_CLK_TCK")
        for tid in tids:
            try:
                with open(f"/proc/self/task/{tid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                with open(f"/proc/self/task/{tid}/comm") as f:
                    comm = f.read().strip()
            except OSError:
                continue
            name = names.get(int(tid), comm)
            out[int(tid)] = (name, (int(fields[11]) + int(fields[12])) / tick)
        return out

    def sample(self) -> None:
        """Remember the current figures (call while short-lived threads still run)."""
        self.last.update(self._sample())

    def report(self, events: int) -> str:
        self.sample()
        by_name: dict[str, float] = {}
        for tid, (name, cpu) in self.last.items():
            spent = cpu - self.start.get(tid, (name, 0.0))[1]
            key = name.split(" (")[0]
            by_name[key] = by_name.get(key, 0.0) + spent
        top = sorted(by_name.items(), key=lambda kv: -kv[1])
        return ", ".join(f"{n} {c / events * 1e6:.1f}" for n, c in top if c > 0.01)


def process_cpu(pid: int) -> float:
    """CPU seconds a process has used (Linux /proc; 0.0 elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def raw_consume(bootstrap: str, events: int, partitions: int, settings: Settings) -> float:
    config = consumer_config(settings, bootstrap)
    config.update(group_id=None)
    consumer = KafkaConsumer(**config)
    consumer.assign([TopicPartition(TOPIC, p) for p in range(partitions)])
    consumer.seek_to_beginning()
    seen, started, cpu0 = 0, None, 0.0
    threads = ThreadCpu()
    while seen < events:
        for records in consumer.poll(
            timeout_ms=500, max_records=config["max_poll_records"]
        ).values():
            if started is None:
                started, cpu0 = time.perf_counter(), time.process_time()
            for _record in records:
                seen += 1
    elapsed = time.perf_counter() - (started or time.perf_counter())
    print(f"  raw consume cpu/event {(time.process_time() - cpu0) / events * 1e6:.1f} us")
    print(f"    by thread (us/event): {threads.report(events)}")
    consumer.close(autocommit=False)
    return elapsed


API_PATHS = ("/v1/stats", "/v1/findings", "/metrics")


def _poll_api(url: str, token: str, interval: float, stop: Any, out: Any) -> None:
    """The second process of (c): GET the API's paths in turn until ``stop`` is set;
    puts (requests, errors, latencies in ms) on ``out``."""
    import httpx

    latencies: list[float] = []
    errors = 0
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}) as client:
        for path in itertools.cycle(API_PATHS):
            if stop.is_set():
                break
            began = time.perf_counter()
            try:
                ok = client.get(path, timeout=60).status_code == 200
            except httpx.HTTPError:
                ok = False
            latencies.append((time.perf_counter() - began) * 1000)
            errors += not ok
            stop.wait(interval)
    out.put((len(latencies), errors, latencies))


def _serve_api(store: Any, settings: Settings, worker: IngestWorker, lag: Any) -> tuple:
    """The daemon's API over ``store`` in this process; (server, token)."""
    import secrets

    from finopsd.api.app import create_app
    from finopsd.api.server import ApiServer
    from finopsd.api.state import ServiceState

    def no_analysis(only: Any, window_days: Any) -> list:
        raise ValueError("not in this benchmark")

    state = ServiceState(
        store=store,
        settings=settings,
        prices=worker.prices,
        stats=worker.stats,
        liveness=list,
        readiness=list,
        lag=lag,
        analyze=no_analysis,
    )
    token = secrets.token_urlsafe(32)
    server = ApiServer(create_app(state, token), "127.0.0.1", 0)
    server.start()
    return server, token


def finopsd_ingest(
    bootstrap: str,
    events: int,
    settings: Settings,
    round_no: int,
    *,
    api_interval: float | None = None,
) -> float:
    """(b), or (c) with ``api_interval``: the API served and polled meanwhile."""
    config = consumer_config(settings, bootstrap)
    config.update(group_id=f"bench-{round_no}-{time.time_ns()}")
    with (
        tempfile.TemporaryDirectory() as tmp,
        daemon_store(settings, Path(tmp) / "bench.duckdb") as store,
    ):
        window = timedelta(hours=settings.ingest.dedup_window_hours)
        worker = IngestWorker(
            store,
            {TOPIC: Route(BatchDecoder(UsageEvent), window)},
            dead_letters=None,
            batch_max_events=settings.ingest.batch_max_events,
            batch_max_age_s=settings.ingest.batch_max_age_ms / 1000,
            queue_chunks=settings.ingest.queue_chunks,
            queue_bytes=settings.ingest.queue_bytes,
            prices=PriceBook.from_settings(settings.pricing),
        )
        started: list[float] = []
        ingestor: Ingestor
        threads = ThreadCpu()

        def on_poll() -> None:
            if ingestor.polled >= events * 0.9 and len(started) == 2:
                threads.sample()
                started.append(0.0)
            if ingestor.polled and not started:
                started.append(time.perf_counter())
                started.append(time.process_time())
            if ingestor.polled >= events:
                ingestor.stop()

        ingestor = Ingestor(
            lambda: KafkaConsumer(**config),
            worker,
            [TOPIC],
            max_poll_records=config["max_poll_records"],
            on_poll=on_poll,
        )
        poller = None
        if api_interval is not None:
            server, token = _serve_api(store, settings, worker, ingestor.lag)
            ctx = mp.get_context("spawn")
            stop_polling, results = ctx.Event(), ctx.Queue()
            poller = ctx.Process(
                target=_poll_api, args=(server.url, token, api_interval, stop_polling, results)
            )
            poller.start()
        ingestor.run()
        if poller is not None:
            stop_polling.set()
            served, failed, latencies = results.get(timeout=120)
            poller.join(60)
            server.stop()
            q = statistics.quantiles(latencies, n=20) if len(latencies) > 1 else [0.0] * 19
            print(
                f"  API: {served} requests ({failed} failed) while ingesting; latency "
                f"p50 {statistics.median(latencies):.1f} ms, p95 {q[18]:.1f} ms"
            )
        elapsed = time.perf_counter() - started[0]
        cpu = (time.process_time() - started[1]) / events * 1e6
        print(f"  finopsd ingest cpu/event {cpu:.1f} us (all threads)")
        print(f"    by thread (us/event): {threads.report(events)}")
        stored = worker.stats.snapshot()
        rows = store.counts()["usage_events"]
    print(f"  polling waited {stored['backpressure_s']:.2f}s of {elapsed:.2f}s on the worker")
    assert stored["records"] == events, stored
    assert rows + sum(stored["duplicates"].values()) == events, (rows, stored)
    return elapsed


RSS = RssSampler()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--producers", type=int, default=2)
    parser.add_argument(
        "--api-load", action="store_true", help="also (c): ingest while the API is polled"
    )
    parser.add_argument(
        "--api-interval", type=float, default=0.1, help="seconds between API requests in (c)"
    )
    args = parser.parse_args()

    settings = load_settings(
        None,
        env={
            # FINOPSD_INGEST__* etc. from the environment tune the run, as for the daemon
            **{k: v for k, v in os.environ.items() if k.startswith("FINOPSD_")},
            "FINOPSD_KAFKA__SESSION_TIMEOUT_MS": "6000",
            "FINOPSD_KAFKA__HEARTBEAT_INTERVAL_MS": "1000",
        },
    )
    bound_allocators()  # as the daemon does, for both (a) and (b)
    with EmbeddedBroker() as broker:
        ensure_topics(broker.bootstrap, {TOPIC: args.partitions})
        took = produce_all(broker.bootstrap, args.events, args.producers)
        print(
            f"produced {args.events:,} events to {args.partitions} partitions in {took:.1f}s",
            flush=True,
        )
        ratios, loaded = [], []
        for r in range(1, args.rounds + 1):
            broker_cpu = process_cpu(broker.pid)
            with RSS.phase("(a) kafka-python"):
                a = raw_consume(broker.bootstrap, args.events, args.partitions, settings)
            broker_a = process_cpu(broker.pid) - broker_cpu
            with RSS.phase("(b) finopsd ingest"):
                b = finopsd_ingest(broker.bootstrap, args.events, settings, r)
            broker_b = process_cpu(broker.pid) - broker_cpu - broker_a
            print(
                f"  broker cpu/event (a) {broker_a / args.events * 1e6:.1f} us, "
                f"(b) {broker_b / args.events * 1e6:.1f} us"
            )
            ra, rb = args.events / a, args.events / b
            ratios.append(rb / ra)
            print(
                f"round {r}: (a) kafka-python {ra:>9,.0f} ev/s   "
                f"(b) finopsd ingest {rb:>9,.0f} ev/s   b/a {rb / ra:.3f}",
                flush=True,
            )
            if args.api_load:
                with RSS.phase("(c) finopsd ingest, API polled"):
                    c = finopsd_ingest(
                        broker.bootstrap, args.events, settings, r, api_interval=args.api_interval
                    )
                rc = args.events / c
                loaded.append(rc / ra)
                print(
                    f"round {r}: (c) finopsd ingest with the API polled {rc:>9,.0f} ev/s   "
                    f"c/a {rc / ra:.3f}",
                    flush=True,
                )
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {peak_mib:,.0f} MiB (whole benchmark, producers aside)")
    print(RSS.report())
    print(f"median ratio b/a: {statistics.median(ratios):.3f}")
    if loaded:
        print(f"median ratio c/a (API polled): {statistics.median(loaded):.3f}")
    return 0


if __name__ == "__main__":
    threading.current_thread().name = "bench"
    sys.exit(main())
