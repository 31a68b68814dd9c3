"""``finopsd analyze`` as text: one block per finding in a narrow terminal, a table in a wide one.

Findings are real ``Finding``s (rendering) and, end to end, the ones the batch
analyzer finds in a real store, shown by the ``finopsd`` command run with
``COLUMNS`` set as a terminal sets it.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from conftest import REPO_ROOT, clean_env

from finopsd.analyzers.base import ActionSpec, Finding
from finopsd.analyzers.runner import AnalyzerRun
from finopsd.reports import findings_text
from finopsd.store import Store

LONG_TITLE = (
    "acme / customer-support-assistant / summarise-the-whole-ticket-history: "
    "claude-sonnet-4-5 traffic could route 62% to gpt-4o-mini and 38% to "
    "claude-haiku-4-5 at quality >= 0.80 without a measurable loss"
)


def finding(n: int, **more: Any) -> Finding:
    fields: dict[str, Any] = {
        "kind": "routing.model_mix",
        "scope": {
            "tenant": "acme",
            "app": "customer-support-assistant",
            "feature": f"summarise-the-whole-ticket-history-{n}",
            "model": "claude-sonnet-4-5",
        },
        "title": LONG_TITLE,
        "evidence": {"interval_level": 0.9},
        "monthly_savings_usd": 1234.4 / n,
        "savings_method": "(current - proposed) cost per request at the scope's token mix "
        "and current list prices, times the requests in the window, projected to a month",
        "confidence": 0.8,
        "risk": "medium",
        "action": ActionSpec(
            "gateway.route",
            {
                "match": {"tenant": "acme", "app": "customer-support-assistant"},
                "weights": {"gpt-4o-mini": 0.62, "claude-haiku-4-5": 0.38},
            },
        ),
        "monthly_savings_low_usd": 900.0 / n,
        "monthly_savings_high_usd": 1500.0 / n,
    }
    fields.update(more)
    return Finding(**fields)


FINDINGS = [
    finding(1),
    finding(2, provisional=True, evidence_hours=36.0),
    finding(3, monthly_savings_low_usd=None, monthly_savings_high_usd=None, action=None),
]
RUNS = [AnalyzerRun("routing", 0.5, FINDINGS), AnalyzerRun("gpu", 0.1, [], "no samples")]


def test_saving_text() -> None:
    assert findings_text.saving_text(FINDINGS[0]) == (
        "$1,234/month projected (90% interval $900-$1,500)"
    )
    assert findings_text.saving_text(FINDINGS[1]) == (
        "$617/month projected (90% interval $450-$750)"
    )
    # no interval given: the point figure alone, said so
    assert findings_text.saving_text(FINDINGS[2]) == "$411/month projected (no interval)"
    small = finding(1, monthly_savings_usd=3.456, evidence={"interval_level": 0.8})
    small.monthly_savings_low_usd, small.monthly_savings_high_usd = 1.0, 5.5
    assert findings_text.saving_text(small) == "$3.46/month projected (80% interval $1.00-$5.50)"
    assert findings_text.provisional_text(FINDINGS[1]) == "PROVISIONAL: based on 36 hours"
    assert findings_text.provisional_text(FINDINGS[0]) is None


def _numbered(text: str) -> list[str]:
    return re.findall(r"(?m)^(\d+)\. ", text)


def test_narrow_terminal_one_block_per_finding() -> None:
    text = findings_text.render(FINDINGS, RUNS, 80)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert _numbered(text) == ["1", "2", "3"]
    for f in FINDINGS:
        assert text.count(f"id          {f.id}") == 1
    block = text.split("\n\n")[1]  # after the heading: the first finding
    head = block.splitlines()
    # the long title wraps, its lines indented under the first
    assert head[0].startswith("1. acme / customer-support-assistant")
    assert head[1].startswith("   ") and not head[1].startswith("    ")
    assert "    saving      $1,234/month projected (90% interval $900-$1,500)" in lines
    assert "    risk        medium" in lines
    assert "    confidence  0.80" in lines
    assert any(line.startswith("    action      gateway.route:") for line in lines)
    assert any(line.startswith("                weights={") for line in lines)
    assert any(
        line.startswith("    scope       tenant=acme, app=customer-support") for line in lines
    )
    assert "    PROVISIONAL: based on 36 hours" in lines
    assert "    action      none" in lines
    assert "  gpu: failed: no samples in 0.10s" in lines
    # no table
    assert not any("┃" in line or "|" in line for line in lines)


@pytest.mark.parametrize("width", [40, 60, 80, 100, 119])
def test_nothing_goes_past_the_width(width: int) -> None:
    text = findings_text.render(FINDINGS, RUNS, width)
    assert max(len(line) for line in text.splitlines()) <= width
    assert _numbered(text) == ["1", "2", "3"]


@pytest.mark.parametrize("ascii_only", [False, True])
def test_wide_terminal_keeps_a_table(ascii_only: bool) -> None:
    text = findings_text.render(FINDINGS, RUNS, 160, ascii_only=ascii_only)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 160
    assert _numbered(text) == []
    header = next(line for line in lines if "projected $/month" in line)
    for column in ("kind", "scope", "conf.", "risk", "what"):
        assert column in header
    assert "(90% interval)" in text and "($900-$1,500)" in text and "(no interval)" in text
    assert "PROVISIONAL: based on 36 hours" in text
    if ascii_only:
        assert all(line.isascii() for line in lines)


def test_no_findings() -> None:
    text = findings_text.render([], [AnalyzerRun("spend", 0.2, [])], 160)
    assert text.splitlines()[0] == "0 finding(s), largest projected saving first"
    assert "  spend: 0 finding(s) in 0.20s" in text.splitlines()


# -- the command ---------------------------------------------------------------------------


def _rows(now: datetime) -> pa.Table:
    """Batch-labelled traffic billed at standard prices, in three long-named features."""
    rows = []
    for f in range(3):
        for i in range(40):
            rows.append(
                {
                    "event_id": f"f{f}-{i}",
                    "ts": now - timedelta(hours=2 + i),
                    "provider": "p",
                    "request_model": "m1",
                    "input_tokens": 1000,
                    "output_tokens": 100,
                    "tenant": "acme",
                    "app": "nightly-ticket-summaries-for-the-customer-support-dashboard",
                    "feature": f"extract-entities-and-sentiment-from-every-ticket-{f}",
                    "status": "ok",
                    "latency_class": "batch",
                    "billing_mode": "standard",
                    "price_source": "config",
                    "list_cost_usd": 0.5 * (f + 1),
                    "cost_usd": 0.5 * (f + 1),
                }
            )
    return pa.Table.from_pylist(rows)


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("analyze")
    path = tmp / "s.duckdb"
    with Store(path) as store:
        rows = _rows(datetime.now(UTC).replace(minute=0, second=0, microsecond=0))

        def work(con: Any) -> None:
            con.register("new_rows", rows)
            con.execute("INSERT INTO usage_events BY NAME SELECT * FROM new_rows")
            con.unregister("new_rows")

        store.write(work)
    config = tmp / "c.toml"
    config.write_text(
        f"""[store]
path = '{path}'

[analyzers.batch]
min_monthly_savings_usd = 0.0

[[pricing.prices]]
provider = "p"
model = "m1"
effective_from = 2025-01-01
input_per_mtok = 1.0
output_per_mtok = 2.0
batch_discount = 0.5
"""
    )
    return config


def analyze(config: Path, columns: int, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "finopsd",
            "analyze",
            "--only",
            "batch",
            "--config",
            str(config),
            *args,
        ],
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=clean_env({"COLUMNS": str(columns), "PYTHONIOENCODING": "utf-8"}),
        cwd=REPO_ROOT,
        timeout=120,
    )


def test_analyze_at_80_columns_prints_blocks(config: Path) -> None:
    found = json.loads(analyze(config, 80, "--json").stdout)["findings"]
    assert len(found) == 3
    done = analyze(config, 80)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert _numbered(done.stdout) == ["1", "2", "3"]
    for f in found:  # each in its own block, largest saving first
        assert done.stdout.count(f"id          {f['id']}") == 1
    ids = re.findall(r"(?m)^    id +(\w+)$", done.stdout)
    assert ids == [f["id"] for f in found]
    assert sum(line.startswith("    saving      $") for line in lines) == 3


def test_analyze_at_160_columns_prints_a_table(config: Path) -> None:
    done = analyze(config, 160)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert max(len(line) for line in lines) <= 160
    assert _numbered(done.stdout) == []
    assert any("projected $/month" in line and "scope" in line for line in lines)


def test_analyze_json_keeps_its_fields(config: Path) -> None:
    done = analyze(config, 80, "--json")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert set(out) == {"window_days", "runs", "findings"}
    (first, *_rest) = out["findings"]
    for key in (
        "id",
        "kind",
        "scope",
        "title",
        "evidence",
        "monthly_savings_usd",
        "savings_method",
        "confidence",
        "risk",
        "action",
    ):
        assert key in first
