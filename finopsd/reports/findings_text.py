"""Findings as text for a terminal: ``finopsd analyze`` without ``--json``.

A terminal narrower than ``WIDE_COLUMNS`` gets one block per finding, label
and value on a line, long values wrapped with an indent; a wider one gets a
table. Either way no line is longer than the width asked for (``render``).

Per finding: its title, the projected monthly saving — with its interval where
the analyzer gives one (``monthly_savings_low_usd`` / ``monthly_savings_high_usd``)
— and how it was estimated (``savings_method``), "PROVISIONAL: based on N
hours" where the evidence is still thin (``provisional``, ``evidence_hours``),
the scope, confidence, risk, the action that would realise it, its kind and id.
Savings are projections: always labelled so, never summed with realised ones.
"""

from __future__ import annotations

import io
import json
import shutil
import textwrap
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from finopsd.analyzers.base import Finding

WIDE_COLUMNS = 120
"""From this many columns on, findings are a table; below it, one block each."""

MIN_COLUMNS = 40
"""Narrower widths are rendered at this width (no layout fits in fewer)."""


LABEL_WIDTH = 12
INDENT = "    "


class RunLike(Protocol):
    """What ``render`` reads of an analyzer run (``runner.AnalyzerRun``)."""

    name: str
    seconds: float
    findings: list[Finding]
    error: str | None


def terminal_width() -> int:
    """Columns of the terminal (``COLUMNS`` first; 80 when not a terminal)."""
    return shutil.get_terminal_size((80, 24)).columns


def usd(amount: float) -> str:
    """``$1,234`` from $100 on, ``$12.35`` below (a saving of cents still shows)."""
    sign = "-" if amount < 0 else ""
    amount = abs(amount)
    return f"{sign}${amount:,.0f}" if amount >= 100 else f"{sign}${amount:,.2f}"


def interval(finding: Finding) -> tuple[float, float] | None:
    """The saving's interval (low, high), or None where there is none beyond the point.

    None when ``monthly_savings_low_usd``/``_high_usd`` are unset, or both equal
    the point figure (what a finding without an interval carries).
    """
    low = getattr(finding, "monthly_savings_low_usd", None)
    high = getattr(finding, "monthly_savings_high_usd", None)
    if low is None or high is None:
        return None
    point = finding.monthly_savings_usd
    if low == high == point:
        return None
    return float(low), float(high)


def interval_label(finding: Finding) -> str:
    """``90% interval``: the level from the finding's evidence, else the analyzers' default."""
    from finopsd.analyzers import base

    level = finding.evidence.get("interval_level", getattr(base, "INTERVAL_LEVEL", None))
    return f"{level:.0%} interval" if isinstance(level, int | float) else "interval"


def saving_text(finding: Finding) -> str:
    """``$1,234/month projected (90% interval $900-$1,500)``, or ``(no interval)``."""
    text = f"{usd(finding.monthly_savings_usd)}/month projected"
    bounds = interval(finding)
    if bounds is None:
        return f"{text} (no interval)"
    return f"{text} ({interval_label(finding)} {usd(bounds[0])}-{usd(bounds[1])})"


def provisional_text(finding: Finding) -> str | None:
    """``PROVISIONAL: based on 36 hours`` for a provisional finding, else None."""
    if not getattr(finding, "provisional", False):
        return None
    hours = getattr(finding, "evidence_hours", None)
    if hours is None:
        return "PROVISIONAL: little evidence yet"
    hours = float(hours)
    shown = f"{hours:,.0f}" if hours.is_integer() or hours >= 10 else f"{hours:.1f}"
    return f"PROVISIONAL: based on {shown} hour{'' if hours == 1 else 's'}"


def scope_text(finding: Finding) -> str:
    return ", ".join(f"{k}={v}" for k, v in finding.scope.items()) or "(everything)"


def action_text(finding: Finding) -> str:
    """``actuator: key=value, ...`` (non-scalar values as compact JSON), or ``none``."""
    if finding.action is None:
        return "none"
    params = ", ".join(
        f"{k}={v if isinstance(v, str | int | float | bool) else _json(v)}"
        for k, v in finding.action.params.items()
    )
    return f"{finding.action.actuator}: {params}" if params else finding.action.actuator


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), default=str)


def _wrap(text: str, width: int, first: str, rest: str) -> list[str]:
    """``text`` wrapped to ``width``: ``first`` before its first line, ``rest`` before others."""
    return textwrap.wrap(
        text,
        width=width,
        initial_indent=first,
        subsequent_indent=rest,
        break_long_words=True,
        break_on_hyphens=False,
    ) or [first.rstrip()]


def finding_block(finding: Finding, number: int, width: int) -> list[str]:
    """The lines of one finding: its title, then a label and a value per line."""
    width = max(width, MIN_COLUMNS)
    head = f"{number}. "
    lines = _wrap(finding.title, width, head, " " * len(head))
    value_indent = INDENT + " " * LABEL_WIDTH
    note = provisional_text(finding)
    if note is not None:
        lines += _wrap(note, width, INDENT, INDENT)
    fields = [
        ("saving", saving_text(finding)),
        ("estimated", finding.savings_method),
        ("scope", scope_text(finding)),
        ("confidence", f"{finding.confidence:.2f}"),
        ("risk", finding.risk),
        ("action", action_text(finding)),
        ("kind", finding.kind),
        ("id", finding.id),
    ]
    for label, value in fields:
        lines += _wrap(value, width, INDENT + label.ljust(LABEL_WIDTH), value_indent)
    return lines


def findings_blocks(findings: Sequence[Finding], width: int) -> str:
    """One block per finding, a blank line between them."""
    blocks = ["\n".join(finding_block(f, i, width)) for i, f in enumerate(findings, 1)]
    return "\n\n".join(blocks) + ("\n" if blocks else "")


def findings_table(findings: Sequence[Finding], width: int, *, ascii_only: bool = False) -> str:
    """The findings as a table ``width`` columns wide (rich), savings with their intervals."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    table = Table(
        box=box.ASCII2 if ascii_only else box.HEAVY_HEAD,
        expand=True,
        title=None,
    )
    labels = {interval_label(f) for f in findings if interval(f) is not None}
    label = labels.pop() if len(labels) == 1 else "interval"
    table.add_column(f"projected $/month ({label})", justify="right")
    table.add_column("kind", overflow="fold")
    table.add_column("scope", ratio=1, overflow="fold")
    table.add_column("conf.", justify="right", no_wrap=True)
    table.add_column("risk", no_wrap=True)
    table.add_column("what", ratio=2, overflow="fold")
    for f in findings:
        saving = usd(f.monthly_savings_usd)
        bounds = interval(f)
        saving += f"\n({usd(bounds[0])}-{usd(bounds[1])})" if bounds else "\n(no interval)"
        note = provisional_text(f)
        what = f"{note}\n{f.title}" if note else f.title
        what += f"\naction: {action_text(f)}"
        table.add_row(saving, f.kind, scope_text(f), f"{f.confidence:.2f}", f.risk, what)
    out = io.StringIO()
    console = Console(
        file=out, width=width, color_system=None, highlight=False, legacy_windows=False
    )
    console.print(table)
    return out.getvalue()


def runs_text(runs: Sequence[RunLike], width: int) -> str:
    """One line per analyzer run: its findings or its error, and how long it took."""
    lines: list[str] = []
    for r in runs:
        status = f"failed: {r.error}" if r.error else f"{len(r.findings)} finding(s)"
        lines += _wrap(
            f"{r.name}: {status} in {r.seconds:.2f}s", max(width, MIN_COLUMNS), "  ", "    "
        )
    return "\n".join(lines) + ("\n" if lines else "")


def render(
    findings: Sequence[Finding],
    runs: Sequence[RunLike],
    width: int,
    *,
    ascii_only: bool = False,
) -> str:
    """The whole ``analyze`` report for a terminal ``width`` columns wide.

    Below ``WIDE_COLUMNS``: blocks (``findings_blocks``); from it on: a table
    (``findings_table``). A heading first, the analyzer runs last. No line is
    longer than ``max(width, MIN_COLUMNS)``. ``ascii_only`` draws the table with
    ASCII (for a terminal that cannot show box-drawing characters).
    """
    width = max(width, MIN_COLUMNS)
    heading = f"{len(findings)} finding(s), largest projected saving first"
    body = (
        findings_table(findings, width, ascii_only=ascii_only)
        if width >= WIDE_COLUMNS and findings
        else findings_blocks(findings, width)
    )
    parts = ["\n".join(_wrap(heading, width, "", "")) + "\n"]
    if body:
        parts.append(body)
    parts.append(runs_text(runs, width))
    return "\n".join(parts)
