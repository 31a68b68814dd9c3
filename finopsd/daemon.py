"""The long-running daemon: wires settings to the broker, the store and ingest.

``Daemon(settings).run()`` blocks until SIGTERM or SIGINT, then finishes the
batch in flight, stores it, commits its offsets and returns 0.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import signal
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import Any

import pyarrow as pa
from kafka import KafkaConsumer, KafkaProducer

from finopsd.api.server import ApiServer, ApiServerError
from finopsd.client import clear_address, read_token, write_address
from finopsd.config import Settings
from finopsd.events import GpuSample, UsageEvent
from finopsd.ingest.broker import EmbeddedBroker, ensure_topics
from finopsd.ingest.decode import BatchDecoder, TimeWindow
from finopsd.ingest.formats import NATIVE, make_decoder
from finopsd.ingest.pipeline import DeadLetterSink, Ingestor, IngestStats, IngestWorker, Route
from finopsd.pricing import PriceBook, settle_self_hosted
from finopsd.service.actions import ControllerService, KafkaEvents
from finopsd.service.ingest import IngestService
from finopsd.service.notify import Notifier, Watchdog
from finopsd.service.supervisor import Check, Supervisor
from finopsd.store import Store

log = logging.getLogger(__name__)

SUPERVISE_S = 1.0
"""How often the main thread checks health and feeds the watchdog."""
STATUS_EVERY_S = 10.0
"""How often ``STATUS=`` may change."""

MMAP_THRESHOLD = 256 << 10
"""Allocations from the C library's malloc at least this large get pages of their own,
which go back to the system when freed (glibc's ``M_MMAP_THRESHOLD``)."""


def bound_allocators() -> None:
    """Allocators that give memory back: what the daemon frees leaves its resident set.

    Arrow's buffers come from the C library's malloc instead of Arrow's default
    mimalloc pool, which kept ~100 MiB of freed batches resident; and glibc's mmap
    threshold is fixed at ``MMAP_THRESHOLD`` (glibc raises it after each large free,
    up to 32 MiB, and the heap then keeps the fetched record batches). Where glibc
    is not the C library only Arrow's pool changes. Measured in
    ``bench/daemon.py``; see DEVELOPERS.md, "Memory".
    """
    pa.set_memory_pool(pa.system_memory_pool())
    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return
    m_mmap_threshold = -3  # glibc's malloc.h
    mallopt(m_mmap_threshold, MMAP_THRESHOLD)


@contextlib.contextmanager
def kafka_endpoint(settings: Settings) -> Iterator[str]:
    """The bootstrap address to use; starts and stops the embedded broker when configured."""
    if not settings.kafka.embedded:
        yield settings.kafka.bootstrap_servers
        return
    eb = settings.embedded_broker
    with EmbeddedBroker(eb.host, eb.port, log_file=eb.log_file) as broker:
        yield broker.bootstrap


def daemon_store(settings: Settings, path: Path | None = None) -> Store:
    """The store as the daemon opens it (``store.daemon_threads``, ``store.vacuum_tasks``)."""
    s = settings.store
    return Store(
        path or s.path,
        threads=s.daemon_threads,
        memory_limit=s.memory_limit,
        vacuum_tasks=s.vacuum_tasks,
    )


def consumer_config(settings: Settings, bootstrap: str) -> dict[str, Any]:
    k = settings.kafka
    return {
        **k.client_config(),
        "bootstrap_servers": bootstrap,
        "group_id": k.group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": k.auto_offset_reset,
        "session_timeout_ms": k.session_timeout_ms,
        "heartbeat_interval_ms": k.heartbeat_interval_ms,
        "max_poll_interval_ms": k.max_poll_interval_ms,
        "request_timeout_ms": k.request_timeout_ms,
        "bootstrap_timeout_ms": k.request_timeout_ms,
        # after an outage, reconnect within a second (kafka-python backs off up to 30 s)
        "reconnect_backoff_max_ms": 1000,
        "max_poll_records": k.max_poll_records,
        "fetch_max_bytes": k.fetch_max_bytes,
        "max_partition_fetch_bytes": k.max_partition_fetch_bytes,
        "receive_buffer_bytes": 4 << 20,
    }


class SelfHostedSettler(threading.Thread):
    """Prices self-hosted deployments' completed hours every ``pricing.settle_interval_s``.

    Runs only when deployments are configured; once more at stop, so a clean
    shutdown leaves every completed hour priced. A failure is logged and
    retried at the next interval; ingest goes on. A ``Service``.
    """

    def __init__(self, store: Store, prices: PriceBook, settings: Any) -> None:
        super().__init__(name="settle-self-hosted", daemon=True)
        self.store = store
        self.deployments = list(prices.deployments.values())
        self.interval_s = settings.settle_interval_s
        self._stop_event = threading.Event()

    def stop(self) -> None:
        """Settle once more and return."""
        self._stop_event.set()
        if self.is_alive():
            self.join()

    def health(self) -> list[Check]:
        if not self.deployments:
            return []
        alive = self.is_alive()
        return [Check("self-hosted-pricing", alive, "" if alive else "its thread ended")]

    def settle(self) -> int:
        until = datetime.now(UTC)
        return self.store.write(lambda con: settle_self_hosted(con, self.deployments, until=until))

    def run(self) -> None:
        if not self.deployments:
            return
        while True:
            stopping = self._stop_event.wait(self.interval_s)
            try:
                hours = self.settle()
                log.debug("settled %d self-hosted deployment-hour(s)", hours)
            except Exception as exc:  # logged, retried next time; ingest is unaffected
                log.error("could not price self-hosted deployments: %s", exc)
            if stopping:
                return


class AnalyzerScheduler:
    """Runs each enabled analyzer every ``interval_minutes`` (APScheduler 3, UTC, one at a time).

    The first runs start ``analyzers.first_run_delay_s`` after the daemon; a failing run
    is logged and the next one goes ahead; ingest is never held up by analysis.
    ``run_now`` (the API's ``POST /v1/analyze``) runs the same instances at once, one
    at a time with the scheduled runs. A ``Service``.
    """

    name = "analyzers"

    def __init__(self, store: Store, prices: PriceBook, settings: Settings) -> None:
        from apscheduler.events import EVENT_JOB_ERROR
        from apscheduler.executors.pool import ThreadPoolExecutor
        from apscheduler.schedulers.background import BackgroundScheduler

        from finopsd.analyzers.runner import build

        self.store = store
        self.prices = prices
        self._lock = threading.Lock()  # one run at a time: scheduled or asked for
        self.analyzers: list[Any] = []
        self.window_days = settings.analyzers.window_days
        self.min_evidence_hours = settings.analyzers.min_evidence_hours
        self.scheduler = BackgroundScheduler(
            timezone=UTC, executors={"default": ThreadPoolExecutor(max_workers=1)}
        )
        self.scheduler.add_listener(self._on_error, EVENT_JOB_ERROR)
        first = datetime.now(UTC) + timedelta(seconds=settings.analyzers.first_run_delay_s)
        self.analyzers = build(settings.analyzers.options())
        for analyzer in self.analyzers:
            minutes = analyzer.options.interval_minutes or settings.analyzers.interval_minutes
            self.scheduler.add_job(
                self._run,
                "interval",
                args=[analyzer],
                minutes=minutes,
                next_run_time=first,
                id=analyzer.name,
                max_instances=1,
                coalesce=True,
                misfire_grace_time=None,
            )

    def run_now(self, only: list[str] | None, window_days: float | None) -> list[Any]:
        """Run the enabled analyzers named in ``only`` (all: None) now, over
        ``window_days`` (default ``analyzers.window_days``); their ``AnalyzerRun``s.
        Raises ValueError naming an unknown or disabled analyzer."""
        from finopsd.analyzers.runner import run_analyzers

        chosen = self.analyzers
        if only is not None:
            by_name = {a.name: a for a in self.analyzers}
            unknown = [n for n in only if n not in by_name]
            if unknown:
                raise ValueError(
                    f"unknown or disabled analyzer {', '.join(unknown)}; enabled: "
                    f"{', '.join(sorted(by_name)) or 'none'}"
                )
            chosen = [by_name[n] for n in only]
        with self._lock:
            return run_analyzers(
                self.store,
                self.prices,
                chosen,
                window_days=window_days or self.window_days,
                min_evidence_hours=self.min_evidence_hours,
            )

    def _run(self, analyzer: Any) -> None:
        from finopsd.analyzers.runner import run_analyzers

        with self._lock:
            (run,) = run_analyzers(
                self.store,
                self.prices,
                [analyzer],
                window_days=self.window_days,
                min_evidence_hours=self.min_evidence_hours,
            )
        if run.error is None:
            log.info(
                "analyzer %s: %d finding(s) in %.2fs", run.name, len(run.findings), run.seconds
            )

    @staticmethod
    def _on_error(event: Any) -> None:
        log.error("scheduled analyzer run %s failed: %s", event.job_id, event.exception)

    def start(self) -> None:
        self.scheduler.start()

    def stop(self) -> None:
        if self.scheduler.running:
            self.scheduler.shutdown(wait=True)

    def health(self) -> list[Check]:
        running = bool(self.scheduler.running)
        return [Check("analyzers", running, "" if running else "the scheduler stopped")]


class StartupInterrupted(BaseException):
    """SIGTERM or SIGINT arrived while the consumer was connecting; ``run`` exits 0.

    A BaseException, like KeyboardInterrupt, so that no ``except Exception`` on the way
    (kafka-python's bootstrap loop) takes it for a connection error.
    """


class Daemon:
    """finopsd's main job: ingest until told to stop."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stats = IngestStats()
        self.ready = threading.Event()
        self.bootstrap: str | None = None
        self._ingestor: Ingestor | None = None
        self._api: ApiServer | None = None
        self._supervisor = Supervisor([])
        self._stop = threading.Event()
        self._connecting = False  # a signal then raises StartupInterrupted (see run)

    def stop(self) -> None:
        self._stop.set()
        if self._ingestor is not None:
            self._ingestor.stop()

    # -- supervision: the main thread -------------------------------------------------

    def _supervise(self, ingest: IngestService, notifier: Notifier) -> None:
        """Until ingest ends: every ``SUPERVISE_S``, the services' health checks feed the
        systemd watchdog (pings only while all pass); ``READY=1`` once partitions are
        assigned (the API listens by then); ``STATUS=`` a one-line summary."""
        watchdog = Watchdog(notifier)
        ready = False
        last_status = 0.0
        while ingest.running:
            ingest.join(SUPERVISE_S)
            if not ingest.running:
                return
            failing = [c for c in self.liveness() if not c.ok]
            watchdog.beat(not failing, "; ".join(f"{c.name}: {c.detail}" for c in failing))
            ingestor = self._ingestor
            if not ready and ingestor is not None and ingestor.assignment:
                ready = notifier.ready(self.status_line()) or not notifier.enabled
                if ready:
                    log.info("ready: %s", self.status_line())
            now = time.monotonic()
            if now - last_status >= STATUS_EVERY_S:
                watchdog.status(self.status_line())
                last_status = now

    def status_line(self) -> str:
        """One line for ``systemctl status``: records, events stored, lag, partitions, API."""
        snap = self.stats.snapshot()
        known = [n for n in self.lag().values() if n is not None]
        parts = self._ingestor.assignment if self._ingestor is not None else set()
        line = (
            f"{snap['records']:,} records read, {sum(snap['stored'].values()):,} rows stored, "
            f"lag {max(known, default=0):,}, {len(parts)} partitions"
        )
        if snap["stalled"] is not None:
            line += f"; paused: {snap['stalled']['cause']} unavailable"
        if self._api is not None:
            line += f"; API {self._api.url}"
        return line

    # -- the API's view of the daemon -------------------------------------------------

    def _make_reports(self, store: Store, producer_config: dict[str, Any]) -> Any:
        """The weekly report's schedule (``[reports]``), not started; None: disabled."""
        s = self.settings
        if not s.reports.enabled:
            return None
        from finopsd.reports.schedule import ReportService, slack_summary

        events = KafkaEvents(
            lambda: KafkaProducer(**producer_config),
            s.reports.topic,
            s.kafka.request_timeout_ms / 1000,
        )
        announce = None
        if s.slack.enabled and s.reports.slack_summary:
            from finopsd.actions.slack import post

            url = s.slack.webhook_url_value()

            def announce(report: dict[str, Any]) -> None:
                if url:
                    why = post(url, slack_summary(report, s.slack.api_base_url), s.slack.timeout_s)
                    if why is not None:
                        raise RuntimeError(why)

        return ReportService(
            store,
            s.reports,
            s.reports.directory(s.store.path),
            send=events.send,
            announce=announce,
        )

    def _make_controller(
        self, store: Store, prices: PriceBook, bootstrap: str, producer_config: dict[str, Any]
    ) -> ControllerService | None:
        """The action controller's service (``[actions]``), not started; None: disabled."""
        s = self.settings
        if not s.actions.enabled:
            return None
        from finopsd.actions.acks import AckReader
        from finopsd.actions.controller import Controller
        from finopsd.actions.registry import build_actuators

        timeout_s = s.kafka.request_timeout_ms / 1000
        events = KafkaEvents(lambda: KafkaProducer(**producer_config), s.actions.topic, timeout_s)
        commands = KafkaEvents(
            lambda: KafkaProducer(**producer_config), s.actions.command.topic, timeout_s
        )
        acks = AckReader(
            lambda: KafkaConsumer(
                bootstrap_servers=bootstrap,
                **s.kafka.client_config(),
                group_id=None,
                enable_auto_commit=False,
                request_timeout_ms=s.kafka.request_timeout_ms,
            ),
            s.actions.command.ack_topic,
        )
        actuators = build_actuators(s, send_command=commands.send, ack_reader=acks)
        closers: list[Any] = [events, commands, acks]
        sink: Any = events
        notifier = None
        if s.slack.enabled:  # each transition to Slack too; Kafka's answer is the outbox's
            from finopsd.actions.slack import SlackNotifier, TeeEvents

            notifier = SlackNotifier(s.slack, store)
            sink = TeeEvents(events, notifier)
            closers.append(notifier)
        controller = Controller(store, s.actions, prices, actuators, events=sink)
        if notifier is not None:
            notifier.attach(controller)
        return ControllerService(controller, s.actions.interval_s, closers)

    def _make_api(
        self,
        store: Store,
        prices: PriceBook,
        analysis: AnalyzerScheduler,
        controller: Any = None,
    ) -> ApiServer | None:
        """The HTTP API service (``[api]``), not started yet; None when disabled."""
        s = self.settings
        if not s.api.enabled:
            return None
        from finopsd.api.app import create_app
        from finopsd.api.state import ServiceState

        token = read_token(s, create=True)
        if token is None:
            raise RuntimeError(f"api: no token in {s.api.token_path(s.store.path)}")
        state = ServiceState(
            store=store,
            settings=s,
            prices=prices,
            stats=self.stats,
            liveness=self.liveness,
            readiness=self.readiness,
            lag=self.lag,
            analyze=analysis.run_now,
            started_at=time.time(),
            controller=controller,
        )
        return ApiServer(
            create_app(state, token),
            s.api.host,
            s.api.port,
            announce=lambda url: write_address(s, url),
            withdraw=lambda: clear_address(s),
        )

    def lag(self) -> dict[tuple[str, int], int | None]:
        """Records behind per assigned partition (None: not known yet)."""
        return self._ingestor.lag() if self._ingestor is not None else {}

    def liveness(self) -> list[Check]:
        """Every running service's health checks (ingest's threads and loop, the API, the
        analyzer schedule, self-hosted pricing)."""
        return self._supervisor.health()

    def readiness(self) -> list[Check]:
        """Able to do its job: the broker answers, partitions are assigned, the store takes
        writes, the consumer lag is at most ``api.ready_max_lag``."""
        ingestor = self._ingestor
        consumer = ingestor.consumer if ingestor is not None else None
        try:  # the group coordinator is known while its broker answers heartbeats
            coordinator = getattr(consumer, "_coordinator", None)
            connected = coordinator is not None and not coordinator.coordinator_unknown()
        except Exception:  # the consumer is closing
            connected = False
        stall = self.stats.stall
        checks = [
            Check(
                "broker",
                connected and (stall is None or stall.cause != "broker"),
                "no group coordinator: the broker does not answer"
                if not connected
                else ("" if stall is None else stall.describe()),
            ),
            Check(
                "partitions",
                ingestor is not None and bool(ingestor.assignment),
                f"{len(ingestor.assignment) if ingestor else 0} assigned",
            ),
            Check(
                "store",
                stall is None or stall.cause != "store",
                "" if stall is None else stall.describe(),
            ),
        ]
        lags = self.lag()
        known = [n for n in lags.values() if n is not None]
        worst = max(known, default=0)
        limit = self.settings.api.ready_max_lag
        checks.append(
            Check(
                "lag",
                worst <= limit,
                f"{worst:,} records behind (at most {limit:,}); "
                f"{len(lags) - len(known)} partition(s) not known yet",
            )
        )
        return checks

    def install_signal_handlers(self) -> None:
        def handle(signum: int, _frame: FrameType | None) -> None:
            name = signal.Signals(signum).name
            self.stop()
            if not self.ready.is_set():
                log.info("received %s during start-up: stopping", name)
                if self._connecting:
                    # a broker that does not answer keeps kafka-python's consumer
                    # constructor busy for up to kafka.request_timeout_ms: stop at once;
                    # nothing has been read yet, so nothing is left half-done. Only
                    # there: raised elsewhere (a store migration, where DuckDB's
                    # interrupt check turns it into "Query interrupted") it would leave
                    # work half-done, so until then run() checks the stop flag instead.
                    raise StartupInterrupted(name)
                return
            log.info("received %s: finishing the current batch", name)

        signal.signal(signal.SIGTERM, handle)
        signal.signal(signal.SIGINT, handle)

    def run(self) -> int:
        s = self.settings
        # first: the embedded broker, a child, must not inherit NOTIFY_SOCKET
        notifier = Notifier.from_environ(unset_environment=True)
        bound_allocators()
        with (
            kafka_endpoint(s) as bootstrap,
            daemon_store(s) as store,
        ):
            self.bootstrap = bootstrap
            topics = [s.kafka.usage_topic, s.kafka.gpu_topic]
            # topics in ingest.formats carry usage events too, in the format named there
            topics += [t for t in s.ingest.formats if t not in topics]
            if s.kafka.embedded:
                ensure_topics(
                    bootstrap,
                    dict.fromkeys(
                        [*topics, s.kafka.dead_letter_topic], s.embedded_broker.partitions
                    ),
                )
                if s.actions.enabled:  # one partition each: their order is the point
                    ensure_topics(
                        bootstrap,
                        dict.fromkeys(
                            [s.actions.topic, s.actions.command.topic, s.actions.command.ack_topic],
                            1,
                        ),
                    )
                if s.reports.enabled:
                    ensure_topics(bootstrap, {s.reports.topic: 1})
            window = timedelta(hours=s.ingest.dedup_window_hours)
            max_bytes = s.ingest.max_record_bytes
            ts_window = TimeWindow(timedelta(seconds=s.ingest.max_future_skew_s))
            routes = {
                topic: Route(
                    make_decoder(
                        s.ingest.formats.get(topic, NATIVE),
                        UsageEvent,
                        max_record_bytes=max_bytes,
                        window=ts_window,
                    ),
                    window,
                )
                for topic in topics
                if topic != s.kafka.gpu_topic
            }
            routes[s.kafka.gpu_topic] = Route(
                BatchDecoder(GpuSample, max_record_bytes=max_bytes, window=ts_window), window
            )
            producer_config = dict(
                bootstrap_servers=bootstrap,
                **s.kafka.client_config(),
                acks="all",
                linger_ms=5,
                # an outage is waited out by the worker, which sends again: no call blocks
                # longer than one request
                request_timeout_ms=s.kafka.request_timeout_ms,
                delivery_timeout_ms=2 * s.kafka.request_timeout_ms,
                max_block_ms=s.kafka.request_timeout_ms,
                bootstrap_timeout_ms=s.kafka.request_timeout_ms,
                reconnect_backoff_max_ms=1000,
                # room for any record the consumer can fetch, plus dead-letter headers
                max_request_size=max(
                    s.kafka.max_partition_fetch_bytes, s.ingest.max_record_bytes * 2, 1 << 20
                )
                + (64 << 10),
            )
            dead_letters = DeadLetterSink(
                lambda: KafkaProducer(**producer_config),
                s.kafka.dead_letter_topic,
                timeout_s=s.kafka.request_timeout_ms / 1000,
            )
            if self._stop.is_set():  # a signal during start-up, before connecting
                log.info("stopped before ingest started")
                return 0
            prices = PriceBook.from_settings(s.pricing)
            worker = IngestWorker(
                store,
                routes,
                dead_letters=dead_letters,
                batch_max_events=s.ingest.batch_max_events,
                batch_max_age_s=s.ingest.batch_max_age_ms / 1000,
                queue_chunks=s.ingest.queue_chunks,
                queue_bytes=s.ingest.queue_bytes,
                stats=self.stats,
                prices=prices,
            )
            config = consumer_config(s, bootstrap)
            self._ingestor = Ingestor(
                lambda: KafkaConsumer(**config),
                worker,
                topics,
                max_poll_records=s.kafka.max_poll_records,
                on_poll=self.ready.set,
            )
            log.info(
                "ingesting %s from %s into %s (group %s)",
                ", ".join(topics),
                bootstrap,
                s.store.path,
                s.kafka.group_id,
            )
            analysis = AnalyzerScheduler(store, prices, s)
            actions = self._make_controller(store, prices, bootstrap, producer_config)
            api = self._api = self._make_api(
                store, prices, analysis, actions.controller if actions else None
            )
            reports = self._make_reports(store, producer_config)
            ingest = IngestService(self._ingestor, worker, dead_letters)
            # started in this order, stopped in reverse: ingest stores its last batch first
            self._supervisor = Supervisor(
                [
                    SelfHostedSettler(store, prices, s.pricing),
                    analysis,
                    *([actions] if actions is not None else []),
                    *([reports] if reports is not None else []),
                    *([api] if api is not None else []),
                    ingest,
                ]
            )
            try:
                self._connecting = True
                if not self._stop.is_set():  # (a signal before the flag was set)
                    self._supervisor.start()
                    self._supervise(ingest, notifier)
            except ApiServerError as exc:  # the address is busy or forbidden
                log.error("%s", exc)
                return 1
            finally:
                self._connecting = False
                notifier.stopping("stopping: storing the batch in flight")
                self.stop()
                self._supervisor.stop()
                notifier.close()
            if ingest.error is not None:
                raise ingest.error
            snap = self.stats.snapshot()
            log.info(
                "stopped %s: %d records in %d batches; stored %s; duplicates %s; dead letters %s",
                "with unstored records left in Kafka" if worker.abandoned else "cleanly",
                snap["records"],
                snap["batches"],
                snap["stored"],
                snap["duplicates"],
                snap["dead_letters"],
            )
        return 0
