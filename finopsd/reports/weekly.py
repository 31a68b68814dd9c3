"""The weekly savings report: what was spent, what changes saved, what could still be saved.

One ISO week (Monday 00:00 UTC to the next Monday), built from the store as plain
data (``build``) and written as Markdown, JSON and one self-contained HTML file
with its PNG charts (``write``). Every figure says where it comes from:

- **spend**: the week's priced usage events (``cost_usd``: list prices, or settled
  self-hosted GPU-hours), by tenant, team, model and feature, against the week
  before;
- **realised savings**: the savings ledger's days in the week — measured on the
  requests each action touched, against the same requests priced under the
  configuration before it (``finopsd.actions.ledger``), with their intervals;
- **projected savings**: the open, non-provisional findings' monthly projections
  with their intervals — labelled as projections and never added to the realised;
- **anomalies** (``anomalies.*`` findings seen in the week), **budgets**
  (``forecast.budget`` findings: month-to-date and the month-end forecast) and
  **self-hosted deployments** (GPU-hours, cost, tokens, cost per 1M tokens, mean
  GPU utilisation from the samples).
"""

from __future__ import annotations

import base64
import io
import json
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any

import duckdb

TOP = 8  # rows per breakdown; the rest as "other"
DAYS_PER_MONTH = 30.4375
GROUPS = ("tenant", "team", "model", "feature")
_WEEK = re.compile(r"^(\d{4})-W(\d{2})$")


class ReportError(ValueError):
    """The report cannot be made as asked; the message says why."""


@dataclass(frozen=True)
class Week:
    label: str  # 2026-W48
    start: datetime  # Monday 00:00 UTC
    end: datetime  # the next Monday

    @classmethod
    def parse(cls, text: str) -> Week:
        m = _WEEK.match(text.strip())
        if not m:
            raise ReportError(f"week {text!r}: expected an ISO week such as 2026-W48")
        try:
            monday = date.fromisocalendar(int(m.group(1)), int(m.group(2)), 1)
        except ValueError as exc:
            raise ReportError(f"week {text!r}: {exc}") from None
        start = datetime(monday.year, monday.month, monday.day, tzinfo=UTC)
        return cls(text.strip(), start, start + timedelta(days=7))

    @classmethod
    def last_complete(cls, now: datetime | None = None) -> Week:
        """The latest week that has ended."""
        today = (now or datetime.now(UTC)).astimezone(UTC).date()
        year, week, _ = (today - timedelta(days=7)).isocalendar()
        return cls.parse(f"{year}-W{week:02d}")


def build(con: duckdb.DuckDBPyConnection, week: Week) -> dict[str, Any]:
    """The report of ``week`` as plain data (see the module docstring)."""
    previous = Week("previous", week.start - timedelta(days=7), week.start)
    total, requests, unpriced = _spend_total(con, week)
    before, _, _ = _spend_total(con, previous)
    return {
        "week": week.label,
        "from": week.start.isoformat(),
        "to": week.end.isoformat(),
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "spend": {
            "source": "cost_usd of the week's stored usage events (list prices, or settled "
            "self-hosted GPU-hours)",
            "total_usd": total,
            "previous_usd": before,
            "change": _change(total, before),
            "requests": requests,
            "unpriced_requests": unpriced,
            "by": {g: _spend_by(con, g, week, previous) for g in GROUPS},
            "daily_by_team": _daily_by_team(con, week),
        },
        "realised": _realised(con, week),
        "projected": _projected(con),
        "anomalies": _findings(con, "anomalies.%", week),
        "budgets": _findings(con, "forecast.budget", week, open_only=True),
        "deployments": _deployments(con, week),
    }


# -- sections ------------------------------------------------------------------------------


def _spend_total(con: duckdb.DuckDBPyConnection, week: Week) -> tuple[float, int, int]:
    row = con.execute(
        "SELECT coalesce(sum(cost_usd), 0), count(*), count(*) FILTER (WHERE cost_usd IS NULL) "
        "FROM usage_events WHERE ts >= ? AND ts < ?",
        [week.start, week.end],
    ).fetchone()
    assert row is not None
    return float(row[0]), int(row[1]), int(row[2])


def _spend_by(
    con: duckdb.DuckDBPyConnection, group: str, week: Week, previous: Week
) -> list[dict[str, Any]]:
    column = "coalesce(response_model, request_model)" if group == "model" else group
    rows = con.execute(
        f"""
        SELECT coalesce({column}, '(none)') AS name,
               coalesce(sum(cost_usd) FILTER (WHERE ts >= $start), 0) AS usd,
               coalesce(sum(cost_usd) FILTER (WHERE ts < $start), 0) AS previous_usd,
               count(*) FILTER (WHERE ts >= $start) AS requests
        FROM usage_events WHERE ts >= $before AND ts < $end
        GROUP BY 1 ORDER BY usd DESC, name
        """,
        {"start": week.start, "end": week.end, "before": previous.start},
    ).fetchall()
    out = [
        {"name": n, "usd": float(u), "previous_usd": float(p), "requests": int(r)}
        for n, u, p, r in rows
    ]
    if len(out) > TOP:
        rest = out[TOP - 1 :]
        other = {
            "name": f"other ({len(rest)})",
            "usd": sum(r["usd"] for r in rest),
            "previous_usd": sum(r["previous_usd"] for r in rest),
            "requests": sum(r["requests"] for r in rest),
        }
        out = [*out[: TOP - 1], other]
    for r in out:
        r["change"] = _change(r["usd"], r["previous_usd"])
    return out


def _daily_by_team(con: duckdb.DuckDBPyConnection, week: Week) -> dict[str, dict[str, float]]:
    rows = con.execute(
        "SELECT strftime(ts AT TIME ZONE 'UTC', '%Y-%m-%d'), coalesce(team, '(none)'), "
        "coalesce(sum(cost_usd), 0) FROM usage_events WHERE ts >= ? AND ts < ? "
        "GROUP BY 1, 2 ORDER BY 1, 2",
        [week.start, week.end],
    ).fetchall()
    out: dict[str, dict[str, float]] = {}
    for day, team, usd in rows:
        out.setdefault(day, {})[team] = float(usd)
    return out


def _realised(con: duckdb.DuckDBPyConnection, week: Week) -> dict[str, Any]:
    rows = con.execute(
        """
        SELECT l.action_id, a.actuator, a.finding_id, a.state, a.reason,
               count(*) AS days, sum(l.requests) AS requests, sum(l.actual_usd) AS actual_usd,
               sum(l.counterfactual_usd) AS counterfactual_usd, sum(l.saved_usd) AS saved_usd,
               sum(l.saved_low_usd) AS saved_low_usd, sum(l.saved_high_usd) AS saved_high_usd,
               any_value(l.method) AS method
        FROM savings_ledger l JOIN actions a ON a.id = l.action_id
        WHERE l.day >= ? AND l.day < ?
        GROUP BY ALL ORDER BY saved_usd DESC
        """,
        [week.start.date(), week.end.date()],
    ).fetchall()
    names = (
        "action_id",
        "actuator",
        "finding_id",
        "state",
        "reason",
        "days",
        "requests",
        "actual_usd",
        "counterfactual_usd",
        "saved_usd",
        "saved_low_usd",
        "saved_high_usd",
        "method",
    )
    actions = [
        {k: (float(v) if k.endswith("_usd") else v) for k, v in zip(names, r, strict=True)}
        for r in rows
    ]
    return {
        "source": "the savings ledger: per action and day, the touched requests' actual cost "
        "against the same requests priced under the configuration before the action",
        "saved_usd": sum(a["saved_usd"] for a in actions),
        "saved_low_usd": sum(a["saved_low_usd"] for a in actions),
        "saved_high_usd": sum(a["saved_high_usd"] for a in actions),
        "actions": actions,
    }


def _projected(con: duckdb.DuckDBPyConnection) -> dict[str, Any]:
    rows = con.execute(
        "SELECT id, kind, title, monthly_savings_usd, monthly_savings_low_usd, "
        "monthly_savings_high_usd, confidence, provisional FROM findings "
        "WHERE status = 'open' AND kind NOT LIKE 'anomalies.%' AND kind <> 'forecast.budget' "
        "ORDER BY monthly_savings_usd DESC"
    ).fetchall()
    firm = [r for r in rows if not r[7]]
    return {
        "source": "open findings' monthly projections (the analyzers' evidence and "
        "intervals): projections, not savings; provisional findings are left out",
        "monthly_usd": sum(float(r[3]) for r in firm),
        "monthly_low_usd": sum(float(r[4]) for r in firm),
        "monthly_high_usd": sum(float(r[5]) for r in firm),
        "findings": len(firm),
        "provisional_left_out": len(rows) - len(firm),
        "top": [
            {
                "id": r[0],
                "kind": r[1],
                "title": r[2],
                "monthly_usd": float(r[3]),
                "monthly_low_usd": float(r[4]),
                "monthly_high_usd": float(r[5]),
                "confidence": float(r[6]),
            }
            for r in firm[:5]
        ],
    }


def _findings(
    con: duckdb.DuckDBPyConnection, kind: str, week: Week, *, open_only: bool = False
) -> list[dict[str, Any]]:
    sql = "SELECT id, kind, title, evidence, last_seen FROM findings WHERE kind LIKE ?"
    params: list[Any] = [kind]
    if open_only:  # as it stands now
        sql += " AND status = 'open'"
    else:  # seen during the week
        sql += " AND last_seen >= ? AND first_seen < ?"
        params += [week.start, week.end]
    rows = con.execute(sql + " ORDER BY last_seen DESC", params).fetchall()
    return [
        {
            "id": r[0],
            "kind": r[1],
            "title": r[2],
            "evidence": json.loads(r[3]) if isinstance(r[3], str) else r[3],
            "last_seen": r[4].isoformat(),
        }
        for r in rows[:10]
    ]


def _deployments(con: duckdb.DuckDBPyConnection, week: Week) -> list[dict[str, Any]]:
    rows = con.execute(
        """
        SELECT h.deployment, sum(h.gpus) AS gpu_hours, sum(h.cost_usd) AS cost_usd,
               sum(h.tokens) AS tokens, sum(h.requests) AS requests,
               (SELECT avg(s.utilization_pct) FROM gpu_samples s
                WHERE s.deployment = h.deployment AND s.ts >= $start AND s.ts < $end) AS util
        FROM deployment_hours h WHERE h.hour >= $start AND h.hour < $end
        GROUP BY 1 ORDER BY cost_usd DESC
        """,
        {"start": week.start, "end": week.end},
    ).fetchall()
    return [
        {
            "deployment": d,
            "gpu_hours": float(g),
            "cost_usd": float(c),
            "tokens": int(t or 0),
            "requests": int(n or 0),
            "cost_per_million_tokens_usd": float(c) / float(t) * 1e6 if t else None,
            "mean_gpu_utilization_pct": float(u) if u is not None else None,
        }
        for d, g, c, t, n, u in rows
    ]


def _change(now: float, before: float) -> float | None:
    return None if before <= 0 else (now - before) / before


# -- rendering -------------------------------------------------------------------------------


def _usd(x: float | None) -> str:
    if x is None:
        return "–"
    return f"${x:,.2f}" if abs(x) < 1000 else f"${x:,.0f}"


def _pct(x: float | None) -> str:
    return "new" if x is None else f"{x:+.0%}"


def headline(report: dict[str, Any]) -> list[str]:
    """The three numbers a FinOps lead reads first."""
    s, r, p = report["spend"], report["realised"], report["projected"]
    return [
        f"Spent {_usd(s['total_usd'])} ({_pct(s['change'])} on the week before)",
        f"Saved {_usd(r['saved_usd'])} measured ({_usd(r['saved_low_usd'])}–"
        f"{_usd(r['saved_high_usd'])}) by {len(r['actions'])} action(s)",
        f"Could save {_usd(p['monthly_usd'])}/month (projected, "
        f"{_usd(p['monthly_low_usd'])}–{_usd(p['monthly_high_usd'])}) from "
        f"{p['findings']} finding(s)",
    ]


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown (the same sections as the HTML, without charts)."""
    s, r, p = report["spend"], report["realised"], report["projected"]
    lines = [f"# finopsd weekly report — {report['week']}", ""]
    lines += [f"{report['from'][:10]} to {report['to'][:10]} (UTC)", ""]
    lines += [f"- **{h}**" for h in headline(report)] + [""]
    lines += ["## Spend", "", f"Source: {s['source']}.", ""]
    if s["unpriced_requests"]:
        lines += [f"{s['unpriced_requests']:,} request(s) unpriced: not in these figures.", ""]
    for group in GROUPS:
        lines += [f"### By {group}", "", f"| {group} | spend | week before | change |"]
        lines += ["| --- | ---: | ---: | ---: |"]
        for row in s["by"][group]:
            lines.append(
                f"| {row['name']} | {_usd(row['usd'])} | {_usd(row['previous_usd'])} | "
                f"{_pct(row['change'])} |"
            )
        lines.append("")
    lines += ["## Realised savings (measured)", "", f"Source: {r['source']}.", ""]
    if r["actions"]:
        lines += ["| action | kind | requests | actual | without it | saved (interval) |"]
        lines += ["| --- | --- | ---: | ---: | ---: | --- |"]
        for a in r["actions"]:
            lines.append(
                f"| {a['action_id']} | {a['actuator']} | {a['requests']:,} | "
                f"{_usd(a['actual_usd'])} | {_usd(a['counterfactual_usd'])} | "
                f"{_usd(a['saved_usd'])} ({_usd(a['saved_low_usd'])}–"
                f"{_usd(a['saved_high_usd'])}) |"
            )
    else:
        lines.append("No action was live this week.")
    lines += ["", "## Projected savings (not yet realised)", "", f"Source: {p['source']}.", ""]
    for f in p["top"]:
        lines.append(
            f"- {_usd(f['monthly_usd'])}/month ({_usd(f['monthly_low_usd'])}–"
            f"{_usd(f['monthly_high_usd'])}, confidence {f['confidence']:.2f}): {f['title']}"
        )
    if p["provisional_left_out"]:
        lines.append(f"- ({p['provisional_left_out']} provisional finding(s) left out)")
    lines += ["", "## Anomalies", ""]
    lines += [f"- {a['title']}" for a in report["anomalies"]] or ["None this week."]
    lines += ["", "## Budgets", ""]
    lines += [f"- {b['title']}" for b in report["budgets"]] or ["No budget at risk."]
    lines += ["", "## Self-hosted deployments", ""]
    if report["deployments"]:
        lines += ["| deployment | GPU-hours | cost | tokens | $/1M tokens | mean GPU util |"]
        lines += ["| --- | ---: | ---: | ---: | ---: | ---: |"]
        for d in report["deployments"]:
            util = d["mean_gpu_utilization_pct"]
            lines.append(
                f"| {d['deployment']} | {d['gpu_hours']:,.0f} | {_usd(d['cost_usd'])} | "
                f"{d['tokens']:,} | {_usd(d['cost_per_million_tokens_usd'])} | "
                f"{'–' if util is None else f'{util:.0f} %'} |"
            )
    else:
        lines.append("None.")
    return "\n".join(lines) + "\n"


def charts(report: dict[str, Any]) -> dict[str, bytes]:
    """PNG charts: spend per day by team, realised against projected, $/1M tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: dict[str, bytes] = {}

    def save(fig: Any, name: str) -> None:
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=110)
        plt.close(fig)
        out[name] = buf.getvalue()

    daily = report["spend"]["daily_by_team"]
    first = datetime.fromisoformat(report["from"]).date()
    days = [(first + timedelta(days=i)).isoformat() for i in range(7)]
    daily = {d: daily.get(d, {}) for d in days}
    teams = sorted({t for d in daily.values() for t in d})
    fig, ax = plt.subplots(figsize=(7.5, 3.4))
    bottom = [0.0] * len(days)
    for team in teams:
        values = [daily[d].get(team, 0.0) for d in days]
        ax.bar([d[5:] for d in days], values, bottom=bottom, label=team)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set_title("Spend per day by team (USD)")
    ax.set_ylabel("USD")
    if teams:
        ax.legend(fontsize=8, ncols=min(4, len(teams)), loc="upper left")
    save(fig, "spend_by_team.png")

    r, p = report["realised"], report["projected"]
    week = 7 / DAYS_PER_MONTH  # projections are monthly: their share of a week
    fig, ax = plt.subplots(figsize=(7.5, 2.6))
    labels = ["saved this week\n(measured)", "could save per week\n(projected)"]
    values = [r["saved_usd"], p["monthly_usd"] * week]
    lows = [r["saved_low_usd"], p["monthly_low_usd"] * week]
    highs = [r["saved_high_usd"], p["monthly_high_usd"] * week]
    errors = [
        [max(0.0, v - lo) for v, lo in zip(values, lows, strict=True)],
        [max(0.0, hi - v) for v, hi in zip(values, highs, strict=True)],
    ]
    ax.barh(labels, values, xerr=errors, color=["#2e7d32", "#bdbdbd"], capsize=4)
    ax.set_title("Savings: measured, and projected from open findings (USD, intervals)")
    right = max([*highs, *values, 1e-9])
    for i, (v, hi) in enumerate(zip(values, highs, strict=True)):
        ax.text(max(v, hi) + right * 0.02, i, _usd(v), va="center", fontsize=9)
    ax.set_xlim(0, right * 1.2)
    save(fig, "savings.png")

    deps = [d for d in report["deployments"] if d["cost_per_million_tokens_usd"] is not None]
    fig, ax = plt.subplots(figsize=(7.5, 2.6))
    if deps:
        ax.barh([d["deployment"] for d in deps], [d["cost_per_million_tokens_usd"] for d in deps])
    else:
        ax.text(0.5, 0.5, "no self-hosted deployment this week", ha="center", va="center")
        ax.set_axis_off()
    ax.set_title("Cost per 1M tokens, self-hosted (USD)")
    save(fig, "cost_per_million_tokens.png")
    return out


def html(report: dict[str, Any], images: dict[str, bytes]) -> str:
    """One self-contained HTML file (charts inlined as data URIs)."""
    import jinja2

    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    source = resources.files("finopsd.reports").joinpath("weekly.html.j2").read_text()
    template = env.from_string(source)
    return template.render(
        r=report,
        groups=GROUPS,
        usd=_usd,
        pct=_pct,
        img={k: base64.b64encode(v).decode() for k, v in images.items()},
    )


def write(report: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """``report-<week>.{md,json,html}`` and the charts' PNGs under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"report-{report['week']}"
    images = charts(report)
    paths = {
        "markdown": out_dir / f"{stem}.md",
        "json": out_dir / f"{stem}.json",
        "html": out_dir / f"{stem}.html",
    }
    paths["markdown"].write_text(markdown(report))
    paths["json"].write_text(json.dumps(report, indent=2, default=str) + "\n")
    paths["html"].write_text(html(report, images))
    for name, data in images.items():
        path = out_dir / f"{stem}-{name}"
        path.write_bytes(data)
        paths[name] = path
    return paths
