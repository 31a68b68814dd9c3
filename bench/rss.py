"""Resident memory of this process, sampled in a thread, peak per phase.

``with rss.phase("ingest"):`` records the largest VmRSS seen while the block runs
(every 20 ms, from /proc/self/status) and the RSS at its start; ``rss.report()``
is one line per phase: peak, and peak minus the RSS the phase started at.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator


def current_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class RssSampler:
    def __init__(self, interval_s: float = 0.02) -> None:
        self.interval_s = interval_s
        self.phases: dict[str, tuple[float, float]] = {}  # name -> (start, peak) MiB

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = current_mib()
        peak = [start]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(self.interval_s):
                peak[0] = max(peak[0], current_mib())

        thread = threading.Thread(target=sample, name=f"rss-{name}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()
            peak[0] = max(peak[0], current_mib())
            old_start, old_peak = self.phases.get(name, (start, 0.0))
            self.phases[name] = (min(old_start, start), max(old_peak, peak[0]))

    def report(self) -> str:
        return "\n".join(
            f"  peak RSS {name}: {peak:,.0f} MiB ({peak - start:+,.0f} MiB over its start)"
            for name, (start, peak) in self.phases.items()
        )
