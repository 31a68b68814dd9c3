"""``finopsd actions``: list, show, plan, approve, reject, roll back, pause; the savings.

Every command asks the running daemon over its API when it holds the store, and
opens the store itself otherwise (a decision made then is carried out by the
daemon's controller when it next runs; its events are published then). The
output is the same either way; ``--json`` prints the API's payload.
"""

from __future__ import annotations

import argparse
import getpass
import json
import shutil
import sys
import textwrap
from collections.abc import Callable
from typing import Any

from finopsd.config import Settings

Load = Callable[[argparse.Namespace], Settings]


class _Local:
    """The controller over the store file, for when no daemon holds it."""

    def __init__(self, settings: Settings) -> None:
        from finopsd.actions.controller import Controller
        from finopsd.actions.registry import build_actuators
        from finopsd.pricing import PriceBook
        from finopsd.store import Store

        self.store = Store(settings.store.path)
        self.controller = Controller(
            self.store,
            settings.actions,
            PriceBook.from_settings(settings.pricing),
            build_actuators(settings),
        )

    def __enter__(self) -> _Local:
        return self

    def __exit__(self, *exc: object) -> None:
        self.store.close()


def _call(
    settings: Settings,
    local: Callable[[Any], Any],
    method: str,
    path: str,
    body: dict[str, Any] | None = None,
) -> Any:
    """``local(controller)`` on the store file, or the same request to the daemon."""
    from finopsd.actions.controller import ActionError
    from finopsd.client import DaemonClient
    from finopsd.store import StoreError

    if not settings.store.path.exists():
        raise SystemExit(
            _fail(f"no store at {settings.store.path} (store.path): run the daemon first")
        )
    try:
        with _Local(settings) as here:
            try:
                return local(here.controller)
            except ActionError as exc:
                raise SystemExit(_fail(str(exc))) from None
    except StoreError as exc:
        if "lock" not in str(exc).lower():
            raise
    client = DaemonClient(settings)
    return client.get(path) if method == "GET" else client.post(path, body)


def _fail(message: str) -> int:
    print(f"finopsd: {message}", file=sys.stderr)
    return 1


def _actor(args: argparse.Namespace) -> str:
    return args.actor or f"cli:{getpass.getuser()}"


def _width() -> int:
    return max(60, min(120, shutil.get_terminal_size((80, 24)).columns))


def _money(value: float | None) -> str:
    return "-" if value is None else f"${value:,.2f}"


def cmd_list(args: argparse.Namespace, settings: Settings) -> int:
    from finopsd.actions import views

    def local(c: Any) -> Any:
        rows = c.list(state=args.state)
        return {"total": len(rows), "actions": [views.action(r) for r in rows]}

    out = _call(
        settings, local, "GET", "/v1/actions" + (f"?state={args.state}" if args.state else "")
    )
    if args.json:
        print(json.dumps(out))
        return 0
    if not out["actions"]:
        print("no actions")
        return 0
    width = _width()
    # the finding's projection, not a saving: `actions savings` shows what was measured
    print(f"{'ACTION':<15} {'STATE':<17} {'KIND':<17} {'PROJECTED':>12}  WHY")
    for a in out["actions"]:
        line = (
            f"{a['id']:<15} {a['state']:<17} {a['actuator']:<17} "
            f"{_money(a['monthly_savings_usd']) + '/mo':>12}  {a['reason']}"
        )
        print(line if len(line) <= width else line[: width - 1] + "…")
    return 0


def cmd_show(args: argparse.Namespace, settings: Settings) -> int:
    from finopsd.actions import views

    def local(c: Any) -> Any:
        return views.detail(c.store.cursor(), c.get(args.action), c.audit(args.action))

    out = _call(settings, local, "GET", f"/v1/actions/{args.action}")
    if args.json:
        print(json.dumps(out))
        return 0
    width = _width()
    plan = out.get("plan") or {}
    print(f"action {out['id']}: {out['actuator']} for finding {out['finding_id']}")
    print(f"  state      {out['state']}{' (paused)' if out['paused'] else ''}: {out['reason']}")
    print(
        f"  projected  {_money(out['monthly_savings_usd'])}/month "
        f"({_money(out['monthly_savings_low_usd'])}–{_money(out['monthly_savings_high_usd'])}), "
        f"confidence {out['confidence']:.2f}"
    )
    print("             (a projection from the finding, not a saving)")
    if out.get("share") is not None:
        print(
            f"  traffic    {out['share']:.0%} moved of {out['target_share']:.0%} "
            f"(step {out['step']})"
        )
    s = out.get("savings")
    if s:
        print(
            f"  realised   {_money(s['saved_usd'])} over {s['days']} day(s), {s['requests']:,} "
            f"requests ({_money(s['saved_low_usd'])}–{_money(s['saved_high_usd'])}; measured)"
        )
    print(f"  plan       {plan.get('description', '')}")
    if plan.get("diff"):
        print(textwrap.indent(plan["diff"].rstrip("\n"), "    "))
    print("  audit")
    for row in out["audit"]:
        when = row["occurred_at"][:19].replace("T", " ")
        move = f"{row['from_state'] or '-'} → {row['to_state']}"
        print(f"    {when}  {move}  ({row['actor']})")
        for line in textwrap.wrap(row["reason"], width - 8) or [""]:
            print(f"        {line}")
    return 0


def cmd_plan(args: argparse.Namespace, settings: Settings) -> int:
    out = _call(
        settings,
        lambda c: c.plan(args.finding).as_dict(),
        "GET",
        f"/v1/findings/{args.finding}/plan",
    )
    if args.json:
        print(json.dumps(out))
        return 0
    width = _width()
    head = f"{out['spec']['actuator']} through {out['backend']}: {out['description']}"
    print("\n  ".join(textwrap.wrap(head, width)))
    if not out["expressible"]:
        why = f"not carried out by finopsd: {out['reason']}"
        print("  " + "\n  ".join(textwrap.wrap(why, width - 2)))
    if out.get("share") is not None:
        print(f"  first step: {out['share']:.0%} of the scope's traffic")
    print(out["diff"].rstrip("\n") if out.get("diff") else "  (no change to show)")
    return 0


def _decision(name: str) -> Callable[[argparse.Namespace, Settings], int]:
    """``approve``, ``reject``, ``rollback`` or ``pause``: one request about one action."""

    def run(args: argparse.Namespace, settings: Settings) -> int:
        from finopsd.actions import views

        actor = _actor(args)
        body: dict[str, Any] = {"actor": actor}
        if name == "pause":
            body["paused"] = not args.resume
        elif name != "approve":
            body["reason"] = args.reason or ""

        def local(c: Any) -> Any:
            if name == "approve":
                return views.action(c.approve(args.action, actor))
            if name == "pause":
                return views.action(c.pause(args.action, actor, body["paused"]))
            return views.action(getattr(c, name)(args.action, actor, body["reason"]))

        out = _call(settings, local, "POST", f"/v1/actions/{args.action}/{name}", body)
        if args.json:
            print(json.dumps(out))
        else:
            paused = " (paused)" if out.get("paused") else ""
            print(f"action {out['id']}: {out['state']}{paused}: {out['reason']}")
        return 0

    return run


def cmd_savings(args: argparse.Namespace, settings: Settings) -> int:
    from finopsd.actions import views

    out = _call(settings, lambda c: views.savings(c.store.cursor()), "GET", "/v1/actions/savings")
    if args.json:
        print(json.dumps(out))
        return 0
    if not out["actions"]:
        print("no realised savings yet (no action has been live)")
        return 0
    print(
        f"{'ACTION':<15} {'DAYS':>4} {'REQUESTS':>9} {'ACTUAL':>11} {'WITHOUT':>11} {'SAVED':>11}"
    )
    for r in out["actions"]:
        print(
            f"{r['action_id']:<15} {r['days']:>4} {r['requests']:>9,} "
            f"{_money(r['actual_usd']):>11} {_money(r['counterfactual_usd']):>11} "
            f"{_money(r['saved_usd']):>11}"
        )
    print(
        f"realised in all: {_money(out['saved_usd'])} "
        f"({_money(out['saved_low_usd'])}–{_money(out['saved_high_usd'])}), measured"
    )
    return 0


def add_parsers(sub: Any, common: argparse.ArgumentParser, load: Load) -> None:
    """``actions ...`` under ``sub``; ``load(args)`` gives Settings."""
    from finopsd.actions.lifecycle import State

    p = sub.add_parser(
        "actions",
        help="what finopsd changed or proposes to change; approve, reject, roll back",
        description="Actions turn findings into changes (a gateway's cache or routing), "
        "under [actions] policy: planned (a diff), approved, applied a canary step at a "
        "time, verified against the traffic before, rolled back on a regression. Talks to "
        "the running daemon when it holds the store.",
    )
    acts = p.add_subparsers(dest="actions_command", required=True, metavar="COMMAND")

    def command(name: str, func: Callable[[argparse.Namespace, Settings], int], **kw: Any) -> Any:
        q = acts.add_parser(name, parents=[common], **kw)
        q.add_argument("--json", action="store_true", help="machine-readable output")
        q.set_defaults(func=lambda a: func(a, load(a)))
        return q

    q = command("list", cmd_list, help="actions, the newest first")
    q.add_argument(
        "--state",
        choices=[s.value for s in State],
        metavar="STATE",
        help="only those in STATE: " + ", ".join(s.value for s in State),
    )
    q = command("show", cmd_show, help="one action: its plan, audit trail and savings")
    q.add_argument("action", metavar="ACTION_ID")
    q = command(
        "plan",
        cmd_plan,
        help="the change a finding's action would make (a dry run)",
        description="Plan the first step of FINDING_ID's action against the live target "
        "and print its diff. Nothing is changed or recorded.",
    )
    q.add_argument("finding", metavar="FINDING_ID")
    for name, text in (
        ("approve", "approve an action awaiting approval"),
        ("reject", "reject a proposed action, or one awaiting approval"),
        ("rollback", "restore the configuration before a live action, now"),
    ):
        q = command(name, _decision(name), help=text)
        q.add_argument("action", metavar="ACTION_ID")
        q.add_argument("--actor", help="who decides (recorded; default cli:$USER)")
        if name != "approve":
            q.add_argument("--reason", help="why (recorded)")
    q = command("pause", _decision("pause"), help="hold an action where it is")
    q.add_argument("action", metavar="ACTION_ID")
    q.add_argument("--resume", action="store_true", help="let a paused action go on")
    q.add_argument("--actor", help="who decides (recorded; default cli:$USER)")
    command("savings", cmd_savings, help="realised savings per action, from the ledger")
