"""``make demo`` (``demo/run.py``) runs the whole loop and its report shows the ledger's
measured saving: non-zero, and the same figure as the ledger's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import clean_env

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(900)
def test_the_demo_closes_the_loop_and_writes_the_report(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "demo" / "run.py"), "--out", str(tmp_path), "--json"],
        capture_output=True,
        text=True,
        timeout=850,
        env=clean_env(),
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    assert outcome["state"] == "verified"
    ledger = outcome["ledger"]
    assert ledger["saved_usd"] > 0 and ledger["requests"] > 0
    report = json.loads(Path(outcome["files"]["json"]).read_text())
    assert report["realised"]["saved_usd"] == pytest.approx(ledger["saved_usd"])
    assert report["realised"]["saved_usd"] == pytest.approx(outcome["report_realised_usd"])
    assert Path(outcome["files"]["html"]).read_text().startswith("<!doctype html>")
    for name in ("spend_by_team.png", "savings.png", "cost_per_million_tokens.png"):
        assert Path(outcome["files"][name]).read_bytes().startswith(b"\x89PNG")
    assert "clicked Approve" in done.stdout and "verified" in done.stdout
