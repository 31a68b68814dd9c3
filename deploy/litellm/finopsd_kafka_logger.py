# finopsd_kafka_logger.py: LiteLLM's StandardLoggingPayload to Kafka, one record per call.
# Beside the proxy's config.yaml: litellm_settings: {callbacks: finopsd_kafka_logger.handler}
# With the SDK: litellm.callbacks = [finopsd_kafka_logger.handler]
# Kafka being away never stops or slows LiteLLM: nothing connects at import; the producer
# is made on first use by a thread that retries until Kafka answers, and a record that
# cannot be sent is dropped, with at most one warning a minute.
import asyncio
import json
import logging
import os
import threading
import time

from kafka import KafkaProducer
from kafka.errors import KafkaTimeoutError
from litellm.integrations.custom_logger import CustomLogger

BOOTSTRAP = os.environ.get("FINOPSD_KAFKA_BOOTSTRAP", "kafka-1:9092")
TOPIC = os.environ.get("FINOPSD_LITELLM_TOPIC", "litellm.spend")
CONNECT_S = 3  # one connection attempt; the first record waits for it
BLOCK_S = 1  # the most that send() waits for a topic's metadata or buffer space
RETRY_S = 5  # between connection attempts; no send() as long after one timed out
WARN_EVERY_S = 60

log = logging.getLogger("finopsd_kafka_logger")


class FinopsdKafkaLogger(CustomLogger):
    """Sends kwargs["standard_logging_object"] of every success and failure, keyed by its id.

    LiteLLM calls the sync hooks for litellm.completion() and friends (on its own
    thread pool) and the async hooks for acompletion() and the proxy: a logger
    with only one kind sees only those calls.
    """

    def __init__(self):
        super().__init__()
        self.producer = None  # made on first use, by _connect() in a thread of its own
        self.dropped = 0
        self._lock = threading.Lock()
        self._connector = None
        self._tried = threading.Event()  # set once the connector's first attempt is over
        self._error = None
        self._paused_until = self._renewable_at = self._quiet_until = 0.0
        self._unwarned = 0

    def _connect(self, tried):
        failures = 0
        while True:
            try:
                producer = KafkaProducer(
                    bootstrap_servers=BOOTSTRAP,
                    linger_ms=50,
                    bootstrap_timeout_ms=CONNECT_S * 1000,
                    max_block_ms=BLOCK_S * 1000,
                )
            except Exception as exc:  # Kafka unreachable (KafkaTimeoutError), or refusing us
                self._error, failures = exc, failures + 1
                tried.set()
                time.sleep(RETRY_S)
                continue
            self._renewable_at = time.monotonic() + RETRY_S
            self.producer = producer
            tried.set()
            if failures:
                log.warning(
                    "finopsd: Kafka at %s answers again, sending records (%d dropped so far)",
                    BOOTSTRAP,
                    self.dropped,
                )
            return

    def _producer(self):
        if self.producer is None:
            with self._lock:
                if self._connector is None:
                    self._connector = threading.Thread(
                        target=self._connect,
                        args=(self._tried,),
                        name="finopsd-kafka-connect",
                        daemon=True,
                    )
                    self._connector.start()
                tried = self._tried
            tried.wait(CONNECT_S + 1)
        return self.producer

    def _undelivered(self, producer, exc):  # an errback, on the producer's own thread
        self._drop(exc)
        if getattr(exc, "retriable", False):
            return  # kafka-python retries, and reconnects, by itself
        # e.g. a broker that came back without this producer's id: a new producer
        with self._lock:
            if producer is not self.producer or time.monotonic() < self._renewable_at:
                return
            self.producer, self._connector, self._tried = None, None, threading.Event()
        threading.Thread(target=producer.close, args=(10,), daemon=True).start()

    def _drop(self, why):
        with self._lock:
            self.dropped += 1
            self._unwarned += 1
            now = time.monotonic()
            if now < self._quiet_until:
                return
            self._quiet_until = now + WARN_EVERY_S
            count, self._unwarned = self._unwarned, 0
        log.warning(
            "finopsd: dropped %d LiteLLM record(s) for %s at %s (%d in all): %s",
            count,
            TOPIC,
            BOOTSTRAP,
            self.dropped,
            why,
        )

    def _send(self, kwargs):
        payload = kwargs.get("standard_logging_object")
        if payload is None:
            return
        try:
            key = str(payload.get("id") or "").encode() or None
            value = json.dumps(payload, default=str).encode()
            producer = self._producer()
            if producer is None:
                self._drop(f"no connection to Kafka ({self._error!r}), retrying")
            elif time.monotonic() < self._paused_until:
                self._drop("a send timed out a moment ago")
            else:
                future = producer.send(TOPIC, key=key, value=value)
                future.add_errback(self._undelivered, producer)
        except KafkaTimeoutError as exc:  # no metadata or buffer space within BLOCK_S
            self._paused_until = time.monotonic() + RETRY_S
            self._drop(repr(exc))
        except Exception as exc:  # never into LiteLLM
            self._drop(repr(exc))

    def log_success_event(self, kwargs, response_obj, start_time, end_time):
        self._send(kwargs)

    def log_failure_event(self, kwargs, response_obj, start_time, end_time):
        self._send(kwargs)

    # send() may wait for the topic's metadata: off the event loop
    async def async_log_success_event(self, kwargs, response_obj, start_time, end_time):
        await asyncio.to_thread(self._send, kwargs)

    async def async_log_failure_event(self, kwargs, response_obj, start_time, end_time):
        await asyncio.to_thread(self._send, kwargs)


handler = FinopsdKafkaLogger()
