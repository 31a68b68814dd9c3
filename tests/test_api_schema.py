"""``schemathesis`` against the API's own ``/openapi.json``: no generated request, however
odd, gets a server error. Real HTTP on loopback to the API served by ``ApiServer`` over a
real store with priced events and a stored finding; a bounded number of examples."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from finopsd.actions.controller import Controller
from finopsd.analyzers.runner import build, run_analyzers
from finopsd.api.app import create_app
from finopsd.api.server import ApiServer
from finopsd.api.state import Check, ServiceState
from finopsd.config import Settings
from finopsd.ingest.pipeline import IngestStats
from finopsd.pricing import PriceBook
from finopsd.store import Store

TOKEN = "schema-test-token-0123456789"


def _rows(n: int) -> pa.Table:
    now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    return pa.Table.from_pylist(
        [
            {
                "event_id": f"e{i}",
                "ts": now - timedelta(minutes=7 * i),
                "provider": "openai",
                "request_model": "gpt-4o",
                "input_tokens": 1000,
                "output_tokens": 100,
                "tenant": f"t{i % 3}",
                "app": "bot",
                "feature": "chat",
                "status": "error" if i % 10 == 0 else "ok",
                "prompt_hash": f"p{i % 40}",
                "latency_class": "interactive",
                "billing_mode": "standard",
                "cost_usd": 0.0035,
                "list_cost_usd": 0.0035,
                "price_source": "catalog",
            }
            for i in range(n)
        ]
    )


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    path: Path = tmp_path_factory.mktemp("schema") / "s.duckdb"
    store = Store(path)
    rows = _rows(2000)

    def work(con: Any) -> None:
        con.register("new_rows", rows)
        con.execute("INSERT INTO usage_events BY NAME SELECT * FROM new_rows")
        con.unregister("new_rows")

    store.write(work)
    prices = PriceBook.shipped()
    analyzers = build({})
    run_analyzers(store, prices, analyzers)

    def analyze(only: list[str] | None, window_days: float | None) -> list[Any]:
        chosen = [a for a in analyzers if only is None or a.name in only]
        if only is not None and len(chosen) != len(only):
            raise ValueError(f"unknown analyzer in {only}")
        return run_analyzers(store, prices, chosen, window_days=window_days or 30.0)

    state = ServiceState(
        store=store,
        settings=Settings(),
        prices=prices,
        stats=IngestStats(),
        liveness=lambda: [Check("api", True)],
        readiness=lambda: [Check("partitions", True, "4 assigned")],
        lag=dict,
        analyze=analyze,
        controller=Controller(store, Settings().actions, prices, {}),
    )
    server = ApiServer(create_app(state, TOKEN), "127.0.0.1", 0)
    server.start()
    try:
        yield server.url
    finally:
        server.stop()
        store.close()


def test_no_request_gets_a_server_error(served: str) -> None:
    """Every operation of the schema, 25 generated requests each (with the token)."""
    schema = schemathesis.openapi.from_url(f"{served}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {
        "/v1/stats",
        "/v1/findings",
        "/v1/analyze",
        "/v1/actions",
        "/v1/actions/{action_id}/approve",
    }
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=25,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
            database=None,
        )
        def check(case: Any) -> None:
            case.call_and_validate(
                base_url=served,
                headers={"Authorization": f"Bearer {TOKEN}"},
                checks=[not_a_server_error],
            )

        check()
