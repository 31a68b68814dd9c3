"""``IngestService``: the consumer loop, on a thread of its own, feeding the ingest worker.

A ``Service`` (``finopsd.service.supervisor``). ``start()`` starts the
``ingest-poll`` thread (connecting to the broker happens there). ``stop()`` asks the
loop to finish: the batch in flight is stored and its offsets committed before it
returns, then the dead-letter producer is closed; while the consumer is still being
constructed (a broker that does not answer) it does not wait, since nothing has
been read. ``health()``: the worker's decode and store threads alive and coming
round their loops, the consumer loop polling. ``error``: what ended the loop, when
it failed (the daemon raises it).
"""

from __future__ import annotations

import threading
import time

from finopsd.ingest.pipeline import DeadLetterSink, Ingestor, IngestWorker
from finopsd.service.supervisor import Check

WEDGED_S = 60.0
"""An ingest thread that has not come round its loop for this long is stuck."""
WRITE_LOCK_MAX_S = 1800.0
"""The store thread waiting this long for a write lock another thread holds is stuck too."""
LIVENESS_POLL_S = 120.0
"""The consumer loop not polling for this long (and not waiting for the store) is stuck."""


class IngestService:
    """The consumer loop of ``ingestor`` in the ``ingest-poll`` thread (see the module)."""

    name = "ingest"

    def __init__(
        self, ingestor: Ingestor, worker: IngestWorker, dead_letters: DeadLetterSink | None
    ) -> None:
        self.ingestor = ingestor
        self.worker = worker
        self.dead_letters = dead_letters
        self.error: BaseException | None = None
        self.wedged_s = WEDGED_S
        self._thread = threading.Thread(target=self._poll, name="ingest-poll", daemon=True)

    def _poll(self) -> None:
        try:
            self.ingestor.run()
        except BaseException as exc:  # raised by the daemon's main thread
            self.error = exc

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.ingestor.stop()
        if self.ingestor.consumer is None:
            self.worker.close()  # still connecting: nothing read, nothing to store
        elif self._thread.is_alive():
            self._thread.join()  # the final batch is stored and its offsets committed
        if self.dead_letters is not None:
            self.dead_letters.close(timeout_s=10)

    def health(self) -> list[Check]:
        worker, ingestor = self.worker, self.ingestor
        alive = worker.alive()
        checks = [Check("ingest-threads", alive, "" if alive else "decode/store thread ended")]
        stuck = worker.wedged(self.wedged_s)
        detail = "" if stuck is None else f"the {stuck} thread is stuck (over {self.wedged_s:g} s)"
        held = worker.store.writer() if stuck == "store" else None
        if held is not None and held[0] != "ingest-store" and held[1] < WRITE_LOCK_MAX_S:
            # the store thread waits for the write lock: an analyzer's long transaction
            detail = f"waiting for the store's write lock ({held[0]}, {held[1]:.0f} s)"
            stuck = None
        checks.append(Check("ingest-progress", stuck is None, detail))
        last = ingestor.last_poll_at
        if last is None or worker.backpressured:
            detail = "starting" if last is None else "waiting for the store (backpressure)"
            checks.append(Check("consumer-loop", True, detail))
        else:
            ago = time.monotonic() - last
            checks.append(
                Check("consumer-loop", ago < LIVENESS_POLL_S, f"last poll {ago:.1f} s ago")
            )
        return checks
