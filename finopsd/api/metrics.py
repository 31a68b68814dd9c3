"""``GET /metrics``: Prometheus text, collected at scrape time (no state of its own).

From the daemon's counters (since it started): records consumed, batches, rows
stored and duplicates by table, dead letters by topic and reason, backpressure
seconds, the store-append latency histogram, consumer lag and partitions
assigned, unpriced events by model. From the store (at each scrape, on the
request's own cursor): analyzer runs, seconds and errors; open findings and their
projected monthly savings by kind; priced spend of the last 30 days by tenant,
provider and model. Label sets are bounded: the ``TOP`` largest values of a
label set, the rest summed under ``other``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from finopsd.api.state import ServiceState
from finopsd.ingest.pipeline import APPEND_BUCKETS_S

router = APIRouter(tags=["metrics"])

TOP = 20
"""At most this many label values per metric; the rest are summed under ``other``."""
OTHER = "other"


def top(items: Iterable[tuple[tuple[str, ...], float]], n: int = TOP) -> list[tuple[tuple, float]]:
    """The ``n`` largest (labels, value) pairs, the rest summed as (``other``, ...)."""
    ordered = sorted(items, key=lambda kv: -kv[1])
    head, tail = ordered[:n], ordered[n:]
    if tail:
        width = len(tail[0][0])
        head.append(((OTHER,) * width, sum(v for _, v in tail)))
    return head


class DaemonCollector:
    """Yields the metrics above for one ``ServiceState`` (a prometheus-client collector)."""

    def __init__(self, state: ServiceState) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        yield from self._ingest()
        yield from self._store()

    def _ingest(self) -> Iterator[Metric]:
        stats = self.state.stats
        snap = stats.snapshot()
        yield CounterMetricFamily(
            "finopsd_records_consumed", "records read from Kafka", value=snap["records"]
        )
        yield CounterMetricFamily("finopsd_batches", "batches stored", value=snap["batches"])
        stored = CounterMetricFamily(
            "finopsd_rows_stored", "rows stored, by table", labels=["table"]
        )
        for table, n in sorted(snap["stored"].items()):
            stored.add_metric([table], n)
        yield stored
        dup = CounterMetricFamily(
            "finopsd_duplicates", "rows already stored, dropped, by table", labels=["table"]
        )
        for table, n in sorted(snap["duplicates"].items()):
            dup.add_metric([table], n)
        yield dup
        with stats._lock:
            by_topic = dict(stats.dead_letters_by_topic)
            buckets = list(stats.append_seconds)
            total_s = stats.append_seconds_sum
        dead = CounterMetricFamily(
            "finopsd_dead_letters",
            "records sent to the dead-letter topic, by source topic and reason",
            labels=["topic", "reason"],
        )
        for (topic, reason), n in sorted(by_topic.items()):
            dead.add_metric([topic, reason], n)
        yield dead
        yield CounterMetricFamily(
            "finopsd_backpressure_seconds",
            "time polling waited for the store",
            value=snap["backpressure_s"],
        )
        cumulative, acc = [], 0
        for bound, n in zip([*map(str, APPEND_BUCKETS_S), "+Inf"], buckets, strict=True):
            acc += n
            cumulative.append((bound, acc))
        yield HistogramMetricFamily(
            "finopsd_store_append_seconds",
            "time to store a batch (one transaction, retries included)",
            buckets=cumulative,
            sum_value=total_s,
        )
        lag = GaugeMetricFamily(
            "finopsd_consumer_lag",
            "records behind the broker's high watermark, by partition",
            labels=["topic", "partition"],
        )
        assigned = self.state.lag()
        for (topic, partition), n in sorted(assigned.items()):
            if n is not None:
                lag.add_metric([topic, str(partition)], n)
        yield lag
        yield GaugeMetricFamily(
            "finopsd_partitions_assigned", "partitions this daemon consumes", value=len(assigned)
        )
        unpriced = CounterMetricFamily(
            "finopsd_unpriced_events",
            "events no price source knew, by provider/model (since start)",
            labels=["model"],
        )
        for (model,), n in top(((m,), float(n)) for m, n in snap["unpriced"].items()):
            unpriced.add_metric([model], n)
        yield unpriced
        if snap["last_batch_at"] is not None:
            yield GaugeMetricFamily(
                "finopsd_last_batch_timestamp_seconds",
                "when the latest batch was stored (Unix time)",
                value=snap["last_batch_at"],
            )

    def _store(self) -> Iterator[Metric]:
        con = self.state.store.cursor()
        runs = CounterMetricFamily("finopsd_analyzer_runs", "analyzer runs", labels=["analyzer"])
        errors = CounterMetricFamily(
            "finopsd_analyzer_errors", "analyzer runs that failed", labels=["analyzer"]
        )
        seconds = GaugeMetricFamily(
            "finopsd_analyzer_last_run_seconds",
            "how long each analyzer's latest run took",
            labels=["analyzer"],
        )
        for name, n, failed, last in con.execute(
            """
            SELECT analyzer, count(*), count(error), arg_max(seconds, ran_at)
            FROM analyzer_runs GROUP BY analyzer ORDER BY analyzer
            """
        ).fetchall():
            runs.add_metric([name], n)
            errors.add_metric([name], failed)
            seconds.add_metric([name], float(last))
        yield from (runs, errors, seconds)
        open_ = GaugeMetricFamily(
            "finopsd_findings_open", "open findings, by kind", labels=["kind"]
        )
        saving = GaugeMetricFamily(
            "finopsd_findings_open_monthly_savings_usd",
            "projected monthly savings of the open findings, by kind (a projection)",
            labels=["kind"],
        )
        for kind, n, usd in con.execute(
            "SELECT kind, count(*), sum(monthly_savings_usd) FROM findings "
            "WHERE status = 'open' GROUP BY kind ORDER BY kind"
        ).fetchall():
            open_.add_metric([kind], n)
            saving.add_metric([kind], float(usd or 0))
        yield from (open_, saving)
        spend = GaugeMetricFamily(
            "finopsd_spend_30d_usd",
            "priced spend of the last 30 days (spend_hourly), by tenant, provider and model",
            labels=["tenant", "provider", "model"],
        )
        since = datetime.now(UTC) - timedelta(days=30)
        rows: list[Any] = con.execute(
            "SELECT coalesce(tenant, '(none)'), coalesce(provider, '(none)'), model, "
            "sum(cost_usd) FROM spend_hourly WHERE hour >= ? GROUP BY ALL",
            [since],
        ).fetchall()
        for labels, usd in top(((t, p, m), float(c or 0)) for t, p, m, c in rows):
            spend.add_metric(list(labels), usd)
        yield spend


@router.get("/metrics", summary="Prometheus metrics (text exposition format)")
def metrics(request: Request) -> Response:
    state: ServiceState = request.app.state.service
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DaemonCollector(state))  # type: ignore[arg-type]
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
