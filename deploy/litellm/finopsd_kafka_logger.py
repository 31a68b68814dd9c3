# finopsd_kafka_logger.py: LiteLLM's StandardLoggingPayload to Kafka, one record per call.
# Beside the proxy's config.yaml: litellm_settings: {callbacks: finopsd_kafka_logger.handler}
# With the SDK: litellm.callbacks = [finopsd_kafka_logger.handler]
import asyncio
import json
import os

from kafka import KafkaProducer
from litellm.integrations.custom_logger import CustomLogger

BOOTSTRAP = os.environ.get("FINOPSD_KAFKA_BOOTSTRAP", "kafka-1:9092")
TOPIC = os.environ.get("FINOPSD_LITELLM_TOPIC", "litellm.spend")


class FinopsdKafkaLogger(CustomLogger):
    """Sends kwargs["standard_logging_object"] of every success and failure, keyed by its id.

    LiteLLM calls the sync hooks for litellm.completion() and friends (on its own
    thread pool) and the async hooks for acompletion() and the proxy: a logger
    with only one kind sees only those calls.
    """

    def __init__(self):
        super().__init__()
        self.producer = KafkaProducer(bootstrap_servers=BOOTSTRAP, linger_ms=50)

    def _send(self, kwargs):
        payload = kwargs.get("standard_logging_object")
        if payload is None:
            return
        key = str(payload.get("id") or "").encode() or None
        self.producer.send(TOPIC, key=key, value=json.dumps(payload, default=str).encode())

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
