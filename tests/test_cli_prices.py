"""`finopsd prices show` and `prices reprice`, run as a user runs them (subprocesses)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from datetime import date
from pathlib import Path
from typing import Any

from conftest import REPO_ROOT, clean_env
from test_pricing import _store_with, event

from finopsd.pricing import Price, PriceBook
from finopsd.store import Store


def finopsd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "finopsd", *args],
        capture_output=True,
        text=True,
        env=clean_env(),
        cwd=REPO_ROOT,
        timeout=120,
    )


def test_show_prints_the_price_an_event_gets_and_its_source() -> None:
    result = finopsd("prices", "show", "o3-mini-2025-01-31", "--provider", "openai", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["key"] == "openai/o3-mini"  # not o3
    assert out["catalog"].startswith("genai-prices ")
    assert out["tiers"][0]["list_usd_per_mtok"]["input"] == 1.10
    text = finopsd("prices", "show", "claude-sonnet-4-5-20250929", "--provider", "anthropic")
    assert text.returncode == 0, text.stderr
    assert "> 200,000 input" in text.stdout
    assert max(len(line) for line in text.stdout.splitlines()) <= 80


def test_show_says_when_no_catalog_knows_a_model() -> None:
    result = finopsd("prices", "show", "gpt-4o-turbo-deluxe", "--provider", "openai")
    assert result.returncode == 1
    assert "no price for openai/gpt-4o-turbo-deluxe" in result.stderr
    assert "Traceback" not in result.stderr
    bad = finopsd("prices", "show", "gpt-4o", "--at", "yesterday")
    assert bad.returncode == 2 and "'yesterday' is not an ISO 8601" in bad.stderr


def _store(path: Path, book: PriceBook, *events: dict[str, Any]) -> None:
    with Store(path) as store:
        _store_with(store, book, *events)


def test_reprice_applies_a_new_price_to_a_period_only(tmp_path: Path) -> None:
    """Events priced by an old catalog at $2.50/$10 get config's $1/$2 within the period only."""
    path = tmp_path / "s.duckdb"
    old = PriceBook([Price("openai", "gpt-4o", date(2024, 1, 1), 2.5, 10)])
    inside = {**event(1), "ts": "2026-03-02T10:00:00+00:00"}
    outside = {**event(2), "ts": "2026-03-05T10:00:00+00:00"}
    _store(path, old, inside, outside)
    config = tmp_path / "config.toml"
    config.write_text(
        f"[store]\npath = '{path}'\n"
        "[[pricing.prices]]\nprovider = 'openai'\nmodel = 'gpt-4o'\n"
        "effective_from = 2026-01-01\ninput_per_mtok = 1.0\noutput_per_mtok = 2.0\n"
    )
    args = ["--from", "2026-03-01", "--to", "2026-03-04", "--config", str(config), "--json"]
    dry = finopsd("prices", "reprice", *args, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout)["changed"] == 1
    with Store(path, read_only=True) as store:
        costs = dict(
            store.cursor().execute("SELECT event_id, cost_usd FROM usage_events").fetchall()
        )
    assert math.isclose(costs["e1"], 0.0035)  # a dry run writes nothing
    done = finopsd("prices", "reprice", *args)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["events"] == 1 and summary["changed"] == 1
    assert math.isclose(summary["cost_after_usd"], (1000 * 1.0 + 100 * 2.0) / 1e6)
    with Store(path, read_only=True) as store:
        rows = (
            store.cursor()
            .execute("SELECT event_id, cost_usd, price_source, price_catalog FROM usage_events")
            .fetchall()
        )
    by_id = {r[0]: r[1:] for r in rows}
    assert math.isclose(by_id["e1"][0], 0.0012) and by_id["e1"][1:] == ("config", "config")
    assert math.isclose(by_id["e2"][0], 0.0035)  # outside the period: untouched
    again = finopsd("prices", "reprice", *args)
    assert json.loads(again.stdout)["changed"] == 0  # idempotent
